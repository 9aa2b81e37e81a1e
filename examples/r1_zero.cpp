// r1_zero: DeepSeek-R1-Zero in miniature. A small DeepSeek-V3 model is pre-trained on a
// verifiable task, then reinforcement learning with GRPO and a rule-based reward alone
// raises its held-out accuracy: pass@1 from about 0.12 to about 0.5 in under two minutes
// on two idle cores.
//
// Task, Countdown-mini: three numbers from 1 to 9 and a target; reach the target with
// + - * / (exact division), each number used once.
//   prompt       "8 9 8 -> 136"                                   (after BOS)
//   completion   "<think>9+8=17,17*8=136</think><answer>(9+8)*8</answer>"   (then EOS)
// The target is the value of an expression drawn uniformly from all of the numbers' (every
// step has a positive integer result and is written larger operand first). A held-out set
// of 500 prompts, distinct by (multiset of numbers, target), is drawn with a fixed seed
// whatever --seed is; pre-training and RL draw from the same distribution and skip it.
//
// Why RL has something to do: the pre-training corpus mixes two kinds of well-formed traces
// with valid equations and correct arithmetic:
//   careful (half)  an expression drawn uniformly from those that reach the target;
//   lazy (half)     the numbers added up, (n0+n1)+n2, right only when the target is their sum.
// Greedy decoding follows the majority habit at every token, so the base model adds the
// numbers up and its pass@1 is low; sampled at temperature 1 it also writes careful
// solutions, and about a quarter of its samples are right. That is R1-Zero's premise: the
// capability is latent in the base model, and RL on outcome rewards brings it out. GRPO
// (16 prompts x 8 completions per step, TinyZero's countdown reward: no answer 0, wrong
// 0.1, right 1; beta 0, DAPO's clip-higher and token-level loss) makes careful solutions
// the greedy choice, and held-out pass@1 rises to about what a model pre-trained on careful
// traces alone reaches. The reward reads only the answer, so the arithmetic inside <think>
// is free to drift during RL.
//
// Model: DeepSeek-V3 architecture, 2 layers of width 64: MLA (q/kv LoRA, decoupled RoPE),
// a dense first layer, then DeepSeekMoE (8 routed experts top-2 with sigmoid group-limited
// routing and a shared expert). The tokenizer is an HF byte-level BPE tokenizer.json with
// one token per character the task uses plus BOS, EOS and the four tags (27 tokens).
//
//   r1_zero [--out DIR] [--seed S] [--threads N] [--pretrain-steps N] [--rl-steps N] [--quick]
//
// DIR gets pretrain.jsonl and grpo.jsonl (per-step metrics), eval.jsonl (held-out pass@1
// during RL), r1_zero.svg (reward and pass@1 over the GRPO steps) and the base and RL
// models as HF directories (base/, rl/) that examples/generate loads. A progress bar goes
// to stderr on a terminal. The last line on stdout is a JSON object with pass_at_1_before,
// pass_at_1_after and seconds (the whole run). --quick shrinks everything to a smoke test.
// Runs are deterministic under --seed, whatever the thread count.
#include <r1/generate.hpp>
#include <r1/grpo_trainer.hpp>
#include <r1/model.hpp>
#include <r1/parallel.hpp>
#include <r1/rewards.hpp>
#include <r1/tokenizer.hpp>
#include <r1/train.hpp>

#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <numeric>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include <unistd.h>

namespace fs = std::filesystem;

namespace {

// ---------------------------------------------------------------------------------------
// Countdown-mini
struct Problem {
  std::array<int64_t, 3> numbers{};
  int64_t target = 0;

