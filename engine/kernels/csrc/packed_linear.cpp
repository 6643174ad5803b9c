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

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

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
      const int64_t col0 = p * kPanel;
      const int64_t width = std::min(kPanel, N - col0);
      for (int64_t r = 0; r < M; ++r) {
        float* dst = y_data + r * N + col0;
        const float* src = tile.data() + r * kPanel;
        if (bias_data != nullptr) {
          for (int64_t j = 0; j < width; ++j) dst[j] = src[j] + bias_data[col0 + j];
        } else {
          std::memcpy(dst, src, width * sizeof(float));
        }
      }
    }
  });
}

// weight [N, K] -> packed [ceil(N / 16), K, 16] in the same dtype.
at::Tensor pack_linear_weight(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, "pack_linear_weight: weight must be [N, K], got ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16,
              "pack_linear_weight: float32 or bfloat16 weights only, got ",
              weight.scalar_type());
  const int64_t N = weight.size(0), K = weight.size(1);
  const int64_t num_panels = (N + kPanel - 1) / kPanel;
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
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kPanel && packed.is_contiguous(),
              "packed_linear: weight must come from pack_linear_weight");
  TORCH_CHECK(packed.size(1) == x.size(1), "packed_linear: x has K = ", x.size(1),
              " but the weight ", packed.size(1));
  TORCH_CHECK(N > (packed.size(0) - 1) * kPanel && N <= packed.size(0) * kPanel,
              "packed_linear: N = ", N, " does not match the packed weight");
  const at::Tensor x32 = x.to(at::kFloat).contiguous();
  at::Tensor bias32;
  if (bias.has_value() && bias->defined()) bias32 = bias->to(at::kFloat).contiguous();
  at::Tensor y = at::empty({x.size(0), N}, x.options().dtype(at::kFloat));
  if (x.size(0) > 0) {
    if (packed.scalar_type() == at::kBFloat16) {
      packed_linear_impl<at::BFloat16>(x32, packed, bias32, y);
    } else {
      packed_linear_impl<float>(x32, packed, bias32, y);
    }
  }
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tandem, m) {
  m.def("pack_linear_weight(Tensor weight) -> Tensor");
  m.def("packed_linear(Tensor x, Tensor packed, int n, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(tandem, CPU, m) {
  m.impl("pack_linear_weight", &pack_linear_weight);
  m.impl("packed_linear", &packed_linear);
}
