// Tests of r1/model.hpp: config.json parsing, the training forward/backward with MTP and
// the MoE balance loss against finite differences, and cached inference against the
// training path.
#include <r1/model.hpp>

#include "support.hpp"

#include <catch2/catch.hpp>

#include <map>

using r1::Shape;
using r1::Tensor;
using r1test::check_gradient_sampled;
using r1test::max_abs_diff;

namespace {

// A tiny DeepSeek-V3: YaRN, q and kv LoRA, a dense layer then MoE layers with sigmoid
// group-limited routing, a bias and a shared expert, the balance loss, and one MTP module.
nlohmann::json tiny_v3_json() {
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
nlohmann::json tiny_v2_json() {
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
  m.visit([&](const std::string&, Tensor<T>& t) { r1::fill_normal(t.view(), rng, t.rank() == 2 ? 0.0 : 1.0, 0.3); });
  m.visit_buffers([&](const std::string&, Tensor<T>& t) { r1::fill_normal(t.view(), rng, 0.0, 0.05); });
  return m;
}

// Five elements of every parameter against central differences of loss.
void check_model_gradients(r1::Model<double>& m, r1::Model<double>& grads, const std::function<double()>& loss) {
  std::map<std::string, Tensor<double>*> grad_of;
  grads.visit([&](const std::string& name, Tensor<double>& g) { grad_of[name] = &g; });
  m.visit([&](const std::string& name, Tensor<double>& t) {
    INFO(name);
    check_gradient_sampled(t, *grad_of.at(name), loss, 5, 1e-6, 1e-5);
  });
}

Tensor<int32_t> random_ids(Shape shape, int64_t vocab, uint64_t seed) {
  Tensor<int32_t> ids(shape);
  r1::Rng rng(seed);
  for (int64_t i = 0; i < ids.numel(); ++i) ids.data()[i] = static_cast<int32_t>(rng.next_u64() % vocab);
  return ids;
}

}  // namespace

TEST_CASE("model config reads HF config.json", "[model]") {
  const auto c = r1::ModelConfig::from_json(tiny_v3_json());
  CHECK(c.hidden_size == 16);
  CHECK(c.topk_method == r1::TopkMethod::NoAuxTc);
  CHECK(c.scoring_func == r1::ScoringFunc::Sigmoid);
  REQUIRE(c.rope_scaling.has_value());
  CHECK(c.rope_scaling->factor == 4.0);
  CHECK(c.mla().rope.factor == 4.0);
  CHECK(c.moe().n_group == 4);
  CHECK(c.bos_token_id == 0);
  CHECK(!c.is_moe_layer(0));
  CHECK(c.is_moe_layer(1));
  CHECK(c.is_moe_layer(3));  // the MTP block's index

  const auto v2 = r1::ModelConfig::from_json(tiny_v2_json());
  CHECK(v2.q_lora_rank == 0);
  CHECK(v2.topk_method == r1::TopkMethod::Greedy);
  CHECK(v2.scoring_func == r1::ScoringFunc::Softmax);
  CHECK(!v2.rope_scaling.has_value());

  // to_json is read back to the same config.
  const auto again = r1::ModelConfig::from_json(c.to_json());
  CHECK(again.to_json() == c.to_json());
  CHECK(again.rope_scaling->original_max_position_embeddings == 16);
}

TEST_CASE("model config rejects missing, unknown and invalid fields", "[model]") {
  auto j = tiny_v3_json();
  j.erase("hidden_size");
  REQUIRE_R1_ERROR(r1::ModelConfig::from_json(j), "required field 'hidden_size' is missing");
  j = tiny_v3_json();
  j["sliding_window"] = 4096;
  REQUIRE_R1_ERROR(r1::ModelConfig::from_json(j), "unknown field 'sliding_window'");
  j = tiny_v3_json();
  j["hidden_size"] = "16";
  REQUIRE_R1_ERROR(r1::ModelConfig::from_json(j), "field 'hidden_size' is \"16\", expected an integer");
  j = tiny_v3_json();
  j["topk_method"] = "top2";
  REQUIRE_R1_ERROR(r1::ModelConfig::from_json(j), "field 'topk_method' is 'top2'");
  j = tiny_v3_json();
  j["n_group"] = 3;
  REQUIRE_R1_ERROR(r1::ModelConfig::from_json(j), "n_group 3 does not divide n_routed_experts 8");
  j = tiny_v3_json();
  j["hidden_act"] = "gelu";
  REQUIRE_R1_ERROR(r1::ModelConfig::from_json(j), "hidden_act is \"gelu\"");
  j = tiny_v3_json();
  j["rope_scaling"]["type"] = "linear";
  REQUIRE_R1_ERROR(r1::ModelConfig::from_json(j), "rope_scaling.type is 'linear'");
  j = tiny_v3_json();
  j["quantization_config"] = {{"quant_method", "fp8"}, {"fmt", "e4m3"}, {"weight_block_size", {64, 64}}};
  REQUIRE_R1_ERROR(r1::ModelConfig::from_json(j), "weight_block_size is [64,64]");
  j["quantization_config"]["weight_block_size"] = {128, 128};
  CHECK(r1::ModelConfig::from_json(j).fp8_weights);
  REQUIRE_R1_ERROR(r1::ModelConfig::from_json(nlohmann::json::array()), "must be a JSON object, found array");
  REQUIRE_R1_ERROR(r1::ModelConfig::from_file("/nonexistent/config.json"), "cannot open /nonexistent/config.json");
}

TEST_CASE("model tensors carry HF's names, MTP as layer num_hidden_layers", "[model]") {
  r1::Model<float> m(r1::ModelConfig::from_json(tiny_v3_json()));
  std::vector<std::string> names, buffers;
  m.visit([&](const std::string& name, Tensor<float>&) { names.push_back(name); });
  m.visit_buffers([&](const std::string& name, Tensor<float>&) { buffers.push_back(name); });
  const auto has = [&](const std::string& n) { return std::find(names.begin(), names.end(), n) != names.end(); };
  CHECK(names.front() == "model.embed_tokens.weight");
  CHECK(has("model.layers.0.mlp.gate_proj.weight"));
  CHECK(has("model.layers.0.self_attn.kv_a_proj_with_mqa.weight"));
  CHECK(has("model.layers.1.mlp.experts.7.down_proj.weight"));
  CHECK(has("model.layers.2.mlp.shared_experts.up_proj.weight"));
  CHECK(has("model.layers.2.mlp.gate.weight"));
  CHECK(has("model.norm.weight"));
  CHECK(has("lm_head.weight"));
  CHECK(has("model.layers.3.enorm.weight"));
  CHECK(has("model.layers.3.hnorm.weight"));
  CHECK(has("model.layers.3.eh_proj.weight"));
  CHECK(has("model.layers.3.shared_head.norm.weight"));
  CHECK(has("model.layers.3.mlp.experts.0.gate_proj.weight"));
  CHECK(buffers == std::vector<std::string>{"model.layers.1.mlp.gate.e_score_correction_bias",
                                            "model.layers.2.mlp.gate.e_score_correction_bias",
                                            "model.layers.3.mlp.gate.e_score_correction_bias"});
  CHECK(m.mtp[0].eh_proj.weight.shape() == Shape{16, 32});
}

TEST_CASE("model loss backward (main + MTP + balance loss) matches finite differences", "[model]") {
  for (const bool tied : {false, true}) {
    DYNAMIC_SECTION((tied ? "tied embeddings" : "separate lm_head")) {
      auto j = tiny_v3_json();
      j["tie_word_embeddings"] = tied;
      j["num_nextn_predict_layers"] = 2;
      const auto config = r1::ModelConfig::from_json(j);
      auto m = random_model<double>(config, 7);
      auto grads = r1::zeros_like(m);
      const auto ids = random_ids(Shape{2, 7}, config.vocab_size, 11);
      auto targets = random_ids(Shape{2, 7}, config.vocab_size, 12);
      targets(1, 3) = -100;  // an ignored target
      const r1::LanguageModelLoss lm{.mtp_weight = 0.3};
      r1::ModelCache<double> cache;
      const double loss0 = r1::forward(lm, m, ids, targets, cache);
      CHECK(cache.mtp_losses.size() == 2);
      CHECK(cache.aux_loss > 0.0);
      CHECK(loss0 == Approx(cache.main_loss + 0.15 * (cache.mtp_losses[0] + cache.mtp_losses[1]) + cache.aux_loss));
      r1::backward(lm, m, cache, grads);
      const auto loss = [&] {
        r1::ModelCache<double> c;
        return r1::forward(lm, m, ids, targets, c);
      };
      check_model_gradients(m, grads, loss);
    }
  }
}

TEST_CASE("model backward from logits matches finite differences (V2 config)", "[model]") {
  // No balance loss: then the logits are the only output, and backward(dlogits) its gradient.
  auto j = tiny_v2_json();
  j["aux_loss_alpha"] = 0.0;
  const auto config = r1::ModelConfig::from_json(j);
  auto m = random_model<double>(config, 3);
  auto grads = r1::zeros_like(m);
  const auto ids = random_ids(Shape{1, 6}, config.vocab_size, 5);
  const auto w = r1test::random_tensor(Shape{1, 6, config.vocab_size}, 9);
  r1::ModelCache<double> cache;
  r1::forward(m, ids, cache);
  r1::backward(m, cache, w, grads);
  const auto loss = [&] {
    r1::ModelCache<double> c;
    return r1test::weighted_sum(r1::forward(m, ids, c), w);
  };
  check_model_gradients(m, grads, loss);
}

TEST_CASE("cached inference (prefill, then decode) matches the training forward", "[model]") {
  const auto config = r1::ModelConfig::from_json(tiny_v3_json());
  const auto m = random_model<double>(config, 21);
  const int64_t S = 9;
  const auto ids = random_ids(Shape{2, S}, config.vocab_size, 4);
  r1::ModelCache<double> train;
  const Tensor<double> reference = r1::forward(m, ids, train);

  // Prefill both sequences whole.
  r1::InferenceCache<double> cache(m, 8, 4);
  const std::vector<int64_t> seqs{cache.add_sequence(), cache.add_sequence()};
  const auto& prefill = r1::forward_cached(m, ids, seqs, cache);
  REQUIRE(prefill.shape() == reference.shape());
  CHECK(max_abs_diff(prefill, reference) < 1e-10);
  CHECK(cache.length(1) == S);

  // Sequence 0: prefill 4 tokens, then decode one at a time; compare each step's logits.
  cache.reset();
  const int64_t a = cache.add_sequence(), b = cache.add_sequence();
  CHECK(cache.bytes_per_token() == 3 * (8 + 4) * 8);
  r1::forward_cached(m, ids.view().slice(0, 0, 1).slice(1, 0, 4), {a}, cache);
  r1::forward_cached(m, ids.view().slice(0, 1, 2).slice(1, 0, 2), {b}, cache);
  // Both sequences then decode together, at different lengths (4 and 2).
  Tensor<int32_t> step(Shape{2, 1});
  for (int64_t t = 0; t < 2; ++t) {
    step(0, 0) = ids(0, 4 + t);
    step(1, 0) = ids(1, 2 + t);
    const auto& logits = r1::forward_cached(m, step, {a, b}, cache, r1::Logits::Last);
    REQUIRE(logits.shape() == Shape{2, 1, config.vocab_size});
    for (int64_t v = 0; v < config.vocab_size; ++v) {
      CHECK(logits(0, 0, v) == Approx(reference(0, 4 + t, v)).epsilon(1e-9));
      CHECK(logits(1, 0, v) == Approx(reference(1, 2 + t, v)).epsilon(1e-9));
    }
  }
  CHECK(cache.length(a) == 6);
  CHECK(cache.length(b) == 4);
  // Roll back sequence a and decode again: same logits as the first time.
  cache.truncate(a, 4);
  step(0, 0) = ids(0, 4);
  const auto& again = r1::forward_cached(m, step.view().slice(0, 0, 1), {a}, cache, r1::Logits::Last);
  for (int64_t v = 0; v < config.vocab_size; ++v) CHECK(again(0, 0, v) == Approx(reference(0, 4, v)).epsilon(1e-9));
}

TEST_CASE("model rejects bad ids, full caches and positions past the maximum", "[model]") {
  const auto config = r1::ModelConfig::from_json(tiny_v3_json());
  const auto m = random_model<float>(config, 1);
  r1::ModelCache<float> train;
  Tensor<int32_t> ids(Shape{1, 3});
  ids(0, 1) = 37;
  REQUIRE_R1_ERROR(r1::forward(m, ids, train), "id 37 at position 1 is out of range [0, 37)");
  REQUIRE_R1_ERROR(r1::forward(m, Tensor<int32_t>(Shape{3}), train), "ids have shape [3], expected a contiguous [B, S]");
  ids(0, 1) = 2;
  Tensor<int32_t> targets(Shape{1, 2});
  REQUIRE_R1_ERROR(r1::forward(r1::LanguageModelLoss{}, m, ids, targets, train), "targets have shape [1, 2], ids [1, 3]");

  r1::InferenceCache<float> cache(m, 1, 4);
  const int64_t s = cache.add_sequence();
  REQUIRE_R1_ERROR(r1::forward_cached(m, Tensor<int32_t>(Shape{1, 5}), {s}, cache), "the pool is full");
  CHECK(cache.length(s) == 0);
  REQUIRE_R1_ERROR(r1::forward_cached(m, ids, {s + 1}, cache), "sequence 1 does not exist");
  r1::InferenceCache<float> roomy(m, 20, 4);
  const int64_t r = roomy.add_sequence();
  REQUIRE_R1_ERROR(r1::forward_cached(m, Tensor<int32_t>(Shape{1, 65}), {r}, roomy), "past max_position_embeddings 64");
  CHECK(roomy.length(r) == 0);
}
