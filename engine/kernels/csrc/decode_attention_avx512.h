// The AVX-512 block walk of the paged decode attention kernel (decode_attention.cpp), for
// head dims of whole vectors (64, 128): a span of blocks is scored, then one online
// softmax, then the values.

#pragma once

#include <algorithm>
#include <type_traits>

#include "bf16_pairs.h"
#include "decode_attention.h"

namespace tandem::decode {

#ifdef TANDEM_AVX512
// attend_block with explicit AVX-512 for head dims of whole vectors (kDim = 64, 128), in
// three passes over the block: scores, the online softmax 16 scores at a time, and the
// values. Each query row and accumulator stays in registers across the block's tokens,
// and each key and value row is read (and converted to float32) once per pass.

// Scores of a block's tokens for each query row, scaled, into s.scores: a dot product
// per (row, token) in float32, each reduced across its lanes.
template <typename scalar_t, int64_t kDim>
inline void block_scores(Scratch& s, const scalar_t* block, const Shape& shape,
                         int64_t num_tokens, int64_t head_begin, int64_t head_end,
                         int64_t offset) {
  constexpr int64_t kVecs = kDim / 16;
  const int64_t group = shape.group, stride = shape.token_stride;
  for (int64_t h = head_begin; h < head_end; ++h) {
    for (int64_t g = 0; g < group; ++g) {
      const int64_t r = (h - head_begin) * group + g;
      __m512 q[kVecs];
      for (int64_t i = 0; i < kVecs; ++i) q[i] = _mm512_loadu_ps(s.query.data() + r * kDim + 16 * i);
      float* score = s.scores.data() + r * s.score_stride + offset;
      for (int64_t t = 0; t < num_tokens; ++t) {
        const scalar_t* key = block + t * stride + h * kDim;
        __m512 acc = _mm512_mul_ps(q[0], tandem::load16(key));
        for (int64_t i = 1; i < kVecs; ++i) acc = _mm512_fmadd_ps(q[i], tandem::load16(key + 16 * i), acc);
        score[t] = _mm512_reduce_add_ps(acc);
      }
    }
  }
}

#ifdef TANDEM_BF16_PAIRS
// x[t]'s 16 lanes summed, for 16 vectors at once: lane t of the result is the sum of
// x[t]. Four rounds of shuffles and adds (45 instructions) where 16 separate lane
// reductions take about 130.
inline __m512 sum_lanes16(const __m512* x) {
  __m512 pairs[8], quads[4];
  for (int i = 0; i < 8; ++i) {  // in each 128-bit lane: x[2i], x[2i+1], x[2i], x[2i+1]
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(x[2 * i], x[2 * i + 1]),
                             _mm512_unpackhi_ps(x[2 * i], x[2 * i + 1]));
  }
  for (int i = 0; i < 4; ++i) {  // in each 128-bit lane: x[4i] .. x[4i+3]
    const __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // 128-bit lanes: 0x88 picks lanes 0 and 2 of each operand, 0xDD lanes 1 and 3.
  const __m512 low = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x88),
                                   _mm512_shuffle_f32x4(quads[0], quads[1], 0xDD));
  const __m512 high = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x88),
                                    _mm512_shuffle_f32x4(quads[2], quads[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(low, high, 0x88),
                       _mm512_shuffle_f32x4(low, high, 0xDD));
}

