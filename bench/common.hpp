// bench/common.hpp: helpers shared by r1's benchmarks (not part of the installed library).
//
//   setup_process(argc, argv)  mallopt so freed memory stays mapped (no first-touch page
//                              faults inside timed loops) and, in OpenBLAS builds, the
//                              re-exec without OPENBLAS_CORETYPE.
//   time_samples(...)          warm up, pick a repeat count from a time budget, return
//                              per-call seconds of each repeat.
//   Stats                      best and median of those samples.
//   peak_fma_gflops(threads)   this machine's fp32 FMA peak from a register-only loop.
//   backend_name()             "openblas" in builds with R1_USE_OPENBLAS, else "eigen".
//   warn_if_busy()             a stderr warning when other processes are using the CPUs.
//
// Output convention: stdout carries one JSON object per line and nothing else; progress
// and notes go to stderr, so `bench_x > results.jsonl` gives a clean file.
#pragma once

#include <malloc.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(R1_USE_OPENBLAS)
extern "C" char* openblas_get_corename(void);
extern "C" char* openblas_get_config(void);
#endif

namespace r1::bench {

inline const char* backend_name() {
#if defined(R1_USE_OPENBLAS)
  return "openblas";
#else
  return "eigen";
#endif
}

inline double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// ---------------------------------------------------------------------------------------
// Process setup.

// OpenBLAS reads OPENBLAS_CORETYPE once, when the library is loaded (before main), and
// a forced core type such as Haswell halves its SGEMM speed on AVX-512 machines. Unsetting
// the variable in main is too late, so the benchmark re-executes itself without it.
// Returns only when no re-exec was needed (or it failed, after saying so).
inline void reexec_without_openblas_coretype([[maybe_unused]] char** argv, [[maybe_unused]] bool keep) {
#if defined(R1_USE_OPENBLAS)
  const char* coretype = std::getenv("OPENBLAS_CORETYPE");
  if (coretype == nullptr) return;
  if (keep) {
    std::fprintf(stderr, "note: keeping OPENBLAS_CORETYPE=%s (--keep-coretype): OpenBLAS runs its %s kernels\n",
                 coretype, coretype);
    return;
  }
  std::fprintf(stderr,
               "note: OPENBLAS_CORETYPE=%s is set; OpenBLAS reads it at load time and would use those "
               "kernels instead of autodetecting. Re-executing without it (pass --keep-coretype to keep it).\n",
               coretype);
  std::fflush(stderr);
  unsetenv("OPENBLAS_CORETYPE");
  execv("/proc/self/exe", argv);
  std::fprintf(stderr, "warning: re-exec failed (%s); continuing with the forced core type\n", std::strerror(errno));
#endif
}

// mallopt: keep glibc from returning freed memory to the OS (large blocks would otherwise
// be mmap'ed and page-faulted in again on every call, about 13 us per 4 KiB page here).
inline void keep_freed_memory() {
  mallopt(M_MMAP_THRESHOLD, 1 << 30);
  mallopt(M_TRIM_THRESHOLD, INT_MAX);
}

inline void describe_backend() {
#if defined(R1_USE_OPENBLAS)
  std::fprintf(stderr, "backend: openblas (EIGEN_USE_BLAS), core %s, config: %s\n", openblas_get_corename(),
               openblas_get_config());
#else
  std::fprintf(stderr, "backend: eigen (Eigen's own kernels%s)\n",
#if defined(_OPENMP)
               ", OpenMP"
#else
               ", no OpenMP: 1 thread only"
#endif
  );
#endif
}

// Samples /proc/stat for 0.2 s while this process sleeps: whatever CPU time is used then
// belongs to other processes (a build, another benchmark), which disturb the timings, the
// 2-thread ones most. Returns that busy fraction of all CPUs, or -1 if unknown.
inline double others_cpu_fraction() {
  auto sample = [](unsigned long long& busy, unsigned long long& total) {
    FILE* f = std::fopen("/proc/stat", "r");
    if (!f) return false;
    unsigned long long v[8] = {};
    const int n = std::fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3], &v[4],
                              &v[5], &v[6], &v[7]);
    std::fclose(f);
    if (n < 5) return false;
    total = 0;
    for (unsigned long long x : v) total += x;
    busy = total - v[3] - v[4];  // minus idle and iowait
    return true;
  };
  unsigned long long b0, t0, b1, t1;
  if (!sample(b0, t0)) return -1;
  usleep(200'000);
  if (!sample(b1, t1) || t1 <= t0) return -1;
  return static_cast<double>(b1 - b0) / static_cast<double>(t1 - t0);
}

