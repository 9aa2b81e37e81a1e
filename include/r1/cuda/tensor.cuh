// r1/cuda/tensor.cuh: device memory for r1::Tensor<T, r1::Cuda>, and host <-> device copies.
//
//   Tensor<float, Cuda> d(Shape{M, K});          cudaMalloc'd, zero-filled, 256-byte aligned
//   copy(host_view, d.view());  copy(d.view(), host_view);   blocking cudaMemcpy
//
// Include it from a .cu file compiled by nvcc in a build with -DR1_ENABLE_CUDA=ON. Device
// tensors have no element access or Eigen maps (those static_assert on Cpu); kernels take
// their data() pointers.
#pragma once

#include "../config.hpp"
#include "../tensor.hpp"

#include <cuda_runtime.h>

static_assert(R1_CUDA_ENABLED, "r1/cuda/*.cuh: compile this translation unit with nvcc in a build with -DR1_ENABLE_CUDA=ON");

// Turns a CUDA status into an r1::error naming the op and CUDA's own message.
#define R1_CUDA_CHECK(call, op)                                                                     \
  do {                                                                                              \
    const cudaError_t r1_status = (call);                                                           \
    R1_CHECK(r1_status == cudaSuccess, "[", op, "] ", #call, " failed: ", cudaGetErrorString(r1_status)); \
  } while (0)

namespace r1 {

template <>
struct Memory<Cuda> {
  static void* allocate(std::size_t bytes) {
    void* p = nullptr;
    R1_CUDA_CHECK(cudaMalloc(&p, bytes ? bytes : 1), "Tensor<Cuda>.allocate");
    return p;
  }
  static void deallocate(void* p) { cudaFree(p); }  // no throw from a destructor path
  static void copy(void* dst, const void* src, std::size_t bytes) {
    if (bytes) R1_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToDevice), "Tensor<Cuda>.copy");
  }
  static void zero(void* dst, std::size_t bytes) {
    if (bytes) R1_CUDA_CHECK(cudaMemset(dst, 0, bytes), "Tensor<Cuda>.zero");
  }
};

namespace detail {
template <class T, class SrcDev, class DstDev>
void copy_between(View<const T, SrcDev> src, View<T, DstDev> dst, cudaMemcpyKind kind, const char* op) {
  R1_CHECK(src.shape() == dst.shape(), "[", op, "] src has shape ", src.shape(), ", dst has ", dst.shape());
  R1_CHECK(src.is_contiguous() && dst.is_contiguous(), "[", op, "] needs contiguous views");
  const std::size_t bytes = static_cast<std::size_t>(src.numel()) * sizeof(T);
  if (bytes) R1_CUDA_CHECK(cudaMemcpy(dst.data(), src.data(), bytes, kind), op);
}
}  // namespace detail

template <class T>
void copy(ConstView<T, Cpu> src, View<T, Cuda> dst) {
  detail::copy_between(src, dst, cudaMemcpyHostToDevice, "copy.host_to_device");
}

template <class T>
void copy(ConstView<T, Cuda> src, View<T, Cpu> dst) {
  detail::copy_between(src, dst, cudaMemcpyDeviceToHost, "copy.device_to_host");
}

}  // namespace r1