// block_scores for bfloat16 keys, 16 tokens of a block (or its last, fewer): the query's and key's bfloat16
// pairs multiplied exactly and summed in float32 by vdpbf16ps (no conversion of the keys),
// the 16 tokens' lane sums in one sum_lanes16, the scale applied to the sums. The 16 dot
// products are unrolled so they stay in registers: a loop that skipped the slots past
// `num_tokens` kept them on the stack, zeroed by a memset for every query row (a third
// of the kernel's time). Those slots, the unwritten tail of a request's last block, are
// scored on the first token's key instead, and their scores are never read.
template <int64_t kDim>
inline void block_scores_bf16(Scratch& s, const at::BFloat16* block, const Shape& shape,
                              int64_t num_tokens, int64_t head_begin, int64_t head_end,
                              int64_t offset, const at::BFloat16* ahead) {
  constexpr int64_t kPairVecs = kDim / 32;  // 32 bfloat16 values a vector
  const int64_t group = shape.group, stride = shape.token_stride;
  const __m512 scale = _mm512_set1_ps(s.scale);
  int64_t rows[16];
  for (int64_t t = 0; t < 16; ++t) rows[t] = (t < num_tokens ? t : 0) * stride;
  for (int64_t h = head_begin; h < head_end; ++h) {
    const at::BFloat16* head = block + h * kDim;
    for (int64_t g = 0; g < group; ++g) {
      const int64_t r = (h - head_begin) * group + g;
      __m512bh q[kPairVecs];
      for (int64_t i = 0; i < kPairVecs; ++i) {
        q[i] = (__m512bh)_mm512_loadu_si512(s.query_bf16.data() + r * kDim + 32 * i);
      }
      // The first row of each head prefetches that head's keys of the block ahead.
      const bool fetch = ahead != nullptr && g == 0;
      __m512 dots[16];
#pragma GCC unroll 16
      for (int64_t t = 0; t < 16; ++t) {
        if (fetch) prefetch(ahead + t * stride + h * kDim, 2 * kDim);
        const at::BFloat16* key = head + rows[t];
        __m512 dot = _mm512_dpbf16_ps(_mm512_setzero_ps(), q[0],
                                      (__m512bh)_mm512_loadu_si512(key));
        for (int64_t i = 1; i < kPairVecs; ++i) {
          dot = _mm512_dpbf16_ps(dot, q[i], (__m512bh)_mm512_loadu_si512(key + 32 * i));
        }
        dots[t] = dot;
      }
      float* score = s.scores.data() + r * s.score_stride + offset;
      _mm512_storeu_ps(score, _mm512_mul_ps(sum_lanes16(dots), scale));
    }
  }
}
#endif

// The online softmax over a span's scores, row by row: new running max and sum, the
// scores turned into weights in place, the accumulators rescaled.
template <int64_t kDim>
inline void span_softmax(Scratch& s, int64_t num_tokens, int64_t rows) {
  constexpr int64_t kVecs = kDim / 16;
  for (int64_t r = 0; r < rows; ++r) {
    float* score = s.scores.data() + r * s.score_stride;
    __m512 max16 = _mm512_set1_ps(s.running_max[r]);
    for (int64_t j = 0; j < num_tokens; j += 16) {
      const __mmask16 m = num_tokens - j >= 16 ? 0xFFFF : (1u << (num_tokens - j)) - 1;
      max16 = _mm512_mask_max_ps(max16, m, max16, _mm512_maskz_loadu_ps(m, score + j));
    }
    const float new_max = _mm512_reduce_max_ps(max16);
    const __m512 max = _mm512_set1_ps(new_max);
    __m512 sum16 = _mm512_setzero_ps();
    for (int64_t j = 0; j < num_tokens; j += 16) {
      const __mmask16 m = num_tokens - j >= 16 ? 0xFFFF : (1u << (num_tokens - j)) - 1;
      const __m512 e = _mm512_maskz_mov_ps(
          m, tandem::exp_nonpositive16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, score + j), max)));
      _mm512_mask_storeu_ps(score + j, m, e);
      sum16 = _mm512_add_ps(sum16, e);
    }
    const float correction = exp_nonpositive(s.running_max[r] - new_max);
    s.running_sum[r] = s.running_sum[r] * correction + _mm512_reduce_add_ps(sum16);
    s.running_max[r] = new_max;
    float* acc = s.acc.data() + r * kDim;
    const __m512 c = _mm512_set1_ps(correction);
    for (int64_t i = 0; i < kVecs; ++i) _mm512_storeu_ps(acc + 16 * i, _mm512_mul_ps(c, _mm512_loadu_ps(acc + 16 * i)));
  }
}

// Query rows [first_row, first_row + kRows) of KV head h: the block's values, weighted,
// added to their accumulators. Each value row is converted once for all kRows rows.
template <typename scalar_t, int64_t kDim, int64_t kRows>
inline void block_values_rows(Scratch& s, const scalar_t* values, const Shape& shape,
                              int64_t num_tokens, int64_t h, int64_t first_row,
                              int64_t offset, const scalar_t* ahead) {
  constexpr int64_t kVecs = kDim / 16;
  const int64_t stride = shape.token_stride;
  __m512 acc[kRows][kVecs];
  for (int64_t j = 0; j < kRows; ++j) {
    for (int64_t i = 0; i < kVecs; ++i) acc[j][i] = _mm512_loadu_ps(s.acc.data() + (first_row + j) * kDim + 16 * i);
  }
  for (int64_t t = 0; t < num_tokens; ++t) {
    if (ahead != nullptr) prefetch(ahead + t * stride + h * kDim, kDim * sizeof(scalar_t));
    const scalar_t* value = values + t * stride + h * kDim;
    __m512 v[kVecs];
    for (int64_t i = 0; i < kVecs; ++i) v[i] = tandem::load16(value + 16 * i);
    for (int64_t j = 0; j < kRows; ++j) {
      const __m512 weight = _mm512_set1_ps(s.scores[(first_row + j) * s.score_stride + offset + t]);
      for (int64_t i = 0; i < kVecs; ++i) acc[j][i] = _mm512_fmadd_ps(weight, v[i], acc[j][i]);
    }
  }
  for (int64_t j = 0; j < kRows; ++j) {
    for (int64_t i = 0; i < kVecs; ++i) _mm512_storeu_ps(s.acc.data() + (first_row + j) * kDim + 16 * i, acc[j][i]);
  }
}

