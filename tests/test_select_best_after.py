"""trainer.select_best_after: validations before that fraction of training are logged but never selected."""

import pytest
import torch
from conftest import smoke_config

from s2ft.lightning import FineTuneModule, run_experiment

# The fake validation loss of each validated step (every 2 of 8): the lowest, at step 2, lies in the first half.
FAKE_LOSS = {2: 0.01, 4: 0.5, 6: 0.3, 8: 0.4}


@pytest.fixture
def fake_val_loss(monkeypatch):
    def validation_step(self, batch, batch_idx):
        loss = torch.tensor(FAKE_LOSS[self.trainer.global_step])
        self.log("val/loss", loss, batch_size=batch["input_ids"].shape[0])
        return loss

    monkeypatch.setattr(FineTuneModule, "validation_step", validation_step)


@pytest.mark.parametrize(("after", "best"), [(0.0, 0.01), (0.5, 0.3)])
def test_only_the_second_half_is_selected_from(after, best, tmp_path, fake_val_loss):
    overrides = ["trainer.max_steps=8", "trainer.select_best=val_loss", f"+trainer.select_best_after={after}"]
    summary = run_experiment(smoke_config(*overrides), tmp_path / "run")
    assert [step for step, _ in summary["train"]["val_curve"]] == [2, 4, 6, 8]
    assert summary["train"]["best_val_loss"] == pytest.approx(best)


def test_a_fraction_outside_training_is_a_config_error(tmp_path):
    from s2ft.run_config import RunConfigError

    with pytest.raises(RunConfigError, match=r"trainer.select_best_after must be a fraction of training in \[0, 1\)"):
        run_experiment(smoke_config("+trainer.select_best_after=1.5"), tmp_path / "run")
    with pytest.raises(RunConfigError, match=r"method.betas must be AdamW's \[beta1, beta2\]"):
        run_experiment(smoke_config("+method.betas=[0.9]"), tmp_path / "run")
