// r1/cuda/optim.cuh: OptimImpl<Cuda>, AdamW and gradient-norm clipping on device tensors.
//
//   adamw (step t, as OptimImpl<Cpu> and torch.optim.AdamW):
//       p <- p * (1 - lr wd)                        (decay_factor, 1 for undecayed entries)
//       m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2
//       p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
//   squared_norm   sum of g^2 in fp64, deterministic: per-block partial sums over a fixed
//                  grid, then one block adds the partials in a fixed order
//   scale          g <- g * factor
//
// Legend: n elements of one tensor. T is float or r1::bf16 (fp32 arithmetic, stored as T).
// AdamW, ParameterRegistry and clip_grad_norm in r1/optim.hpp are device-generic and call
// these; squared_norm waits for the stream to bring its one number back to the host.
#pragma once

#include "tensor.cuh"
#include "../optim.hpp"
#include "linear.cuh"

namespace r1 {

namespace dense_detail {

template <class T>
__global__ void adamw_kernel(T* p, const T* g, T* m, T* v, int64_t n, float decay, float beta1, float beta2,
                             float step_size, float inv_bias_correction2_sqrt, float eps) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float grad = load(g[i]);
    const float param = load(p[i]) * decay;
    const float m_new = beta1 * load(m[i]) + (1.0f - beta1) * grad;
    const float v_new = beta2 * load(v[i]) + (1.0f - beta2) * grad * grad;
    m[i] = store<T>(m_new);
    v[i] = store<T>(v_new);
    p[i] = store<T>(param - step_size * m_new / (sqrtf(v_new) * inv_bias_correction2_sqrt + eps));
  }
}

inline constexpr int kSquaredNormThreads = 256;
inline constexpr int64_t kMaxNormBlocks = 1024;

// Block b sums g^2 over elements b*threads + t, stepping by the whole grid; the grid size
// depends only on n, so the partials (and their sum) are the same on every run.
template <class T>
__global__ void squared_norm_partials_kernel(const T* g, int64_t n, double* partial) {
  double sum = 0.0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const double x = load(g[i]);
    sum += x * x;
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) partial[blockIdx.x] = sum;
}

// One block: partial[0..count) summed into *total.
__global__ void sum_partials_kernel(const double* partial, int64_t count, double* total) {
  double sum = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) sum += partial[i];
  sum = block_sum(sum);
  if (threadIdx.x == 0) *total = sum;
}

template <class T>
__global__ void scale_kernel(T* g, int64_t n, float factor) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    g[i] = store<T>(load(g[i]) * factor);
}

}  // namespace dense_detail

template <>
struct OptimImpl<Cuda> {
  template <class T>
  static void adamw(Tensor<T, Cuda>& p, const Tensor<T, Cuda>& g, Tensor<T, Cuda>& m, Tensor<T, Cuda>& v, double lr,
                    double decay_factor, const AdamWConfig& c, double bias_correction1, double bias_correction2_sqrt) {
    R1_CHECK(g.shape() == p.shape() && m.shape() == p.shape() && v.shape() == p.shape(), "[adamw.step] parameter has shape ",
             p.shape(), ", gradient ", g.shape(), ", moments ", m.shape(), " and ", v.shape());
    const int64_t n = p.numel();
    if (n == 0) return;
    dense_detail::adamw_kernel<<<cuda_blocks(n), 256, 0, cuda_stream()>>>(
        p.data(), g.data(), m.data(), v.data(), n, static_cast<float>(decay_factor), static_cast<float>(c.beta1),
        static_cast<float>(c.beta2), static_cast<float>(lr / bias_correction1), static_cast<float>(1.0 / bias_correction2_sqrt),
        static_cast<float>(c.eps));
    R1_CUDA_CHECK_LAUNCH("adamw.step");
  }

  template <class T>
  static double squared_norm(const Tensor<T, Cuda>& g) {
    const int64_t n = g.numel();
    if (n == 0) return 0.0;
    const int64_t blocks = std::min<int64_t>((n + dense_detail::kSquaredNormThreads - 1) / dense_detail::kSquaredNormThreads,
                                             dense_detail::kMaxNormBlocks);
    double* partial = dense_detail::scratch<double>(blocks + 1);  // the partials, then the total
    dense_detail::squared_norm_partials_kernel<<<static_cast<unsigned>(blocks), dense_detail::kSquaredNormThreads, 0,
                                                 cuda_stream()>>>(g.data(), n, partial);
    R1_CUDA_CHECK_LAUNCH("clip_grad_norm");
    dense_detail::sum_partials_kernel<<<1, dense_detail::kSquaredNormThreads, 0, cuda_stream()>>>(partial, blocks, partial + blocks);
    R1_CUDA_CHECK_LAUNCH("clip_grad_norm");
    double total = 0.0;
    R1_CUDA_CHECK(cudaMemcpyAsync(&total, partial + blocks, sizeof(double), cudaMemcpyDeviceToHost, cuda_stream()),
                  "clip_grad_norm");
    cuda_synchronize("clip_grad_norm");
    return total;
  }

  template <class T>
  static void scale(Tensor<T, Cuda>& g, double factor) {
    const int64_t n = g.numel();
    if (n == 0) return;
    dense_detail::scale_kernel<<<cuda_blocks(n), 256, 0, cuda_stream()>>>(g.data(), n, static_cast<float>(factor));
    R1_CUDA_CHECK_LAUNCH("clip_grad_norm");
  }
};

}  // namespace r1