// All query rows of the KV heads [head_begin, head_end): as many rows at a time as keep
// their accumulators and one value row within 20 vector registers.
template <typename scalar_t, int64_t kDim>
inline void block_values(Scratch& s, const scalar_t* block, const Shape& shape,
                         int64_t num_tokens, int64_t head_begin, int64_t head_end,
                         int64_t offset, const scalar_t* ahead) {
  constexpr int64_t kMaxRows = 16 / (kDim / 16);  // 4 rows of 64, 2 of 128
  const scalar_t* values = block + shape.half_stride;
  for (int64_t h = head_begin; h < head_end; ++h) {
    const int64_t head_row = (h - head_begin) * shape.group;
    for (int64_t g = 0; g < shape.group; g += kMaxRows) {
      const int64_t n = std::min(kMaxRows, shape.group - g);
      // The first rows of each head prefetch that head's values of the block ahead.
      const scalar_t* pf = g == 0 && ahead != nullptr ? ahead + shape.half_stride : nullptr;
      if (n == kMaxRows) {
        block_values_rows<scalar_t, kDim, kMaxRows>(s, values, shape, num_tokens, h, head_row + g, offset, pf);
      } else if (kMaxRows > 3 && n == 3) {
        block_values_rows<scalar_t, kDim, 3>(s, values, shape, num_tokens, h, head_row + g, offset, pf);
      } else if (kMaxRows > 2 && n == 2) {
        block_values_rows<scalar_t, kDim, 2>(s, values, shape, num_tokens, h, head_row + g, offset, pf);
      } else {
        for (int64_t j = 0; j < n; ++j) {
          block_values_rows<scalar_t, kDim, 1>(s, values, shape, num_tokens, h, head_row + g + j,
                                               offset, j == 0 ? pf : nullptr);
        }
      }
    }
  }
}

// A span of consecutive blocks of one request (up to kSpanBlocks; all full but the
// last): the scores of all its tokens, one softmax over them, then the values. The
// softmax's fixed cost per row (reductions, the rescale) is paid once a span.
template <typename scalar_t, int64_t kDim>
inline void attend_span_avx512(
    Scratch& s, const scalar_t* const* blocks, const scalar_t* const* next, int64_t num_blocks,
    const Shape& shape, int64_t num_tokens, int64_t head_begin, int64_t head_end,
    int64_t block_bytes) {
  const int64_t bs = shape.block_size;
  // The block ahead is prefetched row by row, each key row as the same row here is
  // scored and each value row as it is added: one burst of a block's 192 lines at its
  // start held the loads up until they had all gone out, so the reads and the
  // arithmetic took turns (1,349-1,408 -> 1,118-1,132 us a layer for 48 requests of
  // 400 tokens from memory, 2 threads).
  bool spread = false;
  for (int64_t b = 0; b < num_blocks; ++b) {
    const int64_t tokens = std::min(bs, num_tokens - b * bs);
#ifdef TANDEM_BF16_PAIRS
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      if (bs % 16 == 0) {  // the block's tokens 16 at a time
        spread = true;
        for (int64_t t = 0; t < tokens; t += 16) {
          block_scores_bf16<kDim>(s, blocks[b] + t * shape.token_stride, shape,
                                  std::min<int64_t>(16, tokens - t), head_begin, head_end,
                                  b * bs + t,
                                  next[b] == nullptr ? nullptr : next[b] + t * shape.token_stride);
        }
        continue;
      }
    }
#endif
    if (next[b] != nullptr) prefetch(next[b], block_bytes);
    block_scores<scalar_t, kDim>(s, blocks[b], shape, tokens, head_begin, head_end, b * bs);
  }
  span_softmax<kDim>(s, num_tokens, (head_end - head_begin) * shape.group);
  for (int64_t b = 0; b < num_blocks; ++b) {
    const int64_t tokens = std::min(bs, num_tokens - b * bs);
    block_values<scalar_t, kDim>(s, blocks[b], shape, tokens, head_begin, head_end, b * bs,
                                 spread ? next[b] : nullptr);
  }
}
#endif

}  // namespace tandem::decode
