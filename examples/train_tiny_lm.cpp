// train_tiny_lm: the flagship example. It trains a tiny DeepSeek-V3-style language model
// end to end on bytes, with r1's layers and their hand-written backward passes, then
// samples from it.
//
//   model:  h = Embedding(ids)                                          [B, S, D]
//           for each layer:
//             h = h + MLA(RMSNorm(h))           multi-head latent attention, causal, RoPE
//             h = h + FFN(RMSNorm(h))           layer 0: a dense SwiGLU MLP
//                                               later layers: DeepSeekMoE (sigmoid gate,
//                                               groups, 1 shared expert), balanced by
//                                               update_bias as in DeepSeek-V3
//           logits = RMSNorm(h) W_head^T
//   loss:   mean cross-entropy of the next byte; AdamW, gradient clipping, warmup + cosine.
//
// The corpus is one paragraph, so a model that attends to its context learns it far
// below the byte-bigram entropy (about 2.1 nats), which is the best any model without
// attention can do here.
//
//   build/examples/train_tiny_lm [--steps 800] [--threads 2] [--seed 1]   (about 6 s on 2 cores)
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
    "This small program learns the same way any language model does: it reads a window of text and "
    "predicts the next byte, again and again, until the text is familiar.";

constexpr int64_t kVocab = 128;  // ASCII bytes

struct Layer {
  r1::RMSNorm<float> input_norm, post_attention_norm;
  r1::Mla<float> attn;
  bool use_moe = false;
  r1::Mlp<float> mlp;  // layer 0
  r1::Moe<float> moe;  // the others

  template <class F>
  void visit(F&& f) {
    r1::visit_prefixed("input_layernorm.", input_norm, f);
    r1::visit_prefixed("self_attn.", attn, f);
    r1::visit_prefixed("post_attention_layernorm.", post_attention_norm, f);
    if (use_moe) {
      r1::visit_prefixed("mlp.", moe, f);
    } else {
      r1::visit_prefixed("mlp.", mlp, f);
    }
  }
};

struct TinyDeepSeek {
  r1::Embedding<float> embed;
  std::vector<Layer> layers;
  r1::RMSNorm<float> norm;
  r1::Linear<float> lm_head;

  TinyDeepSeek(int64_t dim, int n_layers) : embed(kVocab, dim), norm(dim), lm_head(dim, kVocab) {
    r1::MlaConfig attn;
    attn.dim = dim;
    attn.num_attention_heads = 4;
    attn.q_lora_rank = 32;
    attn.kv_lora_rank = 32;
    attn.qk_nope_head_dim = 16;
    attn.qk_rope_head_dim = 8;
    attn.v_head_dim = 16;
    r1::MoeConfig moe;
    moe.dim = dim;
    moe.n_routed_experts = 8;
    moe.moe_intermediate_size = 64;
    moe.n_shared_experts = 1;
    moe.num_experts_per_tok = 2;
    moe.n_group = 4;
    moe.topk_group = 2;
    moe.routed_scaling_factor = 2.5;
    moe.aux_loss_alpha = 1e-4;  // the sequence-wise balance loss, as in DeepSeek-V3
    for (int i = 0; i < n_layers; ++i) {
      Layer layer{r1::RMSNorm<float>(dim), r1::RMSNorm<float>(dim), r1::Mla<float>(attn), i > 0, {}, {}};
      if (layer.use_moe) {
        layer.moe = r1::Moe<float>(moe);
      } else {
        layer.mlp = r1::Mlp<float>(dim, 3 * dim);
      }
      layers.push_back(std::move(layer));
    }
  }

  // HF-style names: model.layers.1.mlp.experts.3.gate_proj.weight, ...
  template <class F>
  void visit(F&& f) {
    r1::visit_prefixed("model.embed_tokens.", embed, f);
    for (std::size_t i = 0; i < layers.size(); ++i) r1::visit_prefixed(fmt::format("model.layers.{}.", i), layers[i], f);
    r1::visit_prefixed("model.norm.", norm, f);
    r1::visit_prefixed("lm_head.", lm_head, f);
  }
};

struct LayerCache {
  r1::RMSNormCache<float> input_norm, post_attention_norm;
  r1::MlaCache<float> attn;
  r1::MlpCache<float> mlp;
  r1::MoeCache<float> moe;
};

struct TinyDeepSeekCache {
  r1::EmbeddingCache<float> embed;
  std::vector<LayerCache> layers;
  r1::RMSNormCache<float> norm;
  r1::LinearCache<float> lm_head;
  r1::CrossEntropyCache<float> loss;
  r1::Tensor<int32_t> positions;
  r1::Tensor<float> h, dh;  // the residual stream and its gradient
};

// Cross-entropy of the next byte; ids and targets are [B, S].
float forward(const TinyDeepSeek& m, const r1::Tensor<int32_t>& ids, const r1::Tensor<int32_t>& targets, TinyDeepSeekCache& c) {
  const int64_t seq = ids.size(1);
  c.positions.resize(r1::Shape{seq});
  for (int64_t s = 0; s < seq; ++s) c.positions(s) = static_cast<int32_t>(s);
  c.layers.resize(m.layers.size());
  c.h = r1::forward(m.embed, ids, c.embed);
  for (std::size_t i = 0; i < m.layers.size(); ++i) {
    const Layer& layer = m.layers[i];
    LayerCache& lc = c.layers[i];
    c.h.matrix() += r1::forward(layer.attn, r1::forward(layer.input_norm, c.h, lc.input_norm), c.positions, lc.attn).matrix();
    const auto& normed = r1::forward(layer.post_attention_norm, c.h, lc.post_attention_norm);
    c.h.matrix() += (layer.use_moe ? r1::forward(layer.moe, normed, lc.moe) : r1::forward(layer.mlp, normed, lc.mlp)).matrix();
  }
  const auto& logits = r1::forward(m.lm_head, r1::forward(m.norm, c.h, c.norm), c.lm_head);
  return r1::forward(r1::CrossEntropy{}, logits, targets, c.loss);
}

