"""The README loop on a small regression task, optionally with mixed precision.

    python -m koala_triton.examples.plain_loop [--steps 200] [--amp bf16|fp16] [--variant M|V]

``--amp fp16`` runs the forward pass under ``torch.autocast`` and scales the loss with a
``torch.amp.GradScaler``; ``scaler.step(opt, loss=losses)`` hands KOALA the per-sample losses
(the optimizer unscales the gradients inside its own passes and skips, on the device, a step
whose gradients overflowed). ``--amp bf16`` needs no scaler.
"""

from __future__ import annotations

import argparse

import torch

from koala_triton import KoalaM, KoalaV


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--variant", choices=["M", "V"], default="M")
    parser.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    x = torch.randn(2048, 8, device=args.device)
    y = torch.sin(x[:, :1]) + 0.5 * x[:, 1:2] * x[:, 2:3]
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).to(args.device)
    opt = (KoalaM if args.variant == "M" else KoalaV)(model.parameters())
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    scaler = torch.amp.GradScaler(args.device) if args.amp == "fp16" else None
    loss = float("nan")
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, x.shape[0], (128,), device=args.device)
        opt.predict()  # the time update, before the forward pass
        with torch.autocast(args.device, dtype=dtype, enabled=dtype is not None):
            losses = ((model(x[idx]) - y[idx]) ** 2).squeeze(1).float()  # per-sample losses [B]
        opt.zero_grad()
        if scaler is None:
            losses.mean().backward()
            opt.step(loss=losses.detach())
        else:
            scaler.scale(losses.mean()).backward()
            scaler.step(opt, loss=losses.detach())
            scaler.update()
        loss = float(losses.detach().mean())
        if step % max(args.steps // 5, 1) == 0:
            print(f"step {step:4d}  loss {loss:.4f}")
    print(f"skipped steps (non-finite or overflowed gradients): {int(opt.filter_state['skipped_steps'])}")
    return loss


if __name__ == "__main__":
    main()
