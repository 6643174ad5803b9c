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
#include "decode_attention.h"
#include "decode_attention_avx512.h"
#include "parallel_dynamic.h"

namespace {

using namespace tandem::decode;
using tandem::exp_nonpositive;

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

  // Requests by context, longest first: the threads take them in turn as they finish.
  std::vector<int64_t> order(num_seqs);
  for (int64_t i = 0; i < num_seqs; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return len_ptr[a] > len_ptr[b]; });
  tandem::parallel_dynamic(num_seqs * splits, [&] {
    return [&, s = Scratch(heads_per_task * shape.group, dim, kSpanBlocks * shape.block_size)](
               int64_t task) mutable {
      const int64_t seq = order[task / splits];
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
      // Spans of kSpanBlocks blocks; each block's read prefetches the block two after it
      // (the AVX-512 walk one row at a time, as it reads the same row of its own block).
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
    };
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
