#!/usr/bin/env bash
# Installs the Debian 12 packages r1's build, tests, examples and benchmarks need.
# Idempotent: installs only what is missing, and touches apt only when something is.
set -euo pipefail

packages=(
  build-essential    # g++, make
  cmake
  pkg-config
  git
  libeigen3-dev      # Eigen 3.4
  libfmt-dev
  nlohmann-json3-dev
  catch2             # tests
  libopenblas-dev    # -DR1_USE_OPENBLAS=ON
  clang              # scripts/fuzz.sh (libFuzzer targets)
  libclang-rt-14-dev # libFuzzer's and the sanitizers' runtime: clang only recommends it
)

missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$package")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages already installed"
  exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif command -v sudo >/dev/null; then
  sudo=(sudo)
else
  echo "install-deps: missing ${missing[*]}, and not root and no sudo to install them" >&2
  exit 1
fi

echo "install-deps: installing ${missing[*]}"
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -q --no-install-recommends "${missing[@]}"
echo "install-deps: installed ${missing[*]}"
