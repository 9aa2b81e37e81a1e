#!/usr/bin/env bash
# Builds r1's libFuzzer targets (tests/fuzz/fuzz_tokenizer_*.cpp) with clang, ASan and UBSan,
# and runs each for a bounded time, side by side:
#   scripts/fuzz.sh                   both targets, 30 s each (CI)
#   FUZZ_SECONDS=600 scripts/fuzz.sh  longer, locally
#   scripts/fuzz.sh json              one target: json (Tokenizer::from_json) or encode
# Fails on anything libFuzzer reports: a crash, a sanitizer report, a leak, an allocation
# past its memory limit, a slow input, an exception other than r1::error, or a target's own
# mismatch check. The input is saved in build-fuzz/artifacts/ and replays with
#   build-fuzz/fuzz_tokenizer_NAME build-fuzz/artifacts/NAME-crash-...
# Corpora grow in build-fuzz/corpus/NAME (kept between runs), seeded from tests/fuzz/corpus/NAME.
# FUZZ_DIR overrides build-fuzz.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/install-deps.sh
# The encode target also fuzzes the real DeepSeek-V3, Llama-3 and Qwen3 files when cached.
bash scripts/fetch-tokenizers.sh --no-reference || echo "fuzz: fetch-tokenizers.sh failed; encode runs without the real files" >&2

seconds="${FUZZ_SECONDS:-30}"
out="${FUZZ_DIR:-build-fuzz}"
if [ "$#" -gt 0 ]; then targets=("$@"); else targets=(json encode); fi
mkdir -p "$out/artifacts"

flags=(-std=c++20 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -pthread
       -I include -isystem /usr/include/eigen3 "-DR1_FIXTURE_DIR=\"$PWD/tests/fixtures\"")

pids=()
for name in "${targets[@]}"; do
  echo "fuzz: building fuzz_tokenizer_$name"
  clang++ "${flags[@]}" "tests/fuzz/fuzz_tokenizer_$name.cpp" -o "$out/fuzz_tokenizer_$name" -lfmt &
  pids+=($!)
done
built=true
for pid in "${pids[@]}"; do wait "$pid" || built=false; done
[ "$built" = true ] || { echo "fuzz: build FAILED"; exit 1; }

pids=()
for name in "${targets[@]}"; do
  mkdir -p "$out/corpus/$name"
  echo "fuzz: running fuzz_tokenizer_$name for ${seconds}s"
  "$out/fuzz_tokenizer_$name" -max_total_time="$seconds" -timeout=20 -print_final_stats=1 \
    -dict="tests/fuzz/tokenizer_$name.dict" -artifact_prefix="$out/artifacts/$name-" \
    "$out/corpus/$name" "tests/fuzz/corpus/$name" > "$out/$name.log" 2>&1 &
  pids+=($!)
done

failed=()
for i in "${!targets[@]}"; do
  name="${targets[$i]}"
  if wait "${pids[$i]}"; then
    runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$out/$name.log")"
    rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$out/$name.log")"
    echo "fuzz: fuzz_tokenizer_$name passed: $runs runs, $rate/s, corpus $(ls "$out/corpus/$name" | wc -l) inputs"
  else
    echo "fuzz: fuzz_tokenizer_$name FAILED; the end of $out/$name.log:"
    tail -n 60 "$out/$name.log"
    failed+=("$name")
  fi
done
[ "${#failed[@]}" -eq 0 ] || { echo "fuzz: FAILED: ${failed[*]}"; exit 1; }
