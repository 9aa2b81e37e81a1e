// r1/rewards.hpp: rule-based rewards for R1-style reinforcement learning, and the plain
// callables users add their own as.
//
//   Completion        what a reward function sees: the sample's index in the batch (to look
//                     up data of your own, such as Countdown's numbers), prompt, completion
//                     text, reference answer, length in tokens, truncation.
//   RewardFunction    std::function<double(const Completion&)>; NaN means "does not apply"
//                     (grpo.hpp's advantages skip it, as TRL does with None).
//   RewardSet         named functions with weights; evaluate() gives rewards [B, F] for
//                     r1::compute_advantages and weights() its weights.
//
// Accuracy (AccuracyReward): 1 when the extracted answer matches the reference, else 0;
// NaN when the reference is blank. extract_answer(text):
//   1. the content of the last <answer>...</answer> pair, pairs matched left to right, each
//      <answer> with the first </answer> after it (Python's re.finditer over
//      "<answer>(.*?)</answer>" with DOTALL); inside it, the last \boxed{...} if it has one;
//   2. else the content of the last \boxed{...} of the whole text: braces balanced, \{ and \}
//      escaped (not counted); a \boxed{ that never closes is skipped;
//   3. else nothing (reward 0). The answer is trimmed of ASCII whitespace.
// normalize_answer (both sides): trim, drop one enclosing $...$, trim, and a whole
// \boxed{x} becomes x. Numeric mode compares as numbers when both sides parse (parse_number:
// optional sign; digits with optional thousands commas "1,000,000"; optional fraction part
// ".5"; optional exponent "e-3"; or a fraction a/b or \frac{a}{b} (\dfrac, \tfrac) of such
// numbers, b != 0), equal when |x - y| <= relative_tolerance * max(|x|, |y|); otherwise the
// normalized strings must be equal. Exact mode only compares strings.
//
// Format (FormatReward), DeepSeek-R1's template, 1 or 0, no regex:
//   ws* "<think>" THINK "</think>" ws* "<answer>" ANSWER "</answer>" ws*   and nothing else;
//   THINK and ANSWER hold none of the four tags, ANSWER is not blank (THINK may be).
//   prompt_ends_in_think: the prompt ends with "<think>\n" (R1's template), so the
//   completion starts inside the think block and must not open it again.
//
// Countdown (countdown_reward), TinyZero's compute_score (verl's countdown.py):
//   the equation is the content of the last <answer>...</answer> on the completion's last
//   line (TinyZero splits off the text before "Assistant:" first; the completion here comes
//   without its prompt), stripped; none: 0.
//   The digit runs of the equation, as a multiset, must equal the given numbers, and the
//   equation may hold only digits, + - * / ( ) and whitespace; it is evaluated with
//   Python's arithmetic (true division, unary minus and plus) by a small recursive-descent
//   parser, never eval. Wrong numbers, bad characters or syntax, division by zero, or a
//   result off the target by 1e-5 or more: format_score (0.1). Otherwise: score (1.0).
//   TinyZero's character class also lets "." and "**" through to eval; here they are
//   invalid (format_score).
//
// Overlong (OverlongPunishment), DAPO's soft punishment with L_max = max_length and
// L_cache = cache_length, on the completion's length in tokens |y|:
//   0 if |y| <= L_max - L_cache;  (L_max - L_cache - |y|) / L_cache if |y| <= L_max;  -1 beyond.
//
// Legend: B completions, F reward functions.
#pragma once

#include "config.hpp"
#include "tensor.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace r1 {

struct Completion {
  int64_t index = 0;           // position in the batch
  std::string_view prompt{};
  std::string_view text{};     // the completion, decoded
  std::string_view answer{};   // the reference answer; may be empty
  int64_t tokens = 0;          // completion length in tokens
  bool truncated = false;      // hit the length limit without a stop token
};

using RewardFunction = std::function<double(const Completion&)>;

// ---------------------------------------------------------------------------------------
// Text helpers
inline bool is_ascii_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

