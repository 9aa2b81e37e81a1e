// bench_cuda_gemm: TFLOPS of r1::cuda_gemm (cuBLASLt, r1/cuda/linear.cuh) and of
// r1::Linear on the GPU, in bf16 and fp32, on DeepSeek-V3's projection shapes.
//
// What is measured
//   cuda_gemm         y[M,N] = x[M,K] W[N,K]^T through r1::cuda_gemm: 2*M*K*N flops. The
//                     plan (cuBLASLt's first heuristic algorithm) is cached after the
//                     warm-up, so a call is one map lookup and one cublasLtMatmul.
//   peer              in the same run, the same descriptors with each of cuBLASLt's top 8
//                     heuristic algorithms timed and the fastest kept ("autotuned"): how
//                     much r1's first-choice plan and its per-call overhead leave behind.
//   linear_train      r1::forward + r1::backward of a Linear without bias (y = x W^T,
//                     dx = dy W, dW += dy^T x): 6*M*K*N flops, with reused caches.
//   Shapes (K, N): (7168, 2112) q_a_proj + kv_a_proj_with_mqa, (1536, 24576) q_b_proj,
//   (7168, 4096) a 4096-wide model-dim projection, (2048, 7168) an expert's down_proj;
//   M in {64, 256, 1024, 4096} tokens. Inputs are uniform in [-0.5, 0.5), filled on the GPU.
//
// How to read it
//   stdout has one JSON object per line (notes go to stderr):
//     {"name":"device","gpu":"NVIDIA H100 80GB HBM3","sm":"9.0","sms":132,"peak_bf16_tflops":989.0}
//     {"name":"cuda_gemm","dtype":"bf16","shape":{"M":4096,"K":7168,"N":2112},"tflops":...,
//      "median_tflops":...,"efficiency":...,"best_us":...,"peer_tflops":...,"vs_peer":...,"peer_algo":...}
//   tflops is the best repeat, median_tflops the median one; efficiency = tflops / 989, the
//   H100 SXM dense bf16 tensor-core peak, for both dtypes (fp32 runs on the CUDA cores,
//   whose fp32 peak is 67 TFLOPS: efficiency_fp32_peak is tflops / 67). vs_peer = tflops /
//   peer_tflops (1.0 = the heuristic's first pick was the fastest); peer_algo is the rank
//   of the fastest algorithm among cuBLASLt's heuristic results (0 = r1's own pick).
//   Small M is bound by reading W (K*N*2 bytes in bf16 at ~3.35 TB/s), not by the peak.
//   A repeat runs the call back to back for at least 1 ms, timed with cudaEvents; 15
//   repeats (5 with --quick) after 3 warm-up calls.
//
// Usage: bench_cuda_gemm [--quick] [--dtype bf16|fp32]
#include <r1/cuda/linear.cuh>

#include <fmt/format.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

namespace {

using r1::bf16;
using r1::Cuda;
using r1::Shape;
using r1::Tensor;

constexpr double kPeakBf16Tflops = 989.0;  // H100 SXM, dense bf16 tensor cores
constexpr double kPeakFp32Tflops = 67.0;   // H100 SXM, fp32 on the CUDA cores

struct Options {
  bool quick = false;
  std::vector<std::string> dtypes{"bf16", "fp32"};
};

[[noreturn]] void usage(const char* argv0, int code) {
  std::fprintf(stderr, "usage: %s [--quick] [--dtype bf16|fp32]\n", argv0);
  std::exit(code);
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (a == "--quick") {
      o.quick = true;
    } else if (a == "--dtype" && i + 1 < argc && (std::string_view(argv[i + 1]) == "bf16" || std::string_view(argv[i + 1]) == "fp32")) {
      o.dtypes = {argv[++i]};
    } else if (a == "--help" || a == "-h") {
      usage(argv[0], 0);
    } else {
      usage(argv[0], 2);
    }
  }
  return o;
}

// Uniform in [-0.5, 0.5) from a hash of the index: large tensors filled without the host.
template <class T>
__global__ void fill_kernel(T* data, int64_t n, uint32_t seed) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 0x9E3779B1u ^ seed;
    h ^= h >> 16;
    h *= 0x85EBCA6Bu;
    h ^= h >> 13;
    data[i] = r1::dense_detail::store<T>(static_cast<float>(h & 0xFFFFu) / 65536.0f - 0.5f);
  }
}

