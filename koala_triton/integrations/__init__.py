"""Adapters for training frameworks: ``huggingface`` (transformers' Trainer) and ``lightning``.

Each module imports its framework when it is imported, never before: ``import koala_triton``
does not need them. What they build on is in the optimizer itself and works with any loop
that calls ``step()`` or ``step(closure)`` on its own:

- ``observe(per_sample_losses)`` hands the losses of the coming update over where they are
  computed (the framework's later ``step()`` uses them);
- ``predict()`` is idempotent within an iteration, and ``train()`` is ``predict()`` (for
  frameworks that call ``optimizer.train()`` before each training forward pass);
- ``GradScaler.step(opt)`` is supported (``_step_supports_amp_scaling``).
"""
