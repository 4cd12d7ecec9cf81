"""Fake CIFAR folders in torchvision's layouts, made in a temporary folder: the tests of the
comparison's CIFAR reader never download anything."""

from __future__ import annotations

import pickle

import torch


def fake_cifar_pickles(root, hundred: bool, n_train=(6, 4), n_test=5, seed=0):
    """torchvision's download folder in miniature: the same files and pickle keys, few images.
    Returns the images and labels written (train, test)."""
    g = torch.Generator().manual_seed(seed)
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    key = "fine_labels" if hundred else "labels"
    names = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    sizes = [sum(n_train)] if hundred else list(n_train) + [1, 1, 1]
    written = {"train": [], "test": []}
    for split, files, counts in (("train", names, sizes), ("test", ["test"] if hundred else ["test_batch"], [n_test])):
        for name, n in zip(files, counts):
            x = torch.randint(0, 256, (n, 3072), generator=g, dtype=torch.uint8)
            y = torch.randint(0, 100 if hundred else 10, (n,), generator=g)
            with open(folder / name, "wb") as f:
                pickle.dump({"data": x.numpy(), key: y.tolist(), "filenames": [b"x"] * n}, f)
            written[split].append((x.reshape(-1, 3, 32, 32), y))
    return {k: (torch.cat([x for x, _ in v]), torch.cat([y for _, y in v])) for k, v in written.items()}


def fake_image_folder(root, classes=("cat", "dog"), per_class=3, size=32):
    """torchvision's ImageFolder layout: ``root/{train,test}/<class>/<i>.png``, random RGB
    images of ``size`` x ``size``."""
    from PIL import Image

    g = torch.Generator().manual_seed(1)
    for split in ("train", "test"):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                img = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8)
                Image.fromarray(img.numpy()).save(root / split / cls / f"{i}.png")
