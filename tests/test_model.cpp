// Tests of r1/model.hpp and r1/generate.hpp: config.json parsing, the training
// forward/backward with MTP and the MoE balance loss against finite differences, cached
// inference against the training path, sampling and batched generation.
#include <r1/generate.hpp>
#include <r1/model.hpp>

#include "model_support.hpp"
#include "support.hpp"

#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <map>

#include <unistd.h>

using r1::Shape;
using r1::Tensor;
using r1test::check_gradient_sampled;
using r1test::max_abs_diff;
using r1test::random_ids;
using r1test::random_model;
using r1test::tiny_v2_json;
using r1test::tiny_v3_json;

namespace {

// Five elements of every parameter against central differences of loss.
void check_model_gradients(r1::Model<double>& m, r1::Model<double>& grads, const std::function<double()>& loss) {
  std::map<std::string, Tensor<double>*> grad_of;
  grads.visit([&](const std::string& name, Tensor<double>& g) { grad_of[name] = &g; });
  m.visit([&](const std::string& name, Tensor<double>& t) {
    INFO(name);
    check_gradient_sampled(t, *grad_of.at(name), loss, 5, 1e-6, 1e-5);
  });
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

// ---------------------------------------------------------------------------------------
// Sampling and generation

namespace {

// Frequencies of n draws from one row of logits.
std::vector<double> frequencies(const std::vector<float>& logits, const r1::SamplingConfig& config, int n, uint64_t seed) {
  r1::Rng rng(seed);
  r1::SamplerWorkspace w;
  std::vector<double> count(logits.size(), 0.0);
  const r1::View<const float> row(logits.data(), Shape{static_cast<int64_t>(logits.size())});
  for (int i = 0; i < n; ++i) count[r1::sample(row, config, rng, w)] += 1.0 / n;
  return count;
}

}  // namespace

TEST_CASE("sample follows temperature, top-k and top-p", "[generate]") {
  // Probabilities 0.5, 0.3, 0.15, 0.05 at temperature 1.
  const std::vector<float> logits{std::log(0.3f), std::log(0.05f), std::log(0.5f), std::log(0.15f)};
  r1::Rng rng(1);
  r1::SamplerWorkspace w;
  const r1::View<const float> row(logits.data(), Shape{4});
  CHECK(r1::sample(row, {.temperature = 0.0}, rng, w) == 2);
  CHECK(r1::sample(row, {.temperature = 5.0, .top_k = 1}, rng, w) == 2);
  const std::vector<float> tie{1.0f, 3.0f, 3.0f};
  CHECK(r1::sample(r1::View<const float>(tie.data(), Shape{3}), {.temperature = 0.0}, rng, w) == 1);

  const int n = 200000;  // standard error below 0.0012
  auto f = frequencies(logits, {}, n, 3);
  CHECK(f[2] == Approx(0.5).margin(0.005));
  CHECK(f[0] == Approx(0.3).margin(0.005));
  CHECK(f[3] == Approx(0.15).margin(0.005));
  CHECK(f[1] == Approx(0.05).margin(0.005));
  // Temperature 2: p proportional to sqrt(p).
  f = frequencies(logits, {.temperature = 2.0}, n, 4);
  const double z = std::sqrt(0.5) + std::sqrt(0.3) + std::sqrt(0.15) + std::sqrt(0.05);
  CHECK(f[2] == Approx(std::sqrt(0.5) / z).margin(0.005));
  CHECK(f[1] == Approx(std::sqrt(0.05) / z).margin(0.005));
  // Top-k 2 renormalizes over the two best.
  f = frequencies(logits, {.top_k = 2}, n, 5);
  CHECK(f[2] == Approx(0.625).margin(0.005));
  CHECK(f[0] == Approx(0.375).margin(0.005));
  CHECK(f[1] + f[3] == 0.0);
  // Top-p 0.7: 0.5 < 0.7 keeps the second token, 0.8 >= 0.7 stops (HF's TopPLogitsWarper).
  f = frequencies(logits, {.top_p = 0.7}, n, 6);
  CHECK(f[2] == Approx(0.625).margin(0.005));
  CHECK(f[1] + f[3] == 0.0);
  f = frequencies(logits, {.top_p = 0.85}, n, 7);
  CHECK(f[3] == Approx(0.15 / 0.95).margin(0.005));
  CHECK(f[1] == 0.0);
  // The same seed draws the same tokens.
  CHECK(frequencies(logits, {.top_p = 0.9}, 1000, 8) == frequencies(logits, {.top_p = 0.9}, 1000, 8));

  REQUIRE_R1_ERROR(r1::sample(row, {.temperature = -1.0}, rng, w), "temperature is -1");
  REQUIRE_R1_ERROR(r1::sample(row, {.top_p = 0.0}, rng, w), "top_p is 0, expected in (0, 1]");
  REQUIRE_R1_ERROR(r1::sample(row, {.top_k = -2}, rng, w), "top_k is -2");
  const std::vector<float> nan{0.0f, std::nanf("")};
  REQUIRE_R1_ERROR(r1::sample(r1::View<const float>(nan.data(), Shape{2}), {}, rng, w), "logit 1 is NaN");
}

TEST_CASE("greedy generation picks each token as the training forward's argmax", "[generate]") {
  const auto config = r1::ModelConfig::from_json(tiny_v3_json());
  const auto m = random_model<float>(config, 5);
  const std::vector<std::vector<int32_t>> prompts{{3, 1, 4, 1, 5}, {9, 2}, {6, 5, 3, 5, 8, 9, 7}};
  r1::GenerationConfig gen{.max_new_tokens = 6, .sampling = {.temperature = 0.0}, .block_size = 4};
  std::vector<std::vector<int32_t>> streamed(prompts.size());
  const auto result = r1::generate(m, prompts, gen, [&](int64_t b, int32_t id) { streamed[b].push_back(id); });
  REQUIRE(result.tokens.size() == 3);
  CHECK(streamed == result.tokens);
  CHECK(result.prompt_tokens == 14);
  CHECK(result.generated_tokens == 18);
  for (std::size_t b = 0; b < prompts.size(); ++b) {
    INFO("prompt " << b);
    REQUIRE(result.tokens[b].size() == 6);
    CHECK(result.finish[b] == r1::FinishReason::Length);
    std::vector<int32_t> all = prompts[b];
    all.insert(all.end(), result.tokens[b].begin(), result.tokens[b].end());
    const auto len = static_cast<int64_t>(all.size());
    r1::ModelCache<float> cache;
    const auto& logits = r1::forward(m, r1::View<const int32_t>(all.data(), Shape{1, len}), cache);
    for (std::size_t i = 0; i < result.tokens[b].size(); ++i) {
      const int64_t pos = static_cast<int64_t>(prompts[b].size() + i) - 1;
      const auto row = logits.matrix().row(pos);
      Eigen::Index best = 0;
      row.maxCoeff(&best);
      CHECK(result.tokens[b][i] == best);
    }
  }
  // A batch generates what each prompt generates alone.
  const auto alone = r1::generate(m, {prompts[1]}, gen);
  CHECK(alone.tokens[0] == result.tokens[1]);
}

TEST_CASE("generation stops at stop tokens and is reproducible from its seed", "[generate]") {
  const auto config = r1::ModelConfig::from_json(tiny_v3_json());
  const auto m = random_model<float>(config, 6);
  const std::vector<std::vector<int32_t>> prompts{{1, 2, 3}, {4, 5}};
  r1::GenerationConfig gen{.max_new_tokens = 12, .sampling = {.temperature = 1.0, .top_p = 0.95}, .seed = 42};
  const auto a = r1::generate(m, prompts, gen);
  const auto b = r1::generate(m, prompts, gen);
  CHECK(a.tokens == b.tokens);
  gen.seed = 43;
  CHECK(r1::generate(m, prompts, gen).tokens != a.tokens);

  gen.seed = 42;
  gen.stop_tokens = {a.tokens[0][2]};
  const auto stopped = r1::generate(m, prompts, gen);
  const auto first_stop = std::find(a.tokens[0].begin(), a.tokens[0].end(), gen.stop_tokens[0]) - a.tokens[0].begin();
  CHECK(static_cast<int64_t>(stopped.tokens[0].size()) == first_stop + 1);
  CHECK(stopped.finish[0] == r1::FinishReason::Stop);

  CHECK(r1::generate(m, prompts, {.max_new_tokens = 0}).generated_tokens == 0);
  REQUIRE_R1_ERROR(r1::generate(m, {{}}, gen), "prompt 0 is empty");
  REQUIRE_R1_ERROR(r1::generate(m, {{1}}, {.max_new_tokens = 64}), "would pass max_position_embeddings 64");
  REQUIRE_R1_ERROR(r1::generate(m, {{1}}, {.max_new_tokens = 4, .stop_tokens = {37}}), "stop token 37 is outside the vocabulary [0, 37)");
}

// ---------------------------------------------------------------------------------------
// HF model directories

namespace {

std::filesystem::path fresh_dir(const std::string& name) {
  const auto dir = std::filesystem::temp_directory_path() / ("r1_test_model_" + name + "_" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  return dir;
}

double max_relative_diff(const r1::Model<float>& a, const r1::Model<float>& b) {
  std::vector<const Tensor<float>*> tb;
  const_cast<r1::Model<float>&>(b).visit([&](const std::string&, Tensor<float>& t) { tb.push_back(&t); });
  std::size_t i = 0;
  double worst = 0.0;
  const_cast<r1::Model<float>&>(a).visit([&](const std::string&, Tensor<float>& t) {
    const Tensor<float>& u = *tb[i++];
    REQUIRE(t.shape() == u.shape());
    const double scale = t.vector().cwiseAbs().maxCoeff();
    worst = std::max(worst, (t.vector() - u.vector()).cwiseAbs().maxCoeff() / std::max(scale, 1e-30));
  });
  return worst;
}

}  // namespace

TEST_CASE("save_pretrained and load_pretrained round-trip F32, BF16, FP8 and shards", "[model][checkpoint]") {
  const auto config = r1::ModelConfig::from_json(tiny_v3_json());
  const auto m = random_model<float>(config, 8);
  const auto dir = fresh_dir("roundtrip");

  r1::save_pretrained(m, dir);
  auto f32 = r1::load_pretrained<float>(dir);
  CHECK(max_relative_diff(m, f32) == 0.0);
  CHECK(f32.layers[2].moe.e_score_correction_bias.vector() == m.layers[2].moe.e_score_correction_bias.vector());
  const auto checkpoint = r1::Checkpoint::open(dir);
  // The released layout: MTP layer 3 keeps copies of the embedding and head.
  CHECK(checkpoint.contains("model.layers.3.embed_tokens.weight"));
  CHECK(checkpoint.contains("model.layers.3.shared_head.head.weight"));

  r1::save_pretrained(m, dir / "bf16", r1::WeightFormat::BF16);
  CHECK(max_relative_diff(m, r1::load_pretrained<float>(dir / "bf16")) < 1.0 / 128);
  CHECK(r1::Checkpoint::open(dir / "bf16").info("model.norm.weight").dtype == r1::Dtype::BF16);

  r1::save_pretrained(m, dir / "fp8", r1::WeightFormat::Fp8Bf16);
  const auto fp8_checkpoint = r1::Checkpoint::open(dir / "fp8");
  CHECK(fp8_checkpoint.info("model.layers.1.mlp.experts.0.gate_proj.weight").dtype == r1::Dtype::F8_E4M3);
  CHECK(fp8_checkpoint.contains("model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv"));
  CHECK(fp8_checkpoint.info("model.layers.0.self_attn.kv_a_proj_with_mqa.weight").dtype == r1::Dtype::F8_E4M3);
  CHECK(fp8_checkpoint.info("model.layers.1.mlp.gate.weight").dtype == r1::Dtype::BF16);
  CHECK(fp8_checkpoint.info("model.layers.1.mlp.gate.e_score_correction_bias").dtype == r1::Dtype::F32);
  CHECK(r1::ModelConfig::from_file(dir / "fp8" / "config.json").fp8_weights);
  CHECK(max_relative_diff(m, r1::load_pretrained<float>(dir / "fp8")) < 1.0 / 8);

  r1::save_pretrained(m, dir / "sharded", r1::WeightFormat::F32, 20000);
  CHECK(std::filesystem::exists(dir / "sharded" / "model.safetensors.index.json"));
  CHECK(max_relative_diff(m, r1::load_pretrained<float>(dir / "sharded")) == 0.0);

  // Without MTP: the model has none and the checkpoint's MTP layer is accepted unused.
  const auto no_mtp = r1::load_pretrained<float>(dir, {.mtp = false});
  CHECK(no_mtp.mtp.empty());
  CHECK(no_mtp.config.num_nextn_predict_layers == 0);
  std::filesystem::remove_all(dir);
}

TEST_CASE("load_pretrained names the tensor that is missing, unexpected or misshapen", "[model][checkpoint]") {
  const auto config = r1::ModelConfig::from_json(tiny_v3_json());
  const auto m = random_model<float>(config, 9);
  const auto dir = fresh_dir("broken");
  r1::save_pretrained(m, dir);
  // config.json says 4 layers: the MTP module moves to layer 4, which the file lacks.
  auto j = config.to_json();
  j["num_hidden_layers"] = 4;
  std::ofstream(dir / "config.json") << j.dump();
  REQUIRE_R1_ERROR(r1::load_pretrained<float>(dir), "no tensor 'model.layers.4.enorm.weight'");
  // A wider model: shapes differ.
  j = config.to_json();
  j["intermediate_size"] = 32;
  std::ofstream(dir / "config.json") << j.dump();
  REQUIRE_R1_ERROR(r1::load_pretrained<float>(dir), "tensor 'model.layers.0.mlp.gate_proj.weight'");
  // No MTP in the config: the MTP layer's tensors are unexpected.
  j = config.to_json();
  j["num_nextn_predict_layers"] = 0;
  std::ofstream(dir / "config.json") << j.dump();
  REQUIRE_R1_ERROR(r1::load_pretrained<float>(dir), "44 unexpected (first: 'model.layers.3.eh_proj.weight')");
  REQUIRE_R1_ERROR(r1::load_pretrained<float>(dir / "nothing"), "cannot open");
  std::filesystem::remove_all(dir);
}

// ---------------------------------------------------------------------------------------
// Conformance: golden logits from tests/fixtures/gen_model_fixtures.py, an independent
// float64 PyTorch reference of the DeepSeek-V3 equations (YaRN, q and kv LoRA, a dense
// layer then sigmoid group-limited MoE layers with a routing bias and shared experts, and
// an MTP layer in the checkpoint), for tiny_f32 (F32) and tiny_fp8 (the released layout:
// FP8 E4M3 decoder-layer linears with 128x128 block scales, BF16 elsewhere).
// Error measure: max |r1 - reference| over the compared logits, divided by max |reference|
// over all of that checkpoint's reference logits; it must stay under 1e-4.
namespace {

struct GoldenLogits {
  Tensor<int32_t> ids;
  std::map<std::string, Tensor<double>> logits;
};

const GoldenLogits& golden_logits() {
  static const GoldenLogits golden = [] {
    std::ifstream in(R1_FIXTURE_DIR "/model/expected.json");
    if (!in) throw std::runtime_error("cannot open " R1_FIXTURE_DIR "/model/expected.json");
    const nlohmann::json j = nlohmann::json::parse(in);
    GoldenLogits g;
    const auto& ids = j.at("ids");
    g.ids = Tensor<int32_t>(Shape{static_cast<int64_t>(ids.size()), static_cast<int64_t>(ids.at(0).size())});
    for (int64_t b = 0; b < g.ids.size(0); ++b)
      for (int64_t s = 0; s < g.ids.size(1); ++s) g.ids(b, s) = ids.at(b).at(s).get<int32_t>();
    for (const auto& [name, t] : j.at("logits").items()) g.logits[name] = r1test::tensor<double>(j.at("logits"), name);
    return g;
  }();
  return golden;
}

}  // namespace

TEST_CASE("model logits match the float64 DeepSeek-V3 reference (F32 and FP8 checkpoints)", "[model][checkpoint][conformance]") {
  const GoldenLogits& golden = golden_logits();
  const Tensor<int32_t>& ids = golden.ids;
  const int64_t B = ids.size(0), S = ids.size(1);
  REQUIRE(B == 2);
  for (const std::string name : {"tiny_f32", "tiny_fp8"}) {
    INFO(name);
    const std::filesystem::path dir = std::filesystem::path(R1_FIXTURE_DIR) / "model" / name;
    const auto m = r1::load_pretrained<float>(dir);
    CHECK(m.mtp.size() == 1);
    CHECK(m.config.fp8_weights == (name == "tiny_fp8"));
    if (name == "tiny_fp8") {  // the dense MLP's 136 x 32 weight spans two 128-row blocks
      const auto checkpoint = r1::Checkpoint::open(dir);
      CHECK(checkpoint.info("model.layers.0.mlp.gate_proj.weight").dtype == r1::Dtype::F8_E4M3);
      CHECK(checkpoint.info("model.layers.0.mlp.gate_proj.weight_scale_inv").shape == std::vector<int64_t>{2, 1});
      CHECK(checkpoint.info("model.layers.1.mlp.gate.weight").dtype == r1::Dtype::BF16);
    }
    const Tensor<double>& ref = golden.logits.at(name);
    const int64_t V = m.config.vocab_size;
    REQUIRE(ref.shape() == Shape{B, S, V});
    double scale = 0.0;
    for (int64_t i = 0; i < ref.numel(); ++i) scale = std::max(scale, std::abs(ref.data()[i]));
    // max |logits[b, 0..T) - ref[rows[b], from[b] .. from[b]+T)| / scale
    const auto error = [&](const Tensor<float>& logits, const std::vector<int64_t>& rows, const std::vector<int64_t>& from) {
      REQUIRE(logits.size(0) == static_cast<int64_t>(rows.size()));
      REQUIRE(logits.size(2) == V);
      double worst = 0.0;
      for (std::size_t b = 0; b < rows.size(); ++b)
        for (int64_t t = 0; t < logits.size(1); ++t)
          for (int64_t v = 0; v < V; ++v)
            worst = std::max(worst, std::abs(static_cast<double>(logits(static_cast<int64_t>(b), t, v)) -
                                             ref(rows[b], from[b] + t, v)));
      return worst / scale;
    };

    // (a) The training path.
    r1::ModelCache<float> train;
    const auto& logits = r1::forward(m, ids, train);
    REQUIRE(logits.shape() == ref.shape());
    const double training_error = error(logits, {0, 1}, {0, 0});
    CHECK(training_error < 1e-4);

    // (b) Cached inference over the absorbed latent cache, in blocks of 4 tokens: both
    // prompts in one prefill; then prefills of different lengths (4 and 7 tokens) and
    // token-by-token decode, the two sequences batched while both have tokens left.
    r1::InferenceCache<float> cache(m, 8, 4);
    const std::vector<int64_t> both{cache.add_sequence(), cache.add_sequence()};
    double cached_error = error(r1::forward_cached(m, ids, both, cache), {0, 1}, {0, 0});
    cache.reset();
    const std::vector<int64_t> seq{cache.add_sequence(), cache.add_sequence()};
    std::vector<int64_t> length{4, 7};
    for (int64_t b = 0; b < B; ++b)
      cached_error = std::max(cached_error, error(r1::forward_cached(m, ids.view().slice(0, b, b + 1).slice(1, 0, length[b]),
                                                                     {seq[b]}, cache),
                                                  {b}, {0}));
    int64_t decoded = 0;
    while (length[0] < S || length[1] < S) {
      std::vector<int64_t> rows, seqs, from;
      for (int64_t b = 0; b < B; ++b)
        if (length[b] < S) {
          rows.push_back(b);
          seqs.push_back(seq[b]);
          from.push_back(length[b]);
        }
      Tensor<int32_t> step(Shape{static_cast<int64_t>(rows.size()), 1});
      for (std::size_t i = 0; i < rows.size(); ++i) step(static_cast<int64_t>(i), 0) = ids(rows[i], from[i]);
      const auto& last = r1::forward_cached(m, step, seqs, cache, r1::Logits::Last);
      REQUIRE(last.shape() == Shape{static_cast<int64_t>(rows.size()), 1, V});
      cached_error = std::max(cached_error, error(last, rows, from));
      for (const int64_t b : rows) ++length[b];
      decoded += static_cast<int64_t>(rows.size());
    }
    CHECK(decoded == 2 * S - 4 - 7);
    CHECK(cache.length(seq[0]) == S);
    CHECK(cache.length(seq[1]) == S);
    CHECK(cached_error < 1e-4);
  }
}
