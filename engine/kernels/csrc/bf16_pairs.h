// The AVX512_BF16 micro-kernel shared by the packed linear kernel and prefill attention:
// x rows of bfloat16 pairs against a panel of 16 output columns laid [K2, 16, 2]
// (packed_linear.cpp has the layout). Defines TANDEM_BF16_PAIRS where the CPU has it.
// Also the branch-free exp the attention kernels use.

#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#define TANDEM_AVX512 1
#endif
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define TANDEM_BF16_PAIRS 1
#endif

namespace tandem {

constexpr int64_t kPanel = 16;  // output columns per panel: one 16-float vector

// exp(x) for x <= 0 (scores minus their running max), to float32 precision: x = n ln2 + r
// with |r| <= ln2 / 2, exp(r) by its degree-6 Taylor polynomial, 2^n by building the
// exponent bits. Branch-free, so a loop of it vectorizes (std::exp does not).
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);  // below this exp underflows float32 anyway
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (x * 1.44269504088896341f + kRound) - kRound;
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

#ifdef TANDEM_AVX512
// exp_nonpositive on 16 lanes.
inline __m512 exp_nonpositive16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 round = _mm512_set1_ps(12582912.0f);
  const __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), round),
                                 round);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __m512i bits =
      _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

// 16 values of a row as float32.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {  // bfloat16 is float32's upper half
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#endif

#ifdef TANDEM_BF16_PAIRS

constexpr int64_t kMaxPairRows = 8;  // rows of x per bfloat16 micro-kernel call

// out[r, 0:16] = x[r, :] . panel for r < MR: x bfloat16 with K2 pairs a row (ldx pairs
// apart), panel [K2, 16, 2]. One accumulator a row, so with few rows the pairs are
// split into U interleaved partial sums to keep about 8 dot products in flight.
template <int MR>
inline void pair_kernel(const uint32_t* x, int64_t ldx, const at::BFloat16* panel, int64_t K2,
                        float* out, int64_t ldo) {
  constexpr int U = MR >= 8 ? 1 : (8 + MR - 1) / MR;
  __m512 acc[U][MR];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) acc[u][r] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + U <= K2; i += U) {
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      const __m512bh w = (__m512bh)_mm512_loadu_si512(panel + (i + u) * 2 * kPanel);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[r * ldx + i + u]));
        acc[u][r] = _mm512_dpbf16_ps(acc[u][r], a, w);
      }
    }
  }
  for (; i < K2; ++i) {
    const __m512bh w = (__m512bh)_mm512_loadu_si512(panel + i * 2 * kPanel);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[r * ldx + i]));
      acc[0][r] = _mm512_dpbf16_ps(acc[0][r], a, w);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
    for (int u = 1; u < U; ++u) acc[0][r] = _mm512_add_ps(acc[0][r], acc[u][r]);
    _mm512_storeu_ps(out + r * ldo, acc[0][r]);
  }
}

// out [M, 16] = x [M, K2 pairs] . panel, x rows ldx pairs apart, out rows ldo floats
// apart (default: packed, 16).
inline void rows_of_pair_panel(const uint32_t* x, int64_t ldx, int64_t M, int64_t K2,
                               const at::BFloat16* panel, float* out, int64_t ldo = kPanel) {
  int64_t r = 0;
  for (; r + kMaxPairRows <= M; r += kMaxPairRows) {
    pair_kernel<kMaxPairRows>(x + r * ldx, ldx, panel, K2, out + r * ldo, ldo);
  }
  const uint32_t* x_rest = x + r * ldx;
  float* out_rest = out + r * ldo;
  switch (M - r) {
    case 7: pair_kernel<7>(x_rest, ldx, panel, K2, out_rest, ldo); break;
    case 6: pair_kernel<6>(x_rest, ldx, panel, K2, out_rest, ldo); break;
    case 5: pair_kernel<5>(x_rest, ldx, panel, K2, out_rest, ldo); break;
    case 4: pair_kernel<4>(x_rest, ldx, panel, K2, out_rest, ldo); break;
    case 3: pair_kernel<3>(x_rest, ldx, panel, K2, out_rest, ldo); break;
    case 2: pair_kernel<2>(x_rest, ldx, panel, K2, out_rest, ldo); break;
    case 1: pair_kernel<1>(x_rest, ldx, panel, K2, out_rest, ldo); break;
    default: break;
  }
}

#endif

}  // namespace tandem