// The forward in reverse. Each residual branch adds its input gradient onto the stream's.
void backward(const TinyDeepSeek& m, TinyDeepSeekCache& c, TinyDeepSeek& grads) {
  const auto& dlogits = r1::backward(r1::CrossEntropy{}, c.loss);
  c.dh = r1::backward(m.norm, c.norm, r1::backward(m.lm_head, c.lm_head, dlogits, grads.lm_head), grads.norm);
  for (std::size_t i = m.layers.size(); i-- > 0;) {
    const Layer& layer = m.layers[i];
    Layer& g = grads.layers[i];
    LayerCache& lc = c.layers[i];
    const auto& dffn = layer.use_moe ? r1::backward(layer.moe, lc.moe, c.dh, g.moe) : r1::backward(layer.mlp, lc.mlp, c.dh, g.mlp);
    c.dh.matrix() += r1::backward(layer.post_attention_norm, lc.post_attention_norm, dffn, g.post_attention_norm).matrix();
    const auto& dattn = r1::backward(layer.attn, lc.attn, c.dh, g.attn);
    c.dh.matrix() += r1::backward(layer.input_norm, lc.input_norm, dattn, g.input_norm).matrix();
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
  const int64_t steps = flag(argc, argv, "--steps", 800);
  r1::set_num_threads(static_cast<int>(flag(argc, argv, "--threads", 2)));
  r1::Rng rng(static_cast<uint64_t>(flag(argc, argv, "--seed", 1)));

  const int64_t dim = 64, batch = 8, seq = 64;
  TinyDeepSeek model(dim, 2);
  // Matrices start at normal(0, 0.02) (embeddings at 1); norm weights stay at one.
  model.visit([&](const std::string& name, r1::Tensor<float>& t) {
    if (t.rank() == 2) r1::fill_normal(t.view(), rng, 0.0, name.find("embed") != std::string::npos ? 1.0 : 0.02);
  });
  TinyDeepSeek grads = r1::zeros_like(model);

  r1::ParameterRegistry<float> registry;
  registry.add("", model, grads);
  r1::AdamW<float> optimizer(registry, {.lr = 3e-3, .beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = 0.1});
  const r1::WarmupCosine schedule{3e-3, steps / 10, steps, 3e-4};
  fmt::print("tiny DeepSeek (MLA + MoE): {} parameters in {} tensors, batch {}x{} bytes, {} steps\n",
             registry.num_parameters(), registry.size(), batch, seq, steps);

  r1::Tensor<int32_t> ids(r1::Shape{batch, seq}), targets(r1::Shape{batch, seq});
  TinyDeepSeekCache cache;
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
    for (std::size_t i = 0; i < model.layers.size(); ++i)
      if (model.layers[i].use_moe) r1::update_bias(model.layers[i].moe, cache.layers[i].moe, 1e-3);
    if (step == 0) first_loss = loss;
    last_loss = loss;
    if (step % 25 == 0 || step == steps - 1)
      fmt::print("step {:4d}  loss {:.4f}  grad norm {:6.3f}  lr {:.2e}\n", step, loss, grad_norm, lr);
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  fmt::print("trained {} tokens in {:.1f} s ({:.0f} tokens/s); loss {:.3f} -> {:.3f} (uniform guess {:.3f}, byte bigrams ~2.1)\n",
             steps * batch * seq, seconds, static_cast<double>(steps * batch * seq) / seconds, first_loss, last_loss,
             std::log(static_cast<double>(kVocab)));
  const auto stats = r1::routing_stats(model.layers[1].moe, cache.layers[1].moe);
  fmt::print("layer 1 expert load: max/mean {:.2f}\n", stats.max_over_mean_load);

  // Sample 160 bytes at temperature 0.5, each from a forward over the last seq bytes.
  std::string text = "The model";
  for (int i = 0; i < 160; ++i) {
    const int64_t context = std::min<int64_t>(static_cast<int64_t>(text.size()), seq);
    r1::Tensor<int32_t> window(r1::Shape{1, context}), no_targets(r1::Shape{1, context});
    for (int64_t s = 0; s < context; ++s) {
      window(0, s) = static_cast<unsigned char>(text[text.size() - context + s]);
      no_targets(0, s) = -100;
    }
    forward(model, window, no_targets, cache);
    const auto logits = cache.lm_head.y.matrix().row(context - 1);
    const Eigen::ArrayXf p = ((logits.array() - logits.maxCoeff()) / 0.5f).exp().transpose();
    double u = rng.uniform() * p.sum();
    int32_t next = 0;
    while (next < kVocab - 1 && (u -= p[next]) > 0.0) ++next;
    text += static_cast<char>(next);
  }
  fmt::print("sample: {}\n", text);
  return last_loss < first_loss ? 0 : 1;
}
