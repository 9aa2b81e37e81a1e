// r1/train.hpp: the pre-training loop for r1::Model<float>.
//
// One optimizer step (Trainer::step):
//   for each of grad_accum micro-batches: loss_m = LanguageModelLoss(model, ids, targets),
//                                          backward (gradients add up)
//   g = sum of gradients / grad_accum;  loss = mean loss_m
//   a non-finite loss or |g| skips the step: no update, the weights are untouched, and the
//   metrics line says why
//   clip |g| to clip_grad_norm;  AdamW at lr = WarmupCosine(step);  then the MoE routing
//   biases move by bias_update_rate * sign(mean load - load) over the step's routing
//
// Checkpoints (save_checkpoint(dir)): dir/step-N/ holds config.json and model.safetensors
// (an HF model directory that load_pretrained and examples/generate read), the AdamW
// moments (optimizer.safetensors) and trainer_state.json (step, AdamW step, the RNG). It is
// written under a temporary name and renamed, then dir/latest names it, so a crash leaves
// the previous checkpoint whole. load_checkpoint(dir) resumes: the run continues exactly,
// loss for loss, as if never interrupted (the data source draws from trainer.rng()).
//
// Metrics: one JSON object per step appended to metrics_file, and a one-line progress bar
// on `progress` (pass std::cerr when it is a TTY; the library prints nothing otherwise).
#pragma once

#include "config.hpp"
#include "io.hpp"
#include "model.hpp"
#include "optim.hpp"
#include "safetensors.hpp"
#include "tensor.hpp"

#include <nlohmann/json.hpp>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <numeric>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

namespace r1 {

struct TrainConfig {
  int64_t steps = 1000;             // the schedule's length
  int64_t grad_accum = 1;           // micro-batches per optimizer step
  AdamWConfig adamw{.lr = 3e-4, .beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = 0.1};
  int64_t warmup_steps = 0;
  double min_lr = 0.0;              // cosine decay from adamw.lr to min_lr
  double clip_grad_norm = 1.0;      // 0: no clipping
  double bias_update_rate = 0.001;  // gamma of the aux-loss-free balancing; 0: off
  LanguageModelLoss loss{};
  std::filesystem::path metrics_file{};  // JSON lines, appended; empty: none
  std::ostream* progress = nullptr;    // progress bar target; nullptr: none

  void validate() const {
    R1_CHECK(steps > 0 && grad_accum > 0, "[train] steps ", steps, " and grad_accum ", grad_accum, " must be positive");
    R1_CHECK(warmup_steps >= 0 && warmup_steps <= steps, "[train] warmup_steps ", warmup_steps, " must lie in [0, steps = ",
             steps, "]");
    R1_CHECK(clip_grad_norm >= 0.0 && bias_update_rate >= 0.0 && min_lr >= 0.0, "[train] clip_grad_norm ", clip_grad_norm,
             ", bias_update_rate ", bias_update_rate, " and min_lr ", min_lr, " must be >= 0");
  }
};

// A micro-batch: ids and targets [B, S] (targets[b, s] follows ids[b, s], or -100).
struct Batch {
  Tensor<int32_t> ids, targets;
};
// Fills the batch for (step, micro-batch), drawing any randomness from rng.
using BatchSource = std::function<void(int64_t step, int64_t micro, Rng& rng, Batch& batch)>;

struct StepMetrics {
  int64_t step = 0;
  double loss = 0.0, main_loss = 0.0, aux_loss = 0.0;
  std::vector<double> mtp_losses;
  double grad_norm = 0.0, lr = 0.0;
  int64_t tokens = 0;
  double seconds = 0.0, tokens_per_s = 0.0;
  double max_load_imbalance = 0.0;  // max over MoE layers of max/mean expert load
  bool skipped = false;
  std::string warning;
};

namespace detail {
// One JSON object per line; NaN and Inf become null.
inline void append_json_line(const std::filesystem::path& path, const nlohmann::json& line, const char* op) {
  std::ofstream out(path, std::ios::app);
  R1_CHECK(out.good(), "[", op, "] cannot append to metrics file '", path.string(), "'");
  out << line.dump() << '\n';
}

// "\r[#####.....] step 12/100  <fields>", redrawn in place on a terminal.
inline void write_progress(std::ostream& out, int64_t step, int64_t total, const std::string& fields) {
  constexpr int64_t kWidth = 24;
  const int64_t done = kWidth * std::min(step, total) / std::max<int64_t>(total, 1);
  out << fmt::format("\r[{}{}] step {}/{}  {}", std::string(static_cast<std::size_t>(done), '#'),
                     std::string(static_cast<std::size_t>(kWidth - done), '.'), step, total, fields)
      << std::flush;
}
// A NaN's sign bit depends on which instructions produced it (vectorized exp gives -nan); logs say "nan" either way.
inline double unsigned_nan(double x) { return std::isnan(x) ? std::numeric_limits<double>::quiet_NaN() : x; }

}  // namespace detail

class Trainer {
 public:
  Trainer(Model<float>& model, const TrainConfig& config, uint64_t seed = 0)
      : model_(&model), config_((config.validate(), config)), grads_(zeros_like(model)), rng_(seed),
        schedule_{config.adamw.lr, config.warmup_steps, config.steps, config.min_lr} {
    registry_.add("", model, grads_);
    optimizer_.emplace(registry_, config.adamw);
  }

