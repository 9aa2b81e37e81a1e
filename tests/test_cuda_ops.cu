// Tests for r1/cuda/{rope,loss,grpo,generate}.cuh (need a GPU): every kernel against its CPU
// path on seeded random inputs, with odd sizes that exercise the tails, and the errors.
#include <r1/cuda/generate.cuh>
#include <r1/cuda/grpo.cuh>
#include <r1/cuda/loss.cuh>
#include <r1/cuda/rope.cuh>

#include "cuda_support.hpp"
#include "support.hpp"

#include <cmath>
#include <limits>
#include <vector>

using r1::Cpu;
using r1::Cuda;
using r1::Shape;
using r1::Tensor;
using r1test::to_device;
using r1test::to_host;

namespace {

template <class T>
Tensor<T> random(Shape shape, uint64_t seed, double std = 1.0, double mean = 0.0) {
  Tensor<T> t(shape);
  r1::Rng rng(seed);
  r1::fill_normal(t.view(), rng, mean, std);
  return t;
}

// max |a - b| / max(1, |b|)
template <class A, class B>
double max_rel_diff(const A& a, const B& b) {
  REQUIRE(a.shape() == b.shape());
  double worst = 0.0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    const double x = static_cast<double>(a.data()[i]), y = static_cast<double>(b.data()[i]);
    worst = std::max(worst, std::abs(x - y) / std::max(1.0, std::abs(y)));
  }
  return worst;
}

