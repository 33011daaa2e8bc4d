"""Config validation (s2ft.run_config) and the composition of every config group and experiment."""

import pytest
from conftest import CONF, ROOT, compose_config, compose_run

from s2ft.run_config import RunConfigError, validate_run_config


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


def test_default_config_is_the_demo():
    cfg = compose_run()
    validate_run_config(cfg)
    assert (cfg["model"]["name"], cfg["method"]["name"], cfg["mode"]) == ("smollm2_135m", "s2ft", "train")
    assert cfg["data"]["train"] == ["commonsense_mix"]
    assert cfg["eval"]["tasks"] == ["boolq", "arc_easy", "arc_challenge", "openbookqa"]
    assert cfg["eval"]["before"] and cfg["eval"]["heldout"]
    assert cfg["paths"]["data_dir"] == str(ROOT / "data")


@pytest.mark.parametrize("group", ["model", "data", "eval", "trainer", "logger"])
def test_every_group_option_composes_and_validates(group):
    found = options(group)
    assert found, f"conf/{group} is empty"
    for option in found:
        cfg = compose_run(f"{group}={option}")
        assert cfg[group]  # composed
        validate_run_config(cfg)


def test_methods_compose_and_validate():
    for method in options("method"):
        # method=s2ft holds the paper's LLaMA ratios: O 5.2% is no head of SmolLM2's 9 (smollm/s2ft is its variant).
        extra = {"none": ["mode=eval"], "s2ft": ["model=llama_7b"]}.get(method, [])
        cfg = compose_run(f"method={method}", *extra)
        validate_run_config(cfg)
        assert cfg["method"]["name"] == method


def test_experiments_compose_and_validate():
    for experiment in options("experiment"):
        cfg = compose_run(f"+experiment={experiment}")
        validate_run_config(cfg)
        smoke = compose_run(f"+experiment={experiment}", "debug=smoke")
        validate_run_config(smoke)
        assert smoke["model"]["name"].startswith("tiny_")


def test_slurm_launcher_composes():
    cfg = compose_config("hydra/launcher=slurm")
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")


def test_smoke_debug_shrinks_any_run():
    cfg = compose_run("debug=smoke", "trainer=gpu", "logger=wandb")
    validate_run_config(cfg)
    assert cfg["model"]["name"] == "tiny_llama"
    assert (cfg["trainer"]["accelerator"], cfg["trainer"]["max_steps"], cfg["logger"]["name"]) == ("cpu", 4, "csv")


def test_every_problem_is_reported_at_once(tmp_path):
    cfg = compose_run(
        "method=s2ft",
        "model.name=gpt5",
        "method.lr=0",
        "+method.options.ratios.qq=0.1",
        "method.options.ratios.o=1.5",
        "method.options.strategy=psychic",
        "eval.tasks=[boolq,nonsense]",
        "trainer.scheduler=step",
        "trainer.warmup_steps=500",
        "logger=none",
        f"paths.data_dir={tmp_path}",
    )
    with pytest.raises(RunConfigError) as info:
        validate_run_config(cfg)
    message = str(info.value)
    expected = [
        "unknown model.name 'gpt5'",
        "method.lr must be a finite number > 0",
        "unknown component 'qq'",
        "ratios['o'] must be a number in (0, 1], got 1.5",
        "psychic",
        "unknown task 'nonsense'",
        f"training file {tmp_path}/llm-adapters/dataset/boolq/train.json is missing",
        f"eval task boolq: file {tmp_path}/llm-adapters/dataset/boolq/test.json is missing",
        "trainer.scheduler must be one of",
        "trainer.warmup_steps (500) must be below trainer.max_steps (80)",
    ]
    for line in expected:
        assert line in message, f"{line!r} not reported in:\n{message}"
    assert message.startswith(f"{message.count(chr(10) + '  - ')} problem(s)")


def test_s2ft_options_on_a_lora_run_are_rejected():
    cfg = compose_run("method=lora")
    cfg["method"]["options"]["ratios"] = {"o": 0.05}
    with pytest.raises(RunConfigError, match=r"S2FT options \['ratios'\] on a lora run"):
        validate_run_config(cfg)


@pytest.mark.parametrize("overrides", [["method=lora"], ["mode=eval", "method=none"]])
def test_save_lora_is_refused_unless_training_s2ft(overrides):
    with pytest.raises(RunConfigError, match="save_lora=true exports a trained S2FT adapter"):
        validate_run_config(compose_run(*overrides, "save_lora=true"))


