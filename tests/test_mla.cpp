// Tests for r1/mla.hpp: the training path against an independent PyTorch reference
// (tests/fixtures/gen_mla_fixtures.py) and finite differences, thread-count determinism,
// absorbed inference against the training path (prefill and token-by-token decode), the
// paged latent KV cache, bad configs, shapes and cache states, and the simd lane kernels.
#include <r1/mla.hpp>
#include <r1/simd.hpp>

#include "support.hpp"

#include <map>
#include <vector>

using r1::Shape;
using r1::Tensor;
using r1test::check_gradient;
using r1test::max_abs_diff;
using r1test::random_tensor;
using r1test::tensor;
using r1test::weighted_sum;

namespace {

const nlohmann::json& mla_fixture(const std::string& name) {
  static const nlohmann::json fixtures = [] {
    std::ifstream in(R1_FIXTURE_DIR "/torch_mla.json");
    if (!in) throw std::runtime_error("cannot open " R1_FIXTURE_DIR "/torch_mla.json");
    return nlohmann::json::parse(in);
  }();
  return fixtures.at(name);
}

r1::MlaConfig config_from(const nlohmann::json& c) {
  r1::MlaConfig cfg;
  cfg.dim = c.at("hidden_size").get<int64_t>();
  cfg.num_attention_heads = c.at("num_attention_heads").get<int64_t>();
  cfg.q_lora_rank = c.at("q_lora_rank").get<int64_t>();
  cfg.kv_lora_rank = c.at("kv_lora_rank").get<int64_t>();
  cfg.qk_nope_head_dim = c.at("qk_nope_head_dim").get<int64_t>();
  cfg.qk_rope_head_dim = c.at("qk_rope_head_dim").get<int64_t>();
  cfg.v_head_dim = c.at("v_head_dim").get<int64_t>();
  cfg.rms_norm_eps = c.at("rms_norm_eps").get<double>();
  cfg.rope.theta = c.at("rope_theta").get<double>();
  cfg.rope.style = c.at("convention").get<std::string>() == "interleaved" ? r1::RopeStyle::Interleaved : r1::RopeStyle::Half;
  if (c.contains("factor")) {
    cfg.rope.factor = c.at("factor").get<double>();
    cfg.rope.original_max_position_embeddings = c.at("original_max_position_embeddings").get<int64_t>();
    cfg.rope.beta_fast = c.at("beta_fast").get<double>();
    cfg.rope.beta_slow = c.at("beta_slow").get<double>();
    cfg.rope.mscale = c.at("mscale").get<double>();
    cfg.rope.mscale_all_dim = c.at("mscale_all_dim").get<double>();
  }
  return cfg;
}

// The fixtures' tensor for each HF name ("q_a_proj.weight" -> "q_a_proj").
template <class T>
void load_params(r1::Mla<T>& p, const nlohmann::json& c, const std::string& prefix = "") {
  p.visit([&](const std::string& name, Tensor<T>& t) {
    const std::string key = prefix + name.substr(0, name.find('.'));
    const auto loaded = tensor(c, key);
    REQUIRE(loaded.shape() == t.shape());
    for (int64_t i = 0; i < t.numel(); ++i) t.data()[i] = static_cast<T>(loaded.data()[i]);
  });
}

// A config from its dims, in the order of the legend in mla.hpp: D, H, Q, C, N, R, V.
r1::MlaConfig mla_shape(int64_t dim, int64_t heads, int64_t q_lora, int64_t kv_lora, int64_t nope, int64_t rope, int64_t v,
                        int64_t max_positions = 4096) {
  r1::MlaConfig cfg;
  cfg.dim = dim;
  cfg.num_attention_heads = heads;
  cfg.q_lora_rank = q_lora;
  cfg.kv_lora_rank = kv_lora;
  cfg.qk_nope_head_dim = nope;
  cfg.qk_rope_head_dim = rope;
  cfg.v_head_dim = v;
  cfg.max_position_embeddings = max_positions;
  return cfg;
}

r1::MlaConfig small_config(int64_t q_lora) { return mla_shape(6, 2, q_lora, 4, 2, 2, 3, 64); }

template <class T>
r1::Mla<T> random_mla(const r1::MlaConfig& cfg, uint64_t seed) {
  r1::Mla<T> p(cfg);
  r1::Rng rng(seed);
  p.visit([&](const std::string& name, Tensor<T>& t) {
    if (name.find("layernorm") != std::string::npos) {
      r1::fill_normal(t.view(), rng, 1.0, 0.1);
    } else {
      r1::fill_normal(t.view(), rng, 0.0, 0.5);
    }
  });
  return p;
}

Tensor<int32_t> iota(int64_t n, int32_t start = 0) {
  Tensor<int32_t> t(Shape{n});
  for (int64_t i = 0; i < n; ++i) t.data()[i] = start + static_cast<int32_t>(i);
  return t;
}

template <class A, class B>
double rel_diff(const A& a, const B& b) {
  double scale = 0.0;
  for (int64_t i = 0; i < b.numel(); ++i) scale = std::max(scale, std::abs(static_cast<double>(b.data()[i])));
  return max_abs_diff(a, b) / std::max(scale, 1e-30);
}

constexpr double kFixtureTolerance = 1e-10;

}  // namespace

