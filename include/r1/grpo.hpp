// r1/grpo.hpp: the loss of Group Relative Policy Optimization (DeepSeekMath, DeepSeek-R1)
// with the variants TRL's GRPOTrainer and verl offer: advantages, per-token log-probs from
// logits, the clipped surrogate with KL, its reductions, and the metrics those trainers log.
//
// Advantages (outcome supervision). F reward functions score each completion: r[b, f], NaN
// where a function does not apply; w_f are their weights; g(b) is completion b's group id
// (the completions of one prompt share it; ids are explicit, groups need not be contiguous
// and may differ in size). std is unbiased and taken as 0 over fewer than two values.
//   sum_then_normalize (TRL's default):
//     R_b = nansum_f w_f r[b, f]                     (NaN counts as 0; all NaN gives R_b = 0)
//     A_b = (R_b - mean_{g(b)} R) / (s + eps)        s = std_{g(b)} R  (scale "group", GRPO)
//                                                    s = std over the batch  (scale "batch")
//     A_b =  R_b - mean_{g(b)} R                     (scale "none", Dr. GRPO)
//   normalize_then_sum (TRL's multi_objective_aggregation, GDPO): each function normalized in
//   its group over the values that are not NaN, then a batch normalization that ignores scale:
//     z[b, f] = (r[b, f] - nanmean_{g(b)} r[., f]) / (nanstd_{g(b)} r[., f] + eps)
//     R_b = nansum_f w_f z[b, f];   A_b = (R_b - mean R) / (std R + eps)   (over the batch)
//   A group of one completion gets A = 0 (TRL: its own mean is subtracted and its std is 0;
//   verl would use mean 0, std 1 instead); under normalize_then_sum, a function with a
//   single value in a group adds 0 there (TRL: its nanstd is NaN and nansum drops it).
// Process supervision (DeepSeekMath section 4.1.3): completion b has steps j that end at
// token e_j with reward s_j. Every step reward of a group is normalized together, and a
// token's advantage sums the normalized rewards of the steps ending at or after it:
//     s~_j = (s_j - mean_group s) / (std_group s + eps)    (scale as above; "none": no division)
//     A[b, t] = sum_{j : e_j >= t} s~_j                     (0 after the last step)
//
// Loss, per completion token (b, t); lp = log pi(token), old = log pi_old (the policy that
// sampled), ref = log pi_ref, m = mask (1 on the completion tokens that count):
//   token level:          log rho[b, t] = clamp(lp - old, -20, 20)
//   sequence level (GSPO, TRL's importance_sampling_level="sequence"):
//                         log rho[b] = clamp(sum_t m (lp - old) / max(1, |o_b|), -20, 20)
//                         for every token of b; its gradient flows into every token of b.
//                         Every reduction below weighs a completion's tokens alike, so this
//                         gradient equals GSPO-token's sg[s_b] pi / sg[pi] form (verl's).
//   no old log-probs:     old = lp without gradient, so rho = 1 with d rho/d lp = rho, as
//                         TRL's exp(lp - lp.detach()) (num_iterations = 1)
//   surrogate:            l = max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high))
//                         (= -min(rho A, clip(rho) A) of TRL; eps_high > eps_low is DAPO's
//                         clip-higher)
//   dual clip (verl, A < 0 only, clip_ratio_c = c > 1):  l = min(l, -A c), at both levels
//   KL (beta > 0), added per token:  L = l + beta k[b, t] with
//                         k1 = lp - ref;   k2 = (lp - ref)^2 / 2;
//                         k3 = clamp(e^u - u - 1, -10, 10),  u = clamp(ref - lp, -20, 20)
//                         (DeepSeekMath's unbiased estimator, clamped as verl's low_var_kl;
//                         TRL does not clamp: they differ once k3 > 10, u > 2.6 or u < -11)
//   beta = 0 never reads the reference log-probs.
// The log-ratio clamp at +-20 is verl's (TRL has none); exp(20) is already 5e8.
//
// Reductions (loss_type) of L[b, t] over the batch, |o_b| = sum_t m[b, t]:
//   grpo                 (1/B) sum_b (sum_t m L) / max(1, |o_b|)     DeepSeekMath's 1/|o_i|
//   bnpo                 sum m L / max(1, sum m)                     this batch's token mean
//   dapo                 sum m L / N                                 N: the completion tokens of
//                        the whole optimizer step, summed over its grad-accum micro-batches
//                        (GrpoInputs::token_count), so the micro-batch losses add up to the
//                        step's token mean. TRL's default.
//   dr_grpo              sum m L / (B * max_completion_length)       Dr. GRPO's constant
//   seq-mean-token-sum   (1/B) sum_b sum_t m L                       verl
// Accumulating micro-batches: dapo's N already spans the step; the others return each
// micro-batch's own value, so pass dloss = 1/grad_accum to backward (TRL divides the same).
//
// Log-probs: lp[n] = log_softmax(z[n, :] / tau)[y_n] with tau the sampling temperature,
// entropy H[n] = -sum_v p log p of the same distribution (a metric, no gradient), and
//   d z[n, :] = d lp[n] (onehot(y_n) - softmax(z[n, :] / tau)) / tau.
//
// Metrics follow TRL's names: clip_ratio/low_mean is the fraction of tokens with
// rho < 1 - eps_low and A < 0, high_mean rho > 1 + eps_high and A > 0, region_mean either
// (token means; at sequence level, means over completions, as TRL). verl's dual-clip
// fraction, the KL and entropy token means, reward mean/std per function,
// frac_reward_zero_std and completion-length statistics complete them.
//
// Legend: B completions, G group size, T completion tokens (padded), V vocabulary,
// F reward functions, N tokens of the logits (rows), tau temperature.
#pragma once

