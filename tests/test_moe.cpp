// Tests for r1/moe.hpp: DeepSeek-V3 (sigmoid, bias, groups, sequence-wise loss) and V2
// (softmax, greedy, expert-level loss) against an independent PyTorch reference
// (tests/fixtures/gen_moe_fixtures.py), finite differences, routing edge cases, balancing
// and bad configs.
#include <r1/moe.hpp>

#include "support.hpp"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <limits>
#include <numeric>
#include <random>

// Every heap allocation of this test binary, counted: malloc and friends are replaced here
// (the executable's definitions win over glibc's) and forward to glibc's own entry points.
// free needs no counting and stays glibc's.
#if defined(__GLIBC__)  // elsewhere the test below is left out
#define R1_TEST_COUNTS_ALLOCATIONS 1
extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
}
static std::atomic<long> heap_allocations{0};
extern "C" void* malloc(std::size_t n) noexcept {
  heap_allocations.fetch_add(1, std::memory_order_relaxed);
  return __libc_malloc(n);
}
extern "C" void* calloc(std::size_t count, std::size_t n) noexcept {
  heap_allocations.fetch_add(1, std::memory_order_relaxed);
  return __libc_calloc(count, n);
}
extern "C" void* realloc(void* p, std::size_t n) noexcept {
  heap_allocations.fetch_add(1, std::memory_order_relaxed);
  return __libc_realloc(p, n);
}
extern "C" void* aligned_alloc(std::size_t alignment, std::size_t n) noexcept {
  heap_allocations.fetch_add(1, std::memory_order_relaxed);
  return __libc_memalign(alignment, n);
}
extern "C" int posix_memalign(void** p, std::size_t alignment, std::size_t n) noexcept {
  if (alignment == 0 || alignment % sizeof(void*) != 0 || (alignment & (alignment - 1)) != 0) return EINVAL;
  heap_allocations.fetch_add(1, std::memory_order_relaxed);
  void* block = __libc_memalign(alignment, n);
  if (block == nullptr) return ENOMEM;
  *p = block;
  return 0;
}
#else
#define R1_TEST_COUNTS_ALLOCATIONS 0
#endif

using r1::Moe;
using r1::MoeCache;
using r1::MoeConfig;
using r1::Shape;
using r1::Tensor;
using r1test::max_abs_diff;
using r1test::tensor;

static const nlohmann::json& moe_fixture(const std::string& name) {
  static const nlohmann::json fixtures = [] {
    std::ifstream in(R1_FIXTURE_DIR "/torch_moe.json");
    REQUIRE(in.good());
    return nlohmann::json::parse(in);
  }();
  return fixtures.at(name);
}

static MoeConfig config_from(const nlohmann::json& c) {
  MoeConfig cfg;
  cfg.dim = c.at("dim").get<int64_t>();
  cfg.n_routed_experts = c.at("experts").get<int64_t>();
  cfg.moe_intermediate_size = c.at("hidden").get<int64_t>();
  cfg.n_shared_experts = c.at("n_shared").get<int64_t>();
  cfg.num_experts_per_tok = c.at("k").get<int64_t>();
  cfg.scoring_func = c.at("scoring").get<std::string>() == "sigmoid" ? r1::ScoringFunc::Sigmoid : r1::ScoringFunc::Softmax;
  const auto method = c.at("topk_method").get<std::string>();
  cfg.topk_method = method == "noaux_tc" ? r1::TopkMethod::NoAuxTc
                    : method == "greedy" ? r1::TopkMethod::Greedy
                                         : r1::TopkMethod::GroupLimitedGreedy;
  cfg.n_group = c.at("n_group").get<int64_t>();
  cfg.topk_group = c.at("topk_group").get<int64_t>();
  cfg.norm_topk_prob = c.at("norm_topk_prob").get<bool>();
  cfg.routed_scaling_factor = c.at("scale").get<double>();
  cfg.aux_loss_alpha = c.at("alpha").get<double>();
  cfg.seq_aux = c.at("seq_aux").get<bool>();
  return cfg;
}

// Copies row e of a stacked [E, rows, cols] fixture tensor into dst.
static void take_slice(const Tensor<double>& stacked, int64_t e, Tensor<double>& dst) {
  dst = r1::to_tensor(stacked.view().select(e));
}

