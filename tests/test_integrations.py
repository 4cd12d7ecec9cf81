"""KOALA inside the training stacks people use: the Hugging Face Trainer and PyTorch Lightning
(automatic and manual optimization). Tiny models built from configs with random weights,
random data, CPU: nothing is downloaded. Each run is checked for what goes wrong silently
when the glue is wrong: exactly one time update and one measurement update per optimization
step (counted at the optimizer), the framework's own step counter advancing, and the loss
falling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from koala_triton import KoalaM
from tests.variants import class_params


def _count_time_updates(opt) -> list[int]:
    """Wraps the optimizer's time update: the returned list holds the number of real predicts."""
    calls = [0]
    original = opt._predict

    def counted():
        calls[0] += 1
        original()

    opt._predict = counted
    return calls


# ------------------------------------------------------------------ Hugging Face
transformers = pytest.importorskip("transformers", reason="the examples extra (transformers) is not installed")


def _classification_data(n=96, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 30, (n, 8), generator=gen)
    labels = ids[:, 0] % 3  # learnable from the first token
    return [{"input_ids": i, "attention_mask": torch.ones(8, dtype=torch.long), "labels": y}
            for i, y in zip(ids, labels)]


@pytest.mark.parametrize("cls", class_params(by_id=True))
@pytest.mark.parametrize("accumulation", [1, 2])
def test_hugging_face_trainer_steps_exactly_like_the_readme_loop(cls, accumulation, tmp_path):
    """KoalaTrainer's 8 optimizer steps are the README loop's on the same micro-batches (those
    the Trainer drew, recorded): predict once per step, per-sample losses, the mean's
    gradient averaged over the accumulated micro-batches, one update with all their losses.
    Same model and arithmetic: weights equal to float32 round-off (the Trainer's backward
    divides the loss by the accumulation steps first). No gradient clipping
    (``max_grad_norm=0``): clipping changes KOALA's step, whose size already adapts."""
    import copy

    from koala_triton.integrations.huggingface import KoalaTrainer, per_sample_loss

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertForSequenceClassification(config)
    twin = copy.deepcopy(model)
    opt = cls(model.parameters())
    predicts = _count_time_updates(opt)
    seen: list[dict] = []

    class Recording(KoalaTrainer):
        def compute_loss(self, model, inputs, **kwargs):
            if model.training:
                seen.append({k: v.clone() for k, v in inputs.items()})
            return super().compute_loss(model, inputs, **kwargs)

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16 // accumulation,
        gradient_accumulation_steps=accumulation, max_steps=8, report_to=[], save_strategy="no",
        use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0, max_grad_norm=0.0,
        lr_scheduler_type="constant")
    trainer = Recording(model=model, args=args, train_dataset=_classification_data(), optimizers=(opt, None))
    trainer.train()
    steps = trainer.state.global_step
    assert steps == 8 and len(seen) == 8 * accumulation
    assert predicts[0] == steps, f"{predicts[0]} time updates for {steps} optimizer steps"
    assert int(opt.filter_state["step"]) == steps and int(opt.filter_state["skipped_steps"]) == 0

    ref = cls(twin.parameters())
    twin.train()
    for step in range(steps):
        ref.predict()
        ref.zero_grad()
        losses = []
        for batch in seen[step * accumulation:(step + 1) * accumulation]:
            batch = dict(batch)
            labels = batch.pop("labels")
            per_sample = per_sample_loss(twin(**batch).logits, labels, causal_lm=False)
            (per_sample.mean() / accumulation).backward()
            losses.append(per_sample.detach())
        ref.step(loss=torch.cat(losses))
    for (name, a), b in zip(twin.named_parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_hugging_face_per_sample_losses_of_a_causal_language_model(tmp_path):
    """[B, T, V] logits: per-sequence mean token cross-entropy, predicting token t + 1."""
    from koala_triton.integrations.huggingface import KoalaTrainer, per_sample_loss

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=20, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 20, (4, 10))
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(input_ids=ids)
    per_sample = per_sample_loss(out.logits, labels, causal_lm=True)
    reference = model(input_ids=ids[1:2], labels=labels[1:2]).loss  # HF's own shifted mean, one sequence
    torch.testing.assert_close(per_sample[1], reference, rtol=1e-5, atol=1e-6)
    gen = torch.Generator().manual_seed(1)
    data = [{"input_ids": row, "labels": row} for row in torch.randint(0, 20, (32, 10), generator=gen)]
    opt = KoalaM(model.parameters())
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=3,
                                          report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    KoalaTrainer(model=model, args=args, train_dataset=data, optimizers=(opt, None)).train()
    assert int(opt.filter_state["step"]) == 3


def test_koala_trainer_refuses_another_optimizer(tmp_path):
    from koala_triton.integrations.huggingface import KoalaTrainer

    model = torch.nn.Linear(2, 2)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(TypeError, match="KOALA optimizer"):
        KoalaTrainer(model=model, args=args, optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))


# ------------------------------------------------------------------ Lightning
def _lightning():
    return pytest.importorskip("lightning", reason="the examples extra (lightning) is not installed")


def _loader(n=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen)
    y = (x[:, 0] > x[:, 1]).long()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


def _module(lightning, cls, manual, record: list):
    """manual: False (automatic optimization), True (step(loss=...)), or "closure"
    (step(closure=lambda: losses): the closure returns the per-sample losses)."""
    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
            self.automatic_optimization = not manual

        def configure_optimizers(self):
            opt = cls(self.parameters())
            self.koala = opt
            self.predicts = _count_time_updates(opt)
            return opt

        def training_step(self, batch, batch_idx):
            x, y = batch
            if manual:
                opt = self.optimizers()
                opt.predict()
            losses = F.cross_entropy(self.net(x), y, reduction="none")
            record.append(float(losses.detach().mean()))
            if not manual:
                self.optimizers().observe(losses.detach())
                return losses.mean()
            opt.zero_grad()
            self.manual_backward(losses.mean())
            if manual == "closure":
                opt.step(closure=lambda: losses.detach())
            else:
                opt.step(loss=losses.detach())

    return Module()


@pytest.mark.parametrize("cls", class_params(by_id=True))
@pytest.mark.parametrize("manual", [False, True, "closure"], ids=["automatic", "manual", "manual-closure"])
def test_lightning_takes_one_predict_and_one_update_per_step(cls, manual):
    lightning = _lightning()
    from koala_triton.integrations.lightning import KoalaCallback

    record: list[float] = []
    module = _module(lightning, cls, manual, record)
    trainer = lightning.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, callbacks=[KoalaCallback()])
    trainer.fit(module, _loader())
    batches = 3 * 8
    assert trainer.global_step == batches
    assert module.predicts[0] == batches, f"{module.predicts[0]} time updates for {batches} steps"
    assert int(module.koala.filter_state["step"]) == batches
    assert sum(record[-4:]) < sum(record[:4]), record


def test_lightning_gradient_accumulation_predicts_once_per_update():
    lightning = _lightning()
    from koala_triton.integrations.lightning import KoalaCallback

    record: list[float] = []
    module = _module(lightning, KoalaM, False, record)
    trainer = lightning.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False,
                                accumulate_grad_batches=2, callbacks=[KoalaCallback()])
    trainer.fit(module, _loader())
    assert int(module.koala.filter_state["step"]) == 4 == module.predicts[0]
