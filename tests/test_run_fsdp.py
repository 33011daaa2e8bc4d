"""`trainer.strategy=fsdp`: FSDP2 on 2 gloo CPU processes trains what one process trains on the same global batch.

Each FSDP rank takes batches of 2 (the sampler deals the shuffled items out by rank), the single process batches of
4: the same items every step. The FSDP jobs run in one torchrun launch (tests/fsdp_worker.py), the references here.
"""

import csv
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from fsdp_common import SELECT_BEST, job_config
from peft import PeftModel
from safetensors.torch import load_file

import s2ft
from s2ft.lightning import run_experiment
from s2ft.models import build_model

LOSS_TOLERANCE = 1e-5


def launch(out_dir: Path, steps: int, *jobs: str) -> float:
    """Run the FSDP jobs on 2 processes; returns the launch's wall seconds."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += [str(ROOT / "tests" / "fsdp_worker.py"), str(out_dir), str(steps), *jobs]
    # The worker must import this checkout's s2ft, not the editable install's.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return time.perf_counter() - start


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every training step in metrics.csv (a resumed run's file holds its earlier sessions' too)."""
    with (run_dir / "metrics.csv").open(newline="") as handle:
        return [(int(row["step"]), float(row["train/loss"])) for row in csv.DictReader(handle) if row["train/loss"]]


def checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    return {f"{f.name}:{key}": value for f in files for key, value in load_file(f).items()}


def json_config(path: Path) -> dict:
    """A saved JSON config; PEFT keeps `target_modules` as a set and writes it in the process's hash order. An S2FT
    config's weights checksum is left out: the values are compared within the tolerance above, not bit for bit."""
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    config.pop("weights_sha256", None)
    return config


def state_bytes(ckpt: dict) -> int:
    """Bytes of the tensors a checkpoint must hold: the trained tensors and their optimizer state."""
    optimizer = [v for state in ckpt["optimizer_states"][0]["state"].values() for v in state.values()]
    return sum(t.numel() * t.element_size() for t in [*ckpt["state_dict"].values(), *optimizer] if torch.is_tensor(t))


def assert_same_training(method: str, fsdp_dir: Path, single_dir: Path, steps: int) -> None:
    fsdp, single = summary(fsdp_dir), summary(single_dir)
    assert fsdp["fsdp"]["world_size"] == 2 and "fsdp" not in single
    curve, reference = train_losses(fsdp_dir), train_losses(single_dir)
    assert [s for s, _ in curve] == [s for s, _ in reference] == list(range(steps))
    gaps = [abs(a - b) for (_, a), (_, b) in zip(curve, reference, strict=True)]
    assert max(gaps) <= LOSS_TOLERANCE, (method, gaps)
    assert reference[-1][1] < reference[0][1] - 0.05, "the runs must learn for the comparison to mean anything"

    # The optimizers held shards of the trainable tensors only: a frozen weight would push the sum past the count.
    shards, trainable = fsdp["fsdp"]["optimizer_elements"], single["trainable_params"]
    assert fsdp["trainable_params"] == trainable and sum(shards) == trainable and max(shards) < trainable, shards

    # The checkpoint holds what a single-process one holds: the trained tensors and their optimizer state.
    ckpt, single_ckpt = checkpoint(fsdp_dir), checkpoint(single_dir)
    assert ckpt["global_step"] == steps and sorted(ckpt["state_dict"]) == sorted(single_ckpt["state_dict"])
    moments = sorted(tuple(v.shape) for s in ckpt["optimizer_states"][0]["state"].values() for v in s.values())
    expected = sorted(tuple(v.shape) for s in single_ckpt["optimizer_states"][0]["state"].values() for v in s.values())
    assert moments == expected
    size, single_size = ((d / "checkpoints" / "last.ckpt").stat().st_size for d in (fsdp_dir, single_dir))
    # Besides them only a fixed overhead: each rank's random state (torch and Python generators, for an exact resume).
    overhead, single_overhead = (len(pickle.dumps(c["random_state"])) for c in (ckpt, single_ckpt))
    assert len(ckpt["random_state"]["ranks"]) == 2 and "ranks" not in single_ckpt["random_state"]
    assert size <= 1.05 * state_bytes(single_ckpt) + overhead, (size, single_size)
    assert size <= 1.05 * single_size + overhead - single_overhead, (size, single_size)

    # The saved weights: the same files, config and values as the single process's.
    saved, single_saved = tensors(fsdp_dir / "adapter"), tensors(single_dir / "adapter")
    assert sorted(saved) == sorted(single_saved)
    for key, value in saved.items():
        torch.testing.assert_close(value, single_saved[key], rtol=0, atol=LOSS_TOLERANCE, msg=key)
    configs = sorted(path.name for path in (single_dir / "adapter").glob("*.json"))
    assert configs == sorted(path.name for path in (fsdp_dir / "adapter").glob("*.json"))
    for name in configs:
        fsdp_config, single_config = (json_config(d / "adapter" / name) for d in (fsdp_dir, single_dir))
        assert fsdp_config == single_config, name


