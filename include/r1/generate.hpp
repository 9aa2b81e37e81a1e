// r1/generate.hpp: sampling and batched generation over the latent KV cache.
//
// Sampling one token from logits z [V] (HF's order of logits processors):
//   temperature 0            argmax (ties: the lower id)
//   z' = z / temperature
//   top_k > 0                keep the k largest z' (ties: the lower id)
//   p = softmax(z') over what is kept
//   top_p < 1                keep the most probable tokens, in order, until their mass
//                            reaches top_p (at least one), and renormalize
//   draw u ~ U[0, 1) from r1::Rng: the pick is the first token whose cumulative p > u sum p
// Each call draws exactly one number when it samples (none when greedy), so a seed fixes
// the whole generation.
//
// generate(model, prompts, config, on_token): prefills every prompt into one shared paged
// cache (one sequence each; prompts of equal length in one batch), then decodes all
// unfinished sequences together, one token per step, until each emits a stop token or
// max_new_tokens. on_token(i, id) streams tokens as they are chosen (feed them to a
// tokenizer's StreamDecoder for text).
//
// Legend: V vocabulary, B prompts, T tokens.
#pragma once

#include "config.hpp"
#include "model.hpp"
#include "tensor.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <vector>

namespace r1 {

struct SamplingConfig {
  double temperature = 1.0;  // 0: greedy
  int64_t top_k = 0;         // 0: no top-k
  double top_p = 1.0;        // 1: no nucleus cut

  void validate() const {
    R1_CHECK(temperature >= 0.0 && std::isfinite(temperature), "[sampling] temperature is ", temperature, ", expected >= 0");
    R1_CHECK(top_k >= 0, "[sampling] top_k is ", top_k, ", expected >= 0 (0 = off)");
    R1_CHECK(top_p > 0.0 && top_p <= 1.0, "[sampling] top_p is ", top_p, ", expected in (0, 1]");
  }
};

// Reusable buffers of sample(): no allocation per token after the first.
struct SamplerWorkspace {
  std::vector<int32_t> order;
  std::vector<double> probs;
};

R1_DECLARE_IMPL(SampleImpl, "generate.cuh");

template <>
struct SampleImpl<Cpu> {
  using Workspace = SamplerWorkspace;

