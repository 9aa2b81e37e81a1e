// r1/bpe_trainer.hpp: learns byte-level BPE merges from a corpus and writes an HF
// tokenizer.json that r1::Tokenizer and HF tokenizers both load and encode identically.
//
// feed(text)  1. special tokens are cut out of the text (leftmost-longest, as the encoder
//                matches them), so no merge ever spans one;
//             2. each remaining span is pre-tokenized (the configured pre-tokenizer, as the
//                written file will run it) and each distinct piece ("word") is counted.
// train()     1. every word becomes its sequence of byte tokens;
//             2. every adjacent pair is counted, weighted by its word's count, and each pair
//                notes the words it occurs in;
//             3. until the vocab is full: take the most frequent pair (stop when its count is
//                below min_frequency), make the token left+right, and rewrite the noted words
//                left to right, non-overlapping ("a a a" -> "aa a"). Counts change only
//                around each rewrite: (left, right), (prev, left) and (right, next) lose the
//                word's count, (prev, new) and (new, next) gain it and note the word.
//             The most frequent pair comes from a max-heap whose entries may be stale: a
//             popped entry whose count no longer matches is pushed back with the current
//             count. Each merge costs time in the words it touches, not in the corpus.
//
// Ties (HF tokenizers' BpeTrainer, models/bpe/trainer.rs, `impl Ord for Merge`): the larger
// count first, then the smaller (left id, right id), compared left first, in the trainer's
// ids: the 256 bytes in the order of their byte-level characters' code points (GPT-2's
// order: '!'..'~', '¡'..'¬', '®'..'ÿ', then 'Ā' = 0x00 .. 'Ń' = 0xAD), then learned tokens
// in the order they were made. So "x y" (0x78 0x79) wins a tie against "Ġ x" (0x20 0x78):
// 'Ġ' is U+0120.
//
// Every merge makes a new token, and a merged pair never comes back: the tokens inside a
// span that ends up as one token evolve exactly as that span's bytes would alone (a merge
// across its edge would stop it from ever being one token), so each token has one split.
//
// Worked example (HF's course): words hug x10, pug x5, pun x12, bun x4, hugs x5.
//   pairs  u g = 20, p u = 17, u n = 16, h u = 15, g s = 5, b u = 4
//   merge 1 "u g" (20): hug pug pun bun hugs -> h ug, p ug, p u n, b u n, h ug s
//   merge 2 "u n" (16), merge 3 "h ug" (15), merge 4 "p un" (12), ...
//
// The written file: added_tokens = the special tokens (special, not normalized) with the
// first ids, then the 256 byte tokens, then the learned tokens, in that order (HF's trainer
// order, with the whole byte alphabet as HF's ByteLevel trainers pass it); special tokens
// are in model.vocab as well, as HF writes them. Normalizer none; the pre-tokenizer as
// configured; post-processor ByteLevel, plus TemplateProcessing adding bos_token when set
// (as Llama-3's file does); decoder ByteLevel; merges as ["left", "right"] pairs.
//
// Where r1 differs from HF's trainer (0.22) on purpose: HF also cuts added tokens out of
// the corpus, but then counts each one's raw text as a word and learns merges inside it
// ("<|", "<|s|>"; for "<｜User｜>", tokens with characters outside the byte-level alphabet)
// that its encoder never produces; r1 drops them. HF's vocab holds only the characters it
// saw unless given an initial alphabet; r1 always holds all 256 bytes. Otherwise, fed the
// same pieces, r1 learns HF's merges in HF's order (HF's train_from_files feeds a file line
// by line, each line with its "\n").
//
// Legend: word = one distinct pre-tokenized piece (raw UTF-8 bytes) and its count; pair =
// two adjacent tokens of a word; id = the trainer's token id (bytes 0..255 in byte-level
// order, then learned tokens); a token's id in the file is id + the number of special tokens.
#pragma once

