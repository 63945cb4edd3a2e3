// Fused elementwise steps of a Llama-family decoder layer for the engine's own forward
// (batching/lean_forward.py), each replacing several torch operators (and their dispatch cost,
// which dominates at small batches). Every step rounds where transformers' code rounds: in bf16,
// x + delta is rounded once, the RMSNorm scale is computed in fp32 and rounded to bf16 before the
// weight product, and each rotary product and their sum are rounded, so results are those of the
// torch operators (up to the fp32 summation order of the norm's mean).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "cpu_common.h"


#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using lmi::exp_nonpositive;
using lmi::load;
using lmi::round_to;
using lmi::store;

#ifdef LMI_AVX512_VECTORS
// Two bf16 steps, 16 lanes at a time, with the loops' operations and roundings: against the loops
// below, rope_ 0.45 -> 0.13 ms for 1024 tokens of 12 heads of 64 and add_rms_norm 0.24 -> 0.18 ms
// for 1024 x 576 here (docs/benchmarks.md, fifth round). silu_mul written out the same way was
// slower than its loop, so it keeps the loop.
using lmi::lanes;
using lmi::load_bf16x16;
using lmi::round_bf16x16;
using lmi::store_bf16x16;

// One row of add_rms_norm_kernel; `a`: `width` floats of scratch.
inline void add_rms_norm_row(c10::BFloat16* x, const c10::BFloat16* delta, const c10::BFloat16* weight,
                             c10::BFloat16* out, int64_t width, float eps, float* a) {
  __m512 squares = _mm512_setzero_ps();
  for (int64_t i = 0; i < width; i += 16) {
    const __mmask16 m = lanes(width - i);
    __m512 v = load_bf16x16(x + i, m);
    if (delta) {
      v = round_bf16x16(_mm512_add_ps(v, load_bf16x16(delta + i, m)));
      store_bf16x16(v, x + i, m);
    }
    _mm512_mask_storeu_ps(a + i, m, v);
    squares = _mm512_fmadd_ps(v, v, squares);  // (lanes past the row are zero)
  }
  const __m512 scale =
      _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(squares) / static_cast<float>(width) + eps));
  for (int64_t i = 0; i < width; i += 16) {
    const __mmask16 m = lanes(width - i);
    const __m512 normed = round_bf16x16(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, a + i), scale));
    store_bf16x16(_mm512_mul_ps(normed, load_bf16x16(weight + i, m)), out + i, m);
  }
}

// One head of rope_kernel when half the rotary width is a multiple of 16.
inline void rope_head(c10::BFloat16* row, const c10::BFloat16* c, const c10::BFloat16* s, int64_t half) {
  for (int64_t i = 0; i < half; i += 16) {
    const __m512 x1 = load_bf16x16(row + i), x2 = load_bf16x16(row + half + i);
    const __m512 c1 = load_bf16x16(c + i), c2 = load_bf16x16(c + half + i);
    const __m512 s1 = load_bf16x16(s + i), s2 = load_bf16x16(s + half + i);
    const __m512 first = round_bf16x16(_mm512_mul_ps(x1, c1));
    const __m512 t1 = round_bf16x16(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), x2), s1));
    const __m512 second = round_bf16x16(_mm512_mul_ps(x2, c2));
    const __m512 t2 = round_bf16x16(_mm512_mul_ps(x1, s2));
    store_bf16x16(_mm512_add_ps(first, t1), row + i);
    store_bf16x16(_mm512_add_ps(second, t2), row + half + i);
  }
}

#endif

template <typename T>
void add_rms_norm_kernel(T* x, const T* delta, const T* weight, T* out, int64_t rows, int64_t width, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> a(width), b(width), w(width);
    load(weight, w.data(), width);
    for (int64_t r = begin; r < end; ++r) {
#ifdef LMI_AVX512_VECTORS
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        add_rms_norm_row(x + r * width, delta ? delta + r * width : nullptr, weight, out + r * width, width, eps,
                         a.data());
        continue;
      }
#endif
      T* xr = x + r * width;
      load(xr, a.data(), width);
      if (delta) {
        load(delta + r * width, b.data(), width);
#pragma omp simd
        for (int64_t i = 0; i < width; ++i) a[i] += b[i];
        round_to<T>(a.data(), width);
        store(a.data(), xr, width);
      }
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < width; ++i) sum += a[i] * a[i];
      const float scale = 1.f / std::sqrt(sum / static_cast<float>(width) + eps);
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) a[i] *= scale;
      round_to<T>(a.data(), width);
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) a[i] *= w[i];
      store(a.data(), out + r * width, width);
    }
  });
}

