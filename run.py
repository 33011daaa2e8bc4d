"""Entry point: `python run.py [+experiment=NAME] [group=option ...] [key=value ...]` (README.md lists the configs)."""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("S2FT_ROOT", str(ROOT))


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from s2ft.errors import UserError
    from s2ft.lightning import run_experiment

    hydra_cfg = HydraConfig.get()
    debug = hydra_cfg.runtime.choices.get("debug")
    if debug not in (None, "null"):
        cfg = with_debug(cfg, debug, list(hydra_cfg.overrides.task))
    run_dir = hydra_cfg.runtime.output_dir
    try:
        run_experiment(OmegaConf.to_container(cfg, resolve=True), run_dir)
    except UserError as err:  # bad input, or a stop on SIGTERM / Ctrl-C (RunInterrupted names the resume command)
        sys.exit(f"error: {err}")


def with_debug(cfg: DictConfig, debug: str, overrides: list[str]) -> DictConfig:
    """Apply the debug file over everything, then the command line's key=value overrides again.

    `+experiment=X` is appended after `debug` in the defaults list, so Hydra alone lets an experiment undo
    `debug=smoke`; merging the debug file last makes it shrink any experiment, and re-applying the explicit
    key overrides (`trainer.max_steps=8`) keeps the command line the final word.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = OmegaConf.merge(cfg, OmegaConf.load(ROOT / "conf" / "debug" / f"{debug}.yaml"))
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        is_group = "." not in key and (ROOT / "conf" / key.lstrip("+~")).is_dir()
        if is_group or key.startswith("hydra") or override.is_delete():
            continue
        OmegaConf.update(cfg, key, override.value(), merge=False, force_add=True)
    return cfg


if __name__ == "__main__":
    main()
