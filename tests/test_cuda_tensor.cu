// Tests for r1/cuda/tensor.cuh (needs a GPU): device tensors, host <-> device copies.
#include <r1/cuda/tensor.cuh>

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