  // The registry and optimizer point into this object's gradients.
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  int64_t current_step() const { return step_; }
  Rng& rng() { return rng_; }
  const ModelCache<float>& cache() const { return cache_; }

  StepMetrics step(const BatchSource& source) {
    const auto start = std::chrono::steady_clock::now();
    StepMetrics m;
    m.step = step_;
    m.lr = schedule_(step_);
    Model<float>& model = *model_;
    registry_.zero_grad();
    std::vector<std::vector<int64_t>> load(model.layers.size() + model.mtp.size());
    m.mtp_losses.assign(model.mtp.size(), 0.0);
    for (int64_t micro = 0; micro < config_.grad_accum && !m.skipped; ++micro) {
      source(step_, micro, rng_, batch_);
      m.tokens += batch_.ids.numel();
      const double loss = forward(config_.loss, model, batch_.ids, batch_.targets, cache_);
      if (!std::isfinite(loss)) {
        m.skipped = true;
        m.warning = fmt::format("loss is {} in micro-batch {}: step skipped, weights unchanged", detail::unsigned_nan(loss), micro);
        break;
      }
      backward(config_.loss, model, cache_, grads_);
      const double share = 1.0 / static_cast<double>(config_.grad_accum);
      m.loss += share * loss;
      m.main_loss += share * cache_.main_loss;
      m.aux_loss += share * cache_.aux_loss;
      for (std::size_t k = 0; k < cache_.mtp_losses.size(); ++k) m.mtp_losses[k] += share * cache_.mtp_losses[k];
      add_load(load);
    }
    if (!m.skipped) {
      if (config_.grad_accum > 1)
        for (const auto& e : registry_.entries()) e.grad->vector() *= 1.0f / static_cast<float>(config_.grad_accum);
      // An infinite max_norm measures without clipping.
      m.grad_norm = clip_grad_norm(registry_, config_.clip_grad_norm > 0.0 ? config_.clip_grad_norm
                                                                           : std::numeric_limits<double>::infinity());
      if (!std::isfinite(m.grad_norm)) {
        m.skipped = true;
        m.warning = fmt::format("gradient norm is {}: step skipped, weights unchanged", detail::unsigned_nan(m.grad_norm));
      }
    }
    if (!m.skipped) {
      optimizer_->step(m.lr);
      m.max_load_imbalance = balance(load);
    }
    ++step_;
    m.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    m.tokens_per_s = m.seconds > 0.0 ? static_cast<double>(m.tokens) / m.seconds : 0.0;
    report(m);
    return m;
  }

  void save_checkpoint(const std::filesystem::path& dir) const {
    namespace fs = std::filesystem;
    const std::string name = fmt::format("step-{:08d}", step_);
    const fs::path final_dir = dir / name, temp_dir = dir / ("." + name + ".tmp");
    std::error_code ec;
    fs::remove_all(temp_dir, ec);
    fs::create_directories(temp_dir, ec);
    R1_CHECK(!ec, "[trainer.save_checkpoint] cannot create '", temp_dir.string(), "': ", ec.message());
    save_pretrained(*model_, temp_dir);
    SafetensorsWriter moments;
    const_cast<AdamW<float>&>(*optimizer_).visit_state(
        [&](const std::string& state_name, const Tensor<float>& t) { moments.add(state_name, t); });
    moments.write(temp_dir / "optimizer.safetensors");
    const Rng::State rng = rng_.state();
    const nlohmann::json state = {{"step", step_},
                                  {"adamw_steps", optimizer_->steps()},
                                  {"rng", {{"words", rng.words}, {"spare", rng.spare}, {"has_spare", rng.has_spare}}}};
    write_file_atomic(temp_dir / "trainer_state.json", [&](std::ostream& out) { out << state.dump(2) << '\n'; });
    fs::remove_all(final_dir, ec);
    fs::rename(temp_dir, final_dir, ec);
    R1_CHECK(!ec, "[trainer.save_checkpoint] cannot rename '", temp_dir.string(), "' to '", final_dir.string(), "': ",
             ec.message());
    write_file_atomic(dir / "latest", [&](std::ostream& out) { out << name << '\n'; });
  }

