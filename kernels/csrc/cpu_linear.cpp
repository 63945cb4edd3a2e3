// bf16 linear layers for CPUs with AVX512-BF16 (batching/packed_linear.py): y = x W^T + b with
// fp32 accumulation, on a weight packed once at load.
//
// Decoding multiplies a few rows by every weight of the model each step, so a step is bound by
// streaming the weights from memory at small batches and by the dot-product units at larger ones.
// The packed layout makes the weight one sequential stream, and the loop keeps the next weights
// on their way while the current ones are used:
//  - the weight is cut into tiles of kBlocks x 16 output features; a tile stores, for each pair
//    of input features (k, k+1), its 16 x kBlocks (w[n][k], w[n][k+1]) pairs side by side, the
//    operand layout of vdpbf16ps; the tiles follow each other in memory;
//  - each tile is multiplied by the rows in groups of up to kRows: kRows x kBlocks accumulators
//    (24 of the 32 vector registers), one broadcast of a row's (x[k], x[k+1]) pair per row and
//    pair, one weight load per block and pair;
//  - the first group prefetches the stream ahead of itself; the second group, which finds the
//    tile in cache, prefetches the next tile, so memory and arithmetic overlap at every batch.
// Every output is the sum over k in the same order whatever the other rows are: a row's result
// does not depend on the batch it is computed in. vdpbf16ps treats bf16 subnormals as zero.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "cpu_common.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t kBlocks = 3;       // 16-feature blocks per tile
constexpr int64_t kRows = 8;         // rows per group
constexpr int64_t kAheadPairs = 32;  // how far ahead of itself the first group prefetches, in k pairs

int64_t tiles_of(int64_t out_features) { return (out_features + 16 * kBlocks - 1) / (16 * kBlocks); }

#ifdef LMI_AVX512_BF16

// rows x blocks outputs of one tile; `prefetch` walks along with the tile's own stream.
template <int R, int B>
inline void tile_rows(const uint16_t* x, int64_t x_stride, const uint16_t* w, int64_t pairs, const uint16_t* prefetch,
                      uint16_t* out, int64_t out_stride, const float* bias, int64_t columns) {
  __m512 acc[R][B];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) acc[r][b] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh wv[B];
    for (int b = 0; b < B; ++b) {
      wv[b] = (__m512bh)_mm512_loadu_si512(w + (p * B + b) * 32);
      _mm_prefetch(reinterpret_cast<const char*>(prefetch + (p * B + b) * 32), _MM_HINT_T1);
    }
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, x + r * x_stride + 2 * p, sizeof(pair));
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
      for (int b = 0; b < B; ++b) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], xv, wv[b]);
    }
  }
  for (int b = 0; b < B; ++b) {
    const int64_t valid = std::min<int64_t>(16, columns - 16 * b);
    if (valid <= 0) break;
    const __mmask16 mask = valid == 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << valid) - 1);
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(mask, bias + 16 * b) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) {
      const __m256bh y = _mm512_cvtneps_pbh(_mm512_add_ps(acc[r][b], bv));  // round to nearest even
      _mm256_mask_storeu_epi16(out + r * out_stride + 16 * b, mask, (__m256i)y);
    }
  }
}

template <int B>
void tile(const uint16_t* x, int64_t x_stride, int64_t rows, const uint16_t* w, int64_t pairs, uint16_t* out,
          int64_t out_stride, const float* bias, int64_t columns) {
  const uint16_t* ahead = w + kAheadPairs * B * 32;
  const uint16_t* next = w + pairs * B * 32;  // the next tile (a prefetch past the end is harmless)
  int64_t r = 0;
  for (; r + kRows <= rows; r += kRows)
    tile_rows<kRows, B>(x + r * x_stride, x_stride, w, pairs, r == kRows ? next : ahead, out + r * out_stride,
                        out_stride, bias, columns);
  const uint16_t* prefetch = r == kRows ? next : ahead;
  x += r * x_stride;
  out += r * out_stride;
  switch (rows - r) {
#define LMI_TAIL(n) \
  case n: tile_rows<n, B>(x, x_stride, w, pairs, prefetch, out, out_stride, bias, columns); break;
    LMI_TAIL(1) LMI_TAIL(2) LMI_TAIL(3) LMI_TAIL(4) LMI_TAIL(5) LMI_TAIL(6) LMI_TAIL(7)
#undef LMI_TAIL
    default: break;
  }
}
static_assert(kRows == 8, "the tail cases above cover kRows - 1 rows");
static_assert(kBlocks == 3, "bf16_linear dispatches tiles of 1 to 3 blocks");

