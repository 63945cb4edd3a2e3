// CPU paged decode attention that reads the block-table KV cache in place.
//
// The torch path (kernels/reference.py decode_from_slots) gathers every decoding sequence's
// context into a padded copy in every layer before its two products; at long contexts the
// copies cost as much as the products. This kernel walks each sequence's blocks directly: per
// (sequence, KV head), scores of its query heads against every key in fp32, a softmax (with an
// optional attention sink per query head), then the value sum, all in fp32, with the result
// cast to the query's dtype. Semantics are those of kernels/reference.py: a window W lets the
// query at position p see keys p - W < k <= p; softcapping applies to the scaled scores.
//
// bf16 caches with head sizes 64 and 128 on CPUs with AVX512-BF16 take explicit vector code
// (the generic loops spend most of their time in per-key horizontal sums and in accumulators the
// compiler keeps in memory): scores of 16 keys at a time with vdpbf16ps (each bf16 product is
// exact in fp32, summed in fp32; bf16 subnormals count as zero), reduced together into one vector;
// value sums in fp32 with every query head of a KV head in registers; the next keys and values
// prefetched from their blocks.
//
// Built at run time by kernels/cpu_native.py (torch.utils.cpp_extension); the torch path
// serves where no compiler is available.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "cpu_common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using lmi::exp_nonpositive;
using lmi::load;

constexpr int64_t TILE = 16;  // cache slots converted to fp32 at a time
// Prefetch distances of the bf16 vector code, measured on a 30-layer pass of 32 sequences with
// their blocks scattered (as a running server's are), K/V from memory: the value sums prefetch
// kValuesAhead tokens ahead; the scores prefetch the values of their tile too, for the whole
// sequence when its values fit in kEarlyValuesBytes (they then wait in L2), else for the first
// kValuesAhead tokens (146 -> 101 us per layer at up to 100 tokens, 499 -> 389 at up to 400,
// with a prefetch of the next sequence's first keys that the next line replaced). While a sequence
// sums its values, the next sequence's keys and values are prefetched into L2, up to kNextPerCall
// lines per token: 105-118 -> 81-89 us per layer at up to 100 tokens, 404 -> 372-377 at up to 400.
constexpr int64_t kValuesAhead = 32;
constexpr int64_t kEarlyValuesBytes = 64 << 10;
constexpr int64_t kNextPerCall = 4;

template <typename T, int D>
constexpr bool kBf16Vectors =
#ifdef LMI_AVX512_BF16
    std::is_same_v<T, c10::BFloat16> && (D == 64 || D == 128);
#else
    false;
#endif

// The next sequence's keys and values, prefetched into L2 a few lines at a time (`issue`, once per
// token of the current sequence's value sums), so its own reads start in L2 instead of memory.
struct NextSequence {
  const char* k = nullptr;
  const char* v = nullptr;
  const int64_t* slots = nullptr;
  int64_t n = 0, row_bytes = 0, token = 0, offset = 0;
  int64_t per_call = 0;
  inline void issue() {
#ifdef LMI_AVX512_BF16
    for (int64_t c = 0; c < per_call && token < n; ++c) {
      const char* base = offset < row_bytes ? k + offset : v + (offset - row_bytes);
      _mm_prefetch(base + slots[token] * row_bytes, _MM_HINT_T1);
      offset += 64;
      if (offset >= 2 * row_bytes) { offset = 0; ++token; }
    }
#endif
  }
};

#ifdef LMI_AVX512_BF16

