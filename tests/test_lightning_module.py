"""FineTuneModule: optimizer over trainable parameters only, the lr schedule, and trainable-only checkpoint keys."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from s2ft.lightning.module import FineTuneModule, lr_lambda
from s2ft.models import tiny_model


def test_linear_and_cosine_schedules_with_warmup():
    linear, cosine = lr_lambda(4, 14, "linear"), lr_lambda(4, 14, "cosine")
    assert [linear(s) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert [linear(s) for s in (4, 9, 14, 20)] == [1.0, 0.5, 0.0, 0.0]
    assert cosine(4) == 1.0 and cosine(9) == pytest.approx(0.5) and cosine(14) == pytest.approx(0.0)
    assert cosine(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    with pytest.raises(ValueError, match="scheduler must be 'linear' or 'cosine'"):
        FineTuneModule(torch.nn.Linear(2, 2), lr=1e-3, scheduler="step")


def test_optimizer_and_checkpoint_cover_only_trainable_tensors():
    model = tiny_model("llama", vocab_size=64)
    model.requires_grad_(False)
    trained = model.model.layers[1].mlp.down_proj
    trained.weight.requires_grad_(True)
    trained.register_buffer("mask", torch.ones(3))
    module = FineTuneModule(model, lr=1e-3)
    assert module.trained_keys() == {
        "model.model.layers.1.mlp.down_proj.weight",
        "model.model.layers.1.mlp.down_proj.mask",
    }

    class FakeTrainer:
        estimated_stepping_batches = 10
        world_size = 1

    module.trainer = FakeTrainer()
    optimizer = module.configure_optimizers()["optimizer"]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(params) == 1 and params[0] is trained.weight

    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == module.trained_keys()
    with pytest.raises(RuntimeError, match="lacks 1 trained tensors"):
        module.on_load_checkpoint({"state_dict": {"model.model.layers.1.mlp.down_proj.mask": torch.ones(3)}})


def test_training_starts_in_train_mode():
    model = tiny_model("llama", vocab_size=64).eval()  # from_pretrained returns eval-mode models
    FineTuneModule(model, lr=1e-3)
    assert all(m.training for m in model.modules())


def test_no_trainable_parameters_is_a_clear_error():
    model = tiny_model("llama", vocab_size=64).requires_grad_(False)
    module = FineTuneModule(model, lr=1e-3)
    with pytest.raises(ValueError, match="no trainable parameters"):
        module.configure_optimizers()


def _padded(chunk: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A right-padded batch of (input_ids, labels) items."""
    width = max(len(ids) for ids, _ in chunk)
    return {
        "input_ids": torch.stack([F.pad(ids, (0, width - len(ids))) for ids, _ in chunk]),
        "attention_mask": torch.stack([(torch.arange(width) < len(ids)).long() for ids, _ in chunk]),
        "labels": torch.stack([F.pad(labels, (0, width - len(labels)), value=-100) for _, labels in chunk]),
    }


def test_validation_loss_is_the_mean_over_tokens_whatever_the_batch_size():
    """It was the mean of per-batch means weighted by items: the same items of unequal lengths gave another val/loss
    at each batch size."""
    model = tiny_model("llama", vocab_size=64)
    generator = torch.Generator().manual_seed(0)
    items = []
    for length in (3, 9, 5, 14, 4, 11):
        ids = torch.randint(0, 64, (length,), generator=generator)
        labels = ids.clone()
        labels[: length // 3] = -100  # the prompt
        items.append((ids, labels))
    with torch.no_grad():
        total, count = 0.0, 0
        for ids, labels in items:
            logits, mask = model(input_ids=ids[None]).logits[0, :-1].double(), labels[1:] != -100
            total += F.cross_entropy(logits[mask], labels[1:][mask], reduction="sum").item()
            count += int(mask.sum())
    found = []
    for size in (1, 2, 6):
        batches = [_padded(items[start : start + size]) for start in range(0, len(items), size)]
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        loader = DataLoader(batches, batch_size=None)  # the batches as they are
        found.append(trainer.validate(FineTuneModule(model, lr=1e-3), loader, verbose=False)[0]["val/loss"])
    assert found == pytest.approx([total / count] * 3, rel=1e-5)
