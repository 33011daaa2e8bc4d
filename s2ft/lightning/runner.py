"""One experiment from a resolved config: build the model, apply the method, train, save, evaluate, summarise.

`run.py` is a thin Hydra main around `run_experiment`; this module needs only a plain dict, so tests and notebooks
call it directly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import RichProgressBar
from torch.utils.data import DataLoader

from s2ft.lightning.callbacks import AdvanceSampler, AtomicCheckpointIO, KeepBest, LastCheckpoint
from s2ft.lightning.datamodule import SFTDataModule
from s2ft.lightning.loggers import ReplayCSVHistory, build_logger, end_wandb_run, wandb_info
from s2ft.lightning.module import S2FTLitModule
from s2ft.lightning.summary import build_summary, print_summary, task_record, write_json
from s2ft.run_config import RunConfigError, validate_run_config

CALIBRATED_STRATEGIES = ("activation", "weight_activation", "gradient")
CHECKPOINT = Path("checkpoints") / "last.ckpt"
log = logging.getLogger(__name__)


def run_experiment(cfg: dict, run_dir: str | Path) -> dict | None:
    """Run the experiment `cfg` describes and fill `run_dir` with its outputs.

    Args:
        cfg: The resolved config as a plain dict (schema: conf/config.yaml, checked by `validate_run_config`).
        run_dir: The run directory (Hydra's output directory under `run.py`).

    Returns:
        The summary written to `run_dir/summary.json`; None on DDP ranks other than 0.
    """
    validate_run_config(cfg)
    run_dir = Path(run_dir)
    if cfg.get("ckpt_path") == "auto":
        cfg, finished = resolve_auto_resume(cfg, run_dir)
        if finished is not None:
            log.info("%s already holds this finished run; nothing to do (ckpt_path=auto)", run_dir)
            return finished
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg["seed"], workers=True)
    if cfg["mode"] == "eval":
        return _evaluate_only(cfg, run_dir)
    try:
        summary = _train(cfg, run_dir)
    except BaseException:
        end_wandb_run(failed=True)
        raise
    end_wandb_run(failed=False)
    return summary


def resolve_auto_resume(cfg: dict, run_dir: Path) -> tuple[dict, dict | None]:
    """``ckpt_path=auto``: finish what ``run_dir`` holds, so rerunning a sweep redoes nothing.

    Returns:
        The config to run (``ckpt_path`` "last" when the directory has a checkpoint, else None: a fresh start) and
        the summary of a run already finished there (None otherwise: run the config).

    Raises:
        RunConfigError: The directory holds a run of another config (the differing keys are named), e.g. a sweep
            whose parameters changed between the two commands, which renumbers its jobs.
    """
    saved_file = run_dir / "config.yaml"
    if saved_file.is_file():
        differing = _differing_keys(yaml.safe_load(saved_file.read_text()), cfg, ignore={"ckpt_path"})
        if differing:
            raise RunConfigError(
                f"ckpt_path=auto: {run_dir} holds a run of another config (differs in {', '.join(differing)}); "
                "give this config its own directory (hydra.run.dir, or hydra.sweep.dir for a multirun) or remove it"
            )
    summary_file = run_dir / "summary.json"
    if summary_file.is_file():
        return cfg, json.loads(summary_file.read_text())
    return {**cfg, "ckpt_path": "last" if (run_dir / CHECKPOINT).is_file() else None}, None


def _differing_keys(saved, current, ignore: set[str], prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        keys = sorted(set(saved) | set(current), key=str)
        return [
            diff
            for key in keys
            if f"{prefix}{key}" not in ignore
            for diff in _differing_keys(saved.get(key), current.get(key), ignore, f"{prefix}{key}.")
        ]
    return [] if saved == current else [prefix.removesuffix(".")]


def build_run_model(model_cfg: dict, cache_dir):
    """The base model and tokenizer of a run's `model` config."""
    from s2ft.models import build_model

    return build_model(
        model_cfg["name"],
        dtype=model_cfg.get("dtype", "float32"),
        cache_dir=model_cfg.get("cache_dir") or cache_dir,
        gradient_checkpointing=model_cfg.get("gradient_checkpointing", False),
    )


def _train(cfg: dict, run_dir: Path) -> dict | None:
    from s2ft.data import load_eval, load_train, split_validation
    from s2ft.data.overlap import check_overlap
    from s2ft.data.user_tasks import resolve_eval_tasks
    from s2ft.methods import prepare_model, save_trained, trainable_summary

    data, paths, tr = cfg["data"], cfg["paths"], cfg["trainer"]
    data_dir = paths["data_dir"]
    examples = load_train(data["train"], data_dir, data.get("limit"), cfg["seed"])
    overlap_tasks = data.get("overlap_tasks") or cfg["eval"].get("tasks") or []
    if overlap_tasks:
        tasks = resolve_eval_tasks(overlap_tasks, cfg["eval"].get("groups"))
        eval_sets = {task.name: load_eval(task, data_dir) for task in tasks}
        check_overlap(examples, eval_sets, allow=data.get("allow_overlap", False))
    train, val = split_validation(examples, data["val_size"], cfg["seed"]) if data.get("val_size") else (examples, [])

    model, tokenizer = build_run_model(cfg["model"], paths.get("cache_dir"))
    datamodule = SFTDataModule(
        train,
        val,
        tokenizer,
        data["max_length"],
        data["batch_size"],
        cfg["seed"],
        _cache(paths, "tokenized"),
        data.get("template", "alpaca"),
    )

    logger = build_logger(cfg["logger"], cfg, run_dir)
    trainer = _trainer(tr, run_dir, logger, has_val=bool(val))
    ckpt_path = _resume_path(cfg.get("ckpt_path"), run_dir)
    results = None
    if trainer.global_rank == 0:
        _write_config(cfg, run_dir)
        if cfg["eval"].get("before"):
            results = measure_model(model, tokenizer, cfg, run_dir / "before")

    method = cfg["method"]
    options = dict(method.get("options") or {})
    calibration = None
    if method["name"] == "s2ft" and options.get("strategy") in CALIBRATED_STRATEGIES:
        count = calibration_count(options.get("calibration_size") or 64, len(datamodule.train_set))
        subset = datamodule.train_set.select(range(count))  # the training list is shuffled: a random sample
        calibration = list(DataLoader(subset, batch_size=data["batch_size"], collate_fn=datamodule.collate))
    model = prepare_model(model, method["name"], options, calibration)
    counts = trainable_summary(model)
    if logger:
        logger.log_metrics({"trainable_params": counts["trainable_params"], "trainable_pct": counts["trainable_pct"]})
    module = S2FTLitModule(
        model, method["lr"], method.get("weight_decay", 0.0), tr.get("warmup_steps", 0), tr.get("scheduler", "linear")
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=False)

    digests = _gather(trainer, _trained_digest(module))
    if len(set(digests)) > 1:
        raise RuntimeError(f"DDP ranks ended with different trained weights: {digests}")
    tokens = int(trainer.strategy.reduce(torch.tensor(float(module.tokens_seen)), reduce_op="sum"))
    if trainer.global_rank != 0:
        return None
    save_trained(model, method["name"], run_dir / "adapter")
    train_stats = {
        "steps": trainer.global_step,
        "tokens": tokens,
        "wall_s": round(module.wall_s, 2),
        "peak_mem_mb": round(module.peak_mem_mb(), 1),
        "final_loss": module.last_loss,
        "loss_curve": [list(point) for point in module.loss_curve],
    }
    if module.pace:
        train_stats["median_tokens_per_s"] = round(statistics.median(module.pace), 1)
    if module.val_curve:
        # The validation split (data.val_size) is for choices such as learning rates; the test sets are not.
        train_stats["val_loss"] = module.val_curve[-1][1]
        train_stats["val_curve"] = [list(point) for point in module.val_curve]
    after = measure_model(model, tokenizer, cfg, run_dir)
    if cfg.get("save_merged"):
        _save_merged(model, tokenizer, method["name"], run_dir / "merged")
    best = next((c.best for c in trainer.callbacks if isinstance(c, KeepBest)), None)
    if best is not None:
        train_stats["best_val_loss"] = best
    extra = {"ddp": {"world_size": trainer.world_size, "trained_sha256": digests}} if trainer.world_size > 1 else {}
    if results is not None:
        extra["eval_before"] = {name: task_record(r) for name, r in (results["eval"] or {}).get("tasks", {}).items()}
        extra["avg_accuracy_before"] = (results["eval"] or {}).get("avg_accuracy")
    heldout = _pair(results["heldout"] if results else {}, after["heldout"])
    if "lm_eval" in after:
        extra["lm_eval"] = after["lm_eval"]
        extra["lm_eval_before"] = results.get("lm_eval") if results else None
    summary = build_summary(cfg, counts, train_stats, after["eval"], heldout=heldout, wandb=wandb_info(logger), **extra)
    if logger:
        logger.log_metrics(flat_metrics(summary))
    return _finish(summary, run_dir)


def _evaluate_only(cfg: dict, run_dir: Path) -> dict:
    from s2ft.methods import load_trained, trainable_summary

    method, model_cfg, source = cfg["method"]["name"], cfg["model"], None
    if cfg.get("run_dir"):
        # A saved run knows what it trained: its own config decides the base model and the method.
        saved = yaml.safe_load((Path(cfg["run_dir"]) / "config.yaml").read_text())
        method, model_cfg, source = saved["method"]["name"], saved["model"], Path(cfg["run_dir"]) / "adapter"
        # ... and its prompt template: a model is evaluated in the format it was trained in.
        cfg = {**cfg, "data": {**cfg["data"], "template": saved.get("data", {}).get("template", "alpaca")}}
    if cfg.get("adapter"):
        source = Path(cfg["adapter"])
    model, tokenizer = build_run_model(model_cfg, cfg["paths"].get("cache_dir"))
    if source is not None:
        model = load_trained(model, method, source)
    model.requires_grad_(False)
    _write_config(cfg, run_dir)
    results = measure_model(model, tokenizer, cfg, run_dir)
    heldout = _pair({}, results["heldout"])
    counts = trainable_summary(model)
    summary = build_summary(
        {**cfg, "method": {**cfg["method"], "name": method}, "model": model_cfg},
        counts,
        None,
        results["eval"],
        heldout=heldout,
        source=None if source is None else str(source),
        **({"lm_eval": results["lm_eval"]} if "lm_eval" in results else {}),
    )
    return _finish(summary, run_dir)


def _finish(summary: dict, run_dir: Path) -> dict:
    write_json(summary, run_dir / "summary.json")
    print_summary(summary)
    return summary


def _trainer(tr: dict, run_dir: Path, logger, has_val: bool) -> L.Trainer:
    interval = tr.get("val_check_interval")
    callbacks = [
        AdvanceSampler(),
        LastCheckpoint(run_dir / CHECKPOINT, tr.get("checkpoint_every_n_steps", 50)),
        ReplayCSVHistory(),
    ]
    if tr.get("select_best") == "val_loss":
        if not has_val:
            raise ValueError("trainer.select_best=val_loss needs a validation split: set data.val_size > 0")
        # Before LastCheckpoint's end-of-training save, so the final checkpoint holds the selected weights too.
        callbacks.insert(1, KeepBest())
    return L.Trainer(
        max_steps=tr.get("max_steps", -1),
        max_epochs=tr.get("max_epochs"),
        accumulate_grad_batches=tr.get("accumulate_grad_batches", 1),
        gradient_clip_val=tr.get("gradient_clip_val"),
        precision=tr.get("precision", "32-true"),
        accelerator=tr.get("accelerator", "cpu"),
        devices=tr.get("devices", 1),
        strategy=tr.get("strategy", "auto"),
        num_nodes=tr.get("num_nodes", 1),
        log_every_n_steps=tr.get("log_every_n_steps", 10),
        # An int interval counts training batches across epochs, so validation runs on a step schedule.
        val_check_interval=interval if has_val else None,
        check_val_every_n_epoch=None if isinstance(interval, int) else 1,
        limit_val_batches=None if has_val else 0,
        num_sanity_val_steps=0,
        logger=logger,
        callbacks=[*callbacks, RichProgressBar()],
        plugins=[AtomicCheckpointIO()],
        enable_checkpointing=False,
        # The sampler shards by rank itself and resumes mid-epoch; Lightning's replacement would do neither.
        use_distributed_sampler=False,
        default_root_dir=run_dir,
    )


def _resume_path(ckpt_path: str | None, run_dir: Path) -> str | None:
    if ckpt_path != "last":
        return ckpt_path
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt_path=last but {path} does not exist; resume in the interrupted run's directory with "
            "hydra.run.dir=<that run directory> ckpt_path=last"
        )
    return str(path)


