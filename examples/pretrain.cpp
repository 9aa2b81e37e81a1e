// pretrain: pre-trains a small DeepSeek-V3 end to end on text from this machine, the way
// the real one was built, scaled down to minutes on two cores:
//   1. a byte-level BPE tokenizer learned from the corpus (r1::BpeTrainer, DeepSeek-V3's
//      pre-tokenizer and special tokens);
//   2. a DeepSeek-V3-architecture model: MLA with q/kv LoRA and decoupled RoPE, a dense first
//      layer then DeepSeekMoE (sigmoid group-limited routing, a shared expert,
//      aux-loss-free bias balancing plus the sequence-wise balance loss), and one
//      Multi-Token Prediction module;
//   3. r1::Trainer: AdamW, warmup + cosine, clipping, metrics as JSON lines, a progress bar,
//      checkpoints;
//   4. an HF model directory (config.json, model.safetensors, tokenizer.json) that
//      examples/generate loads, and a sample from it.
//
//   pretrain [--corpus PATH] [--out DIR] [--steps N] [--vocab N] [--threads N] [--seed S]
//
// The default corpus is /usr/share/common-licenses (Debian's base-files): about 250 KB of
// English prose. PATH may be a file or a directory of text files.
#include <r1/bpe_trainer.hpp>
#include <r1/generate.hpp>
#include <r1/model.hpp>
#include <r1/parallel.hpp>
#include <r1/tokenizer.hpp>
#include <r1/train.hpp>

#include <fmt/core.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <unistd.h>

namespace fs = std::filesystem;

namespace {

constexpr std::string_view kBos = "<\uFF5Cbegin\u2581of\u2581sentence\uFF5C>";
constexpr std::string_view kEos = "<\uFF5Cend\u2581of\u2581sentence\uFF5C>";

// The corpus: a file, or the regular files of a directory in name order (links skipped, so
// aliases such as GPL -> GPL-3 count once), separated by blank lines.
std::string read_corpus(const fs::path& path) {
  std::vector<fs::path> files;
  if (fs::is_directory(path)) {
    for (const auto& entry : fs::directory_iterator(path))
      if (entry.is_regular_file() && !entry.is_symlink()) files.push_back(entry.path());
    std::sort(files.begin(), files.end());
  } else {
    files.push_back(path);
  }
  std::string corpus;
  for (const auto& file : files) {
    std::ifstream in(file, std::ios::binary);
    std::ostringstream text;
    text << in.rdbuf();
    corpus += text.str();
    corpus += "\n\n";
  }
  R1_CHECK(!corpus.empty(), "[pretrain] no text in ", path.string());
  return corpus;
}

r1::ModelConfig small_deepseek_v3(int64_t vocab, int32_t bos, int32_t eos) {
  r1::ModelConfig c;
  c.vocab_size = vocab;
  c.hidden_size = 128;
  c.intermediate_size = 384;
  c.moe_intermediate_size = 64;
  c.num_hidden_layers = 4;
  c.first_k_dense_replace = 1;
  c.num_attention_heads = 4;
  c.n_routed_experts = 8;
  c.n_shared_experts = 1;
  c.num_experts_per_tok = 2;
  c.n_group = 4;
  c.topk_group = 2;
  c.routed_scaling_factor = 2.5;
  c.aux_loss_alpha = 1e-4;  // the sequence-wise balance loss (V3 report)
  c.q_lora_rank = 64;
  c.kv_lora_rank = 32;
  c.qk_nope_head_dim = 16;
  c.qk_rope_head_dim = 16;
  c.v_head_dim = 16;
  c.max_position_embeddings = 512;
  c.num_nextn_predict_layers = 1;
  c.bos_token_id = bos;
  c.eos_token_id = eos;
  c.validate();
  return c;
}

// Mean next-token cross-entropy of the model on windows of ids.
double evaluate(const r1::Model<float>& model, const std::vector<int32_t>& ids, int64_t seq) {
  r1::ModelCache<float> cache;
  r1::Tensor<int32_t> x(r1::Shape{1, seq}), y(r1::Shape{1, seq});
  double sum = 0.0;
  int64_t windows = 0;
  for (std::size_t start = 0; start + seq + 1 <= ids.size() && windows < 16; start += seq, ++windows) {
    std::copy_n(ids.begin() + static_cast<std::ptrdiff_t>(start), seq, x.data());
    std::copy_n(ids.begin() + static_cast<std::ptrdiff_t>(start) + 1, seq, y.data());
    r1::forward(r1::LanguageModelLoss{}, model, x, y, cache);
    sum += cache.main_loss;
  }
  return windows > 0 ? sum / static_cast<double>(windows) : 0.0;
}

}  // namespace

