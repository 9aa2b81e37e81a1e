// bench_tokenizer: load time and encode throughput of r1's byte-level BPE tokenizer
// (r1/tokenizer.hpp) on a corpus of mixed natural-language and code text.
//
// What is measured
//   tokenizer.load          Tokenizer::from_file: read + parse tokenizer.json + build tables;
//                           best and median of 5 loads.
//   tokenizer.encode        encode(chunk) over every 16 KiB chunk of the corpus on 1 thread:
//                           mb_per_s = corpus bytes / seconds (MB = 1e6 bytes). cold_mb_per_s
//                           is the first pass of a freshly loaded tokenizer (empty word
//                           cache), mb_per_s the best later pass.
//   tokenizer.encode_batch  encode_batch(all chunks) on 2 threads (r1::set_num_threads).
//   tokenizer.parity        with --compare-ids: chunks whose ids differ from a reference's.
//   Corpus: UTF-8 text files (no NUL bytes) from /usr/share/doc (README, copyright, HTML,
//   Markdown, examples; compressed files skipped) and /usr/include (C and C++ headers), half
//   and half, files taken in a fixed pseudo-random order of their paths, cut into 16 KiB
//   chunks at UTF-8 boundaries. What is installed differs between machines, so compare
//   numbers measured on one machine (the "corpus" fields say what was read).
//
// Peer: HF tokenizers (Rust, via node) on the same chunks, single thread:
//   bench_tokenizer --dump-corpus DIR          # DIR/chunks.json
//   node tests/fixtures/tokenizer/peer_hf_encode.js TOKENIZER_JSON DIR   # DIR/hf_ids.json
//   bench_tokenizer --compare-ids DIR/hf_ids.json
//
// Output: one JSON object per line on stdout (notes on stderr), e.g.
//   {"name":"tokenizer.encode","threads":1,"mb_per_s":...,"cold_mb_per_s":...,"tokens":...}
//
// Usage: bench_tokenizer [--tokenizer FILE] [--corpus-mb N] [--quick] [--dump-corpus DIR]
//                        [--compare-ids FILE]
//   FILE defaults to ${R1_CACHE:-~/.cache/r1}/tokenizers/deepseek_v3/tokenizer.json
//   (scripts/fetch-tokenizers.sh); N defaults to 12 (MB).
#include "common.hpp"

#include <r1/tokenizer.hpp>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace {

struct Options {
  std::string tokenizer;
  double corpus_mb = 12;
  bool quick = false;
  std::string dump_corpus, compare_ids;
};

Options parse(int argc, char** argv) {
  Options opt;
  const char* cache = std::getenv("R1_CACHE");
  const char* home = std::getenv("HOME");
  opt.tokenizer = (cache && *cache ? std::string(cache) : std::string(home ? home : ".") + "/.cache/r1") +
                  "/tokenizers/deepseek_v3/tokenizer.json";
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const bool has_value = i + 1 < argc;
    if (arg == "--tokenizer" && has_value) {
      opt.tokenizer = argv[++i];
    } else if (arg == "--corpus-mb" && has_value) {
      opt.corpus_mb = std::atof(argv[++i]);
    } else if (arg == "--quick") {
      opt.quick = true;
    } else if (arg == "--dump-corpus" && has_value) {
      opt.dump_corpus = argv[++i];
    } else if (arg == "--compare-ids" && has_value) {
      opt.compare_ids = argv[++i];
    } else {
      std::fprintf(stderr, "usage: bench_tokenizer [--tokenizer FILE] [--corpus-mb N] [--quick] [--dump-corpus DIR] [--compare-ids FILE]\n");
      std::exit(2);
    }
  }
  if (opt.quick) opt.corpus_mb = std::min(opt.corpus_mb, 2.0);
  return opt;
}

uint64_t fnv1a64(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (const char c : s) h = (h ^ static_cast<uint8_t>(c)) * 1099511628211ull;
  return h;
}

// Valid UTF-8 text files under root, in a fixed pseudo-random order (a hash of the path), so
// that the corpus samples many packages instead of the alphabetically first ones.
std::vector<std::filesystem::path> text_files(const std::string& root) {
  std::vector<std::pair<uint64_t, std::filesystem::path>> files;
  std::error_code ec;
  for (auto it = std::filesystem::recursive_directory_iterator(root, std::filesystem::directory_options::skip_permission_denied, ec);
       it != std::filesystem::recursive_directory_iterator(); it.increment(ec)) {
    if (ec) break;
    if (!it->is_regular_file(ec) || it->is_symlink(ec)) continue;
    const std::string ext = it->path().extension().string();
    if (ext == ".gz" || ext == ".xz" || ext == ".bz2" || ext == ".zst" || ext == ".pdf" || ext == ".png" || ext == ".jpg") continue;
    if (it->file_size(ec) > (1u << 20)) continue;
    files.emplace_back(fnv1a64(it->path().string()), it->path());
  }
  std::sort(files.begin(), files.end());
  std::vector<std::filesystem::path> out;
  for (auto& f : files) out.push_back(std::move(f.second));
  return out;
}

// Appends files to text until it holds `bytes` more bytes; returns how many files it took.
size_t take_files(const std::vector<std::filesystem::path>& files, size_t bytes, std::string& text) {
  const size_t target = text.size() + bytes;
  size_t taken = 0;
  for (const auto& path : files) {
    if (text.size() >= target) break;
    std::ifstream in(path, std::ios::binary);
    std::string content((std::istreambuf_iterator<char>(in)), {});
    if (content.empty() || content.find('\0') != std::string::npos) continue;
    if (r1::detail::tok::invalid_utf8_offset(content) != std::string_view::npos) continue;
    text += content;
    ++taken;
  }
  return taken;
}