// The first `width` features of each head rotated (all of them unless a partial rotary factor).
template <typename T>
void rope_kernel(T* qkv, const T* cos, const T* sin, int64_t tokens, int64_t heads, int64_t row_stride,
                 int64_t head_dim, int64_t width) {
  const int64_t half = width / 2;
  at::parallel_for(0, tokens, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> c(width), s(width), v(width), first(half), second(half), t1(half), t2(half);
    for (int64_t t = begin; t < end; ++t) {
#ifdef LMI_AVX512_VECTORS
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        if (half % 16 == 0) {
          for (int64_t h = 0; h < heads; ++h)
            rope_head(qkv + t * row_stride + h * head_dim, cos + t * width, sin + t * width, half);
          continue;
        }
      }
#endif
      load(cos + t * width, c.data(), width);
      load(sin + t * width, s.data(), width);
      for (int64_t h = 0; h < heads; ++h) {
        T* row = qkv + t * row_stride + h * head_dim;
        load(row, v.data(), width);
        // x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1); each product rounded.
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          first[i] = v[i] * c[i];
          t1[i] = -v[i + half] * s[i];
          second[i] = v[i + half] * c[i + half];
          t2[i] = v[i] * s[i + half];
        }
        round_to<T>(first.data(), half);
        round_to<T>(t1.data(), half);
        round_to<T>(second.data(), half);
        round_to<T>(t2.data(), half);
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          v[i] = first[i] + t1[i];
          v[i + half] = second[i] + t2[i];
        }
        store(v.data(), row, width);
      }
    }
  });
}

template <typename T>
void silu_mul_kernel(const T* gate_up, T* out, int64_t rows, int64_t width) {
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> g(width), u(width);
    for (int64_t r = begin; r < end; ++r) {
      load(gate_up + r * 2 * width, g.data(), width);
      load(gate_up + r * 2 * width + width, u.data(), width);
      // silu(x) = x * sigmoid(x), sigmoid from exp(-|x|) so the exponent is never positive.
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) {
        const float x = g[i];
        const float e = exp_nonpositive(x < 0.f ? x : -x);
        const float sigmoid = x < 0.f ? e / (1.f + e) : 1.f / (1.f + e);
        g[i] = x * sigmoid;
      }
      round_to<T>(g.data(), width);
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) g[i] *= u[i];
      store(g.data(), out + r * width, width);
    }
  });
}

#define LMI_DISPATCH(dtype, NAME, ...)                                              \
  switch (dtype) {                                                                  \
    case torch::kFloat32: { using scalar = float; __VA_ARGS__; break; }             \
    case torch::kBFloat16: { using scalar = c10::BFloat16; __VA_ARGS__; break; }    \
    case torch::kFloat16: { using scalar = c10::Half; __VA_ARGS__; break; }         \
    default: TORCH_CHECK(false, NAME ": unsupported dtype ", dtype);                \
  }

constexpr int64_t kChunk = 512;  // logits converted to fp32 at a time

// A row's maximum and the first kChunk-chunk holding it (`buffer`: kChunk floats).
template <typename T>
inline std::pair<float, int64_t> row_maximum(const T* row, int64_t vocab, float* buffer) {
  float top = -std::numeric_limits<float>::infinity();
  int64_t top_chunk = 0;
  for (int64_t c = 0; c * kChunk < vocab; ++c) {
    const int64_t n = std::min(kChunk, vocab - c * kChunk);
    load(row + c * kChunk, buffer, n);
    const float m = lmi::max_of(buffer, n);
    if (m > top) top = m, top_chunk = c;  // the first chunk holding the maximum
  }
  return {top, top_chunk};
}

// Per row of logits [rows, vocab] (rows may be strided, the vocabulary contiguous): the first
// index of the row's maximum, as torch.argmax, for rows without NaN (with a NaN the result is
// unspecified; the sampler checks for them).
template <typename T>
void argmax_kernel(const T* logits, int64_t rows, int64_t vocab, int64_t stride, int64_t* out) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(kChunk);
    for (int64_t r = begin; r < end; ++r) {
      const T* row = logits + r * stride;
      const auto [top, top_chunk] = row_maximum(row, vocab, buffer.data());
      const int64_t n = std::min(kChunk, vocab - top_chunk * kChunk);
      load(row + top_chunk * kChunk, buffer.data(), n);
      int64_t i = 0;
      while (i + 1 < n && buffer[i] != top) ++i;
      out[r] = top_chunk * kChunk + i;
    }
  });
}

