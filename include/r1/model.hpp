// r1/model.hpp: the DeepSeek-V3 (and V2) decoder-only language model, with Multi-Token
// Prediction, for training and for cached inference.
//
//   h_0      = embed_tokens(ids)                                               [B, S, D]
//   layer l: h = h + MLA(input_layernorm(h))
//            h = h + FFN(post_attention_layernorm(h))   FFN: a dense SwiGLU MLP for the
//                first first_k_dense_replace layers (and where l % moe_layer_freq != 0),
//                DeepSeekMoE after
//   hidden   = norm(h_L),   logits = hidden lm_head^T   (embed_tokens^T when tied)   [B, S, V]
//
// Multi-Token Prediction (V3 report, section 2.2), K = num_nextn_predict_layers modules,
// module k predicting token i+k+1 at position i, with the embedding and head shared:
//   h^0 = hidden (the main model's normed output, as vLLM feeds the released MTP weights)
//   x_i = eh_proj([enorm(embed(ids[i+k])) | hnorm(h^{k-1}_i)])   embedding first, as in
//         the released weights (eh_proj: [D, 2D])                          i < S - k
//   h^k = TransformerBlock_k(x),  logits^k = shared_head.norm(h^k) lm_head^T
//   L   = CE(logits, targets) + (lambda / K) sum_k CE(logits^k, targets[i+k])
//         + the MoE balance losses of every MoE layer (alpha sum f_i P_i each)
// In HF checkpoints module k is layer num_hidden_layers + k - 1 (DeepSeek-V3: layer 61)
// with enorm, hnorm, eh_proj, shared_head.norm, and copies of embed_tokens and
// shared_head.head, which r1 ties to the main model's (it writes the copies on save).
//
// API:
//   ModelConfig::from_json / from_file (HF config.json names; unknown fields throw)
//   Model(config), init_weights(model, rng)
//   forward(model, ids, cache) -> logits, backward(model, cache, dlogits, grads)
//   forward(LanguageModelLoss, model, ids, targets, cache) -> loss, backward(loss, model, cache, grads)
//   InferenceCache(model, num_blocks): the paged latent KV cache of every layer;
//   forward_cached(model, ids, seqs, cache) -> logits of new tokens (prefill and decode)
//   load_pretrained<T>(dir), save_pretrained(model, dir, format): HF model directories
//   (config.json + safetensors, sharded or not, F32/BF16/FP8-block-scaled weights)
//
// Legend: B batch, S sequence, D hidden_size, V vocab_size, L num_hidden_layers,
// K num_nextn_predict_layers, T new tokens per sequence in a cached step.
#pragma once

