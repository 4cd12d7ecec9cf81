"""KOALA-M in a LightningModule, with automatic or manual optimization (made data).

    pip install "koala-triton[examples]"
    python -m koala_triton.examples.lightning_module [--epochs 3] [--manual]

Automatic optimization: ``training_step`` hands the per-sample losses to the optimizer
(``self.optimizers().observe(losses)``) and returns their mean; ``KoalaCallback`` predicts at
the start of each batch. Manual optimization: predict, backward, ``step(loss=losses)``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from koala_triton import KoalaM


def build(manual: bool):
    import lightning

    class Classifier(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))
            self.automatic_optimization = not manual
            self.last_loss = float("nan")

        def configure_optimizers(self):
            return KoalaM(self.parameters())

        def training_step(self, batch, batch_idx):
            x, y = batch
            opt = self.optimizers()
            if manual:
                opt.predict()  # before the forward pass
            losses = F.cross_entropy(self.net(x), y, reduction="none")  # per-sample losses [B]
            self.last_loss = float(losses.detach().mean())
            if not manual:
                opt.observe(losses.detach())
                return losses.mean()
            opt.zero_grad()
            self.manual_backward(losses.mean())
            opt.step(loss=losses.detach())

    return Classifier()


def main(argv: list[str] | None = None) -> float:
    import lightning

    from koala_triton.integrations.lightning import KoalaCallback

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--manual", action="store_true")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    x = torch.randn(1024, 6)
    y = (x[:, 0] * x[:, 1] > 0).long()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True)
    module = build(args.manual)
    trainer = lightning.Trainer(max_epochs=args.epochs, accelerator="auto", devices=1, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                callbacks=[KoalaCallback()])
    trainer.fit(module, data)
    print(f"KOALA-M in Lightning ({'manual' if args.manual else 'automatic'} optimization): "
          f"{trainer.global_step} steps, last batch loss {module.last_loss:.4f}")
    return module.last_loss


if __name__ == "__main__":
    main()
