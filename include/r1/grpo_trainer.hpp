// r1/grpo_trainer.hpp: the R1-Zero reinforcement-learning loop, GRPO on r1::Model<float>
// with rule-based rewards (r1/rewards.hpp) and the loss of r1/grpo.hpp.
//
// One step (GrpoTrainer::step), for P prompts and G completions each:
//   rollouts   G completions per prompt, sampled with the latent KV cache, batched
//              (r1::generate; the stop token ends a completion and is kept, a completion
//              that hits max_new_tokens is truncated)
//   rewards    RewardSet on the decoded completions (the final stop token removed) -> r [P*G, F]
//   dynamic sampling (DAPO, optional): groups whose total rewards are all equal carry no
//              signal; they are dropped and new prompts sampled, up to max_refills rounds
//   advantages compute_advantages over explicit group ids (one per prompt)
//   log-probs  sequences = prompt + completion, right-padded; token j of a completion is
//              scored by the logits at the position before it, at the sampling temperature.
//              old log-probs (the sampling policy) are computed before any update when the
//              batch is used more than once (num_iterations > 1 or minibatches > 1); the
//              reference model's only when beta > 0. The reference is a frozen copy of the
//              policy, reset to it every ref_reset_every steps (R1: 400).
//   updates    num_iterations passes over the batch, each in `minibatches` slices; each slice:
//              GRPO loss forward/backward -> d log-probs -> d logits -> model backward,
//              gradient clipping, AdamW
// Metrics: rewards per function, frac_reward_zero_std, the loss, clip fractions, KL,
// entropy and completion lengths, as JSON lines and a progress bar.
//
// Legend: P prompts per step, G group size, F reward functions, N = P*G completions,
// S longest prompt + completion, V vocabulary.
#pragma once

#include "config.hpp"
#include "generate.hpp"
#include "grpo.hpp"
#include "model.hpp"
#include "optim.hpp"
#include "rewards.hpp"
#include "tensor.hpp"
#include "tokenizer.hpp"
#include "train.hpp"

#include <nlohmann/json.hpp>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <functional>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

namespace r1 {

struct GrpoTrainerConfig {
  int64_t prompts_per_step = 16;   // P (R1-Zero: 32)
  int64_t group_size = 8;          // G (TRL's num_generations; R1-Zero: 16)
  int64_t max_new_tokens = 64;     // completion length limit
  SamplingConfig sampling{};       // temperature 1 (TRL, R1-Zero); log-probs use the same temperature
  std::vector<int32_t> stop_tokens{};
  GrpoLoss loss{};                 // loss type, clipping, beta, num_iterations (grpo.hpp)
  AdvantageConfig advantages{};
  int64_t minibatches = 1;         // optimizer steps per pass over the rollouts
  int64_t ref_reset_every = 0;     // steps; 0: the reference stays the initial policy
  bool dynamic_sampling = false;   // drop groups with all-equal rewards and refill (DAPO)
  int64_t max_refills = 3;
  AdamWConfig adamw{.lr = 1e-5, .beta1 = 0.9, .beta2 = 0.99, .eps = 1e-8, .weight_decay = 0.0};
  double clip_grad_norm = 1.0;     // 0: none
  int64_t total_steps = 0;         // for the progress bar only
  std::filesystem::path metrics_file{};  // JSON lines, appended; empty: none
  std::ostream* progress = nullptr;

