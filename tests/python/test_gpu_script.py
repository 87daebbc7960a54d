"""benchmarks/gpu/run.sh must not rot while the code moves: no GPU runs it here, so this checks,
on the CPU, that everything it names still exists and parses: the test files and `-k`
expressions it hands to pytest select tests, the scripts it runs import, its inline Python
probes run, and the options it passes to dropmuon-compare and bench_gpu.py are accepted."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from dropmuon.compare.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = (ROOT / "benchmarks" / "gpu" / "run.sh").read_text()


def commands(program: str) -> list[list[str]]:
    """The arguments of each command in run.sh that runs ``"$PYTHON" <program>`` (``-m
    pytest``, a script's path; continuation lines joined, redirections and what follows them
    left out)."""
    start = f'"$PYTHON" {program}'
    found = []
    for line in SCRIPT.replace("\\\n", " ").splitlines():
        if start in line:
            words = shlex.split(line[line.index(start) + len(start) :])
            ends = [i for i, w in enumerate(words) if w.startswith((">", "2>"))]
            found.append(words[: ends[0]] if ends else words)
    return found


def test_every_path_it_names_exists():
    paths = set(re.findall(r"\b(?:tests|benchmarks)/[\w/.-]+\.(?:py|sh)\b", SCRIPT))
    assert paths, "run.sh names no test or benchmark file"
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"run.sh names files that do not exist: {missing}"


def test_its_pytest_selections_collect_tests():
    runs = [words for words in commands("-m pytest") if "-k" in words]
    assert runs, "run.sh's sanitizer step runs no pytest -k selection"
    for words in runs:
        files = [w for w in words if w.endswith(".py")]
        expression = words[words.index("-k") + 1]
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
            + files
            + ["-k", expression],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        found = re.search(r"(\d+)/\d+ tests collected", result.stdout)
        assert found and int(found.group(1)) > 0, result.stdout[-2000:]


def test_its_benchmark_script_imports():
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu/bench_gpu.py", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("words", commands("-m dropmuon.compare"), ids=lambda w: "compare")
def test_its_compare_options_parse(words):
    # Shell variables stand for values: give each a plausible one.
    args = [re.sub(r"\$\{?(\w+)\}?", "3" if "EPOCHS" in w else "x", w) for w in words]
    parsed = build_parser().parse_args(args)
    assert parsed.device == "cuda" and parsed.batch_size == 8192


def test_its_inline_python_runs():
    # Each `"$PYTHON" -c "..."` probe must run here too: on the CPU it may answer "no" (exit 1:
    # no CUDA kernel), never fail on a name that moved (an error).
    snippets = re.findall(r'"\$PYTHON" -c "([^"]+)"', SCRIPT)
    assert snippets, "run.sh runs no inline Python"
    for snippet in snippets:
        result = subprocess.run(
            [sys.executable, "-c", snippet], cwd=ROOT, capture_output=True, text=True
        )
        assert result.returncode in (0, 1) and "Error" not in result.stderr, (
            snippet,
            result.stderr[-2000:],
        )


def test_its_benchmark_options_parse():
    runs = commands("benchmarks/gpu/bench_gpu.py")
    assert runs, "run.sh never runs bench_gpu.py"
    for args in runs:
        # bench_gpu.py's own parser on run.sh's arguments, without running a benchmark.
        probe = (
            "import runpy, sys; sys.path.insert(0, 'benchmarks/gpu'); "
            "runpy.run_path('benchmarks/gpu/bench_gpu.py')['build_parser']().parse_args(sys.argv[1:])"
        )
        result = subprocess.run(
            [sys.executable, "-c", probe, *args], cwd=ROOT, capture_output=True, text=True
        )
        assert result.returncode == 0, (args, result.stderr[-2000:])
