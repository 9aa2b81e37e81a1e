// Tests for r1/cuda/moe.cuh (needs a GPU): the CUDA MoE layer against the host path on the
// same inputs: routing (identical experts, weights to ~1e-6) for V3-like (sigmoid, bias,
// noaux_tc groups), V2-like (softmax greedy) and group_limited_greedy gates, ties, every
// token on one expert, idle experts, one token and topk == experts; the float layer's
// forward, backward and balance loss (~1e-4 relative); bf16 end to end; the grouped GEMMs
// in float and bf16 against a double reference with empty groups and odd sizes; bias
// updates, routing statistics, determinism and the errors the CUDA path reports.
#include <r1/cuda/moe.cuh>

#include "cuda_support.hpp"
#include "support.hpp"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

using r1::bf16;
using r1::Cuda;
using r1::Moe;
using r1::MoeCache;
using r1::MoeConfig;
using r1::Shape;
using r1::Tensor;
using r1test::to_host;

namespace {

using r1test::to_device;  // beside the Moe overload below

Tensor<float> to_float(const Tensor<bf16>& t) {
  Tensor<float> out(t.shape());
  r1::convert<bf16, float>(t.view(), out.view());
  return out;
}

// max |a - b| / max |b|: one scale for the whole tensor, as gradients have tiny elements.
template <class A, class B>
double relative_diff(const A& a, const B& b) {
  REQUIRE(a.shape() == b.shape());
  double worst = 0.0, scale = 1e-30;
  for (int64_t i = 0; i < a.numel(); ++i) {
    worst = std::max(worst, std::abs(static_cast<double>(a.data()[i]) - static_cast<double>(b.data()[i])));
    scale = std::max(scale, std::abs(static_cast<double>(b.data()[i])));
  }
  return worst / scale;
}

MoeConfig v3_config() {
  MoeConfig cfg;
  cfg.dim = 72;
  cfg.n_routed_experts = 16;
  cfg.moe_intermediate_size = 40;
  cfg.n_shared_experts = 2;
  cfg.num_experts_per_tok = 4;
  cfg.scoring_func = r1::ScoringFunc::Sigmoid;
  cfg.topk_method = r1::TopkMethod::NoAuxTc;
  cfg.n_group = 4;
  cfg.topk_group = 2;
  cfg.routed_scaling_factor = 2.5;
  cfg.aux_loss_alpha = 0.01;
  cfg.seq_aux = true;
  return cfg;
}

MoeConfig v2_config() {
  MoeConfig cfg = v3_config();
  cfg.scoring_func = r1::ScoringFunc::Softmax;
  cfg.topk_method = r1::TopkMethod::Greedy;
  cfg.n_group = 1;
  cfg.topk_group = 1;
  cfg.norm_topk_prob = false;
  cfg.routed_scaling_factor = 1.0;
  cfg.n_shared_experts = 1;
  cfg.seq_aux = false;
  return cfg;
}

Moe<float> random_moe(const MoeConfig& cfg, uint64_t seed) {
  Moe<float> moe(cfg);
  r1::Rng rng(seed);
  moe.visit([&](const std::string&, Tensor<float>& t) { r1::fill_normal(t.view(), rng, 0.0, 0.3); });
  r1::fill_normal(moe.e_score_correction_bias.view(), rng, 0.0, 0.05);
  return moe;
}

Moe<float, Cuda> to_device(const Moe<float>& host) {
  Moe<float, Cuda> device(host.config);
  r1::copy_params(host, device);
  r1::copy(host.e_score_correction_bias.view(), device.e_score_correction_bias.view());
  return device;
}

Tensor<float> random_input(Shape shape, uint64_t seed) {
  Tensor<float> x(shape);
  r1::Rng rng(seed);
  r1::fill_normal(x.view(), rng);
  return x;
}

// The host and device routings of x agree: same experts in the same order, weights and
// scores to ~1e-6, same per-expert counts.
void check_routing(const Moe<float>& host, const Tensor<float>& x) {
  MoeCache<float> host_cache;
  r1::forward(host, x, host_cache);
  const auto device = to_device(host);
  MoeCache<float, Cuda> device_cache;
  r1::forward(device, to_device(x), device_cache);
  REQUIRE(r1test::max_abs_diff(to_host(device_cache.topk_idx), host_cache.topk_idx) == 0.0);
  REQUIRE(r1test::max_abs_diff(to_host(device_cache.topk_weight), host_cache.topk_weight) < 2e-6);
  REQUIRE(r1test::max_abs_diff(to_host(device_cache.scores), host_cache.scores) < 2e-6);
  const auto host_stats = r1::routing_stats(host, host_cache), device_stats = r1::routing_stats(device, device_cache);
  REQUIRE(device_stats.tokens_per_expert == host_stats.tokens_per_expert);
  REQUIRE(device_stats.group_fraction == host_stats.group_fraction);
  REQUIRE(relative_diff(to_host(device_cache.y), host_cache.y) < 1e-4);
}

// Forward and backward of the float layer agree with the host path to ~1e-4 relative.
void check_layer(const Moe<float>& host, const Tensor<float>& x, uint64_t seed) {
  const Tensor<float> dy = random_input(x.shape(), seed);
  MoeCache<float> host_cache;
  const Tensor<float> host_y = r1::forward(host, x, host_cache);
  auto host_grads = r1::zeros_like(host);
  const Tensor<float> host_dx = r1::backward(host, host_cache, dy, host_grads);

  const auto device = to_device(host);
  MoeCache<float, Cuda> cache;
  const auto& y = r1::forward(device, to_device(x), cache);
  REQUIRE(relative_diff(to_host(y), host_y) < 1e-4);
  REQUIRE(cache.aux_loss == Approx(host_cache.aux_loss).epsilon(1e-6));
  auto grads = r1::zeros_like(device);
  const auto& dx = r1::backward(device, cache, to_device(dy), grads);
  REQUIRE(relative_diff(to_host(dx), host_dx) < 1e-4);

  Moe<float> back(host.config);
  r1::copy_params(grads, back);
  std::vector<std::pair<std::string, const Tensor<float>*>> expected;
  host_grads.visit([&](const std::string& name, Tensor<float>& t) { expected.emplace_back(name, &t); });
  std::size_t i = 0;
  back.visit([&](const std::string& name, Tensor<float>& t) {
    INFO(name);
    REQUIRE(name == expected[i].first);
    REQUIRE(relative_diff(t, *expected[i].second) < 1e-4);
    ++i;
  });
}

}  // namespace