inline std::string_view trim(std::string_view s) {
  while (!s.empty() && is_ascii_space(s.front())) s.remove_prefix(1);
  while (!s.empty() && is_ascii_space(s.back())) s.remove_suffix(1);
  return s;
}

// Content of the last <tag>...</tag> pair, pairs matched left to right (re.finditer over
// "<tag>(.*?)</tag>", DOTALL).
inline std::optional<std::string_view> last_tag_content(std::string_view text, std::string_view tag) {
  const std::string open = "<" + std::string(tag) + ">", close = "</" + std::string(tag) + ">";
  std::optional<std::string_view> last;
  for (std::size_t pos = text.find(open); pos != std::string_view::npos; pos = text.find(open, pos)) {
    const std::size_t begin = pos + open.size(), end = text.find(close, begin);
    if (end == std::string_view::npos) break;
    last = text.substr(begin, end - begin);
    pos = end + close.size();
  }
  return last;
}

namespace detail {

// Index just past the brace that closes the group opened at text[open] == '{', or npos.
inline std::size_t closing_brace(std::string_view text, std::size_t open) {
  int depth = 0;
  for (std::size_t i = open; i < text.size(); ++i) {
    if (text[i] == '\\' && i + 1 < text.size() && (text[i + 1] == '{' || text[i + 1] == '}')) {
      ++i;  // \{ and \} are literal braces
    } else if (text[i] == '{') {
      ++depth;
    } else if (text[i] == '}' && --depth == 0) {
      return i + 1;
    }
  }
  return std::string_view::npos;
}

}  // namespace detail

// Content of the last \boxed{...} whose braces close.
inline std::optional<std::string_view> last_boxed(std::string_view text) {
  constexpr std::string_view box = "\\boxed{";
  for (std::size_t pos = text.rfind(box); pos != std::string_view::npos; pos = text.rfind(box, pos - 1)) {
    const std::size_t open = pos + box.size() - 1, end = detail::closing_brace(text, open);
    if (end != std::string_view::npos) return text.substr(open + 1, end - open - 2);
    if (pos == 0) break;
  }
  return std::nullopt;
}

inline std::optional<std::string_view> extract_answer(std::string_view text) {
  if (const auto tagged = last_tag_content(text, "answer")) {
    if (const auto boxed = last_boxed(*tagged)) return trim(*boxed);
    return trim(*tagged);
  }
  if (const auto boxed = last_boxed(text)) return trim(*boxed);
  return std::nullopt;
}

inline std::string_view normalize_answer(std::string_view s) {
  s = trim(s);
  if (s.size() >= 2 && s.front() == '$' && s.back() == '$') s = trim(s.substr(1, s.size() - 2));
  if (s.starts_with("\\boxed{") && detail::closing_brace(s, 6) == s.size()) s = trim(s.substr(7, s.size() - 8));
  return s;
}

namespace detail {

// A decimal at the front of s: [+-] (digits with optional thousands commas [. digits] | . digits)
// [e[+-]digits]. Advances s past it. Signs only where allow_sign.
inline std::optional<double> take_decimal(std::string_view& s, bool allow_sign) {
  std::string clean;
  std::size_t i = 0;
  if (allow_sign && i < s.size() && (s[i] == '+' || s[i] == '-')) {
    if (s[i] == '-') clean += '-';
    ++i;
  }
  const auto digit = [&](std::size_t k) { return k < s.size() && s[k] >= '0' && s[k] <= '9'; };
  std::size_t run = 0;
  while (digit(i)) clean += s[i++], ++run;
  // Thousands separators: the first group has 1-3 digits, every later one exactly 3.
  if (run >= 1 && run <= 3 && i < s.size() && s[i] == ',') {
    while (i < s.size() && s[i] == ',' && digit(i + 1) && digit(i + 2) && digit(i + 3) && !digit(i + 4)) {
      clean.append(s.substr(i + 1, 3));
      i += 4;
      run += 3;
    }
  }
  std::size_t fraction = 0;
  if (i < s.size() && s[i] == '.') {
    clean += s[i++];
    while (digit(i)) clean += s[i++], ++fraction;
  }
  if (run == 0 && fraction == 0) return std::nullopt;
  if (i < s.size() && (s[i] == 'e' || s[i] == 'E')) {
    std::size_t k = i + 1;
    std::string exponent = "e";
    if (k < s.size() && (s[k] == '+' || s[k] == '-')) exponent += s[k++];
    if (digit(k)) {
      while (digit(k)) exponent += s[k++];
      clean += exponent;
      i = k;
    }
  }
  double value = 0.0;
  const auto [end, ec] = std::from_chars(clean.data(), clean.data() + clean.size(), value);
  if (ec != std::errc() || end != clean.data() + clean.size()) return std::nullopt;
  s.remove_prefix(i);
  return value;
}

}  // namespace detail

