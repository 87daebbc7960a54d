"""Writes the seed corpus of fuzz_c_api.c into a directory (argument 1).

Each seed spells out, field by field in the harness's reading order, one meaningful call: every
norm x dtype x precision of dm_sharp on a few shapes (tall, wide, padded, batched, in one block,
aliased), dm_update with each option, dm_gemm_reference with transposes and strides, every
sampling kind, the workspace queries, and inputs that once broke a check. libFuzzer mutates
from there; without seeds it would spend most of its budget discovering the input layout.

To these it adds ``corpus.b64`` (one base64 input per line): a merged corpus from open-ended
runs (tests/fuzz/explore.sh), so that the test command's replay (tests/fuzz/run.sh) covers what
they reached. ``make_corpus.py --pack DIR`` rewrites corpus.b64 from a directory of inputs, e.g.
after ``build/fuzz/fuzz_c_api -merge=1 DIR build/fuzz/seeds build/fuzz/corpus``.
"""

import base64
import itertools
import os
import struct
import sys

SIZES = [0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 255, 256, 4097]
SHARP, UPDATE, GEMM, DISTRIBUTION, DRAW, QUERIES = range(6)


def u8(v):
    return bytes([v & 0xFF])


def u64(v):
    return struct.pack("<Q", v & (2**64 - 1))


def size(n):
    """pick_size: a palette entry, or 'u8 % 70' for other small sizes."""
    if n in SIZES:
        return u8(0) + u8(SIZES.index(n))
    assert 0 <= n < 70
    return u8(4) + u8(n)


def enum(v):
    return u8(0) + u8(v)


TYPICAL = u8(0)  # pick_double: the typical value


def sharp_config(norm, precision=0, steps=5):
    # norm, ns_precision, steps_mode (steps % 9 for < 12), coefficients_mode 0 (Muon's),
    # norm_scale, norm_offset, eps.
    return enum(norm) + enum(precision) + u8(steps) + u8(0) + TYPICAL * 3


def fill(seed, scale=0, injections=()):
    """fill_matrix: generator seed, scale index, then (i, j, special index) injections."""
    out = u64(seed) + u8(scale) + u8(len(injections))
    for i, j, special in injections:
        out += struct.pack("<II", i, j) + u8(special)
    return out


def batch(n):
    # pick_size must not be a multiple of 9 to take 'u8 % 4': size 1 does.
    return size(1) + u8(n)


# ld_mode bits: input padding index (0-2: none, 3: 1, 4: 3), aliased when (bits 3-4) == 0,
# output padding index in bits 5-7.
PLAIN, PADDED, ALIASED = 8, 3 + 8 + (4 << 5), 0


def sharp_seed(
    norm, dtype, precision, rows, cols, n=2, ld_mode=PLAIN, one_block=0, provider=0, nan=False
):
    out = u8(SHARP) + sharp_config(norm, precision) + enum(dtype) + batch(n)
    out += size(rows) + size(cols) + u8(ld_mode) + u8(1) + u8(1) + u8(one_block) + u8(provider)
    if provider == 3:
        out += u8(2) + u8(0)  # fail on the second product, with DM_ERR_GEMM
    for b in range(n):
        injections = [(0, 0, 2)] if nan and b == n - 1 else []  # special 2 is NaN
        out += fill(1000 + b, injections=injections)
    return out + u8(0) + u8(1)  # exact workspace, not NULL


def update_seed(
    norm, dtype, precision, rows, cols, n=2, nesterov=1, adjust=1, radius=0, provider=0
):
    out = u8(UPDATE) + sharp_config(norm, precision)
    out += TYPICAL * 3 + u8(0) + u8(nesterov) + enum(adjust) + enum(radius) + TYPICAL * 2
    out += enum(dtype) + batch(n) + size(rows) + size(cols) + u8(1) + u8(1) + u8(provider)
    if provider == 3:
        out += u8(3) + u8(0)
    for b in range(n):
        out += fill(10 + b) + fill(20 + b) + fill(30 + b)
    return out + u8(0) + u8(0) + u8(1)  # null_which, exact workspace, not NULL


def gemm_seed(dtype, ta, tb, m, n, k, nb=2, beta_zero=1, c_in_mode=0, stride_mode=0):
    out = u8(GEMM) + enum(dtype) + u8(0) + u8(ta) + u8(0) + u8(tb) + u8(1) + u8(nb)
    out += size(1) + size(m) + size(n) + size(k)  # m: a first pick that is not % 80
    out += u8(0) * 3 + TYPICAL + u8(beta_zero) + TYPICAL + u8(c_in_mode) + u8(stride_mode)
    for s in range(4):
        out += fill(50 + s)
    return out