// --------------------------------------------------------------------------------------
TEST_CASE("mla matches PyTorch: q_lora, plain q_proj, rotate-half RoPE, YaRN", "[mla]") {
  for (const char* name : {"mla_q_lora", "mla_no_q_lora", "mla_half_rope", "mla_yarn"}) {
    INFO(name);
    const auto& c = mla_fixture(name);
    r1::Mla<double> p(config_from(c));
    REQUIRE(p.softmax_scale() == Approx(c.at("softmax_scale").get<double>()).epsilon(1e-14));
    load_params(p, c);
    const auto x = tensor(c, "x");
    const auto positions = tensor<int32_t>(c, "positions");
    r1::MlaCache<double> cache;
    REQUIRE(max_abs_diff(r1::forward(p, x, positions, cache), tensor(c, "y")) < kFixtureTolerance);
    auto grads = r1::zeros_like(p);
    REQUIRE(max_abs_diff(r1::backward(p, cache, tensor(c, "dy"), grads), tensor(c, "dx")) < kFixtureTolerance);
    int checked = 0;
    grads.visit([&](const std::string& pname, Tensor<double>& g) {
      INFO(pname);
      REQUIRE(max_abs_diff(g, tensor(c, "d" + pname.substr(0, pname.find('.')))) < kFixtureTolerance);
      ++checked;
    });
    REQUIRE(checked == (p.has_q_lora() ? 7 : 5));
  }
}

TEST_CASE("mla backward matches finite differences for x and every parameter; grads accumulate", "[mla]") {
  for (int64_t q_lora : {4, 0}) {
    INFO("q_lora_rank " << q_lora);
    auto cfg = small_config(q_lora);
    cfg.rope.factor = 4.0;  // YaRN, with a softmax scale m^2 != 1
    cfg.rope.original_max_position_embeddings = 8;
    cfg.rope.mscale_all_dim = 0.7;
    auto p = random_mla<double>(cfg, 30 + q_lora);
    auto x = random_tensor(Shape{2, 4, 6}, 31);
    Tensor<int32_t> positions(Shape{2, 4});  // per-sequence positions
    const int32_t pos[] = {0, 1, 2, 3, 5, 9, 17, 40};
    std::copy(pos, pos + 8, positions.data());
    const auto w = random_tensor(Shape{2, 4, 6}, 32);
    r1::MlaCache<double> cache;
    const auto loss = [&] { return weighted_sum(r1::forward(p, x, positions, cache), w); };
    loss();
    auto grads = r1::zeros_like(p);
    const Tensor<double> dx = r1::backward(p, cache, w, grads);
    check_gradient(x, dx, loss);
    std::map<std::string, Tensor<double>*> grad_of;
    grads.visit([&](const std::string& name, Tensor<double>& g) { grad_of[name] = &g; });
    p.visit([&](const std::string& name, Tensor<double>& t) {
      INFO(name);
      check_gradient(t, *grad_of.at(name), loss);
    });

    Tensor<double> twice = grads.kv_b.weight;
    twice.matrix() *= 2.0;
    loss();
    r1::backward(p, cache, w, grads);
    REQUIRE(max_abs_diff(grads.kv_b.weight, twice) < 1e-12);
  }
}

