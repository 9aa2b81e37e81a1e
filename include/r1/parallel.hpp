// r1/parallel.hpp: intra-op threading.
//
// r1::set_num_threads(n) sets how many threads every r1 op may use: r1's own loops
// (parallel_for), its GEMMs (r1::gemm in linear.hpp) and, in builds with
// R1_USE_OPENBLAS, OpenBLAS. Threads come from OpenMP when the translation unit is
// compiled with it (the r1::r1 target links OpenMP when CMake finds it); without OpenMP
// everything runs on the calling thread. The default is every hardware thread.
//
// r1 splits the work itself and sets Eigen's own thread count to 1 (Eigen::setNbThreads)
// on first use: Eigen's threaded GEMM re-blocks the inner dimension by thread count, so
// its sums would change with it.
//
// Determinism: parallel_for splits [0, n) into one contiguous chunk per thread and each
// index is computed by one thread with the same code, so elementwise and row-wise ops
// give bit-identical results for any thread count. Reductions across rows run in index
// order for the same reason.
#pragma once

#include "config.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <cstdint>
#include <thread>

#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(R1_USE_OPENBLAS)
extern "C" void openblas_set_num_threads(int num_threads);
#endif

namespace r1 {

namespace detail {
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

// Calls body(begin, end) on disjoint chunks that cover [0, n). Chunks below min_chunk
// items are not worth a thread, so small n runs inline.
template <class Body>
void parallel_for(int64_t n, Body&& body, int64_t min_chunk = 1) {
  if (n <= 0) return;
  const int64_t threads = std::min<int64_t>(num_threads(), std::max<int64_t>(1, n / std::max<int64_t>(1, min_chunk)));
  if (threads <= 1) {
    body(int64_t{0}, n);
    return;
  }
#if defined(_OPENMP)
#pragma omp parallel for schedule(static, 1) num_threads(static_cast<int>(threads))
#endif
  for (int64_t t = 0; t < threads; ++t) body(n * t / threads, n * (t + 1) / threads);
}

}  // namespace r1
