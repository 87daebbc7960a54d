"""Running test scenarios in 2 spawned processes on the gloo backend (CPU), with a deadline so
that a hang fails the test instead of stalling the suite. Spawned, not forked: forking after
torch has started its threads can hang.

A test module defines ``_scenarios(rank, workdir) -> dict`` and a top-level worker that
calls :func:`run_scenarios` (spawn needs a function it can import by name); its fixture calls
:func:`collect`, which returns each rank's dict."""

from __future__ import annotations

import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dropmuon.distributed.fsdp import release_device_meshes

WORLD = 2
DEADLINE_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, *args, deadline_s=DEADLINE_S):
    """Runs fn(rank, port, *args) in WORLD processes; fails the test past the deadline."""
    context = mp.start_processes(
        fn, args=(free_port(), *args), nprocs=WORLD, join=False, start_method="spawn"
    )
    start = time.monotonic()
    while not context.join(timeout=2):
        if time.monotonic() - start > deadline_s:
            for process in context.processes:
                process.kill()
            pytest.fail(f"distributed workers still running after {deadline_s} s (a hang?)")


def run_scenarios(rank: int, port: int, workdir: str, scenarios) -> None:
    """In a worker: joins the group, saves ``scenarios(rank, workdir)`` for :func:`collect`,
    or writes the traceback where :func:`collect` reports it."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        torch.save(scenarios(rank, workdir), os.path.join(workdir, f"rank{rank}.pt"))
    except Exception:
        with open(os.path.join(workdir, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        # Frees the process group in destroy_process_group (its gloo threads joined), not at
        # interpreter shutdown, where a thread that needs the GIL aborts the process.
        release_device_meshes()
        dist.destroy_process_group()
    left = gloo_threads()
    if left:
        message = f"gloo threads alive after destroy_process_group: {left}"
        with open(os.path.join(workdir, f"error{rank}.txt"), "w") as f:
            f.write(message)
        raise RuntimeError(message)


def gloo_threads() -> list[str]:
    """This process's gloo threads, by name (Linux; none elsewhere)."""
    tasks = "/proc/self/task"
    if not os.path.isdir(tasks):
        return []
    names = []
    for task in os.listdir(tasks):
        try:
            with open(os.path.join(tasks, task, "comm")) as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended meanwhile
            continue
    return sorted(name for name in names if "gloo" in name)


def collect(worker, workdir: str) -> list[dict]:
    """Spawns ``worker(rank, port, workdir)`` and returns each rank's results; a worker's
    exception fails the test with its traceback."""
    try:
        spawn(worker, workdir)
    except mp.ProcessRaisedException:
        errors = [f for f in os.listdir(workdir) if f.startswith("error")]
        text = "".join(open(os.path.join(workdir, f)).read() for f in errors)
        pytest.fail(f"a worker failed:\n{text}")
    return [torch.load(os.path.join(workdir, f"rank{r}.pt")) for r in range(WORLD)]
