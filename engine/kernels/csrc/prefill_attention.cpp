// Causal attention for a prefill chunk in bfloat16 on a CPU with AVX512_BF16: the n new
// queries of one request against its C keys and values (the new ones last), grouped-query.
//
// Why: torch's CPU flash attention ran a 512-token prefill's attention at about 70 GFLOP/s
// on an AMD EPYC with AVX512_BF16, a third of a bfloat16 prefill step, while the packed
// linear kernel's bfloat16 micro-kernel (bf16_pairs.h) does about 400 on the same shapes.
// Here both products are that micro-kernel's:
//
//   per KV head h: K_h [C, D] and V_h^T [D, C] are laid once as pair-layout panels
//   per tile of 32 queries x G query heads of h (one task each, on every thread):
//     S = Q K_h^T       over the keys the tile's last query sees (its causal prefix)
//     P = softmax(scale S), each row up to its own position, in float32, then bfloat16
//     O = P V_h         (pairs over the keys; the zero pad past each row's keys adds 0)
//
// The rows of S are whole (C floats per row), so the softmax is exact, not online.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "bf16_pairs.h"
#include "parallel_dynamic.h"

namespace {

constexpr int64_t kTile = 32;  // queries per task

#ifdef TANDEM_BF16_PAIRS

using tandem::kPanel;

// probs[0, width) = softmax(scale * scores[0, limit)), then zeros; bfloat16. Scores are
// overwritten with their exponentials.
inline void softmax_row(float* scores, int64_t limit, int64_t width, float scale,
                        at::BFloat16* probs) {
  const __m512 scale16 = _mm512_set1_ps(scale);
  __m512 max16 = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < limit; j += 16) {
    const __mmask16 m = limit - j >= 16 ? 0xFFFF : (1u << (limit - j)) - 1;
    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, scores + j), scale16);
    max16 = _mm512_mask_max_ps(max16, m, max16, v);
  }
  const __m512 max = _mm512_set1_ps(_mm512_reduce_max_ps(max16));
  __m512 sum16 = _mm512_setzero_ps();
  for (int64_t j = 0; j < limit; j += 16) {
    const __mmask16 m = limit - j >= 16 ? 0xFFFF : (1u << (limit - j)) - 1;
    const __m512 v = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(m, scores + j), scale16, max);
    const __m512 e = _mm512_maskz_mov_ps(m, tandem::exp_nonpositive16(v));
    _mm512_mask_storeu_ps(scores + j, m, e);
    sum16 = _mm512_add_ps(sum16, e);
  }
  const __m512 inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum16));
  for (int64_t j = 0; j < width; j += 16) {
    const int64_t left = std::min<int64_t>(16, width - j);
    const __mmask16 store = left >= 16 ? 0xFFFF : (1u << left) - 1;
    const int64_t seen = std::clamp<int64_t>(limit - j, 0, 16);
    const __mmask16 keep = seen >= 16 ? 0xFFFF : (1u << seen) - 1;
    const __m512 p = _mm512_mul_ps(_mm512_maskz_loadu_ps(keep, scores + j), inverse);
    const __m256i packed = (__m256i)_mm512_cvtneps_pbh(p);
    _mm256_mask_storeu_epi16(probs + j, store, packed);
  }
}

// rows [R, cols] bfloat16 (row stride ld, even) -> pair-layout panels [ceil(R/16), cols/2,
// 16, 2] of the weight W = rows (N = R outputs, K = cols inputs), zero past R. cols is
// even. A pair is one 32-bit word, copied as one.
void pack_pairs(const at::BFloat16* rows, int64_t ld, int64_t R, int64_t cols,
                at::BFloat16* out) {
  const int64_t panels = (R + kPanel - 1) / kPanel, pairs = cols / 2;
  std::memset(static_cast<void*>(out), 0, panels * pairs * 2 * kPanel * sizeof(at::BFloat16));
  const uint32_t* src = reinterpret_cast<const uint32_t*>(rows);
  uint32_t* dst = reinterpret_cast<uint32_t*>(out);
  for (int64_t r = 0; r < R; ++r) {
    uint32_t* panel = dst + (r / kPanel) * pairs * kPanel + r % kPanel;
    const uint32_t* row = src + r * (ld / 2);
    for (int64_t i = 0; i < pairs; ++i) panel[i * kPanel] = row[i];
  }
}

// V_h^T as pair-layout panels over head dims, [D/16, C2/2, 16, 2], straight from the
// values [C, KVH, D] (no transposed copy): value c of dim d is half (c % 2) of the pair
// (c / 2) of column d. `out` comes zeroed, so a pad key past an odd C stays 0.
void pack_values(const at::BFloat16* values, int64_t C, int64_t KVH, int64_t D, int64_t h,
                 int64_t C2, at::BFloat16* out) {
  const int64_t panel_size = (C2 / 2) * 2 * kPanel;
  for (int64_t c = 0; c < C; ++c) {
    const at::BFloat16* row = values + (c * KVH + h) * D;
    at::BFloat16* pair = out + (c / 2) * 2 * kPanel + c % 2;
    for (int64_t d = 0; d < D; ++d) pair[(d / kPanel) * panel_size + (d % kPanel) * 2] = row[d];
  }
}

#endif

