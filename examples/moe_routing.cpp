// moe_routing: a DeepSeekMoE layer learns a toy regression, and DeepSeek-V3's
// auxiliary-loss-free balancing evens out the expert load.
//
// The inputs carry a common offset, so at the start most tokens prefer the same few
// experts. Phase 1 trains without balancing and prints the load per expert. Phase 2 calls
// r1::update_bias after every step (b_i += gamma * sign(mean load - load_i)): the bias only
// changes which experts are chosen, never the output weights, and the load flattens.
//
//   build/examples/moe_routing [--steps 150]
#include <r1/r1.hpp>

#include <fmt/core.h>

#include <cstdlib>
#include <string>
#include <string_view>

namespace {

void print_load(std::string_view label, const r1::MoeStats& stats, double loss) {
  std::string loads;
  for (int64_t count : stats.tokens_per_expert) loads += fmt::format("{:5d}", count);
  fmt::print("{:<28} loss {:.4f}  tokens per expert [{} ]  max/mean {:.2f}\n", label, loss, loads, stats.max_over_mean_load);
}

}  // namespace

int main(int argc, char** argv) {
  const int steps = argc > 2 && std::string_view(argv[1]) == "--steps" ? std::atoi(argv[2]) : 150;
  r1::MoeConfig cfg;
  cfg.dim = 16;
  cfg.n_routed_experts = 8;
  cfg.moe_intermediate_size = 32;
  cfg.n_shared_experts = 1;
  cfg.num_experts_per_tok = 2;
  cfg.scoring_func = r1::ScoringFunc::Sigmoid;  // DeepSeek-V3's gate
  cfg.topk_method = r1::TopkMethod::NoAuxTc;
  cfg.n_group = 4;
  cfg.topk_group = 2;
  cfg.routed_scaling_factor = 2.5;

  r1::Rng rng(7);
  r1::Moe<float> moe(cfg);
  moe.visit([&](const std::string&, r1::Tensor<float>& w) { r1::fill_normal(w.view(), rng, 0.0, 0.2); });
  r1::Moe<float> grads = r1::zeros_like(moe);
  r1::ParameterRegistry<float> registry;
  registry.add("mlp.", moe, grads);
  r1::AdamW<float> adamw(registry, {.lr = 3e-3, .weight_decay = 0.0});

  // Target: a fixed random nonlinear map of x.
  const int64_t tokens = 256;
  r1::Tensor<float> target_map(r1::Shape{cfg.dim, cfg.dim}), offset(r1::Shape{cfg.dim});
  r1::fill_normal(target_map.view(), rng, 0.0, 0.5);
  r1::fill_normal(offset.view(), rng, 0.0, 1.5);
  r1::Tensor<float> x(r1::Shape{tokens, cfg.dim}), target(r1::Shape{tokens, cfg.dim}), dy(r1::Shape{tokens, cfg.dim});
  r1::MoeCache<float> cache;

  const auto train = [&](int n_steps, bool balance) {
    float loss = 0.0f;
    for (int step = 0; step < n_steps; ++step) {
      r1::fill_normal(x.view(), rng);
      x.matrix().rowwise() += offset.vector().transpose();
      target.matrix() = (x.matrix() * target_map.matrix()).array().tanh().matrix();
      const auto& y = r1::forward(moe, x, cache);
      dy.matrix() = (y.matrix() - target.matrix()) / static_cast<float>(tokens);  // d/dy of the mean 0.5 |y - t|^2
      loss = 0.5f * (y.matrix() - target.matrix()).squaredNorm() / static_cast<float>(tokens);
      registry.zero_grad();
      r1::backward(moe, cache, dy, grads);
      adamw.step();
      if (balance) r1::update_bias(moe, cache, 0.01);
    }
    return loss;
  };

  r1::forward(moe, x, cache);
  print_load("before training", r1::routing_stats(moe, cache), 0.0);
  float loss = train(steps, false);
  print_load("trained, no balancing", r1::routing_stats(moe, cache), loss);
  loss = train(steps, true);
  print_load("trained, with update_bias", r1::routing_stats(moe, cache), loss);
  fmt::print("e_score_correction_bias:");
  for (int64_t e = 0; e < cfg.n_routed_experts; ++e) fmt::print(" {:+.3f}", moe.e_score_correction_bias(e));
  fmt::print("\n");
}
