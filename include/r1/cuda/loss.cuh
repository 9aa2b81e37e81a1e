// r1/cuda/loss.cuh: LossImpl<Cuda>, log-softmax and token cross-entropy on the GPU, and the
// row-kernel helpers the other CUDA headers of this group (rope, grpo, generate) share.
//
//   log_softmax:   one CTA per row: an online (max, sum exp) reduction in the accumulation
//                  type (float for float, double for double), then y = (x - max) - log(sum)
//   cross_entropy: loss = -(1/C) sum over valid n of y[n, t[n]], summed in double by one
//                  CTA in a fixed order (no atomics: the same value on every run)
//                  dlogits[n,:] = (exp(y[n,:]) - onehot(t[n])) * dloss / C, 0 on ignored rows
//
// Legend: N rows (leading dims flattened), V vocabulary (the last dim, any size from 1),
// C valid targets. Targets are checked on the host (one copy of N ids back), so an
// out-of-range id throws the CPU's r1::error before any kernel runs. The formulas and the
// order of operations per element are the CPU's; only the order of the row sums differs,
// so results agree to a few ulp.
//
// Provides: LossImpl<Cuda> for LogSoftmax and CrossEntropy on Tensor<float|double, Cuda>;
// in r1::rows: row_layout (a device view's rows and row stride), block_reduce (a fixed-order
// shared-memory tree reduction), download/upload on r1's stream.
#pragma once

#include "tensor.cuh"
#include "../loss.hpp"

#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace r1 {

namespace rows {

// Rows, columns and row stride of a view under View::matrix()'s flattening rules (the last
// dim contiguous, leading dims laid out back to back). The host-side map only does index
// arithmetic; it never touches the device data.
struct RowLayout {
  int64_t rows = 0, cols = 0, stride = 0;
};

template <class T>
RowLayout row_layout(const View<T, Cuda>& v) {
  const auto m = View<T, Cpu>(v.data(), v.shape(), v.strides()).matrix();
  return {m.rows(), m.cols(), m.outerStride()};
}

// Accumulation type of the kernels: float storage accumulates in float (as the CPU's Eigen
// code does), double in double.
template <class T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

inline constexpr int kRowThreads = 512;

// Combines one value per thread of the block with `combine`, in a fixed tree order (so a
// given block size always gives the same result), and returns it to every thread. Every
// thread of the block must call it; kThreads must equal blockDim.x.
template <int kThreads, class V, class Combine>
__device__ V block_reduce(V value, Combine combine) {
  static_assert(kThreads > 0 && (kThreads & (kThreads - 1)) == 0, "block_reduce needs a power-of-two block");
  __shared__ alignas(V) unsigned char storage[kThreads * sizeof(V)];
  V* scratch = reinterpret_cast<V*>(storage);
  const int tid = static_cast<int>(threadIdx.x);
  scratch[tid] = value;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (tid < half) scratch[tid] = combine(scratch[tid], scratch[tid + half]);
    __syncthreads();
  }
  const V result = scratch[0];
  __syncthreads();  // the scratch may be reused by the next call
  return result;
}

struct Sum {
  template <class V>
  __device__ V operator()(V a, V b) const { return a + b; }
};

struct Min {
  template <class V>
  __device__ V operator()(V a, V b) const { return b < a ? b : a; }
};

struct Max {
  template <class V>
  __device__ V operator()(V a, V b) const { return a < b ? b : a; }
};

// Blocking copy of device results to the host, ordered after r1's work on this thread's stream.
inline void download(void* host, const void* device, std::size_t bytes, const char* op) {
  if (!bytes) return;
  R1_CUDA_CHECK(cudaMemcpyAsync(host, device, bytes, cudaMemcpyDeviceToHost, cuda_stream()), op);
  R1_CUDA_CHECK(cudaStreamSynchronize(cuda_stream()), op);
}

