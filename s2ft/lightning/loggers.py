"""Experiment loggers from the `logger` config group: W&B (offline by default), CSV, or none."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

WANDB_ID_FILE = "wandb_id.txt"


def build_logger(logger_cfg: dict, cfg: dict, run_dir: Path):
    """The Lightning logger for a run, or False for `logger=none`.

    W&B runs offline unless `logger.mode=online`; its run id is kept in `run_dir/wandb_id.txt` so a resumed run
    (`ckpt_path=last`) continues the same W&B run.

    Args:
        logger_cfg: The `logger` group (`name`, and for W&B `project`, `mode`, `tags`).
        cfg: The full resolved config (logged as hyperparameters).
        run_dir: The run directory.
    """
    name = logger_cfg["name"]
    if name == "none":
        return False
    if name == "csv":
        from lightning.pytorch.loggers import CSVLogger

        logger = CSVLogger(save_dir=run_dir, name="", version="")
    else:
        from lightning.pytorch.loggers import WandbLogger

        os.environ["WANDB_MODE"] = logger_cfg.get("mode") or "offline"
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id + "\n")
        method = cfg["method"]["name"]
        logger = WandbLogger(
            project=logger_cfg.get("project") or "s2ft",
            group=cfg["name"],
            name=f"{cfg['name']}-{method}-seed{cfg['seed']}",
            tags=[method, cfg["model"]["name"], *(logger_cfg.get("tags") or [])],
            save_dir=str(run_dir),
            id=run_id,
            resume="allow",
        )
    logger.log_hyperparams(cfg)
    return logger


def wandb_info(logger) -> dict | None:
    """`{"id", "dir"}` of a W&B logger's run, else None."""
    from lightning.pytorch.loggers import WandbLogger

    if not isinstance(logger, WandbLogger):
        return None
    return {"id": logger.version, "dir": str(logger.experiment.dir)}
