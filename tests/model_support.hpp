// Tiny DeepSeek model configs and random models shared by the model, generation and
// training tests.
#pragma once

#include <r1/model.hpp>

#include <nlohmann/json.hpp>

namespace r1test {

// A tiny DeepSeek-V3: YaRN, q and kv LoRA, a dense layer then MoE layers with sigmoid
// group-limited routing, a bias and a shared expert, the balance loss, and one MTP module.
inline nlohmann::json tiny_v3_json() {
  return {
      {"architectures", {"DeepseekV3ForCausalLM"}},
      {"model_type", "deepseek_v3"},
      {"vocab_size", 37},
      {"hidden_size", 16},
      {"intermediate_size", 24},
      {"moe_intermediate_size", 8},
      {"num_hidden_layers", 3},
      {"first_k_dense_replace", 1},
      {"moe_layer_freq", 1},
      {"num_attention_heads", 2},
      {"num_key_value_heads", 2},
      {"n_routed_experts", 8},
      {"n_shared_experts", 1},
      {"num_experts_per_tok", 2},
      {"n_group", 4},
      {"topk_group", 2},
      {"topk_method", "noaux_tc"},
      {"scoring_func", "sigmoid"},
      {"norm_topk_prob", true},
      {"routed_scaling_factor", 2.5},
      {"aux_loss_alpha", 0.01},
      {"seq_aux", true},
      {"q_lora_rank", 12},
      {"kv_lora_rank", 8},
      {"qk_nope_head_dim", 4},
      {"qk_rope_head_dim", 4},
      {"v_head_dim", 4},
      {"rms_norm_eps", 1e-6},
      {"rope_theta", 10000.0},
      {"rope_scaling",
       {{"type", "yarn"}, {"factor", 4.0}, {"original_max_position_embeddings", 16}, {"beta_fast", 32}, {"beta_slow", 1},
        {"mscale", 1.0}, {"mscale_all_dim", 1.0}}},
      {"max_position_embeddings", 64},
      {"tie_word_embeddings", false},
      {"num_nextn_predict_layers", 1},
      {"hidden_act", "silu"},
      {"attention_bias", false},
      {"torch_dtype", "bfloat16"},
      {"bos_token_id", 0},
      {"eos_token_id", 1},
  };
}

// V2-Lite style: softmax greedy routing, a plain q_proj, no MTP.
inline nlohmann::json tiny_v2_json() {
  auto j = tiny_v3_json();
  j["model_type"] = "deepseek_v2";
  j["architectures"] = {"DeepseekV2ForCausalLM"};
  j["q_lora_rank"] = nullptr;
  j["topk_method"] = "greedy";
  j["scoring_func"] = "softmax";
  j["norm_topk_prob"] = false;
  j["routed_scaling_factor"] = 1.0;
  j["num_nextn_predict_layers"] = 0;
  j.erase("rope_scaling");
  return j;
}

template <class T>
r1::Model<T> random_model(const r1::ModelConfig& config, uint64_t seed) {
  r1::Model<T> m(config);
  r1::Rng rng(seed);
  // Larger than HF's 0.02 so that every path carries a signal the check can see.
  m.visit([&](const std::string&, r1::Tensor<T>& t) { r1::fill_normal(t.view(), rng, t.rank() == 2 ? 0.0 : 1.0, 0.3); });
  m.visit_buffers([&](const std::string&, r1::Tensor<T>& t) { r1::fill_normal(t.view(), rng, 0.0, 0.05); });
  return m;
}

inline r1::Tensor<int32_t> random_ids(r1::Shape shape, int64_t vocab, uint64_t seed) {
  r1::Tensor<int32_t> ids(shape);
  r1::Rng rng(seed);
  for (int64_t i = 0; i < ids.numel(); ++i) ids.data()[i] = static_cast<int32_t>(rng.next_u64() % vocab);
  return ids;
}

}  // namespace r1test