  void validate() const {
    R1_CHECK(prompts_per_step > 0 && group_size > 0 && max_new_tokens > 0, "[grpo_trainer] prompts_per_step ",
             prompts_per_step, ", group_size ", group_size, " and max_new_tokens ", max_new_tokens, " must be positive");
    R1_CHECK(minibatches > 0 && minibatches <= prompts_per_step * group_size, "[grpo_trainer] minibatches is ", minibatches,
             ", expected in [1, prompts_per_step * group_size = ", prompts_per_step * group_size, "]");
    R1_CHECK(ref_reset_every >= 0 && max_refills >= 0 && clip_grad_norm >= 0.0, "[grpo_trainer] ref_reset_every ",
             ref_reset_every, ", max_refills ", max_refills, " and clip_grad_norm ", clip_grad_norm, " must be >= 0");
    R1_CHECK(sampling.temperature > 0.0, "[grpo_trainer] sampling temperature is ", sampling.temperature,
             ": GRPO needs a sampling policy with log-probs (temperature > 0)");
    sampling.validate();
    loss.validate();
    advantages.validate();
  }
};

// A prompt for RL: its ids (as the model sees them), its text (for reward functions) and
// the reference answer the rewards compare against (any string the rewards understand).
struct RlPrompt {
  std::vector<int32_t> ids;
  std::string text;
  std::string answer;
};

struct GrpoStepMetrics {
  int64_t step = 0;
  GrpoMetrics loss;                  // of the last minibatch
  RewardStats rewards;
  CompletionStats lengths;
  std::vector<std::string> reward_names;
  int64_t groups_dropped = 0;        // by dynamic sampling
  int64_t completions = 0;
  double grad_norm = 0.0;
  double rollout_seconds = 0.0, train_seconds = 0.0;
};

class GrpoTrainer {
 public:
  GrpoTrainer(Model<float>& policy, const Tokenizer& tokenizer, RewardSet rewards, const GrpoTrainerConfig& config,
              uint64_t seed = 0)
      : policy_(&policy), tokenizer_(&tokenizer), rewards_(std::move(rewards)), config_((config.validate(), config)),
        grads_(zeros_like(policy)), rng_(seed) {
    R1_CHECK(rewards_.size() > 0, "[grpo_trainer] no reward functions");
    registry_.add("", policy, grads_);
    optimizer_.emplace(registry_, config.adamw);
    if (config_.loss.beta > 0.0) reference_ = policy;
  }
  GrpoTrainer(const GrpoTrainer&) = delete;
  GrpoTrainer& operator=(const GrpoTrainer&) = delete;

  int64_t current_step() const { return step_; }
  Rng& rng() { return rng_; }

  // One GRPO step on prompts drawn from next_prompt (which may use the trainer's rng).
  GrpoStepMetrics step(const std::function<RlPrompt(Rng&)>& next_prompt) {
    GrpoStepMetrics m;
    m.step = step_;
    m.reward_names = rewards_.names();
    const auto t0 = std::chrono::steady_clock::now();
    rollout(next_prompt, m);
    const auto t1 = std::chrono::steady_clock::now();
    m.rollout_seconds = std::chrono::duration<double>(t1 - t0).count();
    if (m.completions > 0) train(m);
    m.train_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
    ++step_;
    if (reference_ && config_.ref_reset_every > 0 && step_ % config_.ref_reset_every == 0) *reference_ = *policy_;
    report(m);
    return m;
  }

 private:
  // One completion of the rollout batch.
  struct Sample {
    int64_t group = 0;
    std::vector<int32_t> prompt, completion;
    bool truncated = false;
  };