// v[t] = the sum of a[t]'s 16 lanes, for 16 vectors.
inline __m512 sum_lanes16(__m512 a[16]) {
  __m512 s[8], u[4];
  for (int i = 0; i < 8; ++i)
    s[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(s[2 * i]), y = _mm512_castps_pd(s[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  const __m512 w01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 w23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w01, w23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(w01, w23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// Scores of `heads` bf16 query rows q [heads][D] (those sharing one KV head) against `count` <= 16
// bf16 keys at `keys[t]` -> scores[h * stride + t], scaled. Each key is loaded once for all heads.
template <int D>
inline void bf16_scores(const c10::BFloat16* q, int64_t heads, const c10::BFloat16* const* keys, int64_t count,
                        float scale, float* scores, int64_t stride) {
  constexpr int C = D / 32;
  __m512i kv[16][C];
  for (int64_t t = 0; t < 16; ++t)
    for (int c = 0; c < C; ++c)
      kv[t][c] = t < count ? _mm512_loadu_si512(reinterpret_cast<const uint16_t*>(keys[t]) + 32 * c) : _mm512_setzero_si512();
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t h = 0; h < heads; ++h) {
    __m512i qv[C];
    for (int c = 0; c < C; ++c) qv[c] = _mm512_loadu_si512(reinterpret_cast<const uint16_t*>(q + h * D) + 32 * c);
    __m512 acc[16];
    for (int t = 0; t < 16; ++t) {
      __m512 a = _mm512_setzero_ps();
      for (int c = 0; c < C; ++c) a = _mm512_dpbf16_ps(a, (__m512bh)qv[c], (__m512bh)kv[t][c]);
      acc[t] = a;
    }
    const __m512 v = _mm512_mul_ps(sum_lanes16(acc), vscale);
    _mm512_mask_storeu_ps(scores + h * stride, lmi::lanes(count), v);
  }
}

// acc[j][D] = sum over the n tokens of probs[j * p_stride + t] * value_t, for CH query heads
// sharing the KV head whose rows start at `values` (+ slot * token_stride); fp32 throughout.
template <int D, int CH>
inline void bf16_values(const float* probs, int64_t p_stride, const c10::BFloat16* values, const int64_t* slots,
                        int64_t n, int64_t token_stride, float* acc_out, NextSequence& next) {
  constexpr int C = D / 16;
  __m512 acc[CH][C];
  for (int j = 0; j < CH; ++j)
    for (int c = 0; c < C; ++c) acc[j][c] = _mm512_setzero_ps();
  const uint16_t* base = reinterpret_cast<const uint16_t*>(values);
  NextSequence ahead = next;  // (its cursor in registers through the loop)
  const bool prefetching = ahead.token < ahead.n;
  for (int64_t t = 0; t < n; ++t) {
    const uint16_t* v = base + slots[t] * token_stride;
    if (prefetching) ahead.issue();
    if (t + kValuesAhead < n) {
      const char* ahead = reinterpret_cast<const char*>(base + slots[t + kValuesAhead] * token_stride);
      for (int64_t line = 0; line < D * 2; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
    }
    __m512 vv[C];
    for (int c = 0; c < C; ++c)
      vv[c] = _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 16 * c))), 16));
    for (int j = 0; j < CH; ++j) {
      const __m512 p = _mm512_set1_ps(probs[j * p_stride + t]);
      for (int c = 0; c < C; ++c) acc[j][c] = _mm512_fmadd_ps(p, vv[c], acc[j][c]);
    }
  }
  next = ahead;
  for (int j = 0; j < CH; ++j)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(acc_out + j * D + 16 * c, acc[j][c]);
}

// The value sums of `heads` query heads sharing one KV head, up to 24 / (D / 16) heads per pass
// (their accumulators fill the vector registers).
template <int D>
inline void bf16_values_group(const float* probs, int64_t p_stride, int64_t heads, const c10::BFloat16* values,
                              const int64_t* slots, int64_t n, int64_t token_stride, float* acc_out, NextSequence& next) {
  constexpr int64_t kMax = D == 64 ? 6 : 3;
  for (int64_t h = 0; h < heads; h += kMax) {
    const float* p = probs + h * p_stride;
    float* out = acc_out + h * D;
    switch (std::min(kMax, heads - h)) {
      case 1: bf16_values<D, 1>(p, p_stride, values, slots, n, token_stride, out, next); break;
      case 2: bf16_values<D, 2>(p, p_stride, values, slots, n, token_stride, out, next); break;
      case 3: bf16_values<D, 3>(p, p_stride, values, slots, n, token_stride, out, next); break;
      case 4: if constexpr (kMax >= 4) bf16_values<D, 4>(p, p_stride, values, slots, n, token_stride, out, next); break;
      case 5: if constexpr (kMax >= 5) bf16_values<D, 5>(p, p_stride, values, slots, n, token_stride, out, next); break;
      default: if constexpr (kMax >= 6) bf16_values<D, 6>(p, p_stride, values, slots, n, token_stride, out, next); break;
    }
  }
}
#endif

