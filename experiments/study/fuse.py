"""The fusion step of the fusion study (paper Table 5): sum two trained S2FT adapters into the base and evaluate.

    python -m experiments.study.fuse RUN_A RUN_B --out outputs/fusion/overlap [--weights 1 1]

RUN_A and RUN_B are finished S2FT run directories on the same base model (e.g. the two jobs of
`python run.py -m +experiment=fusion_smollm`; for the non-overlapping variant, RUN_B trained with
`method.options.exclude=RUN_A/adapter`). The fused model is evaluated on the union of both runs' tasks and held-out
sets with RUN_A's evaluation settings, and `--out` becomes a run directory (config.yaml, summary.json, predictions/)
that `python -m experiments.report` shows in the same table as the two runs (method "fused", with the number of units
the two adapters share).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from s2ft.adapter import fuse_adapters
from s2ft.adapter_format import Adapter, load_adapter_file
from s2ft.errors import UserError
from s2ft.lightning.evaluation import eval_device, record_evaluation
from s2ft.lightning.run_dir import OUTPUTS, RunDirError
from s2ft.methods import trainable_summary
from s2ft.models import build_run_model


class FuseError(UserError):
    """The runs cannot be fused as asked (not finished S2FT runs, different base models, an occupied ``--out``)."""


def read_run(run_dir: Path) -> dict:
    """The resolved config of a finished S2FT run, checked to have an adapter."""
    config_file, adapter = run_dir / "config.yaml", run_dir / "adapter"
    if not config_file.is_file() or not adapter.is_dir():
        raise FuseError(
            f"{run_dir} is not a finished run directory (needs config.yaml and adapter/); give the directory of a "
            "finished S2FT run"
        )
    config = yaml.safe_load(config_file.read_text())
    if config["method"]["name"] != "s2ft":
        raise FuseError(f"{run_dir} trained {config['method']['name']!r}; only S2FT adapters can be fused")
    return config


def check_out_free(out: Path) -> None:
    """Refuse an ``out`` that already holds run outputs: fusing there would overwrite them (another run's, even)."""
    present = [name for name in OUTPUTS if (out / name).exists()]
    if present:
        raise RunDirError(
            f"--out {out} already holds run outputs ({', '.join(present)}); writing the fused run there would "
            "overwrite them. Give a new directory, or delete that one first"
        )


def shared_units(adapter_a: Adapter, adapter_b: Adapter) -> int:
    """How many (layer, component, unit) triples both adapters trained."""
    units_a, units_b = adapter_a.units(), adapter_b.units()
    return sum(len(set(units_a[key].tolist()) & set(units_b[key].tolist())) for key in units_a.keys() & units_b.keys())


def fused_parameter_count(adapters: list[Adapter]) -> int:
    """Weight entries the fused delta changes: the union of the adapters' units, shared units counted once."""
    units: dict[str, tuple[set[int], int]] = {}
    for adapter in adapters:
        for name, m in adapter.modules.items():
            seen, _ = units.setdefault(name, (set(), m.unit_size * m.shape[1 - m.axis]))
            seen.update(m.units.tolist())
    return sum(len(seen) * per_unit for seen, per_unit in units.values())


def fuse_and_evaluate(run_a: Path, run_b: Path, out: Path, weights: tuple[float, float] = (1.0, 1.0)) -> dict:
    """Fuse the adapters of two runs into a fresh base model, evaluate it, and write a run directory at ``out``.

    Returns:
        The summary written to ``out/summary.json``.
    """
    cfg_a, cfg_b = read_run(run_a), read_run(run_b)
    if cfg_a["model"]["name"] != cfg_b["model"]["name"]:
        raise FuseError(
            f"{run_a} and {run_b} fine-tuned different models ({cfg_a['model']['name']} vs {cfg_b['model']['name']}); "
            "fuse adapters of one base model"
        )
    check_out_free(out)
    ev = dict(cfg_a["eval"])
    ev["tasks"] = list(dict.fromkeys([*(cfg_a["eval"].get("tasks") or []), *(cfg_b["eval"].get("tasks") or [])]))
    ev["heldout"] = list(dict.fromkeys([*(cfg_a["eval"].get("heldout") or []), *(cfg_b["eval"].get("heldout") or [])]))
    adapters = [load_adapter_file(run / "adapter") for run in (run_a, run_b)]
    overlap = shared_units(*adapters)
    cfg = {
        **cfg_a,
        "eval": ev,
        "method": {"name": "fused", "lr": None, "options": {"shared_units": overlap, "weights": list(weights)}},
        "fusion": {"runs": [str(run_a), str(run_b)], "weights": list(weights), "shared_units": overlap},
    }
    device = eval_device(cfg_a["trainer"])  # where run_a trained (GPU for the paper's fusion study)
    model, tokenizer = build_run_model(cfg_a["model"], cfg["paths"].get("cache_dir"))
    model = fuse_adapters(model, adapters, list(weights)).eval().to(device)
    # The fused model is a plain one with every weight trainable; its "trained" part is what the adapters changed.
    total = trainable_summary(model)["total_params"]
    changed = fused_parameter_count(adapters)
    counts = {"trainable_params": changed, "total_params": total, "trainable_pct": 100 * changed / total}
    return record_evaluation(model, tokenizer, cfg, out, counts, fusion=cfg["fusion"])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a", type=Path, help="first finished S2FT run directory")
    parser.add_argument("run_b", type=Path, help="second finished S2FT run directory")
    parser.add_argument("--out", type=Path, required=True, help="run directory to write for the fused model")
    parser.add_argument("--weights", type=float, nargs=2, default=(1.0, 1.0), help="weight of each adapter's delta")
    args = parser.parse_args(argv)
    try:
        return fuse_and_evaluate(args.run_a, args.run_b, args.out, tuple(args.weights))
    except UserError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