TEST_CASE("cuda moe routing matches the host: V3 sigmoid + bias + groups, V2 softmax greedy, group-limited", "[cuda][moe]") {
  SECTION("V3: sigmoid, e_score_correction_bias, noaux_tc over 4 groups, top-2 groups") {
    check_routing(random_moe(v3_config(), 1), random_input(Shape{2, 37, 72}, 2));
  }
  SECTION("V2: softmax, greedy, no normalization") {
    check_routing(random_moe(v2_config(), 3), random_input(Shape{53, 72}, 4));
  }
  SECTION("group_limited_greedy: softmax, group max without bias") {
    MoeConfig cfg = v2_config();
    cfg.topk_method = r1::TopkMethod::GroupLimitedGreedy;
    cfg.n_group = 8;
    cfg.topk_group = 3;
    check_routing(random_moe(cfg, 5), random_input(Shape{41, 72}, 6));
  }
  SECTION("many experts and groups: 160 experts, 8 groups, top-6") {
    MoeConfig cfg = v3_config();
    cfg.n_routed_experts = 160;
    cfg.n_group = 8;
    cfg.topk_group = 3;
    cfg.num_experts_per_tok = 6;
    check_routing(random_moe(cfg, 7), random_input(Shape{300, 72}, 8));
  }
}

