// Helpers shared by the CUDA tests (tests/test_cuda_*.cu): moving tensors between host and
// device with r1's blocking copies.
#pragma once

#include <r1/cuda/tensor.cuh>

namespace r1test {

template <class T>
r1::Tensor<T, r1::Cuda> to_device(const r1::Tensor<T>& host) {
  r1::Tensor<T, r1::Cuda> device(host.shape());
  r1::copy(host.view(), device.view());
  return device;
}

template <class T>
r1::Tensor<T> to_host(const r1::Tensor<T, r1::Cuda>& device) {
  r1::Tensor<T> host(device.shape());
  r1::copy(device.view(), host.view());
  return host;
}

}  // namespace r1test