// One sequence: its query heads [num_kv_heads * group][D] (in fp32 in `q`, in T in `q_rows`)
// against the keys at `slots` (n of them; a slot holds every KV head's row) -> out rows
// [num_heads][D]. Each slot is read once, all heads together. `D` is the head size when known at
// compile time (0: `head_dim`).
template <typename T, int D>
void attend_sequence(const float* __restrict__ q, const T* q_rows, int64_t num_kv_heads, int64_t group,
                     int64_t head_dim, const T* k_ptr, const T* v_ptr, const int64_t* __restrict__ slots, int64_t n,
                     float scale, float cap, const float* sinks, float* __restrict__ scores,
                     float* __restrict__ tile, float* __restrict__ acc, T* out, NextSequence& next) {
  const int64_t dim = D > 0 ? D : head_dim;
  const int64_t heads = num_kv_heads * group, token_stride = num_kv_heads * dim;
  if constexpr (kBf16Vectors<T, D>) {
#ifdef LMI_AVX512_BF16
    const int64_t early_values = n * token_stride * static_cast<int64_t>(sizeof(T)) <= kEarlyValuesBytes ? n : kValuesAhead;
    for (int64_t i0 = 0; i0 < n; i0 += TILE) {
      const int64_t count = std::min<int64_t>(TILE, n - i0);
      for (int64_t g = 0; g < num_kv_heads; ++g) {
        const T* keys[TILE];
        for (int64_t t = 0; t < count; ++t) keys[t] = k_ptr + slots[i0 + t] * token_stride + g * dim;
        for (int64_t t = i0 + TILE; t < std::min(n, i0 + 2 * TILE); ++t) {  // the next tile's keys
          const char* ahead = reinterpret_cast<const char*>(k_ptr + slots[t] * token_stride + g * dim);
          for (int64_t line = 0; line < D * 2; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
        }
        bf16_scores<D>(q_rows + g * group * dim, group, keys, count, scale, scores + g * group * n + i0, n);
        if (i0 < early_values)
          for (int64_t t = 0; t < count; ++t) {  // this tile's values, for the value sums
            const char* row = reinterpret_cast<const char*>(v_ptr + slots[i0 + t] * token_stride + g * dim);
            for (int64_t line = 0; line < D * 2; line += 64) _mm_prefetch(row + line, _MM_HINT_T1);
          }
      }
    }
#endif
  } else {
    // Keys, TILE slots at a time: converted to fp32 once into `tile` [TILE][token_stride] (it
    // stays in L1), then every head's dot products against them.
    for (int64_t i0 = 0; i0 < n; i0 += TILE) {
      const int64_t count = std::min<int64_t>(TILE, n - i0);
      for (int64_t t = 0; t < count; ++t)
        load(k_ptr + slots[i0 + t] * token_stride, tile + t * token_stride, token_stride);
      for (int64_t h = 0; h < heads; ++h) {
        const float* __restrict__ qh = q + h * dim;
        const float* __restrict__ keys = tile + (h / group) * dim;
        float* __restrict__ sh = scores + h * n + i0;
        for (int64_t t = 0; t < count; ++t) {
          const float* __restrict__ key = keys + t * token_stride;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < dim; ++d) dot += qh[d] * key[d];
          sh[t] = dot * scale;
        }
      }
    }
  }
  for (int64_t h = 0; h < heads; ++h) {
    float* __restrict__ sh = scores + h * n;
    if (cap > 0.f)
      for (int64_t i = 0; i < n; ++i) sh[i] = std::tanh(sh[i] / cap) * cap;
    const float top = std::max(sinks ? sinks[h] : -std::numeric_limits<float>::infinity(), lmi::max_of(sh, n));
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) sh[i] = exp_nonpositive(sh[i] - top);
    float sum = sinks ? exp_nonpositive(sinks[h] - top) : 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) sum += sh[i];
    const float inverse = sum > 0.f ? 1.f / sum : 0.f;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) sh[i] *= inverse;
  }
  if constexpr (kBf16Vectors<T, D>) {
#ifdef LMI_AVX512_BF16
    for (int64_t g = 0; g < num_kv_heads; ++g)
      bf16_values_group<D>(scores + g * group * n, n, group, v_ptr + g * dim, slots, n, token_stride,
                           acc + g * group * dim, next);
#endif
  } else {
    // Values, a tile at a time; each head's accumulator row stays in registers across the tile.
    std::fill(acc, acc + heads * dim, 0.f);
    for (int64_t i0 = 0; i0 < n; i0 += TILE) {
      const int64_t count = std::min<int64_t>(TILE, n - i0);
      for (int64_t t = 0; t < count; ++t)
        load(v_ptr + slots[i0 + t] * token_stride, tile + t * token_stride, token_stride);
      for (int64_t h = 0; h < heads; ++h) {
        const float* __restrict__ values = tile + (h / group) * dim;
        const float* __restrict__ ph = scores + h * n + i0;
        float row[D > 0 ? D : 1];
        float* __restrict__ ah = D > 0 ? row : acc + h * dim;
        if (D > 0)
          for (int64_t d = 0; d < dim; ++d) ah[d] = acc[h * dim + d];
        for (int64_t t = 0; t < count; ++t) {
          const float p = ph[t];
          const float* __restrict__ value = values + t * token_stride;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) ah[d] += p * value[d];
        }
        if (D > 0)
          for (int64_t d = 0; d < dim; ++d) acc[h * dim + d] = ah[d];
      }
    }
  }
  lmi::store(acc, out, heads * dim);  // rounds as static_cast<T> does, vectorized
}