#include "config.hpp"
#include "io.hpp"
#include "tokenizer.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace r1 {

struct BpeTrainerConfig {
  int64_t vocab_size = 1024;                // special tokens + 256 byte tokens + learned tokens
  int64_t min_frequency = 2;                // a pair seen fewer times is not merged
  std::vector<std::string> special_tokens{};  // ids 0.. in this order; never merged across
  // The written file's pre-tokenizer, also used to cut the corpus into words:
  //   "deepseek_v3"  DeepSeek-V3's three Splits (\p{N}{1,3}, CJK/kana, words) + ByteLevel(use_regex=false)
  //   "gpt2"         ByteLevel(use_regex=true): GPT-2's pattern
  //   "{...}"        any HF pre_tokenizer object that r1::PreTokenizer runs
  std::string pre_tokenizer = "deepseek_v3";
  std::optional<std::string> bos_token{};  // one of special_tokens: a TemplateProcessing post-processor prepends it
};

namespace detail::bpe {

// (left, right) as one key whose integer order is the pair order: left first, then right.
inline uint64_t pair_key(int32_t left, int32_t right) { return (uint64_t(uint32_t(left)) << 32) | uint32_t(right); }

// Byte -> the trainer's id of its token, and back: bytes ranked by their byte-level
// characters' code points (HF sorts its alphabet by char).
struct ByteOrder {
  std::array<int32_t, 256> id_of{};
  std::array<uint8_t, 256> byte_of{};

  ByteOrder() {
    const detail::tok::ByteAlphabet& alphabet = detail::tok::byte_alphabet();
    std::array<int, 256> bytes;
    for (int b = 0; b < 256; ++b) bytes[b] = b;
    std::sort(bytes.begin(), bytes.end(), [&](int x, int y) { return alphabet.char_of[x] < alphabet.char_of[y]; });
    for (int id = 0; id < 256; ++id) {
      byte_of[id] = static_cast<uint8_t>(bytes[id]);
      id_of[bytes[id]] = id;
    }
  }
};
inline const ByteOrder& byte_order() {
  static const ByteOrder order;
  return order;
}

// One learned merge in trainer ids; merge k makes token 256 + k.
struct Merge {
  int32_t left, right;
};

// The merge loop over the words' token sequences; see the header comment for the algorithm.
class MergeLearner {
 public:
  // words: the distinct words' bytes with their counts.
  explicit MergeLearner(const std::vector<std::pair<std::string_view, int64_t>>& words) {
    const ByteOrder& order = byte_order();
    for (int id = 0; id < 256; ++id) tokens_.emplace_back(1, static_cast<char>(order.byte_of[id]));
    words_.reserve(words.size());
    for (const auto& [bytes, count] : words) {
      words_.push_back({static_cast<uint32_t>(symbols_.size()), static_cast<uint32_t>(bytes.size()), count});
      for (const char b : bytes) symbols_.push_back(order.id_of[static_cast<uint8_t>(b)]);
    }
    for (int32_t w = 0; w < static_cast<int32_t>(words_.size()); ++w) {
      const Word& word = words_[w];
      const int32_t* s = symbols_.data() + word.begin;
      for (uint32_t i = 0; i + 1 < word.size; ++i) add(pair_key(s[i], s[i + 1]), word.count, w);
    }
    for (const int32_t p : touched_) heap_.push_back({pairs_[p].count, pairs_[p].key});
    std::make_heap(heap_.begin(), heap_.end());
    stamp_.assign(words_.size(), -1);
  }

