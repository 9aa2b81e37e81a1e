// tokenize: text <-> token ids with a HF tokenizer.json (r1/tokenizer.hpp).
//
//   tokenize --tokenizer FILE [--add-special]       stdin (UTF-8, all of it, untrimmed) ->
//                                                   ids on one line, separated by spaces
//   tokenize --tokenizer FILE --decode [--skip-special]
//                                                   ids (whitespace-separated) on stdin ->
//                                                   the decoded text, byte for byte, no newline
//
// --add-special runs the tokenizer's post-processor template (BOS where it asks for one);
// special tokens written in the text are recognized either way. --skip-special leaves the
// special tokens out of the decoded text. The files the tests use come from
// scripts/fetch-tokenizers.sh, e.g.
//   printf 'Hello, world!' | build/examples/tokenize --tokenizer ~/.cache/r1/tokenizers/deepseek_v3/tokenizer.json
//   19923 14 2058 3   (and piped into --decode: Hello, world!)
#include <r1/tokenizer.hpp>

#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <iterator>
#include <string>
#include <string_view>
#include <vector>

namespace {

[[noreturn]] void usage() {
  std::fprintf(stderr, "usage: tokenize --tokenizer FILE [--add-special] [--decode [--skip-special]]\n");
  std::exit(2);
}

// Whitespace-separated decimal ids; anything else is an error naming it.
std::vector<int32_t> parse_ids(const std::string& text) {
  std::vector<int32_t> ids;
  size_t i = 0;
  while (i < text.size()) {
    if (std::isspace(static_cast<unsigned char>(text[i]))) {
      ++i;
      continue;
    }
    size_t end = i;
    while (end < text.size() && !std::isspace(static_cast<unsigned char>(text[end]))) ++end;
    const std::string word = text.substr(i, end - i);
    char* stop = nullptr;
    const long long id = std::strtoll(word.c_str(), &stop, 10);
    R1_CHECK(*stop == '\0' && id >= 0 && id <= INT32_MAX, "[tokenize] expected a token id, found \"", word, "\" at byte ", i);
    ids.push_back(static_cast<int32_t>(id));
    i = end;
  }
  return ids;
}

}  // namespace

int main(int argc, char** argv) {
  std::string path;
  bool add_special = false, decode = false, skip_special = false;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--tokenizer" && i + 1 < argc) {
      path = argv[++i];
    } else if (arg == "--add-special") {
      add_special = true;
    } else if (arg == "--decode") {
      decode = true;
    } else if (arg == "--skip-special") {
      skip_special = true;
    } else {
      usage();
    }
  }
  if (path.empty() || (decode && add_special) || (skip_special && !decode)) usage();

  std::ios::sync_with_stdio(false);
  const std::string input((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
  try {
    const r1::Tokenizer tokenizer = r1::Tokenizer::from_file(path);
    if (decode) {
      const std::string text = tokenizer.decode(parse_ids(input), skip_special);
      std::fwrite(text.data(), 1, text.size(), stdout);
      return 0;
    }
    std::string line;
    for (const int32_t id : tokenizer.encode(input, add_special)) {
      if (!line.empty()) line += ' ';
      line += std::to_string(id);
    }
    line += '\n';
    std::fwrite(line.data(), 1, line.size(), stdout);
  } catch (const r1::error& e) {
    std::fprintf(stderr, "tokenize: %s\n", e.what());
    return 1;
  }
  return 0;
}