  // Resumes from dir/latest (or dir itself when it is a step directory).
  void load_checkpoint(const std::filesystem::path& dir) {
    namespace fs = std::filesystem;
    fs::path step_dir = dir;
    if (std::ifstream latest(dir / "latest"); latest) {
      std::string name;
      latest >> name;
      step_dir = dir / name;
    }
    std::ifstream state_in(step_dir / "trainer_state.json");
    R1_CHECK(state_in.good(), "[trainer.load_checkpoint] no trainer_state.json in '", step_dir.string(), "'");
    const nlohmann::json state = nlohmann::json::parse(state_in, nullptr, /*allow_exceptions=*/false);
    R1_CHECK(state.is_object() && state.contains("step") && state.contains("adamw_steps") && state.contains("rng"),
             "[trainer.load_checkpoint] '", (step_dir / "trainer_state.json").string(), "' is malformed");
    const Model<float> loaded = load_pretrained<float>(step_dir);
    R1_CHECK(loaded.config.to_json() == model_->config.to_json(), "[trainer.load_checkpoint] the checkpoint's config.json "
             "differs from the model being trained");
    copy_tensors(const_cast<Model<float>&>(loaded), *model_);
    const Checkpoint moments = Checkpoint::open(step_dir / "optimizer.safetensors");
    optimizer_->visit_state([&](const std::string& name, Tensor<float>& t) { moments.load(name, t, t.shape()); });
    optimizer_->restore_steps(state["adamw_steps"].get<int64_t>());
    Rng::State rng;
    rng.words = state["rng"]["words"].get<std::array<uint64_t, 4>>();
    rng.spare = state["rng"]["spare"].get<double>();
    rng.has_spare = state["rng"]["has_spare"].get<bool>();
    rng_.restore(rng);
    step_ = state["step"].get<int64_t>();
  }

 private:
  // Each MoE layer's slot counts of the micro-batch in the cache, summed over the step.
  void add_load(std::vector<std::vector<int64_t>>& load) const {
    const auto add = [](std::vector<int64_t>& into, const Moe<float>& p, const MoeCache<float>& c) {
      const auto counts = routing_stats(p, c).tokens_per_expert;
      into.resize(counts.size(), 0);
      for (std::size_t e = 0; e < counts.size(); ++e) into[e] += counts[e];
    };
    const Model<float>& m = *model_;
    for (std::size_t l = 0; l < m.layers.size(); ++l)
      if (m.layers[l].is_moe) add(load[l], m.layers[l].moe, cache_.layers[l].moe);
    for (std::size_t k = 0; k < m.mtp.size() && k < cache_.mtp.size(); ++k)
      if (m.mtp[k].block.is_moe && !cache_.mtp[k].block.moe.expert_offset.empty())
        add(load[m.layers.size() + k], m.mtp[k].block.moe, cache_.mtp[k].block.moe);
  }

  // Applies the bias update and returns the worst max/mean load.
  double balance(const std::vector<std::vector<int64_t>>& load) {
    Model<float>& m = *model_;
    double worst = 0.0;
    for (std::size_t i = 0; i < load.size(); ++i) {
      if (load[i].empty()) continue;
      Moe<float>& moe = i < m.layers.size() ? m.layers[i].moe : m.mtp[i - m.layers.size()].block.moe;
      const int64_t total = std::accumulate(load[i].begin(), load[i].end(), int64_t{0});
      const double mean = static_cast<double>(total) / static_cast<double>(load[i].size());
      if (mean > 0.0) worst = std::max(worst, static_cast<double>(*std::max_element(load[i].begin(), load[i].end())) / mean);
      if (config_.bias_update_rate > 0.0 && moe.config.topk_method == TopkMethod::NoAuxTc)
        update_bias(moe, load[i], config_.bias_update_rate);
    }
    return worst;
  }

  static void copy_tensors(Model<float>& from, Model<float>& to) {
    std::vector<Tensor<float>*> sources;
    const auto collect = [&](const std::string&, Tensor<float>& t) { sources.push_back(&t); };
    from.visit(collect);
    from.visit_buffers(collect);
    std::size_t i = 0;
    const auto assign = [&](const std::string&, Tensor<float>& t) { t.matrix() = sources[i++]->matrix(); };
    to.visit(assign);
    to.visit_buffers(assign);
  }

  void report(const StepMetrics& m) const {
    nlohmann::json line = {{"step", m.step}, {"loss", m.loss}, {"main_loss", m.main_loss}, {"mtp_losses", m.mtp_losses},
                           {"aux_loss", m.aux_loss}, {"lr", m.lr}, {"grad_norm", m.grad_norm}, {"tokens", m.tokens},
                           {"tokens_per_s", m.tokens_per_s}, {"max_load_imbalance", m.max_load_imbalance},
                           {"skipped", m.skipped}};
    if (!m.warning.empty()) line["warning"] = m.warning;
    if (!config_.metrics_file.empty()) detail::append_json_line(config_.metrics_file, line, "trainer");
    if (config_.progress != nullptr)
      detail::write_progress(*config_.progress, m.step + 1, config_.steps,
                             fmt::format("loss {:.4f}  {:.0f} tok/s  |g| {:.3f}  load {:.2f}{}", m.loss, m.tokens_per_s,
                                         m.grad_norm, m.max_load_imbalance, m.skipped ? "  SKIPPED" : ""));
  }

  Model<float>* model_;
  TrainConfig config_;
  Model<float> grads_;
  ParameterRegistry<float> registry_;
  std::optional<AdamW<float>> optimizer_;
  Rng rng_;
  WarmupCosine schedule_;
  ModelCache<float> cache_;
  Batch batch_;
  int64_t step_ = 0;
};

}  // namespace r1
