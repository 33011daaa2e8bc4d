"""Bad input on the config side of run.py: one clean message naming the problem and the fix, a non-zero exit, and a
run directory left as it was. Most cases go through `validate_run_config` on the config run.py would run; a
representative subset runs `python run.py` itself."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import CONF, ROOT, compose_run, run_hydra

import s2ft
from s2ft.data import DataError, split_validation
from s2ft.data.records import Example
from s2ft.data.tokenize import tokenize_examples
from s2ft.errors import UserError
from s2ft.lightning import run_experiment
from s2ft.lightning.jobs import compose_job, job_problems, sweep_jobs
from s2ft.lightning.sampler import ResumableBatchSampler
from s2ft.models import tiny_model, tiny_tokenizer
from s2ft.run_config import SCHEMA, RunConfigError, validate_run_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "S2FT_ROOT": str(ROOT)}


def problems(*overrides: str) -> str:
    with pytest.raises(RunConfigError) as info:
        validate_run_config(compose_run(*overrides))
    return str(info.value)


@pytest.fixture(scope="module")
def s2ft_adapter(tmp_path_factory) -> Path:
    """An S2FT adapter of the tiny smoke model, as a run's adapter/ folder holds it."""
    out = tmp_path_factory.mktemp("run") / "adapter"
    model = tiny_model("llama", vocab_size=64, num_hidden_layers=2)
    s2ft.save_adapter(s2ft.apply_s2ft(model, s2ft.S2FTConfig(ratios={"down": 0.1})), out)
    return out


TYPOS = [
    ("+trainer.max_step=3", "unknown key trainer.max_step; did you mean trainer.max_steps?"),
    ("+data.limt=10", "unknown key data.limt; did you mean data.limit?"),
    ("+model.nmae=x", "unknown key model.nmae; did you mean model.name?"),
    ("+method.lrr=0.1", "unknown key method.lrr; did you mean method.lr?"),
    ("+eval.heldout_limt=3", "unknown key eval.heldout_limt; did you mean eval.heldout_limit?"),
    ("+logger.projet=x", "unknown key logger.projet; did you mean logger.project?"),
    ("+paths.data_dri=x", "unknown key paths.data_dri; did you mean paths.data_dir?"),
    ("+seeed=1", "unknown key seeed; did you mean seed?"),
    ("+method.options.stratgy=weight", "option(s) ['stratgy']"),
    ("+method.options.match_lora.rank=4", "unknown key method.options.match_lora.rank; valid keys of"),
]


@pytest.mark.parametrize(("override", "message"), TYPOS, ids=[t[0] for t in TYPOS])
def test_an_unknown_key_in_any_group_names_the_nearest_valid_one(override, message):
    assert message in problems(override)


def test_typos_are_reported_with_every_other_problem_at_once():
    found = problems("+trainer.max_step=3", "+data.limt=10", "method.lr=0")
    assert found.startswith("3 problem(s) in the config:")
    assert "did you mean trainer.max_steps?" in found and "did you mean data.limit?" in found
    assert "did you mean stratgy -> strategy?" in problems("+method.options.stratgy=weight")


def test_the_schema_holds_every_key_of_every_config_file():
    """SCHEMA is the one list of valid keys: each key of each file of conf/ (but hydra's own) is in it."""
    for path in sorted(CONF.rglob("*.yaml")):
        group = path.relative_to(CONF).parts[0]
        if group == "hydra":
            continue
        data = {k: v for k, v in (yaml.safe_load(path.read_text()) or {}).items() if k not in ("defaults", "hydra")}
        if group in SCHEMA:  # a group option: its own keys
            assert set(data) <= set(SCHEMA[group]), path
            continue
        assert set(data) <= set(SCHEMA[""]), path  # config.yaml, experiment/, debug/: global keys
        for key, value in data.items():
            if key in SCHEMA and key and isinstance(value, dict):
                assert set(value) <= set(SCHEMA[key]), (path, key)


