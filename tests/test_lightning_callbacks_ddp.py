"""`LastCheckpoint` and `ResumeRandomState` under DDP: two forked gloo ranks train a tiny Lightning module, one rank is
signalled, and both must stop together and resume each with its own random state."""

import json
import multiprocessing
import os
import signal
import socket
from datetime import timedelta

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

from s2ft.lightning.callbacks import AtomicCheckpointIO, LastCheckpoint, ResumeRandomState
from s2ft.lightning.checkpoint import read_checkpoint


class Tiny(L.LightningModule):
    """A linear layer whose training step draws random numbers as dropout does; rank 1 draws more (its batches would
    be padded to another length), so the ranks' generators part after the first step."""

    def __init__(self, signals: dict):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.signals, self.draws = signals, []

    def _signal(self, where: str) -> None:
        if self.signals.get(where) == [self.global_rank, self.trainer.global_step]:
            os.kill(os.getpid(), signal.SIGTERM)

    def training_step(self, batch, batch_idx):
        self._signal("training_step")
        torch.rand(self.global_rank + 1)
        self.draws.append([self.trainer.global_step + 1, torch.rand(()).item()])
        return self.layer(batch[0]).pow(2).mean()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self._signal("batch_end")

    def validation_step(self, batch, batch_idx):
        self._signal("validation")
        return self.layer(batch[0]).pow(2).mean()

    def on_save_checkpoint(self, checkpoint):
        self._signal("save")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _rank(rank: int, port: int, out, signals: dict, resume: bool, max_steps: int) -> None:
    # The variables torchrun sets: Lightning then joins the world these two processes make instead of launching one.
    env = {"RANK": rank, "LOCAL_RANK": rank, "GROUP_RANK": 0, "WORLD_SIZE": 2, "LOCAL_WORLD_SIZE": 2}
    os.environ.update({k: str(v) for k, v in env.items()}, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    L.seed_everything(0, verbose=False)
    module = Tiny(signals)
    data = TensorDataset(torch.randn(64, 2))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60)),
        max_steps=max_steps,
        val_check_interval=4,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        callbacks=[ResumeRandomState(), LastCheckpoint(out / "checkpoints" / "last.ckpt", every_n_steps=2)],
        plugins=[AtomicCheckpointIO()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    try:
        ckpt = out / "checkpoints" / "last.ckpt" if resume else None
        trainer.fit(module, DataLoader(data, batch_size=2), DataLoader(data, batch_size=2), ckpt_path=ckpt)
        outcome = "finished"
    except BaseException as err:
        outcome = type(err).__name__
    record = {"outcome": outcome, "step": trainer.global_step, "draws": module.draws}
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    os._exit(0)


def train_two_ranks(out, signals: dict | None = None, resume: bool = False, max_steps: int = 6) -> list[dict]:
    """Each rank's outcome (the exception that ended fit, or "finished"), last step and draws (step, number), or the
    exit code of a rank that wrote none."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = multiprocessing.get_context("fork")
    args = (port, out, signals or {}, resume, max_steps)
    ranks = [context.Process(target=_rank, args=(rank, *args)) for rank in range(2)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(90)
    hung = [process.pid for process in ranks if process.is_alive()]
    for process in ranks:
        process.kill()
    assert not hung, f"ranks {hung} never ended: they waited on each other"
    files = [out / f"rank{rank}.json" for rank in range(2)]  # none from a rank killed by its signal
    return [
        json.loads(f.read_text()) if f.is_file() else {"exitcode": p.exitcode}
        for f, p in zip(files, ranks, strict=True)
    ]


def test_each_rank_resumes_its_own_random_state(tmp_path):
    full = train_two_ranks(tmp_path / "full")
    stopped = train_two_ranks(tmp_path / "resumed", {"batch_end": [0, 2]})  # rank 0 only, after step 2
    assert [(r["outcome"], r["step"]) for r in stopped] == [("RunInterrupted", 3)] * 2
    resumed = train_two_ranks(tmp_path / "resumed", resume=True)
    assert [r["outcome"] for r in resumed] == ["finished"] * 2
    for rank in range(2):
        assert [step for step, _ in resumed[rank]["draws"]] == [4, 5, 6]
        assert resumed[rank]["draws"] == full[rank]["draws"][3:], f"rank {rank}"


def test_a_signal_to_one_rank_in_the_last_validation_stops_every_rank(tmp_path):
    """The ranks agreed after the last step that none was signalled; rank 1 is signalled in the validation after it."""
    ranks = train_two_ranks(tmp_path, {"validation": [1, 4]}, max_steps=4)
    assert [(r["outcome"], r["step"]) for r in ranks] == [("RunInterrupted", 4)] * 2


def test_a_signal_to_one_rank_during_a_save_stops_every_rank_after_the_same_step(tmp_path):
    ranks = train_two_ranks(tmp_path, {"save": [1, 2]})  # the save after step 2 (checkpoint_every_n_steps=2)
    assert [(r["outcome"], r["step"]) for r in ranks] == [("RunInterrupted", 3)] * 2


def test_a_second_sigterm_to_one_rank_ends_it_at_once_and_keeps_the_last_checkpoint(tmp_path):
    """Lightning's handler, which the first signal gave the second, made every rank fail at the collectives' timeout."""
    ranks = train_two_ranks(tmp_path, {"batch_end": [1, 2], "training_step": [1, 2]})  # after step 2, in step 3
    assert ranks[1] == {"exitcode": -signal.SIGTERM}
    assert ranks[0]["outcome"] != "finished" and ranks[0]["step"] == 2
    assert read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 2  # checkpoint_every_n_steps=2