#include "config.hpp"
#include "device.hpp"
#include "embedding.hpp"
#include "linear.hpp"
#include "loss.hpp"
#include "mla.hpp"
#include "mlp.hpp"
#include "moe.hpp"
#include "norm.hpp"
#include "io.hpp"
#include "safetensors.hpp"
#include "tensor.hpp"

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace r1 {

// ---------------------------------------------------------------------------------------
// Config: HF's config.json for DeepseekV3ForCausalLM / DeepseekV2ForCausalLM.
struct ModelConfig {
  std::string model_type = "deepseek_v3";
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;      // the dense layers' MLP width
  int64_t moe_intermediate_size = 0;  // one expert's width
  int64_t num_hidden_layers = 0;
  int64_t first_k_dense_replace = 0;
  int64_t moe_layer_freq = 1;
  int64_t num_attention_heads = 0;
  int64_t n_routed_experts = 0;       // 0: every layer is dense
  int64_t n_shared_experts = 0;
  int64_t num_experts_per_tok = 0;
  int64_t n_group = 1;
  int64_t topk_group = 1;
  TopkMethod topk_method = TopkMethod::NoAuxTc;
  ScoringFunc scoring_func = ScoringFunc::Sigmoid;
  bool norm_topk_prob = true;
  double routed_scaling_factor = 1.0;
  double aux_loss_alpha = 0.0;
  bool seq_aux = true;
  int64_t q_lora_rank = 0;            // null in HF (V2-Lite) is 0 here: a plain q_proj
  int64_t kv_lora_rank = 0;
  int64_t qk_nope_head_dim = 0;
  int64_t qk_rope_head_dim = 0;
  int64_t v_head_dim = 0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  bool rope_interleave = true;        // DeepSeek's own layout (HF's default for V3)
  std::optional<RopeConfig> rope_scaling{};  // YaRN: factor, beta_fast/slow, mscale(_all_dim), original_max
  int64_t max_position_embeddings = 4096;
  bool tie_word_embeddings = false;
  int64_t num_nextn_predict_layers = 0;
  double initializer_range = 0.02;
  std::optional<int64_t> bos_token_id{}, eos_token_id{};
  // quantization_config {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}:
  // the linear weights of the checkpoint are FP8 with block scales.
  bool fp8_weights = false;

  bool is_moe_layer(int64_t layer) const {
    return n_routed_experts > 0 && layer >= first_k_dense_replace && layer % moe_layer_freq == 0;
  }

  void validate() const {
    R1_CHECK(model_type == "deepseek_v3" || model_type == "deepseek_v2", "[model.config] model_type is '", model_type,
             "', expected 'deepseek_v3' or 'deepseek_v2'");
    R1_CHECK(vocab_size > 0 && hidden_size > 0 && num_hidden_layers > 0, "[model.config] vocab_size ", vocab_size,
             ", hidden_size ", hidden_size, " and num_hidden_layers ", num_hidden_layers, " must be positive");
    R1_CHECK(first_k_dense_replace >= 0 && moe_layer_freq >= 1, "[model.config] first_k_dense_replace ",
             first_k_dense_replace, " must be >= 0 and moe_layer_freq ", moe_layer_freq, " >= 1");
    R1_CHECK(num_nextn_predict_layers >= 0, "[model.config] num_nextn_predict_layers is ", num_nextn_predict_layers,
             ", expected >= 0");
    bool any_dense = false;
    for (int64_t l = 0; l < num_hidden_layers; ++l) any_dense |= !is_moe_layer(l);
    R1_CHECK(!any_dense || intermediate_size > 0, "[model.config] intermediate_size is ", intermediate_size,
             ", but some layers are dense");
    if (n_routed_experts > 0) moe().validate();
    mla().validate();
  }

  MlaConfig mla() const {
    MlaConfig c;
    c.dim = hidden_size;
    c.num_attention_heads = num_attention_heads;
    c.q_lora_rank = q_lora_rank;
    c.kv_lora_rank = kv_lora_rank;
    c.qk_nope_head_dim = qk_nope_head_dim;
    c.qk_rope_head_dim = qk_rope_head_dim;
    c.v_head_dim = v_head_dim;
    c.rms_norm_eps = rms_norm_eps;
    c.max_position_embeddings = max_position_embeddings;
    c.rope = rope_scaling.value_or(RopeConfig{});
    c.rope.theta = rope_theta;
    c.rope.style = rope_interleave ? RopeStyle::Interleaved : RopeStyle::Half;
    return c;
  }

  MoeConfig moe() const {
    MoeConfig c;
    c.dim = hidden_size;
    c.n_routed_experts = n_routed_experts;
    c.moe_intermediate_size = moe_intermediate_size;
    c.n_shared_experts = n_shared_experts;
    c.num_experts_per_tok = num_experts_per_tok;
    c.scoring_func = scoring_func;
    c.topk_method = topk_method;
    c.n_group = n_group;
    c.topk_group = topk_group;
    c.norm_topk_prob = norm_topk_prob;
    c.routed_scaling_factor = routed_scaling_factor;
    c.aux_loss_alpha = aux_loss_alpha;
    c.seq_aux = seq_aux;
    return c;
  }

  static ModelConfig from_json(const nlohmann::json& j);
  static ModelConfig from_file(const std::filesystem::path& path);
  nlohmann::json to_json() const;
};

namespace detail {

// Typed access to config.json fields; every failure names the field and what was found.
class ConfigReader {
 public:
  explicit ConfigReader(const nlohmann::json& j) : j_(j) {
    R1_CHECK(j.is_object(), "[model.config] config.json must be a JSON object, found ", j.type_name());
  }

  template <class T>
  void read(const char* key, T& out, bool required) {
    seen_.insert(key);
    const auto it = j_.find(key);
    if (it == j_.end() || (it->is_null() && !required)) {
      R1_CHECK(!required, "[model.config] required field '", key, "' is missing");
      return;
    }
    if constexpr (std::is_same_v<T, bool>) {
      R1_CHECK(it->is_boolean(), "[model.config] field '", key, "' is ", it->dump(), ", expected true or false");
      out = it->template get<bool>();
    } else if constexpr (std::is_integral_v<T>) {
      R1_CHECK(it->is_number_integer(), "[model.config] field '", key, "' is ", it->dump(), ", expected an integer");
      out = it->template get<T>();
    } else if constexpr (std::is_floating_point_v<T>) {
      R1_CHECK(it->is_number(), "[model.config] field '", key, "' is ", it->dump(), ", expected a number");
      out = it->template get<T>();
    } else {
      R1_CHECK(it->is_string(), "[model.config] field '", key, "' is ", it->dump(), ", expected a string");
      out = it->template get<std::string>();
    }
  }
  template <class T>
  void read(const char* key, std::optional<T>& out) {
    T value{};
    seen_.insert(key);
    const auto it = j_.find(key);
    if (it == j_.end() || it->is_null()) return;
    read(key, value, true);
    out = value;
  }
  // A field that r1 accepts but does not need (bookkeeping of HF and of the training run).
  void ignore(const char* key) { seen_.insert(key); }
  const nlohmann::json* find(const char* key) {
    seen_.insert(key);
    const auto it = j_.find(key);
    return it == j_.end() || it->is_null() ? nullptr : &*it;
  }

  void reject_unknown() const {
    for (const auto& [key, value] : j_.items())
      R1_CHECK(seen_.count(key) == 1, "[model.config] unknown field '", key, "' (", value.dump(),
               "): r1 does not know what it means for the model");
  }

 private:
  const nlohmann::json& j_;
  std::set<std::string, std::less<>> seen_;
};

}  // namespace detail

inline ModelConfig ModelConfig::from_json(const nlohmann::json& j) {
  detail::ConfigReader r(j);
  ModelConfig c;
  r.read("model_type", c.model_type, false);
  r.read("vocab_size", c.vocab_size, true);
  r.read("hidden_size", c.hidden_size, true);
  r.read("intermediate_size", c.intermediate_size, true);
  r.read("moe_intermediate_size", c.moe_intermediate_size, false);
  r.read("num_hidden_layers", c.num_hidden_layers, true);
  r.read("first_k_dense_replace", c.first_k_dense_replace, false);
  r.read("moe_layer_freq", c.moe_layer_freq, false);
  r.read("num_attention_heads", c.num_attention_heads, true);
  r.read("n_routed_experts", c.n_routed_experts, false);
  r.read("n_shared_experts", c.n_shared_experts, false);
  r.read("num_experts_per_tok", c.num_experts_per_tok, false);
  r.read("n_group", c.n_group, false);
  r.read("topk_group", c.topk_group, false);
  std::string topk_method = "noaux_tc", scoring_func = "sigmoid";
  if (c.model_type == "deepseek_v2") {  // HF's DeepseekV2Config defaults
    topk_method = "greedy";
    scoring_func = "softmax";
  }
  r.read("topk_method", topk_method, false);
  r.read("scoring_func", scoring_func, false);
  if (topk_method == "noaux_tc") {
    c.topk_method = TopkMethod::NoAuxTc;
  } else if (topk_method == "group_limited_greedy") {
    c.topk_method = TopkMethod::GroupLimitedGreedy;
  } else {
    R1_CHECK(topk_method == "greedy", "[model.config] field 'topk_method' is '", topk_method,
             "', expected noaux_tc, group_limited_greedy or greedy");
    c.topk_method = TopkMethod::Greedy;
  }
  R1_CHECK(scoring_func == "sigmoid" || scoring_func == "softmax", "[model.config] field 'scoring_func' is '", scoring_func,
           "', expected sigmoid or softmax");
  c.scoring_func = scoring_func == "sigmoid" ? ScoringFunc::Sigmoid : ScoringFunc::Softmax;
  r.read("norm_topk_prob", c.norm_topk_prob, false);
  r.read("routed_scaling_factor", c.routed_scaling_factor, false);
  r.read("aux_loss_alpha", c.aux_loss_alpha, false);
  r.read("seq_aux", c.seq_aux, false);
  r.read("q_lora_rank", c.q_lora_rank, false);
  r.read("kv_lora_rank", c.kv_lora_rank, true);
  r.read("qk_nope_head_dim", c.qk_nope_head_dim, true);
  r.read("qk_rope_head_dim", c.qk_rope_head_dim, true);
  r.read("v_head_dim", c.v_head_dim, true);
  r.read("rms_norm_eps", c.rms_norm_eps, false);
  r.read("rope_theta", c.rope_theta, false);
  r.read("rope_interleave", c.rope_interleave, false);
  r.read("max_position_embeddings", c.max_position_embeddings, false);
  r.read("tie_word_embeddings", c.tie_word_embeddings, false);
  r.read("num_nextn_predict_layers", c.num_nextn_predict_layers, false);
  r.read("initializer_range", c.initializer_range, false);
  r.read("bos_token_id", c.bos_token_id);
  r.read("eos_token_id", c.eos_token_id);
  if (const auto* scaling = r.find("rope_scaling")) {
    detail::ConfigReader s(*scaling);
    std::string type;
    s.read("type", type, false);
    s.read("rope_type", type, false);
    R1_CHECK(type == "yarn", "[model.config] rope_scaling.type is '", type, "', r1 supports 'yarn'");
    RopeConfig y;
    s.read("factor", y.factor, true);
    s.read("original_max_position_embeddings", y.original_max_position_embeddings, true);
    s.read("beta_fast", y.beta_fast, false);
    s.read("beta_slow", y.beta_slow, false);
    s.read("mscale", y.mscale, false);
    s.read("mscale_all_dim", y.mscale_all_dim, false);
    s.reject_unknown();
    c.rope_scaling = y;
  }
  if (const auto* q = r.find("quantization_config")) {
    detail::ConfigReader s(*q);
    std::string method, format, activation_scheme = "dynamic";
    s.read("quant_method", method, true);
    s.read("fmt", format, false);
    s.read("activation_scheme", activation_scheme, false);
    const nlohmann::json* block = s.find("weight_block_size");
    s.reject_unknown();
    R1_CHECK(method == "fp8" && (format.empty() || format == "e4m3"), "[model.config] quantization_config is ", q->dump(),
             ", r1 reads fp8 e4m3 block-scaled weights");
    R1_CHECK(block != nullptr && *block == nlohmann::json::array({128, 128}),
             "[model.config] quantization_config.weight_block_size is ", block ? block->dump() : std::string("missing"),
             ", expected [128, 128]");
    c.fp8_weights = true;
  }
  // Fields that must hold these values for the architecture r1 implements.
  if (const auto* act = r.find("hidden_act"))
    R1_CHECK(*act == "silu", "[model.config] hidden_act is ", act->dump(), ", r1's MLPs are SwiGLU (silu)");
  if (const auto* bias = r.find("attention_bias"))
    R1_CHECK(*bias == false, "[model.config] attention_bias is true; DeepSeek's attention has no biases");
  if (const auto* kv_heads = r.find("num_key_value_heads"))
    R1_CHECK(*kv_heads == c.num_attention_heads, "[model.config] num_key_value_heads ", kv_heads->dump(),
             " differs from num_attention_heads ", c.num_attention_heads, ": MLA has no grouped KV heads");
  for (const char* key : {"architectures", "auto_map", "torch_dtype", "dtype", "transformers_version", "use_cache",
                          "attention_dropout", "pretraining_tp", "ep_size", "pad_token_id", "head_dim", "_name_or_path",
                          "rope_parameters", "output_router_logits", "router_aux_loss_coef"})
    r.ignore(key);
  r.reject_unknown();
  c.validate();
  return c;
}

inline ModelConfig ModelConfig::from_file(const std::filesystem::path& path) {
  std::ifstream in(path);
  R1_CHECK(in.good(), "[model.config] cannot open ", path.string());
  nlohmann::json j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  R1_CHECK(!j.is_discarded(), "[model.config] ", path.string(), " is not valid JSON");
  return from_json(j);
}

inline nlohmann::json ModelConfig::to_json() const {
  const auto topk = topk_method == TopkMethod::NoAuxTc ? "noaux_tc"
                    : topk_method == TopkMethod::GroupLimitedGreedy ? "group_limited_greedy" : "greedy";
  nlohmann::json j = {
      {"architectures", {model_type == "deepseek_v2" ? "DeepseekV2ForCausalLM" : "DeepseekV3ForCausalLM"}},
      {"model_type", model_type},
      {"vocab_size", vocab_size},
      {"hidden_size", hidden_size},
      {"intermediate_size", intermediate_size},
      {"moe_intermediate_size", moe_intermediate_size},
      {"num_hidden_layers", num_hidden_layers},
      {"first_k_dense_replace", first_k_dense_replace},
      {"moe_layer_freq", moe_layer_freq},
      {"num_attention_heads", num_attention_heads},
      {"num_key_value_heads", num_attention_heads},
      {"n_routed_experts", n_routed_experts},
      {"n_shared_experts", n_shared_experts},
      {"num_experts_per_tok", num_experts_per_tok},
      {"n_group", n_group},
      {"topk_group", topk_group},
      {"topk_method", topk},
      {"scoring_func", scoring_func == ScoringFunc::Sigmoid ? "sigmoid" : "softmax"},
      {"norm_topk_prob", norm_topk_prob},
      {"routed_scaling_factor", routed_scaling_factor},
      {"aux_loss_alpha", aux_loss_alpha},
      {"seq_aux", seq_aux},
      {"q_lora_rank", q_lora_rank > 0 ? nlohmann::json(q_lora_rank) : nlohmann::json()},
      {"kv_lora_rank", kv_lora_rank},
      {"qk_nope_head_dim", qk_nope_head_dim},
      {"qk_rope_head_dim", qk_rope_head_dim},
      {"v_head_dim", v_head_dim},
      {"rms_norm_eps", rms_norm_eps},
      {"rope_theta", rope_theta},
      {"rope_interleave", rope_interleave},
      {"max_position_embeddings", max_position_embeddings},
      {"tie_word_embeddings", tie_word_embeddings},
      {"num_nextn_predict_layers", num_nextn_predict_layers},
      {"initializer_range", initializer_range},
      {"hidden_act", "silu"},
      {"attention_bias", false},
  };
  if (bos_token_id) j["bos_token_id"] = *bos_token_id;
  if (eos_token_id) j["eos_token_id"] = *eos_token_id;
  if (rope_scaling) {
    const RopeConfig& y = *rope_scaling;
    j["rope_scaling"] = {{"type", "yarn"},
                         {"factor", y.factor},
                         {"original_max_position_embeddings", y.original_max_position_embeddings},
                         {"beta_fast", y.beta_fast},
                         {"beta_slow", y.beta_slow},
                         {"mscale", y.mscale},
                         {"mscale_all_dim", y.mscale_all_dim}};
  }
  if (fp8_weights)
    j["quantization_config"] = {{"quant_method", "fp8"}, {"fmt", "e4m3"}, {"activation_scheme", "dynamic"},
                                {"weight_block_size", {128, 128}}};
  return j;
}

// ---------------------------------------------------------------------------------------
// Params
template <class T, class Dev = Cpu>
struct DecoderLayer {
  RMSNorm<T, Dev> input_layernorm;
  Mla<T, Dev> self_attn;
  RMSNorm<T, Dev> post_attention_layernorm;
  bool is_moe = false;
  Mlp<T, Dev> mlp;  // dense layers
  Moe<T, Dev> moe;  // MoE layers

  DecoderLayer() = default;
  DecoderLayer(const ModelConfig& c, bool moe_layer)
      : input_layernorm(c.hidden_size, c.rms_norm_eps), self_attn(c.mla()),
        post_attention_layernorm(c.hidden_size, c.rms_norm_eps), is_moe(moe_layer) {
    if (is_moe) {
      moe = Moe<T, Dev>(c.moe());
    } else {
      mlp = Mlp<T, Dev>(c.hidden_size, c.intermediate_size);
    }
  }

  template <class F>
  void visit(F&& f) {
    visit_prefixed("input_layernorm.", input_layernorm, f);
    visit_prefixed("self_attn.", self_attn, f);
    visit_prefixed("post_attention_layernorm.", post_attention_layernorm, f);
    if (is_moe) {
      visit_prefixed("mlp.", moe, f);
    } else {
      visit_prefixed("mlp.", mlp, f);
    }
  }
  template <class F>
  void visit_buffers(F&& f) {
    if (is_moe) moe.visit_buffers([&](const std::string& name, auto& t) { f("mlp." + name, t); });
  }
};

// One Multi-Token Prediction module: its own norms, projection and transformer block; the
// embedding and output head are the main model's.
template <class T, class Dev = Cpu>
struct MtpModule {
  RMSNorm<T, Dev> enorm, hnorm;
  Linear<T, Dev> eh_proj;  // [D, 2D]
  DecoderLayer<T, Dev> block;
  RMSNorm<T, Dev> shared_head_norm;

  MtpModule() = default;
  MtpModule(const ModelConfig& c, bool moe_layer)
      : enorm(c.hidden_size, c.rms_norm_eps), hnorm(c.hidden_size, c.rms_norm_eps),
        eh_proj(2 * c.hidden_size, c.hidden_size), block(c, moe_layer), shared_head_norm(c.hidden_size, c.rms_norm_eps) {}

  template <class F>
  void visit(F&& f) {
    visit_prefixed("enorm.", enorm, f);
    visit_prefixed("hnorm.", hnorm, f);
    visit_prefixed("eh_proj.", eh_proj, f);
    block.visit(f);
    visit_prefixed("shared_head.norm.", shared_head_norm, f);
  }
  template <class F>
  void visit_buffers(F&& f) {
    block.visit_buffers(f);
  }
};

template <class T, class Dev = Cpu>
struct Model {
  ModelConfig config;
  Embedding<T, Dev> embed_tokens;
  std::vector<DecoderLayer<T, Dev>> layers;
  RMSNorm<T, Dev> norm;
  Linear<T, Dev> lm_head;  // absent when tie_word_embeddings
  std::vector<MtpModule<T, Dev>> mtp;

  Model() = default;
  explicit Model(const ModelConfig& c)
      : config((c.validate(), c)), embed_tokens(c.vocab_size, c.hidden_size), norm(c.hidden_size, c.rms_norm_eps) {
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) layers.emplace_back(c, c.is_moe_layer(l));
    if (!c.tie_word_embeddings) lm_head = Linear<T, Dev>(c.hidden_size, c.vocab_size);
    // MTP blocks take the layer index they have in the checkpoint (DeepSeek-V3: 61, MoE).
    for (int64_t k = 0; k < c.num_nextn_predict_layers; ++k) mtp.emplace_back(c, c.is_moe_layer(c.num_hidden_layers + k));
  }

  const Tensor<T, Dev>& head_weight() const { return config.tie_word_embeddings ? embed_tokens.weight : lm_head.weight; }

  // Trainable tensors under HF's names.
  template <class F>
  void visit(F&& f) {
    visit_prefixed("model.embed_tokens.", embed_tokens, f);
    for (std::size_t l = 0; l < layers.size(); ++l) visit_prefixed(layer_prefix(l), layers[l], f);
    visit_prefixed("model.norm.", norm, f);
    if (!config.tie_word_embeddings) visit_prefixed("lm_head.", lm_head, f);
    for (std::size_t k = 0; k < mtp.size(); ++k) visit_prefixed(layer_prefix(layers.size() + k), mtp[k], f);
  }
  // Tensors a checkpoint holds that gradients do not touch (the routing biases).
  template <class F>
  void visit_buffers(F&& f) {
    for (std::size_t l = 0; l < layers.size(); ++l)
      layers[l].visit_buffers([&](const std::string& name, auto& t) { f(layer_prefix(l) + name, t); });
    for (std::size_t k = 0; k < mtp.size(); ++k)
      mtp[k].visit_buffers([&](const std::string& name, auto& t) { f(layer_prefix(layers.size() + k) + name, t); });
  }

  static std::string layer_prefix(std::size_t l) { return "model.layers." + std::to_string(l) + "."; }
};