TEST_CASE("mla backward over several causal tiles matches finite differences", "[mla]") {
  auto cfg = small_config(4);
  cfg.max_position_embeddings = 256;
  auto p = random_mla<double>(cfg, 33);
  auto x = random_tensor(Shape{1, 150, 6}, 34);  // tiles of 64 query rows: 64 + 64 + 22
  const auto positions = iota(150);
  const auto w = random_tensor(Shape{1, 150, 6}, 35);
  r1::MlaCache<double> cache;
  const auto loss = [&] { return weighted_sum(r1::forward(p, x, positions, cache), w); };
  loss();
  auto grads = r1::zeros_like(p);
  const Tensor<double> dx = r1::backward(p, cache, w, grads);
  check_gradient(x, dx, loss);
  check_gradient(p.kv_b.weight, grads.kv_b.weight, loss);
  check_gradient(p.kv_a.weight, grads.kv_a.weight, loss);
  check_gradient(p.q_b.weight, grads.q_b.weight, loss);
}

TEST_CASE("mla visit uses the HF tensor names", "[mla]") {
  std::vector<std::string> names;
  r1::Mla<float> with_lora(small_config(4));
  with_lora.visit([&](const std::string& name, Tensor<float>&) { names.push_back(name); });
  REQUIRE(names == std::vector<std::string>{"q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight",
                                            "kv_a_proj_with_mqa.weight", "kv_a_layernorm.weight", "kv_b_proj.weight",
                                            "o_proj.weight"});
  names.clear();
  r1::Mla<float> plain(small_config(0));
  plain.visit([&](const std::string& name, Tensor<float>&) { names.push_back(name); });
  REQUIRE(names == std::vector<std::string>{"q_proj.weight", "kv_a_proj_with_mqa.weight", "kv_a_layernorm.weight",
                                            "kv_b_proj.weight", "o_proj.weight"});
  REQUIRE(plain.q.weight.shape() == Shape{2 * 4, 6});
  REQUIRE(plain.kv_a.weight.shape() == Shape{4 + 2, 6});
  REQUIRE(plain.kv_b.weight.shape() == Shape{2 * (2 + 3), 4});
  REQUIRE(plain.o.weight.shape() == Shape{6, 2 * 3});
}

TEST_CASE("mla gives bit-identical results on 1, 2 and 3 threads", "[mla][parallel]") {
  const r1::MlaConfig cfg = mla_shape(64, 4, 24, 16, 8, 4, 8);
  const auto p = random_mla<float>(cfg, 40);
  Tensor<float> x(Shape{3, 37, 64}), dy(Shape{3, 37, 64});
  r1::Rng rng(41);
  r1::fill_normal(x.view(), rng);
  r1::fill_normal(dy.view(), rng);
  const auto positions = iota(37);
  Tensor<float> y[3], dx[3], dq[3], dkv[3];
  for (int threads : {1, 2, 3}) {
    r1::set_num_threads(threads);
    r1::MlaCache<float> cache;
    auto grads = r1::zeros_like(p);
    y[threads - 1] = r1::forward(p, x, positions, cache);
    dx[threads - 1] = r1::backward(p, cache, dy, grads);
    dq[threads - 1] = grads.q_b.weight;
    dkv[threads - 1] = grads.kv_a.weight;
  }
  for (int t : {1, 2}) {
#if defined(R1_USE_OPENBLAS)
    REQUIRE(max_abs_diff(y[0], y[t]) < 1e-3);
#else
    REQUIRE(max_abs_diff(y[0], y[t]) == 0.0);
    REQUIRE(max_abs_diff(dx[0], dx[t]) == 0.0);
    REQUIRE(max_abs_diff(dq[0], dq[t]) == 0.0);
    REQUIRE(max_abs_diff(dkv[0], dkv[t]) == 0.0);
#endif
  }
  r1::set_num_threads(2);
}

