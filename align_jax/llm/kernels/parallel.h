// Work splitting shared by the native kernels: a job of `parts` independent pieces, run
// by the calling thread and by tasks handed to XLA's intra-op thread pool.
//
// Pieces are claimed from a shared counter. The caller never waits for a task to *start*:
// XLA may run independent custom calls concurrently on every pool thread, and a kernel
// that waited for its own pool tasks could then deadlock (one did). A piece nobody has
// claimed is run by whoever gets to it first; the caller waits only for pieces another
// thread is already running. A task that starts after the job is finished finds no piece
// left and returns without touching the job's data; the job is reference-counted so that
// such a task never sees freed memory.

#pragma once

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <new>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace align_jax {

struct ParallelJob {
  explicit ParallelJob(int64_t parts) : parts(parts) {}
  virtual ~ParallelJob() = default;
  // Runs piece `part` (0 <= part < parts); called exactly once per piece.
  virtual void run(int64_t part) = 0;

  const int64_t parts;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void work() {
    for (;;) {
      const int64_t part = next.fetch_add(1, std::memory_order_relaxed);
      if (part >= parts) return;
      run(part);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Runs every piece of `job`, using up to all of the pool's threads; returns when all are done.
inline void run_parallel(xla::ffi::ThreadPool& pool, const std::shared_ptr<ParallelJob>& job) {
  int64_t threads = pool.num_threads();
  if (threads > job->parts) threads = job->parts;
  for (int64_t i = 1; i < threads; ++i) pool.Schedule([job] { job->work(); });
  job->work();
  while (job->done.load(std::memory_order_acquire) < job->parts) std::this_thread::yield();
}

// Runs fn(0) ... fn(parts - 1) as one job (see run_parallel). A task that starts late finds
// no piece left and never calls fn, so fn may refer to the caller's locals.
inline void parallel_for(xla::ffi::ThreadPool& pool, int64_t parts, std::function<void(int64_t)> fn) {
  struct FnJob : ParallelJob {
    FnJob(int64_t parts, std::function<void(int64_t)> fn) : ParallelJob(parts), fn(std::move(fn)) {}
    std::function<void(int64_t)> fn;
    void run(int64_t part) override { fn(part); }
  };
  if (parts <= 0) return;
  if (parts == 1 || pool.num_threads() <= 1) {
    for (int64_t i = 0; i < parts; ++i) fn(i);
    return;
  }
  run_parallel(pool, std::make_shared<FnJob>(parts, std::move(fn)));
}

// An uninitialised buffer of n values aligned to 64 bytes (the tile and vector loads' line).
template <typename T>
struct AlignedBuffer {
  explicit AlignedBuffer(int64_t n = 0) { resize(n); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  ~AlignedBuffer() { std::free(data_); }
  void resize(int64_t n) {
    if (n <= size_) return;
    std::free(data_);
    const size_t bytes = (static_cast<size_t>(n) * sizeof(T) + 63) / 64 * 64;
    data_ = static_cast<T*>(std::aligned_alloc(64, bytes));
    if (data_ == nullptr) throw std::bad_alloc();
    size_ = n;
  }
  T* data() const { return data_; }
  int64_t size() const { return size_; }

 private:
  T* data_ = nullptr;
  int64_t size_ = 0;
};

}  // namespace align_jax