BAD_VALUES = [
    (["method.options.ratios.o=1.5"], "method.options.ratios['o'] must be a number in (0, 1], got 1.5"),
    (["method.options.ratios.o=-0.1"], "method.options.ratios['o'] must be a number in (0, 1], got -0.1"),
    (["method.lr=nan"], "method.lr must be a finite number > 0, got nan"),
    (["method.lr=inf"], "method.lr must be a finite number > 0, got inf"),
    (["method.weight_decay=inf"], "method.weight_decay must be a finite number >= 0, got inf"),
    (["model.dtype=float16"], "model.dtype=float16 trains without loss scaling (NaN losses); use bfloat16 or float32"),
    (["debug=smoke", "data.val_size=48"], "data.val_size=48 leaves no training items out of data.limit=48"),
    (["debug=smoke", "data.val_size=0.99"], "data.val_size=0.99 leaves no training items"),
    (
        ["debug=smoke", "data.limit=10"],
        "data.limit=10 leaves 2 training items (after data.val_size=8), fewer than one batch of data.batch_size=4 on "
        "1 process(es); raise data.limit or lower data.batch_size",
    ),
    (["data.limit=8", "data.val_size=0", "trainer=ddp_cpu"], "fewer than one batch of data.batch_size=8 on 2"),
    # A list of devices counts its entries (it was repeated num_nodes times, then counted as one process); -1 (every
    # device) at least one (it was -1 processes, so no limit was ever too small).
    (["data.limit=8", "data.val_size=0", "trainer=gpu", "trainer.devices=[0,1]"], "data.batch_size=8 on 2 process"),
    (["data.limit=4", "data.val_size=0", "trainer=gpu", "trainer.devices=-1"], "data.batch_size=8 on 1 process"),
    (["data.max_length=1"], "data.max_length must be an int >= 2"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_bad_values_are_refused_before_anything_loads(overrides, message):
    assert message in problems(*overrides)


def test_ratios_under_the_default_budget_are_checked_and_the_fix_is_named():
    found = problems("method.options.ratios.o=1.5")
    assert found.startswith("1 problem(s)") and "target_split" not in found
    assert "with a budget, ratios set how it is split over components" in found


def test_float16_is_fine_for_evaluation_only():
    validate_run_config(compose_run("mode=eval", "method=none", "model.dtype=float16"))


def test_an_adapter_of_another_method_names_the_method_it_needs(s2ft_adapter):
    found = problems("mode=eval", f"adapter={s2ft_adapter}", "method=lora")
    assert f"adapter '{s2ft_adapter}' holds a s2ft adapter, not lora: set method=s2ft" in found
    validate_run_config(compose_run("mode=eval", f"adapter={s2ft_adapter}", "method=s2ft"))


def test_the_library_loader_refuses_another_methods_adapter_too(s2ft_adapter):
    from s2ft.adapter_format import AdapterError
    from s2ft.methods import load_trained, saved_method

    assert saved_method(s2ft_adapter) == "s2ft" and saved_method(s2ft_adapter.parent) is None
    with pytest.raises(AdapterError, match="holds a s2ft adapter, not lora: load it with method s2ft"):
        load_trained(tiny_model("llama", vocab_size=64), "lora", s2ft_adapter)


def test_data_problems_found_at_run_time_are_user_errors():
    examples = [Example(id=str(i), task="t", instruction=f"q{i}", input="", output="a", answer="a") for i in range(4)]
    with pytest.raises(DataError, match="data.val_size=4 leaves no training items out of 4; lower data.val_size"):
        split_validation(examples, 4)
    with pytest.raises(DataError, match="fill one batch of 8 on 1 rank.*lower data.batch_size or raise data.limit"):
        ResumableBatchSampler(4, 8)
    with pytest.raises(DataError, match="leaving no response token to train on: raise data.max_length"):
        tokenize_examples(examples, tiny_tokenizer(), 3)


def test_a_ratio_that_gives_no_unit_is_a_user_error(tmp_path):
    cfg = compose_run("debug=smoke", "method=s2ft", "method.options.ratios={o:0.001}", "logger=none", "eval=none")
    with pytest.raises(UserError, match=r"gives 0 of 20 units per layer; the smallest ratio giving one unit is 0\.025"):
        run_experiment(cfg, tmp_path)
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "checkpoints").exists()


def run_py(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300
    )


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_clean_error(done: subprocess.CompletedProcess, *messages: str) -> None:
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "error: " in done.stderr, done.stderr[-3000:]
    for message in messages:
        assert message in done.stderr, f"{message!r} not in:\n{done.stderr[-3000:]}"


def test_run_py_refuses_typos_and_bad_values_leaving_the_run_directory_as_it_was(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"checkpoint bytes")
    (run_dir / "metrics.csv").write_text("step,train/loss\n1,2.0\n")
    (run_dir / "config.yaml").write_text("name: demo\n")
    before = snapshot(run_dir)
    done = run_py(
        "debug=smoke", "+trainer.max_step=3", "+data.limt=10", "method.options.ratios.o=1.5", "model.dtype=float16",
        "method.lr=nan", f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    assert_clean_error(
        done,
        "error: 5 problem(s) in the config:",
        "did you mean trainer.max_steps?",
        "did you mean data.limit?",
        "ratios['o'] must be a number in (0, 1]",
        "use bfloat16 or float32",
        "method.lr must be a finite number > 0, got nan",
    )
    assert snapshot(run_dir) == before  # not even Hydra's .hydra/ folder


def test_a_multirun_lists_every_bad_job_and_runs_none(tmp_path):
    sweep_dir = tmp_path / "sweep"
    done = run_py("-m", "debug=smoke", "method.lr=1e-3,0,2e-3,inf", f"hydra.sweep.dir={sweep_dir}")
    assert_clean_error(
        done,
        "error: 2 of 4 jobs of the multirun have config problems; none ran",
        "job 1 (debug=smoke method.lr=0): 1 problem(s) in the config:\n"
        "  - method.lr must be a finite number > 0, got 0\njob 3",
        "job 3 (debug=smoke method.lr=inf): 1 problem(s) in the config:\n  - method.lr must be a finite number > 0",
    )
    assert "job 0 " not in done.stderr and "job 2 " not in done.stderr
    assert not sweep_dir.exists()


def test_a_multirun_whose_jobs_would_share_a_directory_runs_none(tmp_path):
    """With hydra.sweep.subdir=${name}_${seed}, both methods of a seed wrote one directory: the second job was refused
    there after the first had trained (its .hydra/ replacing the first's; with overwrite=true it replaced the run)."""
    sweep_dir = tmp_path / "sweep"
    overrides = ("debug=smoke", "eval=none", "seed=0,1", "method=s2ft,lora", f"hydra.sweep.dir={sweep_dir}")
    done = run_py("-m", *overrides, "hydra.sweep.subdir=${name}_${seed}")
    assert_clean_error(
        done,
        "error: 4 of 4 jobs of the multirun have config problems; none ran\n"
        f"jobs 0, 1 would all write {sweep_dir}/demo_0: one run per directory, so give each job its own "
        "(hydra.sweep.subdir, by default ${hydra.job.num})\n"
        f"jobs 2, 3 would all write {sweep_dir}/demo_1:",
    )
    assert not sweep_dir.exists()


def test_malformed_training_data_is_one_message(tmp_path):
    data_dir = tmp_path / "data"
    (data_dir / "llm-adapters/dataset/boolq").mkdir(parents=True)
    (data_dir / "llm-adapters/dataset/boolq/train.json").write_text('[{"instruction": "q", ')
    run_dir = tmp_path / "run"
    done = run_py(
        "debug=smoke", "eval=none", "data.train=[boolq]", f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}"
    )
    assert_clean_error(done, "boolq/train.json: not valid JSON")
    assert set(os.listdir(run_dir)) <= {"run.log"}  # the job log's lines; no record of the refused command


def test_a_max_length_too_short_for_any_response_is_one_message(tmp_path):
    done = run_py("debug=smoke", "data.max_length=16", "logger=none", f"hydra.run.dir={tmp_path / 'run'}")
    assert_clean_error(done, "tokens long, leaving no response token to train on: raise data.max_length")
    assert set(os.listdir(tmp_path / "run")) <= {"run.log"}


def test_a_bug_keeps_its_traceback(tmp_path):
    """Only UserErrors become one-line messages: anything else escaping a run is a bug and shows where it happened."""
    script = (
        "import runpy, sys\n"
        "import s2ft.lightning\n"
        "def bug(cfg, run_dir, record):\n"
        "    raise RuntimeError('a bug in the runner')\n"
        "s2ft.lightning.run_experiment = bug\n"
        f"sys.argv = ['run.py', 'debug=smoke', 'hydra.run.dir={tmp_path / 'run'}']\n"
        f"runpy.run_path({str(ROOT / 'run.py')!r}, run_name='__main__')\n"
    )
    command = [sys.executable, "-c", script]
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "RuntimeError: a bug in the runner" in done.stderr
    assert "error: a bug" not in done.stderr


def test_the_multirun_check_sees_the_jobs_the_sweeper_launches():
    """`ValidateJobs` expands an experiment's own sweep (hydra.sweeper.params) with the command line's."""
    with run_hydra():
        cfg = compose_job(["+experiment=fusion"])
        cfg.hydra.overrides.task = ["+experiment=fusion", "method.lr=1e-3,0"]  # a multirun's command line
        jobs = sweep_jobs(cfg)
        assert jobs == [
            ["data.train=[math_10k]", "+experiment=fusion", "method.lr=0.001"],
            ["data.train=[math_10k]", "+experiment=fusion", "method.lr=0"],
            ["data.train=[commonsense_170k]", "+experiment=fusion", "method.lr=0.001"],
            ["data.train=[commonsense_170k]", "+experiment=fusion", "method.lr=0"],
        ]
        found = [job_problems("config", job) for job in jobs]
    assert found[0] is None and found[2] is None
    assert all("method.lr must be a finite number > 0, got 0" in f for f in (found[1], found[3]))


def test_an_interpolation_that_does_not_resolve_is_a_config_problem_naming_every_key():
    """`+experiment=fusion data.train=[gsm8k]` left `method.lr: ${leg_lr.${data.train[0]}}` without a value: an
    OmegaConf traceback after Hydra had written the run directory."""
    with pytest.raises(RunConfigError) as info:
        compose_run("+experiment=fusion", "data.train=[gsm8k]", "seed=${oc.env:S2FT_NO_SUCH_VARIABLE}")
    assert str(info.value) == (
        "3 problem(s) in the config:\n"
        "  - method.lr does not resolve (Interpolation key 'leg_lr.gsm8k' not found); fix the interpolation or set "
        "method.lr=VALUE\n"
        '  - method.options.seed does not resolve (KeyError raised while resolving interpolation: "Environment '
        "variable 'S2FT_NO_SUCH_VARIABLE' not found\"); fix the interpolation or set method.options.seed=VALUE\n"
        '  - seed does not resolve (KeyError raised while resolving interpolation: "Environment variable '
        "'S2FT_NO_SUCH_VARIABLE' not found\"); fix the interpolation or set seed=VALUE"
    )


def test_the_multirun_check_reads_interpolations_in_the_command_line_unresolved():
    """Iterating hydra.overrides.task resolved `${nope}` and raised inside the callback, which Hydra turns into a
    warning: no job was checked and every job launched."""
    with run_hydra():
        cfg = compose_job(["method.lr=1e-3"])
        cfg.hydra.overrides.task = ["method.lr=${nope},1e-3", "trainer.max_steps=${trainer.log_every_n_steps}"]
        jobs = sweep_jobs(cfg)
        steps = r"trainer.max_steps=$\{trainer.log_every_n_steps\}"  # Hydra's own escaping, as its launcher passes it
        assert jobs == [[r"method.lr=$\{nope\}", steps], ["method.lr=0.001", steps]]
        found = [job_problems("config", job) for job in jobs]
    assert "method.lr does not resolve (Interpolation key 'nope' not found)" in found[0]
    assert "trainer.warmup_steps (8) must be below trainer.max_steps (5)" in found[1]


def test_a_multirun_with_an_unresolvable_interpolation_runs_none(tmp_path):
    sweep_dir = tmp_path / "sweep"
    done = run_py("-m", "debug=smoke", "eval=none", "method.lr=${nope},1e-3", f"hydra.sweep.dir={sweep_dir}")
    assert_clean_error(
        done,
        "error: 1 of 2 jobs of the multirun have config problems; none ran\njob 0 (debug=smoke eval=none",
        "  - method.lr does not resolve (Interpolation key 'nope' not found); fix the interpolation or set",
    )
    assert "Launching" not in done.stderr + done.stdout and not sweep_dir.exists()


def test_a_multirun_that_would_train_one_config_twice_runs_none(tmp_path):
    """seed=0,0 or method.lr=1e-3,0.001 trained the same config in two directories; the report then refused the
    study (a second run of one seed in a row)."""
    sweep_dir = tmp_path / "sweep"
    done = run_py("-m", "debug=smoke", "eval=none", "seed=0,1", "method.lr=1e-3,0.001", f"hydra.sweep.dir={sweep_dir}")
    assert_clean_error(
        done,
        "error: 4 of 4 jobs of the multirun have config problems; none ran\n"
        "jobs 0, 1 would all run one config (debug=smoke eval=none seed=0 method.lr=0.001): give each sweep value "
        "once\njobs 2, 3 would all run one config (debug=smoke eval=none seed=1 method.lr=0.001): give each sweep",
    )
    assert not sweep_dir.exists()


def test_the_last_screen_is_the_result_and_where_it_is(tmp_path):
    """`python run.py debug=smoke` with W&B: each log line once, no adverts, steps out of max_steps, and the run ends
    with its table, its directory and the `wandb sync` command (not W&B's own run summary)."""
    run_dir = tmp_path / "run"
    small_eval = ("eval.tasks=[boolq]", "eval.before=false", "eval.heldout=[]")
    done = run_py("debug=smoke", "logger.name=wandb", *small_eval, f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert out.count("GPU available") == 1 and out.count("Seed set to 0") == 1
    noises = ("litlogger", "anonymous setting", "Epoch 0/-2", "Run summary", "Run history", "wandb:")
    for noise in noises:
        assert noise not in out, noise
    assert "Step" in done.stdout and " 4/4 " in done.stdout
    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert lines[-3].startswith("└") and "average accuracy" in lines[-4]
    assert lines[-2:] == [f"outputs: {run_dir}", f"W&B run saved offline; upload it with: wandb sync {wandb_run}"]