// Host data to the device on r1's stream; the host buffer may be reused once it returns
// (pageable memory is staged before the call returns).
inline void upload(void* device, const void* host, std::size_t bytes, const char* op) {
  if (bytes) R1_CUDA_CHECK(cudaMemcpyAsync(device, host, bytes, cudaMemcpyHostToDevice, cuda_stream()), op);
}

inline unsigned row_grid(int64_t rows, const char* op) {
  R1_CHECK(rows <= std::numeric_limits<int32_t>::max(), "[", op, "] ", rows, " rows exceed the grid limit");
  return static_cast<unsigned>(rows);
}

}  // namespace rows

namespace loss_kernels {

// Running maximum and sum of exp(x - max) of a set of values; an empty set has max -inf.
template <class A>
struct MaxSum {
  A max, sum;
};

template <class A>
__device__ MaxSum<A> combine_max_sum(MaxSum<A> a, MaxSum<A> b) {
  if (a.max < b.max) {
    const MaxSum<A> t = a;
    a = b;
    b = t;
  }
  if (b.max == -std::numeric_limits<A>::infinity()) return a;  // nothing (or only -inf) in b
  return {a.max, a.sum + b.sum * exp(b.max - a.max)};
}

struct CombineMaxSum {
  template <class A>
  __device__ MaxSum<A> operator()(MaxSum<A> a, MaxSum<A> b) const { return combine_max_sum(a, b); }
};

// y = (x - max) - log(sum), the CPU's order of operations.
template <class T>
__global__ void log_softmax_rows(const T* x, int64_t x_stride, T* y, int64_t y_stride, int64_t cols) {
  using A = rows::Acc<T>;
  const T* xr = x + static_cast<int64_t>(blockIdx.x) * x_stride;
  T* yr = y + static_cast<int64_t>(blockIdx.x) * y_stride;
  MaxSum<A> local{-std::numeric_limits<A>::infinity(), A(0)};
  for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) local = combine_max_sum(local, MaxSum<A>{static_cast<A>(xr[i]), A(1)});
  const MaxSum<A> row = rows::block_reduce<rows::kRowThreads>(local, CombineMaxSum{});
  const A log_sum = log(row.sum);
  for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) yr[i] = static_cast<T>((static_cast<A>(xr[i]) - row.max) - log_sum);
}

// dx = dy - exp(y) * sum(dy); dx may alias dy (each thread rereads only what it writes).
template <class T>
__global__ void log_softmax_backward_rows(const T* y, int64_t y_stride, const T* dy, int64_t dy_stride, T* dx,
                                          int64_t dx_stride, int64_t cols) {
  using A = rows::Acc<T>;
  const int64_t n = blockIdx.x;
  const T* yr = y + n * y_stride;
  const T* dyr = dy + n * dy_stride;
  T* dxr = dx + n * dx_stride;
  A local = 0;
  for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) local += static_cast<A>(dyr[i]);
  const A total = rows::block_reduce<rows::kRowThreads>(local, rows::Sum{});
  for (int64_t i = threadIdx.x; i < cols; i += blockDim.x)
    dxr[i] = static_cast<T>(static_cast<A>(dyr[i]) - exp(static_cast<A>(yr[i])) * total);
}

// *sum = -sum over valid rows of log_probs[n, t[n]], in double, one CTA.
template <class T>
__global__ void target_log_prob_sum(const T* log_probs, int64_t cols, const int32_t* targets, int64_t count,
                                    int32_t ignore_index, double* sum) {
  double local = 0.0;
  for (int64_t n = threadIdx.x; n < count; n += blockDim.x) {
    const int32_t t = targets[n];
    if (t != ignore_index) local -= static_cast<double>(log_probs[n * cols + t]);
  }
  const double total = rows::block_reduce<rows::kRowThreads>(local, rows::Sum{});
  if (threadIdx.x == 0) *sum = total;
}

