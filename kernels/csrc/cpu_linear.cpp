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
//  - up to kRows rows stream a tile once, prefetching ahead of themselves; more rows walk it in
//    chunks small enough for L1, every group of a pass using a chunk before the next, while the
//    groups share the prefetch of the stream's next chunk, so memory and arithmetic overlap at
//    every batch (docs/benchmarks.md: 12.6 -> 9.2 ms at 16 rows, 21.2 -> 19.0 at 32, over the
//    default model's matrices, huge pages included).
// Every output is the sum over k in the same order whatever the other rows are: a row's result
// does not depend on the batch it is computed in. vdpbf16ps treats bf16 subnormals as zero.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "cpu_common.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace {

constexpr int64_t kBlocks = 3;       // 16-feature blocks per tile
constexpr int64_t kRows = 8;         // rows per group
constexpr int64_t kAheadPairs = 32;  // how far ahead of itself a single group prefetches, in k pairs
constexpr int64_t kPassGroups = 4;   // row groups per pass over a tile
// k pairs per chunk of a pass: measured best for two groups (64) and for three or four (48); a
// chunk of 48 pairs of a 3-block tile is 9 KB.
constexpr int64_t kChunkPairsTwoGroups = 64, kChunkPairs = 48;

int64_t tiles_of(int64_t out_features) { return (out_features + 16 * kBlocks - 1) / (16 * kBlocks); }

#ifdef LMI_AVX512_BF16

// rows x blocks outputs of one tile over the input pairs [begin, end); `partial` carries the
// fp32 sums between chunks (zeros before the first, the output written after the last), so a
// chunked product adds in exactly the unchunked order. Each pair also prefetches L cache lines
// of the stream from `prefetch` on (none when L is 0).
template <int R, int B, int L>
inline void tile_rows(const uint16_t* x, int64_t x_stride, const uint16_t* w, int64_t begin, int64_t end,
                      const uint16_t* prefetch, float* partial, bool first, bool last,
                      uint16_t* out, int64_t out_stride, const float* bias, int64_t columns) {
  __m512 acc[R][B];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) acc[r][b] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(partial + (r * B + b) * 16);
  for (int64_t p = begin; p < end; ++p) {
    __m512bh wv[B];
    for (int b = 0; b < B; ++b) wv[b] = (__m512bh)_mm512_loadu_si512(w + (p * B + b) * 32);
    for (int i = 0; i < L; ++i)
      _mm_prefetch(reinterpret_cast<const char*>(prefetch + ((p - begin) * L + i) * 32), _MM_HINT_T1);
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, x + r * x_stride + 2 * p, sizeof(pair));
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
      for (int b = 0; b < B; ++b) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], xv, wv[b]);
    }
  }
  if (!last) {
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < B; ++b) _mm512_storeu_ps(partial + (r * B + b) * 16, acc[r][b]);
    return;
  }
  for (int b = 0; b < B; ++b) {
    const int64_t valid = std::min<int64_t>(16, columns - 16 * b);
    if (valid <= 0) break;
    const __mmask16 mask = lmi::lanes(valid);
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(mask, bias + 16 * b) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) {
      const __m256bh y = _mm512_cvtneps_pbh(_mm512_add_ps(acc[r][b], bv));  // round to nearest even
      _mm256_mask_storeu_epi16(out + r * out_stride + 16 * b, mask, (__m256i)y);
    }
  }
}

template <int B, int L>
inline void group_rows(int64_t n, const uint16_t* x, int64_t x_stride, const uint16_t* w, int64_t begin, int64_t end,
                       const uint16_t* prefetch, float* partial, bool first, bool last, uint16_t* out,
                       int64_t out_stride, const float* bias, int64_t columns) {
  switch (n) {
#define LMI_ROWS(k)                                                                                                 \
  case k:                                                                                                           \
    tile_rows<k, B, L>(x, x_stride, w, begin, end, prefetch, partial, first, last, out, out_stride, bias, columns); \
    break;
    LMI_ROWS(1) LMI_ROWS(2) LMI_ROWS(3) LMI_ROWS(4) LMI_ROWS(5) LMI_ROWS(6) LMI_ROWS(7) LMI_ROWS(8)
#undef LMI_ROWS
    default: break;
  }
}

