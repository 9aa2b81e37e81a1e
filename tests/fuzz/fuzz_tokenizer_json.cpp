// libFuzzer target: Tokenizer::from_json on arbitrary bytes (scripts/fuzz.sh builds and runs
// it, seeded from tests/fuzz/corpus/json with tests/fuzz/tokenizer_json.dict).
//
// A malformed or unsupported tokenizer.json must throw r1::error, the only exception caught
// here: any other escapes and aborts, and libFuzzer reports it like a crash, a sanitizer
// report, a leak or an allocation past its memory limit. A file that loads must then encode
// a probe text, each added token's content among it, and decode the ids, without throwing:
// what from_json accepts, encode and decode must handle.
#include <r1/tokenizer.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::optional<r1::Tokenizer> tokenizer;
  try {
    tokenizer.emplace(r1::Tokenizer::from_json(std::string_view(reinterpret_cast<const char*>(data), size)));
  } catch (const r1::error&) {
    return 0;
  }
  std::string probe = "Hello, world! It's 2024: 12345 apples\r\n\n  \t x 漢字かなカナ \u00e9 e\u0301 🧑‍🚀 ab";
  for (const r1::AddedToken& t : tokenizer->added_tokens()) probe += t.content + " a" + t.content;
  for (const bool add_special : {false, true}) {
    const std::vector<int32_t> ids = tokenizer->encode(probe, add_special);
    tokenizer->decode(ids);
    tokenizer->decode(ids, true);
  }
  return 0;
}
