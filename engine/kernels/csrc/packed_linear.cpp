// Linear layers on CPU from weights packed once at load time: y[M, N] = x[M, K] W[N, K]^T + b.
//
// Why: the BLAS that torch's CPU wheels ship (MKL) runs the model's matmuls far below
// what the machine can do: on an AMD EPYC with AVX2 a decode step's GEMMs (M = 1-32 rows,
// K = 576 or 1536) ran at 2-10 GB/s of weights, a third to a tenth of its memory
// bandwidth. This kernel streams each weight once per call, whatever M is.
//
// Packed layout: W is cut into panels of kPanel = 16 output columns; panel p holds
// W[16p : 16p + 16, :] transposed, as [K][16] (rows past N are zero), so the packed
// tensor is [num_panels, K, 16], contiguous, in the weight's dtype (float32 or bfloat16).
//
//   packed[p, k, j] = W[16 p + j, k]     for 16 p + j < N, else 0
//
// Each thread takes whole panels. For a panel it computes every row of x, MR rows at a
// time, with the 2 x MR accumulators of 8 floats in registers (the outer-product micro-
// kernel of BLIS/GotoBLAS): per k, two weight vectors are loaded, one x value per row
// broadcast, 2 MR fused multiply-adds. The panel (K x 64 bytes) stays in L1/L2 across
// the rows of x, so weights come from memory once. Accumulation is in float32.
//
// bfloat16 weights on a CPU with AVX512_BF16 (vdpbf16ps: two bfloat16 products added into
// a float32 lane) are laid in pairs of k instead, [num_panels, K / 2, 16, 2] (K even), so one
// instruction does 32 multiply-adds; x is rounded to bfloat16 (the engine's activations
// already are in that dtype) and the sums stay float32.
//
//   packed[p, i, j, e] = W[16 p + j, 2 i + e]    (0 past N)
//
// Block-quantized weights (GGUF Q4_1 and Q8_0, as the default model ships) are kept in
// their blocks of 32 and dequantized inside the kernel, a panel at a time, into a float32
// panel in L1/L2 that the same micro-kernel then reads: a 4-bit weight costs memory 6
// bits instead of 32. The dequantized values are exactly those of gguf's dequantize
// (Q4_1: d * q + m, one rounding, as a fused multiply-add; Q8_0: d * q, exact), so the
// result equals the float32 kernel's on the dequantized weight, bit for bit.
//
// Quantized layout, per panel p of 16 output columns and block b of 32 inputs:
//   scales[p, b, 0, j] = d, scales[p, b, 1, j] = m (0 for Q8_0) of row 16 p + j, float32
//   Q4_1 codes[p, b, i, j]  (uint8, j < 8) = q(16p + j, 32b + i) | q(16p + j + 8, 32b + i) << 4
//   Q8_0 codes[p, b, i, j]  (int8, j < 16) = q(16p + j, 32b + i)

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "bf16_pairs.h"  // TANDEM_BF16_PAIRS: the pair micro-kernel

#include "tile_linear.h"  // TANDEM_AMX: the pair layout on AMX tiles

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define TANDEM_PACKED_LINEAR_AVX2 1
#endif