// HF's initialization: matrices and embeddings from normal(0, initializer_range), norm
// weights one, biases and routing biases zero.
template <class T>
void init_weights(Model<T, Cpu>& m, Rng& rng) {
  m.visit([&](const std::string&, Tensor<T, Cpu>& t) {
    if (t.rank() == 2) fill_normal(t.view(), rng, 0.0, m.config.initializer_range);
  });
  m.visit_buffers([](const std::string&, Tensor<T, Cpu>& t) { t.set_zero(); });
}

// ---------------------------------------------------------------------------------------
// Caches of the training path.
template <class T, class Dev = Cpu>
struct DecoderLayerCache {
  RMSNormCache<T, Dev> input_layernorm, post_attention_layernorm;
  MlaCache<T, Dev> self_attn;
  MlpCache<T, Dev> mlp;
  MoeCache<T, Dev> moe;
  Tensor<T, Dev> h, dh;  // the layer's output and the gradient of its input
};

template <class T, class Dev = Cpu>
struct MtpCache {
  EmbeddingCache<T, Dev> embed;
  Tensor<int32_t, Dev> ids, targets;  // [B, S-k], shifted by k
  Tensor<T, Dev> previous;            // h^{k-1} [B, S-k, D]
  RMSNormCache<T, Dev> enorm, hnorm, shared_head_norm;
  Tensor<T, Dev> concat;              // [B, S-k, 2D]
  LinearCache<T, Dev> eh_proj, head;
  DecoderLayerCache<T, Dev> block;
  CrossEntropyCache<T, Dev> loss;
  Tensor<T, Dev> dout;                // gradient of the block output h^k
};