// One tile times all rows. Up to kRows rows stream the tile once, prefetching kAheadPairs ahead.
// More rows go in passes of up to kPassGroups groups; a pass walks the tile in chunks of pairs
// (kept in L1 while every group of the pass uses them), and the first pass's groups share the
// prefetch of the stream's next chunk, so memory streams evenly under the arithmetic instead of
// stalling the first group.
template <int B>
void tile(const uint16_t* x, int64_t x_stride, int64_t rows, const uint16_t* w, int64_t pairs, uint16_t* out,
          int64_t out_stride, const float* bias, int64_t columns) {
  if (rows <= kRows) {
    group_rows<B, B>(rows, x, x_stride, w, 0, pairs, w + kAheadPairs * B * 32, nullptr, true, true, out, out_stride,
                     bias, columns);
    return;
  }
  alignas(64) float partial[kPassGroups * kRows * B * 16];
  for (int64_t r0 = 0; r0 < rows; r0 += kPassGroups * kRows) {
    const int64_t pass_rows = std::min(rows - r0, kPassGroups * kRows);
    const int64_t groups = (pass_rows + kRows - 1) / kRows;
    const int64_t lines = (B + groups - 1) / groups;  // per pair and group: the groups share B lines per pair
    const int64_t chunk = groups <= 2 ? kChunkPairsTwoGroups : kChunkPairs;
    for (int64_t c0 = 0; c0 < pairs; c0 += chunk) {
      const int64_t c1 = std::min(pairs, c0 + chunk), length = c1 - c0;
      const uint16_t* next = w + c1 * B * 32;  // the stream's next chunk, in this tile or the next
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t first_line = g * length * lines;
        const int64_t r = r0 + g * kRows, n = std::min(kRows, rows - r);
        const auto run = [&](auto prefetch_lines) {
          group_rows<B, decltype(prefetch_lines)::value>(n, x + r * x_stride, x_stride, w, c0, c1,
                                                         next + first_line * 32, partial + g * kRows * B * 16,
                                                         c0 == 0, c1 == pairs, out + r * out_stride, out_stride,
                                                         bias, columns);
        };
        if (r0 > 0 || first_line >= length * B) run(std::integral_constant<int, 0>{});
        else if (lines == 1) run(std::integral_constant<int, 1>{});
        else if (lines == 2) run(std::integral_constant<int, 2>{});
        else run(std::integral_constant<int, 3>{});
      }
    }
  }
}
static_assert(kRows == 8, "group_rows dispatches 1 to kRows rows");
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

// Elements of the packed layout of an [out_features, in_features] weight (whole tiles).
int64_t bf16_linear_packed_numel(int64_t out_features, int64_t in_features) {
  return tiles_of(out_features) * kBlocks * 16 * in_features;
}

// [out_features, in_features] -> the packed layout above, written into `packed` (1-D bf16 of
// bf16_linear_packed_numel elements, zero-padded to whole tiles), which the caller allocates:
// the model runner places the weights in huge pages (batching/host_memory.py).
void bf16_linear_pack(const torch::Tensor& weight, const torch::Tensor& packed) {
  check_packable(weight);
  const auto w = weight.contiguous();
  const int64_t n_out = w.size(0), k_in = w.size(1), pairs = k_in / 2, tiles = tiles_of(n_out);
  TORCH_CHECK(packed.dim() == 1 && packed.scalar_type() == torch::kBFloat16 && packed.is_contiguous() &&
                  packed.device().is_cpu() && packed.numel() == bf16_linear_packed_numel(n_out, k_in),
              "bf16_linear_pack: the destination must be a contiguous 1-D bf16 CPU tensor of "
              "bf16_linear_packed_numel elements");
  packed.zero_();
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
}

// x [..., in_features] bf16 -> [..., out_features] bf16; bias: fp32 [out_features] or None.
torch::Tensor bf16_linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t out_features,
                          const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(avx512_bf16(), "bf16_linear: this build has no AVX512-BF16");
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && packed.scalar_type() == torch::kBFloat16,
              "bf16_linear: bf16 input and weight are needed");
  const int64_t k_in = x.size(-1), tiles = tiles_of(out_features);
  TORCH_CHECK(k_in % 2 == 0 && packed.numel() == bf16_linear_packed_numel(out_features, k_in),
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