  template <class T>
  static int32_t sample(View<const T> logits, const SamplingConfig& config, Rng& rng, SamplerWorkspace& w) {
    const T* z = logits.data();
    const auto vocab = static_cast<int32_t>(logits.numel());
    for (int32_t v = 0; v < vocab; ++v)
      R1_CHECK(!std::isnan(static_cast<double>(z[v])), "[sample] logit ", v, " is NaN");
    if (config.temperature == 0.0) return static_cast<int32_t>(std::max_element(z, z + vocab) - z);

    // Candidates by decreasing logit, ties to the lower id; only as many as top_k needs sorted.
    w.order.resize(static_cast<std::size_t>(vocab));
    std::iota(w.order.begin(), w.order.end(), 0);
    const auto before = [z](int32_t a, int32_t b) { return z[a] > z[b] || (z[a] == z[b] && a < b); };
    auto kept = static_cast<int32_t>(config.top_k > 0 ? std::min<int64_t>(config.top_k, vocab) : vocab);
    const bool sorted = kept < vocab || config.top_p < 1.0;
    if (sorted) std::partial_sort(w.order.begin(), w.order.begin() + kept, w.order.end(), before);
    const double max_logit = static_cast<double>(sorted ? z[w.order[0]] : *std::max_element(z, z + vocab));
    w.probs.resize(static_cast<std::size_t>(kept));
    double sum = 0.0;
    for (int32_t i = 0; i < kept; ++i) {
      w.probs[i] = std::exp((static_cast<double>(z[w.order[i]]) - max_logit) / config.temperature);
      sum += w.probs[i];
    }
    if (config.top_p < 1.0) {
      // HF's TopPLogitsWarper keeps a token while the mass before it is below top_p.
      double mass = 0.0;
      int32_t n = 0;
      while (n < kept && (n == 0 || mass < config.top_p * sum)) mass += w.probs[n++];
      kept = n;
      sum = mass;
    }
    double u = rng.uniform() * sum;
    for (int32_t i = 0; i < kept - 1; ++i) {
      u -= w.probs[i];
      if (u < 0.0) return w.order[i];
    }
    return w.order[kept - 1];
  }
};

// One id from a row of logits. Dev = Cuda (r1/cuda/generate.cuh) picks on the GPU with
// SampleImpl<Cuda>::Workspace, drawing the same Rng number as the CPU.
template <class T, class Dev>
int32_t sample(View<const T, Dev> logits, const SamplingConfig& config, Rng& rng, typename SampleImpl<Dev>::Workspace& w) {
  config.validate();
  R1_CHECK(logits.rank() == 1 && logits.numel() > 0 && logits.is_contiguous(), "[sample] logits have shape ", logits.shape(),
           ", expected a contiguous [V]");
  R1_CHECK(logits.numel() <= std::numeric_limits<int32_t>::max(), "[sample] vocabulary of ", logits.numel(),
           " ids exceeds int32");
  return SampleImpl<Dev>::sample(logits, config, rng, w);
}

// Every member has an initializer, so designated initializers such as
// {.max_new_tokens = 64} that leave some out compile cleanly under -Wextra.
struct GenerationConfig {
  int64_t max_new_tokens = 128;
  SamplingConfig sampling{};
  uint64_t seed = 0;
  std::vector<int32_t> stop_tokens{};  // e.g. the tokenizer's EOS; the stop token is kept in the output
  int64_t block_size = 64;             // of the paged latent cache
};

enum class FinishReason { Stop, Length };

struct GenerationResult {
  std::vector<std::vector<int32_t>> tokens;  // the new tokens of each prompt
  std::vector<FinishReason> finish;
  int64_t prompt_tokens = 0, generated_tokens = 0;
  double prefill_seconds = 0.0, decode_seconds = 0.0;
};

template <class T>
GenerationResult generate(const Model<T, Cpu>& m, const std::vector<std::vector<int32_t>>& prompts, const GenerationConfig& config,
                          const std::function<void(int64_t prompt, int32_t id)>& on_token = {}) {
  config.sampling.validate();
  R1_CHECK(!prompts.empty(), "[generate] no prompts");
  R1_CHECK(config.max_new_tokens >= 0 && config.block_size > 0, "[generate] max_new_tokens ", config.max_new_tokens,
           " must be >= 0 and block_size ", config.block_size, " > 0");
  const int64_t B = static_cast<int64_t>(prompts.size()), vocab = m.config.vocab_size;
  GenerationResult result;
  int64_t blocks = 0;
  for (int64_t b = 0; b < B; ++b) {
    const auto len = static_cast<int64_t>(prompts[b].size());
    R1_CHECK(len > 0, "[generate] prompt ", b, " is empty");
    R1_CHECK(len + config.max_new_tokens <= m.config.max_position_embeddings, "[generate] prompt ", b, " has ", len,
             " tokens; with max_new_tokens ", config.max_new_tokens, " it would pass max_position_embeddings ",
             m.config.max_position_embeddings);
    blocks += (len + config.max_new_tokens + config.block_size - 1) / config.block_size;
    result.prompt_tokens += len;
  }
  for (const int32_t stop : config.stop_tokens)
    R1_CHECK(0 <= stop && stop < vocab, "[generate] stop token ", stop, " is outside the vocabulary [0, ", vocab, ")");

  result.tokens.resize(static_cast<std::size_t>(B));
  result.finish.assign(static_cast<std::size_t>(B), FinishReason::Length);
  if (config.max_new_tokens == 0) return result;
  InferenceCache<T, Cpu> cache(m, blocks, config.block_size);
  Rng rng(config.seed);
  SamplerWorkspace workspace;
  std::vector<int32_t> next(static_cast<std::size_t>(B));
  const auto emit = [&](int64_t b, int32_t id) {
    result.tokens[b].push_back(id);
    ++result.generated_tokens;
    if (on_token) on_token(b, id);
    const bool stop = std::find(config.stop_tokens.begin(), config.stop_tokens.end(), id) != config.stop_tokens.end();
    if (stop) result.finish[b] = FinishReason::Stop;
    return !stop && static_cast<int64_t>(result.tokens[b].size()) < config.max_new_tokens;
  };

  // Prefill: prompts of the same length go through together (all G copies of a GRPO
  // prompt, say). The first new tokens are then sampled in prompt order, so the draws do
  // not depend on how the prompts group.
  std::vector<int64_t> active;
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t b = 0; b < B; ++b) cache.add_sequence();  // sequence b is prompt b
  Tensor<T, Cpu> first(Shape{B, vocab});
  std::vector<bool> done(static_cast<std::size_t>(B), false);
  Tensor<int32_t> ids;
  for (int64_t b = 0; b < B; ++b) {
    if (done[b]) continue;
    std::vector<int64_t> same;
    for (int64_t c = b; c < B; ++c)
      if (!done[c] && prompts[c].size() == prompts[b].size()) {
        same.push_back(c);
        done[c] = true;
      }
    const auto len = static_cast<int64_t>(prompts[b].size()), n = static_cast<int64_t>(same.size());
    ids.resize(Shape{n, len});
    for (int64_t i = 0; i < n; ++i) std::copy(prompts[same[i]].begin(), prompts[same[i]].end(), ids.data() + i * len);
    const auto& logits = forward_cached(m, ids, same, cache, Logits::Last);
    for (int64_t i = 0; i < n; ++i) std::copy_n(logits.data() + i * vocab, vocab, first.data() + same[i] * vocab);
  }
  for (int64_t b = 0; b < B; ++b) {
    next[b] = sample(View<const T>(first.data() + b * vocab, Shape{vocab}), config.sampling, rng, workspace);
    if (emit(b, next[b])) active.push_back(b);
  }
  const auto t1 = std::chrono::steady_clock::now();
  result.prefill_seconds = std::chrono::duration<double>(t1 - t0).count();

  // Decode the unfinished sequences together; sequence ids equal prompt indices.
  Tensor<int32_t> step;
  while (!active.empty()) {
    const auto n = static_cast<int64_t>(active.size());
    step.resize(Shape{n, 1});
    for (int64_t i = 0; i < n; ++i) step.data()[i] = next[active[i]];
    const auto& logits = forward_cached(m, step, active, cache, Logits::Last);
    std::vector<int64_t> still;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t b = active[i];
      next[b] = sample(View<const T>(logits.data() + i * vocab, Shape{vocab}), config.sampling, rng, workspace);
      if (emit(b, next[b])) still.push_back(b);
    }
    active.swap(still);
  }
  result.decode_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
  return result;
}

}  // namespace r1