int main(int argc, char** argv) {
  std::map<std::string, std::string> flags{{"corpus", "/usr/share/common-licenses"}, {"out", "pretrain-out"},
                                           {"steps", "600"},  {"vocab", "1024"}, {"threads", "2"}, {"seed", "1"}};
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string name = argv[i];
    if (name.rfind("--", 0) != 0 || !flags.count(name.substr(2))) {
      fmt::print(stderr, "pretrain: unknown flag {}\nusage: pretrain [--corpus PATH] [--out DIR] [--steps N] [--vocab N] "
                         "[--threads N] [--seed S]\n", name);
      return 2;
    }
    flags[name.substr(2)] = argv[i + 1];
  }
  try {
    r1::set_num_threads(std::stoi(flags["threads"]));
    const fs::path out = flags["out"];
    const int64_t steps = std::stoll(flags["steps"]);
    const std::string corpus = read_corpus(flags["corpus"]);

    // 1. Tokenizer
    auto t0 = std::chrono::steady_clock::now();
    r1::BpeTrainer bpe({.vocab_size = std::stoll(flags["vocab"]),
                        .special_tokens = {std::string(kBos), std::string(kEos)},
                        .bos_token = std::string(kBos)});
    bpe.feed(corpus);
    bpe.train();
    const auto tokenizer = r1::Tokenizer::from_json(bpe.to_json());
    const std::vector<int32_t> ids = tokenizer.encode(corpus);
    const double bpe_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    fmt::print("tokenizer: {} tokens learned from {} bytes in {:.1f} s; the corpus is {} tokens ({:.2f} bytes/token)\n",
               tokenizer.vocab_size(), corpus.size(), bpe_seconds, ids.size(),
               static_cast<double>(corpus.size()) / static_cast<double>(ids.size()));

    // 2. Model: the last 5% of the corpus is held out.
    const auto split = static_cast<std::ptrdiff_t>(ids.size() * 95 / 100);
    const std::vector<int32_t> train_ids(ids.begin(), ids.begin() + split), val_ids(ids.begin() + split, ids.end());
    const auto bos = *tokenizer.token_to_id(kBos), eos = *tokenizer.token_to_id(kEos);
    r1::Model<float> model(small_deepseek_v3(tokenizer.vocab_size(), bos, eos));
    r1::Rng init(std::stoull(flags["seed"]));
    r1::init_weights(model, init);
    int64_t parameters = 0;
    model.visit([&](const std::string&, r1::Tensor<float>& t) { parameters += t.numel(); });
    fmt::print("model: DeepSeek-V3 architecture, {} layers (1 dense + {} MoE, 8 experts top-2 + 1 shared), MLA, 1 MTP "
               "module; {:.2f} M parameters\n",
               model.config.num_hidden_layers, model.config.num_hidden_layers - 1, static_cast<double>(parameters) / 1e6);

    // 3. Training
    const int64_t batch = 8, seq = 128;
    fs::create_directories(out);
    fs::remove(out / "metrics.jsonl");
    r1::TrainConfig config;
    config.steps = steps;
    config.adamw.lr = 3e-3;
    config.warmup_steps = std::max<int64_t>(1, steps / 20);
    config.min_lr = 3e-4;
    config.loss.mtp_weight = 0.3;
    config.bias_update_rate = 0.01;  // V3 used 0.001 over 14.8T tokens; a few hundred steps need a faster rate
    config.metrics_file = out / "metrics.jsonl";
    if (isatty(fileno(stderr))) config.progress = &std::cerr;
    r1::Trainer trainer(model, config, std::stoull(flags["seed"]));
    const auto windows = [&](int64_t, int64_t, r1::Rng& rng, r1::Batch& b) {
      b.ids.resize(r1::Shape{batch, seq});
      b.targets.resize(r1::Shape{batch, seq});
      for (int64_t i = 0; i < batch; ++i) {
        const auto start = static_cast<std::ptrdiff_t>(rng.uniform() * static_cast<double>(train_ids.size() - seq - 1));
        std::copy_n(train_ids.begin() + start, seq, b.ids.data() + i * seq);
        std::copy_n(train_ids.begin() + start + 1, seq, b.targets.data() + i * seq);
      }
    };
    const double val_before = evaluate(model, val_ids, seq);
    t0 = std::chrono::steady_clock::now();
    double first = 0.0, last = 0.0;
    int64_t tokens = 0;
    for (int64_t s = 0; s < steps; ++s) {
      const r1::StepMetrics m = trainer.step(windows);
      tokens += m.tokens;
      (s == 0 ? first : last) = m.main_loss;
      if (s % 50 == 0 || s == steps - 1) {
        if (config.progress) std::cerr << '\n';
        fmt::print("step {:4d}  loss {:.3f}  mtp {:.3f}  lr {:.1e}  |g| {:.2f}  expert load max/mean {:.2f}\n", s,
                   m.main_loss, m.mtp_losses.empty() ? 0.0 : m.mtp_losses[0], m.lr, m.grad_norm, m.max_load_imbalance);
      }
      if ((s + 1) % 200 == 0 && s + 1 < steps) trainer.save_checkpoint(out / "checkpoints");
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double val_after = evaluate(model, val_ids, seq);
    fmt::print("trained {} tokens in {:.1f} s: {:.0f} tokens/s (forward + backward + AdamW, {} threads)\n", tokens, seconds,
               static_cast<double>(tokens) / seconds, r1::num_threads());
    fmt::print("train loss {:.3f} -> {:.3f}; held-out loss {:.3f} -> {:.3f} (uniform guess {:.3f})\n", first, last,
               val_before, val_after, std::log(static_cast<double>(tokenizer.vocab_size())));

    // 4. An HF model directory, and a sample through generate's path.
    const fs::path final_dir = out / "final";
    r1::save_pretrained(model, final_dir);
    bpe.save(final_dir / "tokenizer.json");
    fmt::print("saved {} (config.json, model.safetensors, tokenizer.json); metrics in {}\n", final_dir.string(),
               config.metrics_file.string());
    const std::string prompt = "The licensee";
    const auto result = r1::generate(model, {tokenizer.encode(prompt, true)},
                                     {.max_new_tokens = 60, .sampling = {.temperature = 0.7, .top_p = 0.9}, .seed = 1,
                                      .stop_tokens = {eos}});
    fmt::print("sample: {}{}\n", prompt, tokenizer.decode(result.tokens[0], /*skip_special_tokens=*/true));
    fmt::print("try: generate --model {} --prompt \"{}\" --temperature 0.7\n", final_dir.string(), prompt);
    return val_after < val_before && last < first ? 0 : 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "pretrain: {}\n", e.what());
    return 1;
  }
}
