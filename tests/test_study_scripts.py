"""The three-seed study scripts (experiments/study/*.sh) run against a stand-in ``python`` that records each command
and writes the run's summary.json: which jobs they run, in what order, what a rerun skips, and where a failure
stops."""

import os
import subprocess
from pathlib import Path

from conftest import ROOT

STAND_IN = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
for arg in "$@"; do case "$arg" in hydra.run.dir=*) run=${arg#hydra.run.dir=};; esac; done
[ "${1:-}" = -m ] && [ "$2" = experiments.study.fuse ] && run=$6
[ -z "${run:-}" ] && exit 0
[ "$run" = "${FAIL_RUN:-}" ] && { echo "boom" >&2; exit 3; }
mkdir -p "$run" && touch "$run/summary.json"
"""


def run_script(tmp_path: Path, script: str, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Runs ``script`` with the stand-in python, OUT under ``tmp_path``; the result and the commands it ran."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.txt"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python").write_text(STAND_IN)
    (bin_dir / "python").chmod(0o755)
    calls.unlink(missing_ok=True)
    environ = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls), "OUT": str(tmp_path / "o")}
    result = subprocess.run(
        ["bash", str(ROOT / "experiments/study" / script), *args],
        env={**environ, **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    return result, calls.read_text().splitlines() if calls.exists() else []


def test_a_method_study_runs_the_central_rows_first_and_a_rerun_only_reports(tmp_path):
    result, calls = run_script(tmp_path, "methods_smollm.sh", "commonsense_smollm", SEEDS="0 1")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "o"
    assert calls[0] == (
        f"run.py +experiment=commonsense_smollm logger=csv hydra.run.dir={out}/seed0_s2ft ckpt_path=auto "
        "method=smollm/s2ft seed=0"
    )
    assert calls[3].endswith(f"hydra.run.dir={out}/seed0_none ckpt_path=auto method=none mode=eval seed=0")
    runs = [call.split("hydra.run.dir=")[1].split()[0].rsplit("/", 1)[1] for call in calls[:-1]]
    central = [f"seed{s}_{m}" for s in (0, 1) for m in ("s2ft", "lora", "full", "none")]
    assert runs == central + [f"seed{s}_{m}" for s in (0, 1) for m in ("dora", "spft")]
    report = (
        f"-m experiments.report {out} --export-records results/commonsense_smollm/runs --out results/commonsense_smollm"
    )
    assert calls[-1] == report
    result, calls = run_script(tmp_path, "methods_smollm.sh", "commonsense_smollm", SEEDS="0 1")
    assert result.returncode == 0 and calls == [report]


def test_a_method_study_reports_into_results_beside_the_records_already_there(tmp_path):
    results = tmp_path / "main/results/commonsense_smollm/rerun"
    (results / "runs/seed0_s2ft").mkdir(parents=True)
    result, calls = run_script(tmp_path, "methods_smollm.sh", "commonsense_smollm", SEEDS="0", RESULTS=str(results))
    assert result.returncode == 0, result.stderr
    out = tmp_path / "o"
    assert calls[-1] == (f"-m experiments.report {results}/runs {out} --export-records {results}/runs --out {results}")


def test_a_failed_job_stops_the_study_naming_its_log_and_a_rerun_goes_on_from_it(tmp_path):
    out = tmp_path / "o"
    result, calls = run_script(tmp_path, "components_smollm.sh", SEEDS="0", FAIL_RUN=str(out / "seed0_down"))
    assert result.returncode == 1
    assert f"FAILED {out}/seed0_down: see {out}/seed0_down.log (rerun this script" in result.stderr
    assert (out / "seed0_down.log").read_text() == "boom\n"
    assert [call.split("target_split=")[1].split()[0] for call in calls] == ["{q:1.0}", "{o:1.0}", "{down:1.0}"]
    result, calls = run_script(tmp_path, "components_smollm.sh", SEEDS="0")
    assert result.returncode == 0
    trained = [call.split("target_split=")[1].split()[0] for call in calls[:-1]]
    assert trained == ["{down:1.0}", "{v:1.0}", "{k:1.0}", "{up:1.0}", "{gate:1.0}"]
    assert calls[-1].startswith(f"-m experiments.report {out} --export-records results/components_smollm/runs")


def test_the_fusion_study_trains_then_fuses_and_runs_a_half_written_fusion_again(tmp_path):
    out = tmp_path / "o"
    (out / "seed0_fused_overlap").mkdir(parents=True)
    (out / "seed0_fused_overlap/fused.safetensors").write_text("half")
    result, calls = run_script(tmp_path, "fusion_smollm.sh", SEEDS="0")
    assert result.returncode == 0, result.stderr
    assert not (out / "seed0_fused_overlap/fused.safetensors").exists()
    assert calls[2].endswith(f"method.options.exclude={out}/seed0_gsm8k/adapter")
    assert (
        calls[3]
        == f"-m experiments.study.fuse {out}/seed0_gsm8k {out}/seed0_commonsense --out {out}/seed0_fused_overlap"
    )
    assert calls[4].endswith(f"{out}/seed0_commonsense_disjoint --out {out}/seed0_fused_disjoint")
    assert calls[5].endswith("method=none mode=eval seed=0") and len(calls) == 7