static Moe<double> moe_from(const nlohmann::json& c) {
  Moe<double> moe(config_from(c));
  moe.gate.weight = tensor(c, "gate");
  moe.e_score_correction_bias = tensor(c, "bias");
  const auto w1 = tensor(c, "w1"), w2 = tensor(c, "w2"), w3 = tensor(c, "w3");
  for (int64_t e = 0; e < moe.config.n_routed_experts; ++e) {
    take_slice(w1, e, moe.experts[e].w1.weight);
    take_slice(w2, e, moe.experts[e].w2.weight);
    take_slice(w3, e, moe.experts[e].w3.weight);
  }
  if (moe.has_shared()) {
    moe.shared_experts.w1.weight = tensor(c, "shared_w1");
    moe.shared_experts.w2.weight = tensor(c, "shared_w2");
    moe.shared_experts.w3.weight = tensor(c, "shared_w3");
  }
  return moe;
}

TEST_CASE("moe matches PyTorch: V3 sigmoid + bias + groups, V2 softmax greedy, with balance losses", "[moe]") {
  for (const char* name : {"moe_v3", "moe_v2"}) {
    INFO(name);
    const auto& c = moe_fixture(name);
    const auto moe = moe_from(c);
    MoeCache<double> cache;
    const auto x = tensor(c, "x");
    REQUIRE(max_abs_diff(r1::forward(moe, x, cache), tensor(c, "y")) < 1e-12);
    REQUIRE(max_abs_diff(cache.topk_idx, tensor<int32_t>(c, "topk_idx")) == 0.0);
    REQUIRE(cache.aux_loss == Approx(c.at("aux_loss").get<double>()).epsilon(1e-12));

    auto grads = r1::zeros_like(moe);
    REQUIRE(max_abs_diff(r1::backward(moe, cache, tensor(c, "dy"), grads), tensor(c, "dx")) < 1e-12);
    REQUIRE(max_abs_diff(grads.gate.weight, tensor(c, "dgate")) < 1e-12);
    const auto dw1 = tensor(c, "dw1"), dw2 = tensor(c, "dw2"), dw3 = tensor(c, "dw3");
    for (int64_t e = 0; e < moe.config.n_routed_experts; ++e) {
      INFO("expert " << e);
      REQUIRE(max_abs_diff(grads.experts[e].w1.weight, r1::to_tensor(dw1.view().select(e))) < 1e-12);
      REQUIRE(max_abs_diff(grads.experts[e].w2.weight, r1::to_tensor(dw2.view().select(e))) < 1e-12);
      REQUIRE(max_abs_diff(grads.experts[e].w3.weight, r1::to_tensor(dw3.view().select(e))) < 1e-12);
    }
    REQUIRE(max_abs_diff(grads.shared_experts.w1.weight, tensor(c, "dshared_w1")) < 1e-12);
    REQUIRE(max_abs_diff(grads.shared_experts.w2.weight, tensor(c, "dshared_w2")) < 1e-12);
    REQUIRE(max_abs_diff(grads.shared_experts.w3.weight, tensor(c, "dshared_w3")) < 1e-12);
  }
}

static MoeConfig small_config() {
  MoeConfig cfg;
  cfg.dim = 4;
  cfg.n_routed_experts = 6;
  cfg.moe_intermediate_size = 3;
  cfg.n_shared_experts = 1;
  cfg.num_experts_per_tok = 2;
  cfg.n_group = 3;
  cfg.topk_group = 2;
  cfg.routed_scaling_factor = 1.5;
  cfg.aux_loss_alpha = 0.1;
  return cfg;
}

static Moe<double> random_moe(const MoeConfig& cfg, uint64_t seed) {
  Moe<double> moe(cfg);
  r1::Rng rng(seed);
  moe.visit([&](const std::string&, Tensor<double>& t) { r1::fill_normal(t.view(), rng, 0.0, 0.6); });
  r1::fill_normal(moe.e_score_correction_bias.view(), rng, 0.0, 0.1);
  return moe;
}

TEST_CASE("moe backward matches finite differences, both scoring functions", "[moe]") {
  for (auto scoring : {r1::ScoringFunc::Sigmoid, r1::ScoringFunc::Softmax}) {
    MoeConfig cfg = small_config();
    cfg.scoring_func = scoring;
    auto moe = random_moe(cfg, 41);
    auto x = r1test::random_tensor(Shape{2, 3, 4}, 42);
    const auto w = r1test::random_tensor(Shape{2, 3, 4}, 43);
    MoeCache<double> cache;
    const auto loss = [&] { return r1test::weighted_sum(r1::forward(moe, x, cache), w) + cache.aux_loss; };
    loss();
    auto grads = r1::zeros_like(moe);
    const Tensor<double> dx = r1::backward(moe, cache, w, grads);
    // Small steps: routing is piecewise constant, and no choice is near a tie here.
    r1test::check_gradient(x, dx, loss, 1e-6, 1e-6);
    r1test::check_gradient(moe.gate.weight, grads.gate.weight, loss, 1e-6, 1e-6);
    for (int64_t e = 0; e < cfg.n_routed_experts; ++e) r1test::check_gradient(moe.experts[e].w1.weight, grads.experts[e].w1.weight, loss);
    r1test::check_gradient(moe.experts[2].w2.weight, grads.experts[2].w2.weight, loss);
    r1test::check_gradient(moe.shared_experts.w3.weight, grads.shared_experts.w3.weight, loss);
  }
}

