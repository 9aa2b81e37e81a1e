// r1/cuda/norm.cuh: RMSNormImpl<Cuda>, RMSNorm on the GPU.
//
//   forward:   r[m]  = 1 / sqrt(sum_d x[m,d]^2 / D + eps),  y[m,d] = x[m,d] r[m] w[d]
//   backward:  xh = x r,  g = dy w
//              dx[m,:] = r[m] (g[m,:] - xh[m,:] sum_d(g[m,d] xh[m,d]) / D)
//              dw += sum over m of dy xh
//
// Legend: M rows (leading dims flattened), D the normalized dim. T is float or r1::bf16;
// the arithmetic is fp32. One block per row does the row sums (dense_detail::block_sum,
// a fixed order). dw is a deterministic column sum: per-block partials, then one ordered
// pass per column (dense_detail::add_column_sums in r1/cuda/linear.cuh), no atomics.
#pragma once

#include "tensor.cuh"
#include "../norm.hpp"
#include "linear.cuh"

namespace r1 {

namespace dense_detail {

inline constexpr int kNormThreads = 256;

template <class T>
__global__ void rmsnorm_forward_kernel(const T* x, const T* weight, T* y, T* rstd, int64_t dim, float inv_dim, float eps) {
  const int64_t row = blockIdx.x;
  const T* x_row = x + row * dim;
  T* y_row = y + row * dim;
  float squares = 0.0f;
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
    const float v = load(x_row[d]);
    squares += v * v;
  }
  const float r = 1.0f / sqrtf(block_sum(squares) * inv_dim + eps);
  if (threadIdx.x == 0) rstd[row] = store<T>(r);
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) y_row[d] = store<T>(load(x_row[d]) * r * load(weight[d]));
}

// dy has row stride dy_ld; x and dx are contiguous.
template <class T>
__global__ void rmsnorm_backward_kernel(const T* x, const T* dy, int64_t dy_ld, const T* weight, const T* rstd, T* dx,
                                        int64_t dim, float inv_dim) {
  const int64_t row = blockIdx.x;
  const T* x_row = x + row * dim;
  const T* dy_row = dy + row * dy_ld;
  T* dx_row = dx + row * dim;
  const float r = load(rstd[row]);
  float dot = 0.0f;
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) dot += load(dy_row[d]) * load(weight[d]) * load(x_row[d]) * r;
  const float mean_dot = block_sum(dot) * inv_dim;
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
    const float xh = load(x_row[d]) * r;
    dx_row[d] = store<T>(r * (load(dy_row[d]) * load(weight[d]) - xh * mean_dot));
  }
}

// term(m, d) = dy[m, d] * x[m, d] * rstd[m], summed over m into dw.
template <class T>
struct NormWeightGradTerm {
  const T* x;
  const T* dy;
  int64_t dy_ld;
  const T* rstd;
  int64_t dim;
  __device__ float operator()(int64_t row, int64_t col) const {
    return load(dy[row * dy_ld + col]) * (load(x[row * dim + col]) * load(rstd[row]));
  }
};

}  // namespace dense_detail

template <>
struct RMSNormImpl<Cuda> {
  template <class T>
  static void forward(const RMSNorm<T, Cuda>& p, RMSNormCache<T, Cuda>& c) {
    const int64_t dim = p.dim(), rows = c.rstd.numel();
    if (rows == 0) return;
    R1_CHECK(rows <= 0x7fffffff, "[rmsnorm.forward] ", rows, " rows are too many for one grid");
    dense_detail::rmsnorm_forward_kernel<<<static_cast<unsigned>(rows), dense_detail::kNormThreads, 0, cuda_stream()>>>(
        c.x.data(), p.weight.data(), c.y.data(), c.rstd.data(), dim, 1.0f / static_cast<float>(dim),
        static_cast<float>(p.eps));
    R1_CUDA_CHECK_LAUNCH("rmsnorm.forward");
  }

  template <class T>
  static void backward(const RMSNorm<T, Cuda>& p, RMSNormCache<T, Cuda>& c, ConstView<T, Cuda> dy, RMSNorm<T, Cuda>& g) {
    const int64_t dim = p.dim(), rows = c.rstd.numel();
    if (rows == 0) return;
    const int64_t dy_ld = dense_detail::device_matrix<T>(dy, "rmsnorm.backward", "dy").ld;
    R1_CHECK(rows <= 0x7fffffff, "[rmsnorm.backward] ", rows, " rows are too many for one grid");
    dense_detail::rmsnorm_backward_kernel<<<static_cast<unsigned>(rows), dense_detail::kNormThreads, 0, cuda_stream()>>>(
        c.x.data(), dy.data(), dy_ld, p.weight.data(), c.rstd.data(), c.dx.data(), dim, 1.0f / static_cast<float>(dim));
    R1_CUDA_CHECK_LAUNCH("rmsnorm.backward");
    dense_detail::add_column_sums(dense_detail::NormWeightGradTerm<T>{c.x.data(), dy.data(), dy_ld, c.rstd.data(), dim}, rows,
                                  dim, g.weight.data(), "rmsnorm.backward");
  }
};

}  // namespace r1
