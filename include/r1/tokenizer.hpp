// r1/tokenizer.hpp: the byte-level BPE tokenizer of DeepSeek-V3/R1, Qwen and Llama-3,
// loaded from HF tokenizer.json and producing exactly the ids HF tokenizers 0.22 produces.
//
// encode(text) runs HF's pipeline:
//   1. added tokens      leftmost-longest matches of the added tokens with normalized=false
//                        in the raw text become their ids (special or not, whether or not
//                        special tokens are being added), honouring lstrip/rstrip/single_word
//   2. normalizer        NFC or nothing, on each piece between those matches; then the
//                        added tokens with normalized=true are matched in the normalized text
//   3. pre-tokenizer     a Sequence of Split(regex, Isolated) steps and a final ByteLevel:
//                        each Split cuts every piece the previous step produced into its
//                        matches and the gaps between them
//   4. BPE               per piece: bytes -> byte tokens, then repeatedly merge the adjacent
//                        pair with the lowest merge rank (the leftmost on ties); rank = the
//                        merge's index in model.merges, which is not the merged token's id
//                        (Llama-3 has merges producing a token an earlier merge produces).
//                        ignore_merges: a piece that is itself in the vocab is emitted whole
//   5. post-processor    TemplateProcessing adds its special tokens (BOS...) when asked
//
// Byte level: GPT-2 maps the 256 bytes to 256 printable characters (byte_char) and the
// vocab is written in them ("Ġ" is the byte 0x20). The mapping is a bijection, so r1 turns
// the vocab back into raw bytes at load time and pre-tokenizes and merges raw UTF-8.
//
// Regexes: r1 has no regex engine. The Split patterns these files use (and the GPT-2 one of
// ByteLevel use_regex) are recognized by their exact text and run by hand-written matchers
// with Oniguruma's semantics: alternatives are tried in order and the first that matches
// wins (not the longest); greedy quantifiers backtrack, so \s+(?!\S) leaves the last space
// of a run before a word to that word; (?i:'s) also matches 'S and the long s U+017F.
// Character classes come from r1/unicode_tables.hpp: Unicode 16.0, Oniguruma's version.
// Any other pattern is an error naming it.
//
// NFC uses Unicode 9.0 data, like HF's normalizer (the unicode-normalization-alignments
// crate): characters added later are neither reordered nor composed.
//
// Added tokens get their ids as HF assigns them, not from their "id" field: a token already in
// the model's vocab takes its id there, any other the next id after the vocab and the added
// tokens before it (the files r1 was checked against agree with their "id" fields).
//
// Errors: a malformed or unsupported tokenizer.json throws r1::error naming the JSON path and
// what was found, e.g. "[tokenizer] /model/type: expected "BPE", found "Unigram"". Text that
// is not valid UTF-8 throws with the byte offset. decode rejects ids outside the vocab (HF
// skips them silently).
//
// Speed: each thread keeps a word cache (piece bytes -> ids) and reusable buffers; the merge
// map is an open-addressing hash keyed on (left id, right id). encode_batch spreads texts over
// r1's thread pool (r1/parallel.hpp).
//
// Legend: piece = one pre-token (a span of normalized text); rank = merge priority (lower
// first); id = token id, int32.
#pragma once

#include "config.hpp"
#include "parallel.hpp"
#include "unicode_tables.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace r1 {

namespace detail::tok {

// ---------------------------------------------------------------------------------------
// UTF-8

inline constexpr std::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD

// Length of the sequence a lead byte starts and the allowed range of its second byte
// (Unicode table 3-7: no overlongs, no surrogates, nothing past U+10FFFF); length 0 for a
// byte that cannot start a sequence.
struct Utf8Lead {
  uint8_t length, lo, hi;
};
inline Utf8Lead utf8_lead(uint8_t b) {
  if (b < 0x80) return {1, 0, 0};
  if (b >= 0xC2 && b <= 0xDF) return {2, 0x80, 0xBF};
  if (b >= 0xE0 && b <= 0xEF) return {3, uint8_t(b == 0xE0 ? 0xA0 : 0x80), uint8_t(b == 0xED ? 0x9F : 0xBF)};
  if (b >= 0xF0 && b <= 0xF4) return {4, uint8_t(b == 0xF0 ? 0x90 : 0x80), uint8_t(b == 0xF4 ? 0x8F : 0xBF)};
  return {0, 0, 0};
}

// How many bytes from s[i] form a prefix of a valid sequence (at least 1): the whole
// sequence when it is valid and complete, otherwise Unicode's "maximal subpart", which
// lossy conversion replaces with one U+FFFD.
inline size_t utf8_valid_prefix(std::string_view s, size_t i) {
  const Utf8Lead lead = utf8_lead(static_cast<uint8_t>(s[i]));
  if (lead.length <= 1) return 1;
  if (i + 1 >= s.size()) return 1;
  const uint8_t second = static_cast<uint8_t>(s[i + 1]);
  if (second < lead.lo || second > lead.hi) return 1;
  size_t k = 2;
  while (k < lead.length && i + k < s.size() && (static_cast<uint8_t>(s[i + k]) & 0xC0) == 0x80) ++k;
  return k;
}

// Offset of the first byte that does not start a valid sequence, or npos.
inline size_t invalid_utf8_offset(std::string_view s) {
  size_t i = 0;
  const size_t n = s.size();
  while (i < n) {
    if (i + 8 <= n) {  // ASCII runs 8 bytes at a time
      uint64_t word;
      std::memcpy(&word, s.data() + i, 8);
      if ((word & 0x8080808080808080ull) == 0) {
        i += 8;
        continue;
      }
    }
    const uint8_t b = static_cast<uint8_t>(s[i]);
    if (b < 0x80) {
      ++i;
      continue;
    }
    const size_t length = utf8_lead(b).length;
    if (length == 0 || utf8_valid_prefix(s, i) != length) return i;
    i += length;
  }
  return std::string_view::npos;
}

// Appends s with each invalid sequence replaced by U+FFFD (Rust's String::from_utf8_lossy,
// which HF's ByteLevel decoder uses).
inline void append_lossy(std::string& out, std::string_view s) {
  size_t i = 0, clean = 0;
  while (i < s.size()) {
    const uint8_t b = static_cast<uint8_t>(s[i]);
    if (b < 0x80) {
      ++i;
      continue;
    }
    const size_t k = utf8_valid_prefix(s, i);
    if (k == utf8_lead(b).length) {
      i += k;
      continue;
    }
    out.append(s.substr(clean, i - clean));
    out.append(kReplacement);
    i += k;
    clean = i;
  }
  out.append(s.substr(clean));
}

// Bytes at the end of s that start a valid sequence but do not finish it yet (0-3): what a
// streaming decoder holds back until the next token.
inline size_t incomplete_utf8_tail(std::string_view s) {
  for (size_t t = 1; t <= 3 && t <= s.size(); ++t) {
    const uint8_t b = static_cast<uint8_t>(s[s.size() - t]);
    if ((b & 0xC0) == 0x80) continue;  // a continuation byte: look further back
    const size_t length = utf8_lead(b).length;
    return length > t && utf8_valid_prefix(s, s.size() - t) == t ? t : 0;
  }
  return 0;
}

// One code point of valid UTF-8 at s[i], with its length in bytes and its flags.
struct CodePoint {
  char32_t cp;
  uint32_t length;
  uint8_t flags;
};
// The multi-byte case, kept out of line so that code_point_at inlines into the matchers'
// loops (the calls cost a third of encode time when GCC declined to inline the whole).
[[gnu::noinline]] inline CodePoint code_point_at_multibyte(const uint8_t* p) {
  char32_t cp;
  uint32_t length;
  if (p[0] < 0xE0) {
    cp = (char32_t(p[0] & 0x1F) << 6) | (p[1] & 0x3F);
    length = 2;
  } else if (p[0] < 0xF0) {
    cp = (char32_t(p[0] & 0x0F) << 12) | (char32_t(p[1] & 0x3F) << 6) | (p[2] & 0x3F);
    length = 3;
  } else {
    cp = (char32_t(p[0] & 0x07) << 18) | (char32_t(p[1] & 0x3F) << 12) | (char32_t(p[2] & 0x3F) << 6) | (p[3] & 0x3F);
    length = 4;
  }
  return {cp, length, unicode::flags(cp)};
}

// The generator stores the first block first, so ASCII's flags are kFlagBlocks[0..127].
static_assert(unicode::kFlagShift >= 7, "ASCII must lie in the first block of the flag table");
inline CodePoint code_point_at(std::string_view s, size_t i) {
  const auto* p = reinterpret_cast<const uint8_t*>(s.data()) + i;
  if (p[0] < 0x80) return {p[0], 1, unicode::kFlagBlocks[p[0]]};
  return code_point_at_multibyte(p);
}

inline void append_utf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// ---------------------------------------------------------------------------------------
// GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves, the other 68
// bytes take U+0100.. in byte order (so 0x20 is U+0120 "Ġ", 0x0A is U+010A "Ċ").
struct ByteAlphabet {
  std::array<char32_t, 256> char_of{};
  std::array<int16_t, 0x144> byte_of{};  // every char of the alphabet is below U+0144

  ByteAlphabet() {
    byte_of.fill(-1);
    int next = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      char_of[b] = printable ? char32_t(b) : char32_t(0x100 + next++);
      byte_of[char_of[b]] = static_cast<int16_t>(b);
    }
  }
};
inline const ByteAlphabet& byte_alphabet() {
  static const ByteAlphabet alphabet;
  return alphabet;
}

// Sets bytes to what a byte-level token string (valid UTF-8) stands for; false when a
// character is outside the alphabet (e.g. "<｜User｜>").
inline bool byte_level_decode(std::string_view token, std::string& bytes) {
  bytes.clear();
  const ByteAlphabet& alphabet = byte_alphabet();
  for (size_t i = 0; i < token.size();) {
    const CodePoint c = code_point_at(token, i);
    if (c.cp >= alphabet.byte_of.size() || alphabet.byte_of[c.cp] < 0) return false;
    bytes += static_cast<char>(alphabet.byte_of[c.cp]);
    i += c.length;
  }
  return true;
}

inline std::string byte_level_encode(std::string_view bytes) {
  std::string token;
  for (const char b : bytes) append_utf8(token, byte_alphabet().char_of[static_cast<uint8_t>(b)]);
  return token;
}

// ---------------------------------------------------------------------------------------
// Hashing: short byte strings (pieces, vocab entries) and (left id, right id) pairs.

inline uint64_t mix64(uint64_t h) {
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdull;
  h ^= h >> 33;
  h *= 0xc4ceb9fe1a85ec53ull;
  h ^= h >> 33;
  return h;
}

inline uint64_t hash_bytes(std::string_view s) {
  uint64_t h = 0x9E3779B97F4A7C15ull ^ (s.size() * 0x100000001B3ull);
  const char* p = s.data();
  size_t n = s.size();
  for (; n >= 8; p += 8, n -= 8) {
    uint64_t word;
    std::memcpy(&word, p, 8);
    h = (h ^ word) * 0x9FB21C651E98DF25ull;
    h ^= h >> 29;
  }
  if (n > 0) {
    uint64_t word = 0;
    std::memcpy(&word, p, n);
    h = (h ^ word) * 0x9FB21C651E98DF25ull;
  }
  return mix64(h);
}

inline size_t table_size_for(size_t entries) {
  size_t size = 16;
  while (size < entries * 2) size *= 2;  // load factor <= 1/2
  return size;
}

