"""Evaluation-only runs (``mode=eval``) and the record every evaluation leaves in its run directory.

`record_evaluation` is the one path from a model to a run directory of its results (``config.yaml``,
``predictions/``, ``summary.json``): `mode=eval` takes it for a saved run, an adapter or the base model, and
`experiments/fusion_study.py` for a fused model.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from s2ft.evaluation.measure import measure_model
from s2ft.lightning.provenance import check_eval_overlap, read_adapter_record
from s2ft.lightning.run_dir import RunDirError
from s2ft.lightning.summary import build_summary, print_summary, write_json
from s2ft.methods import load_trained, trainable_summary
from s2ft.models import build_run_model


def evaluate_only(cfg: dict, run_dir: Path) -> dict:
    """``mode=eval``: evaluate ``cfg["run_dir"]``'s adapter, ``cfg["adapter"]``, or the base model into ``run_dir``.

    A saved run decides its base model, its method and its prompt template; every source's training record is
    checked against the evaluation tasks (`check_eval_overlap`) before the model is built.

    Returns:
        The summary written to ``run_dir/summary.json``.
    """
    method, model_cfg, source = cfg["method"]["name"], cfg["model"], None
    if cfg.get("run_dir"):
        saved = saved_config(Path(cfg["run_dir"]))
        method, model_cfg, source = saved["method"]["name"], saved["model"], Path(cfg["run_dir"]) / "adapter"
        # ... and its prompt template: a model is evaluated in the format it was trained in.
        cfg = with_template(cfg, saved)
    if cfg.get("adapter"):
        source = Path(cfg["adapter"])
    record = None if source is None else read_adapter_record(source)
    if source is not None:
        check_eval_overlap(record, source, cfg)
    model, tokenizer = build_run_model(model_cfg, cfg["paths"].get("cache_dir"))
    if source is not None:
        model = load_trained(model, method, source)
    model.requires_grad_(False)
    return record_evaluation(
        model,
        tokenizer,
        cfg,
        run_dir,
        trainable_summary(model),
        described={**cfg, "method": {**cfg["method"], "name": method}, "model": model_cfg},
        source=None if source is None else str(source),
        training_data=record,
    )


def saved_config(saved_run: Path) -> dict:
    """The resolved config of a finished run directory (what it trained, on which model, in which template)."""
    saved_file = saved_run / "config.yaml"
    if not saved_file.is_file():
        raise RunDirError(f"run_dir {saved_run} has no config.yaml; point run_dir at a finished run directory")
    return yaml.safe_load(saved_file.read_text())


def with_template(cfg: dict, saved: dict) -> dict:
    """``cfg`` with the prompt template the saved run ``saved`` trained in."""
    return {**cfg, "data": {**cfg["data"], "template": saved.get("data", {}).get("template", "alpaca")}}


def record_evaluation(
    model, tokenizer, cfg: dict, run_dir: Path, counts: dict, described: dict | None = None, **extra
) -> dict:
    """Measure ``model`` as ``cfg`` says and write the run directory of the result.

    Args:
        model: The model to evaluate (frozen, on its device).
        tokenizer: Its tokenizer.
        cfg: The evaluation's config: written to ``config.yaml``, and what is measured.
        run_dir: The run directory (created).
        counts: The trainable counts of the summary (`s2ft.methods.trainable_summary`, or what a fusion changed).
        described: The config the summary describes, when it is not ``cfg`` (a saved run's method and model).
        **extra: Further top-level fields of the summary (``source``, ``training_data``, ``fusion``, ...).

    Returns:
        The summary written to ``run_dir/summary.json``.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(cfg, run_dir)
    results = measure_model(model, tokenizer, cfg, run_dir)
    summary = build_summary(
        described or cfg,
        counts,
        None,
        results["eval"],
        heldout={name: {"before": None, "after": loss} for name, loss in results["heldout"].items()},
        **extra,
        **({"mtbench": results["mtbench"]} if results.get("mtbench") else {}),
        **({"lm_eval": results["lm_eval"]} if "lm_eval" in results else {}),
    )
    return finish(summary, run_dir)


def finish(summary: dict, run_dir: Path) -> dict:
    """Write ``summary.json`` and show the run's last screen."""
    write_json(summary, run_dir / "summary.json")
    print_summary(summary, run_dir)
    return summary


def write_config(cfg: dict, run_dir: Path) -> None:
    """The run's resolved config, as ``config.yaml``."""
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