template <typename T, int D>
void decode_kernel(const torch::Tensor& query, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                   const torch::Tensor& block_tables, const torch::Tensor& context_lens, torch::Tensor& out,
                   double scale, int64_t window, double softcap, const float* sink_ptr) {
  const int64_t batch = query.size(0), num_heads = query.size(1), head_dim = query.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads;
  const int64_t table_width = block_tables.size(1);
  const T* q_ptr = query.data_ptr<T>();
  const T* k_ptr = k_cache.data_ptr<T>();
  const T* v_ptr = v_cache.data_ptr<T>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  T* out_ptr = out.data_ptr<T>();
  const float fscale = static_cast<float>(scale), fcap = static_cast<float>(softcap);
  const int64_t q_stride_b = query.stride(0), q_stride_h = query.stride(1);

  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(num_heads * head_dim), tile(TILE * num_kv_heads * head_dim), acc(num_heads * head_dim), scores;
    std::vector<int64_t> slots, next_slots;
    std::vector<T> q_rows(num_heads * head_dim);  // the query as given (the bf16 vector code's operand)
    // Sequence b's cache slots (the window's, if any), in order.
    auto fill_slots = [&](int64_t b, std::vector<int64_t>& out) {
      const int64_t len = lens[b];
      const int64_t start = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int32_t* table = tables + b * table_width;
      out.resize(len - start);
      for (int64_t pos = start; pos < len; ++pos)
        out[pos - start] = static_cast<int64_t>(table[pos / block_size]) * block_size + pos % block_size;
    };
    bool next_filled = false;  // next_slots holds sequence b's slots
    for (int64_t b = begin; b < end; ++b) {
      if (next_filled) std::swap(slots, next_slots); else fill_slots(b, slots);
      next_filled = false;
      const int64_t n = static_cast<int64_t>(slots.size());
      NextSequence next;
      // The next row's K/V, unless it is this sequence one token on (a prefill's rows: this row
      // reads nearly all of it) or shares this row's first block (a cached prefix): then what it
      // reads is largely in cache already.
      if (b + 1 < end && table_width > 0 && tables[(b + 1) * table_width] != tables[b * table_width]) {
        fill_slots(b + 1, next_slots);
        next_filled = true;
        next.k = reinterpret_cast<const char*>(k_ptr);
        next.v = reinterpret_cast<const char*>(v_ptr);
        next.slots = next_slots.data();
        next.n = static_cast<int64_t>(next_slots.size());
        next.row_bytes = num_kv_heads * head_dim * static_cast<int64_t>(sizeof(T));
        // Spread over this sequence's value passes (one call per token and KV head).
        const int64_t lines = 2 * next.n * ((next.row_bytes + 63) / 64);
        const int64_t calls = std::max<int64_t>(1, n * num_kv_heads);
        next.per_call = std::min<int64_t>(kNextPerCall, (lines + calls - 1) / calls);
      }
      scores.resize(num_heads * n);
      for (int64_t h = 0; h < num_heads; ++h) {
        load(q_ptr + b * q_stride_b + h * q_stride_h, q.data() + h * head_dim, head_dim);
        std::memcpy(q_rows.data() + h * head_dim, q_ptr + b * q_stride_b + h * q_stride_h, head_dim * sizeof(T));
      }
      attend_sequence<T, D>(q.data(), q_rows.data(), num_kv_heads, group, head_dim, k_ptr, v_ptr, slots.data(), n, fscale, fcap,
                            sink_ptr, scores.data(), tile.data(), acc.data(), out_ptr + b * num_heads * head_dim, next);
    }
  });
}

