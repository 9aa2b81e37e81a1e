// Tests for r1/loss.hpp: log-softmax and cross-entropy against PyTorch and finite
// differences, ignore_index, and bad targets.
#include <r1/loss.hpp>

#include "support.hpp"

using r1::Shape;
using r1::Tensor;
using r1test::max_abs_diff;
using r1test::tensor;

TEST_CASE("log_softmax matches PyTorch, also for large logits", "[loss]") {
  const auto& c = r1test::fixture("log_softmax");
  r1::LogSoftmaxCache<double> cache;
  REQUIRE(max_abs_diff(r1::forward(r1::LogSoftmax{}, tensor(c, "x"), cache), tensor(c, "y")) < 1e-12);
  REQUIRE(max_abs_diff(r1::backward(r1::LogSoftmax{}, cache, tensor(c, "dy")), tensor(c, "dx")) < 1e-12);
}

TEST_CASE("log_softmax backward matches finite differences", "[loss]") {
  auto x = r1test::random_tensor(Shape{3, 7}, 31, 3.0);
  const auto w = r1test::random_tensor(Shape{3, 7}, 32);
  r1::LogSoftmaxCache<double> cache;
  const auto loss = [&] { return r1test::weighted_sum(r1::forward(r1::LogSoftmax{}, x, cache), w); };
  loss();
  const Tensor<double> dx = r1::backward(r1::LogSoftmax{}, cache, w);
  r1test::check_gradient(x, dx, loss);
}

TEST_CASE("cross_entropy matches PyTorch with ignore_index", "[loss]") {
  const auto& c = r1test::fixture("cross_entropy");
  const r1::CrossEntropy ce{c.at("ignore_index").get<int32_t>()};
  r1::CrossEntropyCache<double> cache;
  const double loss = r1::forward(ce, tensor(c, "logits"), tensor<int32_t>(c, "targets"), cache);
  REQUIRE(loss == Approx(c.at("loss").get<double>()).epsilon(1e-13));
  REQUIRE(cache.valid == 4);
  REQUIRE(max_abs_diff(r1::backward(ce, cache), tensor(c, "dlogits")) < 1e-13);
}

TEST_CASE("cross_entropy backward matches finite differences; scaled upstream gradient", "[loss]") {
  auto logits = r1test::random_tensor(Shape{2, 3, 5}, 33, 2.0);  // [B, S, V]
  Tensor<int32_t> targets(Shape{2, 3});
  const int32_t values[] = {4, -100, 0, 2, 2, -100};
  std::copy(values, values + 6, targets.data());
  r1::CrossEntropyCache<double> cache;
  const r1::CrossEntropy ce;
  const auto loss = [&] { return 2.5 * r1::forward(ce, logits, targets, cache); };
  loss();
  const Tensor<double> dlogits = r1::backward(ce, cache, 2.5);
  r1test::check_gradient(logits, dlogits, loss);
  REQUIRE(dlogits(0, 1, 3) == 0.0);  // ignored rows get no gradient
}

TEST_CASE("cross_entropy with every target ignored is 0 with zero gradient", "[loss]") {
  Tensor<double> logits = r1test::random_tensor(Shape{2, 4}, 34);
  Tensor<int32_t> targets(Shape{2});
  targets.data()[0] = targets.data()[1] = -1;
  r1::CrossEntropyCache<double> cache;
  const r1::CrossEntropy ce{-1};
  REQUIRE(r1::forward(ce, logits, targets, cache) == 0.0);
  REQUIRE(cache.valid == 0);
  REQUIRE(r1::backward(ce, cache).matrix().cwiseAbs().maxCoeff() == 0.0);
}

TEST_CASE("cross_entropy rejects bad targets and shapes", "[loss][errors]") {
  Tensor<float> logits(Shape{3, 5});
  Tensor<int32_t> targets(Shape{3});
  targets.data()[1] = 5;
  r1::CrossEntropyCache<float> cache;
  REQUIRE_R1_ERROR(r1::forward(r1::CrossEntropy{}, logits, targets, cache),
                   "[cross_entropy.forward] target 5 at position 1 is out of range [0, 5)");
  targets.data()[1] = -7;
  REQUIRE_R1_ERROR(r1::forward(r1::CrossEntropy{}, logits, targets, cache), "target -7 at position 1");
  REQUIRE_R1_ERROR(r1::forward(r1::CrossEntropy{}, logits, Tensor<int32_t>(Shape{4}), cache),
                   "[cross_entropy.forward] targets have shape [4], logits [3, 5]");
  REQUIRE_R1_ERROR(r1::backward(r1::CrossEntropy{}, cache), "[cross_entropy.backward] the cache holds no forward pass");
  r1::LogSoftmaxCache<float> ls;
  REQUIRE_R1_ERROR(r1::forward(r1::LogSoftmax{}, Tensor<float>(Shape{3, 0}), ls), "[log_softmax.forward] x has shape [3, 0]");
}