#include "config.hpp"
#include "loss.hpp"
#include "parallel.hpp"
#include "tensor.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace r1 {

// ---------------------------------------------------------------------------------------
// Options, with the names TRL and verl use in their configs.
enum class RewardScaling { Group, Batch, None };
enum class RewardAggregation { SumThenNormalize, NormalizeThenSum };
enum class LossType { Grpo, Bnpo, Dapo, DrGrpo, SeqMeanTokenSum };
enum class ImportanceSampling { Token, Sequence };
enum class KlEstimator { K1, K2, K3 };

// OptionNames<E>::values lists (name, value); the first name of a value is its canonical one.
template <class E>
struct OptionNames;

template <>
struct OptionNames<RewardScaling> {
  static constexpr const char* what = "scale_rewards";
  static constexpr std::array<std::pair<std::string_view, RewardScaling>, 3> values{
      {{"group", RewardScaling::Group}, {"batch", RewardScaling::Batch}, {"none", RewardScaling::None}}};
};
template <>
struct OptionNames<RewardAggregation> {
  static constexpr const char* what = "multi_objective_aggregation";
  static constexpr std::array<std::pair<std::string_view, RewardAggregation>, 2> values{
      {{"sum_then_normalize", RewardAggregation::SumThenNormalize}, {"normalize_then_sum", RewardAggregation::NormalizeThenSum}}};
};
template <>
struct OptionNames<LossType> {
  static constexpr const char* what = "loss_type";
  static constexpr std::array<std::pair<std::string_view, LossType>, 5> values{
      {{"grpo", LossType::Grpo}, {"bnpo", LossType::Bnpo}, {"dapo", LossType::Dapo}, {"dr_grpo", LossType::DrGrpo},
       {"seq-mean-token-sum", LossType::SeqMeanTokenSum}}};
};
template <>
struct OptionNames<ImportanceSampling> {
  static constexpr const char* what = "importance_sampling_level";
  static constexpr std::array<std::pair<std::string_view, ImportanceSampling>, 2> values{
      {{"token", ImportanceSampling::Token}, {"sequence", ImportanceSampling::Sequence}}};
};
template <>
struct OptionNames<KlEstimator> {
  static constexpr const char* what = "kl_estimator";
  // verl's kl_penalty names too: kl = k1, mse = k2, low_var_kl = k3.
  static constexpr std::array<std::pair<std::string_view, KlEstimator>, 6> values{
      {{"k1", KlEstimator::K1}, {"k2", KlEstimator::K2}, {"k3", KlEstimator::K3}, {"kl", KlEstimator::K1},
       {"mse", KlEstimator::K2}, {"low_var_kl", KlEstimator::K3}}};
};

// parse_option<LossType>("dr_grpo") == LossType::DrGrpo; unknown names throw r1::error.
template <class E>
E parse_option(std::string_view name) {
  std::string known;
  for (const auto& [text, value] : OptionNames<E>::values) {
    if (text == name) return value;
    known += (known.empty() ? "\"" : ", \"") + std::string(text) + "\"";
  }
  detail::fail(detail::concat("[grpo] unknown ", OptionNames<E>::what, " \"", name, "\"; expected one of ", known));
}

template <class E>
std::string_view option_name(E value) {
  for (const auto& [text, v] : OptionNames<E>::values)
    if (v == value) return text;
  detail::fail(detail::concat("[grpo] ", OptionNames<E>::what, " has no name for value ", static_cast<int>(value)));
}

// ---------------------------------------------------------------------------------------
// Params. Defaults follow TRL's GRPOConfig unless the comment names another source.
struct AdvantageConfig {
  RewardScaling scale_rewards = RewardScaling::Group;                   // TRL "group"
  RewardAggregation aggregation = RewardAggregation::SumThenNormalize;  // TRL
  double epsilon = 1e-4;                                                // TRL; verl uses 1e-6

  void validate() const {
    R1_CHECK(epsilon > 0.0 && std::isfinite(epsilon), "[advantages] epsilon is ", epsilon,
             ", expected > 0: it keeps a group of equal rewards at advantage 0 instead of 0/0");
  }
};

struct GrpoLoss {
  LossType loss_type = LossType::Dapo;                                  // TRL
  ImportanceSampling importance_sampling_level = ImportanceSampling::Token;  // TRL
  double epsilon = 0.2;                       // eps_low: TRL epsilon, verl clip_ratio
  std::optional<double> epsilon_high{};       // unset: epsilon (TRL); DAPO uses 0.28
  double clip_ratio_c = 3.0;                  // verl's dual clip; 0: off (TRL has none)
  double beta = 0.0;                          // TRL; R1-Zero and verl's kl_loss_coef: 0.001
  KlEstimator kl_estimator = KlEstimator::K3; // TRL's only one; verl's low_var_kl
  int64_t max_completion_length = 256;        // TRL; the dr_grpo constant
  bool mask_truncated_completions = false;    // TRL; DAPO masks them
  int64_t num_iterations = 1;                 // TRL's mu; > 1 needs old_log_probs

  double eps_high() const { return epsilon_high.value_or(epsilon); }

