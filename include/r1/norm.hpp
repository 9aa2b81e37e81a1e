// r1/norm.hpp: RMSNorm, y = x / sqrt(mean(x^2) + eps) * w.
//
//   forward:   r[m]  = 1 / sqrt(sum_d x[m,d]^2 / D + eps)
//              y[m,d] = x[m,d] * r[m] * w[d]
//   backward:  xh = x * r,  g = dy * w
//              dx[m,:] = r[m] * (g[m,:] - xh[m,:] * sum_d(g[m,d] * xh[m,d]) / D)
//              dw += sum over m of dy * xh
//
// Legend: M rows (any leading dims of x), D the normalized dim. DeepSeek-V3 uses it
// before attention and the MLP, on the compressed q/kv latents, and before the LM head
// (rms_norm_eps = 1e-6). The weight starts at ones.
#pragma once

#include "config.hpp"
#include "device.hpp"
#include "parallel.hpp"
#include "tensor.hpp"

#include <algorithm>
#include <cmath>
#include <type_traits>

namespace r1 {

// ---------------------------------------------------------------------------------------
// Params
template <class T, class Dev = Cpu>
struct RMSNorm {
  Tensor<T, Dev> weight;  // [D]
  double eps = 1e-6;

  RMSNorm() = default;
  explicit RMSNorm(int64_t dim, double eps_ = 1e-6) : weight(Shape{dim}), eps(eps_) {
    R1_CHECK(dim > 0, "[rmsnorm] dim is ", dim, ", expected > 0");
    R1_CHECK(eps_ > 0.0, "[rmsnorm] eps is ", eps_, ", expected > 0");
    if constexpr (std::is_same_v<Dev, Cpu>) {
      weight.vector().setOnes();
    } else {  // filled on the host, then copied over (r1/cuda/tensor.cuh has that copy)
      Tensor<T> ones(Shape{dim});
      std::fill_n(ones.data(), dim, convert_scalar<T>(1.0));
      copy(ones.view(), weight.view());
    }
  }

  int64_t dim() const { return weight.numel(); }

  template <class F>
  void visit(F&& f) {
    f("weight", weight);
  }
};

// ---------------------------------------------------------------------------------------
// Cache
template <class T, class Dev = Cpu>
struct RMSNormCache {
  Tensor<T, Dev> x, rstd, y, dx;  // rstd is [M]
};

R1_DECLARE_IMPL(RMSNormImpl, "norm.cuh");

template <>
struct RMSNormImpl<Cpu> {
  template <class T>
  static void forward(const RMSNorm<T, Cpu>& p, RMSNormCache<T, Cpu>& c) {
    const auto x = c.x.matrix();
    auto y = c.y.matrix();
    auto rstd = c.rstd.vector();
    const auto w = p.weight.matrix();
    const T inv_dim = T(1) / static_cast<T>(p.dim());
    parallel_for(x.rows(), [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        rstd[m] = T(1) / std::sqrt(x.row(m).squaredNorm() * inv_dim + static_cast<T>(p.eps));
        y.row(m) = (x.row(m) * rstd[m]).cwiseProduct(w);
      }
    }, min_items_per_thread(3 * x.cols()));
  }

  template <class T>
  static void backward(const RMSNorm<T, Cpu>& p, RMSNormCache<T, Cpu>& c, View<const T> dy, RMSNorm<T, Cpu>& g) {
    const auto x = c.x.matrix();
    const auto dy_m = dy.matrix();
    const auto rstd = c.rstd.vector();
    const auto w = p.weight.matrix();
    auto dx = c.dx.matrix();
    const T inv_dim = T(1) / static_cast<T>(p.dim());
    parallel_for(x.rows(), [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        const auto xh = x.row(m) * rstd[m];
        const auto gw = dy_m.row(m).cwiseProduct(w);
        const T mean_dot = gw.dot(xh) * inv_dim;
        dx.row(m) = rstd[m] * (gw - xh * mean_dot);
      }
    }, min_items_per_thread(6 * x.cols()));
    // Column sums in row order: the same result for any thread count.
    g.weight.matrix() += (dy_m.array() * (x.array().colwise() * rstd.array())).colwise().sum().matrix();
  }
};

template <class T, class Dev>
const Tensor<T, Dev>& forward(const RMSNorm<T, Dev>& p, ConstView<T, Dev> x, RMSNormCache<T, Dev>& c) {
  R1_CHECK(p.dim() > 0, "[rmsnorm.forward] the norm has no weight: build it with RMSNorm(dim)");
  R1_CHECK(x.rank() >= 1 && x.size(x.rank() - 1) == p.dim(), "[rmsnorm.forward] x has shape ", x.shape(),
           ", expected last dim ", p.dim());
  c.x.resize(x.shape());
  copy(x, c.x.view());
  c.y.resize(x.shape());
  c.rstd.resize(Shape{x.numel() / std::max<int64_t>(p.dim(), 1)});
  RMSNormImpl<Dev>::forward(p, c);
  return c.y;
}

template <class T, class Dev>
const Tensor<T, Dev>& backward(const RMSNorm<T, Dev>& p, RMSNormCache<T, Dev>& c, ConstView<T, Dev> dy, RMSNorm<T, Dev>& grads) {
  R1_CHECK(c.y.data() != nullptr, "[rmsnorm.backward] the cache holds no forward pass: call forward first");
  R1_CHECK(dy.shape() == c.y.shape(), "[rmsnorm.backward] dy has shape ", dy.shape(), ", expected ", c.y.shape());
  R1_CHECK(grads.weight.shape() == p.weight.shape(), "[rmsnorm.backward] grads.weight has shape ", grads.weight.shape(),
           ", expected ", p.weight.shape());
  c.dx.resize(c.x.shape());
  RMSNormImpl<Dev>::backward(p, c, dy, grads);
  return c.dx;
}

}  // namespace r1
