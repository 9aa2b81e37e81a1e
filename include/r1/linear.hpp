// r1/linear.hpp: the affine layer, y = x W^T + b.
//
//   forward:   y[M,N]  = x[M,K] W[N,K]^T + b[N]
//   backward:  dx[M,K] = dy[M,N] W[N,K]
//              dW[N,K] += dy^T x,  db[N] += sum over rows of dy
//
// Legend: M rows (tokens: any leading dims of x are flattened into M), K in_features,
// N out_features. W keeps PyTorch's and HF's [out, in] layout, so a checkpoint tensor maps
// onto it without a transpose.
//
// The GEMMs are Eigen's: with -DR1_USE_OPENBLAS=ON Eigen hands them to OpenBLAS
// (EIGEN_USE_BLAS). bench/bench_gemm and the README say which is faster where.
#pragma once

#include "config.hpp"
#include "device.hpp"
#include "tensor.hpp"

namespace r1 {

// ---------------------------------------------------------------------------------------
// Params
template <class T, class Dev = Cpu>
struct Linear {
  Tensor<T, Dev> weight;  // [out_features, in_features]
  Tensor<T, Dev> bias;    // [out_features], or empty for no bias

  Linear() = default;
  Linear(int64_t in_features, int64_t out_features, bool with_bias = false)
      : weight(checked_shape(in_features, out_features)),
        bias(with_bias ? Tensor<T, Dev>(Shape{out_features}) : Tensor<T, Dev>()) {}

  int64_t in_features() const { return weight.size(1); }
  int64_t out_features() const { return weight.size(0); }
  bool has_bias() const { return !bias.empty(); }

  template <class F>
  void visit(F&& f) {
    f("weight", weight);
    if (has_bias()) f("bias", bias);
  }

 private:
  static Shape checked_shape(int64_t in_features, int64_t out_features) {
    R1_CHECK(in_features > 0 && out_features > 0, "[linear] in_features ", in_features, " and out_features ", out_features,
             " must be positive");
    return Shape{out_features, in_features};
  }
};

// ---------------------------------------------------------------------------------------
// Cache: what backward needs (a copy of x) and the buffers forward/backward return, reused
// across calls so a training loop stops allocating after its first step.
template <class T, class Dev = Cpu>
struct LinearCache {
  Tensor<T, Dev> x, y, dx;
};

R1_DECLARE_IMPL(LinearImpl, "linear.cuh");

template <>
struct LinearImpl<Cpu> {
  // y = x W^T (+ b); x and y are (rows x in) and (rows x out) Eigen maps.
  template <class X, class Y, class T>
  static void affine(const X& x, const Linear<T, Cpu>& p, Y&& y) {
    y.noalias() = x * p.weight.matrix().transpose();
    if (p.has_bias()) y.rowwise() += p.bias.vector().transpose();
  }

  template <class T>
  static void backward(const Linear<T, Cpu>& p, LinearCache<T, Cpu>& c, View<const T> dy, Linear<T, Cpu>& g) {
    const auto dy_m = dy.matrix();
    c.dx.resize(c.x.shape());
    c.dx.matrix().noalias() = dy_m * p.weight.matrix();
    g.weight.matrix().noalias() += dy_m.transpose() * c.x.matrix();
    if (p.has_bias()) g.bias.matrix() += dy_m.colwise().sum();
  }
};

// x[..., in] -> y[..., out]. Leading dims of x carry over to y.
template <class T, class Dev>
const Tensor<T, Dev>& forward(const Linear<T, Dev>& p, ConstView<T, Dev> x, LinearCache<T, Dev>& c) {
  R1_CHECK(p.weight.rank() == 2, "[linear.forward] weight has shape ", p.weight.shape(), ", expected [out, in]");
  R1_CHECK(x.rank() >= 1 && x.size(x.rank() - 1) == p.in_features(), "[linear.forward] x has shape ", x.shape(),
           ", expected last dim ", p.in_features());
  R1_CHECK(!p.has_bias() || p.bias.shape() == Shape{p.out_features()}, "[linear.forward] bias has shape ", p.bias.shape(),
           ", expected [", p.out_features(), "]");
  c.x.resize(x.shape());
  c.x.matrix() = x.matrix();
  Shape out = x.shape();
  out.dims[out.rank - 1] = p.out_features();
  c.y.resize(out);
  LinearImpl<Dev>::affine(c.x.matrix(), p, c.y.matrix());
  return c.y;
}

// dy[..., out] -> dx[..., in]; accumulates dW (and db) into grads.
template <class T, class Dev>
const Tensor<T, Dev>& backward(const Linear<T, Dev>& p, LinearCache<T, Dev>& c, ConstView<T, Dev> dy, Linear<T, Dev>& grads) {
  R1_CHECK(c.y.data() != nullptr, "[linear.backward] the cache holds no forward pass: call forward first");
  R1_CHECK(dy.shape() == c.y.shape(), "[linear.backward] dy has shape ", dy.shape(), ", expected ", c.y.shape(),
           " (the forward output)");
  R1_CHECK(grads.weight.shape() == p.weight.shape() && grads.bias.shape() == p.bias.shape(),
           "[linear.backward] grads have weight ", grads.weight.shape(), " and bias ", grads.bias.shape(), ", expected ",
           p.weight.shape(), " and ", p.bias.shape(), " (use r1::zeros_like(params))");
  LinearImpl<Dev>::backward(p, c, dy, grads);
  return c.dx;
}

// Inference without a cache: y = x W^T + b into a caller-owned y.
template <class T, class Dev>
void apply(const Linear<T, Dev>& p, ConstView<T, Dev> x, MutableView<T, Dev> y) {
  Shape out = x.shape();
  R1_CHECK(x.rank() >= 1 && x.size(x.rank() - 1) == p.in_features(), "[linear.apply] x has shape ", x.shape(),
           ", expected last dim ", p.in_features());
  out.dims[out.rank - 1] = p.out_features();
  check_shape(y, out, "linear.apply", "y");
  LinearImpl<Dev>::affine(x.matrix(), p, y.matrix());
}

}  // namespace r1