def measure_model(model, tokenizer, cfg: dict, out_dir: Path) -> dict:
    """Task accuracy (`s2ft.evaluation.evaluate`) and held-out losses of `model`, predictions under `out_dir`."""
    ev, data_dir = cfg["eval"], cfg["paths"]["data_dir"]
    result = {"eval": None}
    if ev.get("tasks"):
        from s2ft.evaluation import evaluate

        kwargs = {"max_new_tokens": ev["max_new_tokens"]} if ev.get("max_new_tokens") else {}
        result["eval"] = evaluate(
            model,
            tokenizer,
            ev["tasks"],
            data_dir=data_dir,
            mode=ev.get("mode", "generate"),
            limit=ev.get("limit"),
            seed=cfg["seed"],
            batch_size=ev.get("batch_size", 8),
            num_beams=ev.get("num_beams", 1),
            out_dir=out_dir,
            template=cfg["data"].get("template", "alpaca"),
            groups=ev.get("groups"),
            **kwargs,
        )
    result["heldout"] = heldout_losses(model, tokenizer, cfg, out_dir)
    if ev.get("backend", "s2ft") == "lm_eval":
        result["lm_eval"] = harness_results(model, tokenizer, cfg, out_dir)
    return result


def harness_results(model, tokenizer, cfg: dict, out_dir: Path) -> dict:
    """lm-evaluation-harness on the same items (`s2ft.evaluation.lm_eval_backend`), its files in ``out_dir/lm_eval``."""
    from s2ft.evaluation.lm_eval_backend import LM_EVAL_TASKS, run_lm_eval

    ev, options = cfg["eval"], cfg["eval"].get("lm_eval") or {}
    return run_lm_eval(
        model,
        tokenizer,
        cfg["paths"]["data_dir"],
        out_dir / "lm_eval",
        tasks=options.get("tasks") or LM_EVAL_TASKS,
        limit=options.get("limit") or ev.get("limit"),
        seed=cfg["seed"],
        batch_size=ev.get("batch_size", 8),
        max_gen_toks=options.get("max_gen_toks"),
    )