template <class T>
constexpr double tolerance() {
  return std::is_same_v<T, double> ? 1e-12 : 2e-6;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// RoPE

namespace {

r1::RopeConfig yarn_config(r1::RopeStyle style, double mscale, double mscale_all_dim) {
  r1::RopeConfig c;
  c.dim = 64;
  c.style = style;
  c.factor = 40.0;
  c.original_max_position_embeddings = 4096;
  c.beta_fast = 32.0;
  c.beta_slow = 1.0;
  c.mscale = mscale;
  c.mscale_all_dim = mscale_all_dim;
  return c;
}

Tensor<int32_t> random_positions(int64_t n, uint64_t seed, int32_t max_position) {
  Tensor<int32_t> p(Shape{n});
  r1::Rng rng(seed);
  for (int64_t i = 0; i < n; ++i) p.data()[i] = static_cast<int32_t>(rng.next_u64() % static_cast<uint64_t>(max_position));
  return p;
}

// Forward and backward of x [..., width] sliced to its last `d` columns (width > d: a
// strided view, as MLA's q_pe), on both devices, out of place and in place.
template <class T>
void check_rope(const r1::RopeConfig& config, Shape shape, int64_t width, uint64_t seed) {
  const r1::Rope rope(config);
  const int last = shape.rank - 1;
  const int64_t d = shape[last], offset = width - d;
  Shape wide = shape;
  wide.dims[last] = width;
  const int64_t tokens = shape.rank == 2 ? shape[0] : shape.numel() / (shape[last] * shape[last - 1]);
  const Tensor<int32_t> positions = random_positions(tokens, seed, 200000);
  const Tensor<int32_t, Cuda> positions_d = to_device(positions);
  const Tensor<T> x = random<T>(wide, seed + 1);
  const Tensor<T, Cuda> x_d = to_device(x);

  for (const double direction : {+1.0, -1.0}) {
    INFO("style " << static_cast<int>(config.style) << ", factor " << config.factor << ", shape " << shape.str()
                  << ", width " << width << ", direction " << direction);
    Tensor<T> y = x;  // out of place: y's other columns keep x's values on both devices
    Tensor<T, Cuda> y_d = x_d;
    const auto x_rope = x.view().slice(last, offset, width);
    const auto x_rope_d = x_d.view().slice(last, offset, width);
    if (direction > 0) {
      r1::forward(rope, x_rope, positions.view(), y.view().slice(last, offset, width));
      r1::forward(rope, x_rope_d, positions_d.view(), y_d.view().slice(last, offset, width));
    } else {
      r1::backward(rope, positions.view(), x_rope, y.view().slice(last, offset, width));
      r1::backward(rope, positions_d.view(), x_rope_d, y_d.view().slice(last, offset, width));
    }
    CHECK(max_rel_diff(to_host(y_d), y) <= tolerance<T>());

    Tensor<T, Cuda> in_place = x_d;  // y aliasing x
    const auto rope_cols = in_place.view().slice(last, offset, width);
    if (direction > 0) {
      r1::forward(rope, rope_cols, positions_d.view(), rope_cols);
    } else {
      r1::backward(rope, positions_d.view(), rope_cols, rope_cols);
    }
    CHECK(max_rel_diff(to_host(in_place), y) <= tolerance<T>());
  }
}

}  // namespace

TEST_CASE("cuda rope: forward and backward match the CPU for both pairings, YaRN and strided views",
          "[cuda][rope]") {
  for (const auto style : {r1::RopeStyle::Interleaved, r1::RopeStyle::Half}) {
    r1::RopeConfig plain;
    plain.dim = 16;
    plain.style = style;
    check_rope<float>(plain, Shape{37, 16}, 16, 1);
    check_rope<float>(plain, Shape{5, 3, 16}, 16, 2);
    check_rope<double>(plain, Shape{2, 7, 3, 16}, 16, 3);
    for (const auto& yarn : {yarn_config(style, 1.0, 1.0), yarn_config(style, 0.707, 1.0)}) {
      check_rope<float>(yarn, Shape{3, 33, 5, 64}, 64 + 128, 4);  // q_pe of q [B, S, H, 128 + 64]
      check_rope<double>(yarn, Shape{41, 64}, 64 + 512, 5);       // k_pe of the latent [N, 512 + 64]
      check_rope<float>(yarn, Shape{1, 1, 1, 64}, 64, 6);
    }
  }
}

TEST_CASE("cuda rope: argument errors", "[cuda][rope]") {
  r1::RopeConfig c;
  c.dim = 8;
  const r1::Rope rope(c);
  Tensor<float, Cuda> x(Shape{4, 2, 8});
  Tensor<int32_t, Cuda> positions(Shape{3});
  REQUIRE_R1_ERROR(r1::forward(rope, x.view(), positions.view(), x.view()),
                   "[rope.forward] positions have shape [3], expected [4] for input [4, 2, 8]");
  c.dim = 520;
  const r1::Rope wide(c);
  Tensor<float, Cuda> xw(Shape{2, 520});
  Tensor<int32_t, Cuda> pw(Shape{2});
  REQUIRE_R1_ERROR(r1::backward(wide, pw.view(), xw.view(), xw.view()), "[rope.backward] rope dim 520 exceeds the CUDA limit 512");
}

// ---------------------------------------------------------------------------------------
// Log-softmax and cross-entropy

namespace {

// Targets in [0, vocab) with every third one ignored (-100), plus one with ignore_index 7.
Tensor<int32_t> random_targets(int64_t n, int64_t vocab, uint64_t seed, int32_t ignore_index) {
  Tensor<int32_t> t(Shape{n});
  r1::Rng rng(seed);
  for (int64_t i = 0; i < n; ++i)
    t.data()[i] = i % 3 == 1 ? ignore_index : static_cast<int32_t>(rng.next_u64() % static_cast<uint64_t>(vocab));
  return t;
}

template <class T>
void check_cross_entropy(int64_t rows, int64_t vocab, int64_t width, int32_t ignore_index, uint64_t seed) {
  INFO("rows " << rows << ", vocab " << vocab << ", width " << width << ", ignore_index " << ignore_index);
  const r1::CrossEntropy loss{ignore_index};
  const Tensor<T> wide = random<T>(Shape{rows, width}, seed, 3.0);
  const Tensor<T, Cuda> wide_d = to_device(wide);
  const Tensor<int32_t> targets = random_targets(rows, vocab, seed + 1, ignore_index);
  const Tensor<int32_t, Cuda> targets_d = to_device(targets);

  r1::CrossEntropyCache<T> cache;
  r1::CrossEntropyCache<T, Cuda> cache_d;
  const T cpu = r1::forward(loss, wide.view().slice(1, 0, vocab), targets.view(), cache);
  const T gpu = r1::forward(loss, wide_d.view().slice(1, 0, vocab), targets_d.view(), cache_d);
  CHECK(std::abs(static_cast<double>(gpu) - static_cast<double>(cpu)) <= tolerance<T>() * std::max(1.0, std::abs(double(cpu))));
  CHECK(cache_d.valid == cache.valid);
  CHECK(max_rel_diff(to_host(cache_d.log_probs), cache.log_probs) <= tolerance<T>() * 10);  // log-probs reach -40
  const T dloss = T(0.7);
  const auto& dlogits = r1::backward(loss, cache, dloss);
  const auto& dlogits_d = r1::backward(loss, cache_d, dloss);
  CHECK(r1test::max_abs_diff(to_host(dlogits_d), dlogits) <= tolerance<T>());
}

}  // namespace

TEST_CASE("cuda cross_entropy: loss, log-probs and dlogits match the CPU", "[cuda][loss]") {
  for (const int64_t vocab : {1, 33, 50000}) {
    check_cross_entropy<float>(7, vocab, vocab, -100, 10);
    check_cross_entropy<float>(4, vocab, vocab + 5, -100, 11);  // rows with a stride
    check_cross_entropy<double>(5, vocab, vocab, 7, 12);
  }
  check_cross_entropy<float>(3, 129280, 129280, -100, 13);
}

TEST_CASE("cuda cross_entropy: no valid target gives loss 0 and gradient 0", "[cuda][loss]") {
  const r1::CrossEntropy loss;
  const Tensor<float, Cuda> logits = to_device(random<float>(Shape{2, 3, 9}, 20));
  Tensor<int32_t> targets(Shape{2, 3});
  for (int64_t i = 0; i < targets.numel(); ++i) targets.data()[i] = -100;
  r1::CrossEntropyCache<float, Cuda> cache;
  CHECK(r1::forward(loss, logits.view(), to_device(targets).view(), cache) == 0.0f);
  const Tensor<float> dlogits = to_host(r1::backward(loss, cache));
  CHECK(r1test::max_abs_diff(dlogits, Tensor<float>(Shape{2, 3, 9})) == 0.0);
}

TEST_CASE("cuda cross_entropy: an out-of-range target throws before any kernel", "[cuda][loss]") {
  const r1::CrossEntropy loss;
  const Tensor<float, Cuda> logits(Shape{4, 33});
  Tensor<int32_t> targets(Shape{4});
  targets.data()[2] = 33;
  r1::CrossEntropyCache<float, Cuda> cache;
  REQUIRE_R1_ERROR(r1::forward(loss, logits.view(), to_device(targets).view(), cache),
                   "[cross_entropy.forward] target 33 at position 2 is out of range [0, 33) and is not ignore_index -100");
  targets.data()[2] = -1;
  REQUIRE_R1_ERROR(r1::forward(loss, logits.view(), to_device(targets).view(), cache),
                   "[cross_entropy.forward] target -1 at position 2 is out of range");
}

TEST_CASE("cuda log_softmax: forward and backward match the CPU", "[cuda][loss]") {
  for (const int64_t vocab : {1, 33, 50000}) {
    INFO("vocab " << vocab);
    const Tensor<float> x = random<float>(Shape{3, 2, vocab}, 30, 4.0);
    const Tensor<float> dy = random<float>(Shape{3, 2, vocab}, 31);
    r1::LogSoftmaxCache<float> cache;
    r1::LogSoftmaxCache<float, Cuda> cache_d;
    const auto& y = r1::forward(r1::LogSoftmax{}, x.view(), cache);
    const auto& y_d = r1::forward(r1::LogSoftmax{}, to_device(x).view(), cache_d);
    CHECK(max_rel_diff(to_host(y_d), y) <= 2e-5);
    const auto& dx = r1::backward(r1::LogSoftmax{}, cache, dy.view());
    const auto& dx_d = r1::backward(r1::LogSoftmax{}, cache_d, to_device(dy).view());
    CHECK(max_rel_diff(to_host(dx_d), dx) <= 1e-4);  // dy summed over the row: cancellation
  }
}

// ---------------------------------------------------------------------------------------
// GRPO loss

namespace {

template <class T>
struct GrpoData {
  Tensor<T> log_probs, mask, advantages, token_advantages, old_log_probs, ref_log_probs, entropy;
  std::vector<uint8_t> truncated;
};

// B completions of L tokens with random lengths (one of length 0), ratios that hit both
// clips and the dual clip, and reference log-probs far enough to hit the k3 clamps.
template <class T>
GrpoData<T> grpo_data(int64_t B, int64_t L, uint64_t seed) {
  GrpoData<T> d;
  d.log_probs = random<T>(Shape{B, L}, seed, 1.0, -2.0);
  d.old_log_probs = d.log_probs;
  d.ref_log_probs = d.log_probs;
  const Tensor<T> noise = random<T>(Shape{B, L}, seed + 1, 0.3);
  const Tensor<T> far = random<T>(Shape{B, L}, seed + 2, 4.0);
  for (int64_t i = 0; i < B * L; ++i) {
    d.old_log_probs.data()[i] += noise.data()[i];
    d.ref_log_probs.data()[i] += i % 7 == 0 ? far.data()[i] : T(0.5) * noise.data()[(i * 13) % (B * L)];
  }
  d.mask = Tensor<T>(Shape{B, L});
  r1::Rng rng(seed + 3);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t length = b == 1 ? 0 : 1 + static_cast<int64_t>(rng.next_u64() % static_cast<uint64_t>(L));
    for (int64_t t = 0; t < length; ++t) d.mask(b, t) = T(1);
  }
  d.advantages = random<T>(Shape{B}, seed + 4);
  d.token_advantages = random<T>(Shape{B, L}, seed + 5);
  d.entropy = random<T>(Shape{B, L}, seed + 6, 0.5, 2.0);
  for (int64_t b = 0; b < B; ++b) d.truncated.push_back(b % 3 == 0 ? 1 : 0);
  return d;
}

template <class T>
void check_grpo(const r1::GrpoLoss& loss, const GrpoData<T>& d, bool per_token, bool with_old, double token_count) {
  INFO("loss_type " << r1::option_name(loss.loss_type) << ", level " << r1::option_name(loss.importance_sampling_level)
                    << ", beta " << loss.beta << ", kl " << r1::option_name(loss.kl_estimator) << ", per_token "
                    << per_token << ", old " << with_old << ", mask_truncated " << loss.mask_truncated_completions
                    << ", token_count " << token_count);
  r1::GrpoInputs<T> in;
  in.log_probs = d.log_probs;
  in.mask = d.mask;
  in.advantages = per_token ? d.token_advantages.view() : d.advantages.view();
  if (with_old) in.old_log_probs = d.old_log_probs;
  in.ref_log_probs = d.ref_log_probs;
  in.entropy = d.entropy;
  in.truncated = d.truncated;
  in.token_count = token_count;

  const Tensor<T, Cuda> log_probs = to_device(d.log_probs), mask = to_device(d.mask), old = to_device(d.old_log_probs),
                        ref = to_device(d.ref_log_probs), entropy = to_device(d.entropy),
                        advantages = to_device(per_token ? d.token_advantages : d.advantages);
  r1::GrpoInputs<T, Cuda> in_d;
  in_d.log_probs = log_probs;
  in_d.mask = mask;
  in_d.advantages = advantages;
  if (with_old) in_d.old_log_probs = old;
  in_d.ref_log_probs = ref;
  in_d.entropy = entropy;
  in_d.truncated = d.truncated;
  in_d.token_count = token_count;

  r1::GrpoCache<T> cache;
  r1::GrpoCache<T, Cuda> cache_d;
  const double tol = std::is_same_v<T, double> ? 1e-12 : 1e-5;
  const double cpu = r1::forward(loss, in, cache), gpu = r1::forward(loss, in_d, cache_d);
  CHECK(std::abs(gpu - cpu) <= tol * std::max(1.0, std::abs(cpu)));
  const r1::GrpoMetrics& m = cache.metrics;
  const r1::GrpoMetrics& g = cache_d.metrics;
  CHECK(g.tokens == m.tokens);
  for (const auto& [a, b] : {std::pair{g.loss, m.loss}, {g.clip_ratio_low, m.clip_ratio_low}, {g.clip_ratio_high, m.clip_ratio_high},
                             {g.clip_ratio_region, m.clip_ratio_region}, {g.clip_ratio_dual, m.clip_ratio_dual}, {g.kl, m.kl},
                             {g.entropy, m.entropy}})
    CHECK(std::abs(a - b) <= 1e-12 * std::max(1.0, std::abs(b)));
  const T dloss = T(0.5);
  const auto& grad = r1::backward(loss, cache, dloss);
  const auto& grad_d = r1::backward(loss, cache_d, dloss);
  CHECK(max_rel_diff(to_host(grad_d), grad) <= tol);
}

}  // namespace

