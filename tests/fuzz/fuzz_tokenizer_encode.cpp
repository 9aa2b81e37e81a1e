// libFuzzer target: Tokenizer::encode -> decode round trip, and StreamDecoder against decode
// (scripts/fuzz.sh builds and runs it).
//
// Each input goes through every tokenizer below, and any mismatch aborts with a message
// (libFuzzer then saves the input), as does a crash, a sanitizer report or an exception other
// than an expected r1::error:
//   - encode throws r1::error exactly when the input is not valid UTF-8 (judged by a validator
//     written here, apart from r1's);
//   - decode(encode(text)) == text, byte for byte: byte-level BPE is lossless when the
//     normalizer leaves the text alone and no added token strips spaces or adds a prefix
//     space, which holds for all of these (Qwen3's NFC: checked on text already in NFC);
//   - encode(text, true) holds encode(text) inside the template's special tokens, so both
//     decode alike with skip_special_tokens;
//   - StreamDecoder's steps are each valid UTF-8 and, with finish(), add up to decode, with
//     and without skip_special_tokens;
//   - the input read as token ids (3 bytes each, arbitrary, often splitting a UTF-8
//     sequence, now and then past the vocab): decode and StreamDecoder give the same text, or
//     both throw r1::error.
// At start-up, every special token encodes to its own id alone and decodes to its content.
//
// Tokenizers: the BpeTrainer-built files committed in tests/fixtures/bpe_trainer (DeepSeek-V3's
// and GPT-2's pre-tokenizers, special tokens in the text, a BOS template), and the real
// DeepSeek-V3, Llama-3 (ignore_merges) and Qwen3 (NFC) files from
// scripts/fetch-tokenizers.sh when they are in ${R1_CACHE:-$HOME/.cache/r1}.
#include <r1/tokenizer.hpp>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace {

struct Subject {
  std::string name;
  r1::Tokenizer tokenizer;
  bool nfc;  // the round trip gives the NFC of the text
};

std::vector<Subject>& subjects() {
  static std::vector<Subject> list;
  return list;
}

[[noreturn]] void mismatch(const Subject& s, const char* what) {
  std::fprintf(stderr, "fuzz_tokenizer_encode: %s: %s\n", s.name.c_str(), what);
  std::abort();
}

void check(bool ok, const Subject& s, const char* what) {
  if (!ok) mismatch(s, what);
}

