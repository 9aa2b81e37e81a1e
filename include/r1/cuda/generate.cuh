// r1/cuda/generate.cuh: SampleImpl<Cuda>, picking a token from a row of logits on the GPU
// with the CPU's rules and the CPU's random number.
//
// The CPU's sample (generate.hpp): greedy is the argmax (ties: the lower id); otherwise the
// candidates in order of decreasing logit (ties: the lower id), the first top_k of them,
// p_i = exp((z_i - max) / temperature), a top-p cut at the first n >= 1 whose mass reaches
// top_p * sum, and the first candidate whose cumulative p exceeds u * mass, u = rng.uniform().
// Here:
//   - u is drawn on the host by the same single rng.uniform() call (none when greedy); if
//     the logits hold a NaN, the Rng is restored and the CPU's error is thrown, so the
//     stream of numbers is the CPU's in every case.
//   - the order: with top_k or top_p, CUB's stable descending radix sort of (logit, id),
//     which gives the CPU's tie order; with neither, the vocabulary order, as the CPU.
//   - one CTA of kThreads does the rest in double: each thread owns a contiguous chunk of
//     the candidates, sums its p, a block scan gives every chunk its starting mass, and the
//     top-p cut and the pick are the smallest indices whose running mass crosses the
//     threshold (min-reductions, no atomics).
// The running masses are the CPU's sums in another association, so the pick can differ
// from the CPU's only when u * mass falls within a few ulp of a cumulative boundary
// (about 1e-15 of the draws); integer-valued masses (ties of equal logits) agree exactly.
//
// Legend: V vocabulary, k top_k, n candidates kept after the top-p cut.
//
// Provides: SampleImpl<Cuda> with its Workspace (r1::CudaSamplerWorkspace), used by
// r1::sample(View<const T, Cuda> logits, config, rng, workspace) for float and double.
#pragma once

#include "tensor.cuh"
#include "../generate.hpp"
#include "loss.cuh"  // r1::rows helpers

#include <cub/device/device_radix_sort.cuh>

#include <cmath>
#include <cstdint>
#include <limits>

namespace r1 {

// Device buffers of the CUDA sampler, reused from call to call.
struct CudaSamplerWorkspace {
  Tensor<int32_t, Cuda> ids;            // [2, V]: 0..V-1, then the ids in sorted order
  Tensor<unsigned char, Cuda> scratch;  // the sorted logits, then CUB's temporary storage
  Tensor<int64_t, Cuda> result;         // [2]: the token, the first NaN logit (-1: none)
};

namespace sample_kernels {

inline constexpr int kThreads = rows::kRowThreads;

struct PickArgs {
  int64_t vocab = 0, kept = 0;
  bool greedy = false;
  double temperature = 1.0, top_p = 1.0, uniform = 0.0;
};

// The largest value, ties to the lower index; index -1: no value yet.
struct ArgMax {
  double value;
  int64_t index;
};

struct CombineArgMax {
  __device__ ArgMax operator()(ArgMax a, ArgMax b) const {
    if (a.index < 0) return b;
    if (b.index < 0) return a;
    return b.value > a.value || (b.value == a.value && b.index < a.index) ? b : a;
  }
};

__global__ void iota(int32_t* ids, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    ids[i] = static_cast<int32_t>(i);
}

// One CTA. logits: the row as given (for the NaN check and greedy); values[0, kept): the
// candidates in the CPU's order, ids their token ids (nullptr: the index is the id).
// result[0] = the token, result[1] = the first NaN logit or -1.
template <class T>
__global__ void pick(const T* logits, const T* values, const int32_t* ids, PickArgs a, int64_t* result) {
  const int tid = static_cast<int>(threadIdx.x);
  int64_t first_nan = std::numeric_limits<int64_t>::max();
  ArgMax best{0.0, -1};
  for (int64_t i = tid; i < a.vocab; i += kThreads) {
    const double z = static_cast<double>(logits[i]);
    if (isnan(z) && first_nan == std::numeric_limits<int64_t>::max()) first_nan = i;
    if (best.index < 0 || z > best.value) best = {z, i};
  }
  first_nan = rows::block_reduce<kThreads>(first_nan, rows::Min{});
  if (a.greedy) {
    best = rows::block_reduce<kThreads>(best, CombineArgMax{});
    if (tid == 0) {
      result[0] = best.index;
      result[1] = first_nan == std::numeric_limits<int64_t>::max() ? -1 : first_nan;
    }
    return;
  }

  double max_logit = -std::numeric_limits<double>::infinity();
  for (int64_t i = tid; i < a.kept; i += kThreads) max_logit = rows::Max{}(max_logit, static_cast<double>(values[i]));
  max_logit = rows::block_reduce<kThreads>(max_logit, rows::Max{});
  const auto prob = [&](int64_t i) { return exp((static_cast<double>(values[i]) - max_logit) / a.temperature); };

  // This thread's chunk [begin, end) and the mass before it.
  const int64_t chunk = (a.kept + kThreads - 1) / kThreads;
  const int64_t begin = rows::Min{}(a.kept, tid * chunk), end = rows::Min{}(a.kept, begin + chunk);
  double chunk_mass = 0.0;
  for (int64_t i = begin; i < end; ++i) chunk_mass += prob(i);
  __shared__ double scan[kThreads];  // inclusive scan of the chunk masses (Hillis-Steele)
  scan[tid] = chunk_mass;
  __syncthreads();
  for (int offset = 1; offset < kThreads; offset *= 2) {
    const double add = tid >= offset ? scan[tid - offset] : 0.0;
    __syncthreads();
    scan[tid] += add;
    __syncthreads();
  }
  const double before = tid > 0 ? scan[tid - 1] : 0.0, total = scan[kThreads - 1];

  // The smallest index at which the running mass satisfies `crossed`, and that mass;
  // `limit` when none does.
  __shared__ double found_mass;
  const auto first_crossing = [&](int64_t limit, auto crossed) {
    int64_t index = limit;
    double mass = before;
    for (int64_t i = begin; i < rows::Min{}(end, limit); ++i) {
      mass += prob(i);
      if (crossed(mass)) {
        index = i;
        break;
      }
    }
    const int64_t first = rows::block_reduce<kThreads>(index, rows::Min{});
    if (first < limit && index == first) found_mass = mass;
    __syncthreads();
    return first;
  };

  int64_t kept = a.kept;
  double mass = total;
  if (a.top_p < 1.0) {
    const double threshold = a.top_p * total;
    const int64_t last = first_crossing(kept, [&](double m) { return m >= threshold; });
    if (last < kept) {
      kept = last + 1;
      mass = found_mass;
    }
  }
  const double target = a.uniform * mass;
  const int64_t chosen = first_crossing(kept - 1, [&](double m) { return m > target; });
  if (tid == 0) {
    result[0] = ids != nullptr ? ids[chosen] : chosen;
    result[1] = first_nan == std::numeric_limits<int64_t>::max() ? -1 : first_nan;
  }
}

}  // namespace sample_kernels

template <>
struct SampleImpl<Cuda> {
  using Workspace = CudaSamplerWorkspace;