// The number a normalized answer states, if it is one: see the header comment.
inline std::optional<double> parse_number(std::string_view s) {
  s = trim(s);
  for (const std::string_view frac : {"\\frac{", "\\dfrac{", "\\tfrac{"}) {
    std::string_view rest = s;
    double sign = 1.0;
    if (!rest.empty() && (rest.front() == '-' || rest.front() == '+')) {
      sign = rest.front() == '-' ? -1.0 : 1.0;
      rest = trim(rest.substr(1));
    }
    if (!rest.starts_with(frac)) continue;
    rest.remove_prefix(frac.size());
    const auto num = detail::take_decimal(rest, true);
    if (!num || !rest.starts_with("}{")) return std::nullopt;
    rest.remove_prefix(2);
    const auto den = detail::take_decimal(rest, true);
    if (!den || rest != "}" || *den == 0.0) return std::nullopt;
    return sign * *num / *den;
  }
  std::string_view rest = s;
  const auto value = detail::take_decimal(rest, true);
  if (!value) return std::nullopt;
  rest = trim(rest);
  if (rest.empty()) return value;
  if (rest.front() != '/') return std::nullopt;
  rest = trim(rest.substr(1));
  const auto den = detail::take_decimal(rest, false);
  if (!den || !rest.empty() || *den == 0.0) return std::nullopt;
  return *value / *den;
}

// ---------------------------------------------------------------------------------------
// Accuracy
struct AccuracyReward {
  bool numeric = true;               // false: exact string comparison only
  double relative_tolerance = 1e-6;

  bool matches(std::string_view got, std::string_view want) const {
    got = normalize_answer(got);
    want = normalize_answer(want);
    if (numeric) {
      const auto x = parse_number(got), y = parse_number(want);
      if (x && y) return *x == *y || std::abs(*x - *y) <= relative_tolerance * std::max(std::abs(*x), std::abs(*y));
    }
    return got == want;
  }

  double operator()(const Completion& c) const {
    R1_CHECK(relative_tolerance >= 0.0, "[accuracy_reward] relative_tolerance is ", relative_tolerance, ", expected >= 0");
    if (normalize_answer(c.answer).empty()) return std::numeric_limits<double>::quiet_NaN();
    const auto got = extract_answer(c.text);
    return got && matches(*got, c.answer) ? 1.0 : 0.0;
  }
};

// ---------------------------------------------------------------------------------------
// Format
struct FormatReward {
  bool prompt_ends_in_think = false;

  double operator()(const Completion& c) const {
    const std::string_view text = c.text;
    const auto skip_space = [&](std::size_t i) {
      while (i < text.size() && is_ascii_space(text[i])) ++i;
      return i;
    };
    const auto has_tag = [](std::string_view body) {
      for (const std::string_view tag : {"<think>", "</think>", "<answer>", "</answer>"})
        if (body.find(tag) != std::string_view::npos) return true;
      return false;
    };
    std::size_t i = skip_space(0);
    if (!prompt_ends_in_think) {
      if (!text.substr(i).starts_with("<think>")) return 0.0;
      i += 7;
    }
    const std::size_t think_end = text.find("</think>", i);
    if (think_end == std::string_view::npos || has_tag(text.substr(i, think_end - i))) return 0.0;
    i = skip_space(think_end + 8);
    if (!text.substr(i).starts_with("<answer>")) return 0.0;
    i += 8;
    const std::size_t answer_end = text.find("</answer>", i);
    if (answer_end == std::string_view::npos) return 0.0;
    const std::string_view answer = text.substr(i, answer_end - i);
    if (has_tag(answer) || trim(answer).empty()) return 0.0;
    return skip_space(answer_end + 9) == text.size() ? 1.0 : 0.0;
  }
};

