"""The runnable examples under ``koala_triton/examples`` run (briefly) and train."""

from __future__ import annotations

import math

import pytest


@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_plain_loop_example(amp, capsys):
    from koala_triton.examples import plain_loop

    loss = plain_loop.main(["--steps", "60", "--amp", amp, "--device", "cpu"])
    assert math.isfinite(loss) and loss < 0.5


def test_huggingface_trainer_example():
    pytest.importorskip("transformers", reason="the examples extra is not installed")
    from koala_triton.examples import huggingface_trainer

    assert math.isfinite(huggingface_trainer.main(["--steps", "6", "--accumulation", "2"]))


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_lightning_example(manual):
    pytest.importorskip("lightning", reason="the examples extra is not installed")
    from koala_triton.examples import lightning_module

    assert math.isfinite(lightning_module.main(["--epochs", "1"] + (["--manual"] if manual else [])))