// ---------------------------------------------------------------------------------------
// NFC (Unicode 9.0 data, as HF's normalizer): canonical decomposition, canonical ordering by
// combining class, then canonical composition (UAX #15).

inline uint8_t combining_class(char32_t cp) {
  if (!(unicode::flags(cp) & unicode::kNfc)) return 0;
  const uint32_t key = uint32_t(cp) << 8;
  const auto* end = std::end(unicode::kCombiningClass);
  const auto* it = std::lower_bound(std::begin(unicode::kCombiningClass), end, key);
  return it != end && (*it >> 8) == cp ? static_cast<uint8_t>(*it & 0xFF) : 0;
}

inline constexpr char32_t kHangulS = 0xAC00, kHangulL = 0x1100, kHangulV = 0x1161, kHangulT = 0x11A7;
inline constexpr char32_t kHangulLCount = 19, kHangulVCount = 21, kHangulTCount = 28;
inline constexpr char32_t kHangulNCount = kHangulVCount * kHangulTCount, kHangulSCount = kHangulLCount * kHangulNCount;

inline void decompose(char32_t cp, std::vector<char32_t>& out) {
  if (cp >= kHangulS && cp < kHangulS + kHangulSCount) {
    const char32_t s = cp - kHangulS;
    out.push_back(kHangulL + s / kHangulNCount);
    out.push_back(kHangulV + (s % kHangulNCount) / kHangulTCount);
    if (s % kHangulTCount != 0) out.push_back(kHangulT + s % kHangulTCount);
    return;
  }
  const auto* end = std::end(unicode::kDecomposition);
  const auto* it = std::lower_bound(std::begin(unicode::kDecomposition), end, cp,
                                    [](const unicode::Decomposition& d, char32_t c) { return d.cp < c; });
  if (it != end && it->cp == cp) {
    out.insert(out.end(), unicode::kDecompositionData + it->offset, unicode::kDecompositionData + it->offset + it->length);
    return;
  }
  out.push_back(cp);
}

// The primary composite of (first, second), or 0.
inline char32_t compose(char32_t first, char32_t second) {
  if (first >= kHangulL && first < kHangulL + kHangulLCount && second >= kHangulV && second < kHangulV + kHangulVCount)
    return kHangulS + ((first - kHangulL) * kHangulVCount + (second - kHangulV)) * kHangulTCount;
  if (first >= kHangulS && first < kHangulS + kHangulSCount && (first - kHangulS) % kHangulTCount == 0 && second > kHangulT &&
      second < kHangulT + kHangulTCount)
    return first + (second - kHangulT);
  const auto* end = std::end(unicode::kComposition);
  const auto* it = std::lower_bound(std::begin(unicode::kComposition), end, std::pair{first, second},
                                    [](const unicode::Composition& c, std::pair<char32_t, char32_t> key) {
                                      return c.first != key.first ? c.first < key.first : c.second < key.second;
                                    });
  return it != end && it->first == first && it->second == second ? it->composite : 0;
}

// True when NFC leaves s unchanged for certain: no code point of s can change or merge into
// its predecessor (UAX #15's quick check, via the kNfc flag; nothing below U+0300 has it).
inline bool nfc_stable(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    const uint8_t b = static_cast<uint8_t>(s[i]);
    if (b < 0xCC) {  // U+0000-U+02FF: 1 or 2 bytes, never touched by NFC
      i += b < 0x80 ? 1 : 2;
      continue;
    }
    const CodePoint c = code_point_at(s, i);
    if (c.flags & unicode::kNfc) return false;
    i += c.length;
  }
  return true;
}

struct NfcScratch {
  std::vector<char32_t> cps;
  std::vector<uint8_t> classes;
};

inline void nfc(std::string_view s, std::string& out, NfcScratch& scratch) {
  std::vector<char32_t>& cps = scratch.cps;
  std::vector<uint8_t>& classes = scratch.classes;
  cps.clear();
  for (size_t i = 0; i < s.size();) {
    const CodePoint c = code_point_at(s, i);
    decompose(c.cp, cps);
    i += c.length;
  }
  classes.resize(cps.size());
  for (size_t i = 0; i < cps.size(); ++i) classes[i] = combining_class(cps[i]);
  // Canonical ordering: a stable sort by class of every run of non-starters.
  for (size_t i = 1; i < cps.size(); ++i) {
    for (size_t j = i; j > 0 && classes[j] != 0 && classes[j - 1] > classes[j]; --j) {
      std::swap(cps[j - 1], cps[j]);
      std::swap(classes[j - 1], classes[j]);
    }
  }
  // Composition: a character joins the last starter unless a character in between has a
  // class >= its own (blocked); a string that opens with non-starters composes nothing
  // into them (last_class 256).
  out.clear();
  if (cps.empty()) return;
  size_t starter = 0, kept = 1;
  int last_class = classes[0] == 0 ? 0 : 256;
  for (size_t i = 1; i < cps.size(); ++i) {
    const int cls = classes[i];
    const char32_t composite = compose(cps[starter], cps[i]);
    if (composite != 0 && (last_class < cls || last_class == 0)) {
      cps[starter] = composite;
      continue;
    }
    if (cls == 0) starter = kept;
    last_class = cls;
    cps[kept++] = cps[i];
  }
  for (size_t i = 0; i < kept; ++i) append_utf8(out, cps[i]);
}

// ---------------------------------------------------------------------------------------
// JSON access with paths in every error.

using json = nlohmann::json;

inline std::string show(const json& j) {
  std::string s = j.dump(-1, ' ', false, json::error_handler_t::replace);
  if (s.size() > 80) s = s.substr(0, 77) + "...";
  return s;
}

inline const json& member(const json& object, const std::string& path, const char* key) {
  R1_CHECK(object.is_object(), "[tokenizer] ", path.empty() ? "/" : path, ": expected an object, found ", show(object));
  const auto it = object.find(key);
  R1_CHECK(it != object.end(), "[tokenizer] ", path, "/", key, ": missing");
  return *it;
}

// An optional member: nullptr when absent or null.
inline const json* optional_member(const json& object, const char* key) {
  const auto it = object.find(key);
  return it == object.end() || it->is_null() ? nullptr : &*it;
}

inline const std::string& as_string(const json& j, const std::string& path) {
  R1_CHECK(j.is_string(), "[tokenizer] ", path, ": expected a string, found ", show(j));
  return j.get_ref<const std::string&>();
}

inline bool as_bool(const json& j, const std::string& path) {
  R1_CHECK(j.is_boolean(), "[tokenizer] ", path, ": expected true or false, found ", show(j));
  return j.get<bool>();
}

inline int32_t as_id(const json& j, const std::string& path) {
  R1_CHECK(j.is_number_integer() && j.get<int64_t>() >= 0 && j.get<int64_t>() <= INT32_MAX, "[tokenizer] ", path,
           ": expected a token id (an integer in [0, 2^31)), found ", show(j));
  return static_cast<int32_t>(j.get<int64_t>());
}

inline bool optional_bool(const json& object, const std::string& path, const char* key, bool fallback) {
  const json* j = optional_member(object, key);
  return j ? as_bool(*j, path + "/" + key) : fallback;
}

inline const std::string& type_of(const json& object, const std::string& path) {
  return as_string(member(object, path, "type"), path + "/type");
}

// The detail of nlohmann's parse error after its "line L, column C: " prefix, which would
// count from the start of a span instead of the file.
inline std::string parse_error_detail(const std::string& what) {
  const size_t column = what.find("column ");
  const size_t colon = column == std::string::npos ? std::string::npos : what.find(": ", column);
  return colon == std::string::npos ? what : what.substr(colon + 2);
}

// Collects the message of a JSON syntax error without exceptions, so the loader also works
// in R1_NO_EXCEPTIONS builds.
struct SyntaxErrorSax : nlohmann::json_sax<json> {
  std::string message;
  bool null() override { return true; }
  bool boolean(bool) override { return true; }
  bool number_integer(number_integer_t) override { return true; }
  bool number_unsigned(number_unsigned_t) override { return true; }
  bool number_float(number_float_t, const string_t&) override { return true; }
  bool string(string_t&) override { return true; }
  bool binary(binary_t&) override { return true; }
  bool start_object(std::size_t) override { return true; }
  bool key(string_t&) override { return true; }
  bool end_object() override { return true; }
  bool start_array(std::size_t) override { return true; }
  bool end_array() override { return true; }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& e) override {
    message = e.what();
    return false;
  }
};

// How deep values may nest: the loader and show() recurse into them, and a file nested
// thousands deep would overflow the stack. tokenizer.json files nest about 6 deep.
inline constexpr int kMaxJsonDepth = 64;

// Parses the file `what`, or the one value of it that starts at byte span_start.
inline json parse_json(std::string_view text, const char* what, std::optional<size_t> span_start = std::nullopt) {
  bool too_deep = false;
  const json::parser_callback_t depth_check = [&](int depth, json::parse_event_t, json&) {
    too_deep = too_deep || depth > kMaxJsonDepth;
    return !too_deep;
  };
  json j = json::parse(text.begin(), text.end(), depth_check, /*allow_exceptions=*/false);
  if (too_deep) {
    if (span_start) fail(concat("[tokenizer] ", what, ": the value at byte ", *span_start, " nests deeper than ", kMaxJsonDepth, " levels"));
    fail(concat("[tokenizer] ", what, " nests deeper than ", kMaxJsonDepth, " levels"));
  }
  if (j.is_discarded()) {
    SyntaxErrorSax sax;
    json::sax_parse(text.begin(), text.end(), &sax, json::input_format_t::json, /*strict=*/true);
    if (span_start) fail(concat("[tokenizer] ", what, " is not valid JSON in the value at byte ", *span_start, ": ", parse_error_detail(sax.message)));
    fail(concat("[tokenizer] ", what, " is not valid JSON: ", sax.message));
  }
  return j;
}

// tokenizer.json with model.vocab and model.merges (90% of the file) read straight into
// vectors; every other value is parsed by nlohmann::json from its span of the text. On this
// machine nlohmann's DOM of the whole DeepSeek-V3 file took about 135 ms to build and free
// (the whole load has 300 ms); reading vocab and merges directly takes about 30 ms.
struct TokenizerJson {
  json root;  // model.vocab and model.merges are absent when read into the vectors
  std::optional<std::vector<std::pair<std::string, int32_t>>> vocab;
  std::optional<std::vector<std::pair<std::string, std::string>>> merges;
};

class JsonReader {
 public:
  explicit JsonReader(std::string_view text) : text_(text) {}

  // The next non-space character, or 0 at the end.
  char peek() {
    while (pos_ < text_.size() && (text_[pos_] == ' ' || text_[pos_] == '\n' || text_[pos_] == '\r' || text_[pos_] == '\t')) ++pos_;
    return pos_ < text_.size() ? text_[pos_] : 0;
  }

  void expect(char c) {
    if (peek() != c) fail(std::string("expected '") + c + "'");
    ++pos_;
  }

  bool consume(char c) {
    if (peek() != c) return false;
    ++pos_;
    return true;
  }

  void expect_end() {
    if (peek() != 0) fail("expected the end of the text");
  }

  // {"key": value, ...}: member(key) reads each value.
  template <class Member>
  void object(Member&& member) {
    expect('{');
    if (consume('}')) return;
    std::string key;
    do {
      read_string(key);
      expect(':');
      member(key);
    } while (consume(','));
    expect('}');
  }

  // [value, ...]: element(index) reads each value.
  template <class Element>
  void array(Element&& element) {
    expect('[');
    if (consume(']')) return;
    size_t index = 0;
    do element(index++);
    while (consume(','));
    expect(']');
  }