TEST_CASE("mla rejects invalid configs, wrong shapes and a backward without forward", "[mla][errors]") {
  auto bad = small_config(4);
  bad.qk_rope_head_dim = 3;
  REQUIRE_R1_ERROR(r1::Mla<double>{bad}, "[mla] qk_rope_head_dim is 3, expected a positive even number");
  bad = small_config(-1);
  REQUIRE_R1_ERROR(r1::Mla<double>{bad}, "[mla] q_lora_rank is -1");
  bad = small_config(4);
  bad.kv_lora_rank = 0;
  REQUIRE_R1_ERROR(r1::Mla<double>{bad}, "[mla] kv_lora_rank 0, qk_nope_head_dim 2 and v_head_dim 3 must be positive");
  bad = small_config(4);
  bad.dim = 0;
  REQUIRE_R1_ERROR(r1::Mla<double>{bad}, "[mla] hidden_size 0 and num_attention_heads 2 must be positive");
  bad = small_config(4);
  bad.rms_norm_eps = 0.0;
  REQUIRE_R1_ERROR(r1::Mla<double>{bad}, "[mla] rms_norm_eps is 0");
  bad = small_config(4);
  bad.rope.factor = 4.0;
  bad.rope.beta_fast = 0.5;
  REQUIRE_R1_ERROR(r1::Mla<double>{bad}, "[rope] invalid YaRN config");

  r1::Mla<double> p(small_config(4));
  r1::MlaCache<double> cache;
  auto grads = r1::zeros_like(p);
  const auto positions = iota(3);
  REQUIRE_R1_ERROR(r1::backward(p, cache, Tensor<double>(Shape{1, 3, 6}), grads),
                   "[mla.backward] the cache holds no forward pass");
  REQUIRE_R1_ERROR(r1::forward(p, Tensor<double>(Shape{1, 3, 5}), positions, cache),
                   "[mla.forward] x has shape [1, 3, 5], expected [B, S, 6]");
  REQUIRE_R1_ERROR(r1::forward(p, Tensor<double>(Shape{3, 6}), positions, cache), "[mla.forward] x has shape [3, 6]");
  REQUIRE_R1_ERROR(r1::forward(p, Tensor<double>(Shape{2, 4, 6}), positions, cache),
                   "[mla.forward] positions have shape [3], expected [4] or [2, 4]");
  Tensor<int32_t> far = iota(3, 62);
  REQUIRE_R1_ERROR(r1::forward(p, Tensor<double>(Shape{1, 3, 6}), far, cache),
                   "[mla.forward] position 64 at index 2 is outside [0, max_position_embeddings 64)");
  REQUIRE_R1_ERROR(r1::forward(r1::Mla<double>{}, Tensor<double>(Shape{1, 3, 6}), positions, cache),
                   "[mla.forward] the Mla was default-constructed");
  r1::Mla<double> broken = p;
  broken.kv_b = r1::Linear<double>(4, 9);
  REQUIRE_R1_ERROR(r1::forward(broken, Tensor<double>(Shape{1, 3, 6}), positions, cache),
                   "[mla.forward] kv_b_proj.weight has shape [9, 4], expected [10, 4]");
  r1::forward(p, Tensor<double>(Shape{1, 3, 6}), positions, cache);
  REQUIRE_R1_ERROR(r1::backward(p, cache, Tensor<double>(Shape{1, 2, 6}), grads),
                   "[mla.backward] dy has shape [1, 2, 6], expected [1, 3, 6]");
  // An empty batch works, as for the other layers.
  REQUIRE(r1::forward(p, Tensor<double>(Shape{0, 3, 6}), positions, cache).shape() == Shape{0, 3, 6});
  REQUIRE(r1::backward(p, cache, Tensor<double>(Shape{0, 3, 6}), grads).shape() == Shape{0, 3, 6});
  r1::forward(p, Tensor<double>(Shape{1, 3, 6}), positions, cache);
  auto plain_grads = r1::zeros_like(r1::Mla<double>(small_config(0)));
  REQUIRE_R1_ERROR(r1::backward(p, cache, Tensor<double>(Shape{1, 3, 6}), plain_grads),
                   "[mla.backward] grads and params differ in q_lora_rank");
}

