"""Validation of the experiment config (a plain dict), in one place, before any model is loaded.

Every check appends to one list, so a user sees every problem of a config at once instead of one per run.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import yaml

from s2ft.adapter_format import CONFIG_NAME
from s2ft.checks import did_you_mean, is_number, is_positive_int
from s2ft.data.checks import check_heldout_spec, check_train_spec
from s2ft.data.prompt import TEMPLATES
from s2ft.data.tasks import GROUPS as TASK_GROUPS
from s2ft.data.tasks import TASKS
from s2ft.errors import UserError
from s2ft.evaluation.checks import check_task_spec
from s2ft.evaluation.mtbench import mtbench_config_problems
from s2ft.methods import METHODS, method_options, saved_method
from s2ft.models import DTYPES, MODEL_NAMES, MODEL_SHAPES, shape_model

MODES = ("train", "eval")
EVAL_MODES = ("generate", "loglik")
EVAL_BACKENDS = ("s2ft", "lm_eval")
SCHEDULERS = ("linear", "cosine")
LOGGERS = ("wandb", "csv", "none")
WANDB_MODES = ("offline", "online", "disabled")
PRECISIONS = ("32", "32-true", "bf16", "bf16-mixed", "bf16-true", "16-mixed", "64", "64-true")
SELECT_BEST = (None, "val_loss")
# What the runner supports: one process or DDP (Lightning's names), FSDP2 ("fsdp", s2ft.lightning.sharding).
STRATEGIES = ("auto", "ddp", "fsdp")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
GROUPS = ("paths", "model", "method", "data", "eval", "trainer", "logger")
# The config's schema: the keys each group may hold (those of conf/<group>/*.yaml; tests/test_safety_config.py checks
# that every key of every file is here). Any other key is a typo and an error. `method.options` is checked against the
# method's own DEFAULTS and rules (`Method.option_problems`; S2FT's: `s2ft.methods.s2ft.option_problems`).
SCHEMA: dict[str, tuple[str, ...]] = {
    "": (
        *GROUPS,
        *("name", "seed", "mode", "run_dir", "adapter", "adapters", "ckpt_path", "overwrite"),
        *("save_merged", "save_lora"),
        # Experiment helpers that method and lr interpolations read: the generalization studies' budget (fraction)
        # and per-method rates, the paper fusion study's per-leg rates.
        *("budget", "budget_lr", "leg_lr", "s2ft_budget"),
    ),
    "paths": ("root", "data_dir", "output_dir", "cache_dir"),
    "model": ("name", "dtype", "gradient_checkpointing", "cache_dir"),
    "method": ("name", "lr", "weight_decay", "betas", "options"),
    "data": ("train", "limit", "val_size", "max_length", "batch_size", "allow_overlap", "overlap_tasks", "template"),
    "eval": (
        *("tasks", "limit", "mode", "batch_size", "num_beams", "max_new_tokens", "before", "heldout"),
        *("heldout_limit", "mtbench", "groups", "backend", "lm_eval"),
    ),
    "trainer": (
        *("max_steps", "max_epochs", "accumulate_grad_batches", "gradient_clip_val", "precision", "accelerator"),
        *("devices", "strategy", "num_nodes", "warmup_steps", "scheduler", "log_every_n_steps", "val_check_interval"),
        *("select_best", "select_best_after", "checkpoint_every_n_steps"),
    ),
    "logger": ("name", "project", "mode", "tags"),
}


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
    for group in GROUPS:
        if not isinstance(cfg.get(group), dict):
            problems.append(f"config group {group!r} is missing (check conf/config.yaml defaults)")
    if problems:
        raise RunConfigError(message(problems))
    problems += unknown_keys(cfg)
    mode = cfg.get("mode", "train")
    if mode not in MODES:
        problems.append(f"mode must be one of {MODES}, got {mode!r}")
    name = cfg.get("name")
    if not isinstance(name, str) or not name.strip() or name in (".", "..") or "/" in name:
        # It names the run directory (outputs/NAME/...) and the W&B group: name=null ran into outputs/None/.
        problems.append(f"name must be a non-empty experiment name without '/', got {name!r} (e.g. name=my_study)")
    if not isinstance(cfg.get("seed"), int) or isinstance(cfg.get("seed"), bool):
        problems.append(f"seed must be an int, got {cfg.get('seed')!r}")
    problems += _check_flags(cfg)
    problems += _check_model(cfg["model"], training=mode == "train")
    problems += _check_method(cfg["method"], training=mode == "train", model=cfg["model"].get("name"))
    data_dir = Path(cfg["paths"].get("data_dir") or "data")
    if not data_dir.is_dir():
        problems.append(f"paths.data_dir {str(data_dir)!r} is not a directory (set paths.data_dir=/path/to/data)")
    if mode == "train":
        problems += _check_data(cfg["data"], data_dir, cfg["eval"])
        problems += _check_trainer(cfg["trainer"])
        problems += _check_batches(cfg["data"], cfg["trainer"])
    problems += _check_eval(cfg["eval"], data_dir)
    if cfg["data"].get("template", "alpaca") not in TEMPLATES:
        problems.append(f"data.template must be one of {TEMPLATES}, got {cfg['data'].get('template')!r}")
    problems += _check_logger(cfg["logger"])
    problems += _check_sources(cfg, mode) if cfg.get("adapters") is None else _check_adapters(cfg, mode)
    if mode == "train" and cfg["trainer"].get("select_best") and not cfg["data"].get("val_size"):
        problems.append("trainer.select_best needs a validation split: set data.val_size > 0")
    if cfg.get("save_lora") and (mode != "train" or cfg["method"].get("name") != "s2ft"):
        problems.append(
            "save_lora=true exports a trained S2FT adapter as a LoRA: use it with method=s2ft (mode=train); for a "
            "finished run, call s2ft.export_lora(RUN/adapter, OUT, base)"
        )
    if problems:
        raise RunConfigError(message(problems))


def unknown_keys(cfg: dict[str, Any]) -> list[str]:
    """One problem per key of `cfg` that `SCHEMA` does not know, naming the nearest valid key."""
    problems = []
    for group, valid in SCHEMA.items():
        section = cfg.get(group, {}) if group else cfg
        prefix = f"{group}." if group else ""
        for key in section:
            if key not in valid:
                problems.append(f"unknown key {prefix}{key}; {did_you_mean(key, valid, prefix)}")
    return problems


def message(problems: list[str]) -> str:
    """The text of a RunConfigError listing `problems`."""
    return f"{len(problems)} problem(s) in the config:\n  - " + "\n  - ".join(problems)


# On/off keys: a string there ("no", "off") is truthy, so it turned the setting on (overwrite=no replaced a run).
FLAGS = ("overwrite", "save_merged", "save_lora", "data.allow_overlap", "model.gradient_checkpointing", "eval.before")


def _check_flags(cfg: dict[str, Any]) -> list[str]:
    problems = []
    for key in FLAGS:
        group, _, name = key.rpartition(".")
        value = (cfg[group] if group else cfg).get(name)
        if value is not None and not isinstance(value, bool):
            problems.append(f"{key} must be true or false, got {value!r}")
    return problems


def _is_list_spec(value) -> bool:
    """A name, a definition, or a list of them (data.train, eval.tasks, eval.heldout, data.overlap_tasks)."""
    return isinstance(value, str | dict | list)


def _check_model(model: dict, training: bool) -> list[str]:
    problems = []
    name = model.get("name")
    # Anything with a "/" is a hub id or a local folder; those are only checked when loaded.
    if not isinstance(name, str) or (name not in MODEL_NAMES and "/" not in name and not Path(name).is_dir()):
        problems.append(f"unknown model.name {name!r}; use one of {', '.join(MODEL_NAMES)}, a hub id or a folder")
    if model.get("dtype", "float32") not in DTYPES:
        problems.append(f"model.dtype must be one of {sorted(DTYPES)}, got {model.get('dtype')!r}")
    elif model.get("dtype") == "float16" and training:
        # Without loss scaling fp16 gradients underflow and the loss overflows: NaN from the first steps.
        problems.append("model.dtype=float16 trains without loss scaling (NaN losses); use bfloat16 or float32")
    return problems


def _check_method(method: dict, training: bool, model: Any = None) -> list[str]:
    name = method.get("name")
    if name not in METHODS:
        return [f"unknown method.name {name!r}; use one of {sorted(METHODS)}"]
    problems = []
    if training and not METHODS[name].trains:
        problems.append(f"method {name!r} trains nothing; use mode=eval with it, or pick a method that trains")
    if training and METHODS[name].trains:
        if not is_number(method.get("lr")) or method["lr"] <= 0:
            problems.append(f"method.lr must be a finite number > 0, got {method.get('lr')!r}")
        if not is_number(method.get("weight_decay", 0.0)) or method.get("weight_decay", 0.0) < 0:
            problems.append(f"method.weight_decay must be a finite number >= 0, got {method.get('weight_decay')!r}")
        betas = method.get("betas")
        if betas is not None and not (
            isinstance(betas, list | tuple) and len(betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in betas)
        ):
            problems.append(f"method.betas must be AdamW's [beta1, beta2], each in [0, 1), got {betas!r}")
    options = method.get("options") or {}
    if not isinstance(options, dict):
        return problems + [f"method.options must map option names to values, got {options!r}"]
    defaults = METHODS[name].defaults
    if name != "s2ft":
        # Options only S2FT takes: seeing them on another method means the user mixed up configs.
        stray = sorted(set(options) & set(METHODS["s2ft"].defaults) - set(defaults))
        if stray:
            problems.append(f"S2FT options {stray} on a {name} run; remove them from method.options")
            options = {key: value for key, value in options.items() if key not in stray}
    try:
        options = method_options(name, options)
    except ValueError as err:
        # The options it does take are still checked: every problem at once.
        problems.append(str(err))
        options = method_options(name, {key: value for key, value in options.items() if key in defaults})
    found = METHODS[name].option_problems(options)
    if (
        training
        and METHODS[name].trains
        and not found
        and not problems
        and isinstance(model, str)
        and model in MODEL_SHAPES
    ):
        # On a meta-device copy of the model's shape: otherwise these show only once the method is applied, after
        # the model loaded and the untrained model was evaluated (hours at paper scale).
        found = [f"{problem} (model {model})" for problem in METHODS[name].fit_problems(shape_model(model), options)]
    return problems + found


def _check_data(data: dict, data_dir: Path, ev: dict) -> list[str]:
    train = data.get("train")
    if train and not _is_list_spec(train):
        problems = [f"data.train must be a list of sources (names, files, {{path: ..}}), got {train!r}"]
    else:
        problems = check_train_spec(train, data_dir)
    overlap = data.get("overlap_tasks")
    if overlap is not None and not _is_list_spec(overlap):
        problems.append(f"data.overlap_tasks must be null or a list of tasks, got {overlap!r}")
    elif overlap:
        groups = ev.get("groups") if isinstance(ev.get("groups"), dict) else None
        problems += check_task_spec(overlap, data_dir, groups, key="data.overlap_tasks")
    if not is_positive_int(data.get("batch_size")):
        problems.append(f"data.batch_size must be an int >= 1, got {data.get('batch_size')!r}")
    if not is_positive_int(data.get("max_length")) or data["max_length"] < 2:
        problems.append(f"data.max_length must be an int >= 2 (prompt + response), got {data.get('max_length')!r}")
    if data.get("limit") is not None and not is_positive_int(data["limit"]):
        problems.append(f"data.limit must be null or an int >= 1, got {data['limit']!r}")
    val_size = data.get("val_size", 0)
    if not is_number(val_size) or val_size < 0 or (isinstance(val_size, float) and not 0 <= val_size < 1):
        problems.append(f"data.val_size must be a count >= 0 or a fraction in (0, 1), got {val_size!r}")
    return problems


def process_count(tr: dict) -> int:
    """The training processes a ``trainer`` config starts, as far as the config says: a list names the devices, and
    auto and -1 (every device) are counted at run time, so as at least one."""
    devices, nodes = tr.get("devices", 1), tr.get("num_nodes", 1)
    per_node = len(devices) if isinstance(devices, list | tuple) else devices if is_positive_int(devices) else 1
    return per_node * (nodes if is_positive_int(nodes) else 1)


def _check_batches(data: dict, tr: dict) -> list[str]:
    """With `data.limit`, the items left after the validation split must fill one batch on every process, and an
    epoch the batches one optimizer step accumulates."""
    limit, val_size, batch = data.get("limit"), data.get("val_size") or 0, data.get("batch_size")
    if not (is_positive_int(limit) and is_positive_int(batch) and is_number(val_size) and val_size >= 0):
        return []
    processes = process_count(tr)
    held = max(1, round(val_size * limit)) if isinstance(val_size, float) and val_size > 0 else int(val_size)
    if held >= limit:
        return [f"data.val_size={val_size} leaves no training items out of data.limit={limit}; lower data.val_size"]
    if limit - held < batch * processes:
        return [
            f"data.limit={limit} leaves {limit - held} training items (after data.val_size={val_size}), fewer than one "
            f"batch of data.batch_size={batch} on {processes} process(es); raise data.limit or lower data.batch_size"
        ]
    batches, accumulate = (limit - held) // (batch * processes), tr.get("accumulate_grad_batches", 1)
    if is_positive_int(accumulate) and accumulate > batches:
        # Lightning steps at the end of an epoch whatever is accumulated: every step would see one epoch, not this.
        return [
            f"trainer.accumulate_grad_batches={accumulate} asks for more batches per optimizer step than an epoch "
            f"holds ({batches} of data.batch_size={batch} from data.limit={limit}, data.val_size={val_size}, on "
            f"{processes} process(es)); lower trainer.accumulate_grad_batches to at most {batches} or raise data.limit"
        ]
    return []


def _check_eval(ev: dict, data_dir: Path) -> list[str]:
    mode = ev.get("mode", "generate") if ev.get("mode", "generate") in EVAL_MODES else "generate"
    groups = ev.get("groups") if isinstance(ev.get("groups"), dict) else None  # a bad one is reported below
    problems = []
    tasks, heldout = ev.get("tasks"), ev.get("heldout")
    if tasks and not _is_list_spec(tasks):
        problems.append(f"eval.tasks must be a list of tasks (names, groups, definitions), got {tasks!r}")
    else:
        problems += check_task_spec(tasks, data_dir, groups, mode)
    if heldout and not _is_list_spec(heldout):
        problems.append(f"eval.heldout must be a list of held-out sets, got {heldout!r}")
    else:
        problems += check_heldout_spec(heldout, data_dir)
    if ev.get("groups") is not None and not isinstance(ev["groups"], dict):
        problems.append(f"eval.groups must map group names to lists of tasks, got {ev['groups']!r}")
    # A user group under a registered name would stand in for it: a registered task or group named in eval.tasks
    # would run the user's members, and the summary's groups (the report's ID / OOD averages) hold the user's mean.
    shadowing = [name for name in groups or {} if str(name).lower() in TASKS or str(name).lower() in TASK_GROUPS]
    if shadowing:
        problems.append(
            f"eval.groups: user group(s) {', '.join(map(repr, shadowing))} would stand in for the registered task or "
            "group of that name; give each user group another name"
        )
    if ev.get("backend", "s2ft") not in EVAL_BACKENDS:
        problems.append(f"eval.backend must be one of {EVAL_BACKENDS}, got {ev.get('backend')!r}")
    elif ev.get("backend") == "lm_eval" and importlib.util.find_spec("lm_eval") is None:
        problems.append('eval.backend=lm_eval needs lm-evaluation-harness: pip install "s2ft[lmeval]"')
    if ev.get("mode", "generate") not in EVAL_MODES:
        problems.append(f"eval.mode must be one of {EVAL_MODES}, got {ev.get('mode')!r}")
    for key in ("limit", "heldout_limit", "max_new_tokens"):
        if ev.get(key) is not None and not is_positive_int(ev[key]):
            problems.append(f"eval.{key} must be null or an int >= 1, got {ev[key]!r}")
    for key in ("batch_size", "num_beams"):
        if not is_positive_int(ev.get(key, 1)):
            problems.append(f"eval.{key} must be an int >= 1, got {ev.get(key)!r}")
    if ev.get("mtbench") is not None:
        problems += [f"eval.mtbench: {problem}" for problem in mtbench_config_problems(ev["mtbench"], data_dir)]
    return problems


def _check_trainer(tr: dict) -> list[str]:
    problems = []
    max_steps, max_epochs = tr.get("max_steps", -1), tr.get("max_epochs")
    if max_steps != -1 and not is_positive_int(max_steps):
        problems.append(f"trainer.max_steps must be -1 or an int >= 1, got {max_steps!r}")
    if max_epochs is not None and max_epochs != -1 and not is_positive_int(max_epochs):
        # 0 would train nothing and still write results; Lightning refuses the rest with a traceback.
        problems.append(
            f"trainer.max_epochs must be null, -1 (no limit: trainer.max_steps stops training) or an int >= 1, got "
            f"{max_epochs!r}"
        )
    elif max_steps == -1 and not is_positive_int(max_epochs):
        problems.append("trainer.max_steps is -1, so trainer.max_epochs must be an int >= 1")
    if not is_positive_int(tr.get("accumulate_grad_batches", 1)):
        problems.append(f"trainer.accumulate_grad_batches must be an int >= 1, got {tr['accumulate_grad_batches']!r}")
    clip = tr.get("gradient_clip_val")
    if clip is not None and (not is_number(clip) or clip < 0):
        problems.append(f"trainer.gradient_clip_val must be null or >= 0, got {clip!r}")
    warmup = tr.get("warmup_steps", 0)
    if not isinstance(warmup, int) or warmup < 0:
        problems.append(f"trainer.warmup_steps must be an int >= 0, got {warmup!r}")
    elif is_positive_int(max_steps) and warmup >= max_steps:
        problems.append(f"trainer.warmup_steps ({warmup}) must be below trainer.max_steps ({max_steps})")
    if tr.get("scheduler", "linear") not in SCHEDULERS:
        problems.append(f"trainer.scheduler must be one of {SCHEDULERS}, got {tr.get('scheduler')!r}")
    if str(tr.get("precision", "32-true")) not in PRECISIONS:
        problems.append(f"trainer.precision must be one of {PRECISIONS}, got {tr.get('precision')!r}")
    if tr.get("strategy", "auto") not in STRATEGIES:
        problems.append(f"trainer.strategy must be one of {STRATEGIES}, got {tr.get('strategy')!r}")
    if tr.get("accelerator", "cpu") not in ACCELERATORS:
        problems.append(f"trainer.accelerator must be one of {ACCELERATORS}, got {tr.get('accelerator')!r}")
    devices = tr.get("devices", 1)
    listed = isinstance(devices, list) and devices and all(isinstance(d, int) and d >= 0 for d in devices)
    if not (devices in ("auto", -1) or is_positive_int(devices) or listed):
        problems.append(
            f"trainer.devices must be an int >= 1, -1 (all), 'auto' or a list of device ids, got {devices!r}"
        )
    elif listed and tr.get("accelerator") not in ("gpu", "cuda"):  # Lightning: a TypeError on the CPU
        problems.append(f"trainer.devices={devices} lists GPU ids: set trainer.accelerator=gpu, or give a count")
    for key in ("num_nodes", "log_every_n_steps", "checkpoint_every_n_steps"):
        if key in tr and not is_positive_int(tr[key]):
            problems.append(f"trainer.{key} must be an int >= 1, got {tr[key]!r}")
    interval = tr.get("val_check_interval")
    if interval is not None and not (is_positive_int(interval) or (isinstance(interval, float) and 0 < interval <= 1)):
        problems.append(
            "trainer.val_check_interval must be null, a number of training batches (int >= 1) or a fraction of an "
            f"epoch in (0, 1], got {interval!r}"
        )
    elif is_positive_int(interval) and is_positive_int(accumulate := tr.get("accumulate_grad_batches", 1)):
        if interval % accumulate:
            # It counts batches: validation fell inside an accumulation, twice in one optimizer step when below it,
            # and the validation loss was logged for a step whose update had not happened yet.
            problems.append(
                f"trainer.val_check_interval={interval} counts training batches, and is not a multiple of "
                f"trainer.accumulate_grad_batches={accumulate}: validation would run inside an optimizer step; use "
                + " or ".join(map(str, whole_steps_near(interval, accumulate)))
            )
    if tr.get("select_best") not in SELECT_BEST:
        problems.append(f"trainer.select_best must be null or 'val_loss', got {tr.get('select_best')!r}")
    after = tr.get("select_best_after", 0.0)
    if not is_number(after) or not 0 <= after < 1:
        problems.append(f"trainer.select_best_after must be a fraction of training in [0, 1), got {after!r}")
    return problems


def whole_steps_near(batches: int, accumulate: int) -> list[int]:
    """The batch counts of whole optimizer steps nearest ``batches`` (below and above; at least one step)."""
    return sorted({max(accumulate, batches // accumulate * accumulate), -(-batches // accumulate) * accumulate})


def _check_logger(logger: dict) -> list[str]:
    if logger.get("name") not in LOGGERS:
        return [f"logger.name must be one of {LOGGERS}, got {logger.get('name')!r} (use logger=wandb|csv|none)"]
    problems = []
    # W&B reads these only once the model has trained: a bad mode stopped a finished run's logging with a traceback.
    if logger.get("mode") is not None and logger["mode"] not in WANDB_MODES:
        problems.append(f"logger.mode must be one of {WANDB_MODES}, got {logger['mode']!r}")
    project = logger.get("project")
    if project is not None and (not isinstance(project, str) or not project.strip()):
        problems.append(f"logger.project must be a W&B project name, got {project!r}")
    tags = logger.get("tags")
    if tags is not None and not (isinstance(tags, list) and all(isinstance(tag, str) and tag for tag in tags)):
        problems.append(f"logger.tags must be a list of non-empty strings, got {tags!r} (e.g. logger.tags=[ablation])")
    return problems


def _check_sources(cfg: dict, mode: str) -> list[str]:
    problems = []
    run_dir, adapter, ckpt = cfg.get("run_dir"), cfg.get("adapter"), cfg.get("ckpt_path")
    # Anything but a string (ckpt_path=true, run_dir=3) would reach Path() below, whose TypeError is a traceback.
    if ckpt is not None and not isinstance(ckpt, str):
        problems.append(f"ckpt_path must be 'last', 'auto' or a checkpoint file, got {ckpt!r} (e.g. ckpt_path=auto)")
        ckpt = None
    for key, value in (("run_dir", run_dir), ("adapter", adapter)):
        if value is not None and not isinstance(value, str):
            problems.append(f"{key} must be a path to a folder, got {value!r}")
    if mode == "eval" and run_dir is None and adapter is None and cfg["method"].get("name") != "none":
        problems.append(
            "mode=eval needs run_dir=PATH (a finished run), adapter=PATH, adapters=[PATH,...] (several S2FT "
            "adapters in one pass), or method=none (the base model)"
        )
    run_dir = run_dir if isinstance(run_dir, str) else None
    adapter = adapter if isinstance(adapter, str) else None
    if run_dir is not None and not Path(run_dir).is_dir():
        # A relative run_dir is read from the working directory: "has no adapter/ folder" hid a folder not there.
        problems.append(
            f"run_dir {run_dir!r} does not exist (a relative path is read from the working directory, "
            f"{Path.cwd()}); point it at a finished run directory"
        )
    elif run_dir is not None and not (Path(run_dir) / "adapter").is_dir():
        problems.append(f"run_dir {run_dir!r} has no adapter/ folder; point it at a finished run directory")
    if adapter is not None and not Path(adapter).is_dir():
        problems.append(f"adapter {adapter!r} is not a folder; give the adapter/ folder of a run")
    elif adapter is not None and run_dir is None:
        saved, method = saved_method(adapter), cfg["method"].get("name")
        if saved is not None and saved != method:
            problems.append(f"adapter {adapter!r} holds a {saved} adapter, not {method}: set method={saved}")
    if ckpt is not None and ckpt not in ("last", "auto") and not Path(ckpt).is_file():
        problems.append(f"ckpt_path {ckpt!r} is neither 'last', 'auto' nor a checkpoint file")
    return problems


def adapter_sources(spec: list | dict) -> list[tuple[str, Path]]:
    """(name, folder) of every source of ``adapters``: a name -> path mapping as given, or a list of paths, each
    named by its folder (by its run directory for a run's ``adapter/`` folder)."""
    if isinstance(spec, dict):
        return [(str(name), Path(path)) for name, path in spec.items()]
    paths = [Path(path) for path in spec]
    return [(path.parent.name if path.name == "adapter" else path.name, path) for path in paths]


def single_source(cfg: dict[str, Any], path: Path) -> dict[str, Any]:
    """The one-adapter ``mode=eval`` config that evaluates the ``adapters`` source ``path`` alone: ``run_dir=PATH``
    for a run directory (a folder with ``adapter/``), else ``adapter=PATH``."""
    return {**cfg, "adapters": None, ("run_dir" if (path / "adapter").is_dir() else "adapter"): str(path)}


def _check_adapters(cfg: dict[str, Any], mode: str) -> list[str]:
    """``adapters``: several S2FT adapters of one base model, evaluated in one batched pass (mode=eval)."""
    spec = cfg["adapters"]
    if mode != "eval":
        return ["adapters=[...] evaluates saved adapters: use it with mode=eval"]
    if cfg.get("run_dir") is not None or cfg.get("adapter") is not None:
        return ["give adapters=[...] or run_dir / adapter, not both (add the run to adapters)"]
    well_formed = (isinstance(spec, list) and all(isinstance(path, str) for path in spec)) or (
        isinstance(spec, dict) and all(isinstance(path, str) for path in spec.values())
    )
    if not spec or not well_formed:
        return [
            f"adapters must be a list of run directories or adapter folders, or a name -> path mapping, got {spec!r}"
        ]
    ev = cfg["eval"]
    problems = [
        f"adapters: {why}; evaluate the adapters one at a time (mode=eval run_dir=PATH) for it"
        for unsupported, why in (
            (ev.get("num_beams", 1) != 1, "mixed-adapter batches decode greedily, not with eval.num_beams > 1"),
            (bool(ev.get("mtbench")), "eval.mtbench is not evaluated in the batched pass"),
            (ev.get("backend", "s2ft") != "s2ft", "eval.backend=lm_eval is not run in the batched pass"),
        )
        if unsupported
    ]
    sources = adapter_sources(spec)
    names = [name for name, _ in sources]
    for name in sorted({name for name in names if names.count(name) > 1}):
        paths = [str(path) for other, path in sources if other == name]
        problems.append(f"adapters {paths} would all be named {name!r}; name them: adapters={{NAME: PATH, ...}}")
    bases = {}
    for name, path in sources:
        if not name or "." in name or "/" in name or name == "__base__":
            problems.append(f"adapter name {name!r} ({path}) cannot be used; name it: adapters={{NAME: PATH, ...}}")
        if not path.is_dir():
            problems.append(f"adapters: {str(path)!r} is not a folder; give run directories or adapter folders")
            continue
        single = single_source(cfg, path)
        key = "run_dir" if single.get("run_dir") else "adapter"
        folder = path / "adapter" if key == "run_dir" else path
        method = saved_method(folder)
        if method is None:
            # Not "holds a unknown adapter ... S2FT adapters only": an S2FT folder whose config is gone or corrupt.
            config = folder / CONFIG_NAME
            why = "is missing" if not config.is_file() else "is not an adapter's (corrupt, or written by another tool)"
            problems.append(
                f"adapters: {path} is not a saved adapter: {config} {why}; give run directories or the adapter "
                "folders that s2ft.save_adapter wrote"
            )
            continue
        if method != "s2ft":
            problems.append(
                f"adapters: {path} holds a {method} adapter; the batched pass serves S2FT adapters only: "
                f"evaluate it alone with mode=eval {key}={path}"
            )
            continue
        found = _check_sources(single, mode)
        if found:
            problems += [f"adapters: {problem}" for problem in found]
            continue
        model_cfg = cfg["model"]
        if key == "run_dir":
            try:
                saved = yaml.safe_load((path / "config.yaml").read_text())
            except (OSError, yaml.YAMLError):
                saved = None
            if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
                problems.append(f"adapters: {path} has no readable config.yaml; point it at a finished run directory")
                continue
            model_cfg = saved["model"]
        recorded = json.loads((folder / CONFIG_NAME).read_text())
        bases[name] = (model_cfg.get("name"), model_cfg.get("dtype", "float32"), recorded.get("fingerprint"))
    if len({base[:2] for base in bases.values()}) > 1 or len({b[2] for b in bases.values() if b[2]}) > 1:
        listing = ", ".join(f"{name}: {model} {dtype}" for name, (model, dtype, _) in bases.items())
        problems.append(
            f"adapters were trained on different base models ({listing}); one pass evaluates adapters of one base "
            "model: give each base model's adapters their own command"
        )
    return problems