  void rollout(const std::function<RlPrompt(Rng&)>& next_prompt, GrpoStepMetrics& m) {
    samples_.clear();
    std::vector<std::vector<double>> reward_rows;
    std::vector<RlPrompt> kept;
    const int64_t G = config_.group_size, F = rewards_.size();
    for (int64_t round = 0; round <= config_.max_refills; ++round) {
      const int64_t wanted = config_.prompts_per_step - static_cast<int64_t>(kept.size());
      if (wanted == 0) break;
      std::vector<RlPrompt> prompts;
      std::vector<std::vector<int32_t>> batch;
      for (int64_t p = 0; p < wanted; ++p) {
        prompts.push_back(next_prompt(rng_));
        for (int64_t g = 0; g < G; ++g) batch.push_back(prompts.back().ids);
      }
      GenerationConfig generation{.max_new_tokens = config_.max_new_tokens, .sampling = config_.sampling,
                                  .seed = rng_.next_u64(), .stop_tokens = config_.stop_tokens};
      const GenerationResult result = generate(*policy_, batch, generation);
      // Rewards on the text without the final stop token.
      std::vector<std::string> texts(batch.size());
      std::vector<Completion> completions(batch.size());
      for (std::size_t i = 0; i < batch.size(); ++i) {
        const auto& tokens = result.tokens[i];
        const bool stopped = result.finish[i] == FinishReason::Stop;
        texts[i] = tokenizer_->decode(std::span<const int32_t>(tokens.data(), tokens.size() - (stopped ? 1 : 0)));
        const RlPrompt& prompt = prompts[i / G];
        completions[i] = Completion{.index = static_cast<int64_t>(i), .prompt = prompt.text, .text = texts[i],
                                    .answer = prompt.answer, .tokens = static_cast<int64_t>(tokens.size()),
                                    .truncated = !stopped};
      }
      const Tensor<double> r = rewards_.evaluate(completions);
      const bool last_round = round == config_.max_refills;
      for (int64_t p = 0; p < wanted; ++p) {
        std::vector<double> totals;
        for (int64_t g = 0; g < G; ++g) {
          double total = 0.0;
          for (int64_t f = 0; f < F; ++f)
            total += std::isnan(r(p * G + g, f)) ? 0.0 : rewards_.weights()[f] * r(p * G + g, f);
          totals.push_back(total);
        }
        const bool flat = std::all_of(totals.begin(), totals.end(), [&](double t) { return std::abs(t - totals[0]) <= 1e-8; });
        if (config_.dynamic_sampling && flat && G > 1 && !last_round) {
          ++m.groups_dropped;
          continue;
        }
        const auto group = static_cast<int64_t>(kept.size());
        kept.push_back(prompts[p]);
        for (int64_t g = 0; g < G; ++g) {
          const int64_t i = p * G + g;
          samples_.push_back(Sample{group, batch[i], result.tokens[i], result.finish[i] == FinishReason::Length});
          std::vector<double> row(static_cast<std::size_t>(F));
          for (int64_t f = 0; f < F; ++f) row[f] = r(i, f);
          reward_rows.push_back(std::move(row));
        }
      }
      if (!config_.dynamic_sampling) break;
    }
    m.completions = static_cast<int64_t>(samples_.size());
    if (samples_.empty()) return;
    const int64_t N = m.completions;
    rewards_table_.resize(Shape{N, F});
    for (int64_t i = 0; i < N; ++i)
      for (int64_t f = 0; f < F; ++f) rewards_table_(i, f) = reward_rows[i][f];
    std::vector<int64_t> group_ids, lengths;
    std::vector<uint8_t> truncated;
    for (const Sample& s : samples_) {
      group_ids.push_back(s.group);
      lengths.push_back(static_cast<int64_t>(s.completion.size()));
      truncated.push_back(s.truncated ? 1 : 0);
    }
    m.rewards = compute_advantages(config_.advantages, rewards_table_.view(), rewards_.weights(), group_ids, advantages_);
    m.lengths = completion_stats(lengths, truncated);
  }

  // ids [N, S] (prompt + completion, right-padded with 0), targets [N, S] holding each
  // completion token at the position that predicts it (else ignore), mask [N, S].
  void build_batch() {
    const auto N = static_cast<int64_t>(samples_.size());
    int64_t S = 0;
    for (const Sample& s : samples_) S = std::max<int64_t>(S, static_cast<int64_t>(s.prompt.size() + s.completion.size()));
    ids_.resize(Shape{N, S}, /*zero=*/true);
    targets_.resize(Shape{N, S});
    mask_.resize(Shape{N, S}, /*zero=*/true);
    truncated_.assign(static_cast<std::size_t>(N), 0);
    std::fill(targets_.data(), targets_.data() + targets_.numel(), TokenLogProbs{}.ignore_index);
    for (int64_t b = 0; b < N; ++b) {
      const Sample& s = samples_[b];
      const auto P = static_cast<int64_t>(s.prompt.size());
      std::copy(s.prompt.begin(), s.prompt.end(), ids_.data() + b * S);
      std::copy(s.completion.begin(), s.completion.end(), ids_.data() + b * S + P);
      for (std::size_t j = 0; j < s.completion.size(); ++j) {
        targets_(b, P - 1 + static_cast<int64_t>(j)) = s.completion[j];
        mask_(b, P - 1 + static_cast<int64_t>(j)) = 1.0f;
      }
      truncated_[b] = s.truncated ? 1 : 0;
    }
  }

  // Per-token log-probs [rows, S] of model on rows [begin, end) of the batch.
  const Tensor<float>& log_probs(const Model<float>& model, int64_t begin, int64_t end) {
    const auto& logits = forward(model, ids_.view().slice(0, begin, end), cache_);
    return forward(TokenLogProbs{.temperature = config_.sampling.temperature}, logits.view(),
                   targets_.view().slice(0, begin, end), log_probs_cache_);
  }

