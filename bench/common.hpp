// bench/common.hpp: helpers shared by r1's benchmarks (not part of the installed library).
//
//   reexec_without_openblas_coretype(argv, keep)
//                              OpenBLAS builds: re-execute without OPENBLAS_CORETYPE.
//   keep_freed_memory()        mallopt so freed memory stays mapped (no first-touch page
//                              faults inside timed loops).
//   describe_backend()         backend, and OpenBLAS's core type and config, to stderr.
//   time_calls(fn, plan)       warm up, pick a repeat count from a time budget; returns
//   Stats                      the best and median seconds per call.
//   peak_fma_gflops(threads)   this machine's fp32 FMA peak from a register-only loop.
//   backend_name()             "openblas" in builds with R1_USE_OPENBLAS, "r1" where r1::gemm
//                              runs r1's AVX-512 SGEMM (simd.hpp), else "eigen".
//   machine_json()             {"name":"machine",...}: CPU model/family, logical CPUs, vector width.
//   CpuMonitor                 how much CPU other processes took during a measurement;
//   least_disturbed(fn)        reruns a measurement (twice at most) while others took > 10%.
//   warn_if_busy()             a stderr warning when other processes are using the CPUs.
//
// Output convention: stdout carries one JSON object per line and nothing else; progress
// and notes go to stderr, so `bench_x > results.jsonl` gives a clean file.
#pragma once

#include <r1/simd.hpp>

#include <malloc.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include <thread>

#if defined(R1_USE_OPENBLAS)
extern "C" char* openblas_get_corename(void);
extern "C" char* openblas_get_config(void);
#endif

namespace r1::bench {

// Widest SIMD vector the target has, in bytes: what the FMA peak loop uses.
#if defined(__AVX512F__)
inline constexpr int kVecBytes = 64;
#elif defined(__AVX__)
inline constexpr int kVecBytes = 32;
#else
inline constexpr int kVecBytes = 16;
#endif

inline const char* backend_name() {
#if defined(R1_USE_OPENBLAS)
  return "openblas";
#else
#if R1_SIMD_SGEMM
  return "r1";
#else
  return "eigen";
#endif
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

// One JSON line describing the host: VMs of the same name land on different CPUs
// (Zen 4 and Zen 5 EPYC have been seen), and the numbers only compare within one.
inline std::string machine_json() {
  std::string name = "unknown";
  int family = -1, model = -1;
  if (FILE* f = std::fopen("/proc/cpuinfo", "r")) {
    char line[512];
    while (std::fgets(line, sizeof line, f)) {
      const char* colon = std::strchr(line, ':');
      if (!colon) continue;
      const std::string key(line, static_cast<std::size_t>(colon - line));
      std::string value(colon + 1);
      while (!value.empty() && (value.back() == '\n' || value.back() == ' ')) value.pop_back();
      while (!value.empty() && value.front() == ' ') value.erase(value.begin());
      if (key.rfind("model name", 0) == 0 && name == "unknown") name = value;
      if (key.rfind("cpu family", 0) == 0 && family < 0) family = std::atoi(value.c_str());
      if (key.rfind("model\t", 0) == 0 && model < 0) model = std::atoi(value.c_str());
      if (family >= 0 && model >= 0 && name != "unknown") break;
    }
    std::fclose(f);
  }
  std::string escaped;
  for (char ch : name)
    if (ch != '"' && ch != '\\' && static_cast<unsigned char>(ch) >= 0x20) escaped += ch;
  char buf[640];
  std::snprintf(buf, sizeof buf,
                "{\"name\":\"machine\",\"cpu\":\"%s\",\"family\":%d,\"model\":%d,\"logical_cpus\":%ld,"
                "\"vector_bits\":%d}",
                escaped.c_str(), family, model, sysconf(_SC_NPROCESSORS_ONLN), kVecBytes * 8);
  return buf;
}

inline void describe_backend() {
#if defined(R1_USE_OPENBLAS)
  std::fprintf(stderr, "backend: openblas (EIGEN_USE_BLAS), core %s, config: %s\n", openblas_get_corename(),
               openblas_get_config());
#else
  std::fprintf(stderr, "backend: %s\n",
               R1_SIMD_SGEMM ? "r1 (r1's AVX-512 SGEMM from simd.hpp, r1's banded threads)"
                             : "eigen (Eigen's kernels, r1's banded threads)");
#endif
}

// How much CPU other processes (a build, another benchmark) took while a measurement ran:
// /proc/stat's busy time of all CPUs minus this process's own CPU time (its spinning
// worker threads included), as a fraction of all CPUs' time. Other load disturbs the
// timings, the 2-thread ones most. -1 when /proc/stat cannot be read.
class CpuMonitor {
 public:
  CpuMonitor() { start(); }
  void start() {
    ok_ = read_stat(busy0_, total0_);
    self0_ = self_seconds();
  }
  double others_fraction() const {
    unsigned long long busy1, total1;
    if (!ok_ || !read_stat(busy1, total1) || total1 <= total0_) return -1;
    const double tick = 1.0 / static_cast<double>(sysconf(_SC_CLK_TCK));
    const double others = static_cast<double>(busy1 - busy0_) * tick - (self_seconds() - self0_);
    return std::clamp(others / (static_cast<double>(total1 - total0_) * tick), 0.0, 1.0);
  }

 private:
  static bool read_stat(unsigned long long& busy, unsigned long long& total) {
    FILE* f = std::fopen("/proc/stat", "r");
    if (!f) return false;
    unsigned long long v[8] = {};  // user nice system idle iowait irq softirq steal
    const int n = std::fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3], &v[4],
                              &v[5], &v[6], &v[7]);
    std::fclose(f);
    if (n < 5) return false;
    total = 0;
    for (unsigned long long x : v) total += x;
    busy = total - v[3] - v[4];
    return true;
  }
  static double self_seconds() {
    rusage ru{};
    getrusage(RUSAGE_SELF, &ru);
    return static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
           1e-6 * static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
  }
  bool ok_ = false;
  unsigned long long busy0_ = 0, total0_ = 0;
  double self0_ = 0;
};