TEST_CASE("cuda grpo: loss, metrics and gradient match the CPU for every reduction, level and KL", "[cuda][grpo]") {
  const GrpoData<double> d = grpo_data<double>(6, 37, 40);
  const GrpoData<float> f = grpo_data<float>(5, 300, 41);
  for (const auto loss_type : {r1::LossType::Grpo, r1::LossType::Bnpo, r1::LossType::Dapo, r1::LossType::DrGrpo,
                               r1::LossType::SeqMeanTokenSum}) {
    for (const auto level : {r1::ImportanceSampling::Token, r1::ImportanceSampling::Sequence}) {
      for (const double beta : {0.0, 0.04}) {
        for (const auto kl : {r1::KlEstimator::K1, r1::KlEstimator::K2, r1::KlEstimator::K3}) {
          if (beta == 0.0 && kl != r1::KlEstimator::K3) continue;
          r1::GrpoLoss loss;
          loss.loss_type = loss_type;
          loss.importance_sampling_level = level;
          loss.beta = beta;
          loss.kl_estimator = kl;
          loss.epsilon_high = 0.28;
          loss.max_completion_length = 400;
          const bool token = level == r1::ImportanceSampling::Token;
          check_grpo(loss, d, /*per_token=*/false, /*with_old=*/true, 0.0);
          check_grpo(loss, d, false, /*with_old=*/false, 0.0);
          if (token) check_grpo(loss, d, /*per_token=*/true, true, 0.0);
          check_grpo(loss, f, false, true, 0.0);
          loss.mask_truncated_completions = true;
          check_grpo(loss, d, false, true, /*token_count=*/123.0);
          loss.clip_ratio_c = 0.0;
          check_grpo(loss, f, token, true, 0.0);
        }
      }
    }
  }
}