template <class T>
Tensor<T, Cuda> random_device(Shape shape, uint32_t seed) {
  Tensor<T, Cuda> t(shape);
  fill_kernel<<<r1::cuda_blocks(t.numel()), 256, 0, r1::cuda_stream()>>>(t.data(), t.numel(), seed);
  R1_CUDA_CHECK_LAUNCH("bench.fill");
  return t;
}

struct Stats {
  double best = 0, median = 0;  // seconds per call
};

class EventPair {
 public:
  EventPair() {
    R1_CUDA_CHECK(cudaEventCreate(&start_), "bench.event");
    R1_CUDA_CHECK(cudaEventCreate(&stop_), "bench.event");
  }
  ~EventPair() {
    cudaEventDestroy(start_);
    cudaEventDestroy(stop_);
  }
  EventPair(const EventPair&) = delete;
  EventPair& operator=(const EventPair&) = delete;

  // Seconds that `calls` back-to-back calls of fn take on the GPU.
  template <class F>
  double seconds(F&& fn, int calls) {
    R1_CUDA_CHECK(cudaEventRecord(start_, r1::cuda_stream()), "bench.event");
    for (int c = 0; c < calls; ++c) fn();
    R1_CUDA_CHECK(cudaEventRecord(stop_, r1::cuda_stream()), "bench.event");
    R1_CUDA_CHECK(cudaEventSynchronize(stop_), "bench.event");
    float ms = 0;
    R1_CUDA_CHECK(cudaEventElapsedTime(&ms, start_, stop_), "bench.event");
    return 1e-3 * ms;
  }

 private:
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
};

template <class F>
Stats time_gpu(F&& fn, bool quick) {
  EventPair events;
  for (int w = 0; w < 3; ++w) fn();
  const double one = std::max(events.seconds(fn, 1), 1e-7);
  const int calls = std::clamp(static_cast<int>(1e-3 / one) + 1, 1, 1000);
  std::vector<double> samples;
  for (int r = 0; r < (quick ? 5 : 15); ++r) samples.push_back(events.seconds(fn, calls) / calls);
  std::sort(samples.begin(), samples.end());
  const std::size_t n = samples.size();
  return Stats{samples.front(), n % 2 ? samples[n / 2] : 0.5 * (samples[n / 2 - 1] + samples[n / 2])};
}

// The fastest of cuBLASLt's top heuristic algorithms for r1's own descriptors of y = x W^T.
template <class T>
std::pair<double, int> autotuned_peer(const Tensor<T, Cuda>& x, const Tensor<T, Cuda>& w, Tensor<T, Cuda>& y, bool quick) {
  using namespace r1::dense_detail;
  const DeviceMatrix xm = device_matrix<T>(x, "bench", "x"), wm = device_matrix<T>(w, "bench", "w"),
                     ym = device_matrix<T>(y, "bench", "y");
  const GemmPlan& plan = gemm_plan<T>(xm, false, wm, true, ym, false, xm.cols);
  cublasLtMatmulPreference_t preference = nullptr;
  R1_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&preference), "bench.peer");
  const uint64_t workspace_bytes = kGemmWorkspaceBytes;
  R1_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                       &workspace_bytes, sizeof(workspace_bytes)),
                  "bench.peer");
  cublasLtMatmulHeuristicResult_t results[8] = {};
  int count = 0;
  R1_CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(cublaslt().handle(), plan.matmul, plan.a, plan.b, plan.c, plan.c, preference,
                                                 8, results, &count),
                  "bench.peer");
  cublasLtMatmulPreferenceDestroy(preference);
  Tensor<uint8_t, Cuda> workspace(Shape{static_cast<int64_t>(workspace_bytes)});
  const float alpha = 1.0f, beta = 0.0f;
  double best = 1e30;
  int best_rank = -1;
  for (int i = 0; i < count; ++i) {
    if (results[i].state != CUBLAS_STATUS_SUCCESS) continue;
    const Stats s = time_gpu([&] {
      R1_CUBLAS_CHECK(cublasLtMatmul(cublaslt().handle(), plan.matmul, &alpha, w.data(), plan.a, x.data(), plan.b, &beta,
                                     y.data(), plan.c, y.data(), plan.c, &results[i].algo, workspace.data(),
                                     workspace_bytes, r1::cuda_stream()),
                      "bench.peer");
    }, quick);
    if (s.best < best) {
      best = s.best;
      best_rank = i;
    }
  }
  return {best, best_rank};
}