def assert_adapter_loads(method: str, fsdp_dir: Path, single_dir: Path) -> None:
    """The FSDP run's adapter applies to an unsharded base and gives the single-process adapter's outputs."""
    batch = torch.randint(1, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = []
    for run_dir in (fsdp_dir, single_dir):
        base, _ = build_model("tiny_llama")
        model = s2ft.load_adapter(base, run_dir / "adapter") if method == "s2ft" else None
        model = PeftModel.from_pretrained(base, run_dir / "adapter") if method == "lora" else model
        assert model is not None
        with torch.no_grad():
            logits.append(model.eval()(input_ids=batch).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=1e-4)
    assert not torch.allclose(logits[0], build_model("tiny_llama")[0].eval()(input_ids=batch).logits, atol=1e-3)


def test_fsdp_resumed_run_equals_single_process(tmp_path):
    """Fast: S2FT, 6 steps, stopped by SIGTERM after step 3 and resumed, against one uninterrupted process."""
    wall = launch(tmp_path, 6, "s2ft:resume")
    single = tmp_path / "single"
    run_experiment(job_config("s2ft", 6, sharded=False), single)
    assert_same_training("s2ft", tmp_path / "s2ft_resumed", single, steps=6)
    assert_adapter_loads("s2ft", tmp_path / "s2ft_resumed", single)
    print(f"FSDP launch (SIGTERM + resume): {wall:.1f} s")


def assert_same_selection(fsdp_dir: Path, single_dir: Path) -> None:
    """trainer.select_best: the same best validation loss and weights, kept whole in the checkpoint."""
    fsdp, single = summary(fsdp_dir), summary(single_dir)
    curves = [[loss for _, loss in run["train"]["val_curve"]] for run in (fsdp, single)]
    assert len(curves[1]) == 5 and curves[0].index(min(curves[0])) == curves[1].index(min(curves[1]))
    # The validation loss is a mean of batch means, and validation batches are 2 items per rank against 4 here.
    assert abs(fsdp["train"]["best_val_loss"] - single["train"]["best_val_loss"]) <= 1e-4
    kept = [checkpoint(d)["callbacks"]["KeepBest"]["best_state"] for d in (fsdp_dir, single_dir)]
    assert kept[0].keys() == kept[1].keys()
    for key, value in kept[0].items():
        torch.testing.assert_close(value, kept[1][key], rtol=0, atol=LOSS_TOLERANCE, msg=key)
    saved, single_saved = tensors(fsdp_dir / "adapter"), tensors(single_dir / "adapter")
    for key, value in saved.items():
        torch.testing.assert_close(value, single_saved[key], rtol=0, atol=LOSS_TOLERANCE, msg=key)


@pytest.mark.slow
def test_fsdp_s2ft_lora_full_match_single_process_and_resume(tmp_path):
    """20 steps of S2FT, LoRA and full FT, each against one process; S2FT stopped by SIGTERM at step 10 and resumed,
    and S2FT with checkpoint selection."""
    wall = launch(tmp_path / "fsdp", 20, "s2ft", "lora", "full", "s2ft:resume", "s2ft:best")
    single_best = tmp_path / "single" / "s2ft_best"
    run_experiment(job_config("s2ft", 20, *SELECT_BEST, sharded=False), single_best)
    assert_same_selection(tmp_path / "fsdp" / "s2ft_best", single_best)
    for method in ("s2ft", "lora", "full"):
        single = tmp_path / "single" / method
        run_experiment(job_config(method, 20, sharded=False), single)
        assert_same_training(method, tmp_path / "fsdp" / method, single, steps=20)
        if method != "full":
            assert_adapter_loads(method, tmp_path / "fsdp" / method, single)
    assert train_losses(tmp_path / "fsdp" / "s2ft_resumed") == train_losses(tmp_path / "fsdp" / "s2ft")
    final, resumed_final = (
        tensors(tmp_path / "fsdp" / "s2ft" / "adapter"),
        tensors(tmp_path / "fsdp" / "s2ft_resumed" / "adapter"),
    )
    assert all(torch.equal(value, resumed_final[key]) for key, value in final.items())
    print(f"FSDP launch (5 jobs): {wall:.1f} s")
