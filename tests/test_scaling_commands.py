"""The multi-node commands of README "Scaling out", composed and turned into Trainers inside simulated clusters.

No cluster is needed: the torchrun and SLURM environments are the variables those launchers set for one process
(here rank 9 of 2 nodes x 8, on the second node); Lightning reads them when the Trainer is built. Only the
accelerator is swapped for the CPU, as this machine has no GPU.
"""

import re
import shlex

import pytest
from conftest import ROOT, compose_config, smoke_config
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.fabric.utilities.rank_zero import rank_zero_only as fabric_rank_zero_only
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from omegaconf import OmegaConf

from s2ft.lightning import runner
from s2ft.lightning.jobs import resolved_job
from s2ft.lightning.sharding import FSDP2Strategy
from s2ft.run_config import RunConfigError, validate_run_config

# What the shell would put in place of the README's variables.
SHELL = {"$NODE_RANK": "1", "$MASTER_ADDR": "node01", "$SLURM_JOB_ID": "4242"}
TORCHRUN_ENV = {
    "TORCHELASTIC_RUN_ID": "s2ft", "WORLD_SIZE": "16", "RANK": "9", "LOCAL_RANK": "1", "GROUP_RANK": "1",
    "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "node01", "MASTER_PORT": "29500",
}  # fmt: skip
SLURM_ENV = {
    "SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8", "SLURM_NNODES": "2", "SLURM_NODEID": "1",
    "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NODELIST": "node[01-02]", "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "s2ft",
}  # fmt: skip


