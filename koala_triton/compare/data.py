"""Real data found on the machine: scikit-learn's handwritten digits and the source files of
Python's standard library. Nothing is downloaded.

Both loaders return CPU tensors; the tasks move them to the training device once.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

#: Characters of the language model: newline and printable ASCII; id 0 stands for any other
#: byte (tabs, non-ASCII UTF-8 bytes). 97 ids in all.
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
VOCAB = len(CHARS) + 1


@dataclass(frozen=True)
class Split:
    """Inputs and targets of a train and a test split (CPU tensors)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits(test_fraction: float = 0.25, split_seed: int = 0) -> Split:
    """scikit-learn's handwritten digits (1797 images of 8x8 pixels, 10 classes).

    Returns x [N, 1, 8, 8] float32 with pixel values scaled from 0..16 to [0, 1] and labels
    y [N] int64; a stratified split (``test_fraction`` of the images, 450 of 1797 at 0.25)
    that depends on ``split_seed`` only, so every optimizer and training seed sees the same
    test set. The data ship with scikit-learn (no download).
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(torch.arange(len(y)).numpy(), test_size=test_fraction,
                                           random_state=split_seed, stratify=digits.target)
    idx_train, idx_test = torch.as_tensor(idx_train), torch.as_tensor(idx_test)
    return Split(x[idx_train], y[idx_train], x[idx_test], y[idx_test])


def stdlib_sources(root: Path | None = None) -> list[Path]:
    """The top-level ``*.py`` files of the standard library (``sysconfig``'s ``stdlib`` path),
    sorted by name: 168 files, 4.7 MB on CPython 3.11. The corpus differs between Python
    versions, so results name the version they were made with."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else Path(root)
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no *.py files in {root}: is this Python's standard library?")
    return files


def encode(text: str) -> torch.Tensor:
    """Character ids [len(text.encode('utf-8'))] uint8 in 0..VOCAB-1 (see ``CHARS``): one id
    per UTF-8 byte, non-ASCII bytes and tabs mapped to 0."""
    table = torch.zeros(256, dtype=torch.uint8)
    for i, ch in enumerate(CHARS):
        table[ord(ch)] = i + 1
    data = text.encode("utf-8")
    if not data:
        return torch.zeros(0, dtype=torch.uint8)
    return table[torch.frombuffer(bytearray(data), dtype=torch.uint8).long()]


def decode(ids: torch.Tensor) -> str:
    """Inverse of ``encode`` for ids 1..VOCAB-1 (id 0 becomes '?')."""
    return "".join(CHARS[i - 1] if i > 0 else "?" for i in ids.tolist())


@dataclass(frozen=True)
class TextSplit:
    """Character ids of the training and test files, each a 1-D uint8 stream."""

    train: torch.Tensor
    test: torch.Tensor
    train_files: int
    test_files: int


def load_stdlib_text(files: list[Path] | None = None, test_every: int = 10,
                     max_train_chars: int = 4_000_000, max_test_chars: int = 400_000) -> TextSplit:
    """The standard library's source as character ids, split by file: every ``test_every``-th
    file (in name order: the 10th, 20th, ...) is held out for testing, so the test text comes
    from files the model never trained on. Streams are the files' texts joined by newlines, cut
    at ``max_*_chars``."""
    files = stdlib_sources() if files is None else files
    train, test = [], []
    for i, path in enumerate(files):
        (test if (i + 1) % test_every == 0 else train).append(path)
    if not train or not test:
        raise ValueError(f"{len(files)} files give no train/test split with test_every={test_every}")

    def stream(paths: list[Path], limit: int) -> torch.Tensor:
        text = "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in paths)
        return encode(text[:limit])

    return TextSplit(stream(train, max_train_chars), stream(test, max_test_chars), len(train), len(test))