  // Learns up to max_merges merges, stopping early when no pair has min_frequency (>= 1).
  std::vector<Merge> learn(int64_t max_merges, int64_t min_frequency) {
    std::vector<Merge> merges;
    while (static_cast<int64_t>(merges.size()) < max_merges) {
      const std::optional<Entry> top = pop_current();
      if (!top || top->count < min_frequency) break;
      const int32_t left = static_cast<int32_t>(top->key >> 32), right = static_cast<int32_t>(top->key & 0xFFFFFFFFu);
      const int32_t token = static_cast<int32_t>(tokens_.size());
      tokens_.push_back(tokens_[left] + tokens_[right]);
      merges.push_back({left, right});
      // Every occurrence goes, so the word list is taken whole (rewriting adds pairs and
      // may move pairs_).
      const std::vector<int32_t> where = std::move(pairs_[index_of(top->key)].words);
      ++step_;
      touched_.clear();
      for (const int32_t w : where) {
        if (stamp_[w] == step_) continue;  // listed twice
        stamp_[w] = step_;
        merge_in_word(w, left, right, token);
      }
      R1_ASSERT(pairs_[index_of(top->key)].count == 0, "[BpeTrainer.train] merge ", merges.size() - 1, " left occurrences");
      for (const int32_t p : touched_)
        if (pairs_[p].count > 0) push({pairs_[p].count, pairs_[p].key});
    }
    return merges;
  }

  const std::string& token_bytes(int32_t id) const { return tokens_[id]; }
  int32_t token_count() const { return static_cast<int32_t>(tokens_.size()); }

 private:
  struct Word {
    uint32_t begin, size;  // tokens in symbols_[begin, begin + size)
    int64_t count;
  };
  struct Pair {
    uint64_t key = 0;
    int64_t count = 0;
    std::vector<int32_t> words;  // words that gained the pair, possibly since rewritten
    int32_t touched_step = -1;  // the last step that added it to touched_
  };
  // Heap order: the larger count, then the smaller key, is the larger entry.
  struct Entry {
    int64_t count;
    uint64_t key;
    bool operator<(const Entry& o) const { return count != o.count ? count < o.count : key > o.key; }
  };

  void push(Entry e) {
    heap_.push_back(e);
    std::push_heap(heap_.begin(), heap_.end());
  }

  // The top entry whose count is current; nullopt when no pair has a positive count. A
  // pair's count rises only in the step that makes its new token (it is pushed at the end
  // of that step) and falls afterwards, so a stale entry is always too high.
  std::optional<Entry> pop_current() {
    while (!heap_.empty()) {
      std::pop_heap(heap_.begin(), heap_.end());
      const Entry e = heap_.back();
      heap_.pop_back();
      const int64_t current = pairs_[index_of(e.key)].count;
      if (current == e.count) return e;
      R1_ASSERT(current < e.count, "[BpeTrainer.train] pair count rose from ", e.count, " to ", current);
      if (current > 0) push({current, e.key});
    }
    return std::nullopt;
  }

  // Index of key in pairs_, inserting it with count 0 (open addressing, load <= 1/2).
  int32_t index_of(uint64_t key) {
    if (2 * (pairs_.size() + 1) > slots_.size()) grow();
    const size_t mask = slots_.size() - 1;
    size_t slot = detail::tok::mix64(key) & mask;
    for (; slots_[slot] >= 0; slot = (slot + 1) & mask)
      if (pairs_[slots_[slot]].key == key) return slots_[slot];
    slots_[slot] = static_cast<int32_t>(pairs_.size());
    pairs_.emplace_back().key = key;
    return slots_[slot];
  }

  void grow() {
    slots_.assign(std::max<size_t>(64, 2 * slots_.size()), -1);
    const size_t mask = slots_.size() - 1;
    for (size_t p = 0; p < pairs_.size(); ++p) {
      size_t slot = detail::tok::mix64(pairs_[p].key) & mask;
      while (slots_[slot] >= 0) slot = (slot + 1) & mask;
      slots_[slot] = static_cast<int32_t>(p);
    }
  }

  // count += delta; a gain notes word w and marks the pair for the heap.
  void add(uint64_t key, int64_t delta, int32_t w) {
    const int32_t p = index_of(key);
    Pair& pair = pairs_[p];
    pair.count += delta;
    if (delta <= 0) return;
    if (pair.words.empty() || pair.words.back() != w) pair.words.push_back(w);
    if (pair.touched_step != step_) {
      pair.touched_step = step_;
      touched_.push_back(p);
    }
  }