TEST_CASE("cuda moe routing edge cases: ties, one expert for all, idle experts, one token, topk == experts", "[cuda][moe]") {
  SECTION("a zero gate: every score ties, the lower experts and groups win") {
    Moe<float> moe = random_moe(v3_config(), 9);
    moe.gate.weight.set_zero();
    moe.e_score_correction_bias.set_zero();
    check_routing(moe, random_input(Shape{19, 72}, 10));
    moe.e_score_correction_bias(13) = 0.5f;  // group 3 wins; its other experts tie
    check_routing(moe, random_input(Shape{19, 72}, 11));
  }
  SECTION("every token on one expert, the others idle") {
    MoeConfig cfg = v3_config();
    cfg.num_experts_per_tok = 1;
    Moe<float> moe = random_moe(cfg, 12);
    moe.e_score_correction_bias.set_zero();
    moe.e_score_correction_bias(6) = 10.0f;
    check_routing(moe, random_input(Shape{70, 72}, 13));
    check_layer(moe, random_input(Shape{70, 72}, 13), 14);
  }
  SECTION("one token") {
    check_routing(random_moe(v3_config(), 15), random_input(Shape{1, 72}, 16));
    check_layer(random_moe(v3_config(), 15), random_input(Shape{1, 72}, 16), 17);
  }
  SECTION("topk == experts, greedy") {
    MoeConfig cfg = v2_config();
    cfg.num_experts_per_tok = cfg.n_routed_experts;
    check_routing(random_moe(cfg, 18), random_input(Shape{5, 72}, 19));
    check_layer(random_moe(cfg, 18), random_input(Shape{5, 72}, 19), 20);
  }
}

TEST_CASE("cuda moe forward and backward match the host in float", "[cuda][moe]") {
  SECTION("V3-like, sequence-wise balance loss over [B, S, D]") {
    check_layer(random_moe(v3_config(), 21), random_input(Shape{3, 50, 72}, 22), 23);
  }
  SECTION("V2-like, expert-level balance loss, odd sizes") {
    MoeConfig cfg = v2_config();
    cfg.dim = 37;
    cfg.moe_intermediate_size = 29;
    cfg.n_routed_experts = 9;
    cfg.num_experts_per_tok = 3;
    check_layer(random_moe(cfg, 24), random_input(Shape{131, 37}, 25), 26);
  }
  SECTION("no shared experts, no balance loss, larger than one tile everywhere") {
    MoeConfig cfg = v3_config();
    cfg.dim = 136;
    cfg.moe_intermediate_size = 100;
    cfg.n_shared_experts = 0;
    cfg.aux_loss_alpha = 0.0;
    check_layer(random_moe(cfg, 27), random_input(Shape{400, 136}, 28), 29);
  }
}

TEST_CASE("cuda moe is deterministic: two runs give the same bits", "[cuda][moe]") {
  const auto device = to_device(random_moe(v3_config(), 30));
  const auto x = to_device(random_input(Shape{2, 90, 72}, 31));
  const auto dy = to_device(random_input(Shape{2, 90, 72}, 32));
  Tensor<float> y[2], dx[2], dgate[2], dw2[2];
  for (int run = 0; run < 2; ++run) {
    MoeCache<float, Cuda> cache;
    auto grads = r1::zeros_like(device);
    y[run] = to_host(r1::forward(device, x, cache));
    dx[run] = to_host(r1::backward(device, cache, dy, grads));
    dgate[run] = to_host(grads.gate.weight);
    dw2[run] = to_host(grads.experts[5].w2.weight);
  }
  REQUIRE(r1test::max_abs_diff(y[0], y[1]) == 0.0);
  REQUIRE(r1test::max_abs_diff(dx[0], dx[1]) == 0.0);
  REQUIRE(r1test::max_abs_diff(dgate[0], dgate[1]) == 0.0);
  REQUIRE(r1test::max_abs_diff(dw2[0], dw2[1]) == 0.0);
}