  void validate() const {
    R1_CHECK(epsilon >= 0.0 && epsilon < 1.0, "[grpo] epsilon is ", epsilon, ", expected in [0, 1)");
    R1_CHECK(eps_high() >= 0.0 && std::isfinite(eps_high()), "[grpo] epsilon_high is ", eps_high(), ", expected >= 0");
    R1_CHECK(clip_ratio_c == 0.0 || (clip_ratio_c > 1.0 && std::isfinite(clip_ratio_c)), "[grpo] clip_ratio_c is ",
             clip_ratio_c, ", expected > 1 (or 0: no dual clip)");
    R1_CHECK(beta >= 0.0 && std::isfinite(beta), "[grpo] beta is ", beta, ", expected >= 0");
    R1_CHECK(max_completion_length > 0, "[grpo] max_completion_length is ", max_completion_length, ", expected > 0");
    R1_CHECK(num_iterations >= 1, "[grpo] num_iterations is ", num_iterations, ", expected >= 1");
  }
};

// ---------------------------------------------------------------------------------------
// Advantages

// What TRL logs about the rewards (rewards/<name>/mean and std, reward, reward_std,
// frac_reward_zero_std). reward_std and frac_reward_zero_std use the group std of R_b, the
// weighted nansum, whatever the scaling: the fraction of completions whose group carries no
// signal, which is what dynamic sampling acts on (TRL's own uses the std it divides by, so
// the batch std under "batch").
struct RewardStats {
  std::vector<double> mean, std;     // per function over the batch, NaN skipped; mean is NaN
                                     // with no value, std 0 with fewer than two
  double reward_mean = 0.0;          // mean of R_b
  double reward_std = 0.0;           // mean over completions of their group's std of R
  double frac_reward_zero_std = 0.0; // completions whose group std of R is <= 1e-8 (TRL's isclose)
};

// A step of process supervision: it ends at token `end` of its completion (0-based) and
// earned `reward`.
struct ProcessStep {
  int64_t end = 0;
  double reward = 0.0;
};

namespace detail {

// Mean and unbiased std of the values that are not NaN; std is 0 with fewer than two.
struct Moments {
  double mean = std::numeric_limits<double>::quiet_NaN(), std = 0.0;
  int64_t count = 0;
};

template <class Values>
Moments nan_moments(const Values& values) {
  Moments m;
  double sum = 0.0;
  for (const double v : values)
    if (!std::isnan(v)) sum += v, ++m.count;
  if (m.count == 0) return m;
  m.mean = sum / static_cast<double>(m.count);
  if (m.count < 2) return m;
  double squares = 0.0;
  for (const double v : values)
    if (!std::isnan(v)) squares += (v - m.mean) * (v - m.mean);
  m.std = std::sqrt(squares / static_cast<double>(m.count - 1));
  return m;
}

// Completion indices per group, groups in order of first appearance; group_of[b] indexes it.
struct Groups {
  std::vector<std::vector<int64_t>> members;
  std::vector<int64_t> group_of;
};

inline Groups make_groups(std::span<const int64_t> group_ids, int64_t completions, const char* op) {
  R1_CHECK(static_cast<int64_t>(group_ids.size()) == completions, "[", op, "] ", group_ids.size(), " group ids for ",
           completions, " completions");
  Groups g;
  std::unordered_map<int64_t, int64_t> index;
  g.group_of.resize(group_ids.size());
  for (std::size_t b = 0; b < group_ids.size(); ++b) {
    const auto [it, added] = index.emplace(group_ids[b], static_cast<int64_t>(g.members.size()));
    if (added) g.members.emplace_back();
    g.members[it->second].push_back(static_cast<int64_t>(b));
    g.group_of[b] = it->second;
  }
  return g;
}

template <class Values>
std::vector<double> gather(const Values& values, const std::vector<int64_t>& indices) {
  std::vector<double> out;
  out.reserve(indices.size());
  for (const int64_t i : indices) out.push_back(values[i]);
  return out;
}

}  // namespace detail

