// r1/cuda/mlp.cuh: MlpImpl<Cuda>, the SwiGLU feed-forward block on the GPU.
//
//   forward:   a = x W1^T,  b = x W3^T,  h = silu(a) * b,  y = h W2^T
//   backward:  dh = dy W2,  da = dh * b * silu'(a),  db = dh * silu(a),  dx = da W1 + db W3
//   silu(a) = a s,  s = sigmoid(a),  silu'(a) = s (1 + a (1 - s))
//
// Legend: M rows (tokens), D model dim, H hidden dim. The products are the Linear layers'
// (cuBLASLt through cuda_gemm, r1/cuda/linear.cuh); this file adds the elementwise SwiGLU
// kernels over [M, H], for T = float or r1::bf16 (fp32 arithmetic).
#pragma once

#include "tensor.cuh"
#include "../mlp.hpp"
#include "linear.cuh"

namespace r1 {

namespace dense_detail {

__device__ __forceinline__ float sigmoid(float a) { return 1.0f / (1.0f + expf(-a)); }

template <class T>
__global__ void swiglu_kernel(const T* a, const T* b, T* h, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float av = load(a[i]);
    h[i] = store<T>(av * sigmoid(av) * load(b[i]));
  }
}

template <class T>
__global__ void swiglu_backward_kernel(const T* a, const T* b, const T* dh, T* da, T* db, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float av = load(a[i]), dhv = load(dh[i]);
    const float s = sigmoid(av);
    da[i] = store<T>(dhv * load(b[i]) * s * (1.0f + av * (1.0f - s)));
    db[i] = store<T>(dhv * av * s);
  }
}

}  // namespace dense_detail

template <>
struct MlpImpl<Cuda> {
  // h = silu(a) * b, with a and b the gate and up projections' outputs.
  template <class T>
  static void gate(MlpCache<T, Cuda>& c) {
    const int64_t n = c.down.x.numel();
    if (n == 0) return;
    dense_detail::swiglu_kernel<<<cuda_blocks(n), 256, 0, cuda_stream()>>>(c.gate.y.data(), c.up.y.data(), c.down.x.data(), n);
    R1_CUDA_CHECK_LAUNCH("mlp.forward");
  }

  // dgate = dh * b * silu'(a), dup = dh * silu(a), with dh the down projection's dx.
  template <class T>
  static void gate_backward(MlpCache<T, Cuda>& c) {
    const int64_t n = c.down.x.numel();
    R1_CHECK(c.down.dx.numel() == n, "[mlp.backward] dh has shape ", c.down.dx.shape(), ", expected ", c.down.x.shape());
    if (n == 0) return;
    dense_detail::swiglu_backward_kernel<<<cuda_blocks(n), 256, 0, cuda_stream()>>>(
        c.gate.y.data(), c.up.y.data(), c.down.dx.data(), c.dgate.data(), c.dup.data(), n);
    R1_CUDA_CHECK_LAUNCH("mlp.backward");
  }

};

}  // namespace r1