  // A JSON string: unescaped into out, UTF-8 checked.
  void read_string(std::string& out) {
    expect('"');
    out.clear();
    for (;;) {
      const size_t start = pos_;
      while (pos_ < text_.size() && !special(text_[pos_])) ++pos_;
      out.append(text_.substr(start, pos_ - start));
      if (pos_ >= text_.size()) fail("unterminated string");
      const uint8_t c = static_cast<uint8_t>(text_[pos_]);
      if (c == '"') {
        ++pos_;
        return;
      }
      if (c >= 0x80) {
        const size_t length = utf8_lead(c).length;
        if (length == 0 || utf8_valid_prefix(text_, pos_) != length) fail("invalid UTF-8 in a string");
        out.append(text_.substr(pos_, length));
        pos_ += length;
      } else if (c < 0x20) {
        fail("control character in a string");
      } else {
        read_escape(out);
      }
    }
  }

  // A non-negative integer that fits int32, or nullopt (pos unchanged) for any other value.
  std::optional<int32_t> read_id() {
    const size_t start = pos_;
    if (peek() < '0' || peek() > '9') return std::nullopt;
    int64_t value = 0;
    size_t i = pos_;
    for (; i < text_.size() && text_[i] >= '0' && text_[i] <= '9' && value <= INT32_MAX; ++i) value = value * 10 + (text_[i] - '0');
    const bool plain = value <= INT32_MAX && (i - pos_ == 1 || text_[pos_] != '0') &&
                       (i == text_.size() || text_[i] == ',' || text_[i] == '}' || text_[i] == ']' || text_[i] == ' ' ||
                        text_[i] == '\n' || text_[i] == '\r' || text_[i] == '\t');
    if (!plain) {
      pos_ = start;
      return std::nullopt;
    }
    pos_ = i;
    return static_cast<int32_t>(value);
  }

  // Any value, parsed by nlohmann::json from its span.
  json read_value() {
    peek();
    const size_t start = pos_;
    skip_value();
    return parse_json(text_.substr(start, pos_ - start), "tokenizer.json", start);
  }

  size_t position() const { return pos_; }
  void rewind(size_t position) { pos_ = position; }

  [[noreturn]] void fail(const std::string& what) {
    detail::fail(concat("[tokenizer] tokenizer.json is not valid JSON at byte ", pos_, ": ", what));
  }

 private:
  static bool special(char c) { return c == '"' || c == '\\' || static_cast<uint8_t>(c) < 0x20 || static_cast<uint8_t>(c) >= 0x80; }

  void read_escape(std::string& out) {
    ++pos_;  // the backslash
    if (pos_ >= text_.size()) fail("unterminated string");
    const char e = text_[pos_++];
    switch (e) {
      case '"': case '\\': case '/': out += e; return;
      case 'b': out += '\b'; return;
      case 'f': out += '\f'; return;
      case 'n': out += '\n'; return;
      case 'r': out += '\r'; return;
      case 't': out += '\t'; return;
      case 'u': break;
      default: --pos_; fail("invalid escape");
    }
    char32_t cp = read_hex4();
    if (cp >= 0xDC00 && cp <= 0xDFFF) fail("unpaired surrogate in a \\u escape");
    if (cp >= 0xD800 && cp <= 0xDBFF) {
      if (text_.substr(pos_, 2) != "\\u") fail("unpaired surrogate in a \\u escape");
      pos_ += 2;
      const char32_t low = read_hex4();
      if (low < 0xDC00 || low > 0xDFFF) fail("unpaired surrogate in a \\u escape");
      cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
    }
    append_utf8(out, cp);
  }

  char32_t read_hex4() {
    char32_t cp = 0;
    for (int k = 0; k < 4; ++k, ++pos_) {
      const char h = pos_ < text_.size() ? text_[pos_] : 0;
      const int digit = h >= '0' && h <= '9' ? h - '0' : h >= 'a' && h <= 'f' ? h - 'a' + 10 : h >= 'A' && h <= 'F' ? h - 'A' + 10 : -1;
      if (digit < 0) fail("expected 4 hex digits after \\u");
      cp = cp * 16 + static_cast<char32_t>(digit);
    }
    return cp;
  }

  // Moves past one value, matching brackets and strings; nlohmann checks the rest.
  void skip_value() {
    int depth = 0;
    do {
      const char c = peek();
      if (c == 0) fail("unexpected end of the text");
      if (c == '"') {
        skip_string();
      } else if (c == '{' || c == '[') {
        ++depth;
        ++pos_;
      } else if (c == '}' || c == ']') {
        if (depth == 0) fail("expected a value");
        --depth;
        ++pos_;
      } else if (c == ',' || c == ':') {
        if (depth == 0) fail("expected a value");
        ++pos_;
      } else {
        const size_t start = pos_;
        while (pos_ < text_.size() && std::string_view(",:]} \t\r\n\"[{").find(text_[pos_]) == std::string_view::npos) ++pos_;
        if (pos_ == start) fail("expected a value");
      }
    } while (depth > 0);
  }

  void skip_string() {
    ++pos_;
    while (pos_ < text_.size() && text_[pos_] != '"') pos_ += text_[pos_] == '\\' ? 2 : 1;
    if (pos_ >= text_.size()) fail("unterminated string");
    ++pos_;
  }

  std::string_view text_;
  size_t pos_ = 0;
};

// One merge: "left right" (split at the first space) or ["left", "right"].
inline std::pair<std::string, std::string> read_merge(JsonReader& reader, size_t i, std::string& left, std::string& right) {
  const size_t start = reader.position();
  if (reader.peek() == '"') {
    reader.read_string(left);
    const size_t space = left.find(' ');
    R1_CHECK(space != std::string::npos, "[tokenizer] /model/merges/", i, ": expected \"left right\", found ", show(json(left)));
    return {left.substr(0, space), left.substr(space + 1)};
  }
  if (reader.consume('[') && reader.peek() == '"') {
    reader.read_string(left);
    if (reader.consume(',') && reader.peek() == '"') {
      reader.read_string(right);
      if (reader.consume(']')) return {left, right};
    }
  }
  reader.rewind(start);
  const json other = reader.read_value();
  fail(concat("[tokenizer] /model/merges/", i, ": expected \"left right\" or [\"left\", \"right\"], found ", show(other)));
}

inline TokenizerJson read_tokenizer_json(std::string_view text) {
  JsonReader reader(text);
  TokenizerJson out;
  if (reader.peek() != '{') {
    out.root = reader.read_value();
    reader.expect_end();
    return out;
  }
  out.root = json::object();
  reader.object([&](const std::string& key) {
    if (key != "model" || reader.peek() != '{') {
      out.root[key] = reader.read_value();
      return;
    }
    json model = json::object();
    reader.object([&](const std::string& model_key) {
      if (model_key == "vocab" && reader.peek() == '{') {
        out.vocab.emplace();
        reader.object([&](const std::string& token) {
          const std::optional<int32_t> id = reader.read_id();
          out.vocab->emplace_back(token, id ? *id : as_id(reader.read_value(), "/model/vocab/" + token));
        });
      } else if (model_key == "merges" && reader.peek() == '[') {
        out.merges.emplace();
        std::string left, right;
        reader.array([&](size_t i) { out.merges->push_back(read_merge(reader, i, left, right)); });
      } else {
        model[model_key] = reader.read_value();
      }
    });
    out.root["model"] = std::move(model);
  });
  reader.expect_end();
  return out;
}


inline std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  R1_CHECK(in.good(), "[tokenizer] cannot open ", path);
  std::string text;
  in.seekg(0, std::ios::end);
  text.resize(static_cast<size_t>(in.tellg()));
  in.seekg(0);
  in.read(text.data(), static_cast<std::streamsize>(text.size()));
  R1_CHECK(in.good(), "[tokenizer] cannot read ", path);
  return text;
}

}  // namespace detail::tok

// ---------------------------------------------------------------------------------------
// Pre-tokenizer: a Sequence of Split(regex, Isolated) steps, then ByteLevel.

class PreTokenizer {
 public:
  // The regexes r1 runs, each recognized by its exact text (pattern_regex gives it).
  enum class Pattern {
    Digits3,        // \p{N}{1,3}                                   DeepSeek-V3, first Split
    DeepSeekCjk,    // [一-龥぀-ゟ゠-ヿ]+                            DeepSeek-V3, second Split
    DeepSeekWords,  // [!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+|
                    //  ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+   (\r \n literal)  third Split
    Qwen,           // (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|
                    // \s*[\r\n]+|\s+(?!\S)|\s+                     Qwen2/2.5/3
    Llama3,         // as Qwen with \p{N}{1,3}                       Llama-3
    Gpt2,           // 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
                    //                                               ByteLevel with use_regex
  };

  struct Step {
    enum class Kind { Split, ByteLevel } kind = Kind::Split;
    Pattern pattern = Pattern::Gpt2;  // Split
    bool add_prefix_space = false;    // ByteLevel: prepend ' ' to a piece not starting with one
    bool use_regex = false;           // ByteLevel: split with the GPT-2 pattern
  };

  static std::string_view pattern_regex(Pattern p) {
    switch (p) {
      case Pattern::Digits3: return R"(\p{N}{1,3})";
      case Pattern::DeepSeekCjk: return "[\u4E00-\u9FA5\u3040-\u309F\u30A0-\u30FF]+";
      case Pattern::DeepSeekWords:
        return "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| "
               "?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+";
      case Pattern::Qwen:
        return R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
      case Pattern::Llama3:
        return R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
      case Pattern::Gpt2: return R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
    }
    return {};
  }

  static std::optional<Pattern> find_pattern(std::string_view regex) {
    for (Pattern p : {Pattern::Digits3, Pattern::DeepSeekCjk, Pattern::DeepSeekWords, Pattern::Qwen, Pattern::Llama3, Pattern::Gpt2})
      if (pattern_regex(p) == regex) return p;
    return std::nullopt;
  }

  PreTokenizer() = default;  // no steps: the whole text is one piece
  // A ByteLevel step may only come last: after it HF's text is in the byte-level alphabet,
  // and r1's matchers read UTF-8.
  explicit PreTokenizer(std::vector<Step> steps) : steps_(std::move(steps)) {
    for (size_t i = 0; i + 1 < steps_.size(); ++i)
      R1_CHECK(steps_[i].kind == Step::Kind::Split, "[PreTokenizer] step ", i,
               " is ByteLevel but not the last step; r1 supports ByteLevel last only");
  }

  // pre_tokenizer: ByteLevel, or a Sequence of Splits ending with ByteLevel.
  static PreTokenizer from_json(const nlohmann::json& j, const std::string& path) {
    using namespace detail::tok;
    std::vector<Step> steps;
    const std::string& type = type_of(j, path);
    if (type == "Sequence") {
      const json& list = member(j, path, "pretokenizers");
      R1_CHECK(list.is_array(), "[tokenizer] ", path, "/pretokenizers: expected an array, found ", show(list));
      for (size_t i = 0; i < list.size(); ++i) steps.push_back(step_from_json(list[i], path + "/pretokenizers/" + std::to_string(i)));
    } else {
      steps.push_back(step_from_json(j, path));
    }
    R1_CHECK(!steps.empty() && steps.back().kind == Step::Kind::ByteLevel, "[tokenizer] ", path,
             ": expected a ByteLevel pre-tokenizer last, found ", show(j), " (r1 implements byte-level BPE only)");
    for (size_t i = 0; i + 1 < steps.size(); ++i)
      R1_CHECK(steps[i].kind == Step::Kind::Split, "[tokenizer] ", path, "/pretokenizers/", i,
               ": ByteLevel before another step is not supported (r1 supports ByteLevel last only)");
    return PreTokenizer(std::move(steps));
  }

