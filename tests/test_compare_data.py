"""The comparison's data and models (``koala_triton/compare``): scikit-learn's digits, the
standard library's sources as characters, a user's CIFAR folder (fake folders made here in
torchvision's layouts; nothing is downloaded), the augmentation, the three models."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from koala_triton.compare import cifar, data, models
from tests.fake_data import fake_cifar_pickles, fake_image_folder


def torchvision_or_skip(module: str):
    """The torchvision module, or a skip with the reason: torchvision is often absent, and
    PyPI's build raises at import beside a torch it was not built for (the CPU torch 2.13 here)."""
    try:
        return importlib.import_module(module)
    except Exception as e:  # ImportError, or the RuntimeError of a mismatched build
        pytest.skip(f"torchvision is not importable here ({type(e).__name__}: {str(e)[:80]})")


# ------------------------------------------------------------------------------------ digits
def test_digits_split_is_stratified_scaled_and_fixed():
    pytest.importorskip("sklearn", reason="the compare extra (scikit-learn) is not installed")
    a, b = data.load_digits(), data.load_digits()
    assert a.x_train.shape == (1347, 1, 8, 8) and a.x_test.shape == (450, 1, 8, 8)
    assert a.y_train.shape == (1347,) and a.y_test.dtype == torch.int64
    assert 0.0 == a.x_train.min() and a.x_train.max() == 1.0
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_test, b.y_test)
    counts = torch.bincount(a.y_test, minlength=10)
    assert counts.min() >= 43 and counts.max() <= 46  # 450 of 1797 spread over the 10 classes
    other = data.load_digits(split_seed=1)
    assert not torch.equal(a.y_test, other.y_test)


# ------------------------------------------------------------------------------- stdlib text
def test_encode_maps_printable_ascii_and_newline_and_nothing_else():
    ids = data.encode("a\tb\né ~")
    assert ids.dtype == torch.uint8 and int(ids.max()) < data.VOCAB
    assert data.decode(ids) == "a?b\n?? ~"  # tab and the two UTF-8 bytes of é become id 0
    assert data.VOCAB == 97 and data.decode(data.encode(data.CHARS)) == data.CHARS
    assert data.encode("").numel() == 0


def test_stdlib_sources_are_this_pythons():
    files = data.stdlib_sources()
    assert len(files) > 50 and all(f.suffix == ".py" for f in files)
    assert files == sorted(files) and any(f.name == "os.py" for f in files)


def test_stdlib_text_holds_out_every_tenth_file(tmp_path):
    for i in range(20):
        (tmp_path / f"m{i:02d}.py").write_text(f"# file {i:02d}\n" + ("x = 1\n" if i % 10 != 9 else "held = 'out'\n"))
    text = data.load_stdlib_text(data.stdlib_sources(tmp_path))
    train, test = data.decode(text.train), data.decode(text.test)
    assert (text.train_files, text.test_files) == (18, 2)
    assert "# file 09" in test and "# file 19" in test and "held" not in train
    assert "# file 09" not in train and "x = 1" not in test


def test_stdlib_text_of_the_real_library():
    text = data.load_stdlib_text()
    assert text.train.numel() > 1_000_000 and text.test.numel() > 100_000
    assert int(text.train.max()) < data.VOCAB
    assert (text.train == 0).float().mean() < 0.01  # almost all of the source is printable ASCII


def test_empty_library_folder_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="standard library"):
        data.stdlib_sources(tmp_path)


# ------------------------------------------------------------------------------------ models
def test_digits_cnn_shape_and_size():
    m = models.digits_cnn()
    assert m(torch.rand(5, 1, 8, 8)).shape == (5, 10)
    assert sum(p.numel() for p in m.parameters()) == 38_282


