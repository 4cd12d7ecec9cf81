"""A runnable demo: train a small classifier with KoalaM and print the loss falling.

    python -m koala_triton.demo [--steps 300] [--variant M|V] [--device cpu|cuda]

The data are made here (nothing is downloaded): Gaussian inputs [4096, 16] labelled into
8 classes by a fixed random "teacher" map; the student is a 16-64-8 ReLU MLP. KOALA needs the per-sample losses, so the loss uses ``reduction="none"``.
"""

from __future__ import annotations

import argparse
import torch
import torch.nn.functional as F

from . import KoalaM, KoalaV


def teacher_data(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs [n, 16] ~ N(0, 1) and labels [n] in 0..7 from a fixed nonlinear teacher."""
    x = torch.randn(n, 16, generator=generator)
    w = torch.randn(16, 8, generator=generator)
    z = x @ w
    return x, (z + 0.5 * torch.tanh(z)).argmax(1)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--variant", choices=["M", "V"], default="M")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    x, y = teacher_data(4096, gen)
    x, y = x.to(args.device), y.to(args.device)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)
    ).to(args.device)
    opt = (KoalaM if args.variant == "M" else KoalaV)(model.parameters())
    print(f"KOALA-{args.variant} on a teacher-labelled task, {sum(p.numel() for p in model.parameters())} parameters, "
          f"{'Triton' if opt.uses_triton else 'PyTorch'} path on {args.device}")

    def full_loss() -> float:
        with torch.no_grad():
            return F.cross_entropy(model(x), y).item()

    first = full_loss()
    print(f"step {0:5d}  loss {first:.4f}")
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, x.shape[0], (args.batch,), generator=gen).to(args.device)
        opt.predict()  # KOALA's time update, before the forward pass
        losses = F.cross_entropy(model(x[idx]), y[idx], reduction="none")
        opt.zero_grad()
        losses.mean().backward()
        opt.step(loss=losses)  # measurement update with the per-sample losses
        if step % max(args.steps // 10, 1) == 0:
            print(f"step {step:5d}  loss {full_loss():.4f}")
    last = full_loss()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    print(f"loss {first:.4f} -> {last:.4f}, accuracy {accuracy:.1%}")
    return last


if __name__ == "__main__":
    main()
