"""A user's CIFAR-10/100 folder, read without torchvision, and the training augmentation of
the KOALA authors' CIFAR recipe (random 32x32 crop of the image padded by 4, horizontal flip).

Layouts accepted (``find_cifar``):

- torchvision's download folders: ``ROOT/cifar-10-batches-py/`` (``data_batch_1`` .. ``_5``,
  ``test_batch``) or ``ROOT/cifar-100-python/`` (``train``, ``test``), or those folders
  themselves. These are the pickles that ``torchvision.datasets.CIFAR10(ROOT, download=True)``
  (or ``CIFAR100``) leaves; they are read as torchvision reads them.
- an image-folder layout (torchvision's ``ImageFolder``): ``ROOT/train/<class>/*.png`` and
  ``ROOT/test/<class>/*.png``, 32x32 RGB images, classes in sorted folder-name order.

Nothing is downloaded: the folder must already hold the data.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import Split

#: Per-channel mean and std (of pixel values in [0, 1]) used by the authors' training script.
NORMALISATION = {
    "cifar10": ((125.3 / 255, 123.0 / 255, 113.9 / 255), (63.0 / 255, 62.1 / 255, 66.7 / 255)),
    "cifar100": ((129.3 / 255, 124.1 / 255, 112.4 / 255), (68.2 / 255, 65.4 / 255, 70.4 / 255)),
}
_PICKLES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels"),
}
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}


@dataclass(frozen=True)
class CifarData:
    """Images as uint8 [N, 3, 32, 32] with int64 labels [N] (a ``Split``), the number of
    classes, the dataset's name (``cifar10``, ``cifar100`` or ``imagefolder``), and the
    per-channel normalisation (mean, std) for pixel values in [0, 1]."""

    split: Split
    num_classes: int
    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def find_cifar(root: str | Path) -> tuple[str, Path]:
    """The layout of ``root`` and the folder holding its files: (``cifar10`` | ``cifar100`` |
    ``imagefolder``, folder). Raises ``FileNotFoundError`` naming the layouts looked for."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    for name, (folder, train_files, test_files, _) in _PICKLES.items():
        for candidate in (root / folder, root):
            if all((candidate / f).is_file() for f in train_files + test_files):
                return name, candidate
    if (root / "train").is_dir() and (root / "test").is_dir():
        return "imagefolder", root
    raise FileNotFoundError(
        f"{root} holds no CIFAR data: expected cifar-10-batches-py/ or cifar-100-python/ (the folders "
        f"torchvision's CIFAR10/CIFAR100(root, download=True) leave) or train/<class>/ and test/<class>/ "
        f"image folders")


def _read_pickles(folder: Path, files: list[str], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for name in files:
        with open(folder / name, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        images.append(torch.as_tensor(entry["data"], dtype=torch.uint8).reshape(-1, 3, 32, 32))
        labels.append(torch.as_tensor(entry[label_key], dtype=torch.int64))
    return torch.cat(images), torch.cat(labels)


def _read_image_folder(folder: Path, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image  # matplotlib's dependency

    images, labels = [], []
    for label, cls in enumerate(classes):
        for path in sorted(p for p in (folder / cls).iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES):
            with Image.open(path) as img:
                rgb = img.convert("RGB")
            if rgb.size != (32, 32):
                raise ValueError(f"{path}: {rgb.size[0]}x{rgb.size[1]} image; the CIFAR recipe needs 32x32")
            images.append(torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).reshape(32, 32, 3).permute(2, 0, 1))
            labels.append(label)
    if not images:
        raise FileNotFoundError(f"no images under {folder}")
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def load_cifar(root: str | Path) -> CifarData:
    """Read a CIFAR folder (see the module docstring) into memory: CIFAR-10 takes 180 MB."""
    name, folder = find_cifar(root)
    if name == "imagefolder":
        classes = sorted(p.name for p in (folder / "train").iterdir() if p.is_dir())
        x_train, y_train = _read_image_folder(folder / "train", classes)
        x_test, y_test = _read_image_folder(folder / "test", classes)
        pixels = x_train.float().div(255).transpose(0, 1).reshape(3, -1)
        mean = tuple(pixels.mean(1).tolist())
        std = tuple(pixels.std(1).clamp(min=1e-3).tolist())
        num_classes = len(classes)
    else:
        _, train_files, test_files, label_key = _PICKLES[name]
        x_train, y_train = _read_pickles(folder, train_files, label_key)
        x_test, y_test = _read_pickles(folder, test_files, label_key)
        mean, std = NORMALISATION[name]
        num_classes = 10 if name == "cifar10" else 100
    return CifarData(Split(x_train, y_train, x_test, y_test), num_classes, name, mean, std)


def normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [B, 3, H, W] (or float in [0, 1]) -> float32 [B, 3, H, W], (x/255 - mean) / std."""
    x = images.float().div(255) if images.dtype == torch.uint8 else images.float()
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def augment(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop of the zero-padded image and a horizontal flip with probability 1/2, per
    image (torchvision's ``RandomCrop(32, padding=4)`` and ``RandomHorizontalFlip()``).

    images: [B, C, H, W] (any dtype, any device); generator: a CPU generator (the draws do not
    depend on the device). Returns the same shape and dtype.
    """
    b, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    top = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(images.device)
    left = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(images.device)
    flip = (torch.rand(b, generator=generator) < 0.5).to(images.device)
    rows = top[:, None] + torch.arange(h, device=images.device)                    # [B, H]
    cols = left[:, None] + torch.arange(w, device=images.device)                   # [B, W]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=images.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]   # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()