  const std::vector<Step>& steps() const { return steps_; }

  // Calls emit(piece) for each pre-token of text, in order; pieces are never empty. A piece
  // may point into scratch (ByteLevel's prefix space) and is valid only during the call.
  template <class Emit>
  void for_each_piece(std::string_view text, std::string& scratch, Emit&& emit) const {
    if (!text.empty()) run(0, text, scratch, emit);
  }

  // The length in bytes of the match of p at s[i] (0: none). Lookarounds see s only: HF runs
  // each Split on each piece as its own string.
  static size_t match_at(Pattern p, std::string_view s, size_t i) {
    switch (p) {
      case Pattern::Digits3: return run_of(s, i, unicode::kN, 3);
      case Pattern::DeepSeekCjk: return match_cjk(s, i);
      case Pattern::DeepSeekWords: return match_deepseek(s, i);
      case Pattern::Qwen: return match_llama(s, i, 1);
      case Pattern::Llama3: return match_llama(s, i, 3);
      case Pattern::Gpt2: return match_gpt2(s, i);
    }
    return 0;
  }

  // Split with behaviour Isolated: every match is a piece and so is every gap between them.
  template <class Emit>
  static void split_isolated(Pattern p, std::string_view s, Emit&& emit) {
    size_t gap = 0, i = 0;
    while (i < s.size()) {
      const size_t length = match_at(p, s, i);
      if (length == 0) {
        i += detail::tok::code_point_at(s, i).length;
        continue;
      }
      if (gap < i) emit(s.substr(gap, i - gap));
      emit(s.substr(i, length));
      i += length;
      gap = i;
    }
    if (gap < s.size()) emit(s.substr(gap));
  }

 private:
  static Step step_from_json(const nlohmann::json& j, const std::string& path) {
    using namespace detail::tok;
    const std::string& type = type_of(j, path);
    Step step;
    if (type == "ByteLevel") {
      step.kind = Step::Kind::ByteLevel;
      step.add_prefix_space = optional_bool(j, path, "add_prefix_space", true);
      step.use_regex = optional_bool(j, path, "use_regex", true);
      return step;
    }
    R1_CHECK(type == "Split", "[tokenizer] ", path, "/type: expected \"Split\" or \"ByteLevel\", found \"", type, "\"");
    const json& pattern = member(j, path, "pattern");
    R1_CHECK(pattern.is_object() && pattern.contains("Regex"), "[tokenizer] ", path,
             "/pattern: expected {\"Regex\": ...}, found ", show(pattern), " (string patterns are not supported)");
    const std::string& regex = as_string(pattern["Regex"], path + "/pattern/Regex");
    const std::optional<Pattern> known = find_pattern(regex);
    R1_CHECK(known.has_value(), "[tokenizer] ", path, "/pattern/Regex: unsupported pattern ", show(pattern["Regex"]),
             "; r1 runs the DeepSeek-V3, Qwen, Llama-3 and GPT-2 patterns (PreTokenizer::pattern_regex)");
    const std::string& behavior = as_string(member(j, path, "behavior"), path + "/behavior");
    R1_CHECK(behavior == "Isolated", "[tokenizer] ", path, "/behavior: expected \"Isolated\", found \"", behavior, "\"");
    R1_CHECK(!optional_bool(j, path, "invert", false), "[tokenizer] ", path, "/invert: true is not supported");
    step.pattern = *known;
    return step;
  }

  template <class Emit>
  void run(size_t index, std::string_view piece, std::string& scratch, Emit& emit) const {
    if (index == steps_.size()) {
      emit(piece);
      return;
    }
    const Step& step = steps_[index];
    if (step.kind == Step::Kind::Split) {
      split_isolated(step.pattern, piece, [&](std::string_view sub) { run(index + 1, sub, scratch, emit); });
      return;
    }
    if (step.add_prefix_space && piece.front() != ' ') {
      scratch.assign(1, ' ');
      scratch.append(piece);
      piece = scratch;
    }
    if (step.use_regex) {
      split_isolated(Pattern::Gpt2, piece, emit);
    } else {
      emit(piece);
    }
  }

  static bool is_newline(char32_t c) { return c == '\r' || c == '\n'; }

  // Length of the run from s[i] of up to max_count code points whose flags meet any of mask.
  static size_t run_of(std::string_view s, size_t i, uint8_t mask, size_t max_count = SIZE_MAX) {
    size_t j = i;
    for (size_t count = 0; count < max_count && j < s.size(); ++count) {
      const detail::tok::CodePoint c = detail::tok::code_point_at(s, j);
      if (!(c.flags & mask)) break;
      j += c.length;
    }
    return j - i;
  }

  // Length of the run from s[i] of code points with none of the flags in mask.
  static size_t run_without(std::string_view s, size_t i, uint8_t mask) {
    size_t j = i;
    while (j < s.size()) {
      const detail::tok::CodePoint c = detail::tok::code_point_at(s, j);
      if (c.flags & mask) break;
      j += c.length;
    }
    return j - i;
  }

  static size_t newline_run(std::string_view s, size_t j) {
    size_t k = j;
    while (k < s.size() && (s[k] == '\r' || s[k] == '\n')) ++k;
    return k - j;
  }

  // The whitespace alternatives, for s[i] in \s:
  //   \s*[\r\n]+   the run up to and including its last \r or \n, if it has one
  //   \s+(?!\S)    the run, minus its last code point when a non-space follows
  //   \s+          a single space before a non-space
  static size_t match_whitespace(std::string_view s, size_t i, bool newline_alternative) {
    size_t j = i, last_newline_end = 0, last_length = 0, count = 0;
    while (j < s.size()) {
      const detail::tok::CodePoint c = detail::tok::code_point_at(s, j);
      if (!(c.flags & unicode::kSpace)) break;
      j += c.length;
      last_length = c.length;
      ++count;
      if (is_newline(c.cp)) last_newline_end = j;
    }
    if (newline_alternative && last_newline_end != 0) return last_newline_end - i;
    if (j == s.size() || count == 1) return j - i;
    return j - last_length - i;
  }

  // (?i:'s|'t|'re|'ve|'m|'ll|'d) or, case_sensitive, the lower-case forms only, at s[i] == '\''.
  // Under Oniguruma's case folding 's' also matches U+017F (long s).
  static size_t match_contraction(std::string_view s, size_t i, bool ignore_case) {
    const auto lower = [&](size_t k) -> char {
      if (k >= s.size()) return 0;
      const char c = s[k];
      return ignore_case && c >= 'A' && c <= 'Z' ? static_cast<char>(c + 32) : c;
    };
    const char a = lower(i + 1);
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
    if ((a == 'r' || a == 'v') && lower(i + 2) == 'e') return 3;
    if (a == 'l' && lower(i + 2) == 'l') return 3;
    if (ignore_case && s.substr(i + 1, 2) == "\xC5\xBF") return 3;
    return 0;
  }

  static size_t match_cjk(std::string_view s, size_t i) {
    size_t j = i;
    while (j < s.size()) {
      const detail::tok::CodePoint c = detail::tok::code_point_at(s, j);
      if (!((c.cp >= 0x4E00 && c.cp <= 0x9FA5) || (c.cp >= 0x3040 && c.cp <= 0x30FF))) break;
      j += c.length;
    }
    return j - i;
  }

  static bool is_ascii_punctuation(char32_t c) {
    return (c >= '!' && c <= '/') || (c >= ':' && c <= '@') || (c >= '[' && c <= '`') || (c >= '{' && c <= '~');
  }
  static bool is_ascii_letter(char c) { return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z'); }

  // DeepSeekWords, alternatives in order:
  //   [ASCII punctuation][A-Za-z]+ | [^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+ | ' '?[\p{P}\p{S}]+[\r\n]* | whitespace
  static size_t match_deepseek(std::string_view s, size_t i) {
    using namespace unicode;
    const detail::tok::CodePoint c = detail::tok::code_point_at(s, i);
    const size_t next = i + c.length;
    if (is_ascii_punctuation(c.cp) && next < s.size() && is_ascii_letter(s[next])) {
      size_t j = next;
      while (j < s.size() && is_ascii_letter(s[j])) ++j;
      return j - i;
    }
    if (c.flags & (kL | kM)) return run_of(s, i, kL | kM);
    if (!(c.flags & (kL | kP | kS)) && !is_newline(c.cp)) {
      const size_t letters = run_of(s, next, kL | kM);
      if (letters > 0) return c.length + letters;
    }
    const size_t start = c.cp == ' ' ? next : i;
    const size_t symbols = run_of(s, start, kP | kS);
    if (symbols > 0) return start + symbols + newline_run(s, start + symbols) - i;
    if (c.flags & kSpace) return match_whitespace(s, i, true);
    return 0;
  }

  // Qwen (max_digits 1) and Llama-3 (3), alternatives in order:
  //   contractions | [^\r\n\p{L}\p{N}]?\p{L}+ | \p{N}{1,max} | ' '?[^\s\p{L}\p{N}]+[\r\n]* | whitespace
  static size_t match_llama(std::string_view s, size_t i, size_t max_digits) {
    using namespace unicode;
    const detail::tok::CodePoint c = detail::tok::code_point_at(s, i);
    if (c.cp == '\'') {
      const size_t contraction = match_contraction(s, i, true);
      if (contraction > 0) return contraction;
    }
    const size_t next = i + c.length;
    if (c.flags & kL) return run_of(s, i, kL);
    if (!(c.flags & kN) && !is_newline(c.cp)) {
      const size_t letters = run_of(s, next, kL);
      if (letters > 0) return c.length + letters;
    }
    if (c.flags & kN) return run_of(s, i, kN, max_digits);
    const size_t start = c.cp == ' ' ? next : i;
    const size_t other = run_without(s, start, kSpace | kL | kN);
    if (other > 0) return start + other + newline_run(s, start + other) - i;
    if (c.flags & kSpace) return match_whitespace(s, i, true);
    return 0;
  }

  // GPT-2: contractions | ' '?\p{L}+ | ' '?\p{N}+ | ' '?[^\s\p{L}\p{N}]+ | \s+(?!\S) | \s+
  static size_t match_gpt2(std::string_view s, size_t i) {
    using namespace unicode;
    const detail::tok::CodePoint c = detail::tok::code_point_at(s, i);
    if (c.cp == '\'') {
      const size_t contraction = match_contraction(s, i, false);
      if (contraction > 0) return contraction;
    }
    const size_t start = c.cp == ' ' ? i + 1 : i;
    if (start < s.size()) {
      const detail::tok::CodePoint first = detail::tok::code_point_at(s, start);
      size_t run = 0;
      if (first.flags & kL) {
        run = run_of(s, start, kL);
      } else if (first.flags & kN) {
        run = run_of(s, start, kN);
      } else if (!(first.flags & kSpace)) {
        run = run_without(s, start, kSpace | kL | kN);
      }
      if (run > 0) return start + run - i;
    }
    if (c.flags & kSpace) return match_whitespace(s, i, false);
    return 0;
  }

  std::vector<Step> steps_;
};

// ---------------------------------------------------------------------------------------
// BPE model: vocab and ranked merges over raw bytes.

// Reusable buffers of one encoding thread.
struct BpeScratch {
  struct Symbol {
    int32_t id, prev, next;
  };
  struct Candidate {
    uint32_t rank, pos;
    int32_t id;
  };
  std::vector<Symbol> symbols;
  std::vector<Candidate> heap;
};

namespace detail::tok {

// string -> id, open addressing over an arena of the strings: the vocab by token and by bytes.
class StringIds {
 public:
  explicit StringIds(size_t capacity = 0) : slots_(table_size_for(capacity)) {}

