// r1/loss.hpp: log-softmax and the token cross-entropy of language-model training.
//
//   log_softmax:   y[n,v] = x[n,v] - max_v x[n,:] - log(sum_v exp(x[n,v] - max))
//                  dx = dy - exp(y) * sum_v dy[n,v]
//   cross_entropy: loss = -(1/C) sum over valid n of log_softmax(logits)[n, t[n]]
//                  dlogits[n,:] = dloss * (softmax(logits[n,:]) - onehot(t[n])) / C
//                  for valid n, and 0 for ignored rows.
//
// Legend: N tokens (leading dims of the logits), V vocabulary, t targets, C the count of
// valid targets (t != ignore_index, default -100 as in PyTorch). The mean is over valid
// tokens only, as torch.nn.functional.cross_entropy(reduction="mean"). With no valid
// target at all the loss is 0 and so is the gradient (PyTorch returns NaN, which would
// poison a training run).
#pragma once

#include "config.hpp"
#include "device.hpp"
#include "parallel.hpp"
#include "tensor.hpp"

#include <cmath>

namespace r1 {

// ---------------------------------------------------------------------------------------
// Params: log-softmax has none; cross-entropy has its ignore_index.
struct LogSoftmax {};

struct CrossEntropy {
  int32_t ignore_index = -100;
};

// ---------------------------------------------------------------------------------------
// Caches
template <class T, class Dev = Cpu>
struct LogSoftmaxCache {
  Tensor<T, Dev> y, dx;
};

template <class T, class Dev = Cpu>
struct CrossEntropyCache {
  Tensor<T, Dev> log_probs, dlogits;
  Tensor<int32_t, Dev> targets;
  int64_t valid = 0;  // C: targets that are not ignore_index
  Tensor<double, Dev> loss_sum;  // CUDA: the device reduction's result (unused on the CPU)
};

R1_DECLARE_IMPL(LossImpl, "loss.cuh");

namespace detail {
// Checks every target and returns C, the count of those that are not ignore_index.
inline int64_t count_valid_targets(const CrossEntropy& loss, const int32_t* targets, int64_t count, int64_t vocab) {
  int64_t valid = 0;
  for (int64_t n = 0; n < count; ++n) {
    const int32_t t = targets[n];
    if (t == loss.ignore_index) continue;
    R1_CHECK(0 <= t && t < vocab, "[cross_entropy.forward] target ", t, " at position ", n, " is out of range [0, ", vocab,
             ") and is not ignore_index ", loss.ignore_index);
    ++valid;
  }
  return valid;
}
}  // namespace detail

template <>
struct LossImpl<Cpu> {
  // y = log_softmax(x) over the last dim; y is contiguous, x may have a row stride.
  template <class T>
  static void log_softmax(ConstView<T> x_view, View<T> y_view) {
    const auto x = x_view.matrix();
    auto y = y_view.matrix();
    parallel_for(x.rows(), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const auto shifted = (x.row(n).array() - x.row(n).maxCoeff()).eval();
        y.row(n) = (shifted - std::log(shifted.exp().sum())).matrix();
      }
    }, min_items_per_thread(8 * x.cols()));
  }

  // dx = dy - exp(y) * rowsum(dy); dx may alias dy.
  template <class T>
  static void log_softmax_backward(ConstView<T> y_view, ConstView<T> dy_view, View<T> dx_view) {
    const auto y = y_view.matrix();
    const auto dy = dy_view.matrix();
    auto dx = dx_view.matrix();
    parallel_for(y.rows(), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const auto total = dy.row(n).sum();
        dx.row(n) = dy.row(n) - (y.row(n).array().exp() * total).matrix();
      }
    }, min_items_per_thread(4 * y.cols()));
  }

  static int64_t count_valid_targets(const CrossEntropy& loss, ConstView<int32_t> targets, int64_t vocab) {
    return detail::count_valid_targets(loss, targets.data(), targets.numel(), vocab);
  }

  template <class T>
  static T cross_entropy(CrossEntropyCache<T, Cpu>& c, const CrossEntropy& loss) {
    const auto lp = c.log_probs.matrix();
    double total = 0.0;  // summed in row order: identical for any thread count
    for (int64_t n = 0; n < lp.rows(); ++n) {
      const int32_t t = c.targets.data()[n];
      if (t != loss.ignore_index) total -= static_cast<double>(lp(n, t));
    }
    return c.valid ? static_cast<T>(total / static_cast<double>(c.valid)) : T(0);
  }

  template <class T>
  static void cross_entropy_backward(CrossEntropyCache<T, Cpu>& c, const CrossEntropy& loss, T dloss) {
    const auto lp = c.log_probs.matrix();
    auto dl = c.dlogits.matrix();
    const T scale = c.valid ? dloss / static_cast<T>(c.valid) : T(0);
    parallel_for(lp.rows(), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const int32_t t = c.targets.data()[n];
        if (t == loss.ignore_index) {
          dl.row(n).setZero();
          continue;
        }
        dl.row(n) = lp.row(n).array().exp() * scale;
        dl(n, t) -= scale;
      }
    }, min_items_per_thread(4 * lp.cols()));
  }
};