// --------------------------------------------------------------------------------------
// Absorbed inference against the training path.
template <class T>
void check_absorbed_against_training(int64_t q_lora, int64_t block_size) {
  INFO("q_lora_rank " << q_lora << ", block_size " << block_size << ", " << (sizeof(T) == 4 ? "float" : "double"));
  r1::MlaConfig cfg = mla_shape(32, 4, q_lora, 16, 8, 4, 6, 256);
  cfg.rope.factor = 2.0;
  cfg.rope.original_max_position_embeddings = 16;
  cfg.rope.mscale_all_dim = 1.0;
  const auto p = random_mla<T>(cfg, 50 + q_lora);
  const int64_t lengths[] = {11, 6, 150};  // three sequences of different lengths (150: several causal tiles)
  const int64_t prompt[] = {5, 1, 70};
  std::vector<Tensor<T>> xs, ys;
  for (int s = 0; s < 3; ++s) {
    Tensor<T> x(Shape{1, lengths[s], cfg.dim});
    r1::Rng rng(60 + s);
    r1::fill_normal(x.view(), rng);
    r1::MlaCache<T> cache;
    ys.push_back(r1::forward(p, x, iota(lengths[s]), cache));
    xs.push_back(std::move(x));
  }
  r1::MlaKvCache<T> kv(cfg, /*num_blocks=*/64, block_size);
  r1::MlaDecodeCache<T> ws;
  std::vector<int64_t> ids;
  for (int s = 0; s < 3; ++s) ids.push_back(kv.add_sequence());
  // Prefill each sequence on its own, then decode all still-running ones token by token.
  for (int s = 0; s < 3; ++s) {
    const auto xp = r1::to_tensor(xs[s].view().slice(1, 0, prompt[s]));
    const auto& y = r1::forward_absorbed(p, xp, {ids[s]}, kv, ws);
    REQUIRE(rel_diff(y, r1::to_tensor(ys[s].view().slice(1, 0, prompt[s]))) < 1e-5);
  }
  for (int64_t step = 0;; ++step) {
    std::vector<int64_t> batch;
    for (int s = 0; s < 3; ++s)
      if (kv.length(ids[s]) < lengths[s]) batch.push_back(s);
    if (batch.empty()) break;
    Tensor<T> x(Shape{static_cast<int64_t>(batch.size()), 1, cfg.dim});
    std::vector<int64_t> seqs;
    for (std::size_t b = 0; b < batch.size(); ++b) {
      const int s = static_cast<int>(batch[b]);
      const int64_t t = kv.length(ids[s]);
      x.view().select(static_cast<int64_t>(b)).matrix() = xs[s].view().select(0).slice(0, t, t + 1).matrix();
      seqs.push_back(ids[s]);
    }
    const Tensor<T> y = r1::forward_absorbed(p, x, seqs, kv, ws);
    for (std::size_t b = 0; b < batch.size(); ++b) {
      const int s = static_cast<int>(batch[b]);
      const int64_t t = kv.length(ids[s]) - 1;
      INFO("sequence " << s << " token " << t);
      REQUIRE(rel_diff(r1::to_tensor(y.view().slice(0, b, b + 1)), r1::to_tensor(ys[s].view().slice(1, t, t + 1))) < 1e-5);
    }
  }
  REQUIRE(kv.tokens_in_use() == 11 + 6 + 150);
  // Roll sequence 0 back by 4 tokens and decode them again as one chunk of 4.
  kv.truncate(ids[0], 7);
  REQUIRE(kv.length(ids[0]) == 7);
  const auto& again = r1::forward_absorbed(p, r1::to_tensor(xs[0].view().slice(1, 7, 11)), {ids[0]}, kv, ws);
  REQUIRE(rel_diff(again, r1::to_tensor(ys[0].view().slice(1, 7, 11))) < 1e-5);
  // Two sequences with two new tokens each in one call (batched speculative decoding): the
  // absorption products then run down the batch, once per (head, new token).
  kv.truncate(ids[1], 4);
  kv.truncate(ids[2], 148);
  Tensor<T> pair(Shape{2, 2, cfg.dim});
  pair.view().select(0).matrix() = xs[1].view().select(0).slice(0, 4, 6).matrix();
  pair.view().select(1).matrix() = xs[2].view().select(0).slice(0, 148, 150).matrix();
  const Tensor<T> both = r1::forward_absorbed(p, pair, {ids[1], ids[2]}, kv, ws);
  REQUIRE(rel_diff(r1::to_tensor(both.view().slice(0, 0, 1)), r1::to_tensor(ys[1].view().slice(1, 4, 6))) < 1e-5);
  REQUIRE(rel_diff(r1::to_tensor(both.view().slice(0, 1, 2)), r1::to_tensor(ys[2].view().slice(1, 148, 150))) < 1e-5);
}