  // False when key is already present (its id is left unchanged).
  bool insert(std::string_view key, int32_t id) { return insert(key, id, hash_bytes(key)); }
  bool insert(std::string_view key, int32_t id, uint64_t h) {
    R1_CHECK(2 * (size_ + 1) <= slots_.size(), "[StringIds.insert] table sized for ", slots_.size() / 2, " entries is full");
    const size_t mask = slots_.size() - 1;
    size_t slot = h & mask;
    for (; slots_[slot].id >= 0; slot = (slot + 1) & mask)
      if (matches(slots_[slot], h, key)) return false;
    slots_[slot] = {h, static_cast<uint32_t>(arena_.size()), static_cast<uint32_t>(key.size()), id};
    arena_.append(key);
    ++size_;
    return true;
  }

  int32_t find(std::string_view key) const { return find(key, hash_bytes(key)); }

  // find with the hash prefetch returned, after the slot's cache line had time to arrive.
  int32_t find(std::string_view key, uint64_t h) const {
    const size_t mask = slots_.size() - 1;
    for (size_t slot = h & mask; slots_[slot].id >= 0; slot = (slot + 1) & mask)
      if (matches(slots_[slot], h, key)) return slots_[slot].id;
    return -1;
  }

  // Starts loading key's slot into the cache; returns key's hash for find.
  uint64_t prefetch(std::string_view key) const {
    const uint64_t h = hash_bytes(key);
    __builtin_prefetch(&slots_[h & (slots_.size() - 1)]);
    return h;
  }

  size_t size() const { return size_; }

 private:
  struct Slot {
    uint64_t hash = 0;
    uint32_t offset = 0, length = 0;
    int32_t id = -1;  // -1: empty
  };
  bool matches(const Slot& s, uint64_t h, std::string_view key) const {
    return s.hash == h && s.length == key.size() && std::memcmp(arena_.data() + s.offset, key.data(), key.size()) == 0;
  }

  std::vector<Slot> slots_;
  std::string arena_;
  size_t size_ = 0;
};

}  // namespace detail::tok

class BpeModel {
 public:
  BpeModel() = default;

  // vocab: (token, id) with tokens in the byte-level alphabet as tokenizer.json writes them
  // (valid UTF-8); merges: (left, right) token pairs, rank = index. where prefixes error
  // messages (a JSON path in tokenizer.json). Tokens outside the alphabet (e.g. DeepSeek's
  // "<｜User｜>" entries) are kept for id_to_token but BPE never produces them.
  BpeModel(const std::vector<std::pair<std::string, int32_t>>& vocab, const std::vector<std::pair<std::string, std::string>>& merges,
           bool ignore_merges, const std::string& where = "[tokenizer] /model")
      : ignore_merges_(ignore_merges), by_token_(vocab.size()), by_bytes_(vocab.size()) {
    int32_t max_id = -1;
    for (const auto& [token, id] : vocab) {
      R1_CHECK(id >= 0, where, "/vocab: \"", token, "\" has a negative id ", id);
      max_id = std::max(max_id, id);
    }
    // Per-id tables span ids 0..max_id: ids far past the vocab's size would make them huge.
    constexpr int64_t kMaxIdGap = int64_t{1} << 20;
    R1_CHECK(max_id < static_cast<int64_t>(vocab.size()) + kMaxIdGap, where, "/vocab: id ", max_id, " is more than ", kMaxIdGap,
             " past the vocab's ", vocab.size(), " tokens (r1 keeps tables indexed by id)");
    token_offset_.assign(static_cast<size_t>(max_id) + 2, 0);
    present_.assign(static_cast<size_t>(max_id) + 1, false);
    // One token per id: the arena is sized by it (a repeated id would overflow the arena).
    for (const auto& entry : vocab) {
      const int32_t id = entry.second;
      R1_CHECK(!present_[id], where, "/vocab: id ", id, " is given to both \"",
               std::find_if(vocab.begin(), vocab.end(), [&](const auto& e) { return e.second == id; })->first, "\" and \"", entry.first, "\"");
      present_[id] = true;
      token_offset_[id + 1] = static_cast<uint32_t>(entry.first.size());
    }
    for (size_t id = 1; id < token_offset_.size(); ++id) token_offset_[id] += token_offset_[id - 1];
    token_arena_.resize(token_offset_.back());
    byte_ids_.fill(-1);
    // Each token lands at a random place in tables larger than the L2 cache. Tokens (and in
    // build_merges, merges) go in batches whose slots are prefetched together, so that the
    // cache misses overlap: Llama-3's model (128k tokens, 280k merges) builds in about 40 ms
    // instead of 95 ms on this machine.
    constexpr size_t kBatch = 16;
    std::array<std::string, kBatch> bytes;
    std::array<bool, kBatch> decodable;
    std::array<uint64_t, 2 * kBatch> hashes;
    for (size_t base = 0; base < vocab.size(); base += kBatch) {
      const size_t n = std::min(kBatch, vocab.size() - base);
      for (size_t i = 0; i < n; ++i) {
        const auto& [token, id] = vocab[base + i];
        R1_CHECK(detail::tok::invalid_utf8_offset(token) == std::string_view::npos, where, "/vocab: the token of id ", id,
                 " is not valid UTF-8");
        std::memcpy(token_arena_.data() + token_offset_[id], token.data(), token.size());
        hashes[2 * i] = by_token_.prefetch(token);
        decodable[i] = detail::tok::byte_level_decode(token, bytes[i]);
        if (decodable[i]) hashes[2 * i + 1] = by_bytes_.prefetch(bytes[i]);
      }
      for (size_t i = 0; i < n; ++i) {
        const auto& [token, id] = vocab[base + i];
        R1_CHECK(by_token_.insert(token, id, hashes[2 * i]), where, "/vocab: \"", token, "\" appears twice");
        if (!decodable[i]) continue;
        if (bytes[i].size() == 1) byte_ids_[static_cast<uint8_t>(bytes[i][0])] = id;
        by_bytes_.insert(bytes[i], id, hashes[2 * i + 1]);
      }
    }
    build_merges(merges, where);
  }

  int32_t size() const { return static_cast<int32_t>(present_.size()); }  // one past the largest id
  int32_t entry_count() const { return static_cast<int32_t>(by_token_.size()); }
  bool has(int32_t id) const { return id >= 0 && id < size() && present_[id]; }
  std::string_view token(int32_t id) const {
    return std::string_view(token_arena_).substr(token_offset_[id], token_offset_[id + 1] - token_offset_[id]);
  }
  std::optional<int32_t> id_of(std::string_view token) const {
    const int32_t id = by_token_.find(token);
    return id < 0 ? std::nullopt : std::optional<int32_t>(id);
  }
  // The id of the token whose bytes are exactly piece, or -1.
  int32_t id_of_bytes(std::string_view piece) const { return by_bytes_.find(piece); }
  // The id of the token for one byte, or -1.
  int32_t byte_id(uint8_t b) const { return byte_ids_[b]; }
  size_t merge_count() const { return merge_count_; }
  bool ignore_merges() const { return ignore_merges_; }

  // Appends the ids of one piece (raw bytes). Bytes without a token are dropped, as HF does
  // when there is no unk token.
  void encode_word(std::string_view piece, std::vector<int32_t>& out, BpeScratch& scratch) const {
    if (ignore_merges_) {
      const int32_t whole = id_of_bytes(piece);
      if (whole >= 0) {
        out.push_back(whole);
        return;
      }
    }
    auto& symbols = scratch.symbols;
    auto& heap = scratch.heap;
    symbols.clear();
    heap.clear();
    for (const char b : piece) {
      const int32_t id = byte_ids_[static_cast<uint8_t>(b)];
      if (id < 0) continue;
      const int32_t index = static_cast<int32_t>(symbols.size());
      symbols.push_back({id, index - 1, index + 1});
    }
    if (symbols.empty()) return;
    symbols.back().next = -1;
    // HF's Word::merge_all: a min-heap of (rank, position) candidates; a candidate whose
    // pair has changed since it was pushed is stale and skipped.
    const auto later = [](const BpeScratch::Candidate& a, const BpeScratch::Candidate& b) {
      return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos;
    };
    const auto push = [&](int32_t pos) {
      const Merge* m = find_merge(symbols[pos].id, symbols[symbols[pos].next].id);
      if (!m) return;
      heap.push_back({m->rank, static_cast<uint32_t>(pos), m->id});
      std::push_heap(heap.begin(), heap.end(), later);
    };
    for (int32_t pos = 0; pos + 1 < static_cast<int32_t>(symbols.size()); ++pos) push(pos);
    while (!heap.empty()) {
      std::pop_heap(heap.begin(), heap.end(), later);
      const BpeScratch::Candidate top = heap.back();
      heap.pop_back();
      BpeScratch::Symbol& left = symbols[top.pos];
      if (left.id < 0 || left.next < 0) continue;
      const Merge* m = find_merge(left.id, symbols[left.next].id);
      if (!m || m->id != top.id) continue;
      BpeScratch::Symbol& right = symbols[left.next];
      left.id = top.id;
      right.id = -1;
      left.next = right.next;
      if (left.next >= 0) symbols[left.next].prev = static_cast<int32_t>(top.pos);
      if (left.prev >= 0) push(left.prev);
      if (left.next >= 0) push(static_cast<int32_t>(top.pos));
    }
    for (int32_t pos = 0; pos >= 0; pos = symbols[pos].next) out.push_back(symbols[pos].id);
  }

 private:
  struct Merge {
    uint32_t rank;
    int32_t id;
  };
  struct MergeSlot {
    uint64_t key = kEmpty;
    Merge merge{};
  };
  static constexpr uint64_t kEmpty = ~uint64_t{0};

  static uint64_t pair_key(int32_t left, int32_t right) { return (uint64_t(uint32_t(left)) << 32) | uint32_t(right); }

  const Merge* find_merge(int32_t left, int32_t right) const {
    const uint64_t key = pair_key(left, right);
    const size_t mask = merge_slots_.size() - 1;
    for (size_t slot = detail::tok::mix64(key) & mask;; slot = (slot + 1) & mask) {
      const MergeSlot& s = merge_slots_[slot];
      if (s.key == key) return &s.merge;
      if (s.key == kEmpty) return nullptr;
    }
  }