// The sum over i of exp(x[i] - shift) for x[i] <= shift (terms below e^-87 count as e^-87, a
// negligible addend next to the maximum's 1); a NaN makes the sum NaN.
inline float sum_exp_shifted(const float* x, int64_t n, float shift) {
  int64_t i = 0;
  float total = 0.f;
#ifdef __AVX512F__
  const __m512 vshift = _mm512_set1_ps(shift), low = _mm512_set1_ps(-87.f);
  // (max keeps a NaN: maxps returns its second operand when one is NaN)
  const auto exp16 = [&](__m512 v) { return lmi::exp_nonpositive16(_mm512_max_ps(low, _mm512_sub_ps(v, vshift))); };
  __m512 a = _mm512_setzero_ps(), b = a;
  for (; i + 32 <= n; i += 32) {
    a = _mm512_add_ps(a, exp16(_mm512_loadu_ps(x + i)));
    b = _mm512_add_ps(b, exp16(_mm512_loadu_ps(x + i + 16)));
  }
  total = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
#endif
  for (; i < n; ++i) {
    const float d = x[i] - shift;
    total += std::isnan(d) ? d : lmi::exp_nonpositive(std::max(d, -87.f));
  }
  return total;
}

// Per row of logits [rows, vocab]: the first index of the row's maximum (as torch.argmax) and
// its log-probability, log_softmax(row)[index] = -log(sum(exp(row - max))), in two passes over
// the row and no [rows, vocab] output. A row holding a NaN (or whose maximum is infinite) gets a
// NaN log-probability and an unspecified index: the sampler then redoes the batch with torch.
template <typename T>
void greedy_kernel(const T* logits, int64_t rows, int64_t vocab, int64_t stride, int64_t* tokens, float* log_probs) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(kChunk);
    for (int64_t r = begin; r < end; ++r) {
      const T* row = logits + r * stride;
      const auto [top, top_chunk] = row_maximum(row, vocab, buffer.data());
      float sum = 0.f;
      for (int64_t c = 0; c * kChunk < vocab; ++c) {
        const int64_t n = std::min(kChunk, vocab - c * kChunk);
        load(row + c * kChunk, buffer.data(), n);
        sum += sum_exp_shifted(buffer.data(), n, top);
        if (c == top_chunk) {
          int64_t i = 0;
          while (i + 1 < n && buffer[i] != top) ++i;
          tokens[r] = top_chunk * kChunk + i;
        }
      }
      log_probs[r] = std::isinf(top) ? std::numeric_limits<float>::quiet_NaN() : -std::log(sum);
    }
  });
}

}  // namespace

// x [rows, width] (updated in place to x + delta when delta is given), weight [width] ->
// RMSNorm(x) * weight [rows, width].
torch::Tensor add_rms_norm(const torch::Tensor& x, const c10::optional<torch::Tensor>& delta, const torch::Tensor& weight,
                           double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "add_rms_norm: x must be a contiguous [rows, width] tensor");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.scalar_type() == x.scalar_type(),
              "add_rms_norm: weight must be [width] in x's dtype");
  torch::Tensor d;
  if (delta.has_value()) {
    d = delta->contiguous();
    TORCH_CHECK(d.sizes() == x.sizes() && d.scalar_type() == x.scalar_type(), "add_rms_norm: delta differs from x");
  }
  auto w = weight.contiguous();
  auto out = torch::empty_like(x);
  LMI_DISPATCH(x.scalar_type(), "add_rms_norm",
               add_rms_norm_kernel<scalar>(x.data_ptr<scalar>(), d.defined() ? d.data_ptr<scalar>() : nullptr,
                                           w.data_ptr<scalar>(), out.data_ptr<scalar>(), x.size(0), x.size(1),
                                           static_cast<float>(eps)));
  return out;
}

// The first `heads` heads of each row of qkv [tokens, >= heads, head_dim] (rows may be strided,
// heads contiguous) rotated in place by cos, sin [tokens, width]: the first `width` features of
// each head (width < head_dim for a partial rotary factor; the rest is left as it is).
void rope_(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin, int64_t heads) {
  TORCH_CHECK(qkv.dim() == 3 && qkv.stride(2) == 1 && qkv.stride(1) == qkv.size(2), "rope_: qkv layout");
  TORCH_CHECK(heads <= qkv.size(1), "rope_: heads");
  auto c = cos.contiguous(), s = sin.contiguous();
  TORCH_CHECK(c.dim() == 2 && c.size(0) == qkv.size(0) && c.size(1) <= qkv.size(2) && c.size(1) % 2 == 0 &&
                  c.sizes() == s.sizes(),
              "rope_: cos and sin must be [tokens, width] with an even width <= head_dim");
  TORCH_CHECK(c.scalar_type() == qkv.scalar_type() && s.scalar_type() == qkv.scalar_type(), "rope_: dtypes differ");
  LMI_DISPATCH(qkv.scalar_type(), "rope_",
               rope_kernel<scalar>(qkv.data_ptr<scalar>(), c.data_ptr<scalar>(), s.data_ptr<scalar>(), qkv.size(0),
                                   heads, qkv.stride(0), qkv.size(2), c.size(1)));
}