TEST_CASE("cuda moe in bf16 follows the float host path on the same rounded values", "[cuda][moe]") {
  MoeConfig cfg = v3_config();
  cfg.dim = 96;
  cfg.moe_intermediate_size = 64;
  Moe<float> host = random_moe(cfg, 33);
  Moe<bf16> rounded(cfg);
  std::vector<Tensor<float>*> sources;
  host.visit([&](const std::string&, Tensor<float>& t) { sources.push_back(&t); });
  std::size_t i = 0;
  const auto round = [](Tensor<float>& from, Tensor<bf16>& to) {
    to.resize(from.shape());
    r1::convert<float, bf16>(from.view(), to.view());
    from = to_float(to);
  };
  rounded.visit([&](const std::string&, Tensor<bf16>& t) { round(*sources[i++], t); });
  round(host.e_score_correction_bias, rounded.e_score_correction_bias);
  Moe<bf16, Cuda> device(cfg);
  r1::copy_params(rounded, device);
  r1::copy(rounded.e_score_correction_bias.view(), device.e_score_correction_bias.view());

  Tensor<float> x = random_input(Shape{2, 64, cfg.dim}, 34), dy = random_input(x.shape(), 35);
  Tensor<bf16> x_bf(x.shape()), dy_bf(x.shape());
  round(x, x_bf);
  round(dy, dy_bf);

  MoeCache<float> host_cache;
  const Tensor<float> host_y = r1::forward(host, x, host_cache);
  auto host_grads = r1::zeros_like(host);
  const Tensor<float> host_dx = r1::backward(host, host_cache, dy, host_grads);

  MoeCache<bf16, Cuda> cache;
  const Tensor<float> y = to_float(to_host(r1::forward(device, to_device(x_bf), cache)));
  // The gate's products of bf16 values are exact in fp32, so the routing is the host's.
  REQUIRE(r1test::max_abs_diff(to_host(cache.topk_idx), host_cache.topk_idx) == 0.0);
  REQUIRE(relative_diff(y, host_y) < 2e-2);
  auto grads = r1::zeros_like(device);
  const Tensor<float> dx = to_float(to_host(r1::backward(device, cache, to_device(dy_bf), grads)));
  REQUIRE(relative_diff(dx, host_dx) < 3e-2);
  REQUIRE(relative_diff(to_float(to_host(grads.gate.weight)), host_grads.gate.weight) < 3e-2);
  REQUIRE(relative_diff(to_float(to_host(grads.experts[3].w1.weight)), host_grads.experts[3].w1.weight) < 3e-2);
  REQUIRE(relative_diff(to_float(to_host(grads.experts[3].w2.weight)), host_grads.experts[3].w2.weight) < 3e-2);
  REQUIRE(relative_diff(to_float(to_host(grads.shared_experts.w3.weight)), host_grads.shared_experts.w3.weight) < 3e-2);
}