#endif

void check_packable(const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kBFloat16 && weight.device().is_cpu(),
              "bf16_linear: a 2-D bf16 CPU weight is needed");
  TORCH_CHECK(weight.size(1) % 2 == 0 && weight.size(1) > 0, "bf16_linear: the input features must be even");
}

}  // namespace

bool avx512_bf16() {
#ifdef LMI_AVX512_BF16
  return true;
#else
  return false;
#endif
}

// [out_features, in_features] -> the packed layout above (1-D, zero-padded to whole tiles).
torch::Tensor bf16_linear_pack(const torch::Tensor& weight) {
  check_packable(weight);
  const auto w = weight.contiguous();
  const int64_t n_out = w.size(0), k_in = w.size(1), pairs = k_in / 2, tiles = tiles_of(n_out);
  auto packed = torch::zeros({tiles * kBlocks * 16 * k_in}, w.options());
  const uint16_t* src = reinterpret_cast<const uint16_t*>(w.data_ptr());
  uint16_t* dst = reinterpret_cast<uint16_t*>(packed.data_ptr());
  const int64_t blocks_total = (n_out + 15) / 16;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t blocks = std::min(kBlocks, blocks_total - t * kBlocks);
      uint16_t* base = dst + t * kBlocks * 16 * k_in;
      for (int64_t p = 0; p < pairs; ++p)
        for (int64_t b = 0; b < blocks; ++b)
          for (int64_t c = 0; c < 16; ++c) {
            const int64_t n = (t * kBlocks + b) * 16 + c;
            if (n >= n_out) continue;
            uint16_t* slot = base + ((p * blocks + b) * 16 + c) * 2;
            slot[0] = src[n * k_in + 2 * p];
            slot[1] = src[n * k_in + 2 * p + 1];
          }
    }
  });
  return packed;
}

// x [..., in_features] bf16 -> [..., out_features] bf16; bias: fp32 [out_features] or None.
torch::Tensor bf16_linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t out_features,
                          const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(avx512_bf16(), "bf16_linear: this build has no AVX512-BF16");
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && packed.scalar_type() == torch::kBFloat16,
              "bf16_linear: bf16 input and weight are needed");
  const int64_t k_in = x.size(-1), tiles = tiles_of(out_features);
  TORCH_CHECK(k_in % 2 == 0 && packed.numel() == tiles * kBlocks * 16 * k_in,
              "bf16_linear: the input's features do not match the packed weight");
  const float* bias_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat && bias->is_contiguous() && bias->numel() == out_features,
                "bf16_linear: the bias must be a contiguous fp32 vector of out_features");
    bias_ptr = bias->data_ptr<float>();
  }
  auto sizes = x.sizes().vec();
  sizes.back() = out_features;
  const auto rows2d = x.reshape({-1, k_in});
  const auto xc = rows2d.stride(1) == 1 ? rows2d : rows2d.contiguous();
  const int64_t rows = xc.size(0);
  auto out = torch::empty({rows, out_features}, x.options());
#ifdef LMI_AVX512_BF16
  if (rows > 0) {
    const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr());
    const uint16_t* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr());
    uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr());
    const int64_t x_stride = xc.stride(0), pairs = k_in / 2, blocks_total = (out_features + 15) / 16;
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t first = t * kBlocks * 16;
        const uint16_t* w = wp + t * kBlocks * 16 * k_in;
        const float* b = bias_ptr ? bias_ptr + first : nullptr;
        const int64_t columns = out_features - first;
        switch (std::min(kBlocks, blocks_total - t * kBlocks)) {
          case 3: tile<3>(xp, x_stride, rows, w, pairs, op + first, out_features, b, columns); break;
          case 2: tile<2>(xp, x_stride, rows, w, pairs, op + first, out_features, b, columns); break;
          default: tile<1>(xp, x_stride, rows, w, pairs, op + first, out_features, b, columns); break;
        }
      }
    });
  }
#endif
  return out.view(sizes);
}
