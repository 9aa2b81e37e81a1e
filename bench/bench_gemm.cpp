// bench_gemm: GFLOP/s of r1::Linear's GEMMs in float, against this machine's measured
// fp32 FMA peak.
//
// What is measured
//   For x[M,K] and W[N,K] (no bias), through the public API with a reused cache and
//   gradient buffer, so after the warm-up call nothing is allocated:
//     linear_forward   r1::forward(lin, x, cache)           y = x W^T          2*M*K*N flops
//     linear_backward  r1::backward(lin, cache, dy, grads)  dx = dy W,
//                                                           dW += dy^T x       4*M*K*N flops
//   forward also copies x into the cache (backward needs it); that copy is counted in the
//   time. Shapes: M in {1, 16, 128, 2048} tokens for (K=2048, N=1408), the MoE expert
//   projection, and (K=7168, N=2048), the model-dim projection; on 1 and 2 threads
//   (r1::set_num_threads, which sets Eigen's and OpenBLAS's thread counts).
//   peak_fma: a register-only loop of independent FMA chains (16 with 512-bit vectors,
//   12 with 256-bit) on each of 1 or 2 std::threads: the fp32 ceiling, measured
//   rather than assumed because VMs land on different hosts (Zen 4 EPYC double-pumps
//   512-bit FMAs: about 117 GFLOP/s per thread; Zen 5 EPYC: about 219-234).
//
// How to read it
//   stdout has one JSON object per line and nothing else (progress and notes go to stderr):
//     {"name":"machine","cpu":"AMD EPYC","family":25,"model":17,"logical_cpus":2,"vector_bits":512}
//     {"name":"peak_fma","threads":1,"gflops":117.3,"others_cpu":0.00}
//     {"name":"linear_forward","backend":"eigen","shape":{"M":128,"K":2048,"N":1408},"threads":1,
//      "gflops":72.0,"median_gflops":70.4,"efficiency":0.613,"best_ms":10.0,"repeats":28,"others_cpu":0.00}
//   gflops is the best repeat, median_gflops the median one; efficiency = gflops / the
//   peak_fma of the same thread count. A repeat runs the call back to back until it takes
//   >= 2 ms (so an M=1 repeat averages a few calls); the number of repeats fits a time
//   budget of 0.3 s per measurement, but is at least 3, so M=2048 takes a few seconds.
//   others_cpu is the fraction of all CPUs that other processes (a build, another
//   benchmark) took during the measurement; above 0.1 it is measured again, twice at
//   most, and the least disturbed attempt is kept. Anything but about 0 means disturbed.
//   - M >= 128 is compute-bound: compare efficiency across backends and thread counts.
//   - M = 1 is bound by memory bandwidth (it reads W once per call): forward GB/s is about
//     2 * gflops, and depends on whether W fits in the L3 cache (K=2048: 11.5 MB does;
//     K=7168: 58.7 MB streams from DRAM). A low efficiency there is expected.
//   - Two threads scale erratically on small shared VMs: trust best-of-N, and compare
//     backends by runs made back to back, alternating them.
//   backend is "openblas" in builds with -DR1_USE_OPENBLAS=ON (Eigen hands its GEMMs and
//   GEMVs to OpenBLAS: EIGEN_USE_BLAS), else "eigen". OpenBLAS reads OPENBLAS_CORETYPE
//   once, at load time, so if it is set an OpenBLAS build re-executes itself without it
//   and measures the kernels OpenBLAS picks itself. A forced core type can be much slower
//   (Haswell kernels halve SGEMM on Zen 5) or, on some hosts, faster (on Zen 4 they beat
//   the autodetected Cooperlake kernels); --keep-coretype measures with the variable set.
//
// Usage: bench_gemm [--quick] [--threads 1,2] [--keep-coretype]
//   --quick          smaller time budget per measurement (faster, noisier)
//   --threads L      comma-separated thread counts (default 1,2)
//   --keep-coretype  OpenBLAS builds: keep OPENBLAS_CORETYPE instead of re-executing
#include "common.hpp"

#include <r1/linear.hpp>
#include <r1/parallel.hpp>

#include <fmt/format.h>

#include <cstdio>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace {

struct Options {
  bool quick = false;
  bool keep_coretype = false;
  std::vector<int> threads{1, 2};
};

[[noreturn]] void usage(const char* argv0, int code) {
  std::fprintf(stderr, "usage: %s [--quick] [--threads 1,2] [--keep-coretype]\n", argv0);
  std::exit(code);
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (a == "--quick") {
      o.quick = true;
    } else if (a == "--keep-coretype") {
      o.keep_coretype = true;
    } else if (a == "--threads" && i + 1 < argc) {
      o.threads = r1::bench::parse_thread_list(argv[++i]);
      if (o.threads.empty()) usage(argv[0], 2);
    } else if (a == "--help" || a == "-h") {
      usage(argv[0], 0);
    } else {
      usage(argv[0], 2);
    }
  }
  return o;
}

