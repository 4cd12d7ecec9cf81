"""Runnable examples: ``python -m koala_triton.examples.<name>``.

- ``plain_loop``: the README loop, with mixed precision (autocast + GradScaler) as an option.
- ``huggingface_trainer``: a tiny BERT classifier trained with ``KoalaTrainer`` (needs the
  ``examples`` extra: ``pip install "koala-triton[examples]"``).
- ``lightning_module``: a LightningModule with automatic or manual optimization (``examples``).
- ``ddp``: data-parallel training under ``torchrun`` with DDP or FSDP2 (``--fsdp``), the
  README loop unchanged: ``torchrun --standalone --nproc_per_node=2 -m koala_triton.examples.ddp``.

Each builds its model from code with random weights and makes its own data: nothing is
downloaded. Each ``main(argv)`` returns the final training loss (the tests run them briefly).
"""