// dlogits = exp(log_probs) * scale, minus scale at the target; 0 on ignored rows.
template <class T>
__global__ void cross_entropy_backward_rows(const T* log_probs, const int32_t* targets, int32_t ignore_index, T scale,
                                            T* dlogits, int64_t cols) {
  const int64_t n = blockIdx.x;
  const T* lp = log_probs + n * cols;
  T* dl = dlogits + n * cols;
  const int32_t t = targets[n];
  if (t == ignore_index) {
    for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) dl[i] = T(0);
    return;
  }
  for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) {
    T g = static_cast<T>(exp(static_cast<rows::Acc<T>>(lp[i]))) * scale;
    if (i == t) g -= scale;
    dl[i] = g;
  }
}

}  // namespace loss_kernels

template <>
struct LossImpl<Cuda> {
  template <class T>
  static void log_softmax(ConstView<T, Cuda> x, View<T, Cuda> y) {
    const rows::RowLayout in = rows::row_layout(x), out = rows::row_layout(y);
    if (in.rows == 0) return;
    loss_kernels::log_softmax_rows<T><<<rows::row_grid(in.rows, "log_softmax.forward"), rows::kRowThreads, 0, cuda_stream()>>>(
        x.data(), in.stride, y.data(), out.stride, in.cols);
    R1_CUDA_CHECK_LAUNCH("log_softmax.forward");
  }

  template <class T>
  static void log_softmax_backward(ConstView<T, Cuda> y, ConstView<T, Cuda> dy, View<T, Cuda> dx) {
    const rows::RowLayout ly = rows::row_layout(y), ldy = rows::row_layout(dy), ldx = rows::row_layout(dx);
    if (ly.rows == 0) return;
    loss_kernels::log_softmax_backward_rows<T>
        <<<rows::row_grid(ly.rows, "log_softmax.backward"), rows::kRowThreads, 0, cuda_stream()>>>(
            y.data(), ly.stride, dy.data(), ldy.stride, dx.data(), ldx.stride, ly.cols);
    R1_CUDA_CHECK_LAUNCH("log_softmax.backward");
  }

  // The ids come back to the host (N * 4 bytes) and go through the CPU's check.
  static int64_t count_valid_targets(const CrossEntropy& loss, ConstView<int32_t, Cuda> targets, int64_t vocab) {
    std::vector<int32_t> host(static_cast<std::size_t>(targets.numel()));
    rows::download(host.data(), targets.data(), host.size() * sizeof(int32_t), "cross_entropy.forward");
    return detail::count_valid_targets(loss, host.data(), targets.numel(), vocab);
  }

  template <class T>
  static T cross_entropy(CrossEntropyCache<T, Cuda>& c, const CrossEntropy& loss) {
    if (!c.valid) return T(0);
    const int64_t vocab = c.log_probs.size(c.log_probs.rank() - 1);
    c.loss_sum.resize(Shape{1});
    loss_kernels::target_log_prob_sum<T><<<1, rows::kRowThreads, 0, cuda_stream()>>>(
        c.log_probs.data(), vocab, c.targets.data(), c.targets.numel(), loss.ignore_index, c.loss_sum.data());
    R1_CUDA_CHECK_LAUNCH("cross_entropy.forward");
    double total = 0.0;
    rows::download(&total, c.loss_sum.data(), sizeof(double), "cross_entropy.forward");
    return static_cast<T>(total / static_cast<double>(c.valid));
  }

  template <class T>
  static void cross_entropy_backward(CrossEntropyCache<T, Cuda>& c, const CrossEntropy& loss, T dloss) {
    const int64_t vocab = c.log_probs.size(c.log_probs.rank() - 1), count = c.targets.numel();
    if (count == 0) return;
    const T scale = c.valid ? dloss / static_cast<T>(c.valid) : T(0);
    loss_kernels::cross_entropy_backward_rows<T>
        <<<rows::row_grid(count, "cross_entropy.backward"), rows::kRowThreads, 0, cuda_stream()>>>(
            c.log_probs.data(), c.targets.data(), loss.ignore_index, scale, c.dlogits.data(), vocab);
    R1_CUDA_CHECK_LAUNCH("cross_entropy.backward");
  }
};

}  // namespace r1
