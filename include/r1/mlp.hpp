// r1/mlp.hpp: the SwiGLU feed-forward block of DeepSeek-V3's dense layers and experts.
//
//   forward:   a = x W1^T,  b = x W3^T,  h = silu(a) * b,  y = h W2^T
//   backward:  dh = dy W2,  da = dh * b * silu'(a),  db = dh * silu(a)
//              dx = da W1 + db W3   (and dW1, dW2, dW3 from the Linear backwards)
//   silu(a) = a * sigmoid(a),  silu'(a) = sigmoid(a) * (1 + a * (1 - sigmoid(a)))
//
// Legend: M rows (tokens), D model dim, H hidden (intermediate) dim. W1 is HF's gate_proj
// [H, D], W3 up_proj [H, D], W2 down_proj [D, H]; visit() uses the HF names.
//
// The cache keeps one copy of x for both input projections and writes h straight into the
// down projection's input, and backward sums dx inside the second product (dx += db W3):
// in an MoE step these copies and the separate sum were 3% of the time.
#pragma once

#include "config.hpp"
#include "linear.hpp"
#include "parallel.hpp"
#include "tensor.hpp"

#include <cmath>

namespace r1 {

// ---------------------------------------------------------------------------------------
// Params
template <class T, class Dev = Cpu>
struct Mlp {
  Linear<T, Dev> w1;  // gate_proj [H, D]
  Linear<T, Dev> w2;  // down_proj [D, H]
  Linear<T, Dev> w3;  // up_proj   [H, D]

  Mlp() = default;
  Mlp(int64_t dim, int64_t hidden) : w1(dim, hidden), w2(hidden, dim), w3(dim, hidden) {}

  int64_t dim() const { return w1.in_features(); }
  int64_t hidden() const { return w1.out_features(); }

  template <class F>
  void visit(F&& f) {
    visit_prefixed("gate_proj.", w1, f);
    visit_prefixed("down_proj.", w2, f);
    visit_prefixed("up_proj.", w3, f);
  }
};

// ---------------------------------------------------------------------------------------
// Cache
template <class T, class Dev = Cpu>
struct MlpCache {
  LinearCache<T, Dev> gate, down, up;  // gate.x is x for both W1 and W3 (up.x stays empty); down.x is h
  Tensor<T, Dev> dgate, dup, dx;
};

R1_DECLARE_IMPL(MlpImpl, "mlp.cuh");

template <>
struct MlpImpl<Cpu> {
  // sigmoid(a) = 1 / (1 + exp(-a)) as an Eigen array expression: Eigen evaluates exp in
  // SIMD registers (a scalar std::exp per element was 10% of a small model's training step).
  template <class A>
  static auto sigmoid(const A& a) {
    using T = typename A::Scalar;
    return (T(1) + (-a).exp()).inverse();
  }

  // Rows in parallel: an exp per element is costly enough to be worth both threads.
  template <class T>
  static void gate(MlpCache<T, Cpu>& c) {
    const auto a_m = c.gate.y.matrix();
    const auto b_m = c.up.y.matrix();
    auto h = c.down.x.matrix();
    parallel_for(h.rows(), [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        const auto a = a_m.row(m).array();
        h.row(m).array() = a * sigmoid(a) * b_m.row(m).array();
      }
    }, min_items_per_thread(16 * h.cols()));
  }

  // dgate = dh * b * silu'(a), dup = dh * silu(a), with dh the down projection's dx.
  template <class T>
  static void gate_backward(MlpCache<T, Cpu>& c) {
    const auto a_m = c.gate.y.matrix();
    const auto b_m = c.up.y.matrix();
    const auto dh_m = c.down.dx.matrix();
    auto dgate = c.dgate.matrix();
    auto dup = c.dup.matrix();
    parallel_for(a_m.rows(), [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        const auto a = a_m.row(m).array();
        const auto dh = dh_m.row(m).array();
        // sigmoid(a) is needed twice: it waits in dgate's row, not in a temporary, which
        // would be a heap allocation per row (thousands per MoE step).
        auto s = dgate.row(m).array();
        s = sigmoid(a);
        dup.row(m).array() = dh * a * s;
        s = dh * b_m.row(m).array() * s * (T(1) + a * (T(1) - s));
      }
    }, min_items_per_thread(24 * a_m.cols()));
  }

};

// The forward on the input the caller has already written into c.gate.x ([M, D]), with no
// copy of it: the MoE gathers each expert's tokens straight there.
template <class T, class Dev>
const Tensor<T, Dev>& forward_on_cached_input(const Mlp<T, Dev>& p, MlpCache<T, Dev>& c) {
  R1_CHECK(p.w2.in_features() == p.hidden() && p.w2.out_features() == p.dim() && p.w3.weight.shape() == p.w1.weight.shape(),
           "[mlp.forward] inconsistent weights: gate_proj ", p.w1.weight.shape(), ", up_proj ", p.w3.weight.shape(),
           ", down_proj ", p.w2.weight.shape());
  const Tensor<T, Dev>& x = c.gate.x;
  R1_CHECK(x.rank() >= 1 && x.size(x.rank() - 1) == p.dim(), "[mlp.forward] x has shape ", x.shape(), ", expected last dim ",
           p.dim());
  Shape hidden = x.shape();
  hidden.dims[hidden.rank - 1] = p.hidden();
  c.gate.y.resize(hidden);
  LinearImpl<Dev>::affine(x, p.w1, c.gate.y);
  c.up.y.resize(hidden);
  LinearImpl<Dev>::affine(x, p.w3, c.up.y);
  c.down.x.resize(hidden);
  MlpImpl<Dev>::gate(c);
  c.down.y.resize(x.shape());
  LinearImpl<Dev>::affine(c.down.x, p.w2, c.down.y);
  return c.down.y;
}

template <class T, class Dev>
const Tensor<T, Dev>& forward(const Mlp<T, Dev>& p, ConstView<T, Dev> x, MlpCache<T, Dev>& c) {
  c.gate.x.resize(x.shape());
  copy(x, c.gate.x.view());
  return forward_on_cached_input(p, c);
}

template <class T, class Dev>
const Tensor<T, Dev>& backward(const Mlp<T, Dev>& p, MlpCache<T, Dev>& c, ConstView<T, Dev> dy, Mlp<T, Dev>& grads) {
  R1_CHECK(c.down.y.data() != nullptr, "[mlp.backward] the cache holds no forward pass: call forward first");
  R1_CHECK(grads.w1.weight.shape() == p.w1.weight.shape() && grads.w3.weight.shape() == p.w3.weight.shape(),
           "[mlp.backward] grads have gate_proj ", grads.w1.weight.shape(), " and up_proj ", grads.w3.weight.shape(),
           ", expected ", p.w1.weight.shape(), " (use r1::zeros_like(params))");
  backward(p.w2, c.down, dy, grads.w2);
  c.dgate.resize(c.down.x.shape());
  c.dup.resize(c.down.x.shape());
  MlpImpl<Dev>::gate_backward(c);
  LinearImpl<Dev>::weight_grad(p.w1, c.gate.x, c.dgate, grads.w1);
  LinearImpl<Dev>::weight_grad(p.w3, c.gate.x, c.dup, grads.w3);
  c.dx.resize(c.gate.x.shape());
  LinearImpl<Dev>::input_grad(p.w1, c.dgate, c.dx, /*accumulate=*/false);
  LinearImpl<Dev>::input_grad(p.w3, c.dup, c.dx, /*accumulate=*/true);
  return c.dx;
}

}  // namespace r1
