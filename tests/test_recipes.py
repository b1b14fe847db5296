"""The fine-tuning recipe people run: Hugging Face ``Trainer`` with ``bf16`` and
``gradient_checkpointing``, on a converted GPT-2 and a peft LoRA Llama (CPU, a few steps).

For every combination: training finishes with a finite loss, DropIT runs (``dc.report`` counts
calls), and at gamma = 0 the first step's gradients equal the unconverted model's under the same
recipe, bit for bit."""

import copy

import pytest
import torch

import dropit_cuda as dc
from benchmarks.zoo import ZOO

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Trainer needs it
pytest.importorskip("peft")

MODELS = {m.name: m for m in ZOO if m.name in ("gpt2", "llama_lora")}
STEPS = 3


class _Tokens(torch.utils.data.Dataset):
    """Fixed random token sequences, labels = inputs (causal LM loss)."""

    def __init__(self, n: int = 8, length: int = 16, vocab: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class _FirstGrads(transformers.TrainerCallback):
    """Keeps a copy of every gradient just before the first optimizer step."""

    def __init__(self) -> None:
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _train(model: torch.nn.Module, tmp_path, bf16: bool, checkpointing: bool, steps: int) -> tuple:
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-3,
        bf16=bf16, gradient_checkpointing=checkpointing, use_cpu=True, report_to=[], save_strategy="no",
        logging_steps=1, max_grad_norm=0.0, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    first = _FirstGrads()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=[first])
    result = trainer.train()
    return result.training_loss, first.grads


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no_ckpt", "ckpt"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(MODELS))
def test_trainer_recipe(name, bf16, checkpointing, tmp_path):
    torch.manual_seed(0)
    base = MODELS[name].build()
    assert base.training

    # DropIT at work: finite loss over a few steps, products cached through DropIT
    model = dc.convert(copy.deepcopy(base), gamma=0.9)
    loss, _ = _train(model, tmp_path / "g09", bf16, checkpointing, STEPS)
    assert torch.isfinite(torch.tensor(loss))
    report = dc.report(model)
    assert sum(row.calls for row in report.layers) > 0, str(report)

    # gamma = 0: the first step's gradients are the plain model's under the same recipe
    _, want = _train(copy.deepcopy(base), tmp_path / "plain", bf16, checkpointing, 1)
    _, got = _train(dc.convert(copy.deepcopy(base), gamma=0.0), tmp_path / "g0", bf16, checkpointing, 1)
    assert want and got.keys() == want.keys()
    differ = [n for n in want if not torch.equal(got[n], want[n])]
    assert not differ, f"gradients differ from the plain model's at gamma = 0: {differ}"
