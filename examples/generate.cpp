// generate: sample from an HF model directory (config.json + safetensors, and
// tokenizer.json for text prompts), with the latent KV cache.
//
//   generate --model DIR (--prompt TEXT | --ids a,b,c) [--max-new-tokens N] [--temperature T]
//            [--top-p P] [--top-k K] [--seed S] [--logits-out FILE.npy] [--threads N]
//
// With --prompt the text is encoded with the tokenizer's special tokens (BOS where it asks
// for one) and the completion streams to stdout as it is sampled; with --ids the new ids
// are printed. --logits-out writes the prompt's logits, float32 [prompt_tokens, vocab], as
// .npy (it works with --max-new-tokens 0). A summary goes to stderr.
#include <r1/generate.hpp>
#include <r1/io.hpp>
#include <r1/model.hpp>
#include <r1/parallel.hpp>
#include <r1/tokenizer.hpp>

#include <fmt/core.h>

#include <charconv>
#include <cstdio>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace {

struct Args {
  std::filesystem::path model;
  std::optional<std::string> prompt, ids, logits_out;
  r1::GenerationConfig generation;
  int threads = 2;
};

int usage(const std::string& problem) {
  fmt::print(stderr, "generate: {}\nusage: generate --model DIR (--prompt TEXT | --ids a,b,c) [--max-new-tokens N] "
                     "[--temperature T] [--top-p P] [--top-k K] [--seed S] [--logits-out FILE.npy] [--threads N]\n",
             problem);
  return 2;
}

std::vector<int32_t> parse_ids(const std::string& list) {
  std::vector<int32_t> ids;
  const char* p = list.data();
  const char* end = list.data() + list.size();
  while (true) {
    int32_t id = 0;
    const auto [next, ec] = std::from_chars(p, end, id);
    R1_CHECK(ec == std::errc() && (next == end || *next == ','), "[generate] --ids '", list,
             "' is not a comma-separated list of integers (at character ", p - list.data(), ")");
    ids.push_back(id);
    if (next == end) return ids;
    p = next + 1;
  }
}

}  // namespace

int main(int argc, char** argv) {
  Args args;
  args.generation.max_new_tokens = 64;
  std::map<std::string, std::string> flags;
  for (int i = 1; i < argc; i += 2) {
    const std::string name = argv[i];
    if (name.rfind("--", 0) != 0 || i + 1 >= argc) return usage("expected --flag VALUE pairs, got '" + name + "'");
    flags[name.substr(2)] = argv[i + 1];
  }
  try {
    for (const auto& [name, value] : flags) {
      if (name == "model") {
        args.model = value;
      } else if (name == "prompt") {
        args.prompt = value;
      } else if (name == "ids") {
        args.ids = value;
      } else if (name == "logits-out") {
        args.logits_out = value;
      } else if (name == "max-new-tokens") {
        args.generation.max_new_tokens = std::stoll(value);
      } else if (name == "temperature") {
        args.generation.sampling.temperature = std::stod(value);
      } else if (name == "top-p") {
        args.generation.sampling.top_p = std::stod(value);
      } else if (name == "top-k") {
        args.generation.sampling.top_k = std::stoll(value);
      } else if (name == "seed") {
        args.generation.seed = std::stoull(value);
      } else if (name == "threads") {
        args.threads = std::stoi(value);
      } else {
        return usage("unknown flag --" + name);
      }
    }
    if (args.model.empty()) return usage("--model is required");
    if (args.prompt.has_value() == args.ids.has_value()) return usage("give exactly one of --prompt and --ids");
    r1::set_num_threads(args.threads);

    const auto model = r1::load_pretrained<float>(args.model, {.mtp = false});
    std::optional<r1::Tokenizer> tokenizer;
    std::vector<int32_t> prompt;
    if (args.prompt) {
      tokenizer.emplace(r1::Tokenizer::from_file((args.model / "tokenizer.json").string()));
      prompt = tokenizer->encode(*args.prompt, /*add_special_tokens=*/true);
      if (tokenizer->eos_id()) args.generation.stop_tokens.push_back(*tokenizer->eos_id());
    } else {
      prompt = parse_ids(*args.ids);
    }
    if (args.generation.stop_tokens.empty() && model.config.eos_token_id)
      args.generation.stop_tokens.push_back(static_cast<int32_t>(*model.config.eos_token_id));
    R1_CHECK(!prompt.empty(), "[generate] the prompt encodes to no tokens");

    if (args.logits_out) {
      const auto len = static_cast<int64_t>(prompt.size());
      r1::InferenceCache<float> cache(model, (len + 63) / 64);
      const int64_t seq = cache.add_sequence();
      const auto& logits = r1::forward_cached(model, r1::View<const int32_t>(prompt.data(), r1::Shape{1, len}), {seq}, cache);
      r1::write_npy(*args.logits_out, logits.view().reshape(r1::Shape{len, model.config.vocab_size}));
    }

    std::optional<r1::StreamDecoder> stream;
    if (tokenizer) {
      stream.emplace(*tokenizer, /*skip_special_tokens=*/true);
      fmt::print("{}", *args.prompt);
    }
    const auto result = r1::generate(model, {prompt}, args.generation, [&](int64_t, int32_t id) {
      if (stream) {
        fmt::print("{}", stream->step(id));
        std::fflush(stdout);
      }
    });
    if (stream) {
      fmt::print("{}\n", stream->finish());
    } else {
      std::string line;
      for (const int32_t id : result.tokens[0]) line += (line.empty() ? "" : " ") + std::to_string(id);
      fmt::print("{}\n", line);
    }
    const double decode_rate =
        result.decode_seconds > 0.0 ? static_cast<double>(result.generated_tokens - 1) / result.decode_seconds : 0.0;
    fmt::print(stderr, "generate: {} prompt tokens, {} new ({}), prefill {:.3f} s, decode {:.1f} tokens/s\n",
               result.prompt_tokens, result.generated_tokens,
               result.finish[0] == r1::FinishReason::Stop ? "stop token" : "length", result.prefill_seconds, decode_rate);
  } catch (const std::exception& e) {
    fmt::print(stderr, "generate: {}\n", e.what());
    return 1;
  }
  return 0;
}
