// train_tiny_lm: the flagship example until attention (MLA) lands. It trains a tiny
// next-byte language model end to end with r1's layers, hand-written backward passes,
// AdamW, gradient clipping and a warmup + cosine schedule, then samples from it.
//
//   model:  h = Embedding(ids)
//           h = h + Mlp(RMSNorm(h))            x n_layers   (SwiGLU, DeepSeek-V3's dense FFN)
//           logits = RMSNorm(h) W_head^T
//   loss:   mean cross-entropy of the next byte
//
// Without attention each position sees only its own byte, so the best it can learn is the
// corpus' byte-bigram statistics: the loss falls from ln(128) = 4.85 toward the bigram
// entropy of the text (about 2.1 nats here).
//
//   build/examples/train_tiny_lm [--steps 300] [--threads 2] [--seed 1]
#include <r1/r1.hpp>

#include <fmt/core.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

namespace {

constexpr std::string_view kCorpus =
    "DeepSeek trained a mixture of experts model with a latent attention cache on export limited GPUs, "
    "and the lesson of the run was that careful engineering beats brute force. Every token visits only a "
    "few experts, every key and value is squeezed into a small latent vector, and every matrix product "
    "runs in eight bit floating point with a scale for each block. The reasoning model then learned to "
    "think out loud through reinforcement learning alone: it wrote an answer, a rule checked the answer, "
    "and the policy moved toward the answers that were right. There was no critic and no learned reward, "
    "only groups of samples compared with each other. The thoughts grew longer as training went on, and "
    "the model began to check its own work, to try again, and to say wait when a step looked wrong. "
    "This small program learns something much simpler: which letter tends to follow which. It is a start, "
    "and the same layers, the same optimizer and the same loss will train the larger models later on.";

constexpr int64_t kVocab = 128;  // ASCII bytes

struct Block {
  r1::RMSNorm<float> norm;
  r1::Mlp<float> mlp;

  template <class F>
  void visit(F&& f) {
    r1::visit_prefixed("post_attention_layernorm.", norm, f);
    r1::visit_prefixed("mlp.", mlp, f);
  }
};

struct TinyLm {
  r1::Embedding<float> embed;
  std::vector<Block> layers;
  r1::RMSNorm<float> norm;
  r1::Linear<float> lm_head;

  TinyLm(int64_t dim, int64_t hidden, int n_layers) : embed(kVocab, dim), norm(dim), lm_head(dim, kVocab) {
    for (int i = 0; i < n_layers; ++i) layers.push_back(Block{r1::RMSNorm<float>(dim), r1::Mlp<float>(dim, hidden)});
  }