def heldout_losses(model, tokenizer, cfg: dict, out_dir: Path) -> dict[str, float]:
    """Mean held-out loss of each `eval.heldout` set; per-item losses go to ``predictions/heldout_NAME.jsonl``.

    The per-item files let the report test a difference between two runs on the same items (a paired bootstrap).
    """
    from s2ft.data import eval_subset, load_heldout
    from s2ft.data.sources import heldout_name
    from s2ft.evaluation import heldout_item_losses, mean_token_loss, write_predictions

    ev, losses = cfg["eval"], {}
    for item in ev.get("heldout") or []:
        name = heldout_name(item)
        examples = eval_subset(load_heldout(item, cfg["paths"]["data_dir"]), ev.get("heldout_limit"), cfg["seed"])
        items = heldout_item_losses(
            model,
            tokenizer,
            examples,
            ev.get("batch_size", 8),
            cfg["data"].get("max_length", 512),
            cfg["data"].get("template", "alpaca"),
        )
        losses[name] = mean_token_loss(items)
        write_predictions(out_dir / "predictions" / f"heldout_{name}.jsonl", items)
    return losses


def _pair(before: dict, after: dict) -> dict:
    return {name: {"before": before.get(name), "after": loss} for name, loss in after.items()}


def _trained_digest(module: S2FTLitModule) -> str:
    """SHA-256 of the trained tensors, to check that DDP replicas stayed identical."""
    state = module.state_dict()
    digest = hashlib.sha256()
    for key in sorted(module.trained_keys()):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _gather(trainer: L.Trainer, value: str) -> list[str]:
    if trainer.world_size == 1:
        return [value]
    values = [None] * trainer.world_size
    torch.distributed.all_gather_object(values, value)
    return values