template <class T, class Dev = Cpu>
struct ModelCache {
  EmbeddingCache<T, Dev> embed;
  Tensor<int32_t, Dev> positions;
  std::vector<DecoderLayerCache<T, Dev>> layers;
  RMSNormCache<T, Dev> norm;
  LinearCache<T, Dev> head;
  Tensor<T, Dev> dhidden;             // gradient of the normed hidden state [B, S, D]
  Tensor<T, Dev> dh;                  // gradient of the residual stream
  // LanguageModelLoss
  CrossEntropyCache<T, Dev> loss;
  std::vector<MtpCache<T, Dev>> mtp;
  double main_loss = 0.0, aux_loss = 0.0;
  std::vector<double> mtp_losses;
  double mtp_weight = 0.0;            // lambda of the last loss forward
  int64_t batch = 0, seq = 0;
};

// ---------------------------------------------------------------------------------------
namespace detail {

template <class T, class Dev>
const Tensor<T, Dev>& layer_forward(const DecoderLayer<T, Dev>& p, ConstView<T, Dev> x, ConstView<int32_t, Dev> positions,
                                    DecoderLayerCache<T, Dev>& c) {
  c.h.resize(x.shape());
  c.h.matrix() = x.matrix();
  c.h.matrix() += forward(p.self_attn, forward(p.input_layernorm, x, c.input_layernorm), positions, c.self_attn).matrix();
  const auto& normed = forward(p.post_attention_layernorm, c.h, c.post_attention_layernorm);
  c.h.matrix() += (p.is_moe ? forward(p.moe, normed, c.moe) : forward(p.mlp, normed, c.mlp)).matrix();
  return c.h;
}

// dy: gradient of the layer output; returns that of its input. Each residual branch adds
// its input gradient onto the stream's.
template <class T, class Dev>
const Tensor<T, Dev>& layer_backward(const DecoderLayer<T, Dev>& p, DecoderLayerCache<T, Dev>& c, ConstView<T, Dev> dy,
                                     DecoderLayer<T, Dev>& g) {
  c.dh.resize(dy.shape());
  c.dh.matrix() = dy.matrix();
  const auto& dffn = p.is_moe ? backward(p.moe, c.moe, dy, g.moe) : backward(p.mlp, c.mlp, dy, g.mlp);
  c.dh.matrix() += backward(p.post_attention_layernorm, c.post_attention_layernorm, dffn, g.post_attention_layernorm).matrix();
  const auto& dattn = backward(p.self_attn, c.self_attn, c.dh, g.self_attn);
  c.dh.matrix() += backward(p.input_layernorm, c.input_layernorm, dattn, g.input_layernorm).matrix();
  return c.dh;
}

// logits = x head^T, through lm_head or, tied, through the embedding matrix.
template <class T, class Dev>
const Tensor<T, Dev>& head_forward(const Model<T, Dev>& m, ConstView<T, Dev> x, LinearCache<T, Dev>& c) {
  if (!m.config.tie_word_embeddings) return forward(m.lm_head, x, c);
  c.x.resize(x.shape());
  c.x.matrix() = x.matrix();
  Shape out = x.shape();
  out.dims[out.rank - 1] = m.config.vocab_size;
  c.y.resize(out);
  gemm(c.x.matrix(), m.embed_tokens.weight.matrix().transpose(), c.y.matrix());
  return c.y;
}

template <class T, class Dev>
const Tensor<T, Dev>& head_backward(const Model<T, Dev>& m, LinearCache<T, Dev>& c, ConstView<T, Dev> dy, Model<T, Dev>& g) {
  if (!m.config.tie_word_embeddings) return backward(m.lm_head, c, dy, g.lm_head);
  c.dx.resize(c.x.shape());
  gemm(dy.matrix(), m.embed_tokens.weight.matrix(), c.dx.matrix());
  gemm(dy.matrix().transpose(), c.x.matrix(), g.embed_tokens.weight.matrix(), /*accumulate=*/true);
  return c.dx;
}

template <class T, class Dev>
void check_ids(const Model<T, Dev>& m, ConstView<int32_t, Dev> ids, const char* op) {
  R1_CHECK(!m.layers.empty(), "[", op, "] the model was default-constructed: build it from a ModelConfig");
  R1_CHECK(ids.rank() == 2 && ids.size(1) > 0 && ids.is_contiguous(), "[", op, "] ids have shape ", ids.shape(),
           ", expected a contiguous [B, S] with S > 0");
}

}  // namespace detail

