// Shared helpers for r1's tests: golden fixtures from tests/fixtures/gen_torch_fixtures.py,
// central finite differences in double, and error-message matching.
#pragma once

#include <r1/tensor.hpp>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <cmath>
#include <fstream>
#include <functional>
#include <string>

namespace r1test {

inline const nlohmann::json& torch_fixtures() {
  static const nlohmann::json fixtures = [] {
    std::ifstream in(R1_FIXTURE_DIR "/torch_layers.json");
    if (!in) throw std::runtime_error("cannot open " R1_FIXTURE_DIR "/torch_layers.json");
    return nlohmann::json::parse(in);
  }();
  return fixtures;
}

inline const nlohmann::json& fixture(const std::string& name) { return torch_fixtures().at(name); }

inline r1::Shape shape_of(const nlohmann::json& t) {
  r1::Shape s;
  for (const auto& d : t.at("shape")) s.dims[s.rank++] = d.get<int64_t>();
  return s;
}

template <class T = double>
r1::Tensor<T> tensor(const nlohmann::json& fixture_case, const std::string& name) {
  const auto& t = fixture_case.at(name);
  r1::Tensor<T> out(shape_of(t));
  const auto& data = t.at("data");
  REQUIRE(static_cast<int64_t>(data.size()) == out.numel());
  for (int64_t i = 0; i < out.numel(); ++i) out.data()[i] = data[i].get<T>();
  return out;
}

template <class A, class B>
double max_abs_diff(const A& a, const B& b) {
  REQUIRE(a.shape() == b.shape());
  double worst = 0.0;
  for (int64_t i = 0; i < a.numel(); ++i)
    worst = std::max(worst, std::abs(static_cast<double>(a.data()[i]) - static_cast<double>(b.data()[i])));
  return worst;
}

// Compares analytic with the central difference (loss(p + eps) - loss(p - eps)) / 2 eps
// on `count` elements of param spread evenly over it (check_gradient_sampled: for models
// whose every-element check would take too many forward passes), or on every element.
inline void check_gradient_sampled(r1::Tensor<double>& param, const r1::Tensor<double>& analytic,
                                   const std::function<double()>& loss, int64_t count, double eps = 1e-6,
                                   double tolerance = 1e-6) {
  REQUIRE(param.shape() == analytic.shape());
  const int64_t step = std::max<int64_t>(1, param.numel() / count);
  for (int64_t i = step / 2; i < param.numel(); i += step) {
    const double saved = param.data()[i];
    param.data()[i] = saved + eps;
    const double plus = loss();
    param.data()[i] = saved - eps;
    const double minus = loss();
    param.data()[i] = saved;
    const double numeric = (plus - minus) / (2 * eps);
    INFO("element " << i << ": numeric " << numeric << ", analytic " << analytic.data()[i]);
    CHECK(std::abs(numeric - analytic.data()[i]) <= tolerance * std::max(1.0, std::abs(numeric)));
  }
}

inline void check_gradient(r1::Tensor<double>& param, const r1::Tensor<double>& analytic, const std::function<double()>& loss,
                           double eps = 1e-6, double tolerance = 1e-6) {
  check_gradient_sampled(param, analytic, loss, param.numel(), eps, tolerance);
}

// sum(y * w): a scalar whose gradient with respect to y is w.
template <class Y>
double weighted_sum(const Y& y, const r1::Tensor<double>& w) {
  double s = 0.0;
  for (int64_t i = 0; i < w.numel(); ++i) s += y.data()[i] * w.data()[i];
  return s;
}

template <class T = double>
r1::Tensor<T> random_tensor(r1::Shape shape, uint64_t seed, double std = 1.0) {
  r1::Tensor<T> t(shape);
  r1::Rng rng(seed);
  r1::fill_normal(t.view(), rng, 0.0, std);
  return t;
}

}  // namespace r1test

// The expression throws r1::error whose message contains the text.
#define REQUIRE_R1_ERROR(expr, text)                                  \
  do {                                                                \
    try {                                                             \
      expr;                                                           \
      FAIL("expected r1::error containing: " << (text));              \
    } catch (const r1::error& e) {                                    \
      REQUIRE_THAT(std::string(e.what()), Catch::Contains(text));     \
    }                                                                 \
  } while (0)