  template <class T>
  static int32_t sample(View<const T, Cuda> logits, const SamplingConfig& config, Rng& rng, Workspace& w) {
    namespace k = sample_kernels;
    const int64_t vocab = logits.numel();
    const Rng::State saved = rng.state();
    k::PickArgs a;
    a.vocab = vocab;
    a.greedy = config.temperature == 0.0;
    a.kept = config.top_k > 0 ? std::min<int64_t>(config.top_k, vocab) : vocab;
    a.temperature = config.temperature;
    a.top_p = config.top_p;
    a.uniform = a.greedy ? 0.0 : rng.uniform();
    const bool sorted = !a.greedy && (a.kept < vocab || config.top_p < 1.0);

    w.result.resize(Shape{2});
    const T* values = logits.data();
    const int32_t* ids = nullptr;
    if (sorted) {
      w.ids.resize(Shape{2, vocab});
      int32_t* ids_in = w.ids.data();
      int32_t* ids_out = w.ids.data() + vocab;
      const int items = static_cast<int>(vocab);
      std::size_t temp_bytes = 0;
      R1_CUDA_CHECK(cub::DeviceRadixSort::SortPairsDescending(nullptr, temp_bytes, logits.data(), static_cast<T*>(nullptr),
                                                              ids_in, ids_out, items, 0, static_cast<int>(sizeof(T) * 8),
                                                              cuda_stream()),
                    "sample");
      const std::size_t keys_bytes = (static_cast<std::size_t>(vocab) * sizeof(T) + 255) / 256 * 256;
      w.scratch.resize(Shape{static_cast<int64_t>(keys_bytes + temp_bytes)});
      T* keys_out = reinterpret_cast<T*>(w.scratch.data());
      k::iota<<<cuda_blocks(vocab), 256, 0, cuda_stream()>>>(ids_in, vocab);
      R1_CUDA_CHECK_LAUNCH("sample");
      R1_CUDA_CHECK(cub::DeviceRadixSort::SortPairsDescending(w.scratch.data() + keys_bytes, temp_bytes, logits.data(),
                                                              keys_out, ids_in, ids_out, items, 0,
                                                              static_cast<int>(sizeof(T) * 8), cuda_stream()),
                    "sample");
      values = keys_out;
      ids = ids_out;
    }
    k::pick<T><<<1, k::kThreads, 0, cuda_stream()>>>(logits.data(), values, ids, a, w.result.data());
    R1_CUDA_CHECK_LAUNCH("sample");
    int64_t result[2] = {0, 0};
    rows::download(result, w.result.data(), sizeof(result), "sample");
    if (result[1] >= 0) {
      rng.restore(saved);  // the CPU checks before it draws
      R1_CHECK(false, "[sample] logit ", result[1], " is NaN");
    }
    return static_cast<int32_t>(result[0]);
  }
};

}  // namespace r1