// ---------------------------------------------------------------------------------------
// Training path: ids [B, S] -> logits [B, S, V], causal. Keeps what backward needs.
template <class T, class Dev>
const Tensor<T, Dev>& forward(const Model<T, Dev>& m, ConstView<int32_t, Dev> ids, ModelCache<T, Dev>& c) {
  detail::check_ids(m, ids, "model.forward");
  const int64_t B = ids.size(0), S = ids.size(1);
  c.batch = B;
  c.seq = S;
  c.positions.resize(Shape{S});
  for (int64_t s = 0; s < S; ++s) c.positions.data()[s] = static_cast<int32_t>(s);
  c.layers.resize(m.layers.size());
  const Tensor<T, Dev>* h = &forward(m.embed_tokens, ids, c.embed);
  for (std::size_t l = 0; l < m.layers.size(); ++l) h = &detail::layer_forward(m.layers[l], *h, c.positions, c.layers[l]);
  return detail::head_forward(m, forward(m.norm, *h, c.norm), c.head);
}

namespace detail {
// From the gradient of the normed hidden state (c.dhidden) down to the embedding.
template <class T, class Dev>
void trunk_backward(const Model<T, Dev>& m, ModelCache<T, Dev>& c, Model<T, Dev>& g) {
  const Tensor<T, Dev>* dh = &backward(m.norm, c.norm, c.dhidden, g.norm);
  for (std::size_t l = m.layers.size(); l-- > 0;) dh = &layer_backward(m.layers[l], c.layers[l], *dh, g.layers[l]);
  backward(m.embed_tokens, c.embed, *dh, g.embed_tokens);
}
}  // namespace detail