TEST_CASE("absorbed MLA agrees with the training path: prefill and token-by-token decode", "[mla][absorbed]") {
  for (int64_t q_lora : {8, 0}) {
    for (int64_t block : {64, 4, 3}) {
      check_absorbed_against_training<float>(q_lora, block);
      check_absorbed_against_training<double>(q_lora, block);
    }
  }
}

TEST_CASE("latent KV cache: paging, truncate, reset, bytes, full pool and position limit", "[mla][cache]") {
  r1::MlaConfig cfg = small_config(0);
  cfg.max_position_embeddings = 10;
  r1::MlaKvCache<float> kv(cfg, /*num_blocks=*/3, /*block_size=*/4);
  REQUIRE(kv.bytes_per_token() == (4 + 2) * 4);
  const int64_t a = kv.add_sequence(), b = kv.add_sequence();
  Tensor<float> lat(Shape{6, 4}), pe(Shape{6, 2});
  for (int64_t i = 0; i < 24; ++i) lat.data()[i] = static_cast<float>(i);
  for (int64_t i = 0; i < 12; ++i) pe.data()[i] = static_cast<float>(100 + i);
  kv.append(a, lat.view().slice(0, 0, 5), pe.view().slice(0, 0, 5));
  REQUIRE(kv.length(a) == 5);
  REQUIRE(kv.block_table(a).size() == 2);
  REQUIRE(kv.free_blocks() == 1);
  REQUIRE(kv.bytes_in_use() == 2 * 4 * 24);
  // Token 4 is the first of block 1: [latent | k_pe].
  const auto blk = kv.block(a, 1);
  REQUIRE(blk.shape() == Shape{1, 6});
  REQUIRE(blk(0, 0) == 16.0f);
  REQUIRE(blk(0, 4) == 108.0f);
  kv.append(b, lat.view().slice(0, 0, 3), pe.view().slice(0, 0, 3));
  REQUIRE(kv.free_blocks() == 0);
  // Full pool: a fourth block is refused and nothing changes.
  REQUIRE_R1_ERROR(kv.append(b, lat.view().slice(0, 0, 2), pe.view().slice(0, 0, 2)),
                   "[mla_kv_cache.append] the pool is full: sequence 1 needs 1 more blocks of 4 tokens, 0 of 3 are free");
  REQUIRE(kv.length(b) == 3);
  kv.append(b, lat.view().slice(0, 0, 1), pe.view().slice(0, 0, 1));  // fills block 0 of b: no new block
  REQUIRE(kv.length(b) == 4);
  // Rollback frees whole blocks, which another sequence can then use.
  kv.truncate(a, 3);
  REQUIRE(kv.free_blocks() == 1);
  REQUIRE(kv.tokens_in_use() == 7);
  REQUIRE(kv.block(a, 0)(2, 0) == 8.0f);
  kv.append(b, lat.view().slice(0, 0, 4), pe.view().slice(0, 0, 4));
  REQUIRE(kv.length(b) == 8);
  REQUIRE_R1_ERROR(kv.truncate(a, 4), "[mla_kv_cache.truncate] length 4 is outside [0, 3] for sequence 0");
  // Position limit: max_position_embeddings 10.
  REQUIRE_R1_ERROR(kv.append(b, lat.view().slice(0, 0, 3), pe.view().slice(0, 0, 3)),
                   "[mla_kv_cache.append] sequence 1 would reach position 10, past max_position_embeddings 10");
  REQUIRE(kv.length(b) == 8);
  REQUIRE_R1_ERROR(kv.append(b, lat.view().slice(0, 0, 1), pe.view().slice(0, 0, 2)),
                   "[mla_kv_cache.append] k_pe has shape [2, 2], expected [1, 2]");
  REQUIRE_R1_ERROR(kv.append(b, pe.view().slice(0, 0, 1), pe.view().slice(0, 0, 1)),
                   "[mla_kv_cache.append] latent has shape [1, 2], expected [n, 4]");
  REQUIRE_R1_ERROR(kv.length(5), "[mla_kv_cache.length] sequence 5 does not exist (2 sequences)");
  kv.reset(b);
  REQUIRE(kv.length(b) == 0);
  REQUIRE(kv.free_blocks() == 2);
  kv.reset();
  REQUIRE(kv.num_sequences() == 0);
  REQUIRE(kv.free_blocks() == 3);
  REQUIRE(kv.bytes_in_use() == 0);
  REQUIRE_R1_ERROR(r1::MlaKvCache<float>(cfg, 0), "[mla_kv_cache] num_blocks 0 and block_size 64 must be positive");

  // DeepSeek-V3 in bf16: (512 + 64) * 2 bytes per layer, 70,272 over 61 layers.
  r1::MlaConfig v3 = small_config(1536);
  v3.kv_lora_rank = 512;
  v3.qk_rope_head_dim = 64;
  REQUIRE(r1::MlaKvCache<r1::bf16>(v3, 1).bytes_per_token() * 61 == 70272);
}