namespace {

constexpr int64_t kPanel = 16;  // output columns per panel: two 8-float vectors
constexpr int64_t kMaxRows = 6;  // rows of x per micro-kernel call: 12 accumulators

#ifdef TANDEM_PACKED_LINEAR_AVX2

// 16 weights of row k of a panel, as two vectors of float32.
inline void load_weights(const float* w, __m256& lo, __m256& hi) {
  lo = _mm256_loadu_ps(w);
  hi = _mm256_loadu_ps(w + 8);
}

inline void load_weights(const at::BFloat16* w, __m256& lo, __m256& hi) {
  // bfloat16 is the top half of a float32: widen to 32 bits and shift into place.
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  const __m256i lo32 = _mm256_cvtepu16_epi32(_mm256_castsi256_si128(raw));
  const __m256i hi32 = _mm256_cvtepu16_epi32(_mm256_extracti128_si256(raw, 1));
  lo = _mm256_castsi256_ps(_mm256_slli_epi32(lo32, 16));
  hi = _mm256_castsi256_ps(_mm256_slli_epi32(hi32, 16));
}

// out[r, 0:16] = x[r, :] . panel for r < MR; x rows are ldx apart, float32.
// A fused multiply-add waits for the one before it on the same accumulator (4-5 cycles),
// so with few rows the k loop is split into U interleaved partial sums, keeping about
// 12 independent accumulators in flight; they are added up at the end.
template <int MR, typename w_t>
inline void micro_kernel(const float* x, int64_t ldx, const w_t* panel, int64_t K, float* out) {
  constexpr int U = MR >= 4 ? 1 : 6 / MR;
  __m256 acc[U][MR][2];
#pragma GCC unroll 12
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) acc[u][r][0] = acc[u][r][1] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + U <= K; k += U) {
#pragma GCC unroll 6
    for (int u = 0; u < U; ++u) {
      __m256 w_lo, w_hi;
      load_weights(panel + (k + u) * kPanel, w_lo, w_hi);
#pragma GCC unroll 6
      for (int r = 0; r < MR; ++r) {
        const __m256 a = _mm256_broadcast_ss(x + r * ldx + k + u);
        acc[u][r][0] = _mm256_fmadd_ps(a, w_lo, acc[u][r][0]);
        acc[u][r][1] = _mm256_fmadd_ps(a, w_hi, acc[u][r][1]);
      }
    }
  }
  for (; k < K; ++k) {  // the K % U leftover
    __m256 w_lo, w_hi;
    load_weights(panel + k * kPanel, w_lo, w_hi);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_broadcast_ss(x + r * ldx + k);
      acc[0][r][0] = _mm256_fmadd_ps(a, w_lo, acc[0][r][0]);
      acc[0][r][1] = _mm256_fmadd_ps(a, w_hi, acc[0][r][1]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 6
    for (int u = 1; u < U; ++u) {
      acc[0][r][0] = _mm256_add_ps(acc[0][r][0], acc[u][r][0]);
      acc[0][r][1] = _mm256_add_ps(acc[0][r][1], acc[u][r][1]);
    }
    _mm256_storeu_ps(out + r * kPanel, acc[0][r][0]);
    _mm256_storeu_ps(out + r * kPanel + 8, acc[0][r][1]);
  }
}

#else  // portable: the compiler vectorizes the 16-wide inner loop as it can

inline float widen(float w) { return w; }
inline float widen(at::BFloat16 w) { return static_cast<float>(w); }

template <int MR, typename w_t>
inline void micro_kernel(const float* x, int64_t ldx, const w_t* panel, int64_t K, float* out) {
  float acc[MR][kPanel] = {};
  for (int64_t k = 0; k < K; ++k) {
    const w_t* w = panel + k * kPanel;
    for (int r = 0; r < MR; ++r) {
      const float a = x[r * ldx + k];
      for (int64_t j = 0; j < kPanel; ++j) acc[r][j] += a * widen(w[j]);
    }
  }
  std::memcpy(out, acc, sizeof(acc));
}

#endif


template <typename w_t>
void rows_of_panel(const float* x, int64_t M, int64_t K, const w_t* panel, float* out) {
  // out: [M, 16], row r of it is x[r] . panel
  int64_t r = 0;
  for (; r + kMaxRows <= M; r += kMaxRows) {
    micro_kernel<kMaxRows>(x + r * K, K, panel, K, out + r * kPanel);
  }
  const float* x_rest = x + r * K;
  float* out_rest = out + r * kPanel;
  switch (M - r) {
    case 5: micro_kernel<5>(x_rest, K, panel, K, out_rest); break;
    case 4: micro_kernel<4>(x_rest, K, panel, K, out_rest); break;
    case 3: micro_kernel<3>(x_rest, K, panel, K, out_rest); break;
    case 2: micro_kernel<2>(x_rest, K, panel, K, out_rest); break;
    case 1: micro_kernel<1>(x_rest, K, panel, K, out_rest); break;
    default: break;
  }
}