  // HF-style names: model.embed_tokens.weight, model.layers.0.mlp.gate_proj.weight, ...
  template <class F>
  void visit(F&& f) {
    r1::visit_prefixed("model.embed_tokens.", embed, f);
    for (std::size_t i = 0; i < layers.size(); ++i) r1::visit_prefixed(fmt::format("model.layers.{}.", i), layers[i], f);
    r1::visit_prefixed("model.norm.", norm, f);
    r1::visit_prefixed("lm_head.", lm_head, f);
  }
};

struct TinyLmCache {
  r1::EmbeddingCache<float> embed;
  std::vector<r1::RMSNormCache<float>> norms;
  std::vector<r1::MlpCache<float>> mlps;
  r1::RMSNormCache<float> final_norm;
  r1::LinearCache<float> lm_head;
  r1::CrossEntropyCache<float> loss;
  r1::Tensor<float> h, dh;  // the residual stream and its gradient
};

float forward(const TinyLm& m, const r1::Tensor<int32_t>& ids, const r1::Tensor<int32_t>& targets, TinyLmCache& c) {
  c.norms.resize(m.layers.size());
  c.mlps.resize(m.layers.size());
  c.h = r1::forward(m.embed, ids, c.embed);
  for (std::size_t i = 0; i < m.layers.size(); ++i) {
    const auto& normed = r1::forward(m.layers[i].norm, c.h, c.norms[i]);
    c.h.matrix() += r1::forward(m.layers[i].mlp, normed, c.mlps[i]).matrix();
  }
  const auto& logits = r1::forward(m.lm_head, r1::forward(m.norm, c.h, c.final_norm), c.lm_head);
  return r1::forward(r1::CrossEntropy{}, logits, targets, c.loss);
}

// The forward in reverse. Each backward returns the gradient of its input; the residual
// connection adds the block's input gradient onto the stream's.
void backward(const TinyLm& m, TinyLmCache& c, TinyLm& grads) {
  const auto& dlogits = r1::backward(r1::CrossEntropy{}, c.loss);
  c.dh = r1::backward(m.norm, c.final_norm, r1::backward(m.lm_head, c.lm_head, dlogits, grads.lm_head), grads.norm);
  for (std::size_t i = m.layers.size(); i-- > 0;) {
    const auto& dnormed = r1::backward(m.layers[i].mlp, c.mlps[i], c.dh, grads.layers[i].mlp);
    c.dh.matrix() += r1::backward(m.layers[i].norm, c.norms[i], dnormed, grads.layers[i].norm).matrix();
  }
  r1::backward(m.embed, c.embed, c.dh, grads.embed);
}

int64_t flag(int argc, char** argv, std::string_view name, int64_t fallback) {
  for (int i = 1; i + 1 < argc; ++i)
    if (name == argv[i]) return std::atoll(argv[i + 1]);
  return fallback;
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t steps = flag(argc, argv, "--steps", 300);
  r1::set_num_threads(static_cast<int>(flag(argc, argv, "--threads", 2)));
  r1::Rng rng(static_cast<uint64_t>(flag(argc, argv, "--seed", 1)));

  const int64_t dim = 64, hidden = 192, batch = 16, seq = 32;
  TinyLm model(dim, hidden, 2);
  // Init as DeepSeek-V3 does: normal(0, 0.006) for matrices, ones for the norm weights.
  model.visit([&](const std::string& name, r1::Tensor<float>& t) {
    if (t.rank() == 2) r1::fill_normal(t.view(), rng, 0.0, name.find("embed") != std::string::npos ? 1.0 : 0.02);
  });
  TinyLm grads = r1::zeros_like(model);

  r1::ParameterRegistry<float> registry;
  registry.add("", model, grads);
  r1::AdamW<float> optimizer(registry, {3e-3, 0.9, 0.95, 1e-8, 0.1});
  const r1::WarmupCosine schedule{3e-3, steps / 10, steps, 3e-4};
  fmt::print("tiny LM: {} parameters in {} tensors, batch {}x{} bytes, {} steps\n", registry.num_parameters(),
             registry.size(), batch, seq, steps);

  r1::Tensor<int32_t> ids(r1::Shape{batch, seq}), targets(r1::Shape{batch, seq});
  TinyLmCache cache;
  float first_loss = 0.0f, last_loss = 0.0f;
  const auto start = std::chrono::steady_clock::now();
  for (int64_t step = 0; step < steps; ++step) {
    for (int64_t b = 0; b < batch; ++b) {
      const auto offset = static_cast<int64_t>(rng.uniform() * static_cast<double>(kCorpus.size() - seq - 1));
      for (int64_t s = 0; s < seq; ++s) {
        ids(b, s) = static_cast<unsigned char>(kCorpus[offset + s]);
        targets(b, s) = static_cast<unsigned char>(kCorpus[offset + s + 1]);
      }
    }
    registry.zero_grad();
    const float loss = forward(model, ids, targets, cache);
    backward(model, cache, grads);
    const double grad_norm = r1::clip_grad_norm(registry, 1.0);
    const double lr = schedule(step);
    optimizer.step(lr);
    if (step == 0) first_loss = loss;
    last_loss = loss;
    if (step % 25 == 0 || step == steps - 1)
      fmt::print("step {:4d}  loss {:.4f}  grad norm {:7.3f}  lr {:.2e}\n", step, loss, grad_norm, lr);
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  fmt::print("trained {} tokens in {:.2f} s ({:.0f} tokens/s); loss {:.3f} -> {:.3f} (uniform guess: {:.3f})\n",
             steps * batch * seq, seconds, static_cast<double>(steps * batch * seq) / seconds, first_loss, last_loss,
             std::log(static_cast<double>(kVocab)));

  // Sample 120 bytes at temperature 0.7, one step at a time.
  r1::Tensor<int32_t> token(r1::Shape{1});
  r1::Tensor<int32_t> no_target(r1::Shape{1});
  no_target(0) = -100;
  token(0) = 'T';
  std::string text = "T";
  for (int i = 0; i < 120; ++i) {
    forward(model, token, no_target, cache);
    const auto logits = cache.lm_head.y.matrix();
    const Eigen::ArrayXf p = ((logits.row(0).array() - logits.maxCoeff()) / 0.7f).exp().transpose();
    double u = rng.uniform() * p.sum();
    int32_t next = 0;
    while (next < kVocab - 1 && (u -= p[next]) > 0.0) ++next;
    token(0) = next;
    text += static_cast<char>(next);
  }
  fmt::print("sample: {}\n", text);
  return last_loss < first_loss ? 0 : 1;
}
