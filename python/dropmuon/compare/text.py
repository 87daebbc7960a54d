"""Text for the comparisons: character-level token tensors, and next-character windows over them.

- ``fortunes``: the fortune cookies of Debian's ``fortunes`` package (``apt-get install
  fortunes``), from ``/usr/share/games/fortunes`` unless a folder is given: every regular file
  there whose name does not end in ``.dat`` (strfile's index) or ``.u8`` (links to the same
  text), in sorted name order; subfolders and symbolic links are skipped. In Debian 12 that
  is 43 files, 2,561,411 characters once the separator lines are gone, 113 distinct ones (a
  few are control characters the files use: tabs, backspaces, bells). Each file is decoded
  as UTF-8 (invalid bytes become U+FFFD), its ``%`` separator lines become empty lines (so
  fortunes are kept apart by a blank line) and it ends with a newline; the files are then
  joined. Licence, from ``/usr/share/doc/fortunes/copyright``: the package (program and
  fortune files) "falls under the BSD copyright" of the Regents of the University of
  California (1991), its advertising clause deleted; the file credits ``cookie`` to Karl
  Lehenbauer's postings to alt.sources and gives no other terms for the fortune files.
- ``synthetic-text``: about 40,000 characters of sentences from a tiny seeded grammar (for
  tests: a small model gets well below the uniform loss within a few hundred steps).

Tokens are characters: a character's token is its index in ``vocab``, the sorted string of the
characters in the whole text (train and test). The last 10% of the characters is the test split,
the rest the training split.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .data import DatasetError

TEXT_DATASETS = ("fortunes", "synthetic-text")
FORTUNES_DIR = "/usr/share/games/fortunes"
TEST_FRACTION = 0.1
_SEPARATOR = re.compile(r"^%[ \t\r]*$", re.MULTILINE)


@dataclass
class TextDataset:
    name: str
    train: Tensor  # [N_train] int64 tokens
    test: Tensor  # [N_test] int64 tokens, the text's tail
    vocab: str  # sorted distinct characters; token i is vocab[i]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> Tensor:
        """The tokens of ``text`` (int64); a character outside the vocabulary is a ValueError."""
        return encode(text, self.vocab)

    def decode(self, tokens: Tensor) -> str:
        return decode(tokens, self.vocab)

    def to(self, device) -> TextDataset:
        return TextDataset(self.name, self.train.to(device), self.test.to(device), self.vocab)


def load_text(name: str, data_dir: str | None = None, seed: int = 0) -> TextDataset:
    """Loads a text by name (see the module docstring); ``data_dir`` overrides the fortunes
    folder, ``seed`` the synthetic text's grammar draws."""
    if name == "fortunes":
        text = read_fortunes(Path(data_dir or FORTUNES_DIR))
    elif name == "synthetic-text":
        text = synthetic_text(seed=seed)
    else:
        raise DatasetError(f"unknown text {name!r}; choose one of {', '.join(TEXT_DATASETS)}")
    return split_text(name, text)


def split_text(name: str, text: str) -> TextDataset:
    """The dataset of one text: the vocabulary of all of it, the last ``TEST_FRACTION`` of the
    characters as the test split."""
    vocab = "".join(sorted(set(text)))
    tokens = encode(text, vocab)
    num_test = int(len(tokens) * TEST_FRACTION)
    split = len(tokens) - num_test
    return TextDataset(name, tokens[:split], tokens[split:], vocab)


def read_fortunes(folder: Path) -> str:
    """The text of a folder of fortune files (see the module docstring for which and how)."""
    hint = (
        "install Debian's package (apt-get install fortunes) or pass --data-dir with a folder "
        "of fortune files"
    )
    if not folder.is_dir():
        raise DatasetError(f"fortunes: no folder {folder}; {hint}")
    files = sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and not path.is_symlink() and path.suffix not in (".dat", ".u8")
    )
    if not files:
        raise DatasetError(f"fortunes: {folder} holds no fortune files; {hint}")
    parts = []
    for path in files:
        text = _SEPARATOR.sub("", path.read_bytes().decode("utf-8", errors="replace"))
        parts.append(text if text.endswith("\n") else text + "\n")
    return "".join(parts)


def encode(text: str, vocab: str) -> Tensor:
    """Each character's index in the sorted string ``vocab``, as int64 (vectorised: code points
    via UTF-32, looked up with searchsorted)."""
    codes = _code_points(text)
    if codes.numel() == 0:
        return codes
    table = _code_points(vocab)
    tokens = torch.searchsorted(table, codes).clamp_(max=max(len(table) - 1, 0))
    if table.numel() == 0 or not torch.equal(table[tokens], codes):
        missing = sorted(set(text) - set(vocab))
        raise ValueError(f"characters outside the vocabulary: {''.join(missing)!r}")
    return tokens


def decode(tokens: Tensor, vocab: str) -> str:
    """The text of a 1-D token tensor."""
    return "".join(map(vocab.__getitem__, tokens.tolist()))


def _code_points(text: str) -> Tensor:
    data = bytearray(text.encode("utf-32-le"))
    if not data:
        return torch.empty(0, dtype=torch.int64)
    return torch.frombuffer(data, dtype=torch.int32).long()


def windows(tokens: Tensor, starts: Tensor, context: int) -> tuple[Tensor, Tensor]:
    """The batch ``x[i] = tokens[s:s + context]`` and its next-character targets
    ``y[i] = tokens[s + 1:s + 1 + context]`` for each ``s = starts[i]``, both
    ``[len(starts), context]``. Starts must lie in ``[0, window_count(tokens, context))``."""
    if context < 1:
        raise ValueError(f"context must be at least 1, got {context}")
    index = starts.to(tokens.device).unsqueeze(1) + torch.arange(context + 1, device=tokens.device)
    chunk = tokens[index]
    return chunk[:, :-1], chunk[:, 1:]


def window_count(tokens: Tensor, context: int) -> int:
    """How many windows of ``context`` inputs (each with its targets) ``tokens`` holds."""
    return max(len(tokens) - context, 0)


_DETERMINERS = ("the", "a", "every", "no", "one")
_ADJECTIVES = ("small", "red", "quiet", "clever", "old", "bright", "lazy", "brave")
_NOUNS = ("cat", "dog", "bird", "fox", "robot", "river", "tree", "child", "king", "moon")
_VERBS = ("sees", "likes", "chases", "finds", "follows", "hears", "paints", "greets")
_ENDINGS = (".", ".", ".", "!", "?")


def synthetic_text(length: int = 40_000, seed: int = 0) -> str:
    """Sentences of a tiny grammar, ``det [adj] noun verb det [adj] noun [and verb det [adj]
    noun] end``, one a line, drawn with a seeded torch generator until ``length`` characters:
    the words and the grammar are learnable, the draws are not."""
    g = torch.Generator().manual_seed(seed)

    def pick(words):
        return words[int(torch.randint(len(words), (), generator=g))]

    def noun_phrase():
        adjective = pick(_ADJECTIVES) + " " if torch.rand((), generator=g) < 0.5 else ""
        return f"{pick(_DETERMINERS)} {adjective}{pick(_NOUNS)}"

    lines, size = [], 0
    while size < length:
        sentence = f"{noun_phrase()} {pick(_VERBS)} {noun_phrase()}"
        if torch.rand((), generator=g) < 0.3:
            sentence += f" and {pick(_VERBS)} {noun_phrase()}"
        line = sentence[0].upper() + sentence[1:] + pick(_ENDINGS) + "\n"
        lines.append(line)
        size += len(line)
    return "".join(lines)[:length]
