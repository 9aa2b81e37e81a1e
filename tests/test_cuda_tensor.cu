// Tests for r1/cuda/tensor.cuh (needs a GPU): device tensors, host <-> device copies.
#include <r1/cuda/tensor.cuh>
#include <r1/linear.hpp>

#include "support.hpp"

using r1::Cpu;
using r1::Cuda;
using r1::Shape;
using r1::Tensor;

TEST_CASE("cuda tensor: zero-filled, round trip through the device, device copies", "[cuda][tensor]") {
  Tensor<float, Cuda> device(Shape{3, 70});
  Tensor<float> host(Shape{3, 70});
  host.matrix().setConstant(5.0f);
  r1::copy(device, host.view());
  REQUIRE(host.matrix().cwiseAbs().maxCoeff() == 0.0f);  // cudaMemset'd

  r1::Rng rng(1);
  r1::fill_normal(host.view(), rng);
  r1::copy(host, device.view());
  Tensor<float, Cuda> duplicate = device;  // device-to-device
  Tensor<float> back(Shape{3, 70});
  r1::copy(duplicate, back.view());
  REQUIRE(r1test::max_abs_diff(back, host) == 0.0);

  Tensor<float> wrong(Shape{70, 3});
  REQUIRE_R1_ERROR(r1::copy(device, wrong.view()), "[copy.device_to_host] src has shape [3, 70], dst has [70, 3]");
}

TEST_CASE("cuda tensor: copy_params moves a params struct to the device and back", "[cuda][tensor]") {
  r1::Linear<float> host(5, 3, /*with_bias=*/true);
  r1::Rng rng(2);
  r1::fill_normal(host.weight.view(), rng);
  r1::fill_normal(host.bias.view(), rng);
  r1::Linear<float, Cuda> device;
  r1::copy_params(host, device);
  REQUIRE(device.weight.shape() == Shape{3, 5});
  r1::Linear<float> back;
  r1::copy_params(device, back);
  REQUIRE(r1test::max_abs_diff(back.weight, host.weight) == 0.0);
  REQUIRE(r1test::max_abs_diff(back.bias, host.bias) == 0.0);

  r1::Linear<float, Cuda> no_bias(5, 3);
  REQUIRE_R1_ERROR(r1::copy_params(no_bias, back), "[copy_params] the source has 1 tensors, the destination 2");
}

TEST_CASE("cuda tensor: a StreamScope routes r1's work to its stream", "[cuda][tensor]") {
  r1::CudaStream stream;
  REQUIRE(r1::cuda_stream() == cudaStreamPerThread);
  {
    r1::StreamScope scope(stream);
    REQUIRE(r1::cuda_stream() == stream.get());
    r1::cuda_synchronize();
  }
  REQUIRE(r1::cuda_stream() == cudaStreamPerThread);
}