// y[:, 16p : 16p + 16] = tile [M, 16] (+ bias), the columns past N left out; y in float32,
// or bfloat16 (rounded to nearest even, as Tensor.to rounds).
template <typename out_t>
void write_panel_columns(const float* tile, const float* bias, int64_t M, int64_t N, int64_t p,
                         out_t* y) {
  const int64_t col0 = p * kPanel;
  const int64_t width = std::min(kPanel, N - col0);
  for (int64_t r = 0; r < M; ++r) {
    out_t* dst = y + r * N + col0;
    const float* src = tile + r * kPanel;
    if (bias != nullptr) {
      for (int64_t j = 0; j < width; ++j) dst[j] = static_cast<out_t>(src[j] + bias[col0 + j]);
    } else if constexpr (std::is_same_v<out_t, float>) {
      std::memcpy(dst, src, width * sizeof(float));
    } else {
      for (int64_t j = 0; j < width; ++j) dst[j] = static_cast<out_t>(src[j]);
    }
  }
}

template <typename w_t>
void packed_linear_impl(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& bias,
                        at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1);
  const int64_t num_panels = packed.size(0);
  const float* x_data = x.data_ptr<float>();
  const w_t* w_data = packed.data_ptr<w_t>();
  const float* bias_data = bias.defined() ? bias.data_ptr<float>() : nullptr;
  float* y_data = y.data_ptr<float>();
  // A grain of a few panels keeps threads on contiguous weight ranges.
  at::parallel_for(0, num_panels, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> tile(M * kPanel);  // [M, 16]: one panel's outputs
    for (int64_t p = begin; p < end; ++p) {
      rows_of_panel(x_data, M, K, w_data + p * K * kPanel, tile.data());
      write_panel_columns(tile.data(), bias_data, M, N, p, y_data);
    }
  });
}

constexpr int64_t kBlock = 32;  // inputs per quantization block

// Dequantizes panel p (all K inputs) into dst [K, 16] float32.
void dequantize_panel(const at::Tensor& codes, const at::Tensor& scales, int64_t p, float* dst) {
  const int64_t num_blocks = codes.size(1), code_bytes = codes.size(3);
  const float* sc = scales.data_ptr<float>() + p * num_blocks * 2 * kPanel;
  if (code_bytes == kPanel / 2) {  // Q4_1: two 4-bit codes a byte
    const uint8_t* q = codes.data_ptr<uint8_t>() + p * num_blocks * kBlock * code_bytes;
    for (int64_t b = 0; b < num_blocks; ++b, sc += 2 * kPanel) {
#ifdef TANDEM_PACKED_LINEAR_AVX2
      const __m256 d_lo = _mm256_loadu_ps(sc), d_hi = _mm256_loadu_ps(sc + 8);
      const __m256 m_lo = _mm256_loadu_ps(sc + kPanel), m_hi = _mm256_loadu_ps(sc + kPanel + 8);
      const __m256i low_nibble = _mm256_set1_epi32(0x0F);
      for (int64_t i = 0; i < kBlock; ++i, q += 8, dst += kPanel) {
        const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
        const __m256 q_lo = _mm256_cvtepi32_ps(_mm256_and_si256(bytes, low_nibble));
        const __m256 q_hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4));
        _mm256_storeu_ps(dst, _mm256_fmadd_ps(d_lo, q_lo, m_lo));
        _mm256_storeu_ps(dst + 8, _mm256_fmadd_ps(d_hi, q_hi, m_hi));
      }
#else
      for (int64_t i = 0; i < kBlock; ++i, q += 8, dst += kPanel) {
        for (int64_t j = 0; j < 8; ++j) {
          dst[j] = std::fma(sc[j], static_cast<float>(q[j] & 0x0F), sc[kPanel + j]);
          dst[j + 8] = std::fma(sc[j + 8], static_cast<float>(q[j] >> 4), sc[kPanel + j + 8]);
        }
      }
#endif
    }
  } else {  // Q8_0: one signed 8-bit code a byte, no offset
    const int8_t* q = codes.data_ptr<int8_t>() + p * num_blocks * kBlock * code_bytes;
    for (int64_t b = 0; b < num_blocks; ++b, sc += 2 * kPanel) {
#ifdef TANDEM_PACKED_LINEAR_AVX2
      const __m256 d_lo = _mm256_loadu_ps(sc), d_hi = _mm256_loadu_ps(sc + 8);
      for (int64_t i = 0; i < kBlock; ++i, q += kPanel, dst += kPanel) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
        const __m256 q_lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
        const __m256 q_hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(bytes, 8)));
        _mm256_storeu_ps(dst, _mm256_mul_ps(d_lo, q_lo));
        _mm256_storeu_ps(dst + 8, _mm256_mul_ps(d_hi, q_hi));
      }