// ---------------------------------------------------------------------------------------
// Countdown
namespace detail {

// Recursive descent over  expr := term (('+'|'-') term)*,  term := unary (('*'|'/') unary)*,
// unary := ('+'|'-') unary | number | '(' expr ')'  (Python's precedence: unary minus binds
// tighter than * and /). Any failure leaves ok false.
class Arithmetic {
 public:
  explicit Arithmetic(std::string_view text) : s_(text) {}

  std::optional<double> run() {
    const double value = expr();
    skip();
    if (!ok_ || i_ != s_.size()) return std::nullopt;
    return value;
  }

 private:
  // Python refuses deeper nesting too ("too many nested parentheses"); this bounds recursion.
  static constexpr int kMaxDepth = 100;

  void skip() {
    while (i_ < s_.size() && is_ascii_space(s_[i_])) ++i_;
  }
  bool peek(char c) {
    skip();
    return i_ < s_.size() && s_[i_] == c;
  }
  // Tracks the nesting of unary operators and parentheses.
  struct Nest {
    Arithmetic& a;
    explicit Nest(Arithmetic& arithmetic) : a(arithmetic) {
      if (++a.depth_ > kMaxDepth) a.ok_ = false;
    }
    ~Nest() { --a.depth_; }
  };

  double expr() {
    double value = term();
    while (ok_ && (peek('+') || peek('-'))) {
      const char op = s_[i_++];
      const double rhs = term();
      value = op == '+' ? value + rhs : value - rhs;
    }
    return value;
  }
  double term() {
    double value = unary();
    while (ok_ && (peek('*') || peek('/'))) {
      const char op = s_[i_++];
      if (op == '*' && peek('*')) return fail();  // ** is Python's power: not allowed
      const double rhs = unary();
      if (op == '/' && rhs == 0.0) return fail();  // ZeroDivisionError
      value = op == '*' ? value * rhs : value / rhs;
    }
    return value;
  }
  double unary() {
    const Nest nest(*this);
    if (!ok_) return 0.0;
    if (peek('+') || peek('-')) {
      const char op = s_[i_++];
      const double value = unary();
      return op == '-' ? -value : value;
    }
    if (peek('(')) {
      ++i_;
      const double value = expr();
      if (!ok_ || !peek(')')) return fail();
      ++i_;
      return value;
    }
    return number();
  }
  double number() {
    skip();
    const std::size_t begin = i_;
    while (i_ < s_.size() && s_[i_] >= '0' && s_[i_] <= '9') ++i_;
    const std::string_view digits = s_.substr(begin, i_ - begin);
    // Python rejects leading zeros ("01"), though not a run of zeros ("00").
    if (digits.empty() || (digits.size() > 1 && digits[0] == '0' && digits.find_first_not_of('0') != std::string_view::npos))
      return fail();
    double value = 0.0;
    for (const char d : digits) value = value * 10.0 + (d - '0');
    return value;
  }
  double fail() {
    ok_ = false;
    return 0.0;
  }

  std::string_view s_;
  std::size_t i_ = 0;
  int depth_ = 0;
  bool ok_ = true;
};

}  // namespace detail

// The value of an arithmetic expression of non-negative integers, + - * / (true division),
// unary signs and parentheses; nullopt for anything else or a division by zero.
inline std::optional<double> evaluate_arithmetic(std::string_view expression) {
  for (const char c : expression)
    if (!(c >= '0' && c <= '9') && !is_ascii_space(c) && std::string_view("+-*/()").find(c) == std::string_view::npos)
      return std::nullopt;
  return detail::Arithmetic(expression).run();
}