  // Rewrites word w in place, left to right; prev is the last token written (possibly the
  // new one), next the first one not read yet.
  void merge_in_word(int32_t w, int32_t left, int32_t right, int32_t token) {
    Word& word = words_[w];
    int32_t* s = symbols_.data() + word.begin;
    const int64_t c = word.count;
    uint32_t j = 0;
    for (uint32_t i = 0; i < word.size;) {
      if (i + 1 < word.size && s[i] == left && s[i + 1] == right) {
        add(pair_key(left, right), -c, w);
        if (j > 0) {
          add(pair_key(s[j - 1], left), -c, w);
          add(pair_key(s[j - 1], token), c, w);
        }
        if (i + 2 < word.size) {
          add(pair_key(right, s[i + 2]), -c, w);
          add(pair_key(token, s[i + 2]), c, w);
        }
        s[j++] = token;
        i += 2;
      } else {
        s[j++] = s[i++];
      }
    }
    word.size = j;
  }

  std::vector<std::string> tokens_;  // id -> bytes
  std::vector<Word> words_;
  std::vector<int32_t> symbols_;
  std::vector<Pair> pairs_;
  std::vector<int32_t> slots_;  // open addressing: pair key -> index in pairs_, -1 empty
  std::vector<Entry> heap_;
  std::vector<int32_t> stamp_;    // word -> the last step that rewrote it
  std::vector<int32_t> touched_;  // pairs that gained in this step (step 0: counting)
  int32_t step_ = 0;
};

}  // namespace detail::bpe

class BpeTrainer {
 public:
  explicit BpeTrainer(BpeTrainerConfig config) : config_(std::move(config)) {
    const int64_t specials = static_cast<int64_t>(config_.special_tokens.size());
    R1_CHECK(config_.vocab_size >= specials + 256, "[BpeTrainer] vocab_size ", config_.vocab_size, " is smaller than the ",
             specials, " special tokens plus the 256 byte tokens (", specials + 256, ")");
    R1_CHECK(config_.vocab_size <= INT32_MAX, "[BpeTrainer] vocab_size ", config_.vocab_size, " does not fit int32 ids");
    R1_CHECK(config_.min_frequency >= 0, "[BpeTrainer] min_frequency ", config_.min_frequency, " is negative");
    for (size_t i = 0; i < config_.special_tokens.size(); ++i) {
      const std::string& t = config_.special_tokens[i];
      R1_CHECK(!t.empty(), "[BpeTrainer] special_tokens[", i, "] is empty");
      const size_t bad = detail::tok::invalid_utf8_offset(t);
      R1_CHECK(bad == std::string_view::npos, "[BpeTrainer] special_tokens[", i, "] is not valid UTF-8 (byte ", bad, ")");
      for (size_t k = 0; k < i; ++k)
        R1_CHECK(config_.special_tokens[k] != t, "[BpeTrainer] special token \"", t, "\" is listed twice (", k, " and ", i, ")");
      specials_.add(t, static_cast<int32_t>(i));
    }
    if (config_.bos_token) {
      const auto& list = config_.special_tokens;
      R1_CHECK(std::find(list.begin(), list.end(), *config_.bos_token) != list.end(), "[BpeTrainer] bos_token \"",
               *config_.bos_token, "\" is not one of special_tokens; add it there");
    }
    pre_tokenizer_json_ = pre_tokenizer_json(config_.pre_tokenizer);
    pre_tokenizer_ = PreTokenizer::from_json(nlohmann::json::parse(pre_tokenizer_json_.dump()), "/pre_tokenizer");
  }

