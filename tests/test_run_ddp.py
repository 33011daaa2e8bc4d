"""`trainer=ddp_cpu`: two gloo processes train one tiny run; both ranks must end with identical trained weights."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, adapter_tensors, logged
from safetensors.torch import load_file


@pytest.mark.slow
def test_two_cpu_ranks_end_with_identical_adapters(tmp_path):
    run_dir = tmp_path / "ddp"
    command = [
        sys.executable, "run.py", "trainer=ddp_cpu", "model=tiny_llama", "logger=csv", "eval=none", "name=ddp_test",
        "data.limit=48", "data.val_size=8", "data.max_length=512", "data.batch_size=4",
        "trainer.max_steps=4", "trainer.warmup_steps=1", "trainer.val_check_interval=2", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    # The runner hashes every trained tensor on each rank after fit and gathers the digests (it raises on mismatch).
    digests = summary["ddp"]["trained_sha256"]
    assert summary["ddp"]["world_size"] == 2 and len(digests) == 2 and digests[0] == digests[1]
    assert summary["train"]["steps"] == 4
    adapter = load_file(run_dir / "adapter" / "adapter.safetensors")
    assert adapter and all(t.isfinite().all() for t in adapter.values())


@pytest.mark.slow
def test_a_ddp_run_preempted_inside_an_accumulation_window_resumes_exactly(tmp_path):
    """SIGTERM to rank 0 inside a window: both ranks finish the window, save and stop together (Lightning's handling
    stopped each rank at the end of its batch, saved the half window and left the other rank waiting), and the resume
    ends with the uninterrupted run's weights, loss curve, metrics.csv and token count (each rank keeps its own)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += [str(ROOT / "tests" / "ddp_resume_worker.py"), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    # 2 ranks x batches of 2 of the 36 training items: 9 micro-batches per epoch, step 2 ends after the sixth.
    assert json.loads((tmp_path / "stopped_at.json").read_text()) == {"global_step": 2, "epoch": 0, "consumed": 6}
    full, resumed = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("full", "resumed"))
    for key in ("steps", "tokens", "loss_curve", "final_loss"):
        assert resumed["train"][key] == full["train"][key], key
    assert logged(tmp_path / "resumed") == pytest.approx(logged(tmp_path / "full"))
    expected, actual = adapter_tensors(tmp_path / "full"), adapter_tensors(tmp_path / "resumed")
    assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)