namespace {

// The three grouped GEMMs against a double reference on the host, for float or bf16 T.
template <class T>
void check_grouped_gemms(const std::vector<int64_t>& counts, int64_t in, int64_t out, double tolerance) {
  const int64_t groups = static_cast<int64_t>(counts.size());
  int64_t rows = 0;
  for (int64_t c : counts) rows += c;
  r1::Rng rng(40 + static_cast<uint64_t>(in));
  const auto random = [&](Shape shape) {
    Tensor<float> f(shape);
    r1::fill_normal(f.view(), rng);
    Tensor<T> t(shape);
    r1::convert<float, T>(f.view(), t.view());
    Tensor<double> exact(shape);  // the values T holds
    for (int64_t i = 0; i < t.numel(); ++i) exact.data()[i] = r1::convert_scalar<float>(t.data()[i]);
    return std::make_pair(to_device(t), exact);
  };
  auto [x, x_ref] = random(Shape{rows, in});
  auto [dy, dy_ref] = random(Shape{rows, out});
  std::vector<Tensor<T, Cuda>> w, dw;
  std::vector<Tensor<double>> w_ref, dw_ref;
  for (int64_t g = 0; g < groups; ++g) {
    auto [wg, wg_ref] = random(Shape{out, in});
    auto [dwg, dwg_ref] = random(Shape{out, in});
    w.push_back(std::move(wg));
    w_ref.push_back(std::move(wg_ref));
    dw.push_back(std::move(dwg));
    dw_ref.push_back(std::move(dwg_ref));
  }
  r1::GroupedRows split;
  split.assign(counts);
  r1::GroupedMatrices<T> weights, dweights;
  weights.assign(groups, [&](int64_t g) -> const Tensor<T, Cuda>& { return w[g]; }, "test");
  dweights.assign(groups, [&](int64_t g) -> const Tensor<T, Cuda>& { return dw[g]; }, "test");

  Tensor<T, Cuda> y, dx;
  y.resize(Shape{rows, out});
  dx.resize(Shape{rows, in});
  r1::copy(x.view(), dx.view());  // accumulate onto x
  r1::grouped_linear<T>(x, weights, split, y);
  r1::grouped_linear_backward_input<T>(dy, weights, split, dx, /*accumulate=*/true);
  r1::grouped_linear_backward_weight<T>(dy, x, split, dweights);

  Tensor<double> y_ref(Shape{rows, out}), dx_ref = x_ref;
  int64_t begin = 0;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t end = begin + counts[g];
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t o = 0; o < out; ++o)
        for (int64_t i = 0; i < in; ++i) y_ref(r, o) += x_ref(r, i) * w_ref[g](o, i);
      for (int64_t i = 0; i < in; ++i)
        for (int64_t o = 0; o < out; ++o) dx_ref(r, i) += dy_ref(r, o) * w_ref[g](o, i);
    }
    for (int64_t o = 0; o < out; ++o)
      for (int64_t i = 0; i < in; ++i)
        for (int64_t r = begin; r < end; ++r) dw_ref[g](o, i) += dy_ref(r, o) * x_ref(r, i);
    begin = end;
  }
  const auto host_float = [](const Tensor<T, Cuda>& t) {
    const Tensor<T> h = to_host(t);
    Tensor<double> out(h.shape());
    for (int64_t i = 0; i < h.numel(); ++i) out.data()[i] = r1::convert_scalar<float>(h.data()[i]);
    return out;
  };
  if (rows > 0) {
    CHECK(relative_diff(host_float(y), y_ref) < tolerance);
    CHECK(relative_diff(host_float(dx), dx_ref) < tolerance);
  }
  for (int64_t g = 0; g < groups; ++g) {
    INFO("group " << g << " of " << counts[g] << " rows");
    CHECK(relative_diff(host_float(dw[g]), dw_ref[g]) < tolerance);
  }
}

}  // namespace

TEST_CASE("cuda grouped GEMMs: float (SIMT) and bf16 (tensor cores) against a double reference", "[cuda][moe][gemm]") {
  const std::vector<int64_t> counts{0, 1, 70, 0, 130, 64, 3};
  SECTION("float, aligned sizes") { check_grouped_gemms<float>(counts, 96, 128, 1e-5); }
  SECTION("float, odd sizes: scalar loads and tails") { check_grouped_gemms<float>(counts, 37, 45, 1e-5); }
  SECTION("bf16, aligned sizes") { check_grouped_gemms<bf16>(counts, 96, 128, 1e-2); }
  SECTION("bf16, odd sizes") { check_grouped_gemms<bf16>(counts, 37, 45, 1e-2); }
  SECTION("bf16, long reductions over one big group") { check_grouped_gemms<bf16>({0, 1000, 0}, 264, 72, 1e-2); }
  SECTION("every group empty") { check_grouped_gemms<float>({0, 0}, 16, 16, 1e-5); }
}

TEST_CASE("cuda moe update_bias and routing_stats match the host", "[cuda][moe]") {
  MoeConfig cfg = v3_config();
  cfg.num_experts_per_tok = 1;
  Moe<float> host = random_moe(cfg, 50);
  host.e_score_correction_bias.set_zero();
  host.e_score_correction_bias(3) = 10.0f;
  auto device = to_device(host);
  const auto x = random_input(Shape{20, 72}, 51);
  MoeCache<float> host_cache;
  MoeCache<float, Cuda> cache;
  r1::forward(host, x, host_cache);
  r1::forward(device, to_device(x), cache);
  const auto stats = r1::routing_stats(device, cache);
  REQUIRE(stats.tokens_per_expert[3] == 20);
  REQUIRE(stats.max_over_mean_load == Approx(r1::routing_stats(host, host_cache).max_over_mean_load));
  r1::update_bias(host, host_cache, 0.001);
  r1::update_bias(device, cache, 0.001);
  REQUIRE(r1test::max_abs_diff(to_host(device.e_score_correction_bias), host.e_score_correction_bias) == 0.0);
  REQUIRE(to_host(device.e_score_correction_bias)(3) == Approx(10.0 - 0.001));
}