  void train(GrpoStepMetrics& m) {
    build_batch();
    const int64_t N = ids_.size(0);
    const bool reuse = config_.loss.num_iterations > 1 || config_.minibatches > 1;
    if (reuse) old_log_probs_ = log_probs(*policy_, 0, N);
    if (config_.loss.beta > 0.0) ref_log_probs_ = log_probs(*reference_, 0, N);
    for (int64_t iteration = 0; iteration < config_.loss.num_iterations; ++iteration) {
      for (int64_t mb = 0; mb < config_.minibatches; ++mb) {
        const int64_t begin = N * mb / config_.minibatches, end = N * (mb + 1) / config_.minibatches;
        if (begin == end) continue;
        registry_.zero_grad();
        const Tensor<float>& lp = log_probs(*policy_, begin, end);  // lives in log_probs_cache_ until the next call
        GrpoInputs<float> in;
        in.log_probs = lp.view();
        in.mask = mask_.view().slice(0, begin, end);
        in.advantages = advantages_.view().slice(0, begin, end);
        if (reuse) in.old_log_probs = old_log_probs_.view().slice(0, begin, end);
        if (config_.loss.beta > 0.0) in.ref_log_probs = ref_log_probs_.view().slice(0, begin, end);
        in.entropy = log_probs_cache_.entropy.view();
        in.truncated = std::span<const uint8_t>(truncated_.data() + begin, static_cast<std::size_t>(end - begin));
        forward(config_.loss, in, grpo_cache_);
        const auto& dlogits = backward(TokenLogProbs{.temperature = config_.sampling.temperature}, log_probs_cache_,
                                       backward(config_.loss, grpo_cache_));
        r1::backward(*policy_, cache_, dlogits, grads_);
        m.grad_norm = clip_grad_norm(registry_, config_.clip_grad_norm > 0.0 ? config_.clip_grad_norm
                                                                             : std::numeric_limits<double>::infinity());
        if (std::isfinite(m.grad_norm)) optimizer_->step();
        m.loss = grpo_cache_.metrics;
      }
    }
  }

  void report(const GrpoStepMetrics& m) const {
    nlohmann::json rewards = nlohmann::json::object();
    for (std::size_t f = 0; f < m.reward_names.size() && f < m.rewards.mean.size(); ++f)
      rewards[m.reward_names[f]] = {{"mean", m.rewards.mean[f]}, {"std", m.rewards.std[f]}};
    const nlohmann::json line = {{"step", m.step},
                                 {"reward", m.rewards.reward_mean},
                                 {"reward_std", m.rewards.reward_std},
                                 {"rewards", rewards},
                                 {"frac_reward_zero_std", m.rewards.frac_reward_zero_std},
                                 {"groups_dropped", m.groups_dropped},
                                 {"completions", m.completions},
                                 {"loss", m.loss.loss},
                                 {"clip_ratio_low", m.loss.clip_ratio_low},
                                 {"clip_ratio_high", m.loss.clip_ratio_high},
                                 {"clip_ratio_region", m.loss.clip_ratio_region},
                                 {"kl", m.loss.kl},
                                 {"entropy", m.loss.entropy},
                                 {"completion_mean_length", m.lengths.mean_length},
                                 {"completion_clipped_ratio", m.lengths.clipped_ratio},
                                 {"grad_norm", m.grad_norm},
                                 {"rollout_seconds", m.rollout_seconds},
                                 {"train_seconds", m.train_seconds}};
    if (!config_.metrics_file.empty()) detail::append_json_line(config_.metrics_file, line, "grpo_trainer");
    if (config_.progress != nullptr)
      detail::write_progress(*config_.progress, m.step + 1, std::max(config_.total_steps, m.step + 1),
                             fmt::format("reward {:.3f}  zero-std {:.2f}  len {:.1f}  |g| {:.3f}", m.rewards.reward_mean,
                                         m.rewards.frac_reward_zero_std, m.lengths.mean_length, m.grad_norm));
  }

  Model<float>* policy_;
  const Tokenizer* tokenizer_;
  RewardSet rewards_;
  GrpoTrainerConfig config_;
  Model<float> grads_;
  std::optional<Model<float>> reference_;
  ParameterRegistry<float> registry_;
  std::optional<AdamW<float>> optimizer_;
  Rng rng_;
  int64_t step_ = 0;
  // Buffers reused across steps.
  std::vector<Sample> samples_;
  Tensor<double> rewards_table_;
  Tensor<float> advantages_, mask_, old_log_probs_, ref_log_probs_;
  Tensor<int32_t> ids_, targets_;
  std::vector<uint8_t> truncated_;
  ModelCache<float> cache_;
  TokenLogProbsCache<float> log_probs_cache_;
  GrpoCache<float> grpo_cache_;
};

}  // namespace r1