def readme_commands() -> list[str]:
    """The command lines (and #SBATCH comments) of the bash block in README's "Scaling out" section."""
    text = (ROOT / "README.md").read_text()
    section = re.split(r"\n##+ ", text.split("### Scaling out", 1)[1], maxsplit=1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def command(prefix: str) -> list[str]:
    """The one README command line that starts with `prefix`, split as the shell would, variables filled in."""
    lines = [line for line in readme_commands() if line.startswith(prefix)]
    assert len(lines) == 1, (prefix, readme_commands())
    for name, value in SHELL.items():
        lines[0] = lines[0].replace(name, value)
    return shlex.split(lines[0], comments=True)


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def composed(argv: list[str]) -> dict:
    """The validated config `run.py` runs for the overrides after `run.py` in `argv`, its hydra node included."""
    overrides = [arg for arg in argv[argv.index("run.py") + 1 :] if arg != "-m"]
    cfg = compose_config(*overrides)
    plain = resolved_job(cfg)
    validate_run_config(plain)
    return {**plain, "hydra": OmegaConf.to_container(cfg.hydra, resolve=False)}


def trainer_in(env: dict[str, str], trainer_cfg: dict, monkeypatch, tmp_path):
    """The Trainer `run.py` builds in one process of that cluster (on the CPU)."""
    # Building it sets Lightning's process-wide rank (9 here); later tests in this process must stay rank 0.
    for rank_zero in {id(f): f for f in (fabric_rank_zero_only, rank_zero_only, utils_rank_zero_only)}.values():
        monkeypatch.setattr(rank_zero, "rank", getattr(rank_zero, "rank", 0))
    for name in {*TORCHRUN_ENV, *SLURM_ENV}:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return runner._trainer(
        {"trainer": {**trainer_cfg, "accelerator": "cpu"}}, tmp_path, None, has_val=False, preloaded=None
    )


def assert_rank_9_of_16(trainer, environment: type) -> None:
    env = trainer.strategy.cluster_environment
    assert isinstance(env, environment)
    assert (trainer.num_nodes, trainer.num_devices, trainer.world_size) == (2, 8, 16)
    assert (trainer.global_rank, trainer.local_rank, trainer.node_rank) == (9, 1, 1)
    assert env.main_address == "node01"


def test_single_node_fsdp_command():
    argv = command("python run.py +experiment=arith_llama trainer=fsdp")
    tr = composed(argv)["trainer"]
    assert (tr["strategy"], tr["num_nodes"], tr["devices"], tr["accelerator"]) == ("fsdp", 1, -1, "gpu")


def test_torchrun_command_builds_an_fsdp_trainer_of_rank_9(monkeypatch, tmp_path):
    argv = command("torchrun")
    cfg = composed(argv)
    tr = cfg["trainer"]
    assert (int(flag(argv, "--nnodes")), int(flag(argv, "--nproc-per-node"))) == (tr["num_nodes"], tr["devices"])
    assert tr["strategy"] == "fsdp" and cfg["hydra"]["run"]["dir"] == "outputs/arith_llama/fsdp"
    trainer = trainer_in(TORCHRUN_ENV, tr, monkeypatch, tmp_path)
    assert isinstance(trainer.strategy, FSDP2Strategy)
    assert_rank_9_of_16(trainer, TorchElasticEnvironment)


def test_ddp_multinode_is_the_ddp_twin(monkeypatch, tmp_path):
    argv = [arg.replace("fsdp_multinode", "ddp_multinode") for arg in command("torchrun")]
    trainer = trainer_in(TORCHRUN_ENV, composed(argv)["trainer"], monkeypatch, tmp_path)
    assert type(trainer.strategy) is DDPStrategy
    assert_rank_9_of_16(trainer, TorchElasticEnvironment)


@pytest.mark.parametrize(
    ("env", "names"),
    [({**TORCHRUN_ENV, "WORLD_SIZE": "8"}, r"world size \(8\)"), ({**SLURM_ENV, "SLURM_NNODES": "1"}, "--nodes=1")],
    ids=["torchrun", "slurm"],
)
def test_a_launcher_of_another_size_is_refused_by_name(env, names, monkeypatch, tmp_path):
    tr = composed(command("torchrun"))["trainer"]
    with pytest.raises(RunConfigError, match=rf"{names}.*trainer.devices .*trainer.num_nodes"):
        trainer_in(env, tr, monkeypatch, tmp_path)


def test_srun_command_matches_its_sbatch_allocation(monkeypatch, tmp_path):
    sbatch = next(line for line in readme_commands() if "#SBATCH" in line)
    allocation = dict(re.findall(r"--([\w-]+)=(\d+)", sbatch))
    cfg = composed(command("srun"))
    tr = cfg["trainer"]
    assert (int(allocation["nodes"]), int(allocation["ntasks-per-node"])) == (tr["num_nodes"], tr["devices"])
    assert int(allocation["gpus-per-node"]) == tr["devices"] and tr["accelerator"] == "gpu"
    assert cfg["hydra"]["run"]["dir"] == "outputs/arith_llama/4242"
    trainer = trainer_in(SLURM_ENV, tr, monkeypatch, tmp_path)
    assert isinstance(trainer.strategy, FSDP2Strategy)
    assert_rank_9_of_16(trainer, SLURMEnvironment)


def test_submitit_command_requests_what_the_trainer_uses(monkeypatch, tmp_path):
    argv = command("python run.py -m hydra/launcher=slurm")
    cfg = composed(argv)
    launcher, tr = cfg["hydra"]["launcher"], cfg["trainer"]
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (2, 8, 8)
    assert (tr["num_nodes"], tr["devices"], tr["strategy"]) == (2, 8, "fsdp")
    assert cfg["hydra"]["sweep"]["dir"] == "outputs/studies/arith_llama"
    # submitit starts every task with srun: the SLURM variables of that allocation.
    trainer = trainer_in(SLURM_ENV, tr, monkeypatch, tmp_path)
    assert_rank_9_of_16(trainer, SLURMEnvironment)


def test_a_launcher_mismatch_leaves_the_fixed_run_directory_empty_for_the_corrected_command(monkeypatch, tmp_path):
    """The multi-node commands share one fixed hydra.run.dir. A refused launcher size wrote the logger's first file
    (hparams.yaml; W&B: wandb_id.txt) before the Trainer was built, so the corrected command in that directory was
    refused as 'already holds a run's outputs'."""
    one_node = {**TORCHRUN_ENV, "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4", "RANK": "0", "LOCAL_RANK": "0"}
    run_dir = tmp_path / "fixed"
    with monkeypatch.context() as patch:
        for name, value in {**one_node, "GROUP_RANK": "0"}.items():
            patch.setenv(name, value)
        with pytest.raises(RunConfigError, match=r"world size \(4\)"):
            runner.run_experiment(smoke_config("trainer.devices=2", "trainer.strategy=ddp", logger="csv"), run_dir)
    assert not run_dir.exists()  # refused before the run directory is made: nothing in the way of the fix
    assert runner.run_experiment(smoke_config(logger="csv"), run_dir)["train"]["steps"] == 4


def test_more_devices_than_the_machine_has_is_one_config_error_and_writes_nothing(tmp_path):
    """Lightning's MisconfigurationException (here no GPU at all; on a GPU node fewer than 64) was a traceback."""
    run_dir = tmp_path / "run"
    with pytest.raises(RunConfigError, match=r"trainer\.accelerator='gpu' with trainer\.devices=64 does not fit this"):
        runner.run_experiment(
            smoke_config("trainer.accelerator=gpu", "trainer.devices=64", "data.limit=300", logger="csv"), run_dir
        )
    assert not run_dir.exists()  # refused before the run directory is made: nothing in the way of the fix
