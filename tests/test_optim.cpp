// Tests for r1/optim.hpp: the registry, AdamW and clipping against torch.optim, and the
// LR schedules against their closed forms.
#include <r1/linear.hpp>
#include <r1/mlp.hpp>
#include <r1/optim.hpp>

#include "support.hpp"

#include <numbers>

using r1::Shape;
using r1::Tensor;
using r1test::max_abs_diff;
using r1test::tensor;

TEST_CASE("registry: HF names from visit, shapes checked, zero_grad", "[optim]") {
  r1::Mlp<float> mlp(4, 8), grads = r1::zeros_like(mlp);
  r1::Linear<float> head(4, 10, true), head_grads = r1::zeros_like(head);
  r1::ParameterRegistry<float> registry;
  registry.add("layers.0.mlp.", mlp, grads);
  registry.add("lm_head.", head, head_grads);
  REQUIRE(registry.size() == 5);
  REQUIRE(registry.entries()[0].name == "layers.0.mlp.gate_proj.weight");
  REQUIRE(registry.num_parameters() == 3 * 32 + 40 + 10);
  REQUIRE(&registry.value("lm_head.bias") == &head.bias);
  REQUIRE(registry.find("lm_head.bias")->decay == false);  // vectors are not decayed
  REQUIRE(registry.find("lm_head.weight")->decay == true);

  head_grads.weight.matrix().setOnes();
  registry.zero_grad();
  REQUIRE(head_grads.weight.matrix().cwiseAbs().sum() == 0.0f);

  REQUIRE_R1_ERROR(registry.add("lm_head.", head, head_grads), "[registry.add] parameter 'lm_head.weight' is already registered");
  Tensor<float> a(Shape{2, 2}), b(Shape{2, 3});
  REQUIRE_R1_ERROR(registry.add("x", a, b), "[registry.add] parameter 'x' has shape [2, 2] but its gradient has [2, 3]");
  REQUIRE_R1_ERROR(registry.value("missing"), "[registry.value] no parameter named 'missing'");
  r1::Linear<float> no_bias(4, 10);
  REQUIRE_R1_ERROR(registry.add("bad.", head, no_bias), "[registry.add] grads of 'bad.'");
}

TEST_CASE("adamw matches torch.optim.AdamW over three steps", "[optim]") {
  const auto& c = r1test::fixture("adamw");
  Tensor<double> param = tensor(c, "param"), grad(param.shape());
  const auto grads = tensor(c, "grads");
  const auto expected = tensor(c, "params_after");
  r1::ParameterRegistry<double> registry;
  registry.add("p", param, grad, /*decay=*/true);
  r1::AdamW<double> adamw(registry, {c.at("lr").get<double>(), c.at("beta1").get<double>(), c.at("beta2").get<double>(),
                                     c.at("eps").get<double>(), c.at("weight_decay").get<double>()});
  for (int step = 0; step < 3; ++step) {
    grad.vector() = grads.view().select(step).vector();
    adamw.step();
    REQUIRE(max_abs_diff(param, r1::to_tensor(expected.view().select(step))) < 1e-14);
  }
  REQUIRE(adamw.steps() == 3);
  std::vector<std::string> state;
  adamw.visit_state([&](const std::string& name, Tensor<double>&) { state.push_back(name); });
  REQUIRE(state == std::vector<std::string>{"p.exp_avg", "p.exp_avg_sq"});
}

TEST_CASE("adamw skips weight decay where the registry says so; rejects bad configs", "[optim][errors]") {
  Tensor<double> p(Shape{3}), g(Shape{3});
  p.vector().setConstant(1.0);
  r1::ParameterRegistry<double> registry;
  registry.add("norm.weight", p, g);  // a vector: no decay by default
  r1::AdamW<double> adamw(registry, {0.1, 0.9, 0.999, 1e-8, 0.5});
  adamw.step();  // zero gradient: only decay could move it
  REQUIRE(p.vector().isApproxToConstant(1.0, 0.0));

  REQUIRE_R1_ERROR((r1::AdamW<double>(registry, {0.1, 1.0, 0.999, 1e-8, 0.0})), "[adamw] betas (1, 0.999) must lie in [0, 1)");
  REQUIRE_R1_ERROR((r1::AdamW<double>(registry, {0.1, 0.9, 0.999, 0.0, 0.0})), "[adamw] invalid config");
  Tensor<double> q(Shape{2}), qg(Shape{2});
  registry.add("late", q, qg);
  REQUIRE_R1_ERROR(adamw.step(), "[adamw.step] the registry has 2 parameters, the optimizer was built for 1");
}

