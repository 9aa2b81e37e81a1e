// r1/optim.hpp: the parameter registry, AdamW, gradient clipping and LR schedules.
//
//   ParameterRegistry  named (value, grad) tensor pairs, filled from params structs through
//                      their visit() so names are HF's ("layers.0.mlp.gate_proj.weight").
//                      Checkpoints and optimizers walk it. It stores pointers: the params
//                      and grads it was filled from must outlive it and stay in place.
//   AdamW (decoupled weight decay, Loshchilov & Hutter; torch.optim.AdamW's update), step t:
//       p  <- p - lr * wd * p                         (only for entries with decay = true)
//       m  <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2
//       p  <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
//   clip_grad_norm     total = sqrt(sum of all g^2) (in double); if total > max_norm, every
//                      g is scaled by max_norm / (total + 1e-6), as torch.nn.utils.
//   WarmupCosine       lr = peak * s / warmup during warmup, then a half cosine from peak
//                      down to min_lr at total_steps (HF get_cosine_schedule_with_warmup
//                      when min_lr = 0).
//   WarmupStableDecay  linear warmup, peak until total - decay_steps, then a linear or
//                      cosine decay to min_lr (the "WSD" schedule of MiniCPM; DeepSeek-V3
//                      trains with a constant phase followed by a cosine decay).
#pragma once

#include "config.hpp"
#include "device.hpp"
#include "parallel.hpp"
#include "tensor.hpp"

#include <cmath>
#include <numbers>
#include <optional>
#include <string>
#include <vector>

namespace r1 {

// ---------------------------------------------------------------------------------------
template <class T, class Dev = Cpu>
class ParameterRegistry {
 public:
  struct Entry {
    std::string name;
    Tensor<T, Dev>* value;
    Tensor<T, Dev>* grad;
    bool decay;  // AdamW applies weight decay to this entry
  };

  // Matrices are decayed and vectors (norm weights, biases) are not, as in HF's Trainer
  // and nanoGPT, unless decay is given.
  void add(const std::string& name, Tensor<T, Dev>& value, Tensor<T, Dev>& grad, std::optional<bool> decay = std::nullopt) {
    R1_CHECK(!name.empty(), "[registry.add] empty parameter name");
    R1_CHECK(find(name) == nullptr, "[registry.add] parameter '", name, "' is already registered");
    R1_CHECK(value.shape() == grad.shape(), "[registry.add] parameter '", name, "' has shape ", value.shape(),
             " but its gradient has ", grad.shape());
    entries_.push_back(Entry{name, &value, &grad, decay.value_or(value.rank() >= 2)});
  }

  // Every tensor of a params struct and the matching tensor of its grads, as prefix + name.
  template <class Params>
  void add(const std::string& prefix, Params& params, Params& grads) {
    std::vector<std::pair<std::string, Tensor<T, Dev>*>> grad_tensors;
    grads.visit([&](const std::string& name, Tensor<T, Dev>& g) { grad_tensors.emplace_back(name, &g); });
    std::size_t i = 0;
    params.visit([&](const std::string& name, Tensor<T, Dev>& value) {
      R1_CHECK(i < grad_tensors.size() && grad_tensors[i].first == name, "[registry.add] grads of '", prefix,
               "' do not have the same tensors as the params (missing '", name, "'): build them with r1::zeros_like");
      add(prefix + name, value, *grad_tensors[i++].second);
    });
    R1_CHECK(i == grad_tensors.size(), "[registry.add] grads of '", prefix, "' have ", grad_tensors.size(),
             " tensors, params have ", i);
  }

  const std::vector<Entry>& entries() const { return entries_; }
  std::size_t size() const { return entries_.size(); }

  const Entry* find(const std::string& name) const {
    for (const Entry& e : entries_)
      if (e.name == name) return &e;
    return nullptr;
  }
  Tensor<T, Dev>& value(const std::string& name) const {
    const Entry* e = find(name);
    R1_CHECK(e != nullptr, "[registry.value] no parameter named '", name, "'");
    return *e->value;
  }

