// Tests for r1/grpo.hpp and r1/rewards.hpp: hand-computed advantages, reductions and clip
// fractions; golden values from an independent PyTorch implementation of TRL's and verl's
// formulas (tests/fixtures/gen_grpo_fixtures.py); finite differences of every backward;
// table-driven reward cases; and bad input.
#include <r1/grpo.hpp>
#include <r1/rewards.hpp>

#include "support.hpp"

#include <cmath>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

using r1::Shape;
using r1::Tensor;
using r1test::max_abs_diff;

namespace {

const double kNaN = std::numeric_limits<double>::quiet_NaN();

const nlohmann::json& grpo_fixture(const std::string& name) {
  static const nlohmann::json fixtures = [] {
    std::ifstream in(R1_FIXTURE_DIR "/torch_grpo.json");
    if (!in) throw std::runtime_error("cannot open " R1_FIXTURE_DIR "/torch_grpo.json");
    return nlohmann::json::parse(in);
  }();
  return fixtures.at(name);
}

// Like r1test::tensor, with null read as NaN.
Tensor<double> tensor_or_nan(const nlohmann::json& c, const std::string& name) {
  const auto& t = c.at(name);
  Tensor<double> out(r1test::shape_of(t));
  const auto& data = t.at("data");
  REQUIRE(static_cast<int64_t>(data.size()) == out.numel());
  for (int64_t i = 0; i < out.numel(); ++i) out.data()[i] = data[i].is_null() ? kNaN : data[i].get<double>();
  return out;
}

Tensor<double> make(Shape shape, std::initializer_list<double> values) {
  Tensor<double> t(shape);
  REQUIRE(static_cast<int64_t>(values.size()) == t.numel());
  std::copy(values.begin(), values.end(), t.data());
  return t;
}

bool same(double a, double b, double tolerance = 1e-12) {
  return (std::isnan(a) && std::isnan(b)) || std::abs(a - b) <= tolerance * std::max(1.0, std::abs(b));
}

// The loss inputs shared by every fixture case (B = 5, T = 6).
struct LossData {
  Tensor<double> log_probs, old_log_probs, ref_log_probs, mask, advantages, entropy;
  LossData() {
    const auto& c = grpo_fixture("loss_inputs");
    log_probs = r1test::tensor(c, "log_probs");
    old_log_probs = r1test::tensor(c, "old_log_probs");
    ref_log_probs = r1test::tensor(c, "ref_log_probs");
    mask = r1test::tensor(c, "mask");
    advantages = r1test::tensor(c, "advantages");
    entropy = r1test::tensor(c, "entropy");
  }
};

struct FixtureLoss {
  r1::GrpoLoss loss;
  bool use_old = true;
  std::vector<uint8_t> truncated;
  double token_count = 0.0;
};

FixtureLoss loss_from(const nlohmann::json& cfg) {
  FixtureLoss f;
  f.loss.loss_type = r1::parse_option<r1::LossType>(cfg.at("loss_type").get<std::string>());
  f.loss.importance_sampling_level = r1::parse_option<r1::ImportanceSampling>(cfg.at("level").get<std::string>());
  f.loss.epsilon = cfg.at("epsilon").get<double>();
  if (cfg.at("epsilon_high").get<double>() != f.loss.epsilon) f.loss.epsilon_high = cfg.at("epsilon_high").get<double>();
  f.loss.clip_ratio_c = cfg.at("clip_ratio_c").get<double>();
  f.loss.max_completion_length = cfg.at("max_completion_length").get<int64_t>();
  const auto kl = cfg.at("kl").get<std::string>();
  if (kl != "none") {
    f.loss.kl_estimator = r1::parse_option<r1::KlEstimator>(kl);
    f.loss.beta = cfg.at("beta").get<double>();
  }
  f.use_old = cfg.at("use_old").get<bool>();
  if (!cfg.at("truncated").is_null()) {
    f.loss.mask_truncated_completions = true;
    for (const auto& v : cfg.at("truncated")) f.truncated.push_back(static_cast<uint8_t>(v.get<int>()));
  }
  f.token_count = cfg.at("token_count").get<double>();
  return f;
}

r1::GrpoInputs<double> inputs_of(const LossData& d, const FixtureLoss& f, const Tensor<double>& advantages) {
  r1::GrpoInputs<double> in;
  in.log_probs = d.log_probs;
  in.mask = d.mask;
  in.advantages = advantages;
  if (f.use_old) in.old_log_probs = d.old_log_probs;
  in.ref_log_probs = d.ref_log_probs;
  in.entropy = d.entropy;
  in.truncated = f.truncated;
  in.token_count = f.token_count;
  return in;
}

void check_loss_case(const std::string& name) {
  INFO("case " << name);
  static const LossData data;
  const auto& c = grpo_fixture(name);
  const FixtureLoss f = loss_from(c.at("config"));
  const Tensor<double> advantages = c.contains("advantages") ? r1test::tensor(c, "advantages") : data.advantages;
  r1::GrpoCache<double> cache;
  const double loss = r1::forward(f.loss, inputs_of(data, f, advantages), cache);
  CHECK(same(loss, c.at("loss").get<double>()));
  CHECK(max_abs_diff(r1::backward(f.loss, cache), r1test::tensor(c, "grad")) < 1e-12);
  const r1::GrpoMetrics& m = cache.metrics;
  CHECK(same(m.loss, loss));
  CHECK(same(m.clip_ratio_low, c.at("clip_ratio_low").get<double>()));
  CHECK(same(m.clip_ratio_high, c.at("clip_ratio_high").get<double>()));
  CHECK(same(m.clip_ratio_region, c.at("clip_ratio_region").get<double>()));
  CHECK(same(m.clip_ratio_dual, c.at("clip_ratio_dual").get<double>()));
  CHECK(same(m.kl, c.at("kl").get<double>()));
  CHECK(same(m.entropy, c.at("entropy").get<double>()));
  CHECK(m.tokens == c.at("tokens").get<double>());
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Log-probs

TEST_CASE("token_log_probs matches PyTorch with a temperature and an ignored target", "[grpo][log_probs]") {
  const auto& c = grpo_fixture("log_probs");
  const r1::TokenLogProbs p{c.at("temperature").get<double>()};
  const Tensor<double> logits = r1test::tensor(c, "logits"), w = r1test::tensor(c, "w");
  const Tensor<double> target_values = r1test::tensor(c, "targets");
  Tensor<int32_t> targets(target_values.shape());
  for (int64_t i = 0; i < targets.numel(); ++i) targets.data()[i] = static_cast<int32_t>(target_values.data()[i]);
  r1::TokenLogProbsCache<double> cache;
  REQUIRE(max_abs_diff(r1::forward(p, logits, targets, cache), r1test::tensor(c, "log_probs")) < 1e-13);
  REQUIRE(max_abs_diff(cache.entropy, r1test::tensor(c, "entropy")) < 1e-13);
  REQUIRE(max_abs_diff(r1::backward(p, cache, w), r1test::tensor(c, "dlogits")) < 1e-13);
}

TEST_CASE("token_log_probs backward matches finite differences at several temperatures", "[grpo][log_probs]") {
  for (const double tau : {1.0, 0.6, 1.7}) {
    INFO("temperature " << tau);
    auto logits = r1test::random_tensor(Shape{2, 4, 9}, 41, 2.0);  // [B, S, V]
    const auto w = r1test::random_tensor(Shape{2, 4}, 42);
    Tensor<int32_t> targets(Shape{2, 4});
    const int32_t values[] = {8, 0, -100, 3, 5, 5, 1, 7};
    std::copy(values, values + 8, targets.data());
    const r1::TokenLogProbs p{tau};
    r1::TokenLogProbsCache<double> cache;
    const auto loss = [&] { return r1test::weighted_sum(r1::forward(p, logits, targets, cache), w); };
    loss();
    REQUIRE(cache.log_probs(0, 2) == 0.0);
    const Tensor<double> dlogits = r1::backward(p, cache, w);
    r1test::check_gradient(logits, dlogits, loss);
    for (int v = 0; v < 9; ++v) REQUIRE(dlogits(0, 2, v) == 0.0);  // the ignored target
  }
}

TEST_CASE("token_log_probs entropy is log V for equal logits and 0 for a certain token", "[grpo][log_probs]") {
  Tensor<double> logits(Shape{2, 4});
  logits(1, 2) = 1e4;
  Tensor<int32_t> targets(Shape{2});
  targets.data()[1] = 2;
  r1::TokenLogProbsCache<double> cache;
  r1::forward(r1::TokenLogProbs{0.5}, logits, targets, cache);
  REQUIRE(cache.entropy.data()[0] == Approx(std::log(4.0)).epsilon(1e-14));
  REQUIRE(std::abs(cache.entropy.data()[1]) < 1e-12);
  REQUIRE(cache.log_probs.data()[0] == Approx(-std::log(4.0)).epsilon(1e-14));
}

TEST_CASE("token_log_probs rejects bad temperatures, targets and shapes", "[grpo][log_probs][errors]") {
  Tensor<float> logits(Shape{3, 5});
  Tensor<int32_t> targets(Shape{3});
  r1::TokenLogProbsCache<float> cache;
  REQUIRE_R1_ERROR(r1::forward(r1::TokenLogProbs{0.0}, logits, targets, cache),
                   "[token_log_probs.forward] temperature is 0, expected > 0");
  REQUIRE_R1_ERROR(r1::forward(r1::TokenLogProbs{-1.0}, logits, targets, cache), "temperature is -1");
  targets.data()[2] = 5;
  REQUIRE_R1_ERROR(r1::forward(r1::TokenLogProbs{}, logits, targets, cache),
                   "[token_log_probs.forward] target 5 at position 2 is out of range [0, 5)");
  REQUIRE_R1_ERROR(r1::forward(r1::TokenLogProbs{}, logits, Tensor<int32_t>(Shape{4}), cache),
                   "[token_log_probs.forward] targets have shape [4], logits [3, 5]");
  REQUIRE_R1_ERROR(r1::backward(r1::TokenLogProbs{}, cache, Tensor<float>(Shape{3})),
                   "[token_log_probs.backward] the cache holds no forward pass");
  targets.data()[2] = 1;
  r1::forward(r1::TokenLogProbs{}, logits, targets, cache);
  REQUIRE_R1_ERROR(r1::backward(r1::TokenLogProbs{}, cache, Tensor<float>(Shape{2})),
                   "[token_log_probs.backward] dlog_probs have shape [2], expected [3]");
}

// ---------------------------------------------------------------------------------------
// Advantages

TEST_CASE("advantages: group std scaling, a size-1 group, non-contiguous ids", "[grpo][advantages]") {
  const Tensor<double> rewards = make(Shape{5}, {1.0, 5.0, 0.0, 1.0, 2.0});
  const std::vector<int64_t> ids = {4, 9, 4, 4, 2};  // group 4: {1, 0, 1}; 9 and 2 alone
  Tensor<double> adv;
  const r1::RewardStats stats = r1::compute_advantages(r1::AdvantageConfig{}, rewards, {}, ids, adv);
  const double s = std::sqrt(1.0 / 3.0) + 1e-4;  // unbiased std of {1, 0, 1} + TRL's epsilon
  CHECK(adv(0) == Approx((1.0 - 2.0 / 3.0) / s).epsilon(1e-14));
  CHECK(adv(2) == Approx((0.0 - 2.0 / 3.0) / s).epsilon(1e-14));
  CHECK(adv(3) == Approx((1.0 - 2.0 / 3.0) / s).epsilon(1e-14));
  CHECK(adv(1) == 0.0);  // a group of one: its own mean, std 0
  CHECK(adv(4) == 0.0);
  CHECK(stats.reward_mean == Approx(9.0 / 5.0));
  CHECK(stats.frac_reward_zero_std == Approx(2.0 / 5.0));
  CHECK(stats.reward_std == Approx(3.0 * std::sqrt(1.0 / 3.0) / 5.0));
  REQUIRE(stats.mean.size() == 1);
  CHECK(stats.mean[0] == Approx(9.0 / 5.0));
}

TEST_CASE("advantages: NaN rewards count as 0 in the weighted sum; batch and no scaling", "[grpo][advantages]") {
  // R = nansum(w r) = {1, 0 (all NaN), 1 + 0.5 * 2 = 2}
  const Tensor<double> rewards = make(Shape{3, 2}, {1.0, kNaN, kNaN, kNaN, 1.0, 2.0});
  const std::vector<double> weights = {1.0, 0.5};
  const std::vector<int64_t> ids = {7, 7, 7};
  Tensor<double> adv;
  r1::AdvantageConfig config;
  config.epsilon = 1e-15;
  const r1::RewardStats stats = r1::compute_advantages(config, rewards, weights, ids, adv);
  CHECK(adv(0) == Approx(0.0).margin(1e-15));  // mean 1, std 1
  CHECK(adv(1) == Approx(-1.0));
  CHECK(adv(2) == Approx(1.0));
  CHECK(stats.mean[0] == Approx(1.0));  // nanmean over {1, 1}
  CHECK(stats.std[0] == 0.0);
  CHECK(stats.mean[1] == Approx(2.0));  // one value: std 0
  CHECK(stats.std[1] == 0.0);

  config.scale_rewards = r1::RewardScaling::None;  // Dr. GRPO
  r1::compute_advantages(config, rewards, weights, ids, adv);
  CHECK(adv(1) == Approx(-1.0));
  CHECK(adv(2) == Approx(1.0));

  // Batch: the group mean, the batch std (here groups {1, 0} and {2}).
  const std::vector<int64_t> split = {1, 1, 2};
  config.scale_rewards = r1::RewardScaling::Batch;
  config.epsilon = 1e-6;
  r1::compute_advantages(config, rewards, weights, split, adv);
  CHECK(adv(0) == Approx(0.5 / (1.0 + 1e-6)).epsilon(1e-14));
  CHECK(adv(1) == Approx(-0.5 / (1.0 + 1e-6)).epsilon(1e-14));
  CHECK(adv(2) == 0.0);
}

TEST_CASE("advantages: normalize_then_sum normalizes each function in its group, then the batch", "[grpo][advantages]") {
  // f0 = {1, 3}: z = -+1/sqrt(2); f1 = {NaN, 5}: one value, contributes 0.
  const Tensor<double> rewards = make(Shape{2, 2}, {1.0, kNaN, 3.0, 5.0});
  const std::vector<double> weights = {1.0, 2.0};
  const std::vector<int64_t> ids = {0, 0};
  r1::AdvantageConfig config;
  config.aggregation = r1::RewardAggregation::NormalizeThenSum;
  config.epsilon = 1e-15;
  Tensor<double> adv;
  r1::compute_advantages(config, rewards, weights, ids, adv);
  CHECK(adv(0) == Approx(-1.0 / std::sqrt(2.0)).epsilon(1e-14));
  CHECK(adv(1) == Approx(1.0 / std::sqrt(2.0)).epsilon(1e-14));
}

TEST_CASE("advantages match PyTorch for every aggregation and scaling", "[grpo][advantages]") {
  for (const char* name :
       {"adv_sum_group", "adv_sum_batch", "adv_sum_none", "adv_sum_group_verl_eps", "adv_normalize_then_sum"}) {
    INFO("case " << name);
    const auto& c = grpo_fixture(name);
    r1::AdvantageConfig config;
    config.aggregation = r1::parse_option<r1::RewardAggregation>(c.at("aggregation").get<std::string>());
    config.scale_rewards = r1::parse_option<r1::RewardScaling>(c.at("scale").get<std::string>());
    config.epsilon = c.at("epsilon").get<double>();
    const auto weights = c.at("weights").get<std::vector<double>>();
    const auto ids = c.at("group_ids").get<std::vector<int64_t>>();
    Tensor<double> adv;
    const r1::RewardStats stats = r1::compute_advantages(config, tensor_or_nan(c, "rewards"), weights, ids, adv);
    CHECK(max_abs_diff(adv, r1test::tensor(c, "advantages")) < 1e-12);
    for (std::size_t f = 0; f < weights.size(); ++f) {
      CHECK(same(stats.mean[f], c.at("func_mean")[f].get<double>()));
      CHECK(same(stats.std[f], c.at("func_std")[f].get<double>()));
    }
    CHECK(same(stats.reward_mean, c.at("reward_mean").get<double>()));
    CHECK(same(stats.reward_std, c.at("reward_std").get<double>()));
    CHECK(same(stats.frac_reward_zero_std, c.at("frac_reward_zero_std").get<double>()));
  }
}

TEST_CASE("process supervision: cumulative normalized step rewards", "[grpo][advantages]") {
  // One group; step rewards {1.0, 0.2, 0.6}: mean 0.6, std 0.4, normalized {1, -1, 0}.
  const std::vector<std::vector<r1::ProcessStep>> steps = {{{1, 1.0}, {3, 0.2}}, {{2, 0.6}}};
  const std::vector<int64_t> ids = {5, 5};
  r1::AdvantageConfig config;
  config.epsilon = 1e-15;
  Tensor<double> adv;
  r1::process_advantages(config, steps, ids, 5, adv);
  const double expected[2][5] = {{0, 0, -1, -1, 0}, {0, 0, 0, 0, 0}};  // token 4: after every step
  for (int b = 0; b < 2; ++b)
    for (int t = 0; t < 5; ++t) CHECK(adv(b, t) == Approx(expected[b][t]).margin(1e-14));

  for (const char* name : {"process_group", "process_batch", "process_none"}) {
    INFO("case " << name);
    const auto& c = grpo_fixture(name);
    std::vector<std::vector<r1::ProcessStep>> fixture_steps;
    for (const auto& completion : c.at("steps")) {
      fixture_steps.emplace_back();
      for (const auto& s : completion) fixture_steps.back().push_back({s[0].get<int64_t>(), s[1].get<double>()});
    }
    r1::AdvantageConfig cfg;
    cfg.scale_rewards = r1::parse_option<r1::RewardScaling>(c.at("scale").get<std::string>());
    cfg.epsilon = c.at("epsilon").get<double>();
    r1::process_advantages(cfg, fixture_steps, c.at("group_ids").get<std::vector<int64_t>>(), c.at("tokens").get<int64_t>(),
                           adv);
    CHECK(max_abs_diff(adv, r1test::tensor(c, "advantages")) < 1e-12);
  }
}

TEST_CASE("advantages reject bad input", "[grpo][advantages][errors]") {
  const Tensor<double> rewards(Shape{4, 2});
  Tensor<double> adv;
  const std::vector<int64_t> three = {0, 0, 1}, four = {0, 0, 1, 1};
  REQUIRE_R1_ERROR(r1::compute_advantages(r1::AdvantageConfig{}, rewards, {}, three, adv),
                   "[advantages] 3 group ids for 4 completions");
  const std::vector<double> weights = {1.0, 2.0, 3.0};
  REQUIRE_R1_ERROR(r1::compute_advantages(r1::AdvantageConfig{}, rewards, weights, four, adv),
                   "[advantages] 3 weights for 2 reward functions");
  Tensor<double> bad = rewards;
  bad(2, 1) = std::numeric_limits<double>::infinity();
  REQUIRE_R1_ERROR(r1::compute_advantages(r1::AdvantageConfig{}, bad, {}, four, adv),
                   "[advantages] reward of function 1 for completion 2 is inf");
  r1::AdvantageConfig negative;
  negative.epsilon = -1.0;
  REQUIRE_R1_ERROR(r1::compute_advantages(negative, rewards, {}, four, adv), "[advantages] epsilon is -1, expected > 0");
  negative.epsilon = 0.0;
  REQUIRE_R1_ERROR(r1::compute_advantages(negative, rewards, {}, four, adv), "[advantages] epsilon is 0, expected > 0");
  REQUIRE_R1_ERROR(r1::compute_advantages(r1::AdvantageConfig{}, Tensor<double>(Shape{0}), {}, {}, adv),
                   "[advantages] rewards have shape [0]");

  const std::vector<int64_t> two = {0, 0};
  REQUIRE_R1_ERROR(r1::process_advantages(r1::AdvantageConfig{}, {{{4, 1.0}}, {}}, two, 4, adv),
                   "[process_advantages] step 0 of completion 0 ends at token 4, outside [0, 4)");
  REQUIRE_R1_ERROR(r1::process_advantages(r1::AdvantageConfig{}, {{{2, 1.0}, {2, 0.0}}, {}}, two, 4, adv),
                   "step 1 ends at 2 after 2");
  REQUIRE_R1_ERROR(r1::process_advantages(r1::AdvantageConfig{}, {{}, {}}, three, 4, adv),
                   "[process_advantages] 3 group ids for 2 completions");
}

// ---------------------------------------------------------------------------------------
// The loss

TEST_CASE("loss matches PyTorch for every loss_type, ratio level and KL estimator", "[grpo][loss]") {
  for (const char* type : {"grpo", "bnpo", "dapo", "dr_grpo", "seq-mean-token-sum"})
    for (const char* level : {"token", "sequence"})
      for (const char* kl : {"none", "k1", "k2", "k3"}) check_loss_case(std::string("loss_") + type + "_" + level + "_" + kl);
}

TEST_CASE("loss matches PyTorch without old log-probs, without dual clip, with masked truncation, a global "
          "token count and per-token advantages", "[grpo][loss]") {
  for (const char* name : {"no_old_token", "no_old_sequence", "dual_off", "dual_off_sequence", "eps_high_unset", "truncated",
                           "dapo_token_count", "per_token_adv"})
    check_loss_case(std::string("loss_extra_") + name);
}

TEST_CASE("loss backward matches finite differences for every variant", "[grpo][loss]") {
  LossData d;
  const r1::LossType types[] = {r1::LossType::Grpo, r1::LossType::Bnpo, r1::LossType::Dapo, r1::LossType::DrGrpo,
                                r1::LossType::SeqMeanTokenSum};
  for (const r1::LossType type : types)
    for (const auto level : {r1::ImportanceSampling::Token, r1::ImportanceSampling::Sequence})
      for (int kl = -1; kl < 3; ++kl)
        for (const bool with_old : {true, false}) {
          INFO(r1::option_name(type) << " " << r1::option_name(level) << " kl " << kl << " old " << with_old);
          r1::GrpoLoss loss;
          loss.loss_type = type;
          loss.importance_sampling_level = level;
          loss.epsilon_high = 0.28;
          loss.max_completion_length = 8;
          if (kl >= 0) {
            loss.kl_estimator = static_cast<r1::KlEstimator>(kl);
            loss.beta = 0.1;
          }
          r1::GrpoInputs<double> in;
          in.log_probs = d.log_probs;
          in.mask = d.mask;
          in.advantages = d.advantages;
          if (with_old) in.old_log_probs = d.old_log_probs;
          in.ref_log_probs = d.ref_log_probs;
          in.token_count = type == r1::LossType::Dapo ? 37.0 : 0.0;
          r1::GrpoCache<double> cache;
          r1::forward(loss, in, cache);
          if (with_old) CHECK(cache.metrics.clip_ratio_region > 0.0);  // clipping is active
          const Tensor<double> grad = r1::backward(loss, cache, 1.0);
          // Without old log-probs, old is lp without gradient: finite differences hold a
          // frozen copy of lp there instead.
          const Tensor<double> frozen = d.log_probs;
          if (!with_old) in.old_log_probs = frozen;
          const auto f = [&] { return r1::forward(loss, in, cache); };
          r1test::check_gradient(d.log_probs, grad, f);
          if (level == r1::ImportanceSampling::Token) CHECK(grad(0, 4) == 0.0);  // masked token
        }
}

TEST_CASE("loss: each reduction by hand, and backward scales by dloss", "[grpo][loss]") {
  // No old log-probs: rho = 1, l = -A per token; A = {1, -2}; 2 and 3 tokens.
  const Tensor<double> lp = make(Shape{2, 3}, {-1.0, -2.0, -9.0, -0.5, -1.5, -2.5});
  const Tensor<double> mask = make(Shape{2, 3}, {1, 1, 0, 1, 1, 1});
  const Tensor<double> adv = make(Shape{2}, {1.0, -2.0});
  r1::GrpoInputs<double> in{.log_probs = lp, .mask = mask, .advantages = adv};
  struct Case {
    r1::LossType type;
    double loss, grad0, grad1;  // grad0: d/d lp of a token of completion 0, grad1 of completion 1
  };
  const Case cases[] = {
      {r1::LossType::Grpo, 0.5 * (-1.0 + 2.0), -1.0 / 4.0, 2.0 / 6.0},
      {r1::LossType::Bnpo, 4.0 / 5.0, -1.0 / 5.0, 2.0 / 5.0},
      {r1::LossType::Dapo, 4.0 / 5.0, -1.0 / 5.0, 2.0 / 5.0},
      {r1::LossType::DrGrpo, 4.0 / (2.0 * 4.0), -1.0 / 8.0, 2.0 / 8.0},
      {r1::LossType::SeqMeanTokenSum, 4.0 / 2.0, -1.0 / 2.0, 2.0 / 2.0},
  };
  for (const Case& c : cases) {
    INFO(r1::option_name(c.type));
    r1::GrpoLoss loss;
    loss.loss_type = c.type;
    loss.max_completion_length = 4;
    r1::GrpoCache<double> cache;
    CHECK(r1::forward(loss, in, cache) == Approx(c.loss).epsilon(1e-14));
    const auto& grad = r1::backward(loss, cache, 0.5);
    CHECK(grad(0, 1) == Approx(0.5 * c.grad0).epsilon(1e-14));
    CHECK(grad(1, 2) == Approx(0.5 * c.grad1).epsilon(1e-14));
    CHECK(grad(0, 2) == 0.0);
    CHECK(cache.metrics.tokens == 5.0);
  }
  r1::GrpoLoss dapo;
  in.token_count = 10.0;
  r1::GrpoCache<double> cache;
  CHECK(r1::forward(dapo, in, cache) == Approx(0.4).epsilon(1e-14));
}

TEST_CASE("loss: clip fractions by hand, token and sequence level", "[grpo][loss]") {
  // rho = {{1.5, 1.1}, {0.5, 3.5}}, A = {1, -1}, eps 0.2 / 0.28, dual clip 3.
  const Tensor<double> lp = make(Shape{2, 2}, {-1.0, -1.0, -1.0, -1.0});
  Tensor<double> old = lp;
  const double rho[2][2] = {{1.5, 1.1}, {0.5, 3.5}};
  for (int b = 0; b < 2; ++b)
    for (int t = 0; t < 2; ++t) old(b, t) -= std::log(rho[b][t]);
  const Tensor<double> mask = make(Shape{2, 2}, {1, 1, 1, 1});
  const Tensor<double> adv = make(Shape{2}, {1.0, -1.0});
  r1::GrpoLoss loss;
  loss.loss_type = r1::LossType::Bnpo;
  loss.epsilon_high = 0.28;
  r1::GrpoInputs<double> in{.log_probs = lp, .mask = mask, .advantages = adv, .old_log_probs = old};
  r1::GrpoCache<double> cache;
  // l = {-1.28 (clipped high), -1.1, 0.8 (clipped low), 3 (dual clip)}
  CHECK(r1::forward(loss, in, cache) == Approx((-1.28 - 1.1 + 0.8 + 3.0) / 4.0).epsilon(1e-14));
  const r1::GrpoMetrics& m = cache.metrics;
  CHECK(m.clip_ratio_low == 0.25);
  CHECK(m.clip_ratio_high == 0.25);
  CHECK(m.clip_ratio_region == 0.5);
  CHECK(m.clip_ratio_dual == 0.25);
  const auto& grad = r1::backward(loss, cache);
  CHECK(grad(0, 0) == 0.0);
  CHECK(grad(0, 1) == Approx(-1.1 / 4.0).epsilon(1e-14));
  CHECK(grad(1, 0) == 0.0);
  CHECK(grad(1, 1) == 0.0);

  // Sequence level: rho = sqrt(1.65) = 1.2845 > 1.28 with A > 0 (high); sqrt(1.75) with A < 0.
  loss.importance_sampling_level = r1::ImportanceSampling::Sequence;
  r1::forward(loss, in, cache);
  CHECK(m.clip_ratio_low == 0.0);
  CHECK(m.clip_ratio_high == 0.5);
  CHECK(m.clip_ratio_region == 0.5);
  CHECK(m.clip_ratio_dual == 0.0);
  loss.clip_ratio_c = 0.0;  // no dual clip: token 3 keeps its gradient
  loss.importance_sampling_level = r1::ImportanceSampling::Token;
  r1::forward(loss, in, cache);
  CHECK(m.clip_ratio_dual == 0.0);
  CHECK(r1::backward(loss, cache)(1, 1) == Approx(3.5 / 4.0).epsilon(1e-14));
}

TEST_CASE("dapo: micro-batches with the step's token count add up to the whole batch", "[grpo][loss]") {
  LossData d;
  r1::GrpoLoss loss;
  loss.beta = 0.05;
  const r1::GrpoInputs<double> whole{.log_probs = d.log_probs, .mask = d.mask, .advantages = d.advantages,
                                     .old_log_probs = d.old_log_probs, .ref_log_probs = d.ref_log_probs};
  r1::GrpoCache<double> cache;
  const double total = r1::forward(loss, whole, cache);
  const Tensor<double> grad = r1::backward(loss, cache);

  const double count = r1::completion_tokens(loss, d.mask, {});
  REQUIRE(count == 25.0);
  double sum = 0.0;
  for (const auto& [begin, end] : {std::pair<int64_t, int64_t>{0, 2}, {2, 5}}) {
    const auto rows = [&](const Tensor<double>& t) { return t.view().slice(0, begin, end); };
    const r1::GrpoInputs<double> part{.log_probs = rows(d.log_probs), .mask = rows(d.mask), .advantages = rows(d.advantages),
                                      .old_log_probs = rows(d.old_log_probs), .ref_log_probs = rows(d.ref_log_probs),
                                      .token_count = count};
    sum += r1::forward(loss, part, cache);
    const auto& g = r1::backward(loss, cache);
    for (int64_t b = begin; b < end; ++b)
      for (int64_t t = 0; t < 6; ++t) CHECK(g(b - begin, t) == Approx(grad(b, t)).epsilon(1e-13));
  }
  CHECK(sum == Approx(total).epsilon(1e-13));
}

TEST_CASE("loss: beta = 0 needs no reference, num_iterations > 1 needs old log-probs, truncation masking",
          "[grpo][loss]") {
  LossData d;
  r1::GrpoLoss loss;
  r1::GrpoInputs<double> in{.log_probs = d.log_probs, .mask = d.mask, .advantages = d.advantages};
  r1::GrpoCache<double> cache;
  r1::forward(loss, in, cache);  // beta 0: ref absent is fine
  CHECK(cache.metrics.kl == 0.0);
  // rho = 1 without old log-probs: the gradient is -A w per token.
  CHECK(r1::backward(loss, cache)(1, 0) == Approx(0.8 / 25.0).epsilon(1e-14));

  loss.num_iterations = 2;
  REQUIRE_R1_ERROR(r1::forward(loss, in, cache), "[grpo.forward] num_iterations is 2: iterations after the first need the "
                                                 "sampling policy's old_log_probs");
  in.old_log_probs = d.old_log_probs;
  r1::forward(loss, in, cache);

  const std::vector<uint8_t> truncated = {0, 1, 0, 0, 0};
  in.truncated = truncated;
  const double kept = r1::forward(loss, in, cache);
  CHECK(cache.metrics.tokens == 25.0);  // flags alone mask nothing
  loss.mask_truncated_completions = true;
  const double masked = r1::forward(loss, in, cache);
  CHECK(cache.metrics.tokens == 19.0);
  CHECK(r1::completion_tokens(loss, d.mask, truncated) == 19.0);
  CHECK(masked != kept);
  const auto& grad = r1::backward(loss, cache);
  for (int t = 0; t < 6; ++t) CHECK(grad(1, t) == 0.0);
}

TEST_CASE("loss rejects bad input and configs", "[grpo][loss][errors]") {
  const Tensor<double> lp(Shape{2, 3}), mask = make(Shape{2, 3}, {1, 1, 1, 1, 1, 0}), adv(Shape{2});
  r1::GrpoLoss loss;
  r1::GrpoCache<double> cache;
  // Views of temporaries live until the end of the full expression, the forward call.
  const auto inputs = [](r1::ConstView<double> l, r1::ConstView<double> m, r1::ConstView<double> a,
                         r1::ConstView<double> old = {}) {
    return r1::GrpoInputs<double>{.log_probs = l, .mask = m, .advantages = a, .old_log_probs = old};
  };
  REQUIRE_R1_ERROR(r1::backward(loss, cache), "[grpo.backward] the cache holds no forward pass");
  REQUIRE_R1_ERROR(r1::forward(loss, inputs(Tensor<double>(Shape{6}), mask, adv), cache),
                   "[grpo.forward] log_probs have shape [6], expected [B, T]");
  REQUIRE_R1_ERROR(r1::forward(loss, inputs(lp, Tensor<double>(Shape{2, 2}), adv), cache),
                   "[grpo.forward] mask has shape [2, 2], expected [2, 3]");
  REQUIRE_R1_ERROR(r1::forward(loss, inputs(lp, mask, Tensor<double>(Shape{3})), cache),
                   "[grpo.forward] advantages have shape [3], expected [2] or [2, 3]");
  REQUIRE_R1_ERROR(r1::forward(loss, inputs(lp, mask, adv, Tensor<double>(Shape{2, 4})), cache),
                   "[grpo.forward] old_log_probs has shape [2, 4], expected [2, 3]");
  REQUIRE_R1_ERROR(r1::forward(loss, inputs(lp, make(Shape{2, 3}, {1, 0.5, 1, 1, 1, 0}), adv), cache),
                   "[grpo.forward] mask(0, 1) is 0.5, expected 0 or 1");
  r1::GrpoLoss sequence;
  sequence.importance_sampling_level = r1::ImportanceSampling::Sequence;
  REQUIRE_R1_ERROR(r1::forward(sequence, inputs(lp, mask, lp), cache),
                   "per-token advantages [2, 3] need importance_sampling_level \"token\"");
  r1::GrpoLoss kl;
  kl.beta = 0.04;
  REQUIRE_R1_ERROR(r1::forward(kl, inputs(lp, mask, adv), cache), "[grpo.forward] beta is 0.04 but ref_log_probs are missing");
  r1::GrpoInputs<double> flags = inputs(lp, mask, adv);
  const std::vector<uint8_t> three = {0, 0, 1};
  flags.truncated = three;
  REQUIRE_R1_ERROR(r1::forward(loss, flags, cache), "[grpo.forward] 3 truncated flags for 2 completions");
  r1::GrpoLoss masking;
  masking.mask_truncated_completions = true;
  REQUIRE_R1_ERROR(r1::forward(masking, inputs(lp, mask, adv), cache),
                   "[grpo.forward] mask_truncated_completions needs the truncated flags of the 2 completions");
  r1::GrpoLoss dr;
  dr.loss_type = r1::LossType::DrGrpo;
  dr.max_completion_length = 2;
  REQUIRE_R1_ERROR(r1::forward(dr, inputs(lp, mask, adv), cache),
                   "[grpo.forward] dr_grpo: 3 completion tokens exceed max_completion_length 2");

  const auto bad_config = [&](auto&& change, const char* text) {
    r1::GrpoLoss c;
    change(c);
    REQUIRE_R1_ERROR(r1::forward(c, inputs(lp, mask, adv), cache), text);
  };
  bad_config([](r1::GrpoLoss& c) { c.epsilon = 1.5; }, "[grpo] epsilon is 1.5, expected in [0, 1)");
  bad_config([](r1::GrpoLoss& c) { c.epsilon_high = -0.1; }, "[grpo] epsilon_high is -0.1");
  bad_config([](r1::GrpoLoss& c) { c.clip_ratio_c = 0.5; }, "[grpo] clip_ratio_c is 0.5, expected > 1 (or 0: no dual clip)");
  bad_config([](r1::GrpoLoss& c) { c.beta = -1.0; }, "[grpo] beta is -1, expected >= 0");
  bad_config([](r1::GrpoLoss& c) { c.num_iterations = 0; }, "[grpo] num_iterations is 0, expected >= 1");
  bad_config([](r1::GrpoLoss& c) { c.max_completion_length = 0; }, "[grpo] max_completion_length is 0");
}

TEST_CASE("options parse TRL's and verl's names and print the canonical one", "[grpo][errors]") {
  CHECK(r1::parse_option<r1::LossType>("dr_grpo") == r1::LossType::DrGrpo);
  CHECK(r1::parse_option<r1::LossType>("seq-mean-token-sum") == r1::LossType::SeqMeanTokenSum);
  CHECK(r1::parse_option<r1::KlEstimator>("low_var_kl") == r1::KlEstimator::K3);
  CHECK(r1::parse_option<r1::KlEstimator>("mse") == r1::KlEstimator::K2);
  CHECK(r1::parse_option<r1::RewardScaling>("none") == r1::RewardScaling::None);
  CHECK(r1::option_name(r1::KlEstimator::K1) == "k1");
  CHECK(r1::option_name(r1::RewardAggregation::NormalizeThenSum) == "normalize_then_sum");
  CHECK(r1::option_name(r1::ImportanceSampling::Sequence) == "sequence");
  REQUIRE_R1_ERROR(r1::parse_option<r1::LossType>("ppo"),
                   "[grpo] unknown loss_type \"ppo\"; expected one of \"grpo\", \"bnpo\", \"dapo\", \"dr_grpo\", "
                   "\"seq-mean-token-sum\"");
  REQUIRE_R1_ERROR(r1::parse_option<r1::RewardScaling>("True"), "[grpo] unknown scale_rewards \"True\"");
}

TEST_CASE("logits -> log-probs -> loss -> dlogits matches finite differences", "[grpo][loss][log_probs]") {
  // [B = 2, T = 3, V = 5] logits at temperature 0.8, sequence-level ratio with k3.
  auto logits = r1test::random_tensor(Shape{2, 3, 5}, 51, 1.5);
  Tensor<int32_t> targets(Shape{2, 3});
  const int32_t ids[] = {1, 4, 0, 2, 2, 3};
  std::copy(ids, ids + 6, targets.data());
  const Tensor<double> old = r1test::random_tensor(Shape{2, 3}, 52, 0.3);
  Tensor<double> ref = r1test::random_tensor(Shape{2, 3}, 53, 0.3);
  const Tensor<double> mask = make(Shape{2, 3}, {1, 1, 1, 1, 1, 0}), adv = make(Shape{2}, {0.7, -1.1});
  const r1::TokenLogProbs p{0.8};
  r1::GrpoLoss loss;
  loss.importance_sampling_level = r1::ImportanceSampling::Sequence;
  loss.beta = 0.2;
  r1::TokenLogProbsCache<double> lp_cache;
  r1::GrpoCache<double> cache;
  // old and ref are offsets from the starting log-probs, so ratios stay near 1.
  const Tensor<double> start = r1::forward(p, logits, targets, lp_cache);
  Tensor<double> old_lp = start, ref_lp = start;
  old_lp.matrix() += old.matrix();
  ref_lp.matrix() += ref.matrix();
  const auto f = [&] {
    const auto& lp = r1::forward(p, logits, targets, lp_cache);
    return r1::forward(
        loss, {.log_probs = lp, .mask = mask, .advantages = adv, .old_log_probs = old_lp, .ref_log_probs = ref_lp}, cache);
  };
  f();
  const Tensor<double> dlogits = r1::backward(p, lp_cache, r1::backward(loss, cache));
  r1test::check_gradient(logits, dlogits, f);
}

TEST_CASE("the float loss agrees with the double one", "[grpo][loss]") {
  LossData d;
  const auto to_float = [](const Tensor<double>& t) {
    Tensor<float> out(t.shape());
    r1::convert<double, float>(t, out);
    return out;
  };
  const Tensor<float> lp = to_float(d.log_probs), mask = to_float(d.mask), adv = to_float(d.advantages),
                      old = to_float(d.old_log_probs), ref = to_float(d.ref_log_probs);
  r1::GrpoLoss loss;
  loss.importance_sampling_level = r1::ImportanceSampling::Sequence;
  loss.beta = 0.04;
  r1::GrpoCache<float> cf;
  r1::GrpoCache<double> cd;
  const float lf = r1::forward(
      loss, {.log_probs = lp, .mask = mask, .advantages = adv, .old_log_probs = old, .ref_log_probs = ref}, cf);
  const double ld = r1::forward(loss,
                                {.log_probs = d.log_probs, .mask = d.mask, .advantages = d.advantages,
                                 .old_log_probs = d.old_log_probs, .ref_log_probs = d.ref_log_probs},
                                cd);
  CHECK(lf == Approx(ld).epsilon(1e-5));
  const Tensor<float>& gf = r1::backward(loss, cf);
  const Tensor<double>& gd = r1::backward(loss, cd);
  for (int64_t i = 0; i < gd.numel(); ++i) CHECK(gf.data()[i] == Approx(gd.data()[i]).margin(1e-5));
}

TEST_CASE("completion_stats: lengths over all and over terminated completions", "[grpo]") {
  const std::vector<int64_t> lengths = {3, 7, 5, 10};
  const std::vector<uint8_t> truncated = {0, 0, 0, 1};
  const r1::CompletionStats s = r1::completion_stats(lengths, truncated);
  CHECK(s.mean_length == 6.25);
  CHECK(s.min_length == 3.0);
  CHECK(s.max_length == 10.0);
  CHECK(s.clipped_ratio == 0.25);
  CHECK(s.mean_terminated_length == 5.0);
  CHECK(s.min_terminated_length == 3.0);
  CHECK(s.max_terminated_length == 7.0);
  const std::vector<uint8_t> all = {1, 1, 1, 1};
  const r1::CompletionStats t = r1::completion_stats(lengths, all);
  CHECK(t.clipped_ratio == 1.0);
  CHECK(t.mean_terminated_length == 0.0);
  CHECK(t.max_terminated_length == 0.0);
  REQUIRE_R1_ERROR(r1::completion_stats(lengths, std::span<const uint8_t>(truncated).subspan(0, 3)),
                   "[completion_stats] 3 truncated flags for 4");
}

// ---------------------------------------------------------------------------------------
// Rewards

TEST_CASE("extract_answer: the last answer tag, else the last balanced \\boxed", "[rewards]") {
  struct Case {
    const char* text;
    std::optional<std::string_view> answer;
  };
  const Case cases[] = {
      {"<think>x</think><answer> 42 </answer>", "42"},
      {"<answer>1</answer> then <answer>2</answer>", "2"},
      {"<answer>1</answer> <answer>2", "1"},  // the last tag never closes
      {"<answer>\n5\n</answer>\n", "5"},
      {"<answer> a <answer> b </answer>", "a <answer> b"},  // left to right, like re.finditer
      {"The answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"},
      {"\\boxed{1} and \\boxed{{2}+{3}}", "{2}+{3}"},
      {"<answer>so \\boxed{7} it is</answer> \\boxed{8}", "7"},
      {"\\boxed{\\{1,2\\}}", "\\{1,2\\}"},  // escaped braces do not count
      {"\\boxed{3} then \\boxed{4", "3"},    // an unclosed box is skipped
      {"no answer here", std::nullopt},
      {"", std::nullopt},
  };
  for (const Case& c : cases) {
    INFO(c.text);
    CHECK(r1::extract_answer(c.text) == c.answer);
  }
}

TEST_CASE("parse_number: signs, commas, decimals, exponents and fractions", "[rewards]") {
  struct Case {
    const char* text;
    std::optional<double> value;
  };
  const Case cases[] = {
      {"42", 42.0}, {"1,000", 1000.0}, {"1,000,000.5", 1000000.5}, {"-0.5", -0.5}, {"+2", 2.0}, {".5", 0.5}, {"3.", 3.0},
      {"1e-3", 1e-3}, {"3/4", 0.75}, {"-3/4", -0.75}, {"3 / 4", 0.75}, {"\\frac{3}{4}", 0.75}, {"-\\dfrac{1}{8}", -0.125},
      {"\\tfrac{-1}{2}", -0.5}, {" 7 ", 7.0}, {"12,34", std::nullopt}, {"1,0000", std::nullopt}, {"1,000,00", std::nullopt},
      {"3/0", std::nullopt}, {"3/-4", std::nullopt}, {"1/2/3", std::nullopt}, {"abc", std::nullopt}, {"", std::nullopt},
      {"-", std::nullopt}, {"x=3", std::nullopt}, {"3 apples", std::nullopt}, {"\\frac{1}{0}", std::nullopt},
  };
  for (const Case& c : cases) {
    INFO(c.text);
    const auto got = r1::parse_number(c.text);
    REQUIRE(got.has_value() == c.value.has_value());
    if (got) CHECK(*got == Approx(*c.value).epsilon(1e-15));
  }
}

TEST_CASE("accuracy reward: exact and numeric comparison", "[rewards]") {
  struct Case {
    const char* text;
    const char* answer;
    bool numeric;
    double reward;
  };
  const Case cases[] = {
      {"<answer>1,000</answer>", "1000", true, 1.0},
      {"<answer>0.75</answer>", "3/4", true, 1.0},
      {"<answer>-0.5</answer>", "-\\frac{1}{2}", true, 1.0},
      {"<answer>0.3333333</answer>", "1/3", true, 1.0},  // relative difference 1e-7
      {"<answer>0.333</answer>", "1/3", true, 0.0},
      {"<answer>3/4</answer>", "0.75", false, 0.0},       // exact mode compares strings
      {"<answer>3/4</answer>", " 3/4 ", false, 1.0},
      {"<answer> x+1 </answer>", "x+1", true, 1.0},       // not numbers: strings
      {"Thus \\boxed{42}.", "$42$", true, 1.0},
      {"<answer>100</answer>", "\\boxed{100}", true, 1.0},
      {"<answer>41</answer>", "42", true, 0.0},
      {"no answer", "42", true, 0.0},
  };
  for (const Case& c : cases) {
    INFO(c.text << " vs " << c.answer);
    const r1::AccuracyReward reward{c.numeric};
    CHECK(reward(r1::Completion{.text = c.text, .answer = c.answer}) == c.reward);
  }
  CHECK(std::isnan(r1::AccuracyReward{}(r1::Completion{.text = "<answer>1</answer>", .answer = " "})));
  const r1::AccuracyReward strict{true, 1e-9};
  CHECK(strict(r1::Completion{.text = "<answer>0.3333333</answer>", .answer = "1/3"}) == 0.0);
}

TEST_CASE("format reward: R1's think/answer template", "[rewards]") {
  struct Case {
    const char* text;
    bool in_think;
    double reward;
  };
  const Case cases[] = {
      {"<think>a</think><answer>b</answer>", false, 1.0},
      {" <think>\na\n</think>\n<answer>\nb\n</answer>\n", false, 1.0},
      {"<think></think><answer>b</answer>", false, 1.0},  // empty thinking is allowed
      {"<think>a</think><answer>b</answer> extra", false, 0.0},
      {"<think>a</think>text<answer>b</answer>", false, 0.0},
      {"<answer>b</answer>", false, 0.0},
      {"<think>a</think><answer> </answer>", false, 0.0},  // blank answer
      {"<think>a<think>b</think><answer>c</answer>", false, 0.0},
      {"<think>a</think><answer>b</answer><answer>c</answer>", false, 0.0},
      {"<think>a</think><answer>b<answer>c</answer>", false, 0.0},
      {"<think>a</think><answer>b", false, 0.0},
      {"a</think><answer>b</answer>", false, 0.0},
      {"a\n</think>\n<answer>b</answer>", true, 1.0},  // the prompt ended with "<think>\n"
      {"<think>a</think><answer>b</answer>", true, 0.0},
  };
  for (const Case& c : cases) {
    INFO(c.text << " in_think " << c.in_think);
    CHECK(r1::FormatReward{c.in_think}(r1::Completion{.text = c.text}) == c.reward);
  }
}

TEST_CASE("evaluate_arithmetic follows Python's arithmetic without eval", "[rewards]") {
  struct Case {
    const char* text;
    std::optional<double> value;
  };
  const Case cases[] = {
      {"1+2*3", 7.0}, {"(1+2)*3", 9.0}, {"-3*2", -6.0}, {"- -3", 3.0}, {"+4", 4.0}, {"2*-3", -6.0}, {"7/2", 3.5},
      {"6/4/3", 0.5}, {"1-2-3", -4.0}, {"2*3/4", 1.5}, {"((((1))))", 1.0}, {" 00 ", 0.0}, {"-(2+3)*4", -20.0},
      {"1/0", std::nullopt}, {"1/(2-2)", std::nullopt}, {"2**3", std::nullopt}, {"1.5", std::nullopt}, {"", std::nullopt},
      {"(1", std::nullopt}, {"1)", std::nullopt}, {"01", std::nullopt}, {"1 2", std::nullopt}, {"(1)(2)", std::nullopt},
      {"1+", std::nullopt}, {"3=3", std::nullopt}, {"()", std::nullopt},
  };
  for (const Case& c : cases) {
    INFO(c.text);
    CHECK(r1::evaluate_arithmetic(c.text) == c.value);
  }
  CHECK(r1::evaluate_arithmetic(std::string(200, '(') + "1" + std::string(200, ')')) == std::nullopt);
  CHECK(r1::evaluate_arithmetic(std::string(50, '(') + "1" + std::string(50, ')')) == 1.0);
}

TEST_CASE("countdown reward: TinyZero's scores", "[rewards]") {
  struct Case {
    const char* text;
    int64_t target;
    std::vector<int64_t> numbers;
    double score;
  };
  const std::vector<int64_t> n352 = {3, 5, 2};
  const Case cases[] = {
      {"<think>ok</think>\n<answer>(3 + 5) * 2</answer>", 16, n352, 1.0},
      {"<answer>3 + 5 * 2</answer>", 16, n352, 0.1},          // 13
      {"<answer>(3 + 3) * 2</answer>", 12, n352, 0.1},        // 3 used twice, 5 unused
      {"<answer>(3 + 5) * 2 + 0</answer>", 16, n352, 0.1},    // an extra number
      {"<answer>(3 + 5) * 2</answer>", 16, {3, 5, 2, 7}, 0.1},  // a number unused
      {"no tags at all", 16, n352, 0.0},
      {"<answer>(3 + 5) * 2</answer>\n", 16, n352, 0.0},      // the last line holds no answer
      {"<answer>(3+5)*2</answer>\nmore", 16, n352, 0.0},
      {"<answer>1</answer><answer>(3+5)*2</answer>", 16, n352, 1.0},
      {"<answer>(3+5)*2</answer> <answer>x</answer>", 16, n352, 0.1},  // the last one counts
      {"<answer>-(3 - 5) * 2</answer>", 4, n352, 1.0},        // unary minus
      {"<answer>5 / (3 - 3)</answer>", 1, {5, 3, 3}, 0.1},    // division by zero
      {"<answer>3 ** 2 + 5</answer>", 14, {3, 2, 5}, 0.1},    // no powers
      {"<answer>(3+5)*2=16</answer>", 16, {3, 5, 2, 16}, 0.1},
      {"<answer>(03 + 5) * 2</answer>", 16, n352, 0.1},       // Python rejects leading zeros
      {"<answer>(3 + 5)(2)</answer>", 16, n352, 0.1},
      {"<answer>7/2*2</answer>", 7, {7, 2, 2}, 1.0},          // true division
      {"<answer>7/2</answer>", 3, {7, 2}, 0.1},
      {"<answer>99999999999999999999999 - 1</answer>", 1, n352, 0.1},
  };
  for (const Case& c : cases) {
    INFO(c.text);
    CHECK(r1::countdown_reward(c.text, c.target, c.numbers) == c.score);
  }
  CHECK(r1::countdown_reward("<answer>8*2</answer>", 16, std::vector<int64_t>{8, 2}, 0.2, 2.0) == 2.0);
  CHECK(r1::countdown_reward("<answer>8*3</answer>", 16, std::vector<int64_t>{8, 2}, 0.2, 2.0) == 0.2);
}

TEST_CASE("countdown reward and arithmetic match Python's eval on generated equations", "[rewards]") {
  for (const auto& row : grpo_fixture("countdown").at("rows")) {
    const auto text = row.at("completion").get<std::string>();
    INFO(text);
    const auto numbers = row.at("numbers").get<std::vector<int64_t>>();
    CHECK(r1::countdown_reward(text, row.at("target").get<int64_t>(), numbers) == row.at("score").get<double>());
    const auto value = r1::evaluate_arithmetic(row.at("expression").get<std::string>());
    REQUIRE(value.has_value() == !row.at("value").is_null());
    if (value) CHECK(*value == row.at("value").get<double>());
  }
}

TEST_CASE("overlong punishment: DAPO's soft band", "[rewards]") {
  const r1::OverlongPunishment p{100, 20};
  const std::pair<int64_t, double> cases[] = {{0, 0.0}, {80, 0.0}, {81, -0.05}, {90, -0.5}, {100, -1.0}, {101, -1.0}};
  for (const auto& [tokens, reward] : cases) {
    INFO(tokens);
    CHECK(p(r1::Completion{.tokens = tokens}) == Approx(reward).epsilon(1e-15));
  }
  CHECK(r1::OverlongPunishment{50, 0}(r1::Completion{.tokens = 51}) == -1.0);
  REQUIRE_R1_ERROR((r1::OverlongPunishment{10, 20}(r1::Completion{})),
                   "[overlong_punishment] max_length 10 and cache_length 20");
}

TEST_CASE("RewardSet: weighted callables into advantages", "[rewards]") {
  // Countdown problems of our own, looked up by the completion's index.
  const std::vector<std::pair<int64_t, std::vector<int64_t>>> problems = {{16, {3, 5, 2}}, {16, {3, 5, 2}}, {6, {1, 2, 3}}};
  r1::RewardSet rewards;
  rewards.add("accuracy", r1::AccuracyReward{}, 1.0)
      .add("format", r1::FormatReward{}, 0.5)
      .add("countdown", [&](const r1::Completion& c) {
        return r1::countdown_reward(c.text, problems[c.index].first, problems[c.index].second);
      });
  CHECK(rewards.size() == 3);
  CHECK(rewards.names() == std::vector<std::string>{"accuracy", "format", "countdown"});
  CHECK(rewards.weights() == std::vector<double>{1.0, 0.5, 1.0});
  const std::vector<r1::Completion> completions = {
      {.index = 0, .text = "<think>t</think><answer>(3+5)*2</answer>", .answer = "16"},
      {.index = 1, .text = "<answer>3+5*2</answer>", .answer = "16"},
      {.index = 2, .text = "<think>t</think><answer>1+2+3</answer>"},  // no reference: accuracy NaN
  };
  const Tensor<double> r = rewards.evaluate(completions);
  REQUIRE(r.shape() == Shape{3, 3});
  CHECK(r(0, 0) == 0.0);  // "(3+5)*2" is not the number 16
  CHECK(r(0, 1) == 1.0);
  CHECK(r(0, 2) == 1.0);
  CHECK(r(1, 1) == 0.0);
  CHECK(r(1, 2) == 0.1);
  CHECK(std::isnan(r(2, 0)));
  CHECK(r(2, 2) == 1.0);

  const std::vector<int64_t> ids = {0, 0, 1};
  Tensor<double> adv;
  r1::AdvantageConfig config;
  config.epsilon = 1e-15;
  r1::compute_advantages(config, r, rewards.weights(), ids, adv);
  // R = {1.5, 0.1}: mean 0.8, std 0.7 * sqrt(2).
  CHECK(adv(0) == Approx(0.7 / (0.7 * std::sqrt(2.0))).epsilon(1e-14));
  CHECK(adv(2) == 0.0);

  REQUIRE_R1_ERROR(rewards.add("format", r1::FormatReward{}), "[rewards] \"format\" is already added");
  REQUIRE_R1_ERROR(rewards.add("empty", r1::RewardFunction{}), "[rewards] \"empty\" has no function");
  r1::RewardSet broken;
  broken.add("infinite", [](const r1::Completion&) { return std::numeric_limits<double>::infinity(); });
  REQUIRE_R1_ERROR(broken.evaluate(completions), "[rewards] \"infinite\" returned inf for completion 0");
  REQUIRE_R1_ERROR(r1::RewardSet{}.evaluate(completions), "[rewards] no reward functions");
}
