#!/usr/bin/env bash
# Builds and runs the flagship example, R1-Zero in miniature: a small DeepSeek-V3 is
# pre-trained on Countdown-mini, then GRPO with a rule-based reward raises its held-out
# pass@1. Its last line on stdout is a JSON object with pass_at_1_before/after and seconds.
#   scripts/example.sh [r1_zero arguments...]      (e.g. --seed 2 --out r1-zero-run)
# BUILD_DIR overrides the build folder (default: build, shared with scripts/test.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/install-deps.sh

build_dir="${BUILD_DIR:-build}"
cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release -DR1_BUILD_EXAMPLES=ON
cmake --build "$build_dir" -j "$(nproc)" --target r1_zero
exec "$build_dir/examples/r1_zero" "$@"