// advantages [B] from rewards [B, F] (or [B] for one function; NaN: not applicable) with
// weights [F] (empty: all 1) and one group id per completion.
template <class T>
RewardStats compute_advantages(const AdvantageConfig& config, ConstView<double> rewards, std::span<const double> weights,
                               std::span<const int64_t> group_ids, Tensor<T>& advantages) {
  config.validate();
  R1_CHECK((rewards.rank() == 1 || rewards.rank() == 2) && rewards.size(0) > 0, "[advantages] rewards have shape ",
           rewards.shape(), ", expected [B] or [B, F] with B > 0");
  const int64_t B = rewards.size(0), F = rewards.rank() == 2 ? rewards.size(1) : 1;
  R1_CHECK(F > 0, "[advantages] rewards have shape ", rewards.shape(), ": no reward function");
  R1_CHECK(weights.empty() || static_cast<int64_t>(weights.size()) == F, "[advantages] ", weights.size(),
           " weights for ", F, " reward functions");
  const auto reward = [&](int64_t b, int64_t f) { return rewards.rank() == 2 ? rewards(b, f) : rewards(b); };
  const auto weight = [&](int64_t f) { return weights.empty() ? 1.0 : weights[f]; };
  for (int64_t f = 0; f < F; ++f) R1_CHECK(std::isfinite(weight(f)), "[advantages] weight ", f, " is ", weight(f));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t f = 0; f < F; ++f)
      R1_CHECK(!std::isinf(reward(b, f)), "[advantages] reward of function ", f, " for completion ", b, " is ",
               reward(b, f), ", expected finite or NaN (not applicable)");
  const detail::Groups groups = detail::make_groups(group_ids, B, "advantages");

  RewardStats stats;
  std::vector<std::vector<double>> columns(static_cast<std::size_t>(F), std::vector<double>(B));
  for (int64_t f = 0; f < F; ++f) {
    for (int64_t b = 0; b < B; ++b) columns[f][b] = reward(b, f);
    const detail::Moments m = detail::nan_moments(columns[f]);
    stats.mean.push_back(m.mean);
    stats.std.push_back(m.std);
  }
  // R_b, the weighted nansum, and its group moments: the advantage of sum_then_normalize
  // and the statistics of both aggregations.
  std::vector<double> combined(B, 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t f = 0; f < F; ++f)
      if (!std::isnan(columns[f][b])) combined[b] += weight(f) * columns[f][b];
  std::vector<detail::Moments> group_moments;
  for (const auto& members : groups.members) group_moments.push_back(detail::nan_moments(detail::gather(combined, members)));
  const detail::Moments batch = detail::nan_moments(combined);
  stats.reward_mean = batch.mean;
  for (int64_t b = 0; b < B; ++b) {
    const double s = group_moments[groups.group_of[b]].std;
    stats.reward_std += s / static_cast<double>(B);
    stats.frac_reward_zero_std += (s <= 1e-8 ? 1.0 : 0.0) / static_cast<double>(B);
  }

  advantages.resize(Shape{B});
  if (config.aggregation == RewardAggregation::SumThenNormalize) {
    for (int64_t b = 0; b < B; ++b) {
      const detail::Moments& g = group_moments[groups.group_of[b]];
      const double centered = combined[b] - g.mean;
      const double scale = config.scale_rewards == RewardScaling::Group   ? g.std + config.epsilon
                           : config.scale_rewards == RewardScaling::Batch ? batch.std + config.epsilon
                                                                          : 1.0;
      advantages.data()[b] = static_cast<T>(centered / scale);
    }
    return stats;
  }
  std::vector<double> normalized(B, 0.0);
  for (int64_t f = 0; f < F; ++f)
    for (const auto& members : groups.members) {
      const detail::Moments m = detail::nan_moments(detail::gather(columns[f], members));
      for (const int64_t b : members)
        if (!std::isnan(columns[f][b])) normalized[b] += weight(f) * (columns[f][b] - m.mean) / (m.std + config.epsilon);
    }
  const detail::Moments all = detail::nan_moments(normalized);
  for (int64_t b = 0; b < B; ++b) advantages.data()[b] = static_cast<T>((normalized[b] - all.mean) / (all.std + config.epsilon));
  return stats;
}

