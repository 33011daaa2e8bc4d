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
    # Imported here, not at the top, so that `run.py --help` and `--cfg job` answer in ~0.6 s without loading torch.
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from s2ft.errors import UserError
    from s2ft.lightning import run_experiment
    from s2ft.lightning.checkpoint import resume_command
    from s2ft.lightning.jobs import job_config

    hydra_cfg = HydraConfig.get()
    run_dir = hydra_cfg.runtime.output_dir
    # What Hydra writes to .hydra/ itself (conf/hydra/default.yaml turns that off: it writes before any check); the
    # runner writes it once every check has accepted the command.
    record = {
        "config.yaml": OmegaConf.to_yaml(cfg),
        "hydra.yaml": OmegaConf.to_yaml(HydraConfig.instance().cfg),
        "overrides.yaml": OmegaConf.to_yaml(hydra_cfg.overrides.task),
    }
    try:
        run_experiment(job_config(cfg, hydra_cfg), run_dir, record)
    except UserError as err:  # bad input, or a stop on SIGTERM / Ctrl-C (RunInterrupted names the resume command)
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:  # Ctrl-C outside training (loading, evaluating): auto resumes, finishes or restarts
        sys.exit(f"error: stopped by Ctrl-C (SIGINT); continue with: {resume_command(Path(run_dir), 'auto')}")


if __name__ == "__main__":
    main()
