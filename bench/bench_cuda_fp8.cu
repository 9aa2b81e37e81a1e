// bench_cuda_fp8: the block-scaled FP8 GEMM of r1/cuda/fp8.cuh against cuBLASLt in bf16, on
// DeepSeek-V3's projection shapes (needs a GPU with FP8 tensor cores; built for sm_90a).
//
// What is measured, for each (N, K) in {(2112, 7168) q_a + kv_a, (24576, 1536) q_b,
// (32768, 512) kv_b, (7168, 16384) o_proj, (4096, 7168), (7168, 2048) expert down} and
// M in {64, 128, ..., 4096} tokens:
//   fp8        r1::fp8_gemm<Cuda>: e4m3 a[M,K] (1x128 tile scales) x e4m3 w[N,K] (128x128
//              block scales) -> bf16 y[M,N], fp32 accumulation with per-block promotion.
//   quantize   r1::quantize_fp8_tiles<Cuda> of float x[M,K]: what apply() adds per call.
//   bf16       cuBLASLt (r1::cuda_gemm<bf16>, CUBLAS_COMPUTE_32F): bf16 x[M,K] W[N,K]^T ->
//              bf16 y[M,N], the same shape in the same run.
//   tflops = 2 M N K / time; speedup = bf16 time / fp8 time (GEMM alone, and with quantize).
// Times are CUDA-event times of single calls on the benchmark's stream, after warm-up:
// best and median of --reps calls (default 20).
//
// Output: one JSON object per line on stdout (progress on stderr), e.g.
//   {"name":"device","gpu":"NVIDIA H100 80GB HBM3","sms":132,"cc":"9.0"}
//   {"name":"fp8_gemm","m":512,"n":2112,"k":7168,"fp8_us":...,"fp8_tflops":...,"bf16_us":...,
//    "bf16_tflops":...,"speedup":...,"quantize_us":...,"speedup_with_quantize":...}
//
// Usage: bench_cuda_fp8 [--quick] [--reps N]   (--quick: M in {64, 512, 4096}, 5 reps)
#include <r1/cuda/fp8.cuh>
#include <r1/cuda/linear.cuh>

#include <fmt/format.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <vector>

namespace {

using r1::bf16;
using r1::Cuda;
using r1::fp8_e4m3;
using r1::Shape;
using r1::Tensor;

struct Timing {
  double best_us, median_us;
};

// Warm-up (which also builds cuBLASLt's plan), then reps calls, each between two events.
template <class Fn>
Timing time_calls(Fn&& fn, int reps) {
  for (int i = 0; i < 3; ++i) fn();
  cudaEvent_t start, stop;
  R1_CUDA_CHECK(cudaEventCreate(&start), "bench");
  R1_CUDA_CHECK(cudaEventCreate(&stop), "bench");
  std::vector<double> us;
  for (int i = 0; i < reps; ++i) {
    R1_CUDA_CHECK(cudaEventRecord(start, r1::cuda_stream()), "bench");
    fn();
    R1_CUDA_CHECK(cudaEventRecord(stop, r1::cuda_stream()), "bench");
    R1_CUDA_CHECK(cudaEventSynchronize(stop), "bench");
    float ms = 0.0f;
    R1_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop), "bench");
    us.push_back(1e3 * ms);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(us.begin(), us.end());
  return Timing{us.front(), us[us.size() / 2]};
}

// Random host data without a normal sampler's cost on 100M-element weights.
template <class T, class Make>
Tensor<T, Cuda> device_tensor(Shape shape, uint64_t seed, Make make) {
  Tensor<T> host(shape);
  r1::Rng rng(seed);
  for (int64_t i = 0; i < host.numel(); ++i) host.data()[i] = make(rng.next_u64());
  Tensor<T, Cuda> device(shape);
  r1::copy(host.view(), device.view());
  return device;
}

fp8_e4m3 random_code(uint64_t bits) {
  const auto code = static_cast<uint8_t>(bits & 0xFF);
  return fp8_e4m3::from_bits((code & 0x7F) == 0x7F ? 0 : code);  // no NaNs
}