def _save_merged(model, tokenizer, method: str, out_dir: Path) -> None:
    """Fold what was trained into plain weights and save a `from_pretrained`-able model."""
    from s2ft.methods import merge_trained

    model = merge_trained(model, method)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _write_config(cfg: dict, run_dir: Path) -> None:
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def _cache(paths: dict, name: str) -> Path | None:
    return Path(paths["cache_dir"]) / name if paths.get("cache_dir") else None


def flat_metrics(summary: dict) -> dict[str, float]:
    """The final results logged to the experiment logger (what `experiments/runs.wandb_runs` reads back)."""
    metrics = {f"eval/{task}/accuracy": r["accuracy"] for task, r in summary["eval"].items()}
    if summary.get("avg_accuracy") is not None:
        metrics["eval/avg_accuracy"] = summary["avg_accuracy"]
    metrics |= {f"groups/{group}": acc for group, acc in (summary.get("groups") or {}).items()}
    metrics |= {f"heldout/{name}": v["after"] for name, v in summary.get("heldout", {}).items()}
    train = summary.get("train") or {}
    metrics |= {
        f"train/{key}": train[key]
        for key in ("wall_s", "val_loss", "median_tokens_per_s")
        if train.get(key) is not None
    }
    return metrics


def calibration_count(size: int | float, train_items: int) -> int:
    """Items in the calibration set: ``size`` items, or a fraction ``0 < size < 1`` of the training set (the paper
    scores on 1% of the fine-tuning data); at least one item and at most the whole training set."""
    count = round(size * train_items) if isinstance(size, float) and size < 1 else int(size)
    return max(1, min(count, train_items))
