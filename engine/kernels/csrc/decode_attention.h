// Pieces of the paged decode attention kernel (decode_attention.cpp) that its block walks
// share: the cache's strides, the per-task scratch, prefetching and float conversion.

#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "bf16_pairs.h"  // exp_nonpositive

namespace tandem::decode {

constexpr int64_t kLanes = 16;  // partial sums per dot product, so the loop vectorizes

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

}  // namespace tandem::decode
