"""Validation of the experiment config (a plain dict), in one place, before any model is loaded.

Every check appends to one list, so a user sees every problem of a config at once instead of one per run.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from s2ft.data.prompt import TEMPLATES
from s2ft.errors import UserError

MODES = ("train", "eval")
EVAL_MODES = ("generate", "loglik")
EVAL_BACKENDS = ("s2ft", "lm_eval")
SCHEDULERS = ("linear", "cosine")
LOGGERS = ("wandb", "csv", "none")
PRECISIONS = ("32", "32-true", "bf16", "bf16-mixed", "bf16-true", "16-mixed", "64", "64-true")
SELECT_BEST = (None, "val_loss")
# Options only S2FT reads: seeing them on another method means the user mixed up configs.
S2FT_ONLY = ("ratios", "target_params", "target_split", "match_lora", "strategy", "order", "allocation", "layout")


class RunConfigError(UserError, ValueError):
    """A config with one or more problems; the message lists all of them."""


def validate_run_config(cfg: dict[str, Any]) -> None:
    """Check an experiment config and raise one error listing every problem found.

    Args:
        cfg: The resolved config as a plain dict (`OmegaConf.to_container(cfg, resolve=True)`).

    Raises:
        RunConfigError: If anything is wrong; each line names the config key and how to fix it.
    """
    problems: list[str] = []
    for group in ("paths", "model", "method", "data", "eval", "trainer", "logger"):
        if not isinstance(cfg.get(group), dict):
            problems.append(f"config group {group!r} is missing (check conf/config.yaml defaults)")
    if problems:
        raise RunConfigError(_message(problems))
    mode = cfg.get("mode", "train")
    if mode not in MODES:
        problems.append(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(cfg.get("seed"), int) or isinstance(cfg.get("seed"), bool):
        problems.append(f"seed must be an int, got {cfg.get('seed')!r}")
    problems += _check_model(cfg["model"])
    problems += _check_method(cfg["method"], training=mode == "train")
    data_dir = Path(cfg["paths"].get("data_dir") or "data")
    if not data_dir.is_dir():
        problems.append(f"paths.data_dir {str(data_dir)!r} is not a directory (set paths.data_dir=/path/to/data)")
    if mode == "train":
        problems += _check_data(cfg["data"], data_dir)
        problems += _check_trainer(cfg["trainer"])
    problems += _check_eval(cfg["eval"], data_dir)
    if cfg["data"].get("template", "alpaca") not in TEMPLATES:
        problems.append(f"data.template must be one of {TEMPLATES}, got {cfg['data'].get('template')!r}")
    problems += _check_logger(cfg["logger"])
    problems += _check_sources(cfg, mode)
    if mode == "train" and cfg["trainer"].get("select_best") and not cfg["data"].get("val_size"):
        problems.append("trainer.select_best needs a validation split: set data.val_size > 0")
    if problems:
        raise RunConfigError(_message(problems))


def _message(problems: list[str]) -> str:
    return f"{len(problems)} problem(s) in the config:\n  - " + "\n  - ".join(problems)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_model(model: dict) -> list[str]:
    from s2ft.models import DTYPES, MODEL_NAMES

    problems = []
    name = model.get("name")
    # Anything with a "/" is a hub id or a local folder; those are only checked when loaded.
    if not isinstance(name, str) or (name not in MODEL_NAMES and "/" not in name and not Path(name).is_dir()):
        problems.append(f"unknown model.name {name!r}; use one of {', '.join(MODEL_NAMES)}, a hub id or a folder")
    if model.get("dtype", "float32") not in DTYPES:
        problems.append(f"model.dtype must be one of {sorted(DTYPES)}, got {model.get('dtype')!r}")
    return problems


def _check_method(method: dict, training: bool) -> list[str]:
    from s2ft.methods import EVAL_ONLY, METHODS, method_options

    name = method.get("name")
    if name not in METHODS:
        return [f"unknown method.name {name!r}; use one of {sorted(METHODS)}"]
    problems = []
    if training and name in EVAL_ONLY:
        problems.append(f"method {name!r} trains nothing; use mode=eval with it, or pick a method that trains")
    if training and name not in EVAL_ONLY:
        if not _number(method.get("lr")) or method["lr"] <= 0:
            problems.append(f"method.lr must be > 0, got {method.get('lr')!r}")
        if not _number(method.get("weight_decay", 0.0)) or method.get("weight_decay", 0.0) < 0:
            problems.append(f"method.weight_decay must be >= 0, got {method.get('weight_decay')!r}")
    options = method.get("options") or {}
    if name != "s2ft":
        stray = sorted(set(options) & set(S2FT_ONLY))
        if stray:
            return problems + [f"S2FT options {stray} on a {name} run; remove them from method.options"]
    try:
        options = method_options(name, options)
    except ValueError as err:
        return problems + [str(err)]
    if name == "s2ft":
        problems += _check_s2ft_options(options)
    return problems


def _check_s2ft_options(options: dict) -> list[str]:
    from s2ft.config import S2FTConfig, S2FTConfigError

    problems = []
    budgeted = options["target_params"] is not None or options["match_lora"] is not None
    if options["match_lora"] is not None and options["target_params"] is not None:
        problems.append("set method.options.match_lora or method.options.target_params, not both")
    size = options["calibration_size"]
    if not (_positive_int(size) or (isinstance(size, float) and 0 < size < 1)):
        problems.append(
            f"method.options.calibration_size must be a number of items (int >= 1) or a fraction of the training set "
            f"(0 < float < 1, e.g. 0.01 as in the paper), got {size!r}"
        )
    exclude = options["exclude"]
    if exclude is not None and not (isinstance(exclude, str) and Path(exclude).is_dir()):
        problems.append(f"method.options.exclude {exclude!r} is not an adapter folder (give the path save wrote)")
    try:
        # The budget itself needs the model (match_lora), so a stand-in count of 1 checks everything else here.
        S2FTConfig(
            ratios=None if budgeted else options["ratios"],
            target_params=(options["target_params"] or 1) if budgeted else None,
            target_split=options["target_split"],
            strategy=options["strategy"],
            order=options["order"],
            seed=options["seed"],
            allocation=options["allocation"],
            layers=options["layers"],
            layout=options["layout"],
        )
    except S2FTConfigError as err:
        problems += [f"method.options: {line.strip()[2:]}" for line in str(err).splitlines()[1:]]
    return problems


def _check_data(data: dict, data_dir: Path) -> list[str]:
    from s2ft.data.checks import check_train_spec

    problems = check_train_spec(data.get("train"), data_dir)
    for key in ("max_length", "batch_size"):
        if not _positive_int(data.get(key)):
            problems.append(f"data.{key} must be an int >= 1, got {data.get(key)!r}")
    if data.get("limit") is not None and not _positive_int(data["limit"]):
        problems.append(f"data.limit must be null or an int >= 1, got {data['limit']!r}")
    val_size = data.get("val_size", 0)
    if not _number(val_size) or val_size < 0 or (isinstance(val_size, float) and not 0 <= val_size < 1):
        problems.append(f"data.val_size must be a count >= 0 or a fraction in (0, 1), got {val_size!r}")
    return problems


def _check_eval(ev: dict, data_dir: Path) -> list[str]:
    from s2ft.data.checks import check_heldout_spec
    from s2ft.evaluation.checks import check_task_spec

    mode = ev.get("mode", "generate") if ev.get("mode", "generate") in EVAL_MODES else "generate"
    problems = check_task_spec(ev.get("tasks"), data_dir, ev.get("groups"), mode)
    problems += check_heldout_spec(ev.get("heldout"), data_dir)
    if ev.get("groups") is not None and not isinstance(ev["groups"], dict):
        problems.append(f"eval.groups must map group names to lists of tasks, got {ev['groups']!r}")
    if ev.get("backend", "s2ft") not in EVAL_BACKENDS:
        problems.append(f"eval.backend must be one of {EVAL_BACKENDS}, got {ev.get('backend')!r}")
    elif ev.get("backend") == "lm_eval" and importlib.util.find_spec("lm_eval") is None:
        problems.append('eval.backend=lm_eval needs lm-evaluation-harness: pip install "s2ft[lmeval]"')
    if ev.get("mode", "generate") not in EVAL_MODES:
        problems.append(f"eval.mode must be one of {EVAL_MODES}, got {ev.get('mode')!r}")
    for key in ("limit", "heldout_limit", "max_new_tokens"):
        if ev.get(key) is not None and not _positive_int(ev[key]):
            problems.append(f"eval.{key} must be null or an int >= 1, got {ev[key]!r}")
    for key in ("batch_size", "num_beams"):
        if not _positive_int(ev.get(key, 1)):
            problems.append(f"eval.{key} must be an int >= 1, got {ev.get(key)!r}")
    return problems


def _check_trainer(tr: dict) -> list[str]:
    problems = []
    max_steps, max_epochs = tr.get("max_steps", -1), tr.get("max_epochs")
    if max_steps != -1 and not _positive_int(max_steps):
        problems.append(f"trainer.max_steps must be -1 or an int >= 1, got {max_steps!r}")
    if max_steps == -1 and not _positive_int(max_epochs):
        problems.append("trainer.max_steps is -1, so trainer.max_epochs must be an int >= 1")
    if not _positive_int(tr.get("accumulate_grad_batches", 1)):
        problems.append(f"trainer.accumulate_grad_batches must be an int >= 1, got {tr['accumulate_grad_batches']!r}")
    clip = tr.get("gradient_clip_val")
    if clip is not None and (not _number(clip) or clip < 0):
        problems.append(f"trainer.gradient_clip_val must be null or >= 0, got {clip!r}")
    warmup = tr.get("warmup_steps", 0)
    if not isinstance(warmup, int) or warmup < 0:
        problems.append(f"trainer.warmup_steps must be an int >= 0, got {warmup!r}")
    elif _positive_int(max_steps) and warmup >= max_steps:
        problems.append(f"trainer.warmup_steps ({warmup}) must be below trainer.max_steps ({max_steps})")
    if tr.get("scheduler", "linear") not in SCHEDULERS:
        problems.append(f"trainer.scheduler must be one of {SCHEDULERS}, got {tr.get('scheduler')!r}")
    if str(tr.get("precision", "32-true")) not in PRECISIONS:
        problems.append(f"trainer.precision must be one of {PRECISIONS}, got {tr.get('precision')!r}")
    if tr.get("select_best") not in SELECT_BEST:
        problems.append(f"trainer.select_best must be null or 'val_loss', got {tr.get('select_best')!r}")
    return problems


def _check_logger(logger: dict) -> list[str]:
    if logger.get("name") not in LOGGERS:
        return [f"logger.name must be one of {LOGGERS}, got {logger.get('name')!r} (use logger=wandb|csv|none)"]
    return []


def _check_sources(cfg: dict, mode: str) -> list[str]:
    problems = []
    run_dir, adapter, ckpt = cfg.get("run_dir"), cfg.get("adapter"), cfg.get("ckpt_path")
    if mode == "eval" and run_dir is None and adapter is None and cfg["method"].get("name") != "none":
        problems.append("mode=eval needs run_dir=PATH (a finished run), adapter=PATH, or method=none (the base model)")
    if run_dir is not None and not (Path(run_dir) / "adapter").is_dir():
        problems.append(f"run_dir {run_dir!r} has no adapter/ folder; point it at a finished run directory")
    if adapter is not None and not Path(adapter).is_dir():
        problems.append(f"adapter {adapter!r} is not a folder; give the adapter/ folder of a run")
    if ckpt is not None and ckpt not in ("last", "auto") and not Path(ckpt).is_file():
        problems.append(f"ckpt_path {ckpt!r} is neither 'last', 'auto' nor a checkpoint file")
    return problems