TEST_CASE("cuda grpo: the first mask value that is not 0 or 1 is reported as on the CPU", "[cuda][grpo]") {
  GrpoData<float> d = grpo_data<float>(3, 5, 50);
  d.mask(2, 0) = 2.0f;
  d.mask(1, 3) = 0.5f;
  const Tensor<float, Cuda> log_probs = to_device(d.log_probs), mask = to_device(d.mask), advantages = to_device(d.advantages);
  r1::GrpoInputs<float, Cuda> in{.log_probs = log_probs, .mask = mask, .advantages = advantages};
  r1::GrpoCache<float, Cuda> cache;
  REQUIRE_R1_ERROR(r1::forward(r1::GrpoLoss{}, in, cache), "[grpo.forward] mask(1, 3) is 0.5, expected 0 or 1");
  r1::GrpoInputs<float> in_cpu{.log_probs = d.log_probs, .mask = d.mask, .advantages = d.advantages};
  r1::GrpoCache<float> cache_cpu;
  REQUIRE_R1_ERROR(r1::forward(r1::GrpoLoss{}, in_cpu, cache_cpu), "[grpo.forward] mask(1, 3) is 0.5, expected 0 or 1");
}

// ---------------------------------------------------------------------------------------
// Sampling

namespace {

struct SamplingCase {
  double temperature;
  int64_t top_k;
  double top_p;
};

const std::vector<SamplingCase> sampling_cases = {
    {0.0, 0, 1.0},  {1.0, 0, 1.0},  {0.7, 0, 1.0},   {1.3, 1, 1.0},  {1.0, 5, 1.0},   {0.8, 50, 1.0},
    {1.0, 0, 0.9},  {0.6, 0, 0.5},  {1.0, 0, 0.999}, {1.0, 20, 0.8}, {2.0, 100000, 0.95}, {0.0, 7, 0.3},
};

// Draws `draws` tokens from one row on each device with generators of the same seed; the
// ids and the generators' states after must match.
template <class T>
void check_sampling(const Tensor<T>& logits, uint64_t seed, int draws) {
  const Tensor<T, Cuda> logits_d = to_device(logits);
  r1::SamplerWorkspace w;
  r1::CudaSamplerWorkspace w_d;
  for (const SamplingCase& s : sampling_cases) {
    const r1::SamplingConfig config{s.temperature, s.top_k, s.top_p};
    r1::Rng rng(seed), rng_d(seed);
    for (int i = 0; i < draws; ++i) {
      INFO("vocab " << logits.numel() << ", seed " << seed << ", temperature " << s.temperature << ", top_k " << s.top_k
                    << ", top_p " << s.top_p << ", draw " << i);
      const int32_t cpu = r1::sample(logits.view(), config, rng, w);
      const int32_t gpu = r1::sample(logits_d.view(), config, rng_d, w_d);
      REQUIRE(gpu == cpu);
    }
    REQUIRE(rng_d.state().words == rng.state().words);
  }
}

}  // namespace