def test_char_transformer_is_causal():
    torch.manual_seed(0)
    m = models.CharTransformer(data.VOCAB, context=16).eval()
    ids = torch.randint(0, data.VOCAB, (2, 16))
    changed = ids.clone()
    changed[:, 10] = (changed[:, 10] + 1) % data.VOCAB
    a, b = m(ids), m(changed)
    assert a.shape == (2, 16, data.VOCAB)
    torch.testing.assert_close(a[:, :10], b[:, :10])  # positions before 10 do not see it
    assert not torch.allclose(a[:, 10:], b[:, 10:])
    with pytest.raises(ValueError, match="exceeds the context"):
        m(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("classes,count", [(10, 11_173_962), (100, 11_220_132)])
def test_resnet18_cifar_size(classes, count):
    m = models.resnet18_cifar(classes)
    assert sum(p.numel() for p in m.parameters()) == count
    assert m(torch.rand(2, 3, 32, 32)).shape == (2, classes)


def test_resnet18_cifar_matches_torchvision_with_the_authors_stem():
    tv = torchvision_or_skip("torchvision.models")
    ref = tv.resnet18(num_classes=10)
    ref.conv1 = torch.nn.Conv2d(3, 64, 3, padding=1, bias=False)
    ref.maxpool = torch.nn.Identity()
    ours = models.resnet18_cifar(10)
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
    assert [(n, b.shape) for n, b in ours.named_buffers()] == [(n, b.shape) for n, b in ref.named_buffers()]


# ----------------------------------------------------------------------------- CIFAR folders
@pytest.mark.parametrize("hundred", [False, True], ids=["cifar10", "cifar100"])
@pytest.mark.parametrize("point_at", ["root", "folder"])
def test_cifar_pickles_read_as_written(tmp_path, hundred, point_at):
    written = fake_cifar_pickles(tmp_path, hundred)
    root = tmp_path if point_at == "root" else next(tmp_path.iterdir())
    c = cifar.load_cifar(root)
    assert c.name == ("cifar100" if hundred else "cifar10") and c.num_classes == (100 if hundred else 10)
    assert torch.equal(c.split.x_train, written["train"][0]) and torch.equal(c.split.y_train, written["train"][1])
    assert torch.equal(c.split.x_test, written["test"][0]) and torch.equal(c.split.y_test, written["test"][1])
    assert c.mean == cifar.NORMALISATION[c.name][0]


def test_image_folder_layout(tmp_path):
    fake_image_folder(tmp_path, classes=("dog", "cat", "emu"))
    c = cifar.load_cifar(tmp_path)
    assert c.name == "imagefolder" and c.num_classes == 3
    assert c.split.x_train.shape == (9, 3, 32, 32) and c.split.x_train.dtype == torch.uint8
    assert c.split.y_train.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # sorted names: cat, dog, emu
    from PIL import Image

    first = torch.tensor(np.array(Image.open(tmp_path / "train" / "cat" / "0.png")))  # [32, 32, 3]
    assert torch.equal(c.split.x_train[0].permute(1, 2, 0), first)


def test_image_folder_matches_torchvision(tmp_path):
    datasets = torchvision_or_skip("torchvision.datasets")
    fake_image_folder(tmp_path, classes=("b", "a"))
    c = cifar.load_cifar(tmp_path)
    ref = datasets.ImageFolder(str(tmp_path / "train"))
    assert ref.classes == ["a", "b"] and [label for _, label in ref.samples] == c.split.y_train.tolist()


def test_image_folder_refuses_other_sizes(tmp_path):
    fake_image_folder(tmp_path, size=28)
    with pytest.raises(ValueError, match="28x28 image; the CIFAR recipe needs 32x32"):
        cifar.load_cifar(tmp_path)


def test_folder_without_cifar_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        cifar.find_cifar(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        cifar.find_cifar(tmp_path / "missing")


# ------------------------------------------------------------------------------ augmentation
def test_augment_is_a_padded_crop_or_its_mirror():
    g = torch.Generator().manual_seed(0)
    images = torch.arange(64 * 2 * 5 * 6, dtype=torch.float32).reshape(64, 2, 5, 6) + 1
    out = cifar.augment(images, g, padding=2)
    assert out.shape == images.shape
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    flips = 0
    for i in range(64):
        windows = [padded[i, :, r:r + 5, c:c + 6] for r in range(5) for c in range(5)]
        plain = any(torch.equal(out[i], w) for w in windows)
        mirrored = any(torch.equal(out[i], w.flip(-1)) for w in windows)
        assert plain or mirrored, i
        flips += mirrored and not plain
    assert 16 < flips < 48  # about half are mirrored
    again = cifar.augment(images, torch.Generator().manual_seed(0), padding=2)
    assert torch.equal(out, again)


def test_normalise_uses_the_given_statistics():
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = cifar.normalise(x, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    assert out[0, :, 0, 0].tolist() == [2.0, 1.0, 0.5]