  // Counts the words of text (UTF-8); may be called any number of times before train().
  void feed(std::string_view text) {
    const size_t bad = detail::tok::invalid_utf8_offset(text);
    R1_CHECK(bad == std::string_view::npos, "[BpeTrainer.feed] invalid UTF-8 at byte ", bad, " (0x",
             fmt::format("{:02X}", static_cast<uint8_t>(text[bad])), ")");
    const auto count = [&](std::string_view piece) {
      const auto it = word_counts_.find(piece);
      if (it != word_counts_.end()) {
        ++it->second;
      } else {
        word_counts_.emplace(std::string(piece), 1);
      }
    };
    size_t from = 0;
    while (from < text.size()) {
      const std::optional<detail::tok::TokenTrie::Match> special = specials_.empty() ? std::nullopt : specials_.find(text, from);
      const size_t end = special ? special->start : text.size();
      pre_tokenizer_.for_each_piece(text.substr(from, end - from), scratch_, count);
      from = special ? special->end : text.size();
    }
  }

  // Learns merges from everything fed so far (again from scratch when called again).
  void train() {
    std::vector<std::pair<std::string_view, int64_t>> words;
    words.reserve(word_counts_.size());
    for (const auto& [bytes, count] : word_counts_) words.emplace_back(bytes, count);
    detail::bpe::MergeLearner learner(words);
    const int64_t max_merges = config_.vocab_size - static_cast<int64_t>(config_.special_tokens.size()) - 256;
    const std::vector<detail::bpe::Merge> learned = learner.learn(max_merges, std::max<int64_t>(config_.min_frequency, 1));
    tokens_.clear();
    for (int32_t id = 0; id < learner.token_count(); ++id) tokens_.push_back(detail::tok::byte_level_encode(learner.token_bytes(id)));
    merges_.clear();
    for (const detail::bpe::Merge& m : learned) merges_.emplace_back(tokens_[m.left], tokens_[m.right]);
    // A special token written like a vocab token would take that token's id in HF's loader.
    for (const std::string& special : config_.special_tokens)
      R1_CHECK(std::find(tokens_.begin(), tokens_.end(), special) == tokens_.end(), "[BpeTrainer.train] special token \"",
               special, "\" equals a byte-level vocab token; choose a special token outside the byte-level alphabet");
    trained_ = true;
  }

  // The learned merges, in rank order, as tokenizer.json writes them (byte-level alphabet).
  const std::vector<std::pair<std::string, std::string>>& merges() const { return merges_; }