TEST_CASE("cuda sample: the same ids as the CPU for many seeds, temperatures, top-k and top-p", "[cuda][generate]") {
  for (const int64_t vocab : {1, 33, 50000}) {
    for (uint64_t seed = 0; seed < 12; ++seed) check_sampling(random<float>(Shape{vocab}, 100 + seed, 3.0), seed, 4);
  }
  check_sampling(random<double>(Shape{1000}, 200, 2.0), 7, 20);
  check_sampling(random<float>(Shape{129280}, 201, 4.0), 8, 3);
}

TEST_CASE("cuda sample: ties go to the lower id as on the CPU", "[cuda][generate]") {
  // Logits rounded to integers: many ties, and masses that are exact in any order.
  Tensor<float> rounded = random<float>(Shape{3001}, 300, 1.5);
  for (int64_t i = 0; i < rounded.numel(); ++i) rounded.data()[i] = std::round(rounded.data()[i]);
  for (uint64_t seed = 0; seed < 20; ++seed) check_sampling(rounded, seed, 5);

  Tensor<float> equal(Shape{64});  // all zero: every probability is exactly 1
  equal.data()[5] = -0.0f;
  for (int64_t i = 40; i < 64; ++i) equal.data()[i] = -std::numeric_limits<float>::infinity();
  for (uint64_t seed = 0; seed < 20; ++seed) check_sampling(equal, seed, 5);

  Tensor<float> zeros(Shape{3});  // -0 and +0 tie: greedy keeps the first
  zeros.data()[0] = -0.0f;
  zeros.data()[2] = -1.0f;
  r1::Rng rng(1);
  r1::CudaSamplerWorkspace w;
  const Tensor<float, Cuda> zeros_d = to_device(zeros);
  CHECK(r1::sample(zeros_d.view(), r1::SamplingConfig{0.0, 0, 1.0}, rng, w) == 0);
}

TEST_CASE("cuda sample: a NaN logit throws the CPU's error and draws nothing", "[cuda][generate]") {
  Tensor<float> logits = random<float>(Shape{1000}, 400);
  logits.data()[5] = std::numeric_limits<float>::quiet_NaN();
  logits.data()[900] = std::numeric_limits<float>::quiet_NaN();
  const Tensor<float, Cuda> logits_d = to_device(logits);
  r1::CudaSamplerWorkspace w;
  for (const SamplingCase& s : sampling_cases) {
    r1::Rng rng(3);
    const auto before = rng.state().words;
    REQUIRE_R1_ERROR(r1::sample(logits_d.view(), r1::SamplingConfig{s.temperature, s.top_k, s.top_p}, rng, w),
                     "[sample] logit 5 is NaN");
    CHECK(rng.state().words == before);
  }
  r1::Rng rng(3);
  REQUIRE_R1_ERROR(r1::sample(logits_d.view(), r1::SamplingConfig{-1.0, 0, 1.0}, rng, w), "[sampling] temperature is -1");
}