#else
      for (int64_t i = 0; i < kBlock; ++i, q += kPanel, dst += kPanel) {
        for (int64_t j = 0; j < kPanel; ++j) dst[j] = sc[j] * static_cast<float>(q[j]);
      }
#endif
    }
  }
}

void quantized_linear_impl(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                           const at::Tensor& bias, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1);
  const int64_t num_panels = codes.size(0);
  const float* x_data = x.data_ptr<float>();
  const float* bias_data = bias.defined() ? bias.data_ptr<float>() : nullptr;
  float* y_data = y.data_ptr<float>();
  at::parallel_for(0, num_panels, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> panel(K * kPanel);  // one panel, dequantized: [K, 16]
    std::vector<float> tile(M * kPanel);
    for (int64_t p = begin; p < end; ++p) {
      dequantize_panel(codes, scales, p, panel.data());
      rows_of_panel(x_data, M, K, static_cast<const float*>(panel.data()), tile.data());
      write_panel_columns(tile.data(), bias_data, M, N, p, y_data);
    }
  });
}

// x [M, K], codes and scales as laid out above, N the weight's rows, bias [N] or None
// -> y [M, N] in x's dtype.
at::Tensor quantized_linear(const at::Tensor& x, const at::Tensor& codes,
                            const at::Tensor& scales, int64_t N,
                            const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "quantized_linear: x must be [M, K], got ", x.sizes());
  const bool q4 = codes.scalar_type() == at::kByte && codes.dim() == 4 &&
                  codes.size(3) == kPanel / 2;
  const bool q8 = codes.scalar_type() == at::kChar && codes.dim() == 4 && codes.size(3) == kPanel;
  TORCH_CHECK((q4 || q8) && codes.size(2) == kBlock && codes.is_contiguous(),
              "quantized_linear: codes must be uint8 [P, K/32, 32, 8] (Q4_1) or int8 "
              "[P, K/32, 32, 16] (Q8_0), got ", codes.scalar_type(), " ", codes.sizes());
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.dim() == 4 &&
                  scales.size(0) == codes.size(0) && scales.size(1) == codes.size(1) &&
                  scales.size(2) == 2 && scales.size(3) == kPanel,
              "quantized_linear: scales must be float32 [P, K/32, 2, 16] matching the codes");
  TORCH_CHECK(x.size(1) == codes.size(1) * kBlock, "quantized_linear: x has K = ", x.size(1),
              " but the weight ", codes.size(1) * kBlock);
  TORCH_CHECK(N > (codes.size(0) - 1) * kPanel && N <= codes.size(0) * kPanel,
              "quantized_linear: N = ", N, " does not match the quantized weight");
  const at::Tensor x32 = x.to(at::kFloat).contiguous();
  at::Tensor bias32;
  if (bias.has_value() && bias->defined()) bias32 = bias->to(at::kFloat).contiguous();
  at::Tensor y = at::empty({x.size(0), N}, x.options().dtype(at::kFloat));
  if (x.size(0) > 0) quantized_linear_impl(x32, codes, scales, bias32, y);
  return y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type());
}

// codes and scales -> the float32 weight [N, K] they hold (for tests and inspection).
at::Tensor dequantize_linear_weight(const at::Tensor& codes, const at::Tensor& scales, int64_t N) {
  const int64_t P = codes.size(0), K = codes.size(1) * kBlock;
  at::Tensor packed = at::empty({P, K, kPanel}, scales.options());
  for (int64_t p = 0; p < P; ++p) dequantize_panel(codes, scales, p, packed[p].data_ptr<float>());
  return packed.transpose(1, 2).reshape({P * kPanel, K}).narrow(0, 0, N).contiguous();
}