// dlogits [B, S, V] -> every parameter gradient (accumulated into grads), plus the MoE
// balance losses' gradients.
template <class T, class Dev>
void backward(const Model<T, Dev>& m, ModelCache<T, Dev>& c, ConstView<T, Dev> dlogits, Model<T, Dev>& grads) {
  R1_CHECK(c.head.y.data() != nullptr, "[model.backward] the cache holds no forward pass: call forward first");
  R1_CHECK(dlogits.shape() == c.head.y.shape(), "[model.backward] dlogits have shape ", dlogits.shape(), ", expected ",
           c.head.y.shape());
  R1_CHECK(grads.layers.size() == m.layers.size() && grads.mtp.size() == m.mtp.size(),
           "[model.backward] grads do not match the model: build them with r1::zeros_like(model)");
  c.dhidden = detail::head_backward(m, c.head, dlogits, grads);
  detail::trunk_backward(m, c, grads);
}

// ---------------------------------------------------------------------------------------
// The pre-training loss: next-token cross-entropy, the MTP losses with weight lambda
// (mtp_weight; the V3 report used 0.3, then 0.1), and the MoE balance losses.
struct LanguageModelLoss {
  double mtp_weight = 0.3;
  int32_t ignore_index = -100;
};

// ids, targets [B, S] (targets[b, s] is the token after ids[b, s], or ignore_index).
// Returns the total loss; the parts are in cache.main_loss, mtp_losses and aux_loss.
template <class T, class Dev>
T forward(const LanguageModelLoss& loss, const Model<T, Dev>& m, ConstView<int32_t, Dev> ids,
          ConstView<int32_t, Dev> targets, ModelCache<T, Dev>& c) {
  R1_CHECK(targets.shape() == ids.shape() && targets.is_contiguous(), "[model.loss] targets have shape ", targets.shape(),
           ", ids ", ids.shape());
  R1_CHECK(loss.mtp_weight >= 0.0, "[model.loss] mtp_weight is ", loss.mtp_weight, ", expected >= 0");
  const auto& logits = forward(m, ids, c);
  const CrossEntropy ce{loss.ignore_index};
  c.main_loss = static_cast<double>(forward(ce, logits.view(), targets, c.loss));
  c.mtp_weight = loss.mtp_weight;
  const int64_t B = c.batch, S = c.seq, D = m.config.hidden_size, K = static_cast<int64_t>(m.mtp.size());
  c.mtp.resize(m.mtp.size());
  c.mtp_losses.assign(m.mtp.size(), 0.0);
  double total = c.main_loss;
  const Tensor<T, Dev>* previous = &c.norm.y;  // h^0
  for (int64_t k = 1; k <= K && k < S; ++k) {
    const MtpModule<T, Dev>& p = m.mtp[k - 1];
    MtpCache<T, Dev>& mc = c.mtp[k - 1];
    const int64_t n = S - k;  // positions with a token k ahead
    const int64_t prev_len = previous->size(1);
    mc.ids.resize(Shape{B, n});
    mc.targets.resize(Shape{B, n});
    mc.previous.resize(Shape{B, n, D});
    for (int64_t b = 0; b < B; ++b) {
      std::copy_n(ids.data() + b * S + k, n, mc.ids.data() + b * n);
      std::copy_n(targets.data() + b * S + k, n, mc.targets.data() + b * n);
      std::copy_n(previous->data() + b * prev_len * D, n * D, mc.previous.data() + b * n * D);
    }
    mc.concat.resize(Shape{B, n, 2 * D});
    auto cat = mc.concat.view();
    cat.slice(2, 0, D).matrix() = forward(p.enorm, forward(m.embed_tokens, mc.ids, mc.embed), mc.enorm).matrix();
    cat.slice(2, D, 2 * D).matrix() = forward(p.hnorm, mc.previous, mc.hnorm).matrix();
    const auto& x = forward(p.eh_proj, mc.concat, mc.eh_proj);
    const auto& h = detail::layer_forward(p.block, x, c.positions.view().slice(0, 0, n), mc.block);
    const auto& logits_k = detail::head_forward(m, forward(p.shared_head_norm, h, mc.shared_head_norm), mc.head);
    c.mtp_losses[k - 1] = static_cast<double>(forward(ce, logits_k.view(), mc.targets, mc.loss));
    total += loss.mtp_weight / static_cast<double>(K) * c.mtp_losses[k - 1];
    previous = &mc.block.h;
  }
  c.aux_loss = 0.0;
  for (std::size_t l = 0; l < m.layers.size(); ++l)
    if (m.layers[l].is_moe) c.aux_loss += c.layers[l].moe.aux_loss;
  for (int64_t k = 1; k <= K && k < S; ++k)
    if (m.mtp[k - 1].block.is_moe) c.aux_loss += c.mtp[k - 1].block.moe.aux_loss;
  return static_cast<T>(total + c.aux_loss);
}