// Per-token advantages [B, tokens] of process supervision; steps[b] lists completion b's
// steps by increasing end. config.aggregation does not apply (one process reward).
template <class T>
void process_advantages(const AdvantageConfig& config, const std::vector<std::vector<ProcessStep>>& steps,
                        std::span<const int64_t> group_ids, int64_t tokens, Tensor<T>& advantages) {
  config.validate();
  const auto B = static_cast<int64_t>(steps.size());
  R1_CHECK(B > 0 && tokens > 0, "[process_advantages] ", B, " completions of ", tokens, " tokens, expected both > 0");
  const detail::Groups groups = detail::make_groups(group_ids, B, "process_advantages");
  for (int64_t b = 0; b < B; ++b)
    for (std::size_t j = 0; j < steps[b].size(); ++j) {
      const ProcessStep& s = steps[b][j];
      R1_CHECK(0 <= s.end && s.end < tokens, "[process_advantages] step ", j, " of completion ", b, " ends at token ",
               s.end, ", outside [0, ", tokens, ")");
      R1_CHECK(j == 0 || steps[b][j - 1].end < s.end, "[process_advantages] steps of completion ", b,
               " must end at increasing tokens; step ", j, " ends at ", s.end, " after ", steps[b][j - 1].end);
      R1_CHECK(std::isfinite(s.reward), "[process_advantages] step ", j, " of completion ", b, " has reward ", s.reward);
    }
  std::vector<std::vector<double>> group_rewards(groups.members.size());
  std::vector<double> all_rewards;
  for (int64_t b = 0; b < B; ++b)
    for (const ProcessStep& s : steps[b]) {
      group_rewards[groups.group_of[b]].push_back(s.reward);
      all_rewards.push_back(s.reward);
    }
  const double batch_std = detail::nan_moments(all_rewards).std;
  advantages.resize(Shape{B, tokens}, /*zero=*/true);
  for (int64_t b = 0; b < B; ++b) {
    const detail::Moments g = detail::nan_moments(group_rewards[groups.group_of[b]]);
    const double scale = config.scale_rewards == RewardScaling::Group   ? g.std + config.epsilon
                         : config.scale_rewards == RewardScaling::Batch ? batch_std + config.epsilon
                                                                        : 1.0;
    // Walk the steps backwards: tokens (previous end, end] collect the suffix sum.
    double suffix = 0.0;
    for (auto j = static_cast<int64_t>(steps[b].size()) - 1; j >= 0; --j) {
      suffix += (steps[b][j].reward - g.mean) / scale;
      const int64_t begin = j > 0 ? steps[b][j - 1].end + 1 : 0;
      for (int64_t t = begin; t <= steps[b][j].end; ++t) advantages(b, t) = static_cast<T>(suffix);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Log-probs of the sampled tokens under logits / temperature.
struct TokenLogProbs {
  double temperature = 1.0;     // the sampling temperature (TRL's default 1.0)
  int32_t ignore_index = -100;  // targets equal to it get log-prob 0, entropy 0, no gradient
};

template <class T>
struct TokenLogProbsCache {
  Tensor<T> scaled;                // z / tau [N, V]
  LogSoftmaxCache<T> log_softmax;  // y = log_softmax(z / tau) [N, V]
  Tensor<int32_t> targets;
  Tensor<T> log_probs, entropy;    // [...], the shape of the targets
  Tensor<T> dlogits;               // [..., V]
};

// log_probs [...] of targets [...] under logits [..., V]; the entropy lands in c.entropy.
template <class T>
const Tensor<T>& forward(const TokenLogProbs& p, ConstView<T> logits, ConstView<int32_t> targets, TokenLogProbsCache<T>& c) {
  R1_CHECK(p.temperature > 0.0 && std::isfinite(p.temperature), "[token_log_probs.forward] temperature is ", p.temperature,
           ", expected > 0");
  R1_CHECK(logits.rank() >= 2 && logits.size(logits.rank() - 1) > 0, "[token_log_probs.forward] logits have shape ",
           logits.shape(), ", expected [..., V] with V > 0");
  const int64_t vocab = logits.size(logits.rank() - 1);
  R1_CHECK(targets.rank() == logits.rank() - 1 && targets.numel() * vocab == logits.numel(),
           "[token_log_probs.forward] targets have shape ", targets.shape(), ", logits ", logits.shape(),
           ": expected targets to match the logits without their last dim");
  R1_CHECK(targets.is_contiguous(), "[token_log_probs.forward] targets are not contiguous");
  for (int64_t n = 0; n < targets.numel(); ++n) {
    const int32_t t = targets.data()[n];
    R1_CHECK(t == p.ignore_index || (0 <= t && t < vocab), "[token_log_probs.forward] target ", t, " at position ", n,
             " is out of range [0, ", vocab, ") and is not ignore_index ", p.ignore_index);
  }
  c.targets.resize(targets.shape());
  std::copy(targets.data(), targets.data() + targets.numel(), c.targets.data());
  c.scaled.resize(logits.shape());
  c.scaled.matrix() = logits.matrix() / static_cast<T>(p.temperature);
  const auto y = forward(LogSoftmax{}, c.scaled, c.log_softmax).matrix();
  c.log_probs.resize(targets.shape());
  c.entropy.resize(targets.shape());
  parallel_for(y.rows(), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int32_t t = c.targets.data()[n];
      const bool ignored = t == p.ignore_index;
      c.log_probs.data()[n] = ignored ? T(0) : y(n, t);
      c.entropy.data()[n] = ignored ? T(0) : -(y.row(n).array().exp() * y.row(n).array()).sum();
    }
  }, min_items_per_thread(4 * vocab));
  return c.log_probs;
}

// dlog_probs [...] -> dlogits [..., V].
template <class T>
const Tensor<T>& backward(const TokenLogProbs& p, TokenLogProbsCache<T>& c, ConstView<T> dlog_probs) {
  R1_CHECK(c.log_probs.data() != nullptr, "[token_log_probs.backward] the cache holds no forward pass: call forward first");
  R1_CHECK(dlog_probs.shape() == c.log_probs.shape(), "[token_log_probs.backward] dlog_probs have shape ",
           dlog_probs.shape(), ", expected ", c.log_probs.shape());
  R1_CHECK(dlog_probs.is_contiguous(), "[token_log_probs.backward] dlog_probs are not contiguous");
  const auto y = c.log_softmax.y.matrix();
  c.dlogits.resize(c.scaled.shape());
  auto dz = c.dlogits.matrix();
  const T inv_tau = static_cast<T>(1.0 / p.temperature);
  parallel_for(y.rows(), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int32_t t = c.targets.data()[n];
      if (t == p.ignore_index) {
        dz.row(n).setZero();
        continue;
      }
      const T g = dlog_probs.data()[n] * inv_tau;
      dz.row(n) = -g * y.row(n).array().exp();
      dz(n, t) += g;
    }
  }, min_items_per_thread(4 * y.cols()));
  return c.dlogits;
}

// ---------------------------------------------------------------------------------------
// The loss. Views left empty (default) are absent. Dev = Cuda runs the per-token loss on the
// GPU (r1/cuda/grpo.cuh); the truncated flags and token_count stay on the host.
template <class T, class Dev = Cpu>
struct GrpoInputs {
  View<const T, Dev> log_probs{};        // [B, T] current policy: what backward differentiates
  View<const T, Dev> mask{};             // [B, T] 1 on completion tokens, 0 on padding
  View<const T, Dev> advantages{};       // [B], or [B, T] per token (process supervision, token level)
  View<const T, Dev> old_log_probs{};    // [B, T] of the sampling policy; empty: rho = 1 (num_iterations 1)
  View<const T, Dev> ref_log_probs{};    // [B, T]; needed when beta > 0, never read when beta == 0
  View<const T, Dev> entropy{};          // [B, T] for the entropy metric; empty: none
  std::span<const uint8_t> truncated{};  // [B] 1: hit the length limit without a stop token
  double token_count = 0.0;              // dapo's N over the whole step; 0: this batch's tokens
};

