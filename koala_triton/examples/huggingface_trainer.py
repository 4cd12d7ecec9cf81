"""KOALA-M with the Hugging Face Trainer, on a tiny BERT classifier (random weights, made data).

    pip install "koala-triton[examples]"
    python -m koala_triton.examples.huggingface_trainer [--steps 60] [--accumulation 1]

``KoalaTrainer`` is a ``transformers.Trainer`` that hands KOALA the per-sample losses and
predicts before each step's first forward pass (``koala_triton/integrations/huggingface.py``).
``max_grad_norm=0`` turns off the Trainer's default gradient clipping: KOALA's step already
adapts its size, and clipping would change it.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from koala_triton import KoalaM


def make_data(n: int = 512, seed: int = 0) -> list[dict]:
    """Token sequences labelled by their first token (mod 3): learnable, and made here."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 30, (n, 8), generator=gen)
    return [{"input_ids": i, "attention_mask": torch.ones(8, dtype=torch.long), "labels": i[0] % 3} for i in ids]


def main(argv: list[str] | None = None) -> float:
    import transformers

    from koala_triton.integrations.huggingface import KoalaTrainer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--accumulation", type=int, default=1)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16, num_labels=3)
    model = transformers.BertForSequenceClassification(config)
    opt = KoalaM(model.parameters())
    with tempfile.TemporaryDirectory() as out:
        training = transformers.TrainingArguments(
            output_dir=out, per_device_train_batch_size=32 // args.accumulation,
            gradient_accumulation_steps=args.accumulation, max_steps=args.steps, max_grad_norm=0.0,
            lr_scheduler_type="constant", logging_steps=max(args.steps // 5, 1), report_to=[],
            save_strategy="no", disable_tqdm=True, use_cpu=not torch.cuda.is_available(), seed=0)
        trainer = KoalaTrainer(model=model, args=training, train_dataset=make_data(), optimizers=(opt, None))
        result = trainer.train()
    print(f"KOALA-M through the Trainer: {trainer.state.global_step} steps, "
          f"{int(opt.filter_state['step'])} KOALA updates, training loss {result.training_loss:.4f}")
    return float(result.training_loss)


if __name__ == "__main__":
    main()
