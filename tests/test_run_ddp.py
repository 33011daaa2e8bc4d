"""`trainer=ddp_cpu`: two gloo processes train one tiny run; both ranks must end with identical trained weights."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT
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