// 16 KiB chunks, each ending at a UTF-8 boundary.
std::vector<std::string> chunk(const std::string& text) {
  std::vector<std::string> chunks;
  size_t begin = 0;
  while (begin < text.size()) {
    size_t end = std::min(text.size(), begin + 16384);
    while (end < text.size() && (static_cast<uint8_t>(text[end]) & 0xC0) == 0x80) --end;
    chunks.push_back(text.substr(begin, end - begin));
    begin = end;
  }
  return chunks;
}

}  // namespace

int main(int argc, char** argv) {
  const Options opt = parse(argc, argv);
  r1::bench::start(argv, false);
  if (!std::filesystem::exists(opt.tokenizer)) {
    std::fprintf(stderr, "bench_tokenizer: %s not found; run scripts/fetch-tokenizers.sh or pass --tokenizer\n", opt.tokenizer.c_str());
    return 1;
  }

  std::string text;
  const size_t half = static_cast<size_t>(opt.corpus_mb * 0.5e6);
  const size_t doc_files = take_files(text_files("/usr/share/doc"), half, text);
  const size_t doc_bytes = text.size();
  const size_t code_files = take_files(text_files("/usr/include"), half, text);
  const std::vector<std::string> chunks = chunk(text);
  std::printf("{\"name\":\"corpus\",\"bytes\":%zu,\"doc_bytes\":%zu,\"doc_files\":%zu,\"code_bytes\":%zu,\"code_files\":%zu,\"chunks\":%zu}\n",
              text.size(), doc_bytes, doc_files, text.size() - doc_bytes, code_files, chunks.size());
  std::fflush(stdout);
  if (text.size() < static_cast<size_t>(opt.corpus_mb * 0.9e6))
    std::fprintf(stderr, "warning: only %.1f MB of text found\n", text.size() / 1e6);

  if (!opt.dump_corpus.empty()) {
    std::filesystem::create_directories(opt.dump_corpus);
    std::ofstream(opt.dump_corpus + "/chunks.json") << nlohmann::json(chunks).dump();
    std::fprintf(stderr, "wrote %s/chunks.json\n", opt.dump_corpus.c_str());
  }

  std::vector<double> loads;
  for (int i = 0; i < 5; ++i) {
    const double t0 = r1::bench::now_seconds();
    const r1::Tokenizer t = r1::Tokenizer::from_file(opt.tokenizer);
    loads.push_back(r1::bench::now_seconds() - t0);
  }
  const r1::bench::Stats load = r1::bench::summarize(loads, 1);
  std::printf("{\"name\":\"tokenizer.load\",\"file\":\"%s\",\"best_ms\":%.1f,\"median_ms\":%.1f}\n", opt.tokenizer.c_str(),
              load.best * 1e3, load.median * 1e3);
  std::fflush(stdout);

  const r1::Tokenizer tokenizer = r1::Tokenizer::from_file(opt.tokenizer);
  const double mb = text.size() / 1e6;
  r1::set_num_threads(1);
  size_t tokens = 0;
  std::vector<std::vector<int32_t>> ids(chunks.size());
  const auto pass = [&] {
    tokens = 0;
    for (size_t i = 0; i < chunks.size(); ++i) {
      ids[i] = tokenizer.encode(chunks[i]);
      tokens += ids[i].size();
    }
  };
  double t0 = r1::bench::now_seconds();
  pass();
  const double cold = r1::bench::now_seconds() - t0;

  r1::bench::TimingPlan plan;
  plan.budget_s = opt.quick ? 0.5 : 3.0;
  plan.min_repeats = 2;
  plan.max_repeats = 5;
  const auto single = r1::bench::least_disturbed([&] { return r1::bench::time_calls(pass, plan); });
  std::printf("{\"name\":\"tokenizer.encode\",\"threads\":1,\"mb_per_s\":%.2f,\"median_mb_per_s\":%.2f,\"cold_mb_per_s\":%.2f,"
              "\"tokens\":%zu,\"bytes_per_token\":%.3f,\"others_cpu\":%.2f}\n",
              mb / single.first.best, mb / single.first.median, mb / cold, tokens, text.size() / double(tokens), single.second);
  std::fflush(stdout);

  r1::set_num_threads(2);
  const auto batch = r1::bench::least_disturbed([&] {
    return r1::bench::time_calls([&] { return tokenizer.encode_batch(chunks); }, plan);
  });
  std::printf("{\"name\":\"tokenizer.encode_batch\",\"threads\":2,\"mb_per_s\":%.2f,\"median_mb_per_s\":%.2f,\"others_cpu\":%.2f}\n",
              mb / batch.first.best, mb / batch.first.median, batch.second);
  std::fflush(stdout);

  if (!opt.compare_ids.empty()) {
    std::ifstream in(opt.compare_ids);
    const nlohmann::json reference = nlohmann::json::parse(in);
    size_t differing = 0, first = chunks.size();
    for (size_t i = 0; i < chunks.size(); ++i) {
      if (i < reference.size() && reference[i].get<std::vector<int32_t>>() == ids[i]) continue;
      ++differing;
      first = std::min(first, i);
    }
    std::printf("{\"name\":\"tokenizer.parity\",\"chunks\":%zu,\"differing\":%zu,\"first_differing\":%zd}\n", chunks.size(), differing,
                differing ? static_cast<ssize_t>(first) : -1);
  }
  return 0;
}
