#!/usr/bin/env bash
# Installs what dropmuon needs on a bare machine of this kind (Debian 12, Python 3.11), then
# builds the torch extension and installs the package in place. Pieces already there are
# skipped, so running it again is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
missing=()
# clang + libclang-rt-14-dev: libFuzzer for tests/fuzz. fortunes: the harness's text corpus.
# zlib1g-dev: the C++ example reads the shipped gzip digits.
for package in libgtest-dev dataset-fashion-mnist fortunes cmake g++ clang libclang-rt-14-dev \
    zlib1g-dev; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "== apt-get install ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python3 -c "import torch" 2>/dev/null || {
    echo "== pip install torch==2.13.0"
    python3 -m pip install -q torch==2.13.0
}
torch_before=$(python3 -c "import torch; print(torch.__version__)")
python3 -m pip install -q -r requirements-dev.txt
torch_after=$(python3 -c "import torch; print(torch.__version__)")
if [ "$torch_before" != "$torch_after" ]; then # a requirement must never replace torch
    echo "requirements-dev.txt replaced torch $torch_before with $torch_after" >&2
    exit 1
fi
# Against the installed torch, not a fresh one in an isolated build environment.
echo "== building the torch extension (pip install -e . --no-build-isolation)"
python3 -m pip install -q -e . --no-build-isolation