#ifdef TANDEM_AMX
// y[row0 : row0 + rows, panel p's columns] = tile (+ bias); whole panels of bfloat16 16
// values at a time, rounded as write_panel_columns rounds.
template <typename out_t>
void write_tile(const float* tile, const float* bias, int64_t rows, int64_t N, int64_t p,
                out_t* y) {
  if constexpr (std::is_same_v<out_t, at::BFloat16>) {
    if ((p + 1) * kPanel <= N) {
      const float* panel_bias = bias != nullptr ? bias + p * kPanel : nullptr;
      for (int64_t r = 0; r < rows; ++r) {
        tandem::write_bf16_row(tile + r * kPanel, panel_bias, y + r * N + p * kPanel);
      }
      return;
    }
  }
  write_panel_columns(tile, bias, rows, N, p, y);
}

// x [M, K] (bfloat16, rows K apart) against the pair layout on AMX tiles (tile_linear.h);
// each thread takes a range of panel pairs.
template <typename out_t>
void tile_linear_impl(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& bias,
                      at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1);
  const int64_t num_panels = packed.size(0), K2 = packed.size(1);
  const at::BFloat16* x_data = x.data_ptr<at::BFloat16>();
  const at::BFloat16* w_data = packed.data_ptr<at::BFloat16>();
  const float* bias_data = bias.defined() ? bias.data_ptr<float>() : nullptr;
  out_t* y_data = y.data_ptr<out_t>();
  at::parallel_for(0, (num_panels + 1) / 2, 1, [&](int64_t begin, int64_t end) {
    tandem::tile_linear_panels(
        x_data, M, K, w_data, K2, 2 * begin, std::min(2 * end, num_panels),
        [&](int64_t row0, int64_t rows, int64_t p, const float* tile) {
          write_tile(tile, bias_data, rows, N, p, y_data + row0 * N);
        });
  });
}
#endif

#ifdef TANDEM_BF16_PAIRS
// x [M, K] in any float dtype, rounded to bfloat16, against the pair layout: on AMX tiles
// where the CPU has them and K is a whole number of tiles, else the pair micro-kernel.
// y is float32 or bfloat16.
template <typename out_t>
void pair_linear_impl(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& bias,
                      at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1);
  const int64_t num_panels = packed.size(0), K2 = packed.size(1);
  TORCH_CHECK(2 * K2 == K, "packed_linear: the pair layout needs an even K, got ", K);
  const at::Tensor x16 = x.to(at::kBFloat16).contiguous();  // no copy when x already is
#ifdef TANDEM_AMX
  if (K % 32 == 0 && tandem::amx_permitted()) return tile_linear_impl<out_t>(x16, packed, bias, y);
#endif
  const uint32_t* x_pairs = reinterpret_cast<const uint32_t*>(x16.data_ptr<at::BFloat16>());
  const at::BFloat16* w_data = packed.data_ptr<at::BFloat16>();
  const float* bias_data = bias.defined() ? bias.data_ptr<float>() : nullptr;
  out_t* y_data = y.data_ptr<out_t>();
  at::parallel_for(0, num_panels, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> tile(M * kPanel);
    for (int64_t p = begin; p < end; ++p) {
      tandem::rows_of_pair_panel(x_pairs, K2, M, K2, w_data + p * K2 * 2 * kPanel, tile.data());
      write_panel_columns(tile.data(), bias_data, M, N, p, y_data);
    }
  });
}
#endif

// Whether bfloat16 pair-layout weights are multiplied on AMX tiles in this process.
bool amx_tiles() {
#ifdef TANDEM_AMX
  return tandem::amx_permitted();
#else
  return false;
#endif
}

// weight [N, K] -> packed [ceil(N / 16), K, 16] in the same dtype; bfloat16 weights on an
// AVX512_BF16 build and an even K: [ceil(N / 16), K / 2, 32], the pair layout.
at::Tensor pack_linear_weight(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, "pack_linear_weight: weight must be [N, K], got ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16,
              "pack_linear_weight: float32 or bfloat16 weights only, got ",
              weight.scalar_type());
  const int64_t N = weight.size(0), K = weight.size(1);
  const int64_t num_panels = (N + kPanel - 1) / kPanel;
