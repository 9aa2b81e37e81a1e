// Tests for r1/bpe_trainer.hpp.
//
// Parity with HF tokenizers 0.22, from tests/fixtures/bpe_trainer/ (gen_bpe_trainer_fixtures.js):
//   - r1 retrains the committed tokenizer files from corpus.txt byte for byte
//     (R1_UPDATE_FIXTURES=1 rewrites them instead);
//   - HF loaded those files and encoded 222 strings: r1's Tokenizer gives the same ids;
//   - HF's own BpeTrainer, fed corpus.txt line by line with each file's pre-tokenizer,
//     learned the merges r1 learns, ties included, down to the last count-1 merge.
// Self-contained: the worked example, the tie rule, overlapping pairs, a naive reference
// trainer on random corpora, min_frequency, vocab_size, special tokens, the written file,
// errors and save.
#include <r1/bpe_trainer.hpp>

#include "support.hpp"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>

#include <unistd.h>

using r1::BpeTrainer;
using r1::BpeTrainerConfig;
using r1::Tokenizer;
using nlohmann::json;
using Merges = std::vector<std::pair<std::string, std::string>>;

namespace {

const std::string kFixtures = R1_FIXTURE_DIR "/bpe_trainer/";
const std::string kBos = "<\uFF5Cbegin\u2581of\u2581sentence\uFF5C>", kEos = "<\uFF5Cend\u2581of\u2581sentence\uFF5C>";
const std::string kUser = "<\uFF5CUser\uFF5C>", kAssistant = "<\uFF5CAssistant\uFF5C>";

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  REQUIRE(in.good());
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// The lines of text, each with its "\n", as HF's train_from_files feeds a file.
std::vector<std::string_view> lines_of(std::string_view text) {
  std::vector<std::string_view> lines;
  for (size_t begin = 0; begin < text.size();) {
    const size_t newline = text.find('\n', begin);
    const size_t end = newline == std::string_view::npos ? text.size() : newline + 1;
    lines.push_back(text.substr(begin, end - begin));
    begin = end;
  }
  return lines;
}

// One piece per feed: ByteLevel without a regex splits nothing.
const std::string kWholeText = R"({"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":false})";

BpeTrainerConfig whole_text_config(int64_t vocab_size, int64_t min_frequency = 1) {
  BpeTrainerConfig config;
  config.vocab_size = vocab_size;
  config.min_frequency = min_frequency;
  config.pre_tokenizer = kWholeText;
  return config;
}

Merges train_words(const std::vector<std::pair<std::string, int>>& words, BpeTrainerConfig config) {
  BpeTrainer trainer(std::move(config));
  for (const auto& [word, count] : words)
    for (int i = 0; i < count; ++i) trainer.feed(word);
  trainer.train();
  return trainer.merges();
}

// The committed tokenizer files: how r1 trained each from corpus.txt.
struct TrainedFixture {
  std::string name;
  BpeTrainerConfig config;
  bool by_line;  // feed corpus.txt line by line instead of whole
};

std::vector<TrainedFixture> trained_fixtures() {
  std::vector<TrainedFixture> fixtures;
  BpeTrainerConfig deepseek;
  deepseek.vocab_size = 800;
  deepseek.special_tokens = {kBos, kEos, kUser, kAssistant};
  deepseek.bos_token = kBos;
  fixtures.push_back({"deepseek_v3", deepseek, false});

  BpeTrainerConfig gpt2;
  gpt2.vocab_size = 600;
  gpt2.min_frequency = 3;
  gpt2.pre_tokenizer = "gpt2";
  gpt2.special_tokens = {"<|endoftext|>"};
  fixtures.push_back({"gpt2", gpt2, false});

  // Llama-3's Split, and a ByteLevel that puts a space before every piece.
  BpeTrainerConfig llama;
  llama.vocab_size = 500;
  llama.special_tokens = {"<|begin_of_text|>", "<|end_of_text|>"};
  llama.bos_token = "<|begin_of_text|>";
  llama.pre_tokenizer =
      json{{"type", "Sequence"},
           {"pretokenizers",
            {{{"type", "Split"}, {"pattern", {{"Regex", r1::PreTokenizer::pattern_regex(r1::PreTokenizer::Pattern::Llama3)}}}, {"behavior", "Isolated"}, {"invert", false}},
             {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", false}}}}}
          .dump();
  fixtures.push_back({"llama3_prefix", llama, true});
  return fixtures;
}

const json& cases() {
  static const json data = json::parse(read_text(kFixtures + "bpe_trainer_cases.json"));
  return data;
}

uint32_t fnv1a(std::string_view bytes, uint32_t h) {
  for (const char b : bytes) h = (h ^ static_cast<uint8_t>(b)) * 16777619u;
  return h;
}

// A naive trainer (minbpe's shape): recount every pair of every word before each merge.
// Ids as HF's trainer: bytes by their byte-level character, then learned tokens in order.
Merges naive_train(const std::map<std::string, int64_t>& word_counts, int64_t max_merges, int64_t min_frequency) {
  const r1::detail::tok::ByteAlphabet& alphabet = r1::detail::tok::byte_alphabet();
  std::vector<std::string> tokens;  // id -> byte-level string
  std::array<int32_t, 256> id_of{};
  std::vector<int> bytes(256);
  for (int b = 0; b < 256; ++b) bytes[b] = b;
  std::sort(bytes.begin(), bytes.end(), [&](int x, int y) { return alphabet.char_of[x] < alphabet.char_of[y]; });
  for (int b : bytes) {
    id_of[b] = static_cast<int32_t>(tokens.size());
    tokens.push_back(r1::detail::tok::byte_level_encode(std::string(1, static_cast<char>(b))));
  }
  std::vector<std::pair<std::vector<int32_t>, int64_t>> words;
  for (const auto& [word, count] : word_counts) {
    std::vector<int32_t> ids;
    for (const char b : word) ids.push_back(id_of[static_cast<uint8_t>(b)]);
    words.emplace_back(std::move(ids), count);
  }
  Merges merges;
  while (static_cast<int64_t>(merges.size()) < max_merges) {
    std::map<std::pair<int32_t, int32_t>, int64_t> counts;
    for (const auto& [ids, count] : words)
      for (size_t i = 0; i + 1 < ids.size(); ++i) counts[{ids[i], ids[i + 1]}] += count;
    std::pair<int32_t, int32_t> best{-1, -1};
    int64_t best_count = 0;
    for (const auto& [pair, count] : counts)  // map order: the first of equal counts is the smallest pair
      if (count > best_count) best = pair, best_count = count;
    if (best_count == 0 || best_count < min_frequency) break;
    const int32_t token = static_cast<int32_t>(tokens.size());
    tokens.push_back(tokens[best.first] + tokens[best.second]);
    merges.emplace_back(tokens[best.first], tokens[best.second]);
    for (auto& [ids, count] : words) {
      std::vector<int32_t> out;
      for (size_t i = 0; i < ids.size();) {
        if (i + 1 < ids.size() && ids[i] == best.first && ids[i + 1] == best.second) {
          out.push_back(token);
          i += 2;
        } else {
          out.push_back(ids[i++]);
        }
      }
      ids = std::move(out);
    }
  }
  return merges;
}

}  // namespace

TEST_CASE("bpe_trainer: worked example, HF's course words", "[bpe_trainer]") {
  // pairs u g = 20, p u = 17, u n = 16, h u = 15: merge "u g", then "u n" (p u fell to 12),
  // "h ug", "p un"; then "p ug" and "hug s" tie at 5 and "p" has the smaller id.
  const Merges merges = train_words({{"hug", 10}, {"pug", 5}, {"pun", 12}, {"bun", 4}, {"hugs", 5}}, whole_text_config(1000));
  const Merges expected = {{"u", "g"}, {"u", "n"}, {"h", "ug"}, {"p", "un"}, {"p", "ug"}, {"hug", "s"}, {"b", "un"}};
  CHECK(merges == expected);
}

TEST_CASE("bpe_trainer: ties go to the smaller pair in byte-level character order", "[bpe_trainer]") {
  // ' ' is 'Ġ' (U+0120), after 'x' (U+0078): "x y" wins although 0x20 < 0x78.
  CHECK(train_words({{" x", 1}, {"xy", 1}}, whole_text_config(257)) == Merges{{"x", "y"}});
  CHECK(train_words({{" x", 1}, {"xy", 1}}, whole_text_config(258)) == Merges{{"x", "y"}, {"Ġ", "x"}});
  // Bytes below 0x21 come after every printable one too: "\n" is 'Ċ' (U+010A).
  CHECK(train_words({{"\na", 1}, {"~a", 1}}, whole_text_config(257)) == Merges{{"~", "a"}});
  // Learned tokens come after all bytes: "z c" beats "ab ab" at count 1.
  CHECK(train_words({{"abab", 1}, {"zc", 1}, {"ab", 1}}, whole_text_config(258)) == Merges{{"a", "b"}, {"z", "c"}});
}

TEST_CASE("bpe_trainer: overlapping pairs merge left to right", "[bpe_trainer]") {
  // a a a a a -> aa aa a (count 4 merged once per position, not 4 times); then (aa, a) and
  // (aa, aa) tie at 1 and 'a' < "aa".
  CHECK(train_words({{"aaaaa", 1}}, whole_text_config(1000)) == Merges{{"a", "a"}, {"aa", "a"}, {"aa", "aaa"}});
  CHECK(train_words({{"aaa", 3}}, whole_text_config(1000)) == Merges{{"a", "a"}, {"aa", "a"}});
}

TEST_CASE("bpe_trainer: matches a naive recount-every-merge trainer on random corpora", "[bpe_trainer]") {
  std::mt19937 rng(1234);
  for (int round = 0; round < 60; ++round) {
    const std::vector<std::string> alphabet = round % 3 == 0   ? std::vector<std::string>{"a", "b"}
                                              : round % 3 == 1 ? std::vector<std::string>{"a", "b", "c", " "}
                                                               : std::vector<std::string>{"a", "\xC3\xA9", " ", "\n"};
    const int64_t min_frequency = round % 4;
    std::map<std::string, int64_t> words;
    BpeTrainerConfig config = whole_text_config(256 + 40 + round % 30, min_frequency);
    BpeTrainer trainer(config);
    const int count = 2 + static_cast<int>(rng() % 30);
    for (int w = 0; w < count; ++w) {
      std::string word;
      const int length = 1 + static_cast<int>(rng() % 14);
      for (int i = 0; i < length; ++i) word += alphabet[rng() % alphabet.size()];
      const int repeat = 1 + static_cast<int>(rng() % 5);
      for (int k = 0; k < repeat; ++k) trainer.feed(word);
      words[word] += repeat;
    }
    trainer.train();
    INFO("round " << round);
    CHECK(trainer.merges() == naive_train(words, config.vocab_size - 256, min_frequency));
  }
}

TEST_CASE("bpe_trainer: min_frequency and vocab_size stop training", "[bpe_trainer]") {
  const std::vector<std::pair<std::string, int>> words = {{"ab", 2}, {"cd", 1}};
  CHECK(train_words(words, whole_text_config(1000, 2)) == Merges{{"a", "b"}});
  CHECK(train_words(words, whole_text_config(1000, 3)).empty());
  CHECK(train_words(words, whole_text_config(1000, 0)) == Merges{{"a", "b"}, {"c", "d"}});  // 0 acts as 1
  CHECK(train_words(words, whole_text_config(257, 1)) == Merges{{"a", "b"}});
  CHECK(train_words(words, whole_text_config(256, 1)).empty());

  BpeTrainerConfig config = whole_text_config(257);
  config.special_tokens = {"<s>", "</s>"};
  REQUIRE_R1_ERROR(BpeTrainer{config}, "[BpeTrainer] vocab_size 257 is smaller than the 2 special tokens plus the 256 byte tokens (258)");
  config.vocab_size = 258;
  BpeTrainer trainer(config);
  trainer.feed("ababab");
  trainer.train();
  CHECK(trainer.merges().empty());
  CHECK(Tokenizer::from_json(trainer.to_json()).vocab_size() == 258);
}

TEST_CASE("bpe_trainer: special tokens are cut out of the corpus and take the first ids", "[bpe_trainer]") {
  BpeTrainerConfig config = whole_text_config(300);
  config.special_tokens = {"<|s|>", "<|sep|>"};
  BpeTrainer trainer(config);
  for (int i = 0; i < 5; ++i) trainer.feed("xy<|s|>zw<|sep|><|s|>");
  trainer.train();
  // Without cutting, "y<" or "|s" would be frequent pairs; "x y" and "z w" are the only
  // pairs left, so nothing merges across a special token.
  CHECK(trainer.merges() == Merges{{"x", "y"}, {"z", "w"}});

  const Tokenizer t = Tokenizer::from_json(trainer.to_json());
  CHECK(t.token_to_id("<|s|>") == 0);
  CHECK(t.token_to_id("<|sep|>") == 1);
  CHECK(t.is_special(0));
  CHECK(t.token_to_id("!") == 2);
  CHECK(t.token_to_id("\xC4\x80") == 2 + 188);  // 'Ā', byte 0x00, after the 188 printable bytes
  CHECK(t.token_to_id("xy") == 2 + 256);
  CHECK(t.encode("xy<|s|>zw") == std::vector<int32_t>{2 + 256, 0, 2 + 257});
  CHECK_FALSE(t.bos_id().has_value());

  config.special_tokens = {"a"};  // the byte token "a" has that spelling already
  BpeTrainer clash(config);
  REQUIRE_R1_ERROR(clash.train(), "[BpeTrainer.train] special token \"a\" equals a byte-level vocab token");
}

TEST_CASE("bpe_trainer: empty corpus, repeated training, feed order", "[bpe_trainer]") {
  BpeTrainer empty(BpeTrainerConfig{});
  REQUIRE_R1_ERROR(empty.to_json(), "[BpeTrainer.to_json] nothing learned yet: call train() first");
  empty.feed("");
  empty.train();
  CHECK(empty.merges().empty());
  const Tokenizer bytes_only = Tokenizer::from_json(empty.to_json());
  CHECK(bytes_only.vocab_size() == 256);
  CHECK(bytes_only.encode("hi") == std::vector<int32_t>{'h' - '!', 'i' - '!'});

  // train() learns from everything fed so far; the order of feeds does not matter.
  const std::vector<std::string> texts = {"the cat sat on the mat", "the dog ate the cat food", "1234 5678 the end\n\n"};
  BpeTrainer forward(BpeTrainerConfig{}), backward(BpeTrainerConfig{});
  forward.feed(texts[0]);
  forward.train();
  const Merges first = forward.merges();
  for (size_t i = 1; i < texts.size(); ++i) forward.feed(texts[i]);
  forward.train();
  for (size_t i = texts.size(); i-- > 0;) backward.feed(texts[i]);
  backward.train();
  CHECK(forward.merges() == backward.merges());
  CHECK(forward.merges() != first);
  CHECK(forward.to_json() == backward.to_json());
}

TEST_CASE("bpe_trainer: the written tokenizer.json", "[bpe_trainer]") {
  BpeTrainerConfig config;
  config.vocab_size = 300;
  config.special_tokens = {"<bos>", "<eos>"};
  config.bos_token = "<eos>";
  BpeTrainer trainer(config);
  trainer.feed("hello hello hello world world 123 123\n");
  trainer.train();
  const json j = json::parse(trainer.to_json());
  CHECK(j["normalizer"].is_null());
  CHECK(j["added_tokens"][1] == json{{"id", 1}, {"content", "<eos>"}, {"single_word", false}, {"lstrip", false}, {"rstrip", false},
                                     {"normalized", false}, {"special", true}});
  CHECK(j["pre_tokenizer"]["pretokenizers"].size() == 4);
  CHECK(j["post_processor"]["processors"][1]["special_tokens"]["<eos>"]["ids"] == json::array({1}));
  CHECK(j["decoder"]["type"] == "ByteLevel");
  const json& model = j["model"];
  CHECK(model["vocab"]["<bos>"] == 0);
  CHECK(model["vocab"]["!"] == 2);
  CHECK(model["vocab"].size() == 2 + 256 + trainer.merges().size());
  REQUIRE(model["merges"].size() == trainer.merges().size());
  CHECK(model["merges"][0] == json::array({trainer.merges()[0].first, trainer.merges()[0].second}));
  CHECK(model["vocab"]["Ġhello"].is_number());

  const Tokenizer t = Tokenizer::from_json(trainer.to_json());
  CHECK(t.bos_id() == 1);
  const std::vector<int32_t> ids = t.encode(" hello world", true);
  CHECK(ids == std::vector<int32_t>{1, *t.token_to_id("Ġhello"), *t.token_to_id("Ġworld")});
  CHECK(t.decode(ids, true) == " hello world");
}

TEST_CASE("bpe_trainer: save writes to_json atomically", "[bpe_trainer]") {
  const std::filesystem::path dir = std::filesystem::temp_directory_path() / ("r1_bpe_trainer_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  BpeTrainer trainer(BpeTrainerConfig{});
  trainer.feed("save me, save me");
  trainer.train();
  trainer.save(dir / "tokenizer.json");
  trainer.save(dir / "tokenizer.json");  // over an existing file
  CHECK(read_text((dir / "tokenizer.json").string()) == trainer.to_json());
  CHECK(std::distance(std::filesystem::directory_iterator(dir), {}) == 1);  // no temporary left
  CHECK(Tokenizer::from_file((dir / "tokenizer.json").string()).encode("save me") == Tokenizer::from_json(trainer.to_json()).encode("save me"));
  std::filesystem::remove_all(dir);
}

TEST_CASE("bpe_trainer: errors", "[bpe_trainer]") {
  BpeTrainerConfig config;
  config.pre_tokenizer = "bert";
  REQUIRE_R1_ERROR(BpeTrainer{config}, "[BpeTrainer] pre_tokenizer: expected \"deepseek_v3\", \"gpt2\" or an HF pre_tokenizer JSON object, found \"bert\"");
  config.pre_tokenizer = "{\"type\": ";
  REQUIRE_R1_ERROR(BpeTrainer{config}, "BpeTrainerConfig::pre_tokenizer is not valid JSON");
  config.pre_tokenizer = R"({"type":"Split","pattern":{"Regex":"\\p{N}{1,3}"},"behavior":"Isolated"})";
  REQUIRE_R1_ERROR(BpeTrainer{config}, "/pre_tokenizer: expected a ByteLevel pre-tokenizer last");
  config.pre_tokenizer = R"({"type":"Sequence","pretokenizers":[{"type":"Split","pattern":{"Regex":"\\w+"},"behavior":"Isolated"},{"type":"ByteLevel"}]})";
  REQUIRE_R1_ERROR(BpeTrainer{config}, "/pre_tokenizer/pretokenizers/0/pattern/Regex: unsupported pattern");

  config = BpeTrainerConfig{};
  config.special_tokens = {"<s>"};
  config.bos_token = "<bos>";
  REQUIRE_R1_ERROR(BpeTrainer{config}, "[BpeTrainer] bos_token \"<bos>\" is not one of special_tokens");
  config.bos_token.reset();
  config.special_tokens = {"<s>", "</s>", "<s>"};
  REQUIRE_R1_ERROR(BpeTrainer{config}, "[BpeTrainer] special token \"<s>\" is listed twice (0 and 2)");
  config.special_tokens = {""};
  REQUIRE_R1_ERROR(BpeTrainer{config}, "[BpeTrainer] special_tokens[0] is empty");
  config.special_tokens = {"ok", "bad\xFF"};
  REQUIRE_R1_ERROR(BpeTrainer{config}, "[BpeTrainer] special_tokens[1] is not valid UTF-8 (byte 3)");
  config.special_tokens.clear();
  config.min_frequency = -1;
  REQUIRE_R1_ERROR(BpeTrainer{config}, "[BpeTrainer] min_frequency -1 is negative");

  BpeTrainer trainer(BpeTrainerConfig{});
  REQUIRE_R1_ERROR(trainer.feed("ok \xE2\x82 broken"), "[BpeTrainer.feed] invalid UTF-8 at byte 3 (0xE2)");
}

// ---- parity with HF tokenizers (fixtures) ----------------------------------------------------

TEST_CASE("bpe_trainer: r1 retrains the committed tokenizer files from corpus.txt", "[bpe_trainer][hf]") {
  const std::string corpus = read_text(kFixtures + "corpus.txt");
  const bool update = std::getenv("R1_UPDATE_FIXTURES") != nullptr;
  for (const TrainedFixture& f : trained_fixtures()) {
    INFO(f.name);
    BpeTrainer trainer(f.config);
    if (f.by_line) {
      for (const std::string_view line : lines_of(corpus)) trainer.feed(line);
    } else {
      trainer.feed(corpus);
    }
    trainer.train();
    const std::string path = kFixtures + f.name + ".json";
    if (update) {
      trainer.save(path);
      WARN("wrote " << path);
    } else {
      CHECK(trainer.to_json() == read_text(path));
    }
  }
}

TEST_CASE("bpe_trainer: HF encodes r1's tokenizer files to the ids r1 gives", "[bpe_trainer][hf]") {
  const json& texts = cases()["texts"];
  for (const TrainedFixture& f : trained_fixtures()) {
    const Tokenizer t = Tokenizer::from_file(kFixtures + f.name + ".json");
    const json& expected = cases()["cases"][f.name];
    const std::vector<int32_t> prefix = cases()["prefix"][f.name].get<std::vector<int32_t>>();
    REQUIRE(expected.size() == texts.size());
    for (size_t i = 0; i < texts.size(); ++i) {
      const std::string text = texts[i].get<std::string>();
      INFO(f.name << " text " << i << ": " << json(text).dump());
      const std::vector<int32_t> ids = expected[i]["ids"].get<std::vector<int32_t>>();
      std::vector<int32_t> special = prefix;
      special.insert(special.end(), ids.begin(), ids.end());
      if (expected[i].contains("special")) special = expected[i]["special"].get<std::vector<int32_t>>();
      CHECK(t.encode(text) == ids);
      CHECK(t.encode(text, true) == special);
      CHECK(t.decode(ids) == (expected[i].contains("decoded") ? expected[i]["decoded"].get<std::string>() : text));
    }
  }
}

TEST_CASE("bpe_trainer: HF's BpeTrainer learns the same merges in the same order", "[bpe_trainer][hf]") {
  // HF's Tokenizer.train: its default trainer (min frequency 0) fed corpus.txt line by line,
  // with each file's pre-tokenizer and no added tokens, so both sides train across them.
  const std::string corpus = read_text(kFixtures + "corpus.txt");
  for (const TrainedFixture& f : trained_fixtures()) {
    INFO(f.name);
    const json& hf = cases()["hf_trainer"][f.name];
    BpeTrainerConfig config;
    config.pre_tokenizer = json::parse(read_text(kFixtures + f.name + ".json"))["pre_tokenizer"].dump();
    config.min_frequency = 0;
    config.vocab_size = 256 + hf["count"].get<int64_t>();
    BpeTrainer trainer(config);
    for (const std::string_view line : lines_of(corpus)) trainer.feed(line);
    trainer.train();
    const Merges& merges = trainer.merges();
    REQUIRE(merges.size() == hf["count"].get<size_t>());
    const json& head = hf["head"];
    for (size_t i = 0; i < head.size(); ++i) {
      INFO("merge " << i);
      CHECK(merges[i] == std::pair{head[i][0].get<std::string>(), head[i][1].get<std::string>()});
    }
    const size_t block = hf["block"].get<size_t>();
    const json& hashes = hf["hashes"];
    REQUIRE(hashes.size() == (merges.size() + block - 1) / block);
    for (size_t b = 0; b < hashes.size(); ++b) {
      uint32_t h = 2166136261u;
      for (size_t i = b * block; i < std::min(merges.size(), (b + 1) * block); ++i)
        h = fnv1a(merges[i].first + " " + merges[i].second + "\n", h);
      INFO("merges " << b * block << ".." << (b + 1) * block - 1);
      CHECK(h == hashes[b].get<uint32_t>());
    }
  }
}