struct GrpoMetrics {
  double loss = 0.0;
  double tokens = 0.0;             // completion tokens that count here, after masking
  double clip_ratio_low = 0.0;     // TRL clip_ratio/low_mean
  double clip_ratio_high = 0.0;    // TRL clip_ratio/high_mean
  double clip_ratio_region = 0.0;  // TRL clip_ratio/region_mean
  double clip_ratio_dual = 0.0;    // verl pg_clipfrac_lower: A < 0 and the bound -A c taken
  double kl = 0.0;                 // token mean of the estimator; 0 when beta == 0
  double entropy = 0.0;            // token mean of inputs.entropy; 0 without it
};

template <class T, class Dev = Cpu>
struct GrpoCache {
  Tensor<T, Dev> dloss_dlog_probs;  // [B, T] for dloss = 1: the loss is cheap, so forward finds it
  Tensor<T, Dev> dlog_probs;        // [B, T], backward's output
  GrpoMetrics metrics;
  Tensor<double, Dev> workspace;    // CUDA: per-completion sums and the totals (unused on the CPU)
};

// Completion tokens that count in a mask [B, T] (a Tensor or View), without the truncated
// completions when the loss masks them: sum these over a step's micro-batches for dapo's N.
template <class Mask>
double completion_tokens(const GrpoLoss& loss, const Mask& mask, std::span<const uint8_t> truncated) {
  R1_CHECK(mask.rank() == 2, "[grpo.completion_tokens] mask has shape ", mask.shape(), ", expected [B, T]");
  R1_CHECK(truncated.empty() || static_cast<int64_t>(truncated.size()) == mask.size(0), "[grpo.completion_tokens] ",
           truncated.size(), " truncated flags for ", mask.size(0), " completions");
  double count = 0.0;
  for (int64_t b = 0; b < mask.size(0); ++b) {
    if (loss.mask_truncated_completions && !truncated.empty() && truncated[b]) continue;
    for (int64_t t = 0; t < mask.size(1); ++t) count += static_cast<double>(mask(b, t));
  }
  return count;
}

namespace detail {

// The per-token functions below are R1_HOST_DEVICE: the CUDA loss (r1/cuda/grpo.cuh) calls
// the same code. clamp_to and max_of are std::clamp and std::max (same comparisons).
R1_HOST_DEVICE double clamp_to(double v, double low, double high) { return v < low ? low : high < v ? high : v; }
R1_HOST_DEVICE double max_of(double a, double b) { return a < b ? b : a; }

// KL estimator k(lp, ref) and dk/dlp.
struct KlTerm {
  double value, grad;
};

R1_HOST_DEVICE KlTerm kl_term(KlEstimator estimator, double lp, double ref) {
  switch (estimator) {
    case KlEstimator::K1:
      return {lp - ref, 1.0};
    case KlEstimator::K2:
      return {0.5 * (lp - ref) * (lp - ref), lp - ref};
    case KlEstimator::K3: {
      const double raw = ref - lp, u = clamp_to(raw, -20.0, 20.0);
      const double k = ::expm1(u) - u;
      const double clamped = clamp_to(k, -10.0, 10.0);
      const bool flows = raw == u && k == clamped;  // the clamps pass gradient only inside
      return {clamped, flows ? -::expm1(u) : 0.0};
    }
  }
  return {0.0, 0.0};
}

// The clipped surrogate l(rho) for advantage a and dl/drho, plus which clips hold.
struct Surrogate {
  double value = 0.0, grad = 0.0;
  bool low = false, high = false, dual = false;
};

// rho's clip range [low, high] and the dual clip c (0: off), from a GrpoLoss.
struct ClipBounds {
  double low, high, dual;
};

inline ClipBounds clip_bounds(const GrpoLoss& loss) {
  return {1.0 - loss.epsilon, 1.0 + loss.eps_high(), loss.clip_ratio_c};
}

R1_HOST_DEVICE Surrogate surrogate(const ClipBounds& clip, double rho, double a) {
  Surrogate s;
  const double unclipped = -a * rho, clipped = -a * clamp_to(rho, clip.low, clip.high);
  // clipped > unclipped only when rho is outside the range, where the clip has no gradient.
  s.value = max_of(unclipped, clipped);
  s.grad = clipped > unclipped ? 0.0 : -a;
  if (clip.dual > 0.0 && a < 0.0 && s.value > -a * clip.dual) {
    s.value = -a * clip.dual;
    s.grad = 0.0;
    s.dual = true;
  }
  s.low = rho < clip.low && a < 0.0;
  s.high = rho > clip.high && a > 0.0;
  return s;
}

inline Surrogate surrogate(const GrpoLoss& loss, double rho, double a) { return surrogate(clip_bounds(loss), rho, a); }

// Reduction weight of a token with effective mask m in a completion of `length` tokens
// (loss = sum w L); tokens: this batch's, token_count: dapo's N (0: this batch's).
R1_HOST_DEVICE double token_weight(LossType loss_type, double m, double batch, double length, double tokens,
                                   double token_count, double max_completion_length) {
  switch (loss_type) {
    case LossType::Grpo: return m / (batch * max_of(1.0, length));
    case LossType::Bnpo: return m / max_of(1.0, tokens);
    case LossType::Dapo: return m / (token_count > 0.0 ? token_count : max_of(1.0, tokens));
    case LossType::DrGrpo: return m / (batch * max_completion_length);
    case LossType::SeqMeanTokenSum: return m / batch;
  }
  return 0.0;
}

}  // namespace detail

