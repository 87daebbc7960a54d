#!/usr/bin/env bash
# The GPU check and benchmarks of dropmuon's CUDA kernels, in one go (about 7 minutes on an H100).
# Run from the repository root on a machine with an NVIDIA GPU, nvcc and a CUDA build of torch;
# nothing is downloaded (pip runs with --no-build-isolation --no-index --no-deps):
#
#     bash benchmarks/gpu/run.sh --data-dir <folder with the four Fashion-MNIST IDX files>
#
#   1. builds the CUDA extension in place (TORCH_CUDA_ARCH_LIST defaults to 9.0, Hopper);
#   2. runs the Python tests (tests/python, CUDA cases in test_op_*.py and test_cuda_graph.py),
#      then their quick `-k small` subset under compute-sanitizer memcheck when it is installed;
#   3. benchmarks/gpu/bench_gpu.py: bf16 matmul peak, Newton-Schulz vs torch.optim.Muon, one
#      optimizer step vs torch.optim.Muon + AdamW;
#   4. Fashion-MNIST time-to-accuracy at batch 8192, Drop-Muon vs Muon vs torch.optim.Muon
#      (python -m dropmuon.compare --device cuda).
# The report (markdown tables) is printed last and written, with the logs, to $OUT when set, else
# to benchmarks/gpu/results/ (ignored by git). The exit status is non-zero if a step failed.
#
# Fashion-MNIST is not on the GPU machine's default path (/usr/share/datasets/fashion-mnist), and
# that machine reaches no network: the four IDX files (train-images-idx3-ubyte.gz,
# train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz, 30 MB) must
# travel inside the repository tree, in a folder git ignores, e.g.
#     mkdir -p data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/* data/fashion-mnist/
#     echo /data/ >> .git/info/exclude
# and then --data-dir data/fashion-mnist. Without --data-dir step 4 is skipped.
set -uo pipefail

DATA_DIR=""
EPOCHS=12
while [ $# -gt 0 ]; do
    case "$1" in
    --data-dir) DATA_DIR="$2"; shift 2 ;;
    --epochs) EPOCHS="$2"; shift 2 ;;
    -h | --help) sed -n '2,/^[^#]/{/^#/p}' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

cd "$(dirname "$0")/../.."
RESULTS="${OUT:-benchmarks/gpu/results}"
mkdir -p "$RESULTS"
REPORT="$RESULTS/report.md"
PYTHON="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
# The custom CUDA kernels are opt-in until this script has passed on real hardware: ask for them
# (DropMuon's default path on CUDA is the pure-PyTorch reference, see README "GPU").
export DROPMUON_CUDA_KERNELS=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}"
FAILED=()
START=$(date +%s)

step() { echo; echo "=== [$(($(date +%s) - START)) s] $*"; }
note() { echo "$*" | tee -a "$REPORT"; }

: >"$REPORT"
note "# dropmuon on the GPU: $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"
note ""
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/GPU: /' | tee -a "$REPORT"

# 1. build ------------------------------------------------------------------------------------
step "build (nvcc, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
if timeout 420 "$PYTHON" -m pip install -e . --no-build-isolation --no-index --no-deps -q \
    >"$RESULTS/build.log" 2>&1 &&
    "$PYTHON" -c "import dropmuon, sys; sys.exit(0 if dropmuon.ops.has_kernel('cuda') else 1)"; then
    note "- build: CUDA extension OK"
else
    tail -40 "$RESULTS/build.log"
    note "- build: FAILED (see build.log); nothing else can run"
    exit 1
fi

# 2. tests ------------------------------------------------------------------------------------
step "tests"
if timeout 420 "$PYTHON" -m pytest tests/python -q -x -p no:cacheprovider >"$RESULTS/tests.log" 2>&1; then
    note "- tests: $(tail -1 "$RESULTS/tests.log")"
else
    tail -60 "$RESULTS/tests.log"
    note "- tests: FAILED: $(tail -1 "$RESULTS/tests.log") (see tests.log)"
    FAILED+=(tests)
fi

if command -v compute-sanitizer >/dev/null 2>&1; then
    step "compute-sanitizer memcheck on the quick subset"
    # Every kernel, chunking and product route on small inputs; memcheck slows CUDA ~10-100x.
    if timeout 150 compute-sanitizer --tool memcheck --error-exitcode 99 \
        "$PYTHON" -m pytest tests/python/test_op_sharp.py tests/python/test_op_muon_update.py \
        -q -x -p no:cacheprovider \
        -k "small and 37x11 and (default or batched)" >"$RESULTS/sanitizer.log" 2>&1; then
        note "- compute-sanitizer memcheck: $(grep -E 'ERROR SUMMARY' "$RESULTS/sanitizer.log" | tail -1); pytest: $(grep -E 'passed|failed' "$RESULTS/sanitizer.log" | tail -1)"
    else
        tail -40 "$RESULTS/sanitizer.log"
        note "- compute-sanitizer memcheck: FAILED or timed out (see sanitizer.log)"
        FAILED+=(sanitizer)
    fi
else
    note "- compute-sanitizer: not installed, skipped"
fi

# 3. benchmarks -------------------------------------------------------------------------------
step "benchmarks"
if timeout 300 "$PYTHON" benchmarks/gpu/bench_gpu.py --out "$RESULTS" >"$RESULTS/bench.log" 2>&1; then
    note ""
    cat "$RESULTS/bench.md" >>"$REPORT"
    rm -f "$RESULTS/bench.log"
else
    tail -40 "$RESULTS/bench.log"
    note "- benchmarks: FAILED (see bench.log)"
    FAILED+=(benchmarks)
fi
rm -f "$RESULTS/bench.md" # in report.md now

# 4. end to end -------------------------------------------------------------------------------
step "Fashion-MNIST, batch 8192"
if [ -n "$DATA_DIR" ]; then
    COMPARE=/tmp/dropmuon-compare
    rm -rf "$COMPARE"
    if timeout 240 "$PYTHON" -m dropmuon.compare --device cuda --dataset fashion-mnist \
        --data-dir "$DATA_DIR" --batch-size 8192 --model paper-cnn \
        --optimizers dropmuon muon torch-muon --seeds 0 1 --epochs "$EPOCHS" --no-progress \
        --output "$COMPARE" >"$RESULTS/compare.log" 2>&1; then
        note ""
        note "## Fashion-MNIST, paper CNN, batch 8192, $EPOCHS epochs, seeds 0 1 (python -m dropmuon.compare)"
        note ""
        cat "$COMPARE/summary.md" >>"$REPORT"
        cp "$COMPARE/runs.csv" "$RESULTS/compare_runs.csv" 2>/dev/null
        rm -f "$RESULTS/compare.log"
    else
        tail -40 "$RESULTS/compare.log"
        note "- compare: FAILED (see compare.log)"
        FAILED+=(compare)
    fi
else
    note ""
    note "- Fashion-MNIST comparison skipped: no --data-dir (see the comment at the top of run.sh)"
fi

step "done"
note ""
note "Total $(($(date +%s) - START)) s.${FAILED[*]:+ FAILED: ${FAILED[*]}}"
echo
cat "$REPORT"
[ ${#FAILED[@]} -eq 0 ]