  // Three vocab lookups per merge; batched like the vocab loop in the constructor.
  void build_merges(const std::vector<std::pair<std::string, std::string>>& merges, const std::string& where) {
    merge_count_ = merges.size();
    merge_slots_.assign(detail::tok::table_size_for(merges.size()), MergeSlot{});
    const size_t mask = merge_slots_.size() - 1;
    constexpr size_t kBatch = 16;
    std::array<std::string, kBatch> joined;
    std::array<uint64_t, 3 * kBatch> hashes;
    std::array<uint64_t, kBatch> keys;
    std::array<int32_t, kBatch> ids;
    for (size_t base = 0; base < merges.size(); base += kBatch) {
      const size_t n = std::min(kBatch, merges.size() - base);
      for (size_t i = 0; i < n; ++i) {
        const auto& [left, right] = merges[base + i];
        joined[i].assign(left).append(right);
        hashes[3 * i] = by_token_.prefetch(left);
        hashes[3 * i + 1] = by_token_.prefetch(right);
        hashes[3 * i + 2] = by_token_.prefetch(joined[i]);
      }
      for (size_t i = 0; i < n; ++i) {
        const size_t rank = base + i;
        const auto& [left, right] = merges[rank];
        const int32_t l = by_token_.find(left, hashes[3 * i]), r = by_token_.find(right, hashes[3 * i + 1]);
        R1_CHECK(l >= 0 && r >= 0, where, "/merges/", rank, ": \"", l < 0 ? left : right, "\" is not in the vocab");
        ids[i] = by_token_.find(joined[i], hashes[3 * i + 2]);
        R1_CHECK(ids[i] >= 0, where, "/merges/", rank, ": the merged token \"", joined[i], "\" is not in the vocab");
        keys[i] = pair_key(l, r);
        __builtin_prefetch(&merge_slots_[detail::tok::mix64(keys[i]) & mask]);
      }
      for (size_t i = 0; i < n; ++i) {
        // A repeated pair keeps its last rank, as HF's merge map does.
        size_t slot = detail::tok::mix64(keys[i]) & mask;
        while (merge_slots_[slot].key != kEmpty && merge_slots_[slot].key != keys[i]) slot = (slot + 1) & mask;
        merge_slots_[slot] = {keys[i], {static_cast<uint32_t>(base + i), ids[i]}};
      }
    }
  }

  bool ignore_merges_ = false;
  std::string token_arena_;             // tokens as written in tokenizer.json, in id order
  std::vector<uint32_t> token_offset_;  // id -> offset in token_arena_ (size + 1 entries)
  std::vector<bool> present_;
  detail::tok::StringIds by_token_, by_bytes_;
  std::array<int32_t, 256> byte_ids_{};
  std::vector<MergeSlot> merge_slots_;  // (left, right) -> (rank, merged id), open addressing
  size_t merge_count_ = 0;
};

// ---------------------------------------------------------------------------------------
// Added tokens

struct AddedToken {
  std::string content;
  int32_t id = 0;
  bool special = false, normalized = false, lstrip = false, rstrip = false, single_word = false;
};

namespace detail::tok {

// A byte trie over added-token contents, matched leftmost-longest like HF's aho-corasick
// (MatchKind::LeftmostLongest): the earliest start wins, then the longest token there.
class TokenTrie {
 public:
  void add(std::string_view content, int32_t token) {
    if (content.empty()) return;
    if (nodes_.empty()) nodes_.push_back(-1);
    int32_t node = 0;
    for (const char c : content) {
      const uint64_t key = edge_key(node, c);
      auto it = edges_.find(key);
      if (it == edges_.end()) {
        it = edges_.emplace(key, static_cast<int32_t>(nodes_.size())).first;
        nodes_.push_back(-1);
      }
      node = it->second;
    }
    nodes_[node] = token;
    can_start_[static_cast<uint8_t>(content[0])] = true;
  }

  bool empty() const { return nodes_.empty(); }

  struct Match {
    size_t start = 0, end = 0;
    int32_t token = -1;
  };

  // The leftmost-longest match starting at or after from.
  std::optional<Match> find(std::string_view s, size_t from) const {
    for (size_t start = from; start < s.size(); ++start) {
      if (!can_start_[static_cast<uint8_t>(s[start])]) continue;
      Match best;
      int32_t node = 0;
      for (size_t i = start; i < s.size(); ++i) {
        const auto it = edges_.find(edge_key(node, s[i]));
        if (it == edges_.end()) break;
        node = it->second;
        if (nodes_[node] >= 0) best = {start, i + 1, nodes_[node]};
      }
      if (best.token >= 0) return best;
    }
    return std::nullopt;
  }

 private:
  static uint64_t edge_key(int32_t node, char c) { return (uint64_t(uint32_t(node)) << 8) | static_cast<uint8_t>(c); }

  std::vector<int32_t> nodes_;  // node -> index of the token ending there, or -1
  std::unordered_map<uint64_t, int32_t> edges_;
  std::array<bool, 256> can_start_{};
};

// Rust regex's \s and \w, which HF uses around added tokens (lstrip/rstrip, single_word).
inline bool is_regex_space(char32_t c) { return unicode::flags(c) & unicode::kSpace; }
inline bool is_regex_word(char32_t c) { return unicode::flags(c) & unicode::kWord; }

// The last code point of s (valid UTF-8, not empty).
inline char32_t last_code_point(std::string_view s) {
  size_t i = s.size() - 1;
  while (i > 0 && (static_cast<uint8_t>(s[i]) & 0xC0) == 0x80) --i;
  return code_point_at(s, i).cp;
}

}  // namespace detail::tok

// ---------------------------------------------------------------------------------------
// Word cache: piece bytes -> ids, per encoding thread. Open addressing over arenas, cleared
// whole when half full, so its memory stays bounded (about 4 MB).

class WordCache {
 public:
  static constexpr size_t kMaxPieceBytes = 64;  // longer pieces rarely repeat

  WordCache() : slots_(kSlots) {}

  const int32_t* find(std::string_view piece, uint64_t hash, size_t& count) const {
    for (size_t slot = hash & (kSlots - 1);; slot = (slot + 1) & (kSlots - 1)) {
      const Slot& s = slots_[slot];
      if (s.key_length == 0) return nullptr;
      if (s.hash == hash && s.key_length == piece.size() && std::memcmp(keys_.data() + s.key_offset, piece.data(), piece.size()) == 0) {
        count = s.id_count;
        return ids_.data() + s.id_offset;
      }
    }
  }

  void insert(std::string_view piece, uint64_t hash, const int32_t* ids, size_t count) {
    if (used_ * 2 >= kSlots) clear();
    size_t slot = hash & (kSlots - 1);
    while (slots_[slot].key_length != 0) slot = (slot + 1) & (kSlots - 1);
    slots_[slot] = {hash, static_cast<uint32_t>(keys_.size()), static_cast<uint32_t>(ids_.size()), static_cast<uint16_t>(piece.size()),
                    static_cast<uint16_t>(count)};
    keys_.append(piece);
    ids_.insert(ids_.end(), ids, ids + count);
    ++used_;
  }

 private:
  static constexpr size_t kSlots = size_t{1} << 16;
  struct Slot {
    uint64_t hash = 0;
    uint32_t key_offset = 0, id_offset = 0;
    uint16_t key_length = 0, id_count = 0;  // key_length 0: empty slot
  };

  void clear() {
    std::fill(slots_.begin(), slots_.end(), Slot{});
    keys_.clear();
    ids_.clear();
    used_ = 0;
  }

  std::vector<Slot> slots_;
  std::string keys_;
  std::vector<int32_t> ids_;
  size_t used_ = 0;
};

// ---------------------------------------------------------------------------------------
// Tokenizer

enum class Normalizer { None, Nfc };

class Tokenizer {
 public:
  // Loads tokenizer.json. bos/eos ids come from tokenizer_config.json (its bos_token and
  // eos_token) when config_path names one, or when one lies beside path and config_path is
  // empty; otherwise from a TemplateProcessing post-processor.
  static Tokenizer from_file(const std::string& path, const std::string& config_path = "") {
    std::string config;
    if (!config_path.empty()) {
      config = detail::tok::read_file(config_path);
    } else {
      const size_t slash = path.find_last_of('/');
      const std::string sibling = (slash == std::string::npos ? std::string() : path.substr(0, slash + 1)) + "tokenizer_config.json";
      if (std::ifstream(sibling).good()) config = detail::tok::read_file(sibling);
    }
    return from_json(detail::tok::read_file(path), config);
  }

  static Tokenizer from_json(std::string_view tokenizer_json, std::string_view config_json = {}) {
    using namespace detail::tok;
    Tokenizer t;
    TokenizerJson file = read_tokenizer_json(tokenizer_json);
    const json& root = file.root;
    R1_CHECK(root.is_object(), "[tokenizer] /: expected an object, found ", show(root));
    // HF would cut or pad every encoding to these lengths; r1 returns whole encodings.
    for (const char* key : {"truncation", "padding"}) {
      const json* j = optional_member(root, key);
      R1_CHECK(j == nullptr, "[tokenizer] /", key, ": expected null, found ", show(*j), " (r1 does not truncate or pad)");
    }
    t.load_model(member(root, "", "model"), file);
    t.load_normalizer(root);
    const json* pre = optional_member(root, "pre_tokenizer");
    R1_CHECK(pre != nullptr, "[tokenizer] /pre_tokenizer: missing; r1 implements byte-level BPE, which needs a ByteLevel pre-tokenizer");
    t.pre_tokenizer_ = PreTokenizer::from_json(*pre, "/pre_tokenizer");
    t.load_added_tokens(root);
    t.load_post_processor(root);
    t.load_decoder(root);
    t.build_id_tables();
    if (!config_json.empty()) t.load_config(parse_json(config_json, "tokenizer_config.json"));
    return t;
  }

  Tokenizer(Tokenizer&&) noexcept = default;
  Tokenizer& operator=(Tokenizer&&) noexcept = default;

  // Text (UTF-8) -> ids. add_special_tokens runs the post-processor's template (BOS...);
  // special tokens written in the text are always recognized.
  std::vector<int32_t> encode(std::string_view text, bool add_special_tokens = false) const {
    const size_t bad = detail::tok::invalid_utf8_offset(text);
    R1_CHECK(bad == std::string_view::npos, "[tokenizer.encode] invalid UTF-8 at byte ", bad, " (0x",
             fmt::format("{:02X}", static_cast<uint8_t>(text[bad])), ")");
    std::vector<int32_t> ids;
    ids.reserve(text.size() / 3 + 4);
    StateLease state(*this);
    encode_into(text, ids, *state);
    if (add_special_tokens) apply_templates(ids);
    return ids;
  }

  // Encodes each text on r1's thread pool (r1::set_num_threads); results are identical to
  // calling encode on each. Each thread takes a run of consecutive texts of about equal
  // total length (parallel_for would split them by count, and texts differ in length).
  std::vector<std::vector<int32_t>> encode_batch(std::span<const std::string> texts, bool add_special_tokens = false) const {
    std::vector<std::vector<int32_t>> out(texts.size());
    const size_t parts = std::min<size_t>(static_cast<size_t>(num_threads()), texts.size());
    size_t total = 0;
    for (const std::string& t : texts) total += t.size();
    std::vector<size_t> first(parts + 1, texts.size());  // part p encodes texts [first[p], first[p + 1])
    first[0] = 0;
    size_t seen = 0;  // bytes before text i
    for (size_t i = 0, p = 1; i < texts.size(); ++i) {
      while (p < parts && seen * parts >= total * p) first[p++] = i;
      seen += texts[i].size();
    }
    parallel_for(static_cast<int64_t>(parts), [&](int64_t begin, int64_t end) {
      for (size_t i = first[begin]; i < first[end]; ++i) out[i] = encode(texts[i], add_special_tokens);
    });
    return out;
  }

  // Ids -> text: each token's bytes (ByteLevel decoder), joined, invalid UTF-8 replaced by
  // U+FFFD. skip_special_tokens drops the added tokens marked special.
  std::string decode(std::span<const int32_t> ids, bool skip_special_tokens = false) const {
    std::string bytes;
    for (size_t i = 0; i < ids.size(); ++i) append_token_bytes(bytes, ids[i], i, skip_special_tokens);
    std::string text;
    text.reserve(bytes.size());
    detail::tok::append_lossy(text, bytes);
    return text;
  }