template <typename T>
void decode_any_head_size(const torch::Tensor& query, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                          const torch::Tensor& block_tables, const torch::Tensor& context_lens, torch::Tensor& out,
                          double scale, int64_t window, double softcap, const float* sinks) {
  switch (query.size(2)) {
    case 64: return decode_kernel<T, 64>(query, k_cache, v_cache, block_tables, context_lens, out, scale, window, softcap, sinks);
    case 128: return decode_kernel<T, 128>(query, k_cache, v_cache, block_tables, context_lens, out, scale, window, softcap, sinks);
    default: return decode_kernel<T, 0>(query, k_cache, v_cache, block_tables, context_lens, out, scale, window, softcap, sinks);
  }
}

}  // namespace

// query [B, Hq, D] (rows may be strided), caches [num_blocks, block_size, Hkv, D] contiguous, in the
// query's dtype; block_tables [B, W] int32; context_lens [B] int32 (the new token included) ->
// out [B, Hq, D] contiguous. window <= 0: no window; softcap <= 0: none; sinks [Hq] or None.
torch::Tensor paged_decode(const torch::Tensor& query, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                           const torch::Tensor& block_tables_in, const torch::Tensor& context_lens_in, double scale,
                           int64_t window, double softcap, const c10::optional<torch::Tensor>& sinks) {
  TORCH_CHECK(query.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(query.scalar_type() == k_cache.scalar_type() && k_cache.scalar_type() == v_cache.scalar_type(),
              "query and caches must share a dtype");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(query.stride(2) == 1, "query rows must be contiguous in the head dimension");
  TORCH_CHECK(query.size(1) % k_cache.size(2) == 0 && query.size(2) == k_cache.size(3), "head shapes differ");
  TORCH_CHECK(block_tables_in.scalar_type() == torch::kInt32 && context_lens_in.scalar_type() == torch::kInt32,
              "block tables and lengths must be int32");
  const auto block_tables = block_tables_in.contiguous(), context_lens = context_lens_in.contiguous();
  TORCH_CHECK(block_tables.size(0) == query.size(0) && context_lens.size(0) == query.size(0), "batch sizes differ");
  auto out = torch::empty({query.size(0), query.size(1), query.size(2)}, query.options());
  torch::Tensor sinks_f;
  const float* sink_ptr = nullptr;
  if (sinks.has_value()) {
    sinks_f = sinks->to(torch::kFloat32).contiguous();
    TORCH_CHECK(sinks_f.numel() == query.size(1), "one sink per query head");
    sink_ptr = sinks_f.data_ptr<float>();
  }
  switch (query.scalar_type()) {
    case torch::kFloat32:
      decode_any_head_size<float>(query, k_cache, v_cache, block_tables, context_lens, out, scale, window, softcap, sink_ptr);
      break;
    case torch::kBFloat16:
      decode_any_head_size<c10::BFloat16>(query, k_cache, v_cache, block_tables, context_lens, out, scale, window, softcap,
                                          sink_ptr);
      break;
    case torch::kFloat16:
      decode_any_head_size<c10::Half>(query, k_cache, v_cache, block_tables, context_lens, out, scale, window, softcap,
                                      sink_ptr);
      break;
    default:
      TORCH_CHECK(false, "unsupported dtype ", query.scalar_type());
  }
  return out;
}

// kernels/csrc/cpu_layer_ops.cpp
torch::Tensor add_rms_norm(const torch::Tensor& x, const c10::optional<torch::Tensor>& delta, const torch::Tensor& weight,
                           double eps);
void rope_(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin, int64_t heads);
torch::Tensor silu_mul(const torch::Tensor& gate_up);
torch::Tensor argmax_rows(const torch::Tensor& logits);
std::vector<torch::Tensor> greedy_rows(const torch::Tensor& logits);
void write_kv(const torch::Tensor& key, const torch::Tensor& value, const torch::Tensor& k_cache,
              const torch::Tensor& v_cache, const torch::Tensor& slots);
// kernels/csrc/cpu_linear.cpp
bool avx512_bf16();
int64_t bf16_linear_packed_numel(int64_t out_features, int64_t in_features);
void bf16_linear_pack(const torch::Tensor& weight, const torch::Tensor& packed);
torch::Tensor bf16_linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t out_features,
                          const c10::optional<torch::Tensor>& bias);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The kernels touch no Python object: they let other threads of the process hold the interpreter
  // lock while they compute (as torch's own operators do), so the server's HTTP threads format and
  // send tokens on another core during the engine's step. NOTE: every tensor argument is taken by
  // const reference. A by-value tensor is moved out of pybind11's argument and destroyed inside the
  // call, where dropping the last C++ reference to a tensor that has a Python object takes the
  // interpreter lock again (c10::TensorImpl::decref_pyobject), behind whichever HTTP thread holds
  // it (py-spy --native on a served step; docs/benchmarks.md, fifth round).
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("paged_decode", &paged_decode, nogil, "paged decode attention over the block-table KV cache (CPU)");
  m.def("add_rms_norm", &add_rms_norm, nogil, "x += delta (in place, optional), then RMSNorm(x) * weight");
  m.def("rope_", &rope_, nogil, "rotary embedding of the first heads of q/k/v rows, in place");
  m.def("silu_mul", &silu_mul, nogil, "silu(gate) * up of a fused gate/up product");
  m.def("argmax_rows", &argmax_rows, nogil, "each row's first index of its maximum (rows without NaN)");
  m.def("greedy_rows", &greedy_rows, nogil,
        "each row's first index of its maximum and its log-probability (NaN for rows holding a NaN)");
  m.def("write_kv", &write_kv, nogil, "new keys and values into their cache slots (-1: skipped)");
  m.def("avx512_bf16", &avx512_bf16,
        "whether this build has the AVX512-BF16 code: bf16 linear layers, bf16 attention vector code");
  m.def("bf16_linear_packed_numel", &bf16_linear_packed_numel, "elements of a packed [out, in] weight");
  m.def("bf16_linear_pack", &bf16_linear_pack, nogil,
        "write a bf16 [out, in] weight into a 1-D bf16 tensor in bf16_linear's packed layout");
  m.def("bf16_linear", &bf16_linear, nogil, "x W^T + b on a packed bf16 weight (fp32 accumulation)");
}