TEST_CASE("absorbed MLA: a full pool or a position past the limit throws before writing", "[mla][absorbed][errors]") {
  auto cfg = small_config(4);
  cfg.max_position_embeddings = 6;
  const auto p = random_mla<double>(cfg, 70);
  r1::MlaKvCache<double> kv(cfg, /*num_blocks=*/2, /*block_size=*/2);
  r1::MlaDecodeCache<double> ws;
  const int64_t a = kv.add_sequence(), b = kv.add_sequence();
  const auto x3 = random_tensor(Shape{1, 3, 6}, 71);
  r1::forward_absorbed(p, x3, {a}, kv, ws);
  REQUIRE(kv.free_blocks() == 0);
  // Sequence a has room for one more token in its block, b has none: the batch is refused whole.
  const auto x2 = random_tensor(Shape{2, 1, 6}, 72);
  REQUIRE_R1_ERROR(r1::forward_absorbed(p, x2, {a, b}, kv, ws), "[mla_kv_cache.append] the pool is full: sequence 1");
  REQUIRE(kv.length(a) == 3);
  REQUIRE(kv.length(b) == 0);
  REQUIRE_R1_ERROR(r1::forward_absorbed(p, x2, {a, a}, kv, ws), "[mla.forward_absorbed] sequence 0 appears twice");
  REQUIRE_R1_ERROR(r1::forward_absorbed(p, x2, {a}, kv, ws), "[mla.forward_absorbed] 1 sequence ids for a batch of 2");
  kv.reset(a);
  const auto x7 = random_tensor(Shape{1, 7, 6}, 73);
  REQUIRE_R1_ERROR(r1::forward_absorbed(p, x7, {a}, kv, ws),
                   "[mla_kv_cache.append] sequence 0 would reach position 6, past max_position_embeddings 6");
  REQUIRE_R1_ERROR(r1::forward_absorbed(p, Tensor<double>(Shape{1, 1, 5}), {a}, kv, ws),
                   "[mla.forward_absorbed] x has shape [1, 1, 5]");
  r1::MlaKvCache<double> other(small_config(0), 2);  // rows of 4 + 2 as well: accepted
  auto wide = small_config(4);
  wide.kv_lora_rank = 5;
  r1::MlaKvCache<double> mismatched(wide, 2);
  REQUIRE_R1_ERROR(r1::forward_absorbed(p, x3, {0}, mismatched, ws), "[mla.forward_absorbed] the cache holds rows of 5 + 2");
}

