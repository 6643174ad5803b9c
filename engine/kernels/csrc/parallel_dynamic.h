// Tasks of unequal cost on every thread, each thread taking the next task as it finishes
// one. at::parallel_for alone hands each thread a fixed contiguous range: where the
// tasks' costs differ (a causal prefill tile's grows with its position; a decode
// request's with its context), one thread may get most of the work. Measured on an AMD
// EPYC, 2 threads: causal prefill attention over 1,024 queries 6.2 -> 4.7 ms.

#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace tandem {

// body(task) for tasks [0, count), dearest first if the caller numbers them so.
// `make_worker()` runs once on each thread and returns that thread's body, so scratch
// buffers are made once a thread, not once a task.
template <typename MakeWorker>
void parallel_dynamic(int64_t count, const MakeWorker& make_worker) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), count));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    auto body = make_worker();
    for (int64_t task = next.fetch_add(1); task < count; task = next.fetch_add(1)) body(task);
  });
}

}  // namespace tandem