// gate_up [rows, 2 * width] (gate then up) -> silu(gate) * up [rows, width].
torch::Tensor silu_mul(const torch::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "silu_mul: gate_up must be [rows, 2 * width]");
  auto gu = gate_up.contiguous();
  auto out = torch::empty({gu.size(0), gu.size(1) / 2}, gu.options());
  LMI_DISPATCH(gu.scalar_type(), "silu_mul",
               silu_mul_kernel<scalar>(gu.data_ptr<scalar>(), out.data_ptr<scalar>(), gu.size(0), gu.size(1) / 2));
  return out;
}

// logits [rows, vocab] -> int64 [rows]: each row's first index of its maximum (rows without NaN).
torch::Tensor argmax_rows(const torch::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0 && logits.stride(1) == 1,
              "argmax_rows: logits must be [rows, vocab], contiguous along the vocabulary");
  auto out = torch::empty({logits.size(0)}, logits.options().dtype(torch::kLong));
  LMI_DISPATCH(logits.scalar_type(), "argmax_rows",
               argmax_kernel<scalar>(logits.data_ptr<scalar>(), logits.size(0), logits.size(1), logits.stride(0),
                                     out.data_ptr<int64_t>()));
  return out;
}

std::vector<torch::Tensor> greedy_rows(const torch::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0 && logits.stride(1) == 1,
              "greedy_rows: logits must be [rows, vocab], contiguous along the vocabulary");
  auto tokens = torch::empty({logits.size(0)}, logits.options().dtype(torch::kLong));
  auto log_probs = torch::empty({logits.size(0)}, logits.options().dtype(torch::kFloat));
  LMI_DISPATCH(logits.scalar_type(), "greedy_rows",
               greedy_kernel<scalar>(logits.data_ptr<scalar>(), logits.size(0), logits.size(1), logits.stride(0),
                                     tokens.data_ptr<int64_t>(), log_probs.data_ptr<float>()));
  return {tokens, log_probs};
}

// New keys and values [T, Hkv, D] (rows and heads may be strided, D contiguous) into their cache
// slots (caches [num_blocks, block_size, Hkv, D] contiguous, same dtype; slots [T] int64, -1: no
// write): what index_copy_ does per layer, without its per-call dispatch (two index_copy_ calls
// took 11.5 us each for a decode step's 32 rows here; docs/benchmarks.md).
void write_kv(const torch::Tensor& key, const torch::Tensor& value, const torch::Tensor& k_cache,
              const torch::Tensor& v_cache, const torch::Tensor& slots_in) {
  TORCH_CHECK(key.dim() == 3 && value.sizes() == key.sizes() && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "write_kv: bad shapes");
  TORCH_CHECK(key.size(1) == k_cache.size(2) && key.size(2) == k_cache.size(3), "write_kv: head shapes differ");
  TORCH_CHECK(key.scalar_type() == k_cache.scalar_type() && value.scalar_type() == k_cache.scalar_type() &&
                  v_cache.scalar_type() == k_cache.scalar_type(),
              "write_kv: keys, values and caches must share a dtype");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && key.stride(2) == 1 && value.stride(2) == 1,
              "write_kv: contiguous caches and head rows are needed");
  TORCH_CHECK(slots_in.dim() == 1 && slots_in.size(0) == key.size(0) && slots_in.scalar_type() == torch::kLong,
              "write_kv: one int64 slot per token");
  const auto slots = slots_in.contiguous();
  const int64_t tokens = key.size(0), heads = key.size(1), dim = key.size(2);
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1), bytes = dim * key.element_size();
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(slot[t] < num_slots, "write_kv: slot ", slot[t], " is outside the cache of ", num_slots);
  const auto copy = [&](const torch::Tensor& rows, const torch::Tensor& cache) {
    const char* src = static_cast<const char*>(rows.data_ptr());
    char* dst = static_cast<char*>(cache.data_ptr());
    const int64_t s0 = rows.stride(0) * rows.element_size(), s1 = rows.stride(1) * rows.element_size();
    for (int64_t t = 0; t < tokens; ++t) {
      if (slot[t] < 0) continue;
      for (int64_t h = 0; h < heads; ++h)
        std::memcpy(dst + (slot[t] * heads + h) * bytes, src + t * s0 + h * s1, bytes);
    }
  };
  copy(key, k_cache);
  copy(value, v_cache);
}