at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& keys,
                             const at::Tensor& values, double scale) {
  TORCH_CHECK(q.dim() == 3 && keys.dim() == 3 && values.sizes() == keys.sizes(),
              "prefill_attention: q must be [n, H, D], keys and values [C, KVH, D]");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && keys.scalar_type() == at::kBFloat16 &&
                  values.scalar_type() == at::kBFloat16,
              "prefill_attention: bfloat16 only, got ", q.scalar_type());
  const int64_t n = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t C = keys.size(0), KVH = keys.size(1);
  TORCH_CHECK(keys.size(2) == D && D % tandem::kPanel == 0,
              "prefill_attention: head_dim must match and be a multiple of 16, got ", D);
  TORCH_CHECK(KVH > 0 && H % KVH == 0, "prefill_attention: heads must be a multiple of KV heads");
  TORCH_CHECK(C >= n, "prefill_attention: ", n, " queries but only ", C, " keys");
#ifndef TANDEM_BF16_PAIRS
  TORCH_CHECK(false, "prefill_attention: needs a CPU with AVX512_BF16 (check bf16_pairs())");
  return q;
#else
  const at::Tensor qc = q.contiguous(), kc = keys.contiguous(), vc = values.contiguous();
  const int64_t G = H / KVH, C2 = (C + 1) / 2 * 2;  // keys rounded up to whole pairs
  const int64_t key_panels = (C + kPanel - 1) / kPanel, D2 = D / 2;
  // Per KV head: K_h as panels over keys [key_panels, D/2, 16, 2], and V_h^T as panels over
  // head dims [D/16, C2/2, 16, 2].
  std::vector<at::BFloat16> k_packed(KVH * key_panels * D2 * 2 * kPanel);
  std::vector<at::BFloat16> v_packed(KVH * (D / kPanel) * (C2 / 2) * 2 * kPanel);  // zeros
  const at::BFloat16* k_data = kc.data_ptr<at::BFloat16>();
  const at::BFloat16* v_data = vc.data_ptr<at::BFloat16>();
  // Tasks: the values of each KV head (the dearer), then its keys.
  tandem::parallel_dynamic(2 * KVH, [&] {
    return [&](int64_t task) {
      const int64_t h = task % KVH;
      if (task < KVH) {
        pack_values(v_data, C, KVH, D, h, C2, v_packed.data() + h * D * C2);
      } else {
        pack_pairs(k_data + h * D, KVH * D, C, D, k_packed.data() + h * key_panels * D2 * 2 * kPanel);
      }
    };
  });

  at::Tensor out = at::empty({n, H, D}, q.options());
  const at::BFloat16* q_data = qc.data_ptr<at::BFloat16>();
  at::BFloat16* out_data = out.data_ptr<at::BFloat16>();
  const int64_t tiles = (n + kTile - 1) / kTile, offset = C - n;  // query i sits at offset + i
  const float fscale = static_cast<float>(scale);
  tandem::parallel_dynamic(KVH * tiles, [&] {
    const int64_t max_rows = kTile * G;
    std::vector<at::BFloat16> x(max_rows * D);          // the tile's queries, row (i, g)
    std::vector<float> scores(max_rows * key_panels * kPanel);
    std::vector<at::BFloat16> probs(max_rows * C2);
    std::vector<float> tile(max_rows * kPanel);
    return [&, x, scores, probs, tile](int64_t task) mutable {
      // The last tiles first: they see the most keys, so threads finish together.
      const int64_t h = task % KVH, t = tiles - 1 - task / KVH;
      const int64_t i0 = t * kTile, i1 = std::min(n, i0 + kTile), rows = (i1 - i0) * G;
      const int64_t seen = offset + i1;  // keys the tile's last query sees
      const int64_t seen_panels = (seen + kPanel - 1) / kPanel, seen_even = (seen + 1) / 2 * 2;
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t g = 0; g < G; ++g) {
          std::memcpy(static_cast<void*>(x.data() + ((i - i0) * G + g) * D),
                      q_data + (i * H + h * G + g) * D, D * sizeof(at::BFloat16));
        }
      }
      const uint32_t* x_pairs = reinterpret_cast<const uint32_t*>(x.data());
      const int64_t ld_scores = seen_panels * kPanel;
      const at::BFloat16* k_head = k_packed.data() + h * key_panels * D2 * 2 * kPanel;
      for (int64_t p = 0; p < seen_panels; ++p) {  // S's columns [16p, 16p + 16), in place
        tandem::rows_of_pair_panel(x_pairs, D2, rows, D2, k_head + p * D2 * 2 * kPanel,
                                   scores.data() + p * kPanel, ld_scores);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t limit = offset + i0 + r / G + 1;  // keys this row sees
        softmax_row(scores.data() + r * ld_scores, limit, seen_even, fscale,
                    probs.data() + r * seen_even);
      }
      const uint32_t* p_pairs = reinterpret_cast<const uint32_t*>(probs.data());
      const at::BFloat16* v_head = v_packed.data() + h * D * C2;
      for (int64_t p = 0; p < D / kPanel; ++p) {
        tandem::rows_of_pair_panel(p_pairs, seen_even / 2, rows, seen_even / 2,
                                   v_head + p * (C2 / 2) * 2 * kPanel, tile.data());
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = i0 + r / G, g = r % G;
          at::BFloat16* o = out_data + (i * H + h * G + g) * D + p * kPanel;
          const __m256i packed = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(tile.data() + r * kPanel));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), packed);
        }
      }
    };
  });
  return out;
#endif
}

bool bf16_pairs() {
#ifdef TANDEM_BF16_PAIRS
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tandem, m) {
  m.def("prefill_attention(Tensor q, Tensor keys, Tensor values, float scale) -> Tensor");
  m.def("bf16_pairs() -> bool", &bf16_pairs);  // whether this build has the pair kernels
}

TORCH_LIBRARY_IMPL(tandem, CPU, m) { m.impl("prefill_attention", &prefill_attention); }