def test_unknown_option_of_a_method_is_rejected():
    cfg = compose_run("method=lora")
    cfg["method"]["options"]["rank"] = 8
    with pytest.raises(RunConfigError, match="does not take option"):
        validate_run_config(cfg)


def test_eval_mode_needs_something_to_evaluate(tmp_path):
    with pytest.raises(RunConfigError, match="mode=eval needs run_dir"):
        validate_run_config(compose_run("mode=eval"))
    with pytest.raises(RunConfigError, match="has no adapter/ folder"):
        validate_run_config(compose_run("mode=eval", f"run_dir={tmp_path}"))
    # Before, a folder not there (a relative path from another directory) was said to have no adapter/ folder.
    with pytest.raises(RunConfigError) as refused:
        validate_run_config(compose_run("mode=eval", f"run_dir={tmp_path / 'gone'}"))
    assert f"run_dir '{tmp_path / 'gone'}' does not exist (a relative path is read from the working directory, " in str(
        refused.value
    )
    validate_run_config(compose_run("mode=eval", "method=none"))


def test_bad_training_numbers_and_resume_source(tmp_path):
    cfg = compose_run(
        "data.batch_size=0",
        "data.limit=-3",
        "trainer.accumulate_grad_batches=0",
        "trainer.select_best=val_loss",
        "data.val_size=0",
        f"ckpt_path={tmp_path}/missing.ckpt",
    )
    with pytest.raises(RunConfigError) as info:
        validate_run_config(cfg)
    for line in (
        "data.batch_size must be an int >= 1",
        "data.limit must be null",
        "accumulate_grad_batches",
        "select_best needs a validation split",
        "neither 'last', 'auto' nor a checkpoint",
    ):
        assert line in str(info.value)


@pytest.mark.parametrize("value", ["true", "3", "[last]", "{a: 1}"])
def test_a_resume_or_eval_source_that_is_no_path_is_a_config_problem_not_a_traceback(value):
    """ckpt_path=true (a resume "switch"), run_dir=3 or adapter=[PATH] reached Path() in the check itself, which raised
    a TypeError (a traceback from run.py) instead of naming the key."""
    with pytest.raises(RunConfigError, match=r"ckpt_path must be 'last', 'auto' or a checkpoint file, got "):
        validate_run_config(compose_run(f"ckpt_path={value}"))
    for key in ("run_dir", "adapter"):
        with pytest.raises(RunConfigError, match=rf"{key} must be a path to a folder, got "):
            validate_run_config(compose_run("mode=eval", f"{key}={value}"))


@pytest.mark.parametrize("size", [0.01, 1, 64])
def test_calibration_size_is_items_or_a_fraction(size):
    validate_run_config(
        compose_run("method=smollm/s2ft", "method.options.strategy=gradient", f"method.options.calibration_size={size}")
    )


@pytest.mark.parametrize("size", [0, 0.0, 1.5, -0.1, "many", True])
def test_bad_calibration_size_names_both_forms(size):
    cfg = compose_run("method=s2ft")
    cfg["method"]["options"]["calibration_size"] = size
    with pytest.raises(RunConfigError, match=r"calibration_size must be a number of items \(int >= 1\) or a fraction"):
        validate_run_config(cfg)


@pytest.mark.parametrize("epochs", [0, -2, 1.5, "three"])
def test_max_epochs_that_lightning_would_refuse_or_train_nothing_with_is_refused(epochs):
    """With trainer.max_steps set, max_epochs=0 trained 0 steps and wrote a summary; -2 was Lightning's traceback."""
    with pytest.raises(RunConfigError, match=r"trainer\.max_epochs must be null, -1 .* or an int >= 1, got"):
        validate_run_config(compose_run("trainer.max_steps=30", f"trainer.max_epochs={epochs}"))


def test_max_epochs_may_be_left_unlimited_when_max_steps_stops_training():
    for epochs in ("null", "-1", "2"):
        validate_run_config(compose_run("trainer.max_steps=30", f"trainer.max_epochs={epochs}"))


