// bench_cuda_ops: the GPU's RoPE, cross-entropy and sampling (r1/cuda/{rope,loss,generate}.cuh)
// in float, against the device-to-device cudaMemcpy bandwidth measured in the same run.
//
// What is measured (cudaEvents on r1's stream; warm-up, then best and median of the reps)
//   memcpy_d2d        cudaMemcpyAsync of 1 GiB: gbps = 2 * bytes / time (read + write)
//   rope              r1::forward, in place, on x [tokens, heads, 64] (contiguous) and on the
//                     q_pe slice of q [tokens, heads, 128 + 64] (strided rows):
//                     gbps = 2 * tokens * heads * 64 * 4 / time
//   cross_entropy     r1::forward + r1::backward at M rows, V = 129,280 (the forward includes
//                     the targets' round trip to the host for the range check and the loss
//                     copied back): gbps = 4 * M * V * 4 / time, the traffic a fused
//                     implementation cannot avoid (read logits, write log-probs, read them,
//                     write dlogits); the kernels move 5 * M * V * 4 (logits are read twice)
//   sample            one r1::sample call on a row of V = 129,280 (a blocking call: kernel
//                     launches, CUB's sort when top-k/top-p, the pick, the copy back):
//                     latency_us, beside the CPU's r1::sample on the same row (cpu_us)
//   efficiency = gbps / memcpy_d2d gbps.
//
// Output: one JSON object per line on stdout, e.g.
//   {"name":"memcpy_d2d","bytes":1073741824,"gbps":...}
//   {"name":"cross_entropy","rows":4096,"vocab":129280,"best_ms":...,"gbps":...,"efficiency":...}
//
// Usage: bench_cuda_ops [--quick]   (--quick: smaller shapes and fewer repetitions)
#include <r1/cuda/generate.cuh>
#include <r1/cuda/loss.cuh>
#include <r1/cuda/rope.cuh>

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace {

struct Stats {
  double best_ms = 0.0, median_ms = 0.0;
};

// Times fn (which launches on r1::cuda_stream()) with cudaEvents.
template <class F>
Stats time_events(F&& fn, int warmup, int reps) {
  cudaEvent_t start, stop;
  R1_CUDA_CHECK(cudaEventCreate(&start), "bench");
  R1_CUDA_CHECK(cudaEventCreate(&stop), "bench");
  for (int i = 0; i < warmup; ++i) fn();
  std::vector<double> ms;
  for (int i = 0; i < reps; ++i) {
    R1_CUDA_CHECK(cudaEventRecord(start, r1::cuda_stream()), "bench");
    fn();
    R1_CUDA_CHECK(cudaEventRecord(stop, r1::cuda_stream()), "bench");
    R1_CUDA_CHECK(cudaEventSynchronize(stop), "bench");
    float elapsed = 0.0f;
    R1_CUDA_CHECK(cudaEventElapsedTime(&elapsed, start, stop), "bench");
    ms.push_back(elapsed);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(ms.begin(), ms.end());
  return {ms.front(), ms[ms.size() / 2]};
}

template <class F>
double host_median_us(F&& fn, int reps) {
  std::vector<double> us;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    us.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(us.begin(), us.end());
  return us[us.size() / 2];
}

double gbps(double bytes, double ms) { return bytes / (ms * 1e-3) / 1e9; }

r1::Tensor<float, r1::Cuda> random_device(r1::Shape shape, uint64_t seed, double std) {
  r1::Tensor<float> host(shape);
  r1::Rng rng(seed);
  r1::fill_normal(host.view(), rng, 0.0, std);
  r1::Tensor<float, r1::Cuda> device(shape);
  r1::copy(host.view(), device.view());
  return device;
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) {
      quick = true;
    } else {
      std::fprintf(stderr, "usage: %s [--quick]\n", argv[0]);
      return 2;
    }
  }
  if (r1::cuda_device_count() == 0) {
    std::fprintf(stderr, "bench_cuda_ops: no CUDA device\n");
    return 77;
  }
  const int warmup = quick ? 1 : 3, reps = quick ? 3 : 10;
  cudaDeviceProp prop{};
  R1_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0), "bench");
  fmt::print("{{\"name\":\"device\",\"gpu\":\"{}\",\"sms\":{},\"memory_gib\":{:.1f}}}\n", prop.name, prop.multiProcessorCount,
             static_cast<double>(prop.totalGlobalMem) / (1 << 30));

  // The peer: device-to-device copy bandwidth.
  const std::size_t copy_bytes = quick ? (256u << 20) : (1u << 30);
  r1::Tensor<unsigned char, r1::Cuda> src(r1::Shape{static_cast<int64_t>(copy_bytes)}), dst(r1::Shape{static_cast<int64_t>(copy_bytes)});
  const Stats copy = time_events(
      [&] {
        R1_CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(), copy_bytes, cudaMemcpyDeviceToDevice, r1::cuda_stream()), "bench");
      },
      warmup, reps);
  const double peer = gbps(2.0 * static_cast<double>(copy_bytes), copy.best_ms);
  fmt::print("{{\"name\":\"memcpy_d2d\",\"bytes\":{},\"best_ms\":{:.4f},\"median_ms\":{:.4f},\"gbps\":{:.1f}}}\n", copy_bytes,
             copy.best_ms, copy.median_ms, peer);

  // RoPE at DeepSeek-V3's shape: 128 heads, rope dim 64, YaRN.
  {
    r1::RopeConfig config;
    config.dim = 64;
    config.factor = 40.0;
    const r1::Rope rope(config);
    const int64_t tokens = quick ? 512 : 4096, heads = 128;
    r1::Tensor<int32_t> positions(r1::Shape{tokens});
    for (int64_t t = 0; t < tokens; ++t) positions.data()[t] = static_cast<int32_t>(t);
    r1::Tensor<int32_t, r1::Cuda> positions_d(r1::Shape{tokens});
    r1::copy(positions.view(), positions_d.view());
    for (const int64_t width : {int64_t{64}, int64_t{128 + 64}}) {
      r1::Tensor<float, r1::Cuda> q = random_device(r1::Shape{tokens, heads, width}, 1, 1.0);
      const auto q_pe = q.view().slice(2, width - 64, width);
      const Stats s = time_events([&] { r1::forward(rope, q_pe, positions_d.view(), q_pe); }, warmup, reps);
      const double bytes = 2.0 * static_cast<double>(tokens * heads * 64) * sizeof(float);
      fmt::print("{{\"name\":\"rope\",\"tokens\":{},\"heads\":{},\"dim\":64,\"row_width\":{},\"best_ms\":{:.4f},"
                 "\"median_ms\":{:.4f},\"gbps\":{:.1f},\"efficiency\":{:.3f}}}\n",
                 tokens, heads, width, s.best_ms, s.median_ms, gbps(bytes, s.best_ms), gbps(bytes, s.best_ms) / peer);
    }
  }

  // Cross-entropy forward + backward at V3's vocabulary.
  const int64_t vocab = 129280;
  {
    const int64_t rows = quick ? 512 : 4096;
    const r1::Tensor<float, r1::Cuda> logits = random_device(r1::Shape{rows, vocab}, 2, 2.0);
    r1::Tensor<int32_t> targets(r1::Shape{rows});
    r1::Rng rng(3);
    for (int64_t n = 0; n < rows; ++n) targets.data()[n] = n % 10 == 0 ? -100 : static_cast<int32_t>(rng.next_u64() % vocab);
    r1::Tensor<int32_t, r1::Cuda> targets_d(r1::Shape{rows});
    r1::copy(targets.view(), targets_d.view());
    r1::CrossEntropyCache<float, r1::Cuda> cache;
    const r1::CrossEntropy loss;
    float value = 0.0f;
    const Stats s = time_events(
        [&] {
          value = r1::forward(loss, logits.view(), targets_d.view(), cache);
          r1::backward(loss, cache);
        },
        warmup, reps);
    const double bytes = 4.0 * static_cast<double>(rows * vocab) * sizeof(float);
    fmt::print("{{\"name\":\"cross_entropy\",\"rows\":{},\"vocab\":{},\"loss\":{:.4f},\"best_ms\":{:.4f},\"median_ms\":{:.4f},"
               "\"gbps\":{:.1f},\"kernel_gbps\":{:.1f},\"efficiency\":{:.3f}}}\n",
               rows, vocab, value, s.best_ms, s.median_ms, gbps(bytes, s.best_ms), gbps(bytes * 1.25, s.best_ms),
               gbps(bytes, s.best_ms) / peer);
  }

  // Sampling latency per row.
  {
    r1::Tensor<float> row(r1::Shape{vocab});
    r1::Rng fill(4);
    r1::fill_normal(row.view(), fill, 0.0, 3.0);
    r1::Tensor<float, r1::Cuda> row_d(r1::Shape{vocab});
    r1::copy(row.view(), row_d.view());
    const r1::View<const float, r1::Cuda> logits_d = row_d.view();
    const r1::View<const float> logits = row.view();
    struct Case {
      const char* label;
      r1::SamplingConfig config;
    };
    const std::vector<Case> cases = {{"greedy", {0.0, 0, 1.0}},     {"temperature", {0.7, 0, 1.0}},
                                     {"top_k_50", {1.0, 50, 1.0}},  {"top_p_0.9", {1.0, 0, 0.9}},
                                     {"top_k_50_top_p_0.9", {1.0, 50, 0.9}}};
    r1::CudaSamplerWorkspace workspace_d;
    r1::SamplerWorkspace workspace;
    r1::Rng rng(5);
    for (const Case& c : cases) {
      const Stats s = time_events([&] { r1::sample(logits_d, c.config, rng, workspace_d); }, warmup, reps * 5);
      const double cpu_us = host_median_us([&] { r1::sample(logits, c.config, rng, workspace); }, quick ? 3 : 10);
      fmt::print("{{\"name\":\"sample\",\"case\":\"{}\",\"vocab\":{},\"best_us\":{:.1f},\"latency_us\":{:.1f},\"cpu_us\":{:.1f}}}\n",
                 c.label, vocab, s.best_ms * 1e3, s.median_ms * 1e3, cpu_us);
    }
  }
  return 0;
}