// Runs fn (a whole measurement) and, when other processes took more than 10% of the CPUs
// meanwhile, runs it again, twice at most; returns the least disturbed result and the
// fraction of the CPUs others took during it.
template <class F>
auto least_disturbed(F&& fn) -> std::pair<decltype(fn()), double> {
  std::pair<decltype(fn()), double> best{{}, 2.0};
  for (int attempt = 0; attempt < 3; ++attempt) {
    CpuMonitor monitor;
    auto result = fn();
    const double others = monitor.others_fraction();
    if (others < best.second) best = {std::move(result), others};
    if (others <= 0.1) break;
    std::fprintf(stderr, "  other processes took %.0f%% of the CPUs during this measurement%s\n", 100 * others,
                 attempt < 2 ? "; measuring again" : "");
  }
  return best;
}

// Watches the CPUs for 0.2 s while this process sleeps and warns if others are busy.
inline void warn_if_busy() {
  CpuMonitor monitor;
  usleep(200'000);
  const double busy = monitor.others_fraction();
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
// fp32 FMA peak: each thread runs a = a * m + c on kAcc independent accumulators of the
// widest vector the target has (512-bit with AVX-512, 256-bit with AVX, else 128-bit)
// that live in registers, so the loop is bound by FMA throughput, not latency (2 FMA
// pipes x 4 cycles latency needs >= 8 chains in flight; 12-16 leave headroom). With
// -march=native GCC contracts a * m + c on these vector types to one vfmadd...ps
// (check: objdump -d bench_gemm | grep 'vfmadd.*zmm').
//
// Zen 4 executes a 512-bit FMA as two 256-bit halves and Zen 5 (server parts) natively,
// so the 1-thread peak at the same clock is 32 vs 64 flops per cycle: about 117 vs
// 219-234 GFLOP/s on the VMs r1 is measured on. Which host a VM lands on varies, hence
// the measurement and the "machine" line.

inline constexpr int kLanes = kVecBytes / 4;
using f32xN = float __attribute__((vector_size(kVecBytes)));
// 16 chains with AVX-512 (32 vector registers); 12 without, which leaves m and c in
// registers among the 16 that AVX/AVX2 have (16 would spill to the stack).
inline constexpr int kAcc = kVecBytes == 64 ? 16 : 12;
inline constexpr double kFlopsPerIter = kAcc * kLanes * 2.0;

[[gnu::noinline]] inline float fma_chain(long iters, float seed) {
  f32xN acc[kAcc];
  for (int j = 0; j < kAcc; ++j)
    for (int l = 0; l < kLanes; ++l) acc[j][l] = seed + 0.001f * static_cast<float>(j * kLanes + l);
  f32xN m, c;
  for (int l = 0; l < kLanes; ++l) {
    m[l] = 0.999999f;  // a converges to c / (1 - m) = 1: no overflow, no denormals
    c[l] = 1e-6f;
  }
  for (long i = 0; i < iters; ++i) {
#pragma GCC unroll 16
    for (int j = 0; j < kAcc; ++j) acc[j] = acc[j] * m + c;
  }
  f32xN sum = acc[0];
  for (int j = 1; j < kAcc; ++j) sum += acc[j];
  float s = 0;
  for (int l = 0; l < kLanes; ++l) s += sum[l];
  return s;
}

// GFLOP/s of `threads` threads running fma_chain at once: best of `repeats` runs of
// about 50 ms each (at 117 GFLOP/s per thread).
inline double peak_fma_gflops(int threads, int repeats) {
  const long iters = 12'000'000L * 16 * 16 / (kLanes * kAcc);
  volatile float sink = 0;
  double best = 0;
  for (int r = 0; r < repeats + 1; ++r) {  // the first run warms up (thread start, clocks)
    const double t0 = now_seconds();
    std::vector<float> results(static_cast<std::size_t>(threads));
    std::vector<std::thread> runners;
    for (int t = 0; t < threads; ++t)
      runners.emplace_back([&, t] { results[t] = fma_chain(iters, 1.0f + 0.01f * static_cast<float>(t)); });
    for (std::thread& runner : runners) runner.join();
    for (float s : results) sink = sink + s;
    const double dt = now_seconds() - t0;
    if (r > 0) best = std::max(best, threads * iters * kFlopsPerIter / dt * 1e-9);
  }
  return best;
}

// "1,2" -> {1, 2}; empty when any entry is not a positive integer.
inline std::vector<int> parse_thread_list(const std::string& list) {
  std::vector<int> threads;
  std::size_t pos = 0;
  while (pos <= list.size()) {
    const std::size_t comma = std::min(list.find(',', pos), list.size());
    const int t = std::atoi(list.substr(pos, comma - pos).c_str());
    if (t < 1) return {};
    threads.push_back(t);
    pos = comma + 1;
  }
  return threads;
}

// What every benchmark does first: re-execute without OPENBLAS_CORETYPE (OpenBLAS builds,
// unless keep_coretype), keep freed memory mapped, describe the backend on stderr, print
// the machine line, and warn if the machine is busy.
inline void start(char** argv, bool keep_coretype) {
  reexec_without_openblas_coretype(argv, keep_coretype);
  keep_freed_memory();
  describe_backend();
  std::printf("%s\n", machine_json().c_str());
  std::fflush(stdout);
  warn_if_busy();
}

}  // namespace r1::bench