R1_DECLARE_IMPL(GrpoImpl, "grpo.cuh");

template <>
struct GrpoImpl<Cpu> {
  // The loss over validated inputs; fills c.metrics and c.dloss_dlog_probs.
  template <class T>
  static T forward(const GrpoLoss& loss, const GrpoInputs<T>& in, GrpoCache<T>& c) {
    const int64_t B = in.log_probs.size(0), L = in.log_probs.size(1);
    const Shape bt{B, L};
    const bool per_token = in.advantages.rank() == 2;
    const bool has_old = !in.old_log_probs.empty();
    const bool use_kl = loss.beta > 0.0;

    // The effective mask: 0/1 values, truncated completions zeroed when asked.
    std::vector<double> mask(static_cast<std::size_t>(B * L));
    std::vector<double> lengths(B, 0.0);
    for (int64_t b = 0; b < B; ++b) {
      const bool dropped = loss.mask_truncated_completions && in.truncated[b];
      for (int64_t t = 0; t < L; ++t) {
        const double m = static_cast<double>(in.mask(b, t));
        R1_CHECK(m == 0.0 || m == 1.0, "[grpo.forward] mask(", b, ", ", t, ") is ", m, ", expected 0 or 1");
        mask[b * L + t] = dropped ? 0.0 : m;
        lengths[b] += mask[b * L + t];
      }
    }
    double tokens = 0.0;
    for (const double n : lengths) tokens += n;

    // Reduction weight of token (b, t): loss = sum w L.
    const double batch = static_cast<double>(B);
    const auto weight = [&](int64_t b, int64_t t) {
      return detail::token_weight(loss.loss_type, mask[b * L + t], batch, lengths[b], tokens, in.token_count,
                                  static_cast<double>(loss.max_completion_length));
    };
    const auto log_ratio = [&](int64_t b, int64_t t) {
      return has_old ? static_cast<double>(in.log_probs(b, t)) - static_cast<double>(in.old_log_probs(b, t)) : 0.0;
    };
    const auto advantage = [&](int64_t b, int64_t t) {
      return static_cast<double>(per_token ? in.advantages(b, t) : in.advantages(b));
    };

    c.dloss_dlog_probs.resize(bt, /*zero=*/true);
    GrpoMetrics& metrics = c.metrics;
    metrics = GrpoMetrics{};
    metrics.tokens = tokens;
    const double token_norm = std::max(1.0, tokens);
    double total = 0.0;
    for (int64_t b = 0; b < B; ++b) {
      const bool sequence = loss.importance_sampling_level == ImportanceSampling::Sequence;
      double seq_log_ratio = 0.0;
      if (sequence) {
        for (int64_t t = 0; t < L; ++t)
          if (mask[b * L + t] != 0.0) seq_log_ratio += log_ratio(b, t);
        seq_log_ratio /= std::max(1.0, lengths[b]);
      }
      double seq_weighted_grad = 0.0;  // sequence level: sum_t w dl/drho, gathered before spreading
      for (int64_t t = 0; t < L; ++t) {
        const double w = weight(b, t);
        if (mask[b * L + t] == 0.0) continue;
        const double raw = sequence ? seq_log_ratio : log_ratio(b, t);
        const double x = std::clamp(raw, -20.0, 20.0);
        const double rho = std::exp(x), drho = x == raw ? rho : 0.0;
        const detail::Surrogate s = detail::surrogate(loss, rho, advantage(b, t));
        double value = s.value, grad = 0.0;
        if (sequence) {
          seq_weighted_grad += w * s.grad;
        } else {
          grad = w * s.grad * drho;
          const double share = 1.0 / token_norm;
          metrics.clip_ratio_low += s.low * share;
          metrics.clip_ratio_high += s.high * share;
          metrics.clip_ratio_region += (s.low || s.high) * share;
          metrics.clip_ratio_dual += s.dual * share;
        }
        if (use_kl) {
          const auto [k, dk] = detail::kl_term(loss.kl_estimator, static_cast<double>(in.log_probs(b, t)),
                                               static_cast<double>(in.ref_log_probs(b, t)));
          value += loss.beta * k;
          grad += w * loss.beta * dk;
          metrics.kl += k / token_norm;
        }
        if (!in.entropy.empty()) metrics.entropy += static_cast<double>(in.entropy(b, t)) / token_norm;
        total += w * value;
        c.dloss_dlog_probs(b, t) = static_cast<T>(grad);
      }
      if (sequence) {
        // d log rho[b] / d lp[b, t] = m / max(1, |o_b|) inside the clamp.
        const double x = std::clamp(seq_log_ratio, -20.0, 20.0), rho = std::exp(x);
        const double spread = x == seq_log_ratio ? seq_weighted_grad * rho / std::max(1.0, lengths[b]) : 0.0;
        for (int64_t t = 0; t < L; ++t)
          if (mask[b * L + t] != 0.0) c.dloss_dlog_probs(b, t) += static_cast<T>(spread);
        // TRL counts clipping per completion at sequence level.
        const detail::Surrogate s = detail::surrogate(loss, rho, advantage(b, 0));
        metrics.clip_ratio_low += s.low / batch;
        metrics.clip_ratio_high += s.high / batch;
        metrics.clip_ratio_region += (s.low || s.high) / batch;
        metrics.clip_ratio_dual += s.dual / batch;
      }
    }
    metrics.loss = total;
    return static_cast<T>(total);
  }

