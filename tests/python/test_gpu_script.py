"""benchmarks/gpu/run.sh must not rot while the code moves: no GPU runs it here, so this checks,
on the CPU, that everything it names still exists and parses: the test files and `-k`
expressions it hands to pytest select tests, the scripts it runs import, and the options it
passes to dropmuon-compare are accepted."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from dropmuon.compare.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = (ROOT / "benchmarks" / "gpu" / "run.sh").read_text()


def commands(module: str) -> list[list[str]]:
    """The arguments of each command in run.sh that runs ``"$PYTHON" -m <module>``
    (continuation lines joined, redirections and what follows them left out)."""
    start = f'"$PYTHON" -m {module}'
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
    runs = [words for words in commands("pytest") if "-k" in words]
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


@pytest.mark.parametrize("words", commands("dropmuon.compare"), ids=lambda w: "compare")
def test_its_compare_options_parse(words):
    # Shell variables stand for values: give each a plausible one.
    args = [re.sub(r"\$\{?(\w+)\}?", "3" if "EPOCHS" in w else "x", w) for w in words]
    parsed = build_parser().parse_args(args)
    assert parsed.device == "cuda" and parsed.batch_size == 8192