  // The bytes one token decodes to (possibly an incomplete UTF-8 sequence).
  std::string_view token_bytes(int32_t id) const {
    check_id(id, "[tokenizer.token_bytes]");
    return std::string_view(id_bytes_).substr(id_bytes_offset_[id], id_bytes_offset_[id + 1] - id_bytes_offset_[id]);
  }

  std::optional<int32_t> token_to_id(std::string_view token) const {
    const auto it = added_by_content_.find(std::string(token));
    if (it != added_by_content_.end()) return added_[it->second].id;
    return model_.id_of(token);
  }

  // The token as tokenizer.json writes it (byte-level characters for vocab tokens).
  std::string_view id_to_token(int32_t id) const {
    check_id(id, "[tokenizer.id_to_token]");
    return added_index_[id] >= 0 ? std::string_view(added_[added_index_[id]].content) : model_.token(id);
  }

  // One past the largest id, added tokens included: the embedding table's row count.
  int32_t vocab_size() const { return static_cast<int32_t>(added_index_.size()); }
  bool is_special(int32_t id) const { return id >= 0 && id < vocab_size() && added_index_[id] >= 0 && added_[added_index_[id]].special; }
  std::optional<int32_t> bos_id() const { return bos_id_; }
  std::optional<int32_t> eos_id() const { return eos_id_; }

  const BpeModel& model() const { return model_; }
  const PreTokenizer& pre_tokenizer() const { return pre_tokenizer_; }
  Normalizer normalizer() const { return normalizer_; }
  const std::vector<AddedToken>& added_tokens() const { return added_; }

 private:
  // One post-processor template: special ids around the sequence ($A).
  struct Template {
    std::vector<int32_t> before, after;
  };

  // Buffers of one encoding thread: taken from the tokenizer's pool for one encode call.
  struct EncodeState {
    WordCache cache;
    BpeScratch bpe;
    detail::tok::NfcScratch nfc;
    std::string normalized, prefix;
  };
  struct StatePool {
    std::mutex mutex;
    std::vector<std::unique_ptr<EncodeState>> free;
  };
  class StateLease {
   public:
    explicit StateLease(const Tokenizer& t) : pool_(*t.pool_) {
      std::lock_guard<std::mutex> lock(pool_.mutex);
      if (!pool_.free.empty()) {
        state_ = std::move(pool_.free.back());
        pool_.free.pop_back();
      }
      if (!state_) state_ = std::make_unique<EncodeState>();
    }
    ~StateLease() {
      std::lock_guard<std::mutex> lock(pool_.mutex);
      pool_.free.push_back(std::move(state_));
    }
    StateLease(const StateLease&) = delete;
    StateLease& operator=(const StateLease&) = delete;
    EncodeState& operator*() const { return *state_; }

   private:
    StatePool& pool_;
    std::unique_ptr<EncodeState> state_;
  };

  Tokenizer() : pool_(std::make_unique<StatePool>()) {}

  void check_id(int32_t id, const char* op) const {
    R1_CHECK(id >= 0 && id < vocab_size(), op, " id ", id, " is out of range [0, ", vocab_size(), ")");
    R1_CHECK(added_index_[id] >= 0 || model_.has(id), op, " id ", id, " has no token");
  }

  void append_token_bytes(std::string& out, int32_t id, size_t position, bool skip_special) const {
    R1_CHECK(id >= 0 && id < vocab_size(), "[tokenizer.decode] id ", id, " at position ", position, " is out of range [0, ",
             vocab_size(), ")");
    R1_CHECK(added_index_[id] >= 0 || model_.has(id), "[tokenizer.decode] id ", id, " at position ", position, " has no token");
    if (skip_special && is_special(id)) return;
    out.append(id_bytes_, id_bytes_offset_[id], id_bytes_offset_[id + 1] - id_bytes_offset_[id]);
  }

  // Splits s around the added tokens of trie, as HF's AddedVocabulary::find_matches: appends
  // each match's id to ids and calls on_text(piece) for the text between matches.
  template <class OnText>
  void split_added(std::string_view s, const detail::tok::TokenTrie& trie, std::vector<int32_t>& ids, OnText&& on_text) const {
    using namespace detail::tok;
    if (trie.empty()) {
      if (!s.empty()) on_text(s);
      return;
    }
    size_t emitted = 0, from = 0;
    while (const std::optional<TokenTrie::Match> m = trie.find(s, from)) {
      from = m->end;
      const AddedToken& token = added_[m->token];
      size_t start = m->start, stop = m->end;
      if (token.single_word) {
        const bool space_before = start == 0 || !is_regex_word(last_code_point(s.substr(0, start)));
        const bool space_after = stop == s.size() || !is_regex_word(code_point_at(s, stop).cp);
        if (!space_before || !space_after) continue;
      }
      if (token.lstrip) {
        size_t left = start;
        while (left > 0 && is_regex_space(last_code_point(s.substr(0, left)))) {
          --left;
          while ((static_cast<uint8_t>(s[left]) & 0xC0) == 0x80) --left;
        }
        start = std::max(left, emitted);  // never take back text an earlier match consumed
      }
      if (token.rstrip) {
        while (stop < s.size() && is_regex_space(code_point_at(s, stop).cp)) stop += code_point_at(s, stop).length;
      }
      if (emitted < start) on_text(s.substr(emitted, start - emitted));
      ids.push_back(token.id);
      emitted = stop;
    }
    if (emitted < s.size()) on_text(s.substr(emitted));
  }

  void encode_into(std::string_view text, std::vector<int32_t>& ids, EncodeState& state) const {
    split_added(text, raw_trie_, ids, [&](std::string_view raw) {
      std::string_view normalized = raw;
      if (normalizer_ == Normalizer::Nfc && !detail::tok::nfc_stable(raw)) {
        detail::tok::nfc(raw, state.normalized, state.nfc);
        normalized = state.normalized;
      }
      split_added(normalized, normalized_trie_, ids, [&](std::string_view segment) {
        pre_tokenizer_.for_each_piece(segment, state.prefix, [&](std::string_view piece) { encode_piece(piece, ids, state); });
      });
    });
  }

  void encode_piece(std::string_view piece, std::vector<int32_t>& ids, EncodeState& state) const {
    if (piece.size() == 1 && model_.byte_id(static_cast<uint8_t>(piece[0])) >= 0) {
      ids.push_back(model_.byte_id(static_cast<uint8_t>(piece[0])));
      return;
    }
    if (piece.size() > WordCache::kMaxPieceBytes) {
      model_.encode_word(piece, ids, state.bpe);
      return;
    }
    const uint64_t hash = detail::tok::hash_bytes(piece);
    size_t count = 0;
    if (const int32_t* hit = state.cache.find(piece, hash, count)) {
      ids.insert(ids.end(), hit, hit + count);
      return;
    }
    const size_t start = ids.size();
    model_.encode_word(piece, ids, state.bpe);
    state.cache.insert(piece, hash, ids.data() + start, ids.size() - start);
  }

  void apply_templates(std::vector<int32_t>& ids) const {
    for (const Template& t : templates_) {
      ids.insert(ids.begin(), t.before.begin(), t.before.end());
      ids.insert(ids.end(), t.after.begin(), t.after.end());
    }
  }

  // ---- loading ----

  void load_model(const nlohmann::json& model, detail::tok::TokenizerJson& file) {
    using namespace detail::tok;
    const std::string path = "/model";
    const std::string& type = type_of(model, path);
    R1_CHECK(type == "BPE", "[tokenizer] /model/type: expected \"BPE\", found \"", type, "\"");
    if (const json* dropout = optional_member(model, "dropout"))
      R1_CHECK(dropout->is_number() && dropout->get<double>() == 0.0, "[tokenizer] /model/dropout: expected null or 0, found ",
               show(*dropout), " (dropout is random; r1 encodes deterministically)");
    for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
      if (const json* affix = optional_member(model, key))
        R1_CHECK(as_string(*affix, path + "/" + key).empty(), "[tokenizer] /model/", key, ": expected null or \"\", found ",
                 show(*affix), " (byte-level BPE uses none)");
    }
    // read_tokenizer_json takes an object vocab and an array of merges out of the JSON; what
    // is left here is missing or of the wrong type.
    R1_CHECK(file.vocab.has_value(), "[tokenizer] /model/vocab: expected an object, found ", show(member(model, path, "vocab")));
    R1_CHECK(file.merges.has_value(), "[tokenizer] /model/merges: expected an array, found ", show(member(model, path, "merges")));
    model_ = BpeModel(*file.vocab, *file.merges, optional_bool(model, path, "ignore_merges", false));
    file.vocab.reset();
    file.merges.reset();
    // unk_token and byte_fallback only act on bytes without a token; byte-level vocabs have
    // all 256, and r1 does not implement either for vocabs that do not.
    bool all_bytes = true;
    for (int b = 0; b < 256; ++b) all_bytes = all_bytes && model_.byte_id(static_cast<uint8_t>(b)) >= 0;
    if (const json* unk = optional_member(model, "unk_token"))
      R1_CHECK(all_bytes, "[tokenizer] /model/unk_token: ", show(*unk), " with a vocab that lacks some of the 256 byte tokens is not supported");
    R1_CHECK(all_bytes || !optional_bool(model, path, "byte_fallback", false),
             "[tokenizer] /model/byte_fallback: true with a vocab that lacks some of the 256 byte tokens is not supported");
  }

  // normalizer: null, NFC, or a Sequence of those (NFC applied twice is NFC once).
  void load_normalizer(const nlohmann::json& root) {
    const nlohmann::json* n = detail::tok::optional_member(root, "normalizer");
    normalizer_ = n ? normalizer_from(*n, "/normalizer") : Normalizer::None;
  }

  static Normalizer normalizer_from(const nlohmann::json& j, const std::string& path) {
    using namespace detail::tok;
    const std::string& type = type_of(j, path);
    if (type == "NFC") return Normalizer::Nfc;
    R1_CHECK(type == "Sequence", "[tokenizer] ", path, "/type: expected \"NFC\" or \"Sequence\", found \"", type, "\"");
    const json& list = member(j, path, "normalizers");
    R1_CHECK(list.is_array(), "[tokenizer] ", path, "/normalizers: expected an array, found ", show(list));
    Normalizer result = Normalizer::None;
    for (size_t i = 0; i < list.size(); ++i)
      if (normalizer_from(list[i], path + "/normalizers/" + std::to_string(i)) == Normalizer::Nfc) result = Normalizer::Nfc;
    return result;
  }

