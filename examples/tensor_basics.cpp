// tensor_basics: r1's tensors, views and Eigen maps in five minutes.
//
//   build/examples/tensor_basics
#include <r1/tensor.hpp>

#include <fmt/core.h>

int main() {
  // An owning, zero-filled, 64-byte aligned tensor: [batch 2, seq 3, dim 4], row-major.
  r1::Tensor<float> x(r1::Shape{2, 3, 4});
  r1::Rng rng(42);  // same seed, same numbers, on every platform
  r1::fill_normal(x.view(), rng, 0.0, 1.0);

  // .matrix() is an Eigen::Map: leading dims become rows, so [2,3,4] is a 6 x 4 matrix and
  // all of Eigen works on it without a copy.
  auto m = x.matrix();
  fmt::print("x as a {}x{} matrix, sum {:.4f}, max |x| {:.4f}\n", m.rows(), m.cols(), m.sum(), m.cwiseAbs().maxCoeff());

  // Views share data. select() drops the first dim, slice() cuts any dim: here the last two
  // channels of every token, as MLA does when it splits q into its nope and rope parts.
  auto second_batch = x.view().select(1);       // [3, 4]
  auto rope_part = x.view().slice(2, 2, 4);     // [2, 3, 2], strided
  rope_part.matrix().setZero();                 // writes through to x
  fmt::print("batch 1 token 0: {} {} {} {}\n", second_batch(0, 0), second_batch(0, 1), second_batch(0, 2), second_batch(0, 3));

  // A PyTorch/HF weight is [out, in]; y = x W^T is one Eigen product on the maps.
  r1::Tensor<float> w(r1::Shape{5, 4});
  r1::fill_truncated_normal(w.view(), rng, 0.0, 0.02, -0.04, 0.04);
  r1::Tensor<float> y(r1::Shape{2, 3, 5});
  y.matrix().noalias() = x.matrix() * w.matrix().transpose();
  fmt::print("y has shape {}\n", y.shape().str());

  // Low-precision storage: DeepSeek-V3's released weights are FP8 E4M3 (max 448).
  r1::Tensor<r1::fp8_e4m3> w8(w.shape());
  r1::convert<float, r1::fp8_e4m3>(w, w8);
  fmt::print("w[0,0] = {:.6f}, as fp8 e4m3 {:.6f}, as bf16 {:.6f}\n", w(0, 0), w8(0, 0).to_float(),
             r1::bf16::from_float(w(0, 0)).to_float());

  // Mistakes throw r1::error with the op and the values.
  try {
    x.view().slice(2, 3, 9);
  } catch (const r1::error& e) {
    fmt::print("caught: {}\n", e.what());
  }
}