TEST_CASE("clip_grad_norm matches torch.nn.utils.clip_grad_norm_", "[optim]") {
  for (const char* name : {"clip_grad_norm", "clip_grad_norm_noop"}) {
    INFO(name);
    const auto& c = r1test::fixture(name);
    Tensor<double> p0(Shape{3, 4}), p1(Shape{5});
    Tensor<double> g0 = tensor(c, "g0"), g1 = tensor(c, "g1");
    r1::ParameterRegistry<double> registry;
    registry.add("a", p0, g0);
    registry.add("b", p1, g1);
    const double total = r1::clip_grad_norm(registry, c.at("max_norm").get<double>());
    REQUIRE(total == Approx(c.at("total_norm").get<double>()).epsilon(1e-14));
    REQUIRE(max_abs_diff(g0, tensor(c, "g0_clipped")) < 1e-15);
    REQUIRE(max_abs_diff(g1, tensor(c, "g1_clipped")) < 1e-15);
  }
}

TEST_CASE("clip_grad_norm leaves non-finite gradients alone and reports them", "[optim]") {
  Tensor<float> p(Shape{2}), g(Shape{2});
  g.data()[0] = INFINITY;
  g.data()[1] = 1.0f;
  r1::ParameterRegistry<float> registry;
  registry.add("p", p, g);
  REQUIRE(std::isinf(r1::clip_grad_norm(registry, 1.0)));
  REQUIRE(g.data()[1] == 1.0f);
  REQUIRE_R1_ERROR(r1::clip_grad_norm(registry, 0.0), "[clip_grad_norm] max_norm is 0, expected > 0");
}

TEST_CASE("warmup + cosine schedule", "[optim]") {
  const r1::WarmupCosine lr{1e-3, 10, 110, 1e-4};
  REQUIRE(lr(0) == 0.0);
  REQUIRE(lr(5) == Approx(5e-4));
  REQUIRE(lr(10) == Approx(1e-3));
  REQUIRE(lr(60) == Approx(1e-4 + 0.9e-3 * 0.5));  // half way: cos(pi/2) = 0
  REQUIRE(lr(35) == Approx(1e-4 + 0.9e-3 * 0.5 * (1 + std::cos(std::numbers::pi / 4))));
  REQUIRE(lr(110) == Approx(1e-4));
  REQUIRE(lr(500) == Approx(1e-4));  // stays at the floor after total_steps
  REQUIRE_R1_ERROR((r1::WarmupCosine{1e-3, 20, 10}(0)), "[warmup_cosine] warmup_steps 20 and total_steps 10");
}

TEST_CASE("warmup-stable-decay schedule, linear and cosine decay", "[optim]") {
  const r1::WarmupStableDecay linear{2e-4, 4, 100, 20, 2e-5};
  REQUIRE(linear(2) == Approx(1e-4));
  REQUIRE(linear(4) == Approx(2e-4));
  REQUIRE(linear(79) == Approx(2e-4));
  REQUIRE(linear(90) == Approx(2e-5 + 1.8e-4 * 0.5));
  REQUIRE(linear(100) == Approx(2e-5));
  r1::WarmupStableDecay cosine = linear;
  cosine.decay = r1::WarmupStableDecay::Decay::Cosine;
  REQUIRE(cosine(85) == Approx(2e-5 + 1.8e-4 * 0.5 * (1 + std::cos(std::numbers::pi / 4))));
  REQUIRE_R1_ERROR((r1::WarmupStableDecay{1e-3, 10, 20, 15}(0)), "[warmup_stable_decay] warmup_steps 10 + decay_steps 15 exceed total_steps 20");
}