#ifdef TANDEM_BF16_PAIRS
  if (weight.scalar_type() == at::kBFloat16 && K % 2 == 0) {  // odd K: the layout below
    const int64_t K2 = K / 2;
    at::Tensor padded = at::zeros({num_panels * kPanel, K}, weight.options());
    padded.narrow(0, 0, N).copy_(weight);
    // [P*16, 2*K2] -> [P, 16, K2, 2] -> [P, K2, 16, 2]
    return padded.view({num_panels, kPanel, K2, 2})
        .permute({0, 2, 1, 3})
        .contiguous()
        .view({num_panels, K2, 2 * kPanel});
  }
#endif
  at::Tensor padded = weight;
  if (num_panels * kPanel != N) {
    padded = at::zeros({num_panels * kPanel, K}, weight.options());
    padded.narrow(0, 0, N).copy_(weight);
  }
  // [P*16, K] -> [P, 16, K] -> [P, K, 16]
  return padded.view({num_panels, kPanel, K}).transpose(1, 2).contiguous();
}

// x [M, K] (any float dtype), packed from pack_linear_weight, N the weight's rows,
// bias [N] or None -> y [M, N] in x's dtype.
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, int64_t N,
                         const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "packed_linear: x must be [M, K], got ", x.sizes());
  const bool pairs = packed.dim() == 3 && packed.size(2) == 2 * kPanel &&
                     packed.scalar_type() == at::kBFloat16;
  TORCH_CHECK(packed.dim() == 3 && (packed.size(2) == kPanel || pairs) && packed.is_contiguous(),
              "packed_linear: weight must come from pack_linear_weight");
  const int64_t weight_k = pairs ? 2 * packed.size(1) : packed.size(1);
  TORCH_CHECK(weight_k == x.size(1), "packed_linear: x has K = ", x.size(1), " but the weight ", weight_k);
  TORCH_CHECK(N > (packed.size(0) - 1) * kPanel && N <= packed.size(0) * kPanel,
              "packed_linear: N = ", N, " does not match the packed weight");
  at::Tensor bias32;
  if (bias.has_value() && bias->defined()) bias32 = bias->to(at::kFloat).contiguous();
  // bfloat16 x on the pair layout: y written in bfloat16 by the kernel; else float32,
  // converted to x's dtype at the end.
  const bool bf16_out = pairs && x.scalar_type() == at::kBFloat16;
  at::Tensor y = at::empty({x.size(0), N}, x.options().dtype(bf16_out ? at::kBFloat16 : at::kFloat));
  if (x.size(0) > 0) {
    if (pairs) {
#ifdef TANDEM_BF16_PAIRS
      if (bf16_out) {
        pair_linear_impl<at::BFloat16>(x, packed, bias32, y);
      } else {
        pair_linear_impl<float>(x, packed, bias32, y);
      }
#else
      TORCH_CHECK(false, "packed_linear: this weight was packed for AVX512_BF16, not built here");
#endif
    } else if (packed.scalar_type() == at::kBFloat16) {
      packed_linear_impl<at::BFloat16>(x.to(at::kFloat).contiguous(), packed, bias32, y);
    } else {
      packed_linear_impl<float>(x.to(at::kFloat).contiguous(), packed, bias32, y);
    }
  }
  return y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tandem, m) {
  m.def("pack_linear_weight(Tensor weight) -> Tensor");
  m.def("packed_linear(Tensor x, Tensor packed, int n, Tensor? bias) -> Tensor");
  m.def("quantized_linear(Tensor x, Tensor codes, Tensor scales, int n, Tensor? bias) -> Tensor");
  m.def("dequantize_linear_weight(Tensor codes, Tensor scales, int n) -> Tensor");
  m.def("amx_tiles() -> bool", &amx_tiles);  // bfloat16 pair weights multiplied on AMX tiles
}

TORCH_LIBRARY_IMPL(tandem, CPU, m) {
  m.impl("pack_linear_weight", &pack_linear_weight);
  m.impl("packed_linear", &packed_linear);
  m.impl("quantized_linear", &quantized_linear);
  m.impl("dequantize_linear_weight", &dequantize_linear_weight);
}