  // The complete tokenizer.json (pretty-printed, 2 spaces, keys in HF's order).
  std::string to_json() const {
    using ojson = nlohmann::ordered_json;
    R1_CHECK(trained_, "[BpeTrainer.to_json] nothing learned yet: call train() first");
    const int32_t offset = static_cast<int32_t>(config_.special_tokens.size());
    ojson root;
    root["version"] = "1.0";
    root["truncation"] = nullptr;
    root["padding"] = nullptr;
    root["added_tokens"] = ojson::array();
    for (int32_t i = 0; i < offset; ++i)
      root["added_tokens"].push_back({{"id", i},
                                      {"content", config_.special_tokens[i]},
                                      {"single_word", false},
                                      {"lstrip", false},
                                      {"rstrip", false},
                                      {"normalized", false},
                                      {"special", true}});
    root["normalizer"] = nullptr;
    root["pre_tokenizer"] = pre_tokenizer_json_;
    const ojson byte_level = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", false}, {"use_regex", true}};
    if (config_.bos_token) {
      const std::string& bos = *config_.bos_token;
      const auto index = std::find(config_.special_tokens.begin(), config_.special_tokens.end(), bos) - config_.special_tokens.begin();
      const auto special = [&](int type_id) { return ojson{{"SpecialToken", {{"id", bos}, {"type_id", type_id}}}}; };
      const auto sequence = [&](const char* id, int type_id) { return ojson{{"Sequence", {{"id", id}, {"type_id", type_id}}}}; };
      ojson templ = {{"type", "TemplateProcessing"},
                     {"single", {special(0), sequence("A", 0)}},
                     {"pair", {special(0), sequence("A", 0), special(1), sequence("B", 1)}},
                     {"special_tokens", {{bos, {{"id", bos}, {"ids", ojson::array({index})}, {"tokens", ojson::array({bos})}}}}}};
      root["post_processor"] = {{"type", "Sequence"}, {"processors", {byte_level, std::move(templ)}}};
    } else {
      root["post_processor"] = byte_level;
    }
    root["decoder"] = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}};
    // Keys are distinct (train checks the special tokens against the vocab), and ordered_json's
    // own insert searches linearly for the key: entries are appended to its vector directly.
    ojson vocab = ojson::object();
    auto& entries = vocab.get_ref<ojson::object_t&>();
    entries.reserve(static_cast<size_t>(offset) + tokens_.size());
    for (int32_t i = 0; i < offset; ++i) entries.emplace_back(config_.special_tokens[i], i);
    for (size_t id = 0; id < tokens_.size(); ++id) entries.emplace_back(tokens_[id], offset + static_cast<int32_t>(id));
    ojson merges = ojson::array();
    for (const auto& [left, right] : merges_) merges.push_back(ojson::array({left, right}));
    root["model"] = {{"type", "BPE"},
                     {"dropout", nullptr},
                     {"unk_token", nullptr},
                     {"continuing_subword_prefix", nullptr},
                     {"end_of_word_suffix", nullptr},
                     {"fuse_unk", false},
                     {"byte_fallback", false},
                     {"ignore_merges", false},
                     {"vocab", std::move(vocab)},
                     {"merges", std::move(merges)}};
    return root.dump(2) + "\n";
  }

  // Writes to_json() to path atomically (r1::write_file_atomic).
  void save(const std::filesystem::path& path) const {
    const std::string json = to_json();
    write_file_atomic(path, [&](std::ostream& out) { out.write(json.data(), static_cast<std::streamsize>(json.size())); });
  }

 private:
  // Heterogeneous lookup: counting a piece allocates only for a new word.
  struct StringHash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const { return detail::tok::hash_bytes(s); }
  };

  static nlohmann::ordered_json pre_tokenizer_json(const std::string& name) {
    using ojson = nlohmann::ordered_json;
    const auto split = [](PreTokenizer::Pattern p) {
      return ojson{{"type", "Split"}, {"pattern", {{"Regex", PreTokenizer::pattern_regex(p)}}}, {"behavior", "Isolated"}, {"invert", false}};
    };
    if (name == "deepseek_v3")
      return {{"type", "Sequence"},
              {"pretokenizers",
               {split(PreTokenizer::Pattern::Digits3), split(PreTokenizer::Pattern::DeepSeekCjk), split(PreTokenizer::Pattern::DeepSeekWords),
                {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", false}}}}};
    if (name == "gpt2") return {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}};
    const size_t first = name.find_first_not_of(" \t\r\n");
    R1_CHECK(first != std::string::npos && name[first] == '{', "[BpeTrainer] pre_tokenizer: expected \"deepseek_v3\", \"gpt2\" or an HF pre_tokenizer JSON object, found \"",
             name, "\"");
    detail::tok::parse_json(name, "BpeTrainerConfig::pre_tokenizer");  // reports a syntax error with its position
    return ojson::parse(name);
  }

  BpeTrainerConfig config_;
  nlohmann::ordered_json pre_tokenizer_json_;
  PreTokenizer pre_tokenizer_;
  detail::tok::TokenTrie specials_;
  std::unordered_map<std::string, int64_t, StringHash, std::equal_to<>> word_counts_;
  std::string scratch_;
  bool trained_ = false;
  std::vector<std::string> tokens_;  // trainer id -> token in the byte-level alphabet
  std::vector<std::pair<std::string, std::string>> merges_;
};

}  // namespace r1
