// r1/cuda/rope.cuh: RopeImpl<Cuda>, rotary position embedding (with YaRN) on the GPU.
//
//   angle[t,i] = pos[t] * inv_freq[i]                          (double, as the CPU)
//   c = T(cos(angle) * s),  sn = T(sign * sin(angle) * s)      (s: Rope::cos_sin_scale)
//   (u, v) -> (u c - v sn,  u sn + v c)                        (in T, as the CPU)
// sign = +1 for forward, -1 for backward (dx = dy rotated by -angle, times s).
//
// Legend: N tokens, H heads, d rope dim, i in [0, d/2) the pair index. Pairs are
// (x[2i], x[2i+1]) for RopeStyle::Interleaved and (x[i], x[i+d/2]) for RopeStyle::Half.
//
// One thread per (token, pair): it computes the angle's cos and sin once in double (the
// frequencies travel in the kernel's parameters, so nothing is uploaded per call) and
// rotates that pair in all H heads. Views may have a row stride (q_pe is a column slice of
// q) and y may be x (in place): each thread reads its two values before writing them.
//
// Provides: RopeImpl<Cuda>::rotate, which r1::forward / r1::backward(const Rope&, ...) call
// for Tensor<float|double, Cuda> views; d is limited to 2 * kMaxHalf = 512.
#pragma once

#include "tensor.cuh"
#include "../rope.hpp"
#include "loss.cuh"  // r1::rows helpers

#include <cstdint>

namespace r1 {

namespace rope_kernels {

inline constexpr int64_t kMaxHalf = 256;

struct Frequencies {
  double inv_freq[kMaxHalf];
};

template <class T>
__global__ void rotate_pairs(const T* x, int64_t x_stride, T* y, int64_t y_stride, const int32_t* positions, int64_t tokens,
                             int64_t heads, int64_t half, bool interleaved, Frequencies freqs, double scale, double sign) {
  const int64_t total = tokens * half;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = idx / half, i = idx % half;
    const double angle = static_cast<double>(positions[t]) * freqs.inv_freq[i];
    double sin_angle = 0.0, cos_angle = 0.0;
    sincos(angle, &sin_angle, &cos_angle);
    const T c = static_cast<T>(cos_angle * scale), sn = static_cast<T>(sign * sin_angle * scale);
    const int64_t a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t row = t * heads + h;
      const T u = x[row * x_stride + a], v = x[row * x_stride + b];
      y[row * y_stride + a] = u * c - v * sn;
      y[row * y_stride + b] = u * sn + v * c;
    }
  }
}

}  // namespace rope_kernels

template <>
struct RopeImpl<Cuda> {
  template <class T>
  static void rotate(const Rope& rope, View<const T, Cuda> x, View<const int32_t, Cuda> positions, View<T, Cuda> y,
                     double sign) {
    const char* op = sign > 0 ? "rope.forward" : "rope.backward";
    const int64_t half = rope.config.dim / 2;
    R1_CHECK(half <= rope_kernels::kMaxHalf, "[", op, "] rope dim ", rope.config.dim, " exceeds the CUDA limit ",
             2 * rope_kernels::kMaxHalf);
    const rows::RowLayout in = rows::row_layout(x), out = rows::row_layout(y);
    const int64_t tokens = positions.numel();
    if (tokens == 0 || in.rows == 0) return;
    rope_kernels::Frequencies freqs{};
    for (int64_t i = 0; i < half; ++i) freqs.inv_freq[i] = rope.inv_freq[static_cast<std::size_t>(i)];
    constexpr int threads = 256;
    rope_kernels::rotate_pairs<T><<<cuda_blocks(tokens * half, threads), threads, 0, cuda_stream()>>>(
        x.data(), in.stride, y.data(), out.stride, positions.data(), tokens, in.rows / tokens, half,
        rope.config.style == RopeStyle::Interleaved, freqs, rope.cos_sin_scale, sign);
    R1_CUDA_CHECK_LAUNCH(op);
  }
};

}  // namespace r1
