// r1/mlp.hpp: the SwiGLU feed-forward block of DeepSeek-V3's dense layers and experts.
//
//   forward:   a = x W1^T,  b = x W3^T,  h = silu(a) * b,  y = h W2^T
//   backward:  dh = dy W2,  da = dh * b * silu'(a),  db = dh * silu(a)
//              dx = da W1 + db W3   (and dW1, dW2, dW3 from the Linear backwards)
//   silu(a) = a * sigmoid(a),  silu'(a) = sigmoid(a) * (1 + a * (1 - sigmoid(a)))
//
// Legend: M rows (tokens), D model dim, H hidden (intermediate) dim. W1 is HF's gate_proj
// [H, D], W3 up_proj [H, D], W2 down_proj [D, H]; visit() uses the HF names.
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
  LinearCache<T, Dev> gate, down, up;
  Tensor<T, Dev> h, dgate, dup, dx;
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
    auto h = c.h.matrix();
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
        const auto s = sigmoid(a).eval();
        dgate.row(m).array() = dh * b_m.row(m).array() * s * (T(1) + a * (T(1) - s));
        dup.row(m).array() = dh * a * s;
      }
    }, min_items_per_thread(24 * a_m.cols()));
  }

  // dx = dx_gate + dx_up: the two input gradients, da W1 and db W3.
  template <class T>
  static void add(const Tensor<T>& dx_gate, const Tensor<T>& dx_up, Tensor<T>& dx) {
    dx.matrix() = dx_gate.matrix() + dx_up.matrix();
  }
};

template <class T, class Dev>
const Tensor<T, Dev>& forward(const Mlp<T, Dev>& p, ConstView<T, Dev> x, MlpCache<T, Dev>& c) {
  R1_CHECK(p.w2.in_features() == p.hidden() && p.w2.out_features() == p.dim() && p.w3.weight.shape() == p.w1.weight.shape(),
           "[mlp.forward] inconsistent weights: gate_proj ", p.w1.weight.shape(), ", up_proj ", p.w3.weight.shape(),
           ", down_proj ", p.w2.weight.shape());
  forward(p.w1, x, c.gate);
  forward(p.w3, x, c.up);
  c.h.resize(c.gate.y.shape());
  MlpImpl<Dev>::gate(c);
  return forward(p.w2, c.h, c.down);
}

template <class T, class Dev>
const Tensor<T, Dev>& backward(const Mlp<T, Dev>& p, MlpCache<T, Dev>& c, ConstView<T, Dev> dy, Mlp<T, Dev>& grads) {
  R1_CHECK(c.h.data() != nullptr, "[mlp.backward] the cache holds no forward pass: call forward first");
  backward(p.w2, c.down, dy, grads.w2);
  c.dgate.resize(c.h.shape());
  c.dup.resize(c.h.shape());
  MlpImpl<Dev>::gate_backward(c);
  const Tensor<T, Dev>& dx_gate = backward(p.w1, c.gate, c.dgate, grads.w1);
  const Tensor<T, Dev>& dx_up = backward(p.w3, c.up, c.dup, grads.w3);
  c.dx.resize(dx_gate.shape());
  MlpImpl<Dev>::add(dx_gate, dx_up, c.dx);
  return c.dx;
}

}  // namespace r1