def test_trainer_values_lightning_refuses_are_reported_at_once_before_anything_is_written():
    """Each was a Lightning traceback (or a ZeroDivisionError) after the logger had written into the run directory."""
    cfg = compose_run(
        "debug=smoke",
        "trainer.strategy=dpp",
        "trainer.accelerator=gpuu",
        "trainer.devices=0",
        "trainer.num_nodes=0",
        "trainer.checkpoint_every_n_steps=0",
        "trainer.log_every_n_steps=-1",
        "trainer.val_check_interval=1.5",
    )
    with pytest.raises(RunConfigError) as info:
        validate_run_config(cfg)
    message = str(info.value)
    for line in (
        "trainer.strategy must be one of ('auto', 'ddp', 'fsdp'), got 'dpp'",
        "trainer.accelerator must be one of ('auto', 'cpu', 'gpu', 'cuda', 'mps'), got 'gpuu'",
        "trainer.devices must be an int >= 1, -1 (all), 'auto' or a list of device ids, got 0",
        "trainer.num_nodes must be an int >= 1, got 0",
        "trainer.checkpoint_every_n_steps must be an int >= 1, got 0",
        "trainer.log_every_n_steps must be an int >= 1, got -1",
        "trainer.val_check_interval must be null, a number of training batches (int >= 1) or a fraction of an epoch",
    ):
        assert line in message, f"{line!r} not reported in:\n{message}"
    assert message.startswith("7 problem(s)")


@pytest.mark.parametrize("value", ["0", "-5"])
def test_a_validation_interval_below_one_batch_is_refused(value):
    with pytest.raises(RunConfigError, match=rf"trainer\.val_check_interval must be null, .* got {value}"):
        validate_run_config(compose_run("debug=smoke", f"trainer.val_check_interval={value}"))


def test_the_supported_devices_forms_validate():
    for devices in ("auto", "-1", "2"):
        validate_run_config(compose_run("debug=smoke", f"trainer.devices={devices}", "trainer.val_check_interval=0.5"))
    validate_run_config(compose_run("debug=smoke", "trainer.devices=[0,1]", "trainer.accelerator=gpu"))


def test_device_ids_on_the_cpu_are_refused():
    """Lightning's TypeError traceback ("`devices` selected with `CPUAccelerator` should be an int > 0")."""
    with pytest.raises(RunConfigError, match=r"trainer\.devices=\[0, 1\] lists GPU ids: set trainer\.accelerator=gpu"):
        validate_run_config(compose_run("debug=smoke", "trainer.devices=[0,1]"))


BASELINE_OPTIONS = [
    # Each was unchecked until the method was applied: after the model loaded and the untrained model was evaluated
    # (minutes here, hours at paper scale), then a PEFT or SpFT ValueError traceback.
    (["method=lora", "method.options.r=0"], "method.options.r must be a rank (int >= 1), got 0"),
    (["method=dora", "method.options.lora_alpha=-2"], "method.options.lora_alpha must be a number > 0, got -2"),
    (["method=lora", "method.options.lora_dropout=1.5"], "lora_dropout must be a probability in [0, 1), got 1.5"),
    (["method=lora", "method.options.target_modules=q_proj"], "target_modules must be a non-empty list of module"),
    (["method=lora", "+method.options.budget=-1"], "method.options.budget must be null, a count >= 1 or a fraction"),
    (
        ["method=lora", "+method.options.budget_of=linears"],
        "method.options.budget_of must be one of ('model', 'linear')",
    ),
    (["method=spft", "method.options.p=0"], "method.options.p is the trainable fraction of entries, in (0, 1]; got 0"),
    (["method=spft", "method.options.p=1.5"], "method.options.p is the trainable fraction of entries, in (0, 1]"),
    (["method=spft", "method.options.seed=x"], "method.options.seed must be an int, got 'x'"),
    (["method=spft", "method.options.target_modules=[]"], "target_modules must be a non-empty list of module names"),
]


@pytest.mark.parametrize(("overrides", "message"), BASELINE_OPTIONS, ids=[" ".join(o) for o, _ in BASELINE_OPTIONS])
def test_baseline_options_are_checked_before_anything_loads(overrides, message):
    with pytest.raises(RunConfigError, match="1 problem") as info:
        validate_run_config(compose_run(*overrides))
    assert message in str(info.value)


def test_every_bad_baseline_option_is_reported_at_once():
    cfg = compose_run("method=lora", "method.options.r=0", "method.options.lora_dropout=-0.1", "method.lr=0")
    with pytest.raises(RunConfigError, match="^3 problem"):
        validate_run_config(cfg)
    validate_run_config(compose_run("method=lora", "method.options.r=0", "+method.options.budget=0.01"))  # r unused