TEST_CASE("cuda moe reports bad inputs before launching", "[cuda][moe]") {
  const MoeConfig cfg = v3_config();
  auto device = to_device(random_moe(cfg, 60));
  MoeCache<float, Cuda> cache;

  Tensor<float, Cuda> wide(Shape{4, cfg.dim + 1});
  const r1::View<const float, Cuda> strided = wide.view().slice(1, 0, cfg.dim);
  REQUIRE_R1_ERROR(r1::forward(device, strided, cache), "[moe.forward] x of shape [4, 72] must be contiguous on the GPU");
  Tensor<float, Cuda> empty(Shape{0, cfg.dim});
  REQUIRE_R1_ERROR(r1::forward(device, empty, cache), "[moe.forward] x has no tokens");
  Tensor<float, Cuda> bad_dim(Shape{4, cfg.dim - 1});
  REQUIRE_R1_ERROR(r1::forward(device, bad_dim, cache), "[moe.forward] x has shape [4, 71], expected [N, 72]");

  auto broken = device;
  broken.experts[1].w3.weight.resize(Shape{cfg.moe_intermediate_size + 1, cfg.dim});
  Tensor<float, Cuda> x(Shape{4, cfg.dim});
  REQUIRE_R1_ERROR(r1::forward(broken, x, cache), "[moe.forward] experts.1 has gate_proj [40, 72], up_proj [41, 72]");

  MoeConfig huge = cfg;
  huge.n_routed_experts = 6200;  // (6200 + 1) doubles per routing warp exceed 48 KiB
  huge.n_group = 1;
  huge.topk_method = r1::TopkMethod::Greedy;
  huge.moe_intermediate_size = 1;
  huge.dim = 8;
  Moe<float, Cuda> too_many(huge);
  Tensor<float, Cuda> small(Shape{2, 8});
  MoeCache<float, Cuda> huge_cache;
  REQUIRE_R1_ERROR(r1::forward(too_many, small, huge_cache), "exceed the routing kernel's shared memory");

  r1::forward(device, x, cache);
  Tensor<float, Cuda> bad_dy(Shape{4, cfg.dim + 1});
  REQUIRE_R1_ERROR(r1::backward(device, cache, bad_dy, device), "[moe.backward] dy has shape [4, 73], expected [4, 72]");
  MoeConfig greedy = cfg;
  greedy.topk_method = r1::TopkMethod::Greedy;
  Moe<float, Cuda> no_bias(greedy);
  REQUIRE_R1_ERROR(r1::update_bias(no_bias, std::vector<int64_t>(16, 1)), "[moe.update_bias] the bias only takes part");

  r1::GroupedRows split;
  split.assign({2, 2});
  std::vector<Tensor<float, Cuda>> w;
  w.emplace_back(Shape{3, 5});
  w.emplace_back(Shape{3, 6});
  r1::GroupedMatrices<float> weights;
  REQUIRE_R1_ERROR(weights.assign(2, [&](int64_t g) -> const Tensor<float, Cuda>& { return w[g]; }, "test"),
                   "[test] matrix 1 has shape [3, 6], matrix 0 has [3, 5]");
  w[1].resize(Shape{3, 5});
  weights.assign(2, [&](int64_t g) -> const Tensor<float, Cuda>& { return w[g]; }, "test");
  Tensor<float, Cuda> in(Shape{4, 5}), out(Shape{4, 4});
  REQUIRE_R1_ERROR(r1::grouped_linear<float>(in, weights, split, out), "[grouped_linear] output has shape [4, 4], expected [4, 3]");
  Tensor<float, Cuda> short_in(Shape{3, 5});
  out.resize(Shape{4, 3});
  REQUIRE_R1_ERROR(r1::grouped_linear<float>(short_in, weights, split, out),
                   "[grouped_linear] input has shape [3, 5], expected contiguous [4, 5]");
  REQUIRE_R1_ERROR(split.assign({1, -1}), "[grouped_rows.assign] group 1 has -1 rows");
}