struct ShapeMKN {
  int64_t M, K, N;
};

void emit(const char* name, const ShapeMKN& s, int threads, double flops, const std::pair<r1::bench::Stats, double>& m,
          double peak) {
  const auto& [st, others] = m;
  const double gflops = flops / st.best * 1e-9;
  const double median = flops / st.median * 1e-9;
  fmt::print(
      "{{\"name\":\"{}\",\"backend\":\"{}\",\"shape\":{{\"M\":{},\"K\":{},\"N\":{}}},\"threads\":{},"
      "\"gflops\":{:.1f},\"median_gflops\":{:.1f},\"efficiency\":{:.3f},\"best_ms\":{:.4f},\"repeats\":{},"
      "\"others_cpu\":{:.2f}}}\n",
      name, r1::bench::backend_name(), s.M, s.K, s.N, threads, gflops, median, peak > 0 ? gflops / peak : 0.0,
      st.best * 1e3, st.repeats, others);
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  const Options opt = parse(argc, argv);
  r1::bench::start(argv, opt.keep_coretype);

  const std::vector<int> threads = opt.threads;

  // Peaks first, before any OpenBLAS or Eigen worker thread exists to compete with them.
  std::vector<double> peak(threads.size());
  for (std::size_t i = 0; i < threads.size(); ++i) {
    const auto [gflops, others] =
        r1::bench::least_disturbed([&] { return r1::bench::peak_fma_gflops(threads[i], opt.quick ? 3 : 7); });
    peak[i] = gflops;
    fmt::print("{{\"name\":\"peak_fma\",\"threads\":{},\"gflops\":{:.1f},\"others_cpu\":{:.2f}}}\n", threads[i],
               peak[i], others);
    std::fflush(stdout);
  }

  r1::bench::TimingPlan plan;
  if (opt.quick) {
    plan.budget_s = 0.08;
    plan.min_repeats = 2;
  }

  const ShapeMKN shapes[] = {
      {1, 2048, 1408}, {16, 2048, 1408}, {128, 2048, 1408}, {2048, 2048, 1408},
      {1, 7168, 2048}, {16, 7168, 2048}, {128, 7168, 2048}, {2048, 7168, 2048},
  };
  for (const ShapeMKN& s : shapes) {
    r1::Rng rng(42);
    r1::Linear<float> lin(s.K, s.N);
    r1::fill_uniform(lin.weight.view(), rng, -0.05, 0.05);
    r1::Tensor<float> x(r1::Shape{s.M, s.K}), dy(r1::Shape{s.M, s.N});
    r1::fill_uniform(x.view(), rng, -1.0, 1.0);
    r1::fill_uniform(dy.view(), rng, -1.0, 1.0);
    r1::LinearCache<float> cache;
    r1::Linear<float> grads = r1::zeros_like(lin);
    const double flops = 2.0 * s.M * s.K * s.N;

    for (std::size_t i = 0; i < threads.size(); ++i) {
      r1::set_num_threads(threads[i]);
      std::fprintf(stderr, "M=%ld K=%ld N=%ld threads=%d ...\n", static_cast<long>(s.M), static_cast<long>(s.K),
                   static_cast<long>(s.N), threads[i]);
      const auto fwd = r1::bench::least_disturbed(
          [&] { return r1::bench::time_calls([&] { r1::forward(lin, x, cache); }, plan); });
      emit("linear_forward", s, threads[i], flops, fwd, peak[i]);
      // backward reads the cache's copy of x, left there by the forward calls above.
      const auto bwd = r1::bench::least_disturbed(
          [&] { return r1::bench::time_calls([&] { r1::backward(lin, cache, dy, grads); }, plan); });
      emit("linear_backward", s, threads[i], 2 * flops, bwd, peak[i]);
    }
  }
  // A busy machine (another build, another benchmark) shows up as a lower peak: measure
  // it again and say so, since the GEMM numbers above are then disturbed too.
  const double peak_after = r1::bench::peak_fma_gflops(threads[0], 3);
  if (peak_after < 0.9 * peak[0] || peak[0] < 0.9 * peak_after)
    std::fprintf(stderr, "warning: the %d-thread FMA peak moved from %.1f to %.1f GFLOP/s during the run: the machine "
                 "was busy or changed clocks; rerun before trusting these numbers\n", threads[0], peak[0], peak_after);
  return 0;
}