TEST_CASE("absorbed MLA gives bit-identical results on 1, 2 and 3 threads", "[mla][absorbed][parallel]") {
  const r1::MlaConfig cfg = mla_shape(64, 4, 0, 32, 8, 8, 8);
  const auto p = random_mla<float>(cfg, 80);
  Tensor<float> prompt(Shape{2, 300, 64}), step(Shape{2, 1, 64});
  r1::Rng rng(81);
  r1::fill_normal(prompt.view(), rng);
  r1::fill_normal(step.view(), rng);
  Tensor<float> y[3];
  for (int threads : {1, 2, 3}) {
    r1::set_num_threads(threads);
    r1::MlaKvCache<float> kv(cfg, 16, 32);
    r1::MlaDecodeCache<float> ws;
    const int64_t a = kv.add_sequence(), b = kv.add_sequence();
    r1::forward_absorbed(p, r1::to_tensor(prompt.view().slice(0, 0, 1)), {a}, kv, ws);
    r1::forward_absorbed(p, r1::to_tensor(prompt.view().slice(0, 1, 2).slice(1, 0, 170)), {b}, kv, ws);
    y[threads - 1] = r1::forward_absorbed(p, step, {b, a}, kv, ws);
  }
  REQUIRE(max_abs_diff(y[0], y[1]) == 0.0);
  REQUIRE(max_abs_diff(y[0], y[2]) == 0.0);
  r1::set_num_threads(2);
}

TEST_CASE("simd lane kernels match a float64 reference, tails included", "[mla][simd]") {
  // r1/simd.hpp's products behind the float absorbed path: 16 rows of A in register lanes.
  r1::Rng rng(90);
  for (int64_t rows : {1, 7, 16}) {
    for (int64_t n : {1, 5, 12, 13, 37}) {
      for (int64_t K : {1, 17, 40}) {
        const int64_t ld = K + 3;  // B rows with padding, as cache blocks have (C + R columns, C used)
        Tensor<float> a(Shape{rows, K}), b(Shape{n, ld}), pt(Shape{n, 16});
        r1::fill_normal(a.view(), rng);
        r1::fill_normal(b.view(), rng);
        r1::fill_normal(pt.view(), rng);
        std::vector<float> panel(static_cast<std::size_t>(K * 16), -1.0f), st(static_cast<std::size_t>(n * 16));
        r1::simd::pack_lanes(a.data(), rows, K, K, panel.data());
        r1::simd::lanes_abt(panel.data(), b.data(), n, K, ld, st.data());
        double worst = 0;
        for (int64_t t = 0; t < n; ++t)
          for (int64_t l = 0; l < 16; ++l) {
            double expected = 0;
            for (int64_t k = 0; k < K && l < rows; ++k) expected += double(b.data()[t * ld + k]) * a.data()[l * K + k];
            worst = std::max(worst, std::abs(expected - st[static_cast<std::size_t>(t * 16 + l)]));
          }
        REQUIRE(worst < 1e-5 * K);
        // Ot = B^T P^T, written, then accumulated once more.
        std::vector<float> ot(static_cast<std::size_t>(K * 16));
        r1::simd::lanes_atb(pt.data(), b.data(), n, K, ld, ot.data(), /*accumulate=*/false);
        r1::simd::lanes_atb(pt.data(), b.data(), n, K, ld, ot.data(), /*accumulate=*/true);
        worst = 0;
        for (int64_t k = 0; k < K; ++k)
          for (int64_t l = 0; l < 16; ++l) {
            double expected = 0;
            for (int64_t t = 0; t < n; ++t) expected += double(b.data()[t * ld + k]) * pt.data()[t * 16 + l];
            worst = std::max(worst, std::abs(2 * expected - ot[static_cast<std::size_t>(k * 16 + l)]));
          }
        REQUIRE(worst < 2e-5 * n);
      }
    }
  }
}
