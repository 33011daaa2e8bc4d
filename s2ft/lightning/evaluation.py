"""Evaluation-only runs (``mode=eval``) and the record every evaluation leaves in its run directory.

`record_evaluation` is the one path from a model to a run directory of its results (``config.yaml``,
``predictions/``, ``summary.json``): `mode=eval` takes it for a saved run, an adapter or the base model, and
`experiments/study/fuse.py` for a fused model. `evaluate_adapters` (``adapters=[...]``) loads several S2FT
adapters onto one base model (`s2ft.load_adapters`) and evaluates them in one batched pass; each adapter's folder
under ``adapters/NAME/`` holds what the one-adapter command would write, ``adapters.json`` the index.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import yaml

from s2ft.adapter_format import atomic_write
from s2ft.data.tokenize import refuse_special_tokens
from s2ft.evaluation.measure import eval_data, measure_adapters, measure_model, special_token_check
from s2ft.lightning.provenance import check_eval_overlap, read_adapter_record
from s2ft.lightning.run_dir import RunDirError, write_command_record
from s2ft.lightning.summary import build_summary, print_summary, write_json
from s2ft.methods import load_trained, trainable_summary
from s2ft.models import build_run_model
from s2ft.multi_adapter import load_adapters
from s2ft.run_config import RunConfigError, adapter_sources, single_source

INDEX = "adapters.json"  # the index of an adapters=[...] run: per adapter, its source and its results' folder


def evaluate_only(cfg: dict, run_dir: Path, command_record: Mapping[str, str] | None = None) -> dict:
    """``mode=eval``: evaluate ``cfg["run_dir"]``'s adapter, ``cfg["adapter"]``, or the base model into ``run_dir``
    (``cfg["adapters"]``: several adapters, `evaluate_adapters`).

    A saved run decides its base model, its method and its prompt template; every source's training record is
    checked against the evaluation tasks (`check_eval_overlap`) before the model is built.

    ``command_record`` (Hydra's record of the command) is written to ``run_dir/.hydra/`` with ``config.yaml``, after
    every check.

    Returns:
        The summary written to ``run_dir/summary.json``.
    """
    if cfg.get("adapters") is not None:
        return evaluate_adapters(cfg, run_dir, command_record)
    device = eval_device(cfg["trainer"])
    cfg, described, source = resolve_source(cfg)
    record = None if source is None else read_adapter_record(source)
    if source is not None:
        check_eval_overlap(record, source, cfg)
    model, tokenizer = build_run_model(described["model"], cfg["paths"].get("cache_dir"))
    if source is not None:
        model = load_trained(model, described["method"]["name"], source)
    model.requires_grad_(False).to(device)
    return record_evaluation(
        model,
        tokenizer,
        cfg,
        run_dir,
        trainable_summary(model),
        described=described,
        source=None if source is None else str(source),
        training_data=record,
        command_record=command_record,
    )


def evaluate_adapters(cfg: dict, run_dir: Path, command_record: Mapping[str, str] | None = None) -> dict:
    """``mode=eval adapters=[...]``: every adapter on one base model, evaluated in one batched pass.

    Each source is resolved as the one-adapter command (`single_source`) resolves it: a run directory decides its
    base model and prompt template, and every adapter's training record is checked against the evaluation tasks
    before the model is built; the adapters are checked against the base model before anything is written.

    Returns:
        The index written to ``run_dir/adapters.json``: per adapter, its source, results folder and headline numbers.
    """
    device, legs = eval_device(cfg["trainer"]), {}
    for name, path in adapter_sources(cfg["adapters"]):
        single, described, source = resolve_source(single_source(cfg, path))
        record = read_adapter_record(source)
        check_eval_overlap(record, source, single)
        legs[name] = (path, single, described, source, record)
    model_cfg = next(iter(legs.values()))[2]["model"]
    model, tokenizer = build_run_model(model_cfg, cfg["paths"].get("cache_dir"))
    refuse_special_tokens(special_token_check(tokenizer, cfg))
    evaluated_files = eval_data(cfg)
    counts = trainable_summary(model.requires_grad_(False))  # as the one-adapter model's: the adapters add buffers
    model = load_adapters(model, {name: source for name, (_, _, _, source, _) in legs.items()}).to(device)
    out_dirs = {name: run_dir / "adapters" / name for name in legs}
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(cfg, run_dir, command_record)
    for name, (_, single, *_) in legs.items():
        out_dirs[name].mkdir(parents=True, exist_ok=True)
        write_config(single, out_dirs[name])
    templates = {name: single["data"].get("template", "alpaca") for name, (_, single, *_) in legs.items()}
    measured = measure_adapters(model, tokenizer, cfg, templates, out_dirs)
    index = {}
    for name, (path, _, described, source, record) in legs.items():
        summary = finish(
            _summary(
                described, counts, measured[name], source=str(source), training_data=record, eval_data=evaluated_files
            ),
            out_dirs[name],
        )
        index[name] = {
            "source": str(path),
            "adapter": str(source),
            "results": str(out_dirs[name].relative_to(run_dir)),
            "avg_accuracy": summary["avg_accuracy"],
            "heldout": {set_name: losses["after"] for set_name, losses in summary["heldout"].items()},
        }
    write_json({"adapters": index}, run_dir / INDEX)
    return {"adapters": index}


def eval_device(trainer: dict) -> torch.device:
    """Where an evaluation-only run evaluates: the first device of ``trainer.accelerator``, as a training run
    evaluates where it trained (``mode=eval`` with a paper experiment's trainer=gpu runs on the GPU).

    Raises:
        RunConfigError: A GPU asked for on a machine without one.
    """
    accelerator = trainer.get("accelerator", "cpu")
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RunConfigError(
                f"trainer.accelerator={accelerator!r} but this machine has no GPU: evaluate on the CPU with trainer=cpu"
            )
        devices = trainer.get("devices")
        return torch.device("cuda", devices[0] if isinstance(devices, list) else 0)
    return torch.device("mps" if accelerator == "mps" else "cpu")


def resolve_source(cfg: dict) -> tuple[dict, dict, Path | None]:
    """What a one-adapter ``mode=eval`` config evaluates.

    Returns:
        The config to run (with a saved run's prompt template: a model is evaluated in the format it was trained
        in), the config its summary describes (the saved run's method and base model), and the adapter folder (None
        for the base model).
    """
    method, model_cfg, source = cfg["method"], cfg["model"], None
    if cfg.get("run_dir"):
        # A saved run knows what it trained: its own config decides the base model and the method (its options too:
        # the summary describes the run's selection, not the command's defaults).
        saved = saved_config(Path(cfg["run_dir"]))
        method, model_cfg, source = saved["method"], saved["model"], Path(cfg["run_dir"]) / "adapter"
        cfg = with_template(cfg, saved)
    if cfg.get("adapter"):
        source = Path(cfg["adapter"])
    return cfg, {**cfg, "method": method, "model": model_cfg}, source


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
    model,
    tokenizer,
    cfg: dict,
    run_dir: Path,
    counts: dict,
    described: dict | None = None,
    command_record: Mapping[str, str] | None = None,
    **extra,
) -> dict:
    """Measure ``model`` as ``cfg`` says and write the run directory of the result.

    Args:
        model: The model to evaluate (frozen, on its device).
        tokenizer: Its tokenizer.
        cfg: The evaluation's config: written to ``config.yaml``, and what is measured.
        run_dir: The run directory (created).
        counts: The trainable counts of the summary (`s2ft.methods.trainable_summary`, or what a fusion changed).
        described: The config the summary describes, when it is not ``cfg`` (a saved run's method and model).
        command_record: Hydra's record of the command, written to ``.hydra/`` with ``config.yaml``.
        **extra: Further top-level fields of the summary (``source``, ``training_data``, ``fusion``, ...).

    Returns:
        The summary written to ``run_dir/summary.json``.

    Raises:
        DataError: A text the model would read holds one of the tokenizer's special tokens (before anything is
            written: `s2ft.evaluation.measure.special_token_check`).
    """
    refuse_special_tokens(special_token_check(tokenizer, cfg))  # before config.yaml, not once every task has run
    files = eval_data(cfg)  # the files about to be measured on (a user's can change under its name later)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(cfg, run_dir, command_record)
    measured = measure_model(model, tokenizer, cfg, run_dir)
    return finish(_summary(described or cfg, counts, measured, eval_data=files, **extra), run_dir)


def _summary(described: dict, counts: dict, results: dict, **extra) -> dict:
    """The summary of an evaluation-only run from `measure_model`'s (or `measure_adapters`') results."""
    return build_summary(
        described,
        counts,
        None,
        results["eval"],
        heldout={name: {"before": None, "after": loss} for name, loss in results["heldout"].items()},
        **({"measure_wall_s": {"before": None, "after": results["wall_s"]}} if "wall_s" in results else {}),
        **extra,
        **({"mtbench": results["mtbench"]} if results.get("mtbench") else {}),
        **({"lm_eval": results["lm_eval"]} if "lm_eval" in results else {}),
    )


def finish(summary: dict, run_dir: Path) -> dict:
    """Write ``summary.json`` and show the run's last screen."""
    write_json(summary, run_dir / "summary.json")
    print_summary(summary, run_dir)
    return summary


def write_config(cfg: dict, run_dir: Path, command_record: Mapping[str, str] | None = None) -> None:
    """The run's resolved config, as ``config.yaml`` (atomically: a resume compares against it), after the command's
    record (Hydra's, `write_command_record`) when one is given."""
    if command_record:
        write_command_record(run_dir, command_record)
    atomic_write(run_dir / "config.yaml", lambda tmp: Path(tmp).write_text(yaml.safe_dump(cfg, sort_keys=False)))