  int64_t num_parameters() const {
    int64_t n = 0;
    for (const Entry& e : entries_) n += e.value->numel();
    return n;
  }

  void zero_grad() {
    for (Entry& e : entries_) e.grad->set_zero();
  }

 private:
  std::vector<Entry> entries_;
};

// ---------------------------------------------------------------------------------------
struct AdamWConfig {
  double lr = 1e-3;  // torch.optim.AdamW's defaults
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;
};

R1_DECLARE_IMPL(OptimImpl, "optim.cuh");

template <>
struct OptimImpl<Cpu> {
  template <class T>
  static void adamw(Tensor<T>& p, const Tensor<T>& g, Tensor<T>& m, Tensor<T>& v, double lr, double decay_factor,
                    const AdamWConfig& c, double bias_correction1, double bias_correction2_sqrt) {
    T* pp = p.data();
    const T* gp = g.data();
    T* mp = m.data();
    T* vp = v.data();
    const T b1 = static_cast<T>(c.beta1), b2 = static_cast<T>(c.beta2);
    const T step_size = static_cast<T>(lr / bias_correction1);
    const T decay = static_cast<T>(decay_factor);
    const T inv_bc2 = static_cast<T>(1.0 / bias_correction2_sqrt);
    const T eps = static_cast<T>(c.eps);
    parallel_for(p.numel(), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        pp[i] *= decay;
        mp[i] = b1 * mp[i] + (T(1) - b1) * gp[i];
        vp[i] = b2 * vp[i] + (T(1) - b2) * gp[i] * gp[i];
        pp[i] -= step_size * mp[i] / (std::sqrt(vp[i]) * inv_bc2 + eps);
      }
    }, min_items_per_thread(8));
  }

  template <class T>
  static double squared_norm(const Tensor<T>& g) {
    double sum = 0.0;
    for (int64_t i = 0; i < g.numel(); ++i) sum += static_cast<double>(g.data()[i]) * static_cast<double>(g.data()[i]);
    return sum;
  }

  template <class T>
  static void scale(Tensor<T>& g, double factor) {
    g.vector() *= static_cast<T>(factor);
  }
};

template <class T, class Dev = Cpu>
class AdamW {
 public:
  AdamW(ParameterRegistry<T, Dev>& registry, const AdamWConfig& config = {}) : registry_(&registry), config_(config) {
    R1_CHECK(config.lr >= 0.0 && config.eps > 0.0 && config.weight_decay >= 0.0, "[adamw] invalid config: lr ", config.lr,
             ", eps ", config.eps, ", weight_decay ", config.weight_decay);
    R1_CHECK(0.0 <= config.beta1 && config.beta1 < 1.0 && 0.0 <= config.beta2 && config.beta2 < 1.0,
             "[adamw] betas (", config.beta1, ", ", config.beta2, ") must lie in [0, 1)");
    for (const auto& e : registry.entries()) {
      exp_avg_.emplace_back(e.value->shape());
      exp_avg_sq_.emplace_back(e.value->shape());
    }
  }

  // One update of every registered parameter from its gradient, at learning rate lr
  // (from a schedule); step() uses config.lr.
  void step(double lr) {
    R1_CHECK(registry_->size() == exp_avg_.size(), "[adamw.step] the registry has ", registry_->size(),
             " parameters, the optimizer was built for ", exp_avg_.size());
    ++steps_;
    const double bias_correction1 = 1.0 - std::pow(config_.beta1, static_cast<double>(steps_));
    const double bias_correction2_sqrt = std::sqrt(1.0 - std::pow(config_.beta2, static_cast<double>(steps_)));
    const auto& entries = registry_->entries();
    for (std::size_t k = 0; k < entries.size(); ++k) {
      const auto& e = entries[k];
      const double decay_factor = e.decay ? 1.0 - lr * config_.weight_decay : 1.0;
      OptimImpl<Dev>::adamw(*e.value, *e.grad, exp_avg_[k], exp_avg_sq_[k], lr, decay_factor, config_, bias_correction1,
                            bias_correction2_sqrt);
    }
  }
  void step() { step(config_.lr); }

