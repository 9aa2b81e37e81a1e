// r1/parallel.hpp: intra-op threading.
//
// r1::set_num_threads(n) sets how many threads every r1 op may use: r1's own loops
// (parallel_for), its GEMMs (r1::gemm in linear.hpp) and, in builds with
// R1_USE_OPENBLAS, OpenBLAS. The default is every hardware thread.
//
// The threads are r1's own: a pool of std::threads, started on first use, that wait
// briefly (a few microseconds of spinning, so back-to-back ops hand over fast) and then
// sleep. OpenMP's workers spin for milliseconds instead; on a 2-core machine with another
// busy process that made every small parallel region wait for a worker with no free core,
// and a small training loop ran 20x slower than on one thread.
//
// r1 splits the work itself and sets Eigen's own thread count to 1 (Eigen::setNbThreads):
// Eigen's threaded GEMM re-blocks the inner dimension by thread count, so its sums would
// change with it.
//
// Determinism: parallel_for splits [0, n) into one contiguous chunk per thread and each
// index is computed by one thread with the same code, so elementwise and row-wise ops
// give bit-identical results for any thread count. Reductions across rows run in index
// order for the same reason.
#pragma once

#include "config.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#if defined(R1_USE_OPENBLAS)
extern "C" void openblas_set_num_threads(int num_threads);
#endif

namespace r1 {

namespace detail {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

// Workers 1..n-1 of a parallel_for; the calling thread is worker 0.
class ThreadPool {
 public:
  static ThreadPool& instance() {
    static ThreadPool pool;
    return pool;
  }

  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    for (std::thread& worker : workers_) worker.join();
  }

  // Runs task(t) for t in [0, threads), t = 0 on the calling thread, and returns when all
  // have finished. The first exception a task throws is rethrown here. The workers only
  // borrow task, since run waits for them (a std::function would copy it, allocating,
  // on every call).
  template <class Task>
  void run(int threads, const Task& task) {
    run_borrowed(threads, BorrowedTask{&task, [](const void* f, int t) { (*static_cast<const Task*>(f))(t); }});
  }

  // True on a pool worker, and on the calling thread while it runs its own share, so that
  // a parallel_for inside a parallel_for runs inline instead of waiting for itself.
  static bool& inside_task() {
    thread_local bool inside = false;
    return inside;
  }

 private:
  struct BorrowedTask {
    const void* object;
    void (*call)(const void* object, int index);
  };

  // About 10 microseconds of polling before a thread sleeps.
  static constexpr int kSpins = 4000;

  void run_borrowed(int threads, BorrowedTask task) {
    std::lock_guard<std::mutex> serial(run_mutex_);  // one parallel_for at a time per pool
    while (static_cast<int>(workers_.size()) < threads - 1) {
      const int index = static_cast<int>(workers_.size()) + 1;
      workers_.emplace_back([this, index] { work(index); });
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      task_ = task;
      participants_ = threads;
      error_ = nullptr;
      pending_.store(threads - 1, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    execute(0);
    for (int spin = 0; spin < kSpins && pending_.load(std::memory_order_acquire) != 0; ++spin) cpu_relax();
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return pending_.load(std::memory_order_acquire) == 0; });
    if (error_) std::rethrow_exception(error_);
  }

  void execute(int index) {
    inside_task() = true;
#if defined(__cpp_exceptions)
    try {
      task_.call(task_.object, index);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!error_) error_ = std::current_exception();
    }
#else
    task_.call(task_.object, index);  // without exceptions a failed check ends the program in the task
#endif
    inside_task() = false;
  }

  void work(int index) {
    uint64_t seen = 0;
    for (;;) {
      for (int spin = 0; spin < kSpins && generation_.load(std::memory_order_acquire) == seen; ++spin) cpu_relax();
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        seen = generation_.load(std::memory_order_acquire);
        if (stop_) return;
        if (index >= participants_) continue;
      }
      execute(index);
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lock(mutex_);  // the caller is either before its check or waiting
        done_.notify_one();
      }
    }
  }

  std::vector<std::thread> workers_;
  std::mutex run_mutex_, mutex_;
  std::condition_variable wake_, done_;
  BorrowedTask task_{};
  int participants_ = 0;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::exception_ptr error_;
  bool stop_ = false;
};

inline void apply_thread_count(int n) {
  Eigen::setNbThreads(1);
#if defined(R1_USE_OPENBLAS)
  openblas_set_num_threads(n);
#else
  (void)n;
#endif
}

inline int& thread_count() {
  static int count = [] {
    const int n = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
    apply_thread_count(n);
    return n;
  }();
  return count;
}

}  // namespace detail

inline int num_threads() { return detail::thread_count(); }

inline void set_num_threads(int n) {
  R1_CHECK(n >= 1, "[set_num_threads] n is ", n, ", expected >= 1");
  detail::thread_count() = n;
  detail::apply_thread_count(n);
}

// The fewest items worth a thread when each costs about cost_per_item multiply-adds: 2^18
// of them, a few microseconds of work. A smaller chunk costs more to hand over than to run
// inline.
inline int64_t min_items_per_thread(int64_t cost_per_item) {
  return std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(cost_per_item, 1));
}

// Calls body(begin, end) on disjoint chunks that cover [0, n), one per thread. Chunks
// below min_chunk items are not worth a thread (see min_items_per_thread), so small n runs
// inline, as does a parallel_for called from inside another.
template <class Body>
void parallel_for(int64_t n, Body&& body, int64_t min_chunk = 1) {
  if (n <= 0) return;
  const int64_t threads = std::min<int64_t>(num_threads(), std::max<int64_t>(1, n / std::max<int64_t>(1, min_chunk)));
  if (threads <= 1 || detail::ThreadPool::inside_task()) {
    body(int64_t{0}, n);
    return;
  }
  detail::ThreadPool::instance().run(static_cast<int>(threads), [&](int t) {
    body(n * t / threads, n * (t + 1) / threads);
  });
}

}  // namespace r1