template <class T, class Dev>
const Tensor<T, Dev>& forward(const LogSoftmax&, ConstView<T, Dev> x, LogSoftmaxCache<T, Dev>& c) {
  R1_CHECK(x.rank() >= 1 && x.size(x.rank() - 1) > 0, "[log_softmax.forward] x has shape ", x.shape(),
           ", expected a non-empty last dim");
  c.y.resize(x.shape());
  LossImpl<Dev>::log_softmax(x, c.y.view());
  return c.y;
}

template <class T, class Dev>
const Tensor<T, Dev>& backward(const LogSoftmax&, LogSoftmaxCache<T, Dev>& c, ConstView<T, Dev> dy) {
  R1_CHECK(c.y.data() != nullptr, "[log_softmax.backward] the cache holds no forward pass: call forward first");
  R1_CHECK(dy.shape() == c.y.shape(), "[log_softmax.backward] dy has shape ", dy.shape(), ", expected ", c.y.shape());
  c.dx.resize(c.y.shape());
  LossImpl<Dev>::log_softmax_backward(c.y.view(), dy, c.dx.view());
  return c.dx;
}

// Mean cross-entropy of logits [..., V] against targets [...].
template <class T, class Dev>
T forward(const CrossEntropy& loss, ConstView<T, Dev> logits, ConstView<int32_t, Dev> targets, CrossEntropyCache<T, Dev>& c) {
  R1_CHECK(logits.rank() >= 2 && logits.size(logits.rank() - 1) > 0, "[cross_entropy.forward] logits have shape ",
           logits.shape(), ", expected [..., V] with V > 0");
  const int64_t vocab = logits.size(logits.rank() - 1);
  R1_CHECK(targets.numel() * vocab == logits.numel() && targets.rank() == logits.rank() - 1,
           "[cross_entropy.forward] targets have shape ", targets.shape(), ", logits ", logits.shape(),
           ": expected targets to match the logits without their last dim");
  R1_CHECK(targets.is_contiguous(), "[cross_entropy.forward] targets are not contiguous");
  c.valid = LossImpl<Dev>::count_valid_targets(loss, targets, vocab);
  c.targets.resize(targets.shape());
  copy(targets, c.targets.view());
  c.log_probs.resize(logits.shape());
  LossImpl<Dev>::log_softmax(logits, c.log_probs.view());
  return LossImpl<Dev>::cross_entropy(c, loss);
}

// dlogits for an upstream gradient dloss of the (mean) loss.
template <class T, class Dev>
const Tensor<T, Dev>& backward(const CrossEntropy& loss, CrossEntropyCache<T, Dev>& c, T dloss = T(1)) {
  R1_CHECK(c.log_probs.data() != nullptr, "[cross_entropy.backward] the cache holds no forward pass: call forward first");
  c.dlogits.resize(c.log_probs.shape());
  LossImpl<Dev>::cross_entropy_backward(c, loss, dloss);
  return c.dlogits;
}

}  // namespace r1