  std::string prompt() const { return fmt::format("{} {} {} -> {}", numbers[0], numbers[1], numbers[2], target); }
  // What makes two prompts the same question: the multiset of numbers and the target.
  std::array<int64_t, 4> key() const {
    std::array<int64_t, 3> sorted = numbers;
    std::sort(sorted.begin(), sorted.end());
    return {sorted[0], sorted[1], sorted[2], target};
  }
};

// One step on two positive integers, larger operand first, with a positive integer result.
struct Step {
  int64_t a = 0, b = 0;
  char op = '+';
  int64_t value = 0;
};

// The steps of x and y, '+' first.
std::vector<Step> steps(int64_t x, int64_t y) {
  const int64_t a = std::max(x, y), b = std::min(x, y);
  std::vector<Step> out{{a, b, '+', a + b}, {a, b, '*', a * b}};
  if (a > b) out.push_back({a, b, '-', a - b});
  if (a % b == 0) out.push_back({a, b, '/', a / b});
  return out;
}

// (x o y) o z as the think writes it, "9+8=17,17*8=136", and as the answer, "(9+8)*8".
struct Expression {
  std::string think, answer;
  int64_t value = 0;
};

Expression expression(const Step& first, const Step& second, int64_t z) {
  const std::string inner = fmt::format("{}{}{}", first.a, first.op, first.b);
  return {fmt::format("{}={},{}{}{}={}", inner, first.value, second.a, second.op, second.b, second.value),
          first.value >= z ? fmt::format("({}){}{}", inner, second.op, z) : fmt::format("{}{}({})", z, second.op, inner),
          second.value};
}

// Every distinct expression of the three numbers, in a fixed order.
std::vector<Expression> expressions(const std::array<int64_t, 3>& n) {
  std::map<std::string, Expression> unique;
  for (int k = 0; k < 3; ++k) {
    const int64_t z = n[k];
    for (const Step& first : steps(n[(k + 1) % 3], n[(k + 2) % 3]))
      for (const Step& second : steps(first.value, z)) {
        Expression e = expression(first, second, z);
        unique.emplace(e.answer, std::move(e));
      }
  }
  std::vector<Expression> out;
  for (auto& [answer, e] : unique) out.push_back(std::move(e));
  return out;
}

std::size_t uniform_index(r1::Rng& rng, std::size_t n) {
  return std::min(n - 1, static_cast<std::size_t>(rng.uniform() * static_cast<double>(n)));
}

Problem draw_problem(r1::Rng& rng) {
  Problem p;
  for (int64_t& x : p.numbers) x = 1 + static_cast<int64_t>(uniform_index(rng, 9));
  const std::vector<Expression> all = expressions(p.numbers);
  p.target = all[uniform_index(rng, all.size())].value;
  return p;
}

// Reward functions see text only, as in TinyZero: the numbers and target come back from it.
Problem parse_prompt(std::string_view text) {
  std::vector<int64_t> values;
  for (std::size_t i = 0; i < text.size();) {
    if (text[i] < '0' || text[i] > '9') {
      ++i;
      continue;
    }
    int64_t v = 0;
    while (i < text.size() && text[i] >= '0' && text[i] <= '9') v = v * 10 + (text[i++] - '0');
    values.push_back(v);
  }
  R1_CHECK(values.size() == 4, "[r1_zero] prompt '", text, "' should hold three numbers and a target");
  return Problem{{values[0], values[1], values[2]}, values[3]};
}

// A pre-training completion: careful with probability `careful`, else lazy (header comment).
std::string pretraining_completion(const Problem& p, double careful, r1::Rng& rng) {
  Expression e;
  if (rng.uniform() < careful) {
    std::vector<Expression> hits;
    for (Expression& x : expressions(p.numbers))
      if (x.value == p.target) hits.push_back(std::move(x));
    e = hits[uniform_index(rng, hits.size())];
  } else {
    const Step first = steps(p.numbers[0], p.numbers[1])[0];
    e = expression(first, steps(first.value, p.numbers[2])[0], p.numbers[2]);
  }
  return "<think>" + e.think + "</think><answer>" + e.answer + "</answer>";
}

// ---------------------------------------------------------------------------------------
// Tokenizer: an HF byte-level BPE tokenizer.json without merges, whose vocab holds only the
// characters the task uses, so the embedding and head stay tiny.
constexpr std::string_view kBos = "<\uFF5Cbegin\u2581of\u2581sentence\uFF5C>";
constexpr std::string_view kEos = "<\uFF5Cend\u2581of\u2581sentence\uFF5C>";
constexpr std::string_view kAlphabet = "0123456789+-*/()=,; >";

std::string tokenizer_json() {
  using ojson = nlohmann::ordered_json;
  ojson added = ojson::array(), vocab = ojson::object();
  int32_t id = 0;
  for (const std::string_view tag : {kBos, kEos, std::string_view("<think>"), std::string_view("</think>"),
                                     std::string_view("<answer>"), std::string_view("</answer>")}) {
    // BOS and EOS are special (decode can skip them); the tags are text the rewards read.
    added.push_back({{"id", id}, {"content", tag}, {"single_word", false}, {"lstrip", false}, {"rstrip", false},
                     {"normalized", false}, {"special", tag == kBos || tag == kEos}});
    vocab[std::string(tag)] = id++;
  }
  for (const char c : kAlphabet) vocab[r1::detail::tok::byte_level_encode(std::string_view(&c, 1))] = id++;
  const ojson byte_level = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", false}, {"use_regex", false}};
  // encode(text, add_special_tokens = true) puts BOS first, as examples/generate asks for.
  const ojson bos = {{"SpecialToken", {{"id", kBos}, {"type_id", 0}}}};
  const auto text = [](const char* id, int type_id) { return ojson{{"Sequence", {{"id", id}, {"type_id", type_id}}}}; };
  const ojson with_bos = {
      {"type", "TemplateProcessing"},
      {"single", ojson::array({bos, text("A", 0)})},
      {"pair", ojson::array({bos, text("A", 0), bos, text("B", 1)})},
      {"special_tokens", {{kBos, {{"id", kBos}, {"ids", ojson::array({0})}, {"tokens", ojson::array({kBos})}}}}}};
  ojson root;
  root["version"] = "1.0";
  root["added_tokens"] = added;
  root["normalizer"] = nullptr;
  root["pre_tokenizer"] = byte_level;
  root["post_processor"] = {{"type", "Sequence"}, {"processors", {byte_level, with_bos}}};
  root["decoder"] = byte_level;
  root["model"] = {{"type", "BPE"}, {"vocab", vocab}, {"merges", ojson::array()}};
  return root.dump(2) + "\n";
}

// ---------------------------------------------------------------------------------------
r1::ModelConfig small_deepseek_v3(int64_t vocab, int32_t bos, int32_t eos) {
  r1::ModelConfig c;
  c.vocab_size = vocab;
  c.hidden_size = 64;
  c.intermediate_size = 192;
  c.moe_intermediate_size = 64;
  c.num_hidden_layers = 2;
  c.first_k_dense_replace = 1;
  c.num_attention_heads = 4;
  c.n_routed_experts = 8;
  c.n_shared_experts = 1;
  c.num_experts_per_tok = 2;
  c.n_group = 4;
  c.topk_group = 2;
  c.routed_scaling_factor = 2.5;
  c.aux_loss_alpha = 1e-4;  // the sequence-wise balance loss (V3 report)
  c.q_lora_rank = 32;
  c.kv_lora_rank = 32;
  c.qk_nope_head_dim = 16;
  c.qk_rope_head_dim = 8;
  c.v_head_dim = 16;
  c.max_position_embeddings = 64;  // prompt (at most 13 tokens) + kMaxNewTokens
  c.bos_token_id = bos;
  c.eos_token_id = eos;
  c.validate();
  return c;
}

constexpr int64_t kMaxNewTokens = 40;  // a well-formed completion has at most 27 tokens, EOS included

struct Task {
  const r1::Tokenizer& tokenizer;
  int32_t bos, eos;

