// Paged decode attention on CPU: one new query token per request, attending over the
// request's cached keys and values read in place from its blocks (no gather, no padding).
//
// Layout (engine/attention/base.py): kv_cache [num_blocks, 2, block_size, KVH, D], where
// [:, 0] holds keys and [:, 1] values. Each (request, KV head) pair is one task: its G
// query heads (G = H / KVH, grouped-query attention) are scored together, so every key
// and value row is read once, and the softmax is computed online block by block in
// float32 (running max m, running sum l, accumulator acc), as in FlashAttention.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "bf16_pairs.h"  // exp_nonpositive

namespace {

constexpr int64_t kLanes = 16;  // partial sums per dot product, so the loop vectorizes


using tandem::exp_nonpositive;

// The strides of one layer's cache, [NB, 2, BS, KVH, D], that a block walk needs.
struct Shape {
  int64_t head_dim, group, block_size;
  int64_t half_stride;   // keys -> values of the same block
  int64_t token_stride;  // token t -> t + 1 within a block (KVH * D)
};

// Blocks sit anywhere in the cache, so the hardware prefetcher cannot guess the next
// one: ask for it while the current one is being read.
inline void prefetch(const void* start, int64_t num_bytes) {
  const char* bytes = static_cast<const char*>(start);
  for (int64_t offset = 0; offset < num_bytes; offset += 64) __builtin_prefetch(bytes + offset, 0, 2);
}

template <typename scalar_t>
inline void to_float(float* dst, const scalar_t* src, int64_t dim) {
  for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<float>(src[d]);
}

inline float dot(const float* a, const float* b, int64_t dim) {
  float partial[kLanes] = {0.0f};
  int64_t d = 0;
  for (; d + kLanes <= dim; d += kLanes) {
    for (int64_t lane = 0; lane < kLanes; ++lane) partial[lane] += a[d + lane] * b[d + lane];
  }
  float sum = 0.0f;
  for (; d < dim; ++d) sum += a[d] * b[d];
  for (int64_t lane = 0; lane < kLanes; ++lane) sum += partial[lane];
  return sum;
}

// Per-task scratch for `heads` KV heads: their G query rows each, accumulators, scores
// (block_size per query row), running max and sum per query row, and one K/V row.
struct Scratch {
  std::vector<float> query, acc, scores, row, running_max, running_sum;
  std::vector<at::BFloat16> query_bf16;  // the query rows as given, unscaled (bfloat16 only)
  float scale = 1.0f;
  int64_t score_stride;  // scores of row r start at r * score_stride: a span of blocks
  Scratch(int64_t rows, int64_t head_dim, int64_t span_tokens)
      : query(rows * head_dim), acc(rows * head_dim), scores(rows * span_tokens),
        row(head_dim), running_max(rows), running_sum(rows), query_bf16(rows * head_dim),
        score_stride(span_tokens) {}
};

// The KV heads [head_begin, head_end) of one request and one block. Token rows are read
// in address order (all heads of token t, then t + 1), so a block streams from memory.
// kDim > 0 fixes head_dim at compile time (64 and 128 are instantiated): the inner loops
// then unroll into whole vectors, about twice as fast as with a run-time trip count.
template <typename scalar_t, int64_t kDim>
inline void attend_block(
    Scratch& s, const scalar_t* block, const Shape& shape, int64_t num_tokens,
    int64_t head_begin, int64_t head_end) {
  const int64_t dim = kDim > 0 ? kDim : shape.head_dim;
  const int64_t group = shape.group, block_size = shape.block_size;
  for (int64_t t = 0; t < num_tokens; ++t) {
    for (int64_t h = head_begin; h < head_end; ++h) {
      to_float(s.row.data(), block + t * shape.token_stride + h * dim, dim);
      for (int64_t g = 0; g < group; ++g) {
        const int64_t r = (h - head_begin) * group + g;
        s.scores[r * s.score_stride + t] = dot(s.query.data() + r * dim, s.row.data(), dim);
      }
    }
  }
  for (int64_t r = 0; r < (head_end - head_begin) * group; ++r) {
    float* score = s.scores.data() + r * s.score_stride;
    float new_max = s.running_max[r];
    for (int64_t t = 0; t < num_tokens; ++t) new_max = std::max(new_max, score[t]);
    float block_sum = 0.0f;
    for (int64_t t = 0; t < num_tokens; ++t) {
      score[t] = exp_nonpositive(score[t] - new_max);
      block_sum += score[t];
    }
    const float correction = exp_nonpositive(s.running_max[r] - new_max);
    s.running_sum[r] = s.running_sum[r] * correction + block_sum;
    s.running_max[r] = new_max;
    float* acc = s.acc.data() + r * dim;
    for (int64_t d = 0; d < dim; ++d) acc[d] *= correction;
  }
  const scalar_t* values = block + shape.half_stride;
  for (int64_t t = 0; t < num_tokens; ++t) {
    for (int64_t h = head_begin; h < head_end; ++h) {
      to_float(s.row.data(), values + t * shape.token_stride + h * dim, dim);
      for (int64_t g = 0; g < group; ++g) {
        const int64_t r = (h - head_begin) * group + g;
        const float weight = s.scores[r * s.score_stride + t];
        float* acc = s.acc.data() + r * dim;
        for (int64_t d = 0; d < dim; ++d) acc[d] += weight * s.row[d];
      }
    }
  }
}

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

// block_scores for bfloat16 keys and 16-token blocks: the query's and key's bfloat16
// pairs multiplied exactly and summed in float32 by vdpbf16ps (no conversion of the keys),
// the 16 tokens' lane sums in one sum_lanes16, the scale applied to the sums.
template <int64_t kDim>
inline void block_scores_bf16(Scratch& s, const at::BFloat16* block, const Shape& shape,
                              int64_t num_tokens, int64_t head_begin, int64_t head_end,
                              int64_t offset) {
  constexpr int64_t kPairVecs = kDim / 32;  // 32 bfloat16 values a vector
  const int64_t group = shape.group, stride = shape.token_stride;
  const __m512 scale = _mm512_set1_ps(s.scale);
  for (int64_t h = head_begin; h < head_end; ++h) {
    for (int64_t g = 0; g < group; ++g) {
      const int64_t r = (h - head_begin) * group + g;
      __m512bh q[kPairVecs];
      for (int64_t i = 0; i < kPairVecs; ++i) {
        q[i] = (__m512bh)_mm512_loadu_si512(s.query_bf16.data() + r * kDim + 32 * i);
      }
      __m512 dots[16];
      for (int64_t t = 0; t < 16; ++t) {
        dots[t] = _mm512_setzero_ps();
        if (t >= num_tokens) continue;  // a block's unwritten slots: never read
        const at::BFloat16* key = block + t * stride + h * kDim;
        for (int64_t i = 0; i < kPairVecs; ++i) {
          dots[t] = _mm512_dpbf16_ps(dots[t], q[i], (__m512bh)_mm512_loadu_si512(key + 32 * i));
        }
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
                              int64_t offset) {
  constexpr int64_t kVecs = kDim / 16;
  const int64_t stride = shape.token_stride;
  __m512 acc[kRows][kVecs];
  for (int64_t j = 0; j < kRows; ++j) {
    for (int64_t i = 0; i < kVecs; ++i) acc[j][i] = _mm512_loadu_ps(s.acc.data() + (first_row + j) * kDim + 16 * i);
  }
  for (int64_t t = 0; t < num_tokens; ++t) {
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
                         int64_t offset) {
  constexpr int64_t kMaxRows = 16 / (kDim / 16);  // 4 rows of 64, 2 of 128
  const scalar_t* values = block + shape.half_stride;
  for (int64_t h = head_begin; h < head_end; ++h) {
    const int64_t head_row = (h - head_begin) * shape.group;
    for (int64_t g = 0; g < shape.group; g += kMaxRows) {
      const int64_t n = std::min(kMaxRows, shape.group - g);
      if (n == kMaxRows) {
        block_values_rows<scalar_t, kDim, kMaxRows>(s, values, shape, num_tokens, h, head_row + g, offset);
      } else if (kMaxRows > 3 && n == 3) {
        block_values_rows<scalar_t, kDim, 3>(s, values, shape, num_tokens, h, head_row + g, offset);
      } else if (kMaxRows > 2 && n == 2) {
        block_values_rows<scalar_t, kDim, 2>(s, values, shape, num_tokens, h, head_row + g, offset);
      } else {
        for (int64_t j = 0; j < n; ++j) {
          block_values_rows<scalar_t, kDim, 1>(s, values, shape, num_tokens, h, head_row + g + j, offset);
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
  for (int64_t b = 0; b < num_blocks; ++b) {
    if (next[b] != nullptr) prefetch(next[b], block_bytes);
    const int64_t tokens = std::min(bs, num_tokens - b * bs);
#ifdef TANDEM_BF16_PAIRS
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      if (bs == 16) {
        block_scores_bf16<kDim>(s, blocks[b], shape, tokens, head_begin, head_end, b * bs);
        continue;
      }
    }
#endif
    block_scores<scalar_t, kDim>(s, blocks[b], shape, tokens, head_begin, head_end, b * bs);
  }
  span_softmax<kDim>(s, num_tokens, (head_end - head_begin) * shape.group);
  for (int64_t b = 0; b < num_blocks; ++b) {
    const int64_t tokens = std::min(bs, num_tokens - b * bs);
    block_values<scalar_t, kDim>(s, blocks[b], shape, tokens, head_begin, head_end, b * bs);
  }
}
#endif

// Blocks a span holds at most (the AVX-512 walk scores a span's tokens, then takes one
// softmax over them).
constexpr int64_t kSpanBlocks = 4;

// A span's walk for this head_dim: AVX-512 where the CPU has it and head_dim is 64 or
// 128, else the portable loops block by block (which the compiler vectorizes as it can).
// `next` holds, for each block, one to prefetch while it is read (or nullptr).
template <typename scalar_t>
inline void attend(Scratch& s, const scalar_t* const* blocks, const scalar_t* const* next,
                   int64_t num_blocks, const Shape& shape, int64_t num_tokens,
                   int64_t head_begin, int64_t head_end, int64_t block_bytes) {
#ifdef TANDEM_AVX512
  if constexpr (!std::is_same_v<scalar_t, double>) {  // float, bfloat16, half
    if (shape.head_dim == 64) {
      return attend_span_avx512<scalar_t, 64>(s, blocks, next, num_blocks, shape, num_tokens,
                                              head_begin, head_end, block_bytes);
    }
    if (shape.head_dim == 128) {
      return attend_span_avx512<scalar_t, 128>(s, blocks, next, num_blocks, shape, num_tokens,
                                               head_begin, head_end, block_bytes);
    }
  }
#endif
  for (int64_t b = 0; b < num_blocks; ++b) {
    if (next[b] != nullptr) prefetch(next[b], block_bytes);
    const int64_t tokens = std::min(shape.block_size, num_tokens - b * shape.block_size);
    if (shape.head_dim == 64) {
      attend_block<scalar_t, 64>(s, blocks[b], shape, tokens, head_begin, head_end);
    } else if (shape.head_dim == 128) {
      attend_block<scalar_t, 128>(s, blocks[b], shape, tokens, head_begin, head_end);
    } else {
      attend_block<scalar_t, 0>(s, blocks[b], shape, tokens, head_begin, head_end);
    }
  }
}

template <typename scalar_t, typename index_t>
void decode_attention_kernel(
    const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_tables,
    const at::Tensor& context_lens, at::Tensor& out, double scale) {
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), dim = q.size(2);
  const int64_t num_kv_heads = kv_cache.size(3), max_blocks = block_tables.size(1);
  const Shape shape{
      dim, num_heads / num_kv_heads, kv_cache.size(2), kv_cache.stride(1), kv_cache.stride(2)};
  // One task per request when there are enough requests to go round the threads, else
  // one per (request, KV head) so a small batch still uses every thread.
  const int64_t splits = num_seqs >= at::get_num_threads() ? 1 : num_kv_heads;
  const int64_t heads_per_task = num_kv_heads / splits;

  const scalar_t* q_ptr = q.data_ptr<scalar_t>();
  const scalar_t* kv_ptr = kv_cache.data_ptr<scalar_t>();
  const index_t* table_ptr = block_tables.data_ptr<index_t>();
  const int64_t* len_ptr = context_lens.data_ptr<int64_t>();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  const int64_t block_bytes = kv_cache.stride(0) * static_cast<int64_t>(sizeof(scalar_t));

  at::parallel_for(0, num_seqs * splits, 1, [&](int64_t begin, int64_t end) {
    Scratch s(heads_per_task * shape.group, dim, kSpanBlocks * shape.block_size);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t seq = task / splits;
      const int64_t head_begin = (task % splits) * heads_per_task;
      const int64_t head_end = head_begin + heads_per_task;
      const int64_t rows = heads_per_task * shape.group;
      const int64_t first_row = head_begin * shape.group;  // query head of scratch row 0
      s.scale = static_cast<float>(scale);
      for (int64_t r = 0; r < rows; ++r) {
        const scalar_t* row = q_ptr + seq * q.stride(0) + (first_row + r) * q.stride(1);
        to_float(s.query.data() + r * dim, row, dim);
        for (int64_t d = 0; d < dim; ++d) s.query[r * dim + d] *= scale;
        if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
          std::copy(row, row + dim, s.query_bf16.data() + r * dim);
        }
      }
      std::fill(s.acc.begin(), s.acc.end(), 0.0f);
      std::fill(s.running_max.begin(), s.running_max.end(), -87.0f);
      std::fill(s.running_sum.begin(), s.running_sum.end(), 0.0f);
      const int64_t context_len = len_ptr[seq];
      const int64_t block_size = shape.block_size;
      const int64_t num_blocks = std::min((context_len + block_size - 1) / block_size, max_blocks);
      // Spans of kSpanBlocks blocks; each block's read starts the prefetch of the block
      // two after it.
      const index_t* table = table_ptr + seq * max_blocks;
      auto block_at = [&](int64_t b) { return kv_ptr + static_cast<int64_t>(table[b]) * kv_cache.stride(0); };
      const scalar_t* blocks[kSpanBlocks];
      const scalar_t* next[kSpanBlocks];
      for (int64_t first = 0; first < num_blocks; first += kSpanBlocks) {
        const int64_t n = std::min(kSpanBlocks, num_blocks - first);
        for (int64_t b = 0; b < n; ++b) {
          blocks[b] = block_at(first + b);
          next[b] = first + b + 2 < num_blocks ? block_at(first + b + 2) : nullptr;
        }
        const int64_t num_tokens = std::min(n * block_size, context_len - first * block_size);
        attend(s, blocks, next, n, shape, num_tokens, head_begin, head_end, block_bytes);
      }
      for (int64_t r = 0; r < rows; ++r) {
        scalar_t* row = out_ptr + (seq * num_heads + first_row + r) * dim;
        const float inverse = s.running_sum[r] > 0.0f ? 1.0f / s.running_sum[r] : 0.0f;
        for (int64_t d = 0; d < dim; ++d) row[d] = static_cast<scalar_t>(s.acc[r * dim + d] * inverse);
      }
    }
  });
}

// q: [S, H, D]; kv_cache: [NB, 2, BS, KVH, D]; block_tables: [S, MB] int32 or int64;
// context_lens: [S] int64 (tokens each request attends over, its new one included).
// Returns [S, H, D] in q's dtype.
at::Tensor decode_attention(
    const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_tables,
    const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && kv_cache.dim() == 5, "q must be [S, H, D], kv_cache 5-D");
  TORCH_CHECK(q.scalar_type() == kv_cache.scalar_type(), "q and kv_cache dtypes differ");
  TORCH_CHECK(q.stride(2) == 1 && kv_cache.stride(4) == 1, "head_dim must be contiguous");
  TORCH_CHECK(kv_cache.size(1) == 2 && kv_cache.size(4) == q.size(2), "kv_cache shape");
  TORCH_CHECK(q.size(1) % kv_cache.size(3) == 0, "heads must be a multiple of KV heads");
  TORCH_CHECK(block_tables.is_contiguous() && context_lens.is_contiguous(), "contiguous");
  TORCH_CHECK(context_lens.scalar_type() == at::kLong, "context_lens must be int64");
  TORCH_CHECK(block_tables.size(0) == q.size(0) && context_lens.size(0) == q.size(0));
  auto out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
        if (block_tables.scalar_type() == at::kInt) {
          decode_attention_kernel<scalar_t, int32_t>(
              q, kv_cache, block_tables, context_lens, out, scale);
        } else {
          TORCH_CHECK(block_tables.scalar_type() == at::kLong, "block_tables int32/int64");
          decode_attention_kernel<scalar_t, int64_t>(
              q, kv_cache, block_tables, context_lens, out, scale);
        }
      });
  return out;
}

}  // namespace

TORCH_LIBRARY(tandem, m) {
  m.def(
      "decode_attention(Tensor q, Tensor kv_cache, Tensor block_tables, "
      "Tensor context_lens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(tandem, CPU, m) { m.impl("decode_attention", &decode_attention); }