WRONG_TYPES = [
    # A TypeError / AttributeError traceback from inside the check (in a multirun, Hydra turns the callback's error
    # into a warning and launches every job unchecked).
    ("eval.tasks=5", "eval.tasks must be a list of tasks (names, groups, definitions), got 5"),
    ("data.train=5", "data.train must be a list of sources (names, files, {path: ..}), got 5"),
    ("method.options=5", "method.options must map option names to values, got 5"),
    ("eval.groups=[a]", "eval.groups must map group names to lists of tasks, got ['a']"),
    ("eval.heldout=5", "eval.heldout must be a list of held-out sets, got 5"),
    # Not checked before: found only after the training data loaded, or never.
    ("data.overlap_tasks=5", "data.overlap_tasks must be null or a list of tasks, got 5"),
    ("data.overlap_tasks=[gsm8k,nope]", "data.overlap_tasks: unknown task 'nope'; valid tasks: gsm8k,"),
    # A string is truthy: overwrite=no replaced an earlier run, data.allow_overlap=no switched the overlap guard off.
    ("overwrite=no", "overwrite must be true or false, got 'no'"),
    ("data.allow_overlap=no", "data.allow_overlap must be true or false, got 'no'"),
    ("save_merged=off", "save_merged must be true or false, got 'off'"),
    ("model.gradient_checkpointing=yes", "model.gradient_checkpointing must be true or false, got 'yes'"),
    ("eval.before=1", "eval.before must be true or false, got 1"),
    # Read by W&B only after training: the run trained for hours, then its logger failed.
    ("logger=wandb logger.mode=ofline", "logger.mode must be one of ('offline', 'online', 'disabled'), got 'ofline'"),
    ("logger=wandb logger.tags=ablation", "logger.tags must be a list of non-empty strings, got 'ablation'"),
    ("logger=wandb logger.project=''", "logger.project must be a W&B project name, got ''"),
]


@pytest.mark.parametrize(("override", "message"), WRONG_TYPES, ids=[o for o, _ in WRONG_TYPES])
def test_a_value_of_the_wrong_type_is_one_problem_not_a_crash(override, message):
    with pytest.raises(RunConfigError) as info:
        validate_run_config(compose_run(*override.split()))
    assert str(info.value).startswith(f"1 problem(s) in the config:\n  - {message}"), str(info.value)


def test_a_user_group_under_a_registered_name_is_refused():
    """Before, eval.groups={id: [...]} was accepted and stood in for the registered group: the summary's groups.id (the
    report's ID average) was the user's mean, and eval.tasks=[boolq] with a user group boolq ran the group's tasks."""
    # eval=user_example holds the user group user_arc, which is no registered name.
    cfg = compose_run("eval=user_example", "+eval.groups.id=[arc_letters]", "+eval.groups.Boolq=[arc_letters_mc]")
    with pytest.raises(RunConfigError) as info:
        validate_run_config(cfg)
    assert str(info.value) == (
        "1 problem(s) in the config:\n  - eval.groups: user group(s) 'id', 'Boolq' would stand in for the registered "
        "task or group of that name; give each user group another name"
    )
    validate_run_config(compose_run("eval=user_example"))  # its group user_arc


SHAPE_PROBLEMS = [
    # Each was found only when the method was applied: after the model loaded and the untrained model was evaluated
    # (eval.before: ~1 min here, hours at paper scale), and the LoRA / SpFT ones as a ValueError traceback.
    (
        ["method=s2ft"],  # the paper's LLaMA ratios on SmolLM2, as README's first multirun example ran it
        "method.options: budget gives no unit: ratios['o']=0.052 gives 0 of 9 units per layer; the smallest ratio "
        "giving one unit is 0.05556 (model smollm2_135m)",
    ),
    (
        ["method.options.layers=[29,30]"],
        "method.options: layers [30] do not exist; the model has layers 0..29 (model smollm2_135m)",
    ),
    (
        ["+experiment=component_ablation", "method.options.target_params=100"],
        "method.options: target_params=100 (= 100 params) gives no 'o' unit (one has 524288 params); the smallest "
        "target giving one is 524288; raise target_params or change target_split (model llama_7b)",
    ),
    (
        ["method.options.match_lora.target_modules=[q_proj,qkv_proj]"],
        "method.options: match_lora.target_modules ['qkv_proj'] match no nn.Linear in the model; check the names "
        "(model smollm2_135m)",
    ),
    (
        ["method=lora", "method.options.target_modules=[q_proj,query]"],
        "method.options.target_modules ['query'] match no nn.Linear in the model; check the names (model smollm2_135m)",
    ),
    (
        # PEFT took it: rank 642 on layers at most 576 wide trains more parameters than a rank-576 update, to no gain.
        ["method=smollm/lora", "+method.options.budget=0.99"],
        "method.options.budget=0.99 gives LoRA rank 642, above 576, the largest full rank of the target layers (no "
        "layer's update can use more); lower the budget to at most 119439360 parameters, or train every weight with "
        "method=full (model smollm2_135m)",
    ),
    (
        ["method=spft", "method.options.target_modules=[query]"],
        "method.options.target_modules: spft target_modules ['query'] match no nn.Linear in the model; check the "
        "names (model smollm2_135m)",
    ),
]