  void load_added_tokens(const nlohmann::json& root) {
    using namespace detail::tok;
    const json* list = optional_member(root, "added_tokens");
    if (!list) return;
    R1_CHECK(list->is_array(), "[tokenizer] /added_tokens: expected an array, found ", show(*list));
    NfcScratch scratch;
    // HF ignores the ids written in the file (it only warns when they differ): a token
    // already in the model's vocab takes its id there; any other takes the next id after
    // the model's vocab and the added ids so far.
    const int32_t model_entries = model_.entry_count();
    int32_t max_added = -1;
    for (size_t i = 0; i < list->size(); ++i) {
      const std::string path = "/added_tokens/" + std::to_string(i);
      const json& j = (*list)[i];
      AddedToken t;
      as_id(member(j, path, "id"), path + "/id");
      t.content = as_string(member(j, path, "content"), path + "/content");
      R1_CHECK(!t.content.empty(), "[tokenizer] ", path, "/content: empty");
      t.special = optional_bool(j, path, "special", false);
      t.normalized = optional_bool(j, path, "normalized", !t.special);
      t.lstrip = optional_bool(j, path, "lstrip", false);
      t.rstrip = optional_bool(j, path, "rstrip", false);
      t.single_word = optional_bool(j, path, "single_word", false);
      const int32_t index = static_cast<int32_t>(added_.size());
      R1_CHECK(added_by_content_.emplace(t.content, index).second, "[tokenizer] ", path, "/content: \"", t.content,
               "\" is added twice (not supported)");
      if (const std::optional<int32_t> in_vocab = model_.id_of(t.content)) {
        t.id = *in_vocab;
      } else {
        t.id = max_added < 0 ? model_entries : max_added >= model_entries || model_entries == 0 ? max_added + 1 : model_entries;
      }
      max_added = std::max(max_added, t.id);
      if (t.normalized && normalizer_ == Normalizer::Nfc) {
        // HF matches normalized tokens by their normalized content.
        std::string content;
        nfc(t.content, content, scratch);
        normalized_trie_.add(content, index);
      } else if (t.normalized) {
        normalized_trie_.add(t.content, index);
      } else {
        raw_trie_.add(t.content, index);
      }
      added_.push_back(std::move(t));
    }
  }

  // post_processor: null, ByteLevel (offsets only: no ids), TemplateProcessing, or a
  // Sequence of those.
  void load_post_processor(const nlohmann::json& root) {
    if (const nlohmann::json* p = detail::tok::optional_member(root, "post_processor")) add_post_processor(*p, "/post_processor");
  }

  void add_post_processor(const nlohmann::json& j, const std::string& path) {
    using namespace detail::tok;
    const std::string& type = type_of(j, path);
    if (type == "ByteLevel") return;
    if (type == "Sequence") {
      const json& list = member(j, path, "processors");
      R1_CHECK(list.is_array(), "[tokenizer] ", path, "/processors: expected an array, found ", show(list));
      for (size_t i = 0; i < list.size(); ++i) add_post_processor(list[i], path + "/processors/" + std::to_string(i));
      return;
    }
    R1_CHECK(type == "TemplateProcessing", "[tokenizer] ", path, "/type: expected \"ByteLevel\", \"TemplateProcessing\" or \"Sequence\", found \"",
             type, "\"");
    const json& single = member(j, path, "single");
    R1_CHECK(single.is_array(), "[tokenizer] ", path, "/single: expected an array, found ", show(single));
    const json& specials = member(j, path, "special_tokens");
    Template t;
    bool seen_sequence = false;
    for (size_t i = 0; i < single.size(); ++i) {
      const std::string item_path = path + "/single/" + std::to_string(i);
      const json& item = single[i];
      if (item.is_object() && item.contains("Sequence")) {
        R1_CHECK(!seen_sequence, "[tokenizer] ", item_path, ": a second Sequence in a single-sequence template");
        seen_sequence = true;
        continue;
      }
      R1_CHECK(item.is_object() && item.contains("SpecialToken"), "[tokenizer] ", item_path,
               ": expected {\"SpecialToken\": ...} or {\"Sequence\": ...}, found ", show(item));
      const std::string& name = as_string(member(item["SpecialToken"], item_path + "/SpecialToken", "id"), item_path + "/SpecialToken/id");
      const json& special = member(specials, path + "/special_tokens", name.c_str());
      const std::string special_path = path + "/special_tokens/" + name;
      const json& special_ids = member(special, special_path, "ids");
      R1_CHECK(special_ids.is_array(), "[tokenizer] ", special_path, "/ids: expected an array, found ", show(special_ids));
      std::vector<int32_t>& side = seen_sequence ? t.after : t.before;
      for (size_t k = 0; k < special_ids.size(); ++k) side.push_back(as_id(special_ids[k], special_path + "/ids/" + std::to_string(k)));
    }
    R1_CHECK(seen_sequence, "[tokenizer] ", path, "/single: no {\"Sequence\": ...} item");
    templates_.push_back(std::move(t));
  }

  // decoder: ByteLevel (r1 decodes byte-level BPE only).
  void load_decoder(const nlohmann::json& root) {
    using namespace detail::tok;
    const json* d = optional_member(root, "decoder");
    R1_CHECK(d != nullptr, "[tokenizer] /decoder: missing; r1 decodes byte-level BPE and needs the ByteLevel decoder");
    const std::string& type = type_of(*d, "/decoder");
    R1_CHECK(type == "ByteLevel", "[tokenizer] /decoder/type: expected \"ByteLevel\", found \"", type, "\"");
  }

  void load_config(const nlohmann::json& config) {
    // bos_token / eos_token: a string or {"content": ...}.
    const auto id_of = [&](const char* key) -> std::optional<int32_t> {
      const nlohmann::json* j = detail::tok::optional_member(config, key);
      if (!j) return std::nullopt;
      const nlohmann::json* content = j->is_object() ? detail::tok::optional_member(*j, "content") : j;
      R1_CHECK(content && content->is_string(), "[tokenizer] tokenizer_config.json /", key,
               ": expected a string or {\"content\": ...}, found ", detail::tok::show(*j));
      const std::optional<int32_t> id = token_to_id(content->get<std::string>());
      R1_CHECK(id.has_value(), "[tokenizer] tokenizer_config.json /", key, ": \"", content->get<std::string>(), "\" is not a token");
      return id;
    };
    bos_id_ = id_of("bos_token");
    eos_id_ = id_of("eos_token");
  }

  void build_id_tables() {
    int32_t size = model_.size();
    for (const AddedToken& t : added_) size = std::max(size, t.id + 1);
    added_index_.assign(static_cast<size_t>(size), -1);
    for (size_t i = 0; i < added_.size(); ++i) added_index_[added_[i].id] = static_cast<int32_t>(i);
    // The ByteLevel decoder turns a token into the bytes its characters stand for, or into
    // its own UTF-8 when a character is outside the alphabet (added tokens like "<｜User｜>").
    id_bytes_offset_.assign(static_cast<size_t>(size) + 1, 0);
    std::string bytes;
    for (int32_t id = 0; id < size; ++id) {
      id_bytes_offset_[id] = id_bytes_.size();
      if (added_index_[id] < 0 && !model_.has(id)) continue;
      const std::string_view token = added_index_[id] >= 0 ? std::string_view(added_[added_index_[id]].content) : model_.token(id);
      id_bytes_ += detail::tok::byte_level_decode(token, bytes) ? std::string_view(bytes) : token;
    }
    id_bytes_offset_[size] = id_bytes_.size();
    // Templates may name ids the vocab lacks.
    for (const Template& t : templates_)
      for (const std::vector<int32_t>* side : {&t.before, &t.after})
        for (const int32_t id : *side)
          R1_CHECK(id < size && (added_index_[id] >= 0 || model_.has(id)), "[tokenizer] /post_processor: special token id ", id,
                   " is not in the vocab");
    if (!templates_.empty() && !templates_.front().before.empty()) bos_id_ = templates_.front().before.front();
    if (!templates_.empty() && !templates_.front().after.empty()) eos_id_ = templates_.front().after.back();
  }

  BpeModel model_;
  PreTokenizer pre_tokenizer_;
  Normalizer normalizer_ = Normalizer::None;
  std::vector<AddedToken> added_;
  std::unordered_map<std::string, int32_t> added_by_content_;  // content -> index in added_
  detail::tok::TokenTrie raw_trie_, normalized_trie_;
  std::vector<Template> templates_;
  std::vector<int32_t> added_index_;  // id -> index in added_, or -1
  std::string id_bytes_;              // concatenated decoded bytes of every id
  std::vector<size_t> id_bytes_offset_;
  std::optional<int32_t> bos_id_, eos_id_;
  std::unique_ptr<StatePool> pool_;
};

// ---------------------------------------------------------------------------------------
// Streaming decode for generation: step(id) returns the text that became complete, holding
// back a UTF-8 sequence split across tokens. The concatenation of every step and finish()
// equals tokenizer.decode(all ids).
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tokenizer, bool skip_special_tokens = false)
      : tokenizer_(&tokenizer), skip_special_(skip_special_tokens) {}

  std::string step(int32_t id) {
    const std::string_view bytes = tokenizer_->token_bytes(id);  // checks id
    if (!(skip_special_ && tokenizer_->is_special(id))) pending_ += bytes;
    const size_t keep = detail::tok::incomplete_utf8_tail(pending_);
    std::string text;
    detail::tok::append_lossy(text, std::string_view(pending_).substr(0, pending_.size() - keep));
    pending_.erase(0, pending_.size() - keep);
    return text;
  }

  // The held-back bytes, which no further token will complete, as U+FFFD.
  std::string finish() {
    std::string text;
    detail::tok::append_lossy(text, pending_);
    pending_.clear();
    return text;
  }

 private:
  const Tokenizer* tokenizer_;
  bool skip_special_;
  std::string pending_;
};

// ---------------------------------------------------------------------------------------
// DeepSeek-R1's chat template (tokenizer_config.json's Jinja), written out:
//   <｜begin▁of▁sentence｜>{system prompts joined by "\n\n"}
//   then per message   user: <｜User｜>{content}
//                      assistant: <｜Assistant｜>{content after its last </think>}<｜end▁of▁sentence｜>
//   then, when add_generation_prompt: <｜Assistant｜> and, with think, "<think>\n" (R1's
//   updated template forces the model to open its reasoning).
// Tool messages are not supported.
struct ChatMessage {
  std::string role;  // "system", "user" or "assistant"
  std::string content;
};

namespace r1_chat {
inline constexpr std::string_view kBos = "<\uFF5Cbegin\u2581of\u2581sentence\uFF5C>";  // <｜begin▁of▁sentence｜>
inline constexpr std::string_view kEos = "<\uFF5Cend\u2581of\u2581sentence\uFF5C>";      // <｜end▁of▁sentence｜>
inline constexpr std::string_view kUser = "<\uFF5CUser\uFF5C>";                           // <｜User｜>
inline constexpr std::string_view kAssistant = "<\uFF5CAssistant\uFF5C>";                 // <｜Assistant｜>
}  // namespace r1_chat

inline std::string r1_chat_prompt(std::span<const ChatMessage> messages, bool add_generation_prompt = true, bool think = true) {
  std::string out(r1_chat::kBos);
  bool first_system = true;
  for (const ChatMessage& m : messages) {
    if (m.role != "system") continue;
    if (!first_system) out += "\n\n";
    out += m.content;
    first_system = false;
  }
  for (size_t i = 0; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    if (m.role == "user") {
      out.append(r1_chat::kUser).append(m.content);
    } else if (m.role == "assistant") {
      const size_t end_think = m.content.rfind("</think>");
      const std::string_view answer =
          end_think == std::string::npos ? std::string_view(m.content) : std::string_view(m.content).substr(end_think + 8);
      out.append(r1_chat::kAssistant).append(answer).append(r1_chat::kEos);
    } else {
      R1_CHECK(m.role == "system", "[r1_chat_prompt] message ", i, " has role \"", m.role,
               "\"; expected \"system\", \"user\" or \"assistant\"");
    }
  }
  if (add_generation_prompt) {
    out.append(r1_chat::kAssistant);
    if (think) out += "<think>\n";
  }
  return out;
}

// The one-turn prompt: <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜>[<think>\n].
inline std::string r1_chat_prompt(std::string_view system, std::string_view user, bool think = true) {
  std::vector<ChatMessage> messages;
  if (!system.empty()) messages.push_back({"system", std::string(system)});
  messages.push_back({"user", std::string(user)});
  return r1_chat_prompt(messages, true, think);
}

}  // namespace r1