TEST_CASE("moe routing: ties go to the lower expert; groups are respected", "[moe]") {
  MoeConfig cfg = small_config();
  cfg.n_shared_experts = 0;
  cfg.aux_loss_alpha = 0.0;
  Moe<double> moe(cfg);  // zero gate: every score ties
  MoeCache<double> cache;
  r1::forward(moe, r1test::random_tensor(Shape{5, 4}, 44), cache);
  for (int64_t n = 0; n < 5; ++n) {
    REQUIRE(cache.topk_idx(n, 0) == 0);
    REQUIRE(cache.topk_idx(n, 1) == 1);
  }
  // Bias toward expert 5 (group 2) and 4 (group 2): both groups' winners come from there.
  moe.e_score_correction_bias(5) = 1.0;
  moe.e_score_correction_bias(4) = 0.5;
  r1::forward(moe, r1test::random_tensor(Shape{5, 4}, 45), cache);
  for (int64_t n = 0; n < 5; ++n) {
    REQUIRE(cache.topk_idx(n, 0) == 5);
    REQUIRE(cache.topk_idx(n, 1) == 4);
    REQUIRE(cache.topk_weight(n, 0) == Approx(0.75));  // equal sigmoid(0) scores, normalized, x1.5
  }
  const auto stats = r1::routing_stats(moe, cache);
  REQUIRE(stats.tokens_per_expert == std::vector<int64_t>{0, 0, 0, 0, 5, 5});  // experts 0-3 get nothing
  REQUIRE(stats.max_over_mean_load == Approx(3.0));
  REQUIRE(stats.group_fraction == std::vector<double>{0.0, 0.0, 1.0});
}

// The routing's insertion top-k against whole stable sorts, on scores drawn from a few
// levels so that most comparisons tie.
static std::vector<int32_t> sorted_route(const MoeConfig& cfg, const std::vector<double>& choice) {
  const auto by_value = [](const std::vector<double>& v) {
    std::vector<int32_t> order(v.size());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return v[a] > v[b]; });
    return order;
  };
  std::vector<double> masked = choice;
  if (cfg.topk_method != r1::TopkMethod::Greedy) {
    const int64_t size = cfg.n_routed_experts / cfg.n_group;
    std::vector<double> group_score;
    for (int64_t g = 0; g < cfg.n_group; ++g) {
      const std::vector<double> members(choice.begin() + g * size, choice.begin() + (g + 1) * size);
      const auto order = by_value(members);
      group_score.push_back(cfg.topk_method == r1::TopkMethod::NoAuxTc ? members[order[0]] + members[order[1]] : members[order[0]]);
    }
    const auto groups = by_value(group_score);
    for (int64_t e = 0; e < cfg.n_routed_experts; ++e)
      if (std::find(groups.begin(), groups.begin() + cfg.topk_group, e / size) == groups.begin() + cfg.topk_group)
        masked[e] = -std::numeric_limits<double>::infinity();
  }
  auto order = by_value(masked);
  order.resize(static_cast<std::size_t>(cfg.num_experts_per_tok));
  return order;
}

TEST_CASE("moe routing equals a full stable sort, ties everywhere", "[moe]") {
  std::mt19937 rng(52);
  std::uniform_int_distribution<int> level(0, 3);
  for (const auto method : {r1::TopkMethod::Greedy, r1::TopkMethod::GroupLimitedGreedy, r1::TopkMethod::NoAuxTc})
  for (const int64_t k : {int64_t{1}, int64_t{5}}) {
    MoeConfig cfg{.dim = 4, .n_routed_experts = 16, .moe_intermediate_size = 2, .num_experts_per_tok = k,
                  .topk_method = method, .n_group = 4, .topk_group = k == 1 ? 1 : 2};
    Moe<double> moe(cfg);
    for (int64_t e = 0; e < 16; ++e) moe.e_score_correction_bias(e) = 0.25 * level(rng);
    MoeCache<double> cache;
    const int64_t tokens = 64;
    cache.scores = Tensor<double>(Shape{tokens, 16});
    for (int64_t i = 0; i < cache.scores.numel(); ++i) cache.scores.data()[i] = 0.25 * level(rng);
    cache.topk_idx.resize(Shape{tokens, k});
    cache.topk_weight.resize(Shape{tokens, k});
    r1::MoeImpl<r1::Cpu>::route(moe, cache);
    for (int64_t n = 0; n < tokens; ++n) {
      std::vector<double> choice(16);
      for (int64_t e = 0; e < 16; ++e)
        choice[e] = cache.scores(n, e) + (method == r1::TopkMethod::NoAuxTc ? moe.e_score_correction_bias(e) : 0.0);
      const auto expected = sorted_route(cfg, choice);
      for (int64_t j = 0; j < k; ++j) REQUIRE(cache.topk_idx(n, j) == expected[j]);
    }
  }
}

