// Tests of r1/grpo_trainer.hpp: GRPO raises a rule-based reward, dynamic sampling drops
// groups without signal, and the old, reference and current log-probs line up.
#include <r1/bpe_trainer.hpp>
#include <r1/grpo_trainer.hpp>

#include "model_support.hpp"
#include "support.hpp"

#include <catch2/catch.hpp>

using r1::Shape;

namespace {

// A byte-level tokenizer (256 byte tokens after "<eos>") and a tiny model over it.
const r1::Tokenizer& byte_tokenizer() {
  static const r1::Tokenizer tokenizer = [] {
    r1::BpeTrainer bpe({.vocab_size = 257, .special_tokens = {"<eos>"}, .pre_tokenizer = "gpt2"});
    bpe.feed("grpo");
    bpe.train();
    return r1::Tokenizer::from_json(bpe.to_json());
  }();
  return tokenizer;
}

r1::Model<float> policy(uint64_t seed) {
  auto j = r1test::tiny_v3_json();
  j["vocab_size"] = byte_tokenizer().vocab_size();
  j["num_nextn_predict_layers"] = 0;
  r1::Model<float> m(r1::ModelConfig::from_json(j));
  r1::Rng rng(seed);
  r1::init_weights(m, rng);
  return m;
}

r1::RlPrompt prompt_x(r1::Rng&) { return {byte_tokenizer().encode("x"), "x", ""}; }

r1::GrpoTrainerConfig small_config() {
  r1::GrpoTrainerConfig c;
  c.prompts_per_step = 4;
  c.group_size = 8;
  c.max_new_tokens = 3;
  c.stop_tokens = {0};
  c.adamw.lr = 2e-2;
  return c;
}

}  // namespace

TEST_CASE("GRPO raises the reward of a rule-based task", "[grpo_trainer]") {
  // Reward 1 when the completion starts with an ASCII byte: about half do at the start.
  r1::RewardSet rewards;
  rewards.add("ascii_first", [](const r1::Completion& c) {
    return !c.text.empty() && static_cast<unsigned char>(c.text[0]) < 128 ? 1.0 : 0.0;
  });
  auto model = policy(1);
  r1::GrpoTrainer trainer(model, byte_tokenizer(), rewards, small_config(), 7);
  std::vector<double> reward;
  for (int s = 0; s < 20; ++s) {
    const auto m = trainer.step(prompt_x);
    REQUIRE(m.completions == 32);
    CHECK(std::isfinite(m.loss.loss));
    reward.push_back(m.rewards.reward_mean);
  }
  const double start = (reward[0] + reward[1]) / 2, end = (reward[18] + reward[19]) / 2;
  INFO("reward " << start << " -> " << end);
  CHECK(end > start + 0.3);
  CHECK(trainer.current_step() == 20);

  // The same seed gives the same run.
  auto again = policy(1);
  r1::GrpoTrainer replay(again, byte_tokenizer(), rewards, small_config(), 7);
  for (int s = 0; s < 3; ++s) CHECK(replay.step(prompt_x).rewards.reward_mean == reward[s]);
}

TEST_CASE("dynamic sampling drops groups whose rewards are all equal", "[grpo_trainer]") {
  r1::RewardSet rewards;
  rewards.add("constant", [](const r1::Completion&) { return 1.0; });
  auto model = policy(2);
  auto config = small_config();
  config.dynamic_sampling = true;
  config.max_refills = 2;
  r1::GrpoTrainer trainer(model, byte_tokenizer(), rewards, config, 3);
  const auto m = trainer.step(prompt_x);
  // Every round's groups are flat: two rounds dropped, the last one kept to fill the batch.
  CHECK(m.groups_dropped == 8);
  CHECK(m.completions == 32);
  CHECK(m.rewards.frac_reward_zero_std == 1.0);
}

TEST_CASE("old, reference and current log-probs agree while the policy stands still", "[grpo_trainer]") {
  r1::RewardSet rewards;
  rewards.add("length", [](const r1::Completion& c) { return static_cast<double>(c.tokens); });
  auto model = policy(3);
  auto config = small_config();
  config.adamw.lr = 0.0;  // the policy never moves: every ratio is exactly 1 and the KL 0
  config.loss.beta = 0.04;
  config.loss.num_iterations = 2;
  config.minibatches = 4;
  config.loss.epsilon = 1e-6;  // any ratio off 1 would count as clipped
  r1::GrpoTrainer trainer(model, byte_tokenizer(), rewards, config, 4);
  const auto m = trainer.step(prompt_x);
  CHECK(m.loss.clip_ratio_region == 0.0);
  CHECK(std::abs(m.loss.kl) < 1e-7);
  CHECK(m.loss.entropy > 0.0);
  CHECK(m.lengths.mean_length > 0.0);
}

TEST_CASE("grpo trainer rejects invalid configs", "[grpo_trainer]") {
  r1::RewardSet rewards;
  rewards.add("one", [](const r1::Completion&) { return 1.0; });
  auto model = policy(4);
  auto config = small_config();
  config.group_size = 0;
  REQUIRE_R1_ERROR(r1::GrpoTrainer(model, byte_tokenizer(), rewards, config), "group_size 0");
  config = small_config();
  config.sampling.temperature = 0.0;
  REQUIRE_R1_ERROR(r1::GrpoTrainer(model, byte_tokenizer(), rewards, config), "GRPO needs a sampling policy");
  config = small_config();
  config.minibatches = 33;
  REQUIRE_R1_ERROR(r1::GrpoTrainer(model, byte_tokenizer(), rewards, config), "minibatches is 33");
  REQUIRE_R1_ERROR(r1::GrpoTrainer(model, byte_tokenizer(), r1::RewardSet{}, small_config()), "no reward functions");
}