std::string shape_json(int64_t m, int64_t k, int64_t n) { return fmt::format("{{\"M\":{},\"K\":{},\"N\":{}}}", m, k, n); }

template <class T>
void run(const char* dtype, bool quick) {
  const std::pair<int64_t, int64_t> shapes[] = {{7168, 2112}, {1536, 24576}, {7168, 4096}, {2048, 7168}};
  for (const auto& [k, n] : shapes) {
    const Tensor<T, Cuda> w = random_device<T>(Shape{n, k}, 1);
    for (int64_t m : {64, 256, 1024, 4096}) {
      std::fprintf(stderr, "%s M=%ld K=%ld N=%ld ...\n", dtype, static_cast<long>(m), static_cast<long>(k),
                   static_cast<long>(n));
      const Tensor<T, Cuda> x = random_device<T>(Shape{m, k}, 2);
      Tensor<T, Cuda> y(Shape{m, n});
      const double gemm_flops = 2.0 * static_cast<double>(m) * static_cast<double>(k) * static_cast<double>(n);

      const Stats gemm = time_gpu([&] { r1::cuda_gemm<T>(x, w, y, {.transpose_b = true}); }, quick);
      const auto [peer_seconds, peer_rank] = autotuned_peer(x, w, y, quick);
      const double tflops = gemm_flops / gemm.best * 1e-12;
      const double peer_tflops = gemm_flops / peer_seconds * 1e-12;
      fmt::print("{{\"name\":\"cuda_gemm\",\"dtype\":\"{}\",\"shape\":{},\"tflops\":{:.1f},\"median_tflops\":{:.1f},"
                 "\"efficiency\":{:.3f},\"efficiency_fp32_peak\":{},\"best_us\":{:.1f},\"peer\":\"cublaslt_autotuned\","
                 "\"peer_tflops\":{:.1f},\"vs_peer\":{:.3f},\"peer_algo\":{}}}\n",
                 dtype, shape_json(m, k, n), tflops, gemm_flops / gemm.median * 1e-12, tflops / kPeakBf16Tflops,
                 std::is_same_v<T, float> ? fmt::format("{:.3f}", tflops / kPeakFp32Tflops) : std::string("null"),
                 gemm.best * 1e6, peer_tflops, tflops / peer_tflops, peer_rank);

      r1::Linear<T, Cuda> linear(k, n);
      r1::copy(w.view(), linear.weight.view());
      r1::Linear<T, Cuda> grads = r1::zeros_like(linear);
      r1::LinearCache<T, Cuda> cache;
      const Tensor<T, Cuda> dy = random_device<T>(Shape{m, n}, 3);
      const Stats train = time_gpu([&] {
        r1::forward(linear, x, cache);
        r1::backward(linear, cache, dy, grads);
      }, quick);
      const double train_tflops = 3.0 * gemm_flops / train.best * 1e-12;
      fmt::print("{{\"name\":\"linear_train\",\"dtype\":\"{}\",\"shape\":{},\"tflops\":{:.1f},\"median_tflops\":{:.1f},"
                 "\"efficiency\":{:.3f},\"best_us\":{:.1f}}}\n",
                 dtype, shape_json(m, k, n), train_tflops, 3.0 * gemm_flops / train.median * 1e-12,
                 train_tflops / kPeakBf16Tflops, train.best * 1e6);
      std::fflush(stdout);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  const Options options = parse(argc, argv);
  if (r1::cuda_device_count() == 0) {
    std::fprintf(stderr, "bench_cuda_gemm: no CUDA device to run on\n");
    return 77;
  }
  try {
    cudaDeviceProp prop{};
    R1_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0), "bench.device");
    fmt::print("{{\"name\":\"device\",\"gpu\":\"{}\",\"sm\":\"{}.{}\",\"sms\":{},\"peak_bf16_tflops\":{:.1f}}}\n", prop.name,
               prop.major, prop.minor, prop.multiProcessorCount, kPeakBf16Tflops);
    if (prop.major != 9) std::fprintf(stderr, "note: not a Hopper GPU; efficiency is against the H100 SXM peak\n");
    for (const std::string& dtype : options.dtypes) {
      if (dtype == "bf16") run<bf16>("bf16", options.quick);
      if (dtype == "fp32") run<float>("fp32", options.quick);
    }
  } catch (const r1::error& e) {
    std::fprintf(stderr, "bench_cuda_gemm: %s\n", e.what());
    return 1;
  }
  return 0;
}