TEST_CASE("moe edge cases: one token, every token on one expert, topk equal to the experts", "[moe]") {
  MoeConfig cfg = small_config();
  cfg.topk_method = r1::TopkMethod::Greedy;
  cfg.num_experts_per_tok = 6;
  auto moe = random_moe(cfg, 46);
  auto one = r1test::random_tensor(Shape{1, 4}, 47);
  MoeCache<double> cache;
  const auto w = r1test::random_tensor(Shape{1, 4}, 48);
  const auto loss = [&] { return r1test::weighted_sum(r1::forward(moe, one, cache), w) + cache.aux_loss; };
  loss();
  auto grads = r1::zeros_like(moe);
  const Tensor<double> dx = r1::backward(moe, cache, w, grads);
  r1test::check_gradient(one, dx, loss);
  r1test::check_gradient(moe.gate.weight, grads.gate.weight, loss);
  REQUIRE(r1::routing_stats(moe, cache).max_over_mean_load == Approx(1.0));

  MoeConfig single = small_config();
  single.num_experts_per_tok = 1;
  auto focused = random_moe(single, 49);
  focused.e_score_correction_bias.vector().setZero();
  focused.e_score_correction_bias(3) = 10.0;  // every token picks expert 3
  MoeCache<double> focused_cache;
  auto x = r1test::random_tensor(Shape{6, 4}, 50);
  const auto wx = r1test::random_tensor(Shape{6, 4}, 51);
  const auto focused_loss = [&] { return r1test::weighted_sum(r1::forward(focused, x, focused_cache), wx) + focused_cache.aux_loss; };
  focused_loss();
  REQUIRE(r1::routing_stats(focused, focused_cache).tokens_per_expert == std::vector<int64_t>{0, 0, 0, 6, 0, 0});
  auto focused_grads = r1::zeros_like(focused);
  const Tensor<double> fdx = r1::backward(focused, focused_cache, wx, focused_grads);
  r1test::check_gradient(x, fdx, focused_loss);
  REQUIRE(focused_grads.experts[0].w1.weight.matrix().cwiseAbs().maxCoeff() == 0.0);  // idle experts get no gradient
}

TEST_CASE("moe aux-loss-free balancing moves the bias against the load", "[moe]") {
  MoeConfig cfg = small_config();
  cfg.num_experts_per_tok = 1;
  auto moe = random_moe(cfg, 52);
  moe.e_score_correction_bias.vector().setZero();
  moe.e_score_correction_bias(3) = 10.0;
  MoeCache<double> cache;
  r1::forward(moe, r1test::random_tensor(Shape{6, 4}, 53), cache);
  r1::update_bias(moe, cache, 0.001);
  REQUIRE(moe.e_score_correction_bias(3) == Approx(10.0 - 0.001));
  REQUIRE(moe.e_score_correction_bias(0) == Approx(0.001));

  MoeConfig greedy = cfg;
  greedy.topk_method = r1::TopkMethod::Greedy;
  Moe<double> no_bias(greedy);
  r1::forward(no_bias, r1test::random_tensor(Shape{2, 4}, 54), cache);
  REQUIRE_R1_ERROR(r1::update_bias(no_bias, cache), "[moe.update_bias] the bias only takes part in routing with topk_method noaux_tc");
}