def sampler_seed(kind, layers, draw, progress=5, step=7):
    out = u8(DRAW if draw else DISTRIBUTION) + enum(kind) + size(layers) + u8(1) + u64(12345)
    out += u8(1) + struct.pack("<I", 1) + u8(progress) + u8(0) + TYPICAL
    out += u8(1) + u64(99) + u8(0) + u8(1)
    if draw:
        out += u8(0) + u8(step) + u8(1) + u8(1)
    return out


def query_seed(norm, dtype, rows, cols):
    out = u8(QUERIES) + sharp_config(norm) + TYPICAL * 3 + enum(0) + TYPICAL + enum(1)
    out += enum(dtype) + size(2) + size(rows) + size(cols) + u8(1) + u8(1)
    return out + struct.pack("<IIII", 0, 5, 8, 77) + u64(1) + u64(2) + u64(3)


# Inputs that once broke a check (base64 of libFuzzer's artifact), replayed on every run.
REGRESSIONS = [
    # epoch_shift, one layer, shift_strength 6e199 at progress 0.8: 0 / 0 (fixed 2026-12-02)
    "BAAEAAE5ABAwAAAAAAABAQAAAGAA/z8AYBMAAGlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWkAAAAAAQAHAQE=",
]


def seeds():
    for text in REGRESSIONS:
        yield base64.b64decode(text)
    shapes = [(1, 1), (3, 5), (7, 4), (16, 16), (4, 4097), (33, 9)]
    for norm, dtype, precision in itertools.product(range(5), range(3), range(2)):
        if precision and norm != 0:
            continue
        for rows, cols in shapes:
            yield sharp_seed(norm, dtype, precision, rows, cols)
        yield sharp_seed(norm, dtype, precision, 8, 5, ld_mode=PADDED)
        yield sharp_seed(norm, dtype, precision, 5, 8, n=3, one_block=1, ld_mode=ALIASED)
        yield sharp_seed(norm, dtype, precision, 5, 8, n=3, one_block=1)
        yield sharp_seed(norm, dtype, precision, 5, 8, nan=True)
        yield sharp_seed(norm, dtype, precision, 9, 6, provider=3)
        yield sharp_seed(norm, dtype, precision, 0, 6)
    for norm, dtype in itertools.product(range(5), range(3)):
        for rows, cols in [(1, 1), (8, 3), (3, 8), (17, 17)]:
            yield update_seed(norm, dtype, 1, rows, cols)
        yield update_seed(norm, dtype, 0, 6, 4, nesterov=0, adjust=2, radius=1, provider=1)
        yield update_seed(norm, dtype, 0, 6, 4, provider=3)
    for dtype, ta, tb in itertools.product(range(3), range(2), range(2)):
        yield gemm_seed(dtype, ta, tb, 5, 7, 3)
        yield gemm_seed(dtype, ta, tb, 4, 4, 0, beta_zero=0, c_in_mode=1, stride_mode=2)
    for kind in range(6):
        for layers in (1, 2, 7, 64):
            yield sampler_seed(kind, layers, draw=False)
            yield sampler_seed(kind, layers, draw=True, progress=layers % 11)
    for norm, dtype in itertools.product(range(5), range(3)):
        yield query_seed(norm, dtype, 3, 4097)


CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus.b64")


def corpus():
    if os.path.exists(CORPUS):
        with open(CORPUS) as f:
            for line in f:
                if line.strip():
                    yield base64.b64decode(line)


def pack(directory):
    inputs = sorted(
        base64.b64encode(open(os.path.join(directory, name), "rb").read()).decode()
        for name in os.listdir(directory)
    )
    with open(CORPUS, "w") as f:
        f.write("".join(line + "\n" for line in inputs))
    print(f"{len(inputs)} inputs in {CORPUS}")


def main(directory):
    os.makedirs(directory, exist_ok=True)
    count = 0
    for index, seed in enumerate(itertools.chain(seeds(), corpus())):
        with open(os.path.join(directory, f"seed-{index:04d}"), "wb") as f:
            f.write(seed)
        count += 1
    print(f"{count} seeds in {directory}")


if __name__ == "__main__":
    if sys.argv[1] == "--pack":
        pack(sys.argv[2])
    else:
        main(sys.argv[1])