  std::vector<int32_t> prompt_ids(const Problem& p) const { return tokenizer.encode(p.prompt(), /*add_special_tokens=*/true); }
};

struct Eval {
  double pass_at_1 = 0.0;
  std::vector<std::string> completions;
  std::vector<bool> solved;
};

// Greedy pass@1: the fraction of problems whose completion earns the full countdown reward.
Eval evaluate(const r1::Model<float>& model, const Task& task, const std::vector<Problem>& problems) {
  std::vector<std::vector<int32_t>> prompts;
  for (const Problem& p : problems) prompts.push_back(task.prompt_ids(p));
  const r1::GenerationResult result = r1::generate(
      model, prompts, {.max_new_tokens = kMaxNewTokens, .sampling = {.temperature = 0.0}, .stop_tokens = {task.eos}});
  Eval e;
  for (std::size_t i = 0; i < problems.size(); ++i) {
    e.completions.push_back(task.tokenizer.decode(result.tokens[i], /*skip_special_tokens=*/true));
    e.solved.push_back(r1::countdown_reward(e.completions.back(), problems[i].target, problems[i].numbers) == 1.0);
    e.pass_at_1 += e.solved.back();
  }
  e.pass_at_1 /= static_cast<double>(problems.size());
  return e;
}

// A line chart of the mean reward per GRPO step and held-out pass@1 at each evaluation,
// both on [0, 1], as a standalone SVG.
void write_plot(const fs::path& path, const std::vector<double>& reward,
                const std::vector<std::pair<int64_t, double>>& pass_at_1) {
  constexpr double kW = 640, kH = 360, kLeft = 56, kRight = 20, kTop = 36, kBottom = 48;
  const double last_step = std::max<double>(1.0, static_cast<double>(reward.size()));
  const auto x = [&](double step) { return kLeft + (kW - kLeft - kRight) * step / last_step; };
  const auto y = [&](double v) { return kTop + (kH - kTop - kBottom) * (1.0 - std::clamp(v, 0.0, 1.0)); };
  std::string svg = fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{0}\" height=\"{1}\" viewBox=\"0 0 {0} {1}\" "
      "font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
      "<text x=\"{2}\" y=\"22\" font-size=\"14\">r1_zero: GRPO on Countdown-mini</text>\n",
      kW, kH, kLeft);
  for (int i = 0; i <= 4; ++i) {
    const double v = i / 4.0;
    svg += fmt::format("<line x1=\"{}\" y1=\"{:.1f}\" x2=\"{}\" y2=\"{:.1f}\" stroke=\"#ddd\"/>"
                       "<text x=\"{}\" y=\"{:.1f}\" text-anchor=\"end\">{:.2f}</text>\n",
                       kLeft, y(v), kW - kRight, y(v), kLeft - 6, y(v) + 4, v);
  }
  for (int i = 0; i <= 5; ++i) {
    const double step = last_step * i / 5.0;
    svg += fmt::format("<text x=\"{:.1f}\" y=\"{}\" text-anchor=\"middle\">{:.0f}</text>\n", x(step), kH - kBottom + 16, step);
  }
  svg += fmt::format("<text x=\"{:.1f}\" y=\"{}\" text-anchor=\"middle\">GRPO step</text>\n", (kW + kLeft) / 2, kH - 10);
  std::string points;
  for (std::size_t s = 0; s < reward.size(); ++s) points += fmt::format("{:.1f},{:.1f} ", x(s + 1.0), y(reward[s]));
  svg += fmt::format("<polyline points=\"{}\" fill=\"none\" stroke=\"#4c78a8\" stroke-width=\"1.5\"/>\n", points);
  points.clear();
  for (const auto& [step, value] : pass_at_1) {
    points += fmt::format("{:.1f},{:.1f} ", x(static_cast<double>(step)), y(value));
    svg += fmt::format("<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"3\" fill=\"#f58518\"/>\n", x(static_cast<double>(step)), y(value));
  }
  svg += fmt::format("<polyline points=\"{}\" fill=\"none\" stroke=\"#f58518\" stroke-width=\"2\"/>\n", points);
  svg += fmt::format("<line x1=\"{0}\" y1=\"{1}\" x2=\"{2}\" y2=\"{1}\" stroke=\"#4c78a8\" stroke-width=\"2\"/>"
                     "<text x=\"{3}\" y=\"{4}\">mean reward (sampled, T = 1)</text>\n"
                     "<line x1=\"{0}\" y1=\"{5}\" x2=\"{2}\" y2=\"{5}\" stroke=\"#f58518\" stroke-width=\"2\"/>"
                     "<text x=\"{3}\" y=\"{6}\">held-out pass@1 (greedy)</text>\n</svg>\n",
                     kW - 230, kTop + 10, kW - 210, kW - 204, kTop + 14, kTop + 28, kTop + 32);
  r1::write_file_atomic(path, [&](std::ostream& out) { out << svg; });
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

int usage(const std::string& problem) {
  fmt::print(stderr, "r1_zero: {}\nusage: r1_zero [--out DIR] [--seed S] [--threads N] [--pretrain-steps N] "
                     "[--rl-steps N] [--quick]\n", problem);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  // Empty step counts take the defaults of the mode (full or --quick).
  std::map<std::string, std::string> flags{
      {"out", "r1-zero-out"}, {"seed", "1"}, {"threads", "2"}, {"pretrain-steps", ""}, {"rl-steps", ""}};
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    const std::string name = argv[i];
    if (name == "--quick") {
      quick = true;
    } else if (name.rfind("--", 0) == 0 && flags.count(name.substr(2)) && i + 1 < argc) {
      flags[name.substr(2)] = argv[++i];
    } else {
      return usage("unknown flag or missing value: " + name);
    }
  }
  try {
    const auto start = std::chrono::steady_clock::now();
    r1::set_num_threads(std::stoi(flags["threads"]));
    r1::Rng seeds(std::stoull(flags["seed"]));
    const int64_t pretrain_steps = !flags["pretrain-steps"].empty() ? std::stoll(flags["pretrain-steps"]) : quick ? 120 : 5000;
    const int64_t rl_steps = !flags["rl-steps"].empty() ? std::stoll(flags["rl-steps"]) : quick ? 6 : 100;
    const int64_t eval_every = quick ? 3 : 10;
    const fs::path out = flags["out"];
    fs::create_directories(out);
    for (const char* name : {"pretrain.jsonl", "grpo.jsonl"}) fs::remove(out / name);  // the trainers append
    std::ostream* progress = isatty(fileno(stderr)) ? &std::cerr : nullptr;

    const std::string tokenizer_file = tokenizer_json();
    const auto tokenizer = r1::Tokenizer::from_json(tokenizer_file);
    const Task task{tokenizer, *tokenizer.token_to_id(kBos), *tokenizer.token_to_id(kEos)};

    std::vector<Problem> held_out;
    std::set<std::array<int64_t, 4>> held_out_keys;
    for (r1::Rng rng(20250120); held_out.size() < 500;) {
      const Problem p = draw_problem(rng);
      if (held_out_keys.insert(p.key()).second) held_out.push_back(p);
    }
    const auto training_problem = [&](r1::Rng& rng) {
      while (true)
        if (const Problem p = draw_problem(rng); !held_out_keys.count(p.key())) return p;
    };

    r1::Model<float> model(small_deepseek_v3(tokenizer.vocab_size(), task.bos, task.eos));
    r1::init_weights(model, seeds);
    int64_t parameters = 0;
    model.visit([&](const std::string&, r1::Tensor<float>& t) { parameters += t.numel(); });
    fmt::print("model: DeepSeek-V3 architecture (MLA, 1 dense + 1 MoE layer, 8 experts top-2 + 1 shared), {} parameters, "
               "vocab {}\n", parameters, tokenizer.vocab_size());
    const auto save = [&](const fs::path& dir) {
      r1::save_pretrained(model, dir);
      r1::write_file_atomic(dir / "tokenizer.json", [&](std::ostream& o) { o << tokenizer_file; });
    };

    // 1. Base model: next-token loss on the completions (prompt tokens are not targets).
    auto t0 = std::chrono::steady_clock::now();
    constexpr int64_t kBatch = 32;
    r1::TrainConfig pretrain;
    pretrain.steps = pretrain_steps;
    pretrain.adamw.lr = 3e-3;
    pretrain.warmup_steps = std::max<int64_t>(1, pretrain_steps / 20);
    pretrain.min_lr = 3e-4;
    pretrain.metrics_file = out / "pretrain.jsonl";
    pretrain.progress = progress;
    r1::Trainer trainer(model, pretrain, seeds.next_u64());
    const auto examples = [&](int64_t, int64_t, r1::Rng& rng, r1::Batch& b) {
      std::vector<std::vector<int32_t>> sequences;
      std::vector<std::size_t> prompt_lengths;
      std::size_t longest = 0;
      for (int64_t i = 0; i < kBatch; ++i) {
        const Problem p = training_problem(rng);
        std::vector<int32_t> ids = task.prompt_ids(p);
        prompt_lengths.push_back(ids.size());
        for (const int32_t id : tokenizer.encode(pretraining_completion(p, 0.5, rng))) ids.push_back(id);
        ids.push_back(task.eos);
        longest = std::max(longest, ids.size());
        sequences.push_back(std::move(ids));
      }
      const auto S = static_cast<int64_t>(longest) - 1;
      b.ids.resize(r1::Shape{kBatch, S});
      b.targets.resize(r1::Shape{kBatch, S});
      for (int64_t i = 0; i < kBatch; ++i) {
        const auto& q = sequences[i];
        for (int64_t s = 0; s < S; ++s) {
          const auto next = static_cast<std::size_t>(s + 1);
          b.ids(i, s) = next < q.size() ? q[s] : task.eos;  // right padding, never a target
          b.targets(i, s) = next < q.size() && next >= prompt_lengths[i] ? q[next] : -100;
        }
      }
    };
    r1::StepMetrics last;
    for (int64_t s = 0; s < pretrain_steps; ++s) last = trainer.step(examples);
    if (progress) *progress << '\n';
    const double pretrain_seconds = seconds_since(t0);
    save(out / "base");
    fmt::print("pre-training: {} steps of {} examples (half careful, half lazy), loss {:.3f}, {:.1f} s\n", pretrain_steps,
               kBatch, last.main_loss, pretrain_seconds);

    t0 = std::chrono::steady_clock::now();
    const Eval before = evaluate(model, task, held_out);
    double eval_seconds = seconds_since(t0);
    fmt::print("base model: held-out pass@1 {:.3f}\n", before.pass_at_1);

    // 2. GRPO with the countdown reward only.
    r1::RewardSet rewards;
    rewards.add("countdown", [](const r1::Completion& c) {
      const Problem p = parse_prompt(c.prompt);
      return r1::countdown_reward(c.text, p.target, p.numbers);
    });
    r1::GrpoTrainerConfig grpo;
    grpo.prompts_per_step = 16;
    grpo.group_size = 8;
    grpo.max_new_tokens = kMaxNewTokens;
    grpo.stop_tokens = {task.eos};
    grpo.loss.epsilon_high = 0.28;  // DAPO's clip-higher; beta 0 (no reference model), dapo loss
    grpo.adamw.lr = 3e-4;
    grpo.total_steps = rl_steps;
    grpo.metrics_file = out / "grpo.jsonl";
    grpo.progress = progress;
    r1::GrpoTrainer rl(model, tokenizer, rewards, grpo, seeds.next_u64());
    const auto next_prompt = [&](r1::Rng& rng) {
      const Problem p = training_problem(rng);
      return r1::RlPrompt{task.prompt_ids(p), p.prompt(), std::to_string(p.target)};
    };
    std::vector<double> reward;
    std::vector<std::pair<int64_t, double>> pass_at_1{{0, before.pass_at_1}};
    double rl_seconds = 0.0;
    Eval after = before;
    std::ofstream eval_log(out / "eval.jsonl");
    R1_CHECK(eval_log.good(), "[r1_zero] cannot write ", (out / "eval.jsonl").string());
    eval_log << nlohmann::json{{"step", 0}, {"pass_at_1", before.pass_at_1}}.dump() << std::endl;
    for (int64_t s = 1; s <= rl_steps; ++s) {
      t0 = std::chrono::steady_clock::now();
      reward.push_back(rl.step(next_prompt).rewards.reward_mean);
      rl_seconds += seconds_since(t0);
      if (s % eval_every != 0 && s != rl_steps) continue;
      t0 = std::chrono::steady_clock::now();
      after = evaluate(model, task, held_out);
      eval_seconds += seconds_since(t0);
      pass_at_1.emplace_back(s, after.pass_at_1);
      eval_log << nlohmann::json{{"step", s}, {"pass_at_1", after.pass_at_1}}.dump() << std::endl;
      if (progress) *progress << '\n';
      const std::size_t window = std::min<std::size_t>(reward.size(), static_cast<std::size_t>(eval_every));
      const double recent = std::accumulate(reward.end() - static_cast<std::ptrdiff_t>(window), reward.end(), 0.0) / window;
      fmt::print("GRPO step {:4d}: mean reward of the last {} steps {:.3f}, held-out pass@1 {:.3f}\n", s, window, recent,
                 after.pass_at_1);
    }
    save(out / "rl");
    write_plot(out / "r1_zero.svg", reward, pass_at_1);
    fmt::print("after GRPO: held-out pass@1 {:.3f} (base {:.3f})\n", after.pass_at_1, before.pass_at_1);
    for (std::size_t i = 0; i < held_out.size(); ++i)
      if (after.solved[i] && !before.solved[i]) {
        fmt::print("  {}\n    base: {}\n    RL:   {}\n", held_out[i].prompt(), before.completions[i], after.completions[i]);
        break;
      }
    fmt::print("metrics, plot and models in {}\n", out.string());
    nlohmann::ordered_json summary{{"pass_at_1_before", before.pass_at_1}, {"pass_at_1_after", after.pass_at_1},
                                   {"seconds", seconds_since(start)}, {"pretrain_seconds", pretrain_seconds},
                                   {"rl_seconds", rl_seconds}, {"eval_seconds", eval_seconds}};
    fmt::print("{}\n", summary.dump());
    // What the example shows: RL raised held-out pass@1 (too few steps to tell with --quick).
    return quick || after.pass_at_1 > before.pass_at_1 ? 0 : 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "r1_zero: {}\n", e.what());
    return 1;
  }
}