@pytest.mark.parametrize(("overrides", "message"), SHAPE_PROBLEMS, ids=[" ".join(o) for o, _ in SHAPE_PROBLEMS])
def test_a_budget_or_target_the_model_cannot_take_is_refused_before_it_loads(overrides, message):
    with pytest.raises(RunConfigError) as info:
        validate_run_config(compose_run(*overrides))
    assert str(info.value) == f"1 problem(s) in the config:\n  - {message}"


def test_a_budget_is_checked_on_the_shape_only_for_models_whose_shape_is_known():
    validate_run_config(compose_run("method=s2ft", "model=llama_7b"))  # 5.2% of 32 heads: 2 per layer
    validate_run_config(compose_run("method=s2ft", "model.name=HuggingFaceTB/SmolLM2-135M"))  # a hub id: at load
    validate_run_config(compose_run("mode=eval", "method=none"))


def test_an_unknown_option_does_not_hide_the_other_option_problems():
    """An unknown or stray S2FT option returned early: the bad values beside it showed only on the next run."""
    cases = {
        ("+method.options.p=0.1", "method.options.strategy=foo", "method.options.order=mid"): [
            "method 's2ft' does not take option(s) ['p']",
            "method.options: unknown strategy 'foo'",
            "method.options: unknown order 'mid'",
        ],
        ("method=lora", "+method.options.ratios={o:0.1}", "method.options.r=0"): [
            "S2FT options ['ratios'] on a lora run; remove them from method.options",
            "method.options.r must be a rank (int >= 1), got 0",
        ],
    }
    for overrides, lines in cases.items():
        with pytest.raises(RunConfigError) as info:
            validate_run_config(compose_run(*overrides))
        found = str(info.value).split("\n  - ")
        assert found[0] == f"{len(lines)} problem(s) in the config:"
        assert [line for line, problem in zip(lines, found[1:], strict=True) if not problem.startswith(line)] == []


def test_accumulating_more_batches_than_an_epoch_holds_is_refused():
    """Lightning steps at an epoch's end whatever it accumulated: 100 x 8 items per step on 36 items trained each step
    on 32, silently."""
    with pytest.raises(RunConfigError) as info:
        validate_run_config(
            compose_run("data.limit=100", "trainer.accumulate_grad_batches=100", "trainer.val_check_interval=100")
        )
    assert str(info.value) == (
        "1 problem(s) in the config:\n  - trainer.accumulate_grad_batches=100 asks for more batches per optimizer step "
        "than an epoch holds (4 of data.batch_size=8 from data.limit=100, data.val_size=64, on 1 process(es)); lower "
        "trainer.accumulate_grad_batches to at most 4 or raise data.limit"
    )
    validate_run_config(compose_run("data.limit=100", "trainer.accumulate_grad_batches=4"))


@pytest.mark.parametrize("name", ["null", "''", "a/b", ".."])
def test_the_experiment_name_must_name_one_directory(name):
    """name=null ran into outputs/None/ (and the W&B group None); a '/' nested the run one level deeper."""
    with pytest.raises(RunConfigError, match=r"^1 problem.*\n  - name must be a non-empty experiment name without '/'"):
        validate_run_config(compose_run(f"name={name}"))


@pytest.mark.parametrize(
    ("overrides", "fix"),
    [
        (["trainer.val_check_interval=2", "trainer.accumulate_grad_batches=4"], "use 4"),
        (["trainer.val_check_interval=10", "trainer.accumulate_grad_batches=4"], "use 8 or 12"),
    ],
)
def test_a_validation_interval_inside_an_accumulated_step_is_refused(overrides, fix):
    """Validation ran in the middle of an optimizer step (twice in one step below the accumulation)."""
    with pytest.raises(RunConfigError) as info:
        validate_run_config(compose_run(*overrides))
    assert str(info.value).endswith(
        f"trainer.val_check_interval={overrides[0].split('=')[1]} counts training batches, and is not a multiple of "
        f"trainer.accumulate_grad_batches=4: validation would run inside an optimizer step; {fix}"
    ), str(info.value)
    validate_run_config(compose_run("trainer.val_check_interval=8", "trainer.accumulate_grad_batches=4"))
