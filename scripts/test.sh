#!/usr/bin/env bash
# Builds everything and runs every test: the README's test command, and exactly what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
start=$SECONDS

echo "== ruff, clang-format"
python3 -m ruff check python tests/python tests/cpp benchmarks examples
python3 -m ruff format --check python tests benchmarks examples >/dev/null
clang-format --dry-run --Werror csrc/*/*.c csrc/*/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.cuh \
    csrc/include/dropmuon/*.h csrc/include/dropmuon/aten/*.h tests/c/*.cpp tests/c/*.h \
    tests/cpp/*.cpp tests/fuzz/*.c examples/cpp/*.cpp

echo "== C core + GoogleTest (Release)"
cmake -S . -B build/c -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build/c -j "$(nproc)" >/dev/null
ctest --test-dir build/c --output-on-failure -j "$(nproc)" | tail -n 3

echo "== C core + GoogleTest under AddressSanitizer + UndefinedBehaviorSanitizer"
cmake -S . -B build/c-sanitize -DCMAKE_BUILD_TYPE=Debug -DDM_SANITIZE=ON >/dev/null
cmake --build build/c-sanitize -j "$(nproc)" >/dev/null
ctest --test-dir build/c-sanitize --output-on-failure -j "$(nproc)" | tail -n 3

echo "== C++ frontend (LibTorch): dropmuon_cpp, its GoogleTests against the Python optimizer, the example"
cmake -S . -B build/cpp -DCMAKE_BUILD_TYPE=Release -DDM_BUILD_TESTS=OFF -DDM_BUILD_CPP=ON \
    -DCMAKE_PREFIX_PATH="$(python3 -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" \
    >build/cpp.log 2>&1 || { cat build/cpp.log; exit 1; }
cmake --build build/cpp -j "$(nproc)" >>build/cpp.log 2>&1 || { cat build/cpp.log; exit 1; }
# The Python optimizer's trajectories, which the C++ one must reproduce bit for bit.
python3 tests/cpp/make_fixture.py build/cpp/fixture.pt
DROPMUON_CPP_FIXTURE="$PWD/build/cpp/fixture.pt" \
    ctest --test-dir build/cpp --output-on-failure -j "$(nproc)" | tail -n 3

if command -v nvcc >/dev/null && compgen -G "csrc/cuda/*.cu" >/dev/null; then
    echo "== CUDA compile check: every csrc/cuda/*.cu with nvcc for sm_90"
    cmake -S . -B build/cuda-check -DDM_BUILD_TESTS=OFF -DDM_CUDA_CHECK=ON >/dev/null
    cmake --build build/cuda-check -j "$(nproc)" >build/cuda-check/build.log 2>&1 ||
        { cat build/cuda-check/build.log; exit 1; }
    grep -o "compile check: .*" build/cuda-check/build.log || echo "(all up to date)"
fi

if [ -x tests/fuzz/run.sh ]; then
    echo "== fuzzing the C API: the corpus replayed (tests/fuzz/explore.sh searches for new inputs)"
    tests/fuzz/run.sh
fi

echo "== pytest"
# pytest exits 5 when it collects no tests: under set -e that fails the run, as it should.
python3 -m pytest tests/python -q -p no:cacheprovider
echo "== all tests passed in $((SECONDS - start)) s (after setup)"