// The gradient of the last loss forward, accumulated into grads.
template <class T, class Dev>
void backward(const LanguageModelLoss& loss, const Model<T, Dev>& m, ModelCache<T, Dev>& c, Model<T, Dev>& grads) {
  R1_CHECK(c.loss.log_probs.data() != nullptr, "[model.loss.backward] the cache holds no loss forward: call it first");
  R1_CHECK(grads.layers.size() == m.layers.size() && grads.mtp.size() == m.mtp.size(),
           "[model.loss.backward] grads do not match the model: build them with r1::zeros_like(model)");
  const CrossEntropy ce{loss.ignore_index};
  c.dhidden = detail::head_backward(m, c.head, backward(ce, c.loss), grads);
  const int64_t B = c.batch, S = c.seq, D = m.config.hidden_size, K = static_cast<int64_t>(m.mtp.size());
  const int64_t active = std::min(K, S - 1);
  // Module k's output gradient: its own head's, plus what module k+1 sends back through h^k.
  for (int64_t k = active; k >= 1; --k) {
    const MtpModule<T, Dev>& p = m.mtp[k - 1];
    MtpModule<T, Dev>& g = grads.mtp[k - 1];
    MtpCache<T, Dev>& mc = c.mtp[k - 1];
    const int64_t n = S - k;
    const T weight = static_cast<T>(c.mtp_weight / static_cast<double>(K));
    const auto& dnormed = detail::head_backward(m, mc.head, backward(ce, mc.loss, weight), grads);
    const auto& dout = backward(p.shared_head_norm, mc.shared_head_norm, dnormed, g.shared_head_norm);
    if (k == active) {
      mc.dout = dout;
    } else {
      mc.dout.matrix() += dout.matrix();
    }
    const auto& dx = detail::layer_backward(p.block, mc.block, mc.dout, g.block);
    const auto dcat = backward(p.eh_proj, mc.eh_proj, dx, g.eh_proj).view();
    backward(m.embed_tokens, mc.embed, backward(p.enorm, mc.enorm, dcat.slice(2, 0, D), g.enorm), grads.embed_tokens);
    const auto& dprevious = backward(p.hnorm, mc.hnorm, dcat.slice(2, D, 2 * D), g.hnorm);
    // h^{k-1} spans n + 1 positions (S for the main model's h^0); dprevious the first n.
    Tensor<T, Dev>& target = k == 1 ? c.dhidden : c.mtp[k - 2].dout;
    const int64_t target_len = n + 1;
    if (k > 1) target.resize(Shape{B, target_len, D}, /*zero=*/true);
    for (int64_t b = 0; b < B; ++b)
      target.view().select(b).slice(0, 0, n).matrix() += dprevious.view().select(b).matrix();
  }
  detail::trunk_backward(m, c, grads);
}

// ---------------------------------------------------------------------------------------
// Cached inference. The cache holds every layer's paged latent KV cache (MlaKvCache, the
// same block table in each) and reusable buffers. A sequence id names one sequence in all
// layers.
template <class T, class Dev = Cpu>
struct InferenceCache {
  std::vector<MlaKvCache<T, Dev>> kv;          // one per layer
  std::vector<MlaDecodeCache<T, Dev>> attn;    // one per layer
  EmbeddingCache<T, Dev> embed;
  RMSNormCache<T, Dev> attn_norm, ffn_norm, norm;
  MlpCache<T, Dev> mlp;
  MoeCache<T, Dev> moe;
  LinearCache<T, Dev> head;
  Tensor<T, Dev> h, last;

  InferenceCache() = default;
  // num_blocks blocks of block_size tokens per layer: the pool all sequences share.
  InferenceCache(const Model<T, Dev>& m, int64_t num_blocks, int64_t block_size = 64)
      : kv(m.layers.size(), MlaKvCache<T, Dev>(m.config.mla(), num_blocks, block_size)), attn(m.layers.size()) {}

  int64_t add_sequence() {
    int64_t id = -1;
    for (auto& layer : kv) id = layer.add_sequence();
    return id;
  }
  int64_t num_sequences() const { return kv.empty() ? 0 : kv.front().num_sequences(); }
  int64_t length(int64_t seq) const { return front("inference_cache.length").length(seq); }
  int64_t free_blocks() const { return front("inference_cache.free_blocks").free_blocks(); }
  // Rolls a sequence back to its first `length` tokens in every layer (speculative decoding).
  void truncate(int64_t seq, int64_t length) {
    for (auto& layer : kv) layer.truncate(seq, length);
  }
  void reset() {
    for (auto& layer : kv) layer.reset();
  }
  // Latent bytes per cached token over all layers (DeepSeek-V3 in bf16: 61 * 1152 = 70,272).
  int64_t bytes_per_token() const { return static_cast<int64_t>(kv.size()) * front("inference_cache").bytes_per_token(); }
  int64_t bytes_in_use() const { return static_cast<int64_t>(kv.size()) * front("inference_cache").bytes_in_use(); }

 private:
  const MlaKvCache<T, Dev>& front(const char* op) const {
    R1_CHECK(!kv.empty(), "[", op, "] the cache was default-constructed: build it from a Model");
    return kv.front();
  }
};

enum class Logits { All, Last };

// ids [B, T]: T new tokens for each sequence seqs[b] of the cache (a prompt to prefill, or
// one token per decode step). Appends them to the cache and returns the logits [B, T, V]
// (Logits::All) or of the last new token only, [B, 1, V]. Positions continue each
// sequence; sequences may have different lengths. A full pool or a position past
// max_position_embeddings throws before the cache is touched.
template <class T, class Dev>
const Tensor<T, Dev>& forward_cached(const Model<T, Dev>& m, ConstView<int32_t, Dev> ids, const std::vector<int64_t>& seqs,
                                     InferenceCache<T, Dev>& c, Logits which = Logits::All) {
  detail::check_ids(m, ids, "model.forward_cached");
  R1_CHECK(c.kv.size() == m.layers.size(), "[model.forward_cached] the cache has ", c.kv.size(), " layers, the model ",
           m.layers.size());
  const int64_t B = ids.size(0), Tn = ids.size(1), D = m.config.hidden_size;
  c.h = forward(m.embed_tokens, ids, c.embed);
  for (std::size_t l = 0; l < m.layers.size(); ++l) {
    const DecoderLayer<T, Dev>& layer = m.layers[l];
    c.h.matrix() += forward_absorbed(layer.self_attn, forward(layer.input_layernorm, c.h, c.attn_norm), seqs, c.kv[l],
                                     c.attn[l]).matrix();
    const auto& normed = forward(layer.post_attention_layernorm, c.h, c.ffn_norm);
    c.h.matrix() += (layer.is_moe ? forward(layer.moe, normed, c.moe) : forward(layer.mlp, normed, c.mlp)).matrix();
  }
  const auto& hidden = forward(m.norm, c.h, c.norm);
  if (which == Logits::All) return detail::head_forward(m, hidden, c.head);
  c.last.resize(Shape{B, 1, D});
  for (int64_t b = 0; b < B; ++b) c.last.view().select(b).matrix() = hidden.view().select(b).slice(0, Tn - 1, Tn).matrix();
  return detail::head_forward(m, c.last, c.head);
}

