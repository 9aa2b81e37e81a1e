// Tests for r1/rope.hpp: both pairings, DeepSeek-V3's YaRN frequencies and mscale against
// PyTorch, the backward against finite differences, and bad configs and shapes.
#include <r1/rope.hpp>

#include "support.hpp"

using r1::Shape;
using r1::Tensor;
using r1test::max_abs_diff;
using r1test::tensor;

static r1::RopeConfig config_from(const nlohmann::json& c) {
  r1::RopeConfig cfg;
  cfg.dim = c.at("d").get<int64_t>();
  cfg.theta = c.at("theta").get<double>();
  cfg.style = c.at("convention").get<std::string>() == "interleaved" ? r1::RopeStyle::Interleaved : r1::RopeStyle::Half;
  if (c.contains("factor")) {
    cfg.factor = c.at("factor").get<double>();
    cfg.original_max_position_embeddings = c.at("original_max_position_embeddings").get<int64_t>();
    cfg.beta_fast = c.at("beta_fast").get<double>();
    cfg.beta_slow = c.at("beta_slow").get<double>();
    cfg.mscale = c.at("mscale").get<double>();
    cfg.mscale_all_dim = c.at("mscale_all_dim").get<double>();
  }
  return cfg;
}

TEST_CASE("rope matches PyTorch: interleaved, rotate-half, DeepSeek-V3 YaRN, scaled YaRN", "[rope]") {
  for (const char* name : {"rope_interleaved", "rope_half", "rope_yarn_v3", "rope_yarn_scaled"}) {
    INFO(name);
    const auto& c = r1test::fixture(name);
    const r1::Rope rope(config_from(c));
    const auto inv_freq = tensor(c, "inv_freq");
    for (int64_t i = 0; i < inv_freq.numel(); ++i) REQUIRE(rope.inv_freq[i] == Approx(inv_freq.data()[i]).epsilon(1e-14));
    REQUIRE(rope.cos_sin_scale == Approx(c.at("cos_sin_scale").get<double>()).epsilon(1e-14));

    const auto x = tensor(c, "x");
    const auto positions = tensor<int32_t>(c, "positions");
    Tensor<double> y(x.shape());
    r1::forward(rope, x, positions, y.view());
    // Angles reach 1e5 rad in the YaRN case: cos/sin there agree to about 1e-11.
    REQUIRE(max_abs_diff(y, tensor(c, "y")) < 1e-10);
    Tensor<double> dx(x.shape());
    r1::backward(rope, positions, tensor(c, "dy"), dx.view());
    REQUIRE(max_abs_diff(dx, tensor(c, "dx")) < 1e-10);
  }
}

TEST_CASE("rope: DeepSeek-V3 YaRN correction range and softmax scale", "[rope]") {
  const auto& c = r1test::fixture("rope_yarn_v3");
  const r1::Rope rope(config_from(c));
  const auto [low, high] = rope.yarn_range();
  REQUIRE(low == c.at("yarn_low").get<double>());
  REQUIRE(high == c.at("yarn_high").get<double>());
  REQUIRE(rope.attention_scale(192) == Approx(c.at("softmax_scale_192").get<double>()).epsilon(1e-14));
  REQUIRE(rope.attention_scale(192) == Approx(0.13523).margin(1e-5));  // the value DeepSeek-V3 reports
  REQUIRE(r1::yarn_mscale(1.0, 1.0) == 1.0);
}

TEST_CASE("rope backward matches finite differences; in place equals out of place", "[rope]") {
  for (auto style : {r1::RopeStyle::Interleaved, r1::RopeStyle::Half}) {
    r1::RopeConfig cfg;
    cfg.dim = 8;
    cfg.style = style;
    cfg.factor = 8.0;
    cfg.original_max_position_embeddings = 32;
    cfg.mscale = 1.0;
    cfg.mscale_all_dim = 0.3;  // makes the cos/sin scale differ from 1
    const r1::Rope rope(cfg);
    auto x = r1test::random_tensor(Shape{2, 3, 2, 8}, 21);  // [B, S, H, d]
    Tensor<int32_t> positions(Shape{6});
    for (int i = 0; i < 6; ++i) positions.data()[i] = i * 17;
    const auto w = r1test::random_tensor(x.shape(), 22);
    Tensor<double> y(x.shape());
    const auto loss = [&] {
      r1::forward(rope, x, positions, y.view());
      return r1test::weighted_sum(y, w);
    };
    Tensor<double> dx(x.shape());
    r1::backward(rope, positions, w, dx.view());
    r1test::check_gradient(x, dx, loss);

    Tensor<double> in_place = x;
    r1::forward(rope, in_place, positions, in_place.view());
    loss();
    REQUIRE(max_abs_diff(in_place, y) == 0.0);
  }
}

TEST_CASE("rope on a column slice rotates only that slice (MLA's q_pe)", "[rope]") {
  r1::RopeConfig cfg;
  cfg.dim = 4;
  const r1::Rope rope(cfg);
  auto q = r1test::random_tensor(Shape{3, 2, 6}, 23);  // [N, H, nope 2 + rope 4]
  const Tensor<double> before = q;
  Tensor<int32_t> positions(Shape{3});
  for (int i = 0; i < 3; ++i) positions.data()[i] = i + 1;
  auto pe = q.view().slice(2, 2, 6);
  r1::forward(rope, pe, positions, pe);
  Tensor<double> reference(Shape{3, 2, 4});
  r1::forward(rope, r1::to_tensor(before.view().slice(2, 2, 6)), positions, reference.view());
  REQUIRE(max_abs_diff(r1::to_tensor(q.view().slice(2, 2, 6)), reference) == 0.0);
  REQUIRE(max_abs_diff(r1::to_tensor(q.view().slice(2, 0, 2)), r1::to_tensor(before.view().slice(2, 0, 2))) == 0.0);
}

TEST_CASE("rope rejects invalid configs and shapes", "[rope][errors]") {
  r1::RopeConfig odd;
  odd.dim = 7;
  REQUIRE_R1_ERROR(r1::Rope{odd}, "[rope] dim is 7, expected a positive even number");
  r1::RopeConfig bad_yarn;
  bad_yarn.factor = 4.0;
  bad_yarn.beta_fast = 1.0;
  bad_yarn.beta_slow = 32.0;
  REQUIRE_R1_ERROR(r1::Rope{bad_yarn}, "[rope] invalid YaRN config");

  r1::RopeConfig cfg;
  cfg.dim = 8;
  const r1::Rope rope(cfg);
  Tensor<float> x(Shape{4, 2, 8}), y(Shape{4, 2, 8});
  Tensor<int32_t> positions(Shape{3});
  REQUIRE_R1_ERROR(r1::forward(rope, x, positions, y.view()), "[rope.forward] positions have shape [3], expected [4]");
  Tensor<float> wrong_dim(Shape{4, 2, 6});
  Tensor<int32_t> four(Shape{4});
  REQUIRE_R1_ERROR(r1::forward(rope, wrong_dim, four, wrong_dim.view()), "[rope.forward] input has shape [4, 2, 6]");
  REQUIRE_R1_ERROR(r1::backward(rope, four, x, wrong_dim.view()), "[rope.backward] output has shape [4, 2, 6], expected [4, 2, 8]");
  REQUIRE_R1_ERROR(r1::forward(r1::Rope{}, x, four, y.view()), "default-constructed");
}