inline void warn_if_busy() {
  const double busy = others_cpu_fraction();
  if (busy > 0.1)
    std::fprintf(stderr, "warning: other processes are using %.0f%% of the CPUs; expect disturbed numbers\n",
                 100 * busy);
}

// ---------------------------------------------------------------------------------------
// Timing.

struct Stats {
  double best = 0;    // seconds per call, fastest repeat
  double median = 0;  // seconds per call, median repeat
  int repeats = 0;
  int calls_per_repeat = 0;
};

inline Stats summarize(std::vector<double> samples, int calls_per_repeat) {
  Stats s;
  std::sort(samples.begin(), samples.end());
  const std::size_t n = samples.size();
  s.best = samples.front();
  s.median = n % 2 ? samples[n / 2] : 0.5 * (samples[n / 2 - 1] + samples[n / 2]);
  s.repeats = static_cast<int>(n);
  s.calls_per_repeat = calls_per_repeat;
  return s;
}

struct TimingPlan {
  double budget_s = 0.3;     // time for the timed repeats of one measurement
  double min_repeat_s = 2e-3;  // a repeat runs the call enough times to take this long
  int min_repeats = 3;
  int max_repeats = 60;
};

// Runs fn once to warm up (allocations, page faults, caches), times a second call to size
// the measurement, then returns per-call seconds for each timed repeat.
template <class F>
Stats time_calls(F&& fn, const TimingPlan& plan) {
  fn();  // warm-up: the first call allocates and faults in the caches' buffers
  double t0 = now_seconds();
  fn();
  const double one = std::max(now_seconds() - t0, 1e-7);
  const int calls = std::max(1, static_cast<int>(std::ceil(plan.min_repeat_s / one)));
  const int repeats =
      std::clamp(static_cast<int>(plan.budget_s / (one * calls)), plan.min_repeats, plan.max_repeats);
  std::vector<double> samples;
  samples.reserve(repeats);
  for (int r = 0; r < repeats; ++r) {
    t0 = now_seconds();
    for (int c = 0; c < calls; ++c) fn();
    samples.push_back((now_seconds() - t0) / calls);
  }
  return summarize(std::move(samples), calls);
}

// ---------------------------------------------------------------------------------------
// fp32 FMA peak: each thread runs a = a * m + c on kAcc independent 512-bit accumulators
// that live in registers, so the loop is bound by FMA throughput, not latency (Zen 5:
// 2 FMA pipes x 4 cycles latency needs >= 8 chains in flight; 16 leaves headroom).
// With -march=native on an AVX-512 machine, GCC contracts a * m + c on these vector types
// to vfmadd...ps zmm (check: objdump -d bench_gemm | grep vfmadd.*zmm).

using f32x16 = float __attribute__((vector_size(64)));
inline constexpr int kAcc = 16;
inline constexpr double kFlopsPerIter = kAcc * 16 * 2.0;

[[gnu::noinline]] inline float fma_chain(long iters, float seed) {
  f32x16 acc[kAcc];
  for (int j = 0; j < kAcc; ++j)
    for (int l = 0; l < 16; ++l) acc[j][l] = seed + 0.001f * static_cast<float>(j * 16 + l);
  f32x16 m, c;
  for (int l = 0; l < 16; ++l) {
    m[l] = 0.999999f;
    c[l] = 1e-6f;
  }
  for (long i = 0; i < iters; ++i) {
#pragma GCC unroll 16
    for (int j = 0; j < kAcc; ++j) acc[j] = acc[j] * m + c;
  }
  f32x16 sum = acc[0];
  for (int j = 1; j < kAcc; ++j) sum += acc[j];
  float s = 0;
  for (int l = 0; l < 16; ++l) s += sum[l];
  return s;
}

// GFLOP/s of `threads` threads running fma_chain at once: best of `repeats` runs of
// about 50 ms each.
inline double peak_fma_gflops(int threads, int repeats) {
  const long iters = 20'000'000;
  volatile float sink = 0;
  double best = 0;
  for (int r = 0; r < repeats + 1; ++r) {  // the first run warms up (thread start, clocks)
    const double t0 = now_seconds();
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads)
    {
      const float s = fma_chain(iters, 1.0f + 0.01f * static_cast<float>(omp_get_thread_num()));
#pragma omp critical
      sink = sink + s;
    }
    const int ran = threads;
#else
    sink = sink + fma_chain(iters, 1.0f);
    const int ran = 1;
#endif
    const double dt = now_seconds() - t0;
    if (r > 0) best = std::max(best, ran * iters * kFlopsPerIter / dt * 1e-9);
  }
  return best;
}

}  // namespace r1::bench