  template <class T>
  static void scale_gradient(ConstView<T> dloss_dlog_probs, T dloss, View<T> dlog_probs) {
    dlog_probs.matrix() = dloss_dlog_probs.matrix() * dloss;
  }
};

// The scalar loss; its gradient for dloss = 1 is computed too and kept in the cache.
template <class T, class Dev>
T forward(const GrpoLoss& loss, const GrpoInputs<T, Dev>& in, GrpoCache<T, Dev>& c) {
  loss.validate();
  R1_CHECK(in.log_probs.rank() == 2 && in.log_probs.size(0) > 0 && in.log_probs.size(1) > 0,
           "[grpo.forward] log_probs have shape ", in.log_probs.shape(), ", expected [B, T] with B, T > 0");
  const int64_t B = in.log_probs.size(0), L = in.log_probs.size(1);
  const Shape bt{B, L};
  check_shape(in.mask, bt, "grpo.forward", "mask");
  const bool per_token = in.advantages.rank() == 2;
  R1_CHECK(in.advantages.shape() == Shape{B} || in.advantages.shape() == bt, "[grpo.forward] advantages have shape ",
           in.advantages.shape(), ", expected [", B, "] or ", bt);
  R1_CHECK(!per_token || loss.importance_sampling_level == ImportanceSampling::Token,
           "[grpo.forward] per-token advantages ", bt, " need importance_sampling_level \"token\": a sequence-level "
           "ratio goes with one advantage per completion");
  const bool has_old = !in.old_log_probs.empty();
  if (has_old) check_shape(in.old_log_probs, bt, "grpo.forward", "old_log_probs");
  R1_CHECK(has_old || loss.num_iterations == 1, "[grpo.forward] num_iterations is ", loss.num_iterations,
           ": iterations after the first need the sampling policy's old_log_probs");
  const bool use_kl = loss.beta > 0.0;
  if (use_kl) {
    R1_CHECK(!in.ref_log_probs.empty(), "[grpo.forward] beta is ", loss.beta, " but ref_log_probs are missing");
    check_shape(in.ref_log_probs, bt, "grpo.forward", "ref_log_probs");
  }
  if (!in.entropy.empty()) check_shape(in.entropy, bt, "grpo.forward", "entropy");
  R1_CHECK(in.truncated.empty() || static_cast<int64_t>(in.truncated.size()) == B, "[grpo.forward] ",
           in.truncated.size(), " truncated flags for ", B, " completions");
  R1_CHECK(!loss.mask_truncated_completions || !in.truncated.empty(), "[grpo.forward] mask_truncated_completions "
           "needs the truncated flags of the ", B, " completions");
  R1_CHECK(in.token_count >= 0.0 && std::isfinite(in.token_count), "[grpo.forward] token_count is ", in.token_count,
           ", expected >= 0");
  R1_CHECK(loss.loss_type != LossType::DrGrpo || L <= loss.max_completion_length, "[grpo.forward] dr_grpo: ", L,
           " completion tokens exceed max_completion_length ", loss.max_completion_length);

  return GrpoImpl<Dev>::forward(loss, in, c);
}

// d loss / d log_probs [B, T] for an upstream gradient dloss.
template <class T, class Dev>
const Tensor<T, Dev>& backward(const GrpoLoss&, GrpoCache<T, Dev>& c, T dloss = T(1)) {
  R1_CHECK(c.dloss_dlog_probs.data() != nullptr, "[grpo.backward] the cache holds no forward pass: call forward first");
  c.dlog_probs.resize(c.dloss_dlog_probs.shape());
  GrpoImpl<Dev>::scale_gradient(c.dloss_dlog_probs.view(), dloss, c.dlog_probs.view());
  return c.dlog_probs;
}

// ---------------------------------------------------------------------------------------
// Completion lengths, as TRL logs them (completions/mean_length, ..., clipped_ratio): over
// all completions, and over the terminated ones (0 when every completion was truncated).
struct CompletionStats {
  double mean_length = 0.0, min_length = 0.0, max_length = 0.0;
  double clipped_ratio = 0.0;  // fraction truncated
  double mean_terminated_length = 0.0, min_terminated_length = 0.0, max_terminated_length = 0.0;
};

inline CompletionStats completion_stats(std::span<const int64_t> lengths, std::span<const uint8_t> truncated) {
  R1_CHECK(!lengths.empty(), "[completion_stats] no completions");
  R1_CHECK(truncated.size() == lengths.size(), "[completion_stats] ", truncated.size(), " truncated flags for ",
           lengths.size(), " completions");
  CompletionStats s;
  const auto n = static_cast<double>(lengths.size());
  s.min_length = s.max_length = static_cast<double>(lengths[0]);
  int64_t terminated = 0;
  for (std::size_t i = 0; i < lengths.size(); ++i) {
    const auto len = static_cast<double>(lengths[i]);
    s.mean_length += len / n;
    s.min_length = std::min(s.min_length, len);
    s.max_length = std::max(s.max_length, len);
    if (truncated[i]) {
      s.clipped_ratio += 1.0 / n;
      continue;
    }
    s.min_terminated_length = terminated ? std::min(s.min_terminated_length, len) : len;
    s.max_terminated_length = terminated ? std::max(s.max_terminated_length, len) : len;
    s.mean_terminated_length += len;
    ++terminated;
  }
  if (terminated) s.mean_terminated_length /= static_cast<double>(terminated);
  return s;
}

}  // namespace r1
