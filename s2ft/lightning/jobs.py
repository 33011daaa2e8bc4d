"""The config each Hydra job of `run.py` runs, and a Hydra callback that validates every job before any starts.

`run.py`, `ValidateJobs` and the tests (`tests/conftest.py`) build a job's config with the same `job_config`, so what
is validated up front, and what a test composes, is what each job runs. The callback is registered in
conf/hydra/default.yaml.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hydra import compose
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from s2ft.errors import UserError
from s2ft.run_config import RunConfigError, message, validate_run_config


def job_config(cfg: DictConfig, hydra_cfg: DictConfig) -> dict[str, Any]:
    """The resolved config (a plain dict) of the job that Hydra composed as `cfg`, with `debug=NAME` applied last.

    Args:
        cfg: The job's config, without its `hydra` node.
        hydra_cfg: The job's `hydra` node (runtime choices, task overrides and config sources).

    Raises:
        RunConfigError: If an interpolation does not resolve (one line per key), so that run.py and the multirun
            check report it as a config problem instead of a traceback (or, in a callback, a warning).
    """
    debug = hydra_cfg.runtime.choices.get("debug")
    if debug not in (None, "null"):
        cfg = with_debug(cfg, _conf_dir(hydra_cfg) / "debug" / f"{debug}.yaml", task_overrides(hydra_cfg))
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        raise RunConfigError(message(unresolved(cfg) or [str(err).splitlines()[0]])) from None


def unresolved(node: DictConfig | ListConfig, prefix: str = "") -> list[str]:
    """One problem per key of `node` whose interpolation does not resolve, naming the key and the fix."""
    problems = []
    for key in node.keys() if isinstance(node, DictConfig) else range(len(node)):
        name = f"{prefix}[{key}]" if isinstance(node, ListConfig) else f"{prefix}.{key}" if prefix else str(key)
        try:
            value = node[key]
        except OmegaConfBaseException as err:
            why = str(err.msg).splitlines()[0] if err.msg else type(err).__name__
            problems.append(f"{name} does not resolve ({why}); fix the interpolation or set {name}=VALUE")
            continue
        if isinstance(value, DictConfig | ListConfig):
            problems += unresolved(value, name)
    return problems


def with_debug(cfg: DictConfig, debug_file: Path, overrides: list[str]) -> DictConfig:
    """Apply the debug file over everything, then the command line's key=value overrides again.

    `+experiment=X` is appended after `debug` in the defaults list, so Hydra alone lets an experiment undo
    `debug=smoke`; merging the debug file last makes it shrink any experiment, and re-applying the explicit
    key overrides (`trainer.max_steps=8`) keeps the command line the final word.
    """
    conf_dir = debug_file.parent.parent
    cfg = OmegaConf.merge(cfg, OmegaConf.load(debug_file))
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        is_group = "." not in key and (conf_dir / key.lstrip("+~")).is_dir()
        if is_group or key.startswith("hydra") or override.is_delete():
            continue
        OmegaConf.update(cfg, key, override.value(), merge=False, force_add=True)
    return cfg


def _conf_dir(hydra_cfg: DictConfig) -> Path:
    """The primary config folder (run.py's conf/)."""
    source = next(s for s in hydra_cfg.runtime.config_sources if s.provider == "main" and s.schema == "file")
    return Path(source.path)


def compose_job(overrides: list[str], config_name: str | None = "config") -> DictConfig:
    """The config Hydra composes for `run.py OVERRIDES`, its `hydra` node included (in an initialized Hydra)."""
    return compose(config_name=config_name, overrides=overrides, return_hydra_config=True)


def resolved_job(cfg: DictConfig) -> dict[str, Any]:
    """`job_config` of a config composed with its `hydra` node (`compose_job`, or the one a callback gets)."""
    return job_config(OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"]), cfg.hydra)


def task_overrides(hydra_cfg: DictConfig) -> list[str]:
    """The command line's key=value overrides as typed: iterating the config's list would resolve a `${...}` in them
    against the config (and raise, outside any check, where it does not resolve)."""
    return OmegaConf.to_container(hydra_cfg.overrides.task, resolve=False)


def sweep_jobs(cfg: DictConfig) -> list[list[str]]:
    """The override list of every job Hydra's basic sweeper launches for the multirun `cfg` (in launch order)."""
    params = OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=False) if cfg.hydra.sweeper.params else {}
    params = [f"{key}={value}" for key, value in params.items()]
    overrides = OverridesParser.create().parse_overrides([*params, *task_overrides(cfg.hydra)])
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def job_problems(config_name: str | None, overrides: list[str]) -> str | None:
    """The composition or validation error of the job `overrides` describe, None when it is fine."""
    return _checked_job(config_name, overrides)[1]


def _checked_job(config_name: str | None, overrides: list[str]) -> tuple[DictConfig | None, str | None]:
    """The job's composed config (None if it does not compose) and its composition or validation error."""
    try:
        cfg = compose_job(overrides, config_name)
        validate_run_config(resolved_job(cfg))
    except (UserError, HydraException) as err:
        return None, str(err)
    return cfg, None


def job_dir(multirun: DictConfig, job: DictConfig, num: int) -> Path:
    """The directory Hydra's launcher gives job `num` of `multirun`: its hydra.sweep.dir / hydra.sweep.subdir, resolved
    with the multirun's cached values (one ${now:...} for all jobs), as the launcher resolves them."""
    OmegaConf.copy_cache(from_config=multirun, to_config=job)
    with open_dict(job):
        job.hydra.job.num = num
    return Path(str(job.hydra.sweep.dir), str(job.hydra.sweep.subdir))


class ValidateJobs(Callback):
    """Refuses a run, or a whole multirun, before anything is written or trained when a job's config is wrong.

    A multirun lists every bad job at once (its index, its overrides, its problems), and every group of jobs that
    would write one directory, and runs none of them.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            validate_run_config(resolved_job(config))
        except UserError as err:
            sys.exit(f"error: {err}")

    def on_multirun_start(self, config: DictConfig, config_name: str | None = None, **kwargs: Any) -> None:
        if config.hydra.sweeper.get("_target_") != f"{BasicSweeper.__module__}.{BasicSweeper.__name__}":
            return  # another sweeper picks its own jobs; each job is still validated when it starts
        jobs = sweep_jobs(config)
        str(config.hydra.sweep.dir)  # resolved (and cached) here first, as the launcher does before any job
        bad, dirs, configs = [], {}, {}
        # The command line's hydra.* overrides (hydra.sweep.subdir=...) unresolved, as the launcher composes each job.
        hydra_overrides = OmegaConf.to_container(config.hydra.overrides.hydra, resolve=False)
        for i, job in enumerate(jobs):
            composed, problems = _checked_job(config_name, [*hydra_overrides, *job])
            if problems:
                bad.append((i, job, problems))
            else:
                dirs.setdefault(job_dir(config, composed, i), []).append(i)
                configs.setdefault(json.dumps(resolved_job(composed), sort_keys=True, default=str), []).append(i)
        shared = [(path, nums) for path, nums in dirs.items() if len(nums) > 1]
        # A sweep value given twice (seed=0,0; method.lr=1e-3,0.001) trains one config twice, and the report then
        # refuses the second run of one seed in a row.
        repeated = [nums for nums in configs.values() if len(nums) > 1]
        if bad or shared or repeated:
            report = [f"job {i} ({' '.join(job)}): {problems}" for i, job, problems in bad]
            report += [
                f"jobs {', '.join(map(str, nums))} would all write {path}: one run per directory, so give each job "
                "its own (hydra.sweep.subdir, by default ${hydra.job.num})"
                for path, nums in shared
            ]
            report += [
                f"jobs {', '.join(map(str, nums))} would all run one config ({' '.join(jobs[nums[0]])}): give each "
                "sweep value once"
                for nums in repeated
            ]
            count = len(bad) + len({i for _, nums in shared for i in nums} | {i for nums in repeated for i in nums})
            sys.exit(
                f"error: {count} of {len(jobs)} jobs of the multirun have config problems; none ran\n"
                + "\n".join(report)
            )
