// bench_gemm: GFLOP/s of r1::Linear's GEMMs in float, against this machine's measured
// fp32 FMA peak.
//
// What is measured
//   For x[M,K] and W[N,K] (no bias), through the public API with a reused cache and
//   gradient buffer, so after the warm-up call nothing is allocated:
//     linear_forward   r1::forward(lin, x, cache)           y = x W^T          2*M*K*N flops
//     linear_backward  r1::backward(lin, cache, dy, grads)  dx = dy W,
//                                                           dW += dy^T x       4*M*K*N flops
//   forward also copies x into the cache (backward needs it); that copy is counted in
//   the time. Shapes: M in {1, 16, 128, 2048} tokens for (K=2048, N=1408), the MoE expert
//   projection, and (K=7168, N=2048), the model-dim projection; on 1 and 2 threads
//   (r1::set_num_threads, which sets Eigen's and OpenBLAS's thread counts).
//   peak_fma         a register-only loop of 16 independent 512-bit FMA chains per thread
//                    (OpenMP for 2 threads): the machine's fp32 ceiling, measured here
//                    rather than assumed, since the clock of this VM varies.
//
// How to read it
//   stdout has one JSON object per line and nothing else (notes go to stderr):
//     {"name":"peak_fma","threads":1,"gflops":218.7}
//     {"name":"linear_forward","backend":"eigen","shape":{"M":128,"K":2048,"N":1408},
//      "threads":1,"gflops":...,"median_gflops":...,"efficiency":0.61,"best_ms":...,
//      "repeats":...}
//   gflops is the best repeat, median_gflops the median one; efficiency = gflops / the
//   peak_fma of the same thread count. A repeat runs the call back to back until it
//   takes >= 2 ms (so M=1 times average a few calls); repeats are sized to a time budget
//   per measurement (>= 3 repeats, so the largest shapes take a few seconds on 1 thread).
//   - M >= 128 is compute-bound: compare efficiency between backends and thread counts.
//   - M = 1 (and 16) are bound by memory bandwidth, reading W once per call: GB/s is
//     about gflops * 2 (forward, 4 bytes per 2 flops) and the number depends on whether W
//     fits in cache (K=2048: 11.5 MB does; K=7168: 58.7 MB streams from DRAM). Here
//     efficiency against the FMA peak is expected to be low and is not a defect.
//   - Two threads scale erratically on small shared VMs: trust best-of-N, and compare
//     runs made back to back, alternating backends.
//   backend is "openblas" in builds with -DR1_USE_OPENBLAS=ON (Eigen forwards its GEMM and
//   GEMV to OpenBLAS, EIGEN_USE_BLAS), else "eigen". If OPENBLAS_CORETYPE is set, an
//   OpenBLAS build re-executes itself without it (OpenBLAS reads it at load time and a
//   forced older core type halves SGEMM speed); --keep-coretype measures with it.
//
// Usage: bench_gemm [--quick] [--threads 1,2] [--keep-coretype]
//   --quick        smaller time budget per measurement (about 4x faster, noisier)
//   --threads L    comma-separated thread counts (default 1,2)
#include "common.hpp"

#include <r1/linear.hpp>
#include <r1/parallel.hpp>

#include <fmt/format.h>

#include <cstdio>
#include <string>
#include <string_view>
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
      o.threads.clear();
      std::string list = argv[++i];
      std::size_t pos = 0;
      while (pos <= list.size()) {
        const std::size_t comma = std::min(list.find(',', pos), list.size());
        const int t = std::atoi(list.substr(pos, comma - pos).c_str());
        if (t < 1) usage(argv[0], 2);
        o.threads.push_back(t);
        pos = comma + 1;
      }
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

void emit(const char* name, const ShapeMKN& s, int threads, double flops, const r1::bench::Stats& st, double peak) {
  const double gflops = flops / st.best * 1e-9;
  const double median = flops / st.median * 1e-9;
  fmt::print(
      "{{\"name\":\"{}\",\"backend\":\"{}\",\"shape\":{{\"M\":{},\"K\":{},\"N\":{}}},\"threads\":{},"
      "\"gflops\":{:.1f},\"median_gflops\":{:.1f},\"efficiency\":{:.3f},\"best_ms\":{:.4f},\"repeats\":{}}}\n",
      name, r1::bench::backend_name(), s.M, s.K, s.N, threads, gflops, median, peak > 0 ? gflops / peak : 0.0,
      st.best * 1e3, st.repeats);
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  const Options opt = parse(argc, argv);
  r1::bench::reexec_without_openblas_coretype(argv, opt.keep_coretype);
  r1::bench::keep_freed_memory();
  r1::bench::describe_backend();
  r1::bench::warn_if_busy();

  std::vector<int> threads = opt.threads;
#if !defined(_OPENMP) && !defined(R1_USE_OPENBLAS)
  if (threads != std::vector<int>{1}) std::fprintf(stderr, "note: built without OpenMP; measuring 1 thread only\n");
  threads = {1};
#endif

  // Peaks first, before any OpenBLAS or Eigen worker thread exists to compete with them.
  std::vector<double> peak(threads.size());
  for (std::size_t i = 0; i < threads.size(); ++i) {
    peak[i] = r1::bench::peak_fma_gflops(threads[i], opt.quick ? 3 : 7);
    fmt::print("{{\"name\":\"peak_fma\",\"threads\":{},\"gflops\":{:.1f}}}\n", threads[i], peak[i]);
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
      const auto fwd = r1::bench::time_calls([&] { r1::forward(lin, x, cache); }, plan);
      emit("linear_forward", s, threads[i], flops, fwd, peak[i]);
      // backward reads the cache's copy of x, left there by the forward calls above.
      const auto bwd = r1::bench::time_calls([&] { r1::backward(lin, cache, dy, grads); }, plan);
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