inline double countdown_reward(std::string_view completion, int64_t target, std::span<const int64_t> numbers,
                               double format_score = 0.1, double score = 1.0) {
  const std::size_t newline = completion.rfind('\n');
  const std::string_view last_line = newline == std::string_view::npos ? completion : completion.substr(newline + 1);
  const auto tagged = last_tag_content(last_line, "answer");
  if (!tagged) return 0.0;
  const std::string_view equation = trim(*tagged);

  std::vector<int64_t> used;
  for (std::size_t i = 0; i < equation.size();) {
    if (equation[i] < '0' || equation[i] > '9') {
      ++i;
      continue;
    }
    const std::size_t begin = i;
    while (i < equation.size() && equation[i] >= '0' && equation[i] <= '9') ++i;
    int64_t value = 0;
    const auto [end, ec] = std::from_chars(equation.data() + begin, equation.data() + i, value);
    if (ec != std::errc()) return format_score;  // too long for any of the numbers
    used.push_back(value);
  }
  std::vector<int64_t> given(numbers.begin(), numbers.end());
  std::sort(used.begin(), used.end());
  std::sort(given.begin(), given.end());
  if (used != given) return format_score;
  const auto result = evaluate_arithmetic(equation);
  if (!result) return format_score;
  return std::abs(*result - static_cast<double>(target)) < 1e-5 ? score : format_score;
}

// ---------------------------------------------------------------------------------------
// DAPO's soft overlong punishment
struct OverlongPunishment {
  int64_t max_length = 0;    // L_max
  int64_t cache_length = 0;  // L_cache: the soft band below L_max

  double operator()(const Completion& c) const {
    R1_CHECK(max_length > 0 && cache_length >= 0 && cache_length <= max_length, "[overlong_punishment] max_length ",
             max_length, " and cache_length ", cache_length, ": expected 0 <= cache_length <= max_length, max_length > 0");
    const int64_t free = max_length - cache_length;
    if (c.tokens <= free) return 0.0;
    if (c.tokens <= max_length) return static_cast<double>(free - c.tokens) / static_cast<double>(cache_length);
    return -1.0;
  }
};

// ---------------------------------------------------------------------------------------
// Named reward functions with weights.
class RewardSet {
 public:
  RewardSet& add(std::string name, RewardFunction function, double weight = 1.0) {
    R1_CHECK(static_cast<bool>(function), "[rewards] \"", name, "\" has no function");
    R1_CHECK(std::isfinite(weight), "[rewards] \"", name, "\" has weight ", weight);
    R1_CHECK(std::find(names_.begin(), names_.end(), name) == names_.end(), "[rewards] \"", name, "\" is already added");
    names_.push_back(std::move(name));
    functions_.push_back(std::move(function));
    weights_.push_back(weight);
    return *this;
  }

  int64_t size() const { return static_cast<int64_t>(functions_.size()); }
  const std::vector<std::string>& names() const { return names_; }
  const std::vector<double>& weights() const { return weights_; }

  // rewards [B, F]: function f on completion b, in order.
  Tensor<double> evaluate(std::span<const Completion> completions) const {
    R1_CHECK(!functions_.empty(), "[rewards] no reward functions: add() some first");
    R1_CHECK(!completions.empty(), "[rewards] no completions");
    const auto B = static_cast<int64_t>(completions.size());
    Tensor<double> rewards(Shape{B, size()});
    for (int64_t b = 0; b < B; ++b)
      for (int64_t f = 0; f < size(); ++f) {
        const double r = functions_[f](completions[b]);
        R1_CHECK(!std::isinf(r), "[rewards] \"", names_[f], "\" returned ", r, " for completion ", b,
                 ", expected a finite value or NaN (does not apply)");
        rewards(b, f) = r;
      }
    return rewards;
  }

 private:
  std::vector<std::string> names_;
  std::vector<RewardFunction> functions_;
  std::vector<double> weights_;
};

}  // namespace r1
