"""Entry point: `python run.py [+experiment=NAME] [group=option ...] [key=value ...]` (README.md lists the configs)."""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("S2FT_ROOT", str(ROOT))


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from s2ft.errors import UserError
    from s2ft.lightning import run_experiment
    from s2ft.lightning.jobs import job_config

    hydra_cfg = HydraConfig.get()
    run_dir = hydra_cfg.runtime.output_dir
    try:
        run_experiment(job_config(cfg, hydra_cfg), run_dir)
    except UserError as err:
        sys.exit(f"error: {err}")
    except SIGTERMException:
        resume = f"python run.py <same overrides> hydra.run.dir={run_dir} ckpt_path=last"
        sys.exit(f"stopped by SIGTERM; the checkpoint is saved, resume with: {resume}")


if __name__ == "__main__":
    main()
