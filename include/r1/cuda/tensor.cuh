// r1/cuda/tensor.cuh: device memory for r1::Tensor<T, r1::Cuda>, copies, streams, and the
// error checks every CUDA header uses.
//
//   Tensor<float, Cuda> d(Shape{M, K});          cudaMalloc'd, zero-filled, 256-byte aligned
//   copy(host_view, d.view());  copy(d.view(), host_view);   blocking cudaMemcpy
//   copy(d.view(), other_device_view);                        device to device
//   copy_params(host_params, device_params);                  every tensor of a params struct
//   CudaStream s;  StreamScope scope(s);        r1's kernels on this thread launch on s
//   R1_CUDA_CHECK(cudaMalloc(...), "op");       a failed CUDA call throws r1::error naming op
//   R1_CUDA_CHECK_LAUNCH("op");                 after a <<<...>>> launch: bad configs throw
//
// Kernels run asynchronously on cuda_stream(); the blocking copies back to the host are
// where their results (and any asynchronous fault) surface, as in PyTorch.
//
// Include it from a .cu file compiled by nvcc in a build with -DR1_ENABLE_CUDA=ON. Device
// tensors have no element access or Eigen maps (those static_assert on Cpu); kernels take
// their data() pointers.
#pragma once

#include "../config.hpp"
#include "../tensor.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <string>
#include <type_traits>
#include <typeindex>
#include <typeinfo>
#include <utility>
#include <vector>

static_assert(R1_CUDA_ENABLED, "r1/cuda/*.cuh: compile this translation unit with nvcc in a build with -DR1_ENABLE_CUDA=ON");

// Turns a CUDA status into an r1::error naming the op and CUDA's own message.
#define R1_CUDA_CHECK(call, op)                                                                     \
  do {                                                                                              \
    const cudaError_t r1_status = (call);                                                           \
    R1_CHECK(r1_status == cudaSuccess, "[", op, "] ", #call, " failed: ", cudaGetErrorString(r1_status)); \
  } while (0)

// Launch errors (a bad grid, too much shared memory) are reported by cudaGetLastError.
#define R1_CUDA_CHECK_LAUNCH(op) R1_CUDA_CHECK(cudaGetLastError(), op)

namespace r1 {

namespace detail {
inline cudaStream_t& current_stream() {
  thread_local cudaStream_t stream = cudaStreamPerThread;
  return stream;
}
}  // namespace detail

// The stream r1's kernels on this thread launch on: CUDA's per-thread default stream unless
// a StreamScope says otherwise.
inline cudaStream_t cuda_stream() { return detail::current_stream(); }

// An owned, non-blocking stream.
class CudaStream {
 public:
  CudaStream() { R1_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "CudaStream"); }
  ~CudaStream() { cudaStreamDestroy(stream_); }
  CudaStream(const CudaStream&) = delete;
  CudaStream& operator=(const CudaStream&) = delete;
  cudaStream_t get() const { return stream_; }
  void synchronize() const { R1_CUDA_CHECK(cudaStreamSynchronize(stream_), "CudaStream.synchronize"); }

 private:
  cudaStream_t stream_ = nullptr;
};

// Makes r1's kernels on this thread launch on `stream` until the scope ends.
class StreamScope {
 public:
  explicit StreamScope(const CudaStream& stream) : previous_(detail::current_stream()) {
    detail::current_stream() = stream.get();
  }
  ~StreamScope() { detail::current_stream() = previous_; }
  StreamScope(const StreamScope&) = delete;
  StreamScope& operator=(const StreamScope&) = delete;

 private:
  cudaStream_t previous_;
};

// Waits for r1's work on this thread's stream; asynchronous kernel faults surface here.
inline void cuda_synchronize(const char* op = "cuda_synchronize") {
  R1_CUDA_CHECK(cudaStreamSynchronize(cuda_stream()), op);
}

inline int cuda_device_count() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess ? count : 0;
}

// Blocks of `threads` covering n items, for 1-D grid-stride kernels.
inline unsigned cuda_blocks(int64_t n, int threads = 256) {
  const int64_t blocks = (std::max<int64_t>(n, 1) + threads - 1) / threads;
  return static_cast<unsigned>(std::min<int64_t>(blocks, 65535LL * 8));
}

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

template <class T>
void copy(ConstView<T, Cuda> src, View<T, Cuda> dst) {
  detail::copy_between(src, dst, cudaMemcpyDeviceToDevice, "copy.device_to_device");
}

// Copies every tensor of one params struct into another of the same structure (host to
// device or back): Linear<float> into Linear<float, Cuda>, Mla<float> into Mla<float, Cuda>.
// Destination tensors are resized to the source shapes. visit() only reads, so src stays const.
template <class Src, class Dst>
void copy_params(const Src& src, Dst& dst) {
  struct Source {
    std::string name;
    const void* tensor;
    std::type_index type;
  };
  std::vector<Source> sources;
  const_cast<Src&>(src).visit([&](const std::string& name, const auto& tensor) {
    sources.push_back({name, &tensor, std::type_index(typeid(tensor))});
  });
  std::size_t index = 0;
  dst.visit([&](const std::string& name, auto& tensor) {
    using DstTensor = std::remove_reference_t<decltype(tensor)>;
    using T = typename DstTensor::value_type;
    using SrcTensor = Tensor<T, std::conditional_t<std::is_same_v<DstTensor, Tensor<T, Cuda>>, Cpu, Cuda>>;
    R1_CHECK(index < sources.size() && sources[index].name == name, "[copy_params] destination tensor ", name,
             " has no counterpart at position ", index, " of the source");
    R1_CHECK(sources[index].type == std::type_index(typeid(SrcTensor)), "[copy_params] tensor ", name,
             " has another element type or the same device on both sides");
    const auto* source = static_cast<const SrcTensor*>(sources[index].tensor);
    tensor.resize(source->shape());
    copy(source->view(), tensor.view());
    ++index;
  });
  R1_CHECK(index == sources.size(), "[copy_params] the source has ", sources.size(), " tensors, the destination ", index);
}

}  // namespace r1
