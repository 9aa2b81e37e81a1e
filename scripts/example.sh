#!/usr/bin/env bash
# Builds and runs the flagship example, training a tiny DeepSeek-V3-style language model.
#   scripts/example.sh [train_tiny_lm arguments...]
# BUILD_DIR overrides the build folder (default: build, shared with scripts/test.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/install-deps.sh

build_dir="${BUILD_DIR:-build}"
cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release -DR1_BUILD_EXAMPLES=ON
cmake --build "$build_dir" -j "$(nproc)" --target train_tiny_lm
exec "$build_dir/examples/train_tiny_lm" "$@"