// ---------------------------------------------------------------------------------------
// HF model directories: config.json and model.safetensors (or shards with an index).

struct LoadOptions {
  // Off: build the model without its MTP modules and ignore their tensors (inference only,
  // or checkpoints that HF transformers saved, which drop them).
  bool mtp = true;
};

namespace detail {
// The copies of the shared embedding and head that released checkpoints keep in every MTP
// layer: r1 ties them to the main model's.
inline std::vector<std::string> mtp_shared_copies(const ModelConfig& c, int64_t layers) {
  std::vector<std::string> names;
  for (int64_t k = 0; k < layers; ++k) {
    const std::string prefix = "model.layers." + std::to_string(c.num_hidden_layers + k) + ".";
    names.push_back(prefix + "embed_tokens.weight");
    names.push_back(prefix + "shared_head.head.weight");
  }
  return names;
}

// Linear weights inside the decoder layers: the ones DeepSeek-V3 ships in FP8 (not the
// router gate, embeddings, head, norms or MTP projection).
inline bool is_fp8_linear(const std::string& name) {
  const bool in_layer = name.find(".self_attn.") != std::string::npos ||
                        (name.find(".mlp.") != std::string::npos && name.find(".mlp.gate.") == std::string::npos);
  return in_layer && (name.ends_with("_proj.weight") || name.ends_with("_proj_with_mqa.weight"));
}

// N of "model.layers.N.*", or -1.
inline int64_t layer_index(const std::string& name) {
  constexpr std::string_view prefix = "model.layers.";
  if (!name.starts_with(prefix)) return -1;
  int64_t n = 0;
  std::size_t i = prefix.size();
  for (; i < name.size() && name[i] >= '0' && name[i] <= '9'; ++i) n = 10 * n + (name[i] - '0');
  return i > prefix.size() && i < name.size() && name[i] == '.' ? n : -1;
}
}  // namespace detail

template <class T = float>
Model<T, Cpu> load_pretrained(const std::filesystem::path& dir, const LoadOptions& options = {}) {
  ModelConfig config = ModelConfig::from_file(dir / "config.json");
  const int64_t checkpoint_mtp = config.num_nextn_predict_layers;
  if (!options.mtp) config.num_nextn_predict_layers = 0;
  Model<T, Cpu> m(config);
  const Checkpoint checkpoint = Checkpoint::open(dir);
  std::vector<std::string> expected;
  const auto read = [&](const std::string& name, Tensor<T, Cpu>& t) {
    expected.push_back(name);
    if constexpr (std::is_same_v<T, float>) {
      checkpoint.load(name, t, t.shape());
    } else {
      Tensor<float> stored;
      checkpoint.load(name, stored, t.shape());
      convert(stored.view(), t.view());
    }
  };
  m.visit(read);
  m.visit_buffers(read);
  // Tensors r1 accepts without using: the MTP layers' copies of the embedding and head, and
  // with options.mtp off the MTP layers themselves.
  if (!options.mtp && checkpoint_mtp > 0)
    for (const std::string& name : checkpoint.names())
      if (detail::layer_index(name) >= config.num_hidden_layers) expected.push_back(name);
  for (const std::string& name : detail::mtp_shared_copies(config, config.num_nextn_predict_layers))
    if (checkpoint.contains(name)) expected.push_back(name);
  checkpoint.check_names(expected);
  return m;
}

enum class WeightFormat {
  F32,
  BF16,
  Fp8Bf16,  // as DeepSeek-V3's release: FP8 E4M3 decoder-layer linears with 128x128 block scales, BF16 elsewhere
};

template <class T>
void save_pretrained(const Model<T, Cpu>& model, const std::filesystem::path& dir, WeightFormat format = WeightFormat::F32,
                     std::size_t max_shard_bytes = 0) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  R1_CHECK(!ec, "[save_pretrained] cannot create directory '", dir.string(), "': ", ec.message());
  Model<T, Cpu>& m = const_cast<Model<T, Cpu>&>(model);  // visit is non-const; nothing is modified
  SafetensorsWriter writer;
  const Dtype dense = format == WeightFormat::F32 ? Dtype::F32 : Dtype::BF16;
  const auto add_float = [&](const std::string& name, const Tensor<float>& values, bool buffer) {
    if (format == WeightFormat::Fp8Bf16 && detail::is_fp8_linear(name)) {
      writer.add_fp8_block_scaled(name, values);
    } else {
      writer.add(name, values, buffer ? Dtype::F32 : dense);  // routing biases stay F32, as released
    }
  };
  const auto add = [&](const std::string& name, const Tensor<T, Cpu>& t, bool buffer) {
    if constexpr (std::is_same_v<T, float>) {
      add_float(name, t, buffer);
    } else {
      Tensor<float> values(t.shape());
      convert(t.view(), values.view());
      add_float(name, values, buffer);
    }
  };
  m.visit([&](const std::string& name, Tensor<T, Cpu>& t) { add(name, t, false); });
  m.visit_buffers([&](const std::string& name, Tensor<T, Cpu>& t) { add(name, t, true); });
  const auto copies = detail::mtp_shared_copies(m.config, static_cast<int64_t>(m.mtp.size()));
  for (std::size_t i = 0; i < copies.size(); i += 2) {
    add(copies[i], m.embed_tokens.weight, false);
    add(copies[i + 1], m.head_weight(), false);
  }
  if (max_shard_bytes > 0) {
    writer.write_sharded(dir, max_shard_bytes);
  } else {
    writer.write(dir / "model.safetensors");
  }
  ModelConfig config = m.config;
  config.fp8_weights = format == WeightFormat::Fp8Bf16;
  const std::string json = config.to_json().dump(2) + "\n";
  write_file_atomic(dir / "config.json", [&](std::ostream& out) { out << json; });
}

}  // namespace r1