TEST_CASE("moe gives bit-identical results on 1 and 2 threads", "[moe][parallel]") {
  MoeConfig cfg = small_config();
  cfg.dim = 64;
  cfg.moe_intermediate_size = 48;
  auto moe = random_moe(cfg, 55);
  auto x = r1test::random_tensor(Shape{4, 50, 64}, 56);
  const auto dy = r1test::random_tensor(x.shape(), 57);
  Tensor<double> y[2], dx[2], dgate[2];
  for (int threads : {1, 2}) {
    r1::set_num_threads(threads);
    MoeCache<double> cache;
    auto grads = r1::zeros_like(moe);
    y[threads - 1] = r1::forward(moe, x, cache);
    dx[threads - 1] = r1::backward(moe, cache, dy, grads);
    dgate[threads - 1] = grads.gate.weight;
  }
  REQUIRE(max_abs_diff(y[0], y[1]) == 0.0);
  REQUIRE(max_abs_diff(dx[0], dx[1]) == 0.0);
  REQUIRE(max_abs_diff(dgate[0], dgate[1]) == 0.0);
}

// The layer's buffers live in its cache and are reused once they are large enough, so a
// warmed-up step allocates a fixed handful of small bookkeeping buffers however many tokens
// it routes; an allocation per token or per row (an Eigen temporary in a row loop once made
// thousands per step) fails this. Only with r1's own SGEMM: Eigen's and OpenBLAS's products
// allocate their blocking buffers per call once those outgrow the stack.
#if R1_TEST_COUNTS_ALLOCATIONS && R1_SIMD_SGEMM && !defined(R1_USE_OPENBLAS)
TEST_CASE("moe forward+backward: allocations per warmed-up step do not grow with the tokens", "[moe][alloc]") {
  MoeConfig cfg = small_config();
  cfg.dim = 64;
  cfg.moe_intermediate_size = 32;
  cfg.n_routed_experts = 16;
  cfg.num_experts_per_tok = 4;
  cfg.n_group = 4;
  Moe<float> moe(cfg);
  r1::Rng rng(61);
  moe.visit([&](const std::string&, Tensor<float>& t) { r1::fill_normal(t.view(), rng, 0.0, 0.3); });
  auto grads = r1::zeros_like(moe);
  r1::set_num_threads(2);
  const auto allocations_per_step = [&](int64_t tokens) {
    const auto x = r1test::random_tensor<float>(Shape{tokens, cfg.dim}, 62);
    const auto dy = r1test::random_tensor<float>(Shape{tokens, cfg.dim}, 63);
    MoeCache<float> cache;
    for (int warmup = 0; warmup < 2; ++warmup) {
      r1::forward(moe, x, cache);
      r1::backward(moe, cache, dy, grads);
    }
    const long before = heap_allocations.load();
    r1::forward(moe, x, cache);
    r1::backward(moe, cache, dy, grads);
    return heap_allocations.load() - before;
  };
  const long few = allocations_per_step(256), many = allocations_per_step(2048);
  INFO("256 tokens: " << few << " allocations, 2048 tokens: " << many);
  REQUIRE(few < 100);
  REQUIRE(many <= few);
}
#endif

TEST_CASE("moe rejects invalid configs and bad input", "[moe][errors]") {
  MoeConfig cfg = small_config();
  cfg.num_experts_per_tok = 7;
  REQUIRE_R1_ERROR(Moe<float>{cfg}, "[moe] num_experts_per_tok 7 must lie in [1, n_routed_experts = 6]");
  cfg = small_config();
  cfg.n_group = 4;
  REQUIRE_R1_ERROR(Moe<float>{cfg}, "[moe] n_group 4 does not divide n_routed_experts 6");
  cfg = small_config();
  cfg.topk_group = 4;
  REQUIRE_R1_ERROR(Moe<float>{cfg}, "[moe] topk_group 4 must lie in [1, n_group = 3]");
  cfg = small_config();
  cfg.topk_group = 1;
  cfg.num_experts_per_tok = 3;
  REQUIRE_R1_ERROR(Moe<float>{cfg}, "[moe] topk_group 1 groups of 2 experts cannot hold num_experts_per_tok = 3");
  cfg = small_config();
  cfg.dim = 0;
  REQUIRE_R1_ERROR(Moe<float>{cfg}, "[moe] dim 0");

  Moe<float> moe(small_config());
  MoeCache<float> cache;
  REQUIRE_R1_ERROR(r1::forward(moe, Tensor<float>(Shape{3, 5}), cache), "[moe.forward] x has shape [3, 5], expected [N, 4]");
  auto grads = r1::zeros_like(moe);
  REQUIRE_R1_ERROR(r1::backward(moe, cache, Tensor<float>(Shape{3, 4}), grads), "[moe.backward] the cache holds no forward pass");
  REQUIRE_R1_ERROR(r1::forward(Moe<float>{}, Tensor<float>(Shape{3, 4}), cache), "[moe.forward] the layer has 0 experts");
}