// Well-formed UTF-8 (Unicode 3.9): each sequence decodes to a scalar value that needs its
// length (no overlongs), is not a surrogate and is at most U+10FFFF.
bool valid_utf8(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    const unsigned char lead = static_cast<unsigned char>(s[i]);
    size_t length;
    char32_t cp, min;
    if (lead < 0x80) {
      ++i;
      continue;
    } else if ((lead & 0xE0) == 0xC0) {
      length = 2, cp = lead & 0x1F, min = 0x80;
    } else if ((lead & 0xF0) == 0xE0) {
      length = 3, cp = lead & 0x0F, min = 0x800;
    } else if ((lead & 0xF8) == 0xF0) {
      length = 4, cp = lead & 0x07, min = 0x10000;
    } else {
      return false;
    }
    if (s.size() - i < length) return false;
    for (size_t k = 1; k < length; ++k) {
      const unsigned char c = static_cast<unsigned char>(s[i + k]);
      if ((c & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (c & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += length;
  }
  return true;
}

// The text StreamDecoder yields for ids, each step checked to be whole UTF-8.
std::string streamed(const Subject& s, std::span<const int32_t> ids, bool skip_special) {
  r1::StreamDecoder stream(s.tokenizer, skip_special);
  std::string text;
  for (const int32_t id : ids) {
    const std::string step = stream.step(id);
    check(valid_utf8(step), s, "a StreamDecoder step is not valid UTF-8");
    text += step;
  }
  return text + stream.finish();
}

std::optional<std::string> decode_or_error(const Subject& s, std::span<const int32_t> ids, bool skip_special) {
  try {
    return s.tokenizer.decode(ids, skip_special);
  } catch (const r1::error&) {
    return std::nullopt;
  }
}

std::optional<std::string> stream_or_error(const Subject& s, std::span<const int32_t> ids, bool skip_special) {
  try {
    return streamed(s, ids, skip_special);
  } catch (const r1::error&) {
    return std::nullopt;
  }
}

void add_subject(const std::string& name, const std::string& path, bool nfc) {
  Subject s{name, r1::Tokenizer::from_file(path), nfc};
  for (const r1::AddedToken& t : s.tokenizer.added_tokens()) {
    if (!t.special) continue;
    check(s.tokenizer.encode(t.content) == std::vector<int32_t>{t.id}, s, "a special token does not encode to its id");
    check(s.tokenizer.decode(std::vector<int32_t>{t.id}) == t.content, s, "a special token does not decode to its content");
  }
  std::fprintf(stderr, "fuzz_tokenizer_encode: %s (%s, %d ids)\n", name.c_str(), path.c_str(), s.tokenizer.vocab_size());
  subjects().push_back(std::move(s));
}

void fuzz_text(const Subject& s, std::string_view text) {
  const r1::Tokenizer& t = s.tokenizer;
  std::vector<int32_t> ids;
  try {
    ids = t.encode(text);
  } catch (const r1::error&) {
    check(!valid_utf8(text), s, "encode rejected valid UTF-8");
    return;
  }
  check(valid_utf8(text), s, "encode accepted invalid UTF-8");

  const std::string decoded = t.decode(ids);
  if (!s.nfc) {
    check(decoded == text, s, "decode(encode(text)) != text");
  } else {
    std::string normalized;
    r1::detail::tok::NfcScratch scratch;
    r1::detail::tok::nfc(text, normalized, scratch);
    check(normalized != text || decoded == text, s, "decode(encode(text)) != text for text in NFC");
  }
  check(streamed(s, ids, false) == decoded, s, "StreamDecoder != decode");
  const std::string without_special = t.decode(ids, true);
  check(streamed(s, ids, true) == without_special, s, "StreamDecoder != decode, skipping special tokens");

  const std::vector<int32_t> templated = t.encode(text, true);
  check(ids.empty() || std::search(templated.begin(), templated.end(), ids.begin(), ids.end()) != templated.end(), s,
        "encode(text, true) does not contain encode(text)");
  check(t.decode(templated, true) == without_special, s, "the template added more than special tokens");
}

void fuzz_ids(const Subject& s, std::string_view bytes) {
  std::vector<int32_t> ids;
  const uint32_t range = static_cast<uint32_t>(s.tokenizer.vocab_size()) + 1;  // one past: out of range
  for (size_t i = 0; i + 3 <= bytes.size(); i += 3) {
    const auto byte = [&](size_t k) { return uint32_t(static_cast<unsigned char>(bytes[i + k])); };
    ids.push_back(static_cast<int32_t>((byte(0) | byte(1) << 8 | byte(2) << 16) % range));
  }
  for (const bool skip_special : {false, true})
    check(decode_or_error(s, ids, skip_special) == stream_or_error(s, ids, skip_special), s,
          "decode and StreamDecoder disagree on arbitrary ids");
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  add_subject("trained deepseek_v3", R1_FIXTURE_DIR "/bpe_trainer/deepseek_v3.json", false);
  add_subject("trained gpt2", R1_FIXTURE_DIR "/bpe_trainer/gpt2.json", false);
  const char* cache = std::getenv("R1_CACHE");
  const char* home = std::getenv("HOME");
  const std::string root = cache && *cache ? cache : std::string(home ? home : ".") + "/.cache/r1";
  for (const auto& [name, nfc] : {std::pair{"deepseek_v3", false}, {"llama3", false}, {"qwen3", true}}) {
    const std::string path = root + "/tokenizers/" + name + "/tokenizer.json";
    if (std::filesystem::exists(path)) {
      add_subject(name, path, nfc);
    } else {
      std::fprintf(stderr, "fuzz_tokenizer_encode: %s missing (scripts/fetch-tokenizers.sh fetches it)\n", path.c_str());
    }
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  for (const Subject& s : subjects()) {
    fuzz_text(s, bytes);
    fuzz_ids(s, bytes);
  }
  return 0;
}