  int64_t steps() const { return steps_; }
  // For resuming from a checkpoint, together with the moments from visit_state.
  void restore_steps(int64_t steps) {
    R1_CHECK(steps >= 0, "[adamw.restore_steps] steps is ", steps, ", expected >= 0");
    steps_ = steps;
  }
  const AdamWConfig& config() const { return config_; }

  // The moment estimates under torch's state names, for checkpoints.
  template <class F>
  void visit_state(F&& f) {
    const auto& entries = registry_->entries();
    for (std::size_t k = 0; k < entries.size(); ++k) {
      f(entries[k].name + ".exp_avg", exp_avg_[k]);
      f(entries[k].name + ".exp_avg_sq", exp_avg_sq_[k]);
    }
  }

 private:
  ParameterRegistry<T, Dev>* registry_;
  AdamWConfig config_;
  int64_t steps_ = 0;
  std::vector<Tensor<T, Dev>> exp_avg_, exp_avg_sq_;
};

// Scales all gradients so their global L2 norm is at most max_norm; returns the norm
// before clipping. A non-finite norm leaves the gradients untouched and is returned so the
// caller can skip the step.
template <class T, class Dev>
double clip_grad_norm(ParameterRegistry<T, Dev>& registry, double max_norm) {
  R1_CHECK(max_norm > 0.0, "[clip_grad_norm] max_norm is ", max_norm, ", expected > 0");
  double sum = 0.0;
  for (const auto& e : registry.entries()) sum += OptimImpl<Dev>::squared_norm(*e.grad);
  const double total = std::sqrt(sum);
  if (std::isfinite(total) && total > max_norm) {
    const double factor = max_norm / (total + 1e-6);
    for (const auto& e : registry.entries()) OptimImpl<Dev>::scale(*e.grad, factor);
  }
  return total;
}

// ---------------------------------------------------------------------------------------
// Schedules: lr(step) for step = 0, 1, 2, ...
struct WarmupCosine {
  double peak_lr;
  int64_t warmup_steps;
  int64_t total_steps;
  double min_lr = 0.0;

  double operator()(int64_t step) const {
    R1_CHECK(0 <= warmup_steps && warmup_steps <= total_steps && total_steps > 0, "[warmup_cosine] warmup_steps ",
             warmup_steps, " and total_steps ", total_steps, " must satisfy 0 <= warmup <= total, total > 0");
    if (step < warmup_steps) return peak_lr * static_cast<double>(step) / static_cast<double>(warmup_steps);
    const double progress = std::min(1.0, static_cast<double>(step - warmup_steps) /
                                              static_cast<double>(std::max<int64_t>(1, total_steps - warmup_steps)));
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
  }
};

struct WarmupStableDecay {
  enum class Decay { Linear, Cosine };
  double peak_lr;
  int64_t warmup_steps;
  int64_t total_steps;
  int64_t decay_steps;
  double min_lr = 0.0;
  Decay decay = Decay::Linear;

  double operator()(int64_t step) const {
    R1_CHECK(0 <= warmup_steps && 0 <= decay_steps && warmup_steps + decay_steps <= total_steps, "[warmup_stable_decay] warmup_steps ",
             warmup_steps, " + decay_steps ", decay_steps, " exceed total_steps ", total_steps);
    if (step < warmup_steps) return peak_lr * static_cast<double>(step) / static_cast<double>(warmup_steps);
    const int64_t decay_start = total_steps - decay_steps;
    if (step < decay_start) return peak_lr;
    const double progress = decay_steps == 0 ? 1.0 : std::min(1.0, static_cast<double>(step - decay_start) / static_cast<double>(decay_steps));
    const double remaining = decay == Decay::Linear ? 1.0 - progress : 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
    return min_lr + (peak_lr - min_lr) * remaining;
  }
};

}  // namespace r1
