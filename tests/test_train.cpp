// Tests of r1/train.hpp: exact resume from a checkpoint, skipped non-finite steps,
// metrics lines and the progress bar, and that training learns.
#include <r1/train.hpp>

#include "model_support.hpp"
#include "support.hpp"

#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <sstream>

#include <unistd.h>

using r1::Shape;
using r1::Tensor;

namespace {

namespace fs = std::filesystem;

fs::path fresh_dir(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("r1_test_train_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

r1::Model<float> initialized_model(uint64_t seed) {
  r1::Model<float> m(r1::ModelConfig::from_json(r1test::tiny_v3_json()));
  r1::Rng rng(seed);
  r1::init_weights(m, rng);
  return m;
}

// Windows of a fixed token sequence at random offsets: learnable, and it draws from the
// trainer's generator, as a real data loader would.
void windows(int64_t, int64_t, r1::Rng& rng, r1::Batch& batch) {
  static const std::vector<int32_t> text = [] {
    std::vector<int32_t> t;
    for (int i = 0; i < 200; ++i) t.push_back(static_cast<int32_t>((i * 7 + i / 5) % 36));  // token 36 never occurs
    return t;
  }();
  const int64_t B = 2, S = 8;
  batch.ids.resize(Shape{B, S});
  batch.targets.resize(Shape{B, S});
  for (int64_t b = 0; b < B; ++b) {
    const auto offset = static_cast<int64_t>(rng.uniform() * static_cast<double>(text.size() - S - 1));
    for (int64_t s = 0; s < S; ++s) {
      batch.ids(b, s) = text[offset + s];
      batch.targets(b, s) = text[offset + s + 1];
    }
  }
}

r1::TrainConfig small_config() {
  r1::TrainConfig c;
  c.steps = 40;
  c.grad_accum = 2;
  c.adamw.lr = 1e-2;
  c.warmup_steps = 2;
  c.min_lr = 1e-3;
  c.bias_update_rate = 0.01;
  return c;
}

}  // namespace

TEST_CASE("a resumed run reproduces the uninterrupted loss curve exactly", "[train]") {
  const fs::path dir = fresh_dir("resume");
  std::vector<double> uninterrupted;
  {
    auto model = initialized_model(1);
    r1::Trainer trainer(model, small_config(), 99);
    for (int i = 0; i < 6; ++i) uninterrupted.push_back(trainer.step(windows).loss);
  }
  {
    auto model = initialized_model(1);
    r1::Trainer trainer(model, small_config(), 99);
    for (int i = 0; i < 3; ++i) REQUIRE(trainer.step(windows).loss == uninterrupted[i]);
    trainer.save_checkpoint(dir);
  }
  REQUIRE(fs::exists(dir / "latest"));
  REQUIRE(fs::exists(dir / "step-00000003" / "config.json"));
  REQUIRE(fs::exists(dir / "step-00000003" / "model.safetensors"));
  // A different initialization and seed: everything must come from the checkpoint.
  auto model = initialized_model(2);
  r1::Trainer resumed(model, small_config(), 5);
  resumed.load_checkpoint(dir);
  CHECK(resumed.current_step() == 3);
  for (int i = 3; i < 6; ++i) CHECK(resumed.step(windows).loss == uninterrupted[i]);
  // The routing biases moved and were restored with the weights.
  CHECK(model.layers[1].moe.e_score_correction_bias.vector().cwiseAbs().maxCoeff() > 0.0f);
  // The checkpoint is an HF model directory.
  const auto loaded = r1::load_pretrained<float>(dir / "step-00000003");
  CHECK(loaded.config.num_nextn_predict_layers == 1);
  fs::remove_all(dir);
}

TEST_CASE("a non-finite loss skips the step and leaves the weights untouched", "[train]") {
  auto model = initialized_model(3);
  model.embed_tokens.weight(36, 0) = std::numeric_limits<float>::quiet_NaN();  // token 36 poisons a batch
  const fs::path dir = fresh_dir("nan");
  auto config = small_config();
  config.metrics_file = dir / "metrics.jsonl";
  r1::Trainer trainer(model, config, 1);
  const auto poisoned = [](int64_t, int64_t, r1::Rng& rng, r1::Batch& batch) {
    windows(0, 0, rng, batch);
    batch.ids(0, 3) = 36;
  };
  const r1::Model<float> before = model;
  const auto m = trainer.step(poisoned);
  CHECK(m.skipped);
  CHECK_THAT(m.warning, Catch::Contains("loss is nan in micro-batch 0: step skipped, weights unchanged"));
  std::vector<const Tensor<float>*> after_tensors;
  model.visit([&](const std::string&, Tensor<float>& t) { after_tensors.push_back(&t); });
  std::size_t i = 0;
  const_cast<r1::Model<float>&>(before).visit([&](const std::string& name, Tensor<float>& t) {
    INFO(name);
    CHECK(std::memcmp(t.data(), after_tensors[i++]->data(), t.bytes()) == 0);
  });
  // The next clean step trains as usual.
  CHECK(!trainer.step(windows).skipped);
  std::ifstream in(config.metrics_file);
  std::string line;
  std::vector<nlohmann::json> lines;
  while (std::getline(in, line)) lines.push_back(nlohmann::json::parse(line));
  REQUIRE(lines.size() == 2);
  CHECK(lines[0]["skipped"] == true);
  CHECK(lines[0]["warning"].get<std::string>().find("step skipped") != std::string::npos);
  CHECK(lines[1]["skipped"] == false);
  CHECK(lines[1]["step"] == 1);
  fs::remove_all(dir);
}

TEST_CASE("training lowers the loss and reports metrics and progress", "[train]") {
  auto model = initialized_model(4);
  const fs::path dir = fresh_dir("metrics");
  auto config = small_config();
  config.metrics_file = dir / "metrics.jsonl";
  std::ostringstream progress;
  config.progress = &progress;
  r1::Trainer trainer(model, config, 2);
  double first = 0.0, last = 0.0;
  for (int64_t s = 0; s < config.steps; ++s) {
    const auto m = trainer.step(windows);
    REQUIRE(!m.skipped);
    CHECK(m.tokens == 32);
    CHECK(m.mtp_losses.size() == 1);
    CHECK(m.max_load_imbalance >= 1.0);
    (s == 0 ? first : last) = m.main_loss;
  }
  CHECK(last < 0.6 * first);
  CHECK_THAT(progress.str(), Catch::Contains("step 40/40"));
  std::ifstream in(config.metrics_file);
  std::string line;
  int count = 0;
  while (std::getline(in, line)) {
    const auto j = nlohmann::json::parse(line);
    for (const char* key : {"step", "loss", "main_loss", "mtp_losses", "aux_loss", "lr", "grad_norm", "tokens_per_s",
                            "max_load_imbalance", "skipped"})
      CHECK(j.contains(key));
    ++count;
  }
  CHECK(count == 40);
  fs::remove_all(dir);
}

TEST_CASE("trainer rejects bad configs and checkpoints", "[train]") {
  auto model = initialized_model(5);
  auto config = small_config();
  config.grad_accum = 0;
  REQUIRE_R1_ERROR(r1::Trainer(model, config), "grad_accum 0 must be positive");
  config = small_config();
  config.warmup_steps = 41;
  REQUIRE_R1_ERROR(r1::Trainer(model, config), "warmup_steps 41 must lie in [0, steps = 40]");
  r1::Trainer trainer(model, small_config());
  REQUIRE_R1_ERROR(trainer.load_checkpoint("/nonexistent/run"), "no trainer_state.json in '/nonexistent/run'");

  // A checkpoint of another architecture.
  const fs::path dir = fresh_dir("mismatch");
  auto other_json = r1test::tiny_v3_json();
  other_json["hidden_size"] = 24;
  r1::Model<float> other(r1::ModelConfig::from_json(other_json));
  r1::Trainer other_trainer(other, small_config());
  other_trainer.save_checkpoint(dir);
  REQUIRE_R1_ERROR(trainer.load_checkpoint(dir), "differs from the model being trained");
  fs::remove_all(dir);
}