float random_value(uint64_t bits) { return static_cast<float>(static_cast<double>(bits >> 11) * 0x1p-53 * 2.0 - 1.0); }

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  int reps = 20;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--quick") {
      quick = true;
      reps = 5;
    } else if (arg == "--reps" && i + 1 < argc) {
      reps = std::max(1, std::atoi(argv[++i]));
    } else {
      std::fprintf(stderr, "usage: bench_cuda_fp8 [--quick] [--reps N]\n");
      return 2;
    }
  }
  if (r1::cuda_device_count() == 0) {
    std::fprintf(stderr, "bench_cuda_fp8: no CUDA device\n");
    return 1;
  }
  int device = 0;
  cudaDeviceProp prop{};
  R1_CUDA_CHECK(cudaGetDevice(&device), "bench");
  R1_CUDA_CHECK(cudaGetDeviceProperties(&prop, device), "bench");
  fmt::print("{{\"name\":\"device\",\"gpu\":\"{}\",\"sms\":{},\"cc\":\"{}.{}\"}}\n", prop.name, prop.multiProcessorCount,
             prop.major, prop.minor);
  std::fflush(stdout);

  const std::vector<std::pair<int64_t, int64_t>> shapes = {{2112, 7168}, {24576, 1536}, {32768, 512},
                                                           {7168, 16384}, {4096, 7168}, {7168, 2048}};
  const std::vector<int64_t> ms = quick ? std::vector<int64_t>{64, 512, 4096}
                                        : std::vector<int64_t>{64, 128, 256, 512, 1024, 2048, 4096};
  const int64_t max_m = ms.back();
  for (const auto& [n, k] : shapes) {
    std::fprintf(stderr, "N %lld, K %lld\n", static_cast<long long>(n), static_cast<long long>(k));
    const Shape w_shape{n, k};
    const auto w_codes = device_tensor<fp8_e4m3>(w_shape, 1, random_code);
    const auto w_scale = device_tensor<float>(r1::fp8_scale_shape(w_shape), 2, [](uint64_t) { return 1e-3f; });
    const auto w_bf16 = device_tensor<bf16>(w_shape, 3, [](uint64_t b) { return bf16::from_float(random_value(b)); });
    const auto x_all = device_tensor<float>(Shape{max_m, k}, 4, random_value);
    const auto x_bf16_all = device_tensor<bf16>(Shape{max_m, k}, 5, [](uint64_t b) { return bf16::from_float(random_value(b)); });
    Tensor<fp8_e4m3, Cuda> a_codes_all(Shape{max_m, k});
    Tensor<float, Cuda> a_scale_all(r1::fp8_tile_scale_shape(Shape{max_m, k}));
    Tensor<bf16, Cuda> y_all(Shape{max_m, n});
    for (const int64_t m : ms) {
      const auto x = x_all.view().slice(0, 0, m);
      const auto x_bf16 = x_bf16_all.view().slice(0, 0, m);
      const auto a_codes = a_codes_all.view().slice(0, 0, m);
      const auto a_scale = a_scale_all.view().slice(0, 0, m);
      const auto y = y_all.view().slice(0, 0, m);
      const Timing quantize = time_calls([&] { r1::quantize_fp8_tiles<Cuda>(x, a_codes, a_scale); }, reps);
      const Timing fp8 = time_calls([&] { r1::fp8_gemm<Cuda>(a_codes, a_scale, w_codes, w_scale, y); }, reps);
      const Timing bf16_time = time_calls([&] { r1::cuda_gemm<bf16>(x_bf16, w_bf16, y, {.transpose_b = true}); }, reps);
      const double flop = 2.0 * static_cast<double>(m) * n * k;
      const auto tflops = [&](double us) { return flop / (us * 1e-6) / 1e12; };
      fmt::print(
          "{{\"name\":\"fp8_gemm\",\"m\":{},\"n\":{},\"k\":{},\"fp8_us\":{:.2f},\"fp8_us_best\":{:.2f},"
          "\"fp8_tflops\":{:.1f},\"bf16_us\":{:.2f},\"bf16_us_best\":{:.2f},\"bf16_tflops\":{:.1f},\"speedup\":{:.3f},"
          "\"quantize_us\":{:.2f},\"speedup_with_quantize\":{:.3f}}}\n",
          m, n, k, fp8.median_us, fp8.best_us, tflops(fp8.median_us), bf16_time.median_us, bf16_time.best_us,
          tflops(bf16_time.median_us), bf16_time.median_us / fp8.median_us, quantize.median_us,
          bf16_time.median_us / (fp8.median_us + quantize.median_us));
      std::fflush(stdout);
    }
  }
  return 0;
}
