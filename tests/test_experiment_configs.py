"""Every experiment config (`conf/experiment/`) composes and validates at every point of its sweep; each study family
smoke-runs (the fusion study with its step, `experiments.study.fuse`)."""

import itertools
import json
from pathlib import Path

import pytest
from conftest import CONF, compose_config, compose_run, smollm2_layers
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from experiments.report.runs import find_runs
from experiments.report.table import build_rows
from experiments.study.fuse import fuse_and_evaluate, fused_parameter_count
from experiments.study.fuse import main as fuse_main
from s2ft.adapter_format import load_adapter_file
from s2ft.data.tasks import resolve_tasks
from s2ft.lightning.jobs import resolved_job
from s2ft.methods import prepare_model, trainable_summary
from s2ft.methods.peft_lora import lora_param_count
from s2ft.run_config import validate_run_config

EXPERIMENTS = sorted(path.stem for path in (CONF / "experiment").glob("*.yaml"))
PAPER = {
    "arith_llama": "llama2_7b",
    "arith_llama7b": "llama_7b",
    "arith_llama13b": "llama_13b",
    "commonsense_llama": "llama2_7b",
    "commonsense_llama7b": "llama_7b",
    "commonsense_llama13b": "llama_13b",
    "arith_llama3": "llama3_8b",
    "commonsense_llama3": "llama3_8b",
    "instruct_mistral": "mistral_7b",
    "generalization_llama3": "llama3_8b",
    "selection_ablation": "llama3_8b",
    "selection_ablation_arith": "llama3_8b",
    "component_ablation": "llama_7b",
    "fusion": "llama3_8b",
}
SMOLLM = ["arith_smollm", "commonsense_smollm", "generalization_smollm", "selection_smollm", "components_smollm"]
SMOLLM += ["fusion_smollm", "lr_grid_smollm"]


def sweep_axes(experiment: str, skip: tuple[str, ...] = ()) -> list[list[str]]:
    """Per swept key, its overrides (``key=value``), parsed as Hydra's basic sweeper parses them."""
    cfg = compose_config(f"+experiment={experiment}")
    params = {key: value for key, value in (cfg.hydra.sweeper.params or {}).items() if key not in skip}
    parsed = OverridesParser.create().parse_overrides([f"{key}={value}" for key, value in params.items()])
    return [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] for o in parsed]


def sweep_points(experiment: str, skip: tuple[str, ...] = ()) -> list[list[str]]:
    """The override lists of every job of the experiment's multirun (the product of its axes, minus ``skip``)."""
    return [list(point) for point in itertools.product(*sweep_axes(experiment, skip))]


def check_point(experiment: str, point: list[str]) -> None:
    cfg = compose_run(f"+experiment={experiment}", *point)
    validate_run_config(cfg)
    assert cfg["name"] == experiment
    assert cfg["model"]["name"] == PAPER.get(experiment, "smollm2_135m")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_sweep_value_composes_and_validates(experiment):
    """Each value of each swept key once, with the other keys at the experiment's own values.

    Group choices (method=...) are composed; plain keys are set on the composed base, which is what a Hydra
    override of a key does, then resolved as run.py resolves a job (composing takes ~0.5 s here, so the full product
    is the slow test below).
    """
    base = compose_config(f"+experiment={experiment}")
    for axis in sweep_axes(experiment):
        for override in axis:
            key, value = override.split("=", 1)
            if (CONF / key).is_dir():
                check_point(experiment, [override])
                continue
            cfg = base.copy()
            OmegaConf.update(cfg, key, OverridesParser.create().parse_override(override).value(), merge=False)
            validate_run_config(resolved_job(cfg))
    smoke = compose_run(f"+experiment={experiment}", "debug=smoke")
    validate_run_config(smoke)
    assert smoke["model"]["name"] == "tiny_llama" and smoke["trainer"]["max_steps"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_sweep_point_composes_and_validates(experiment):
    points = sweep_points(experiment)
    assert len({tuple(p) for p in points}) == len(points)
    for point in points:
        check_point(experiment, point)


def test_method_studies_sweep_methods_and_seeds_with_their_own_learning_rates():
    assert sweep_axes("commonsense_smollm")[1] == ["seed=0", "seed=1", "seed=2"]
    configs = [compose_run("+experiment=commonsense_smollm", *p) for p in sweep_points("commonsense_smollm", ("seed",))]
    assert [c["method"]["name"] for c in configs] == ["s2ft", "lora", "dora", "full", "spft"]
    lrs = {c["method"]["name"]: c["method"]["lr"] for c in configs}
    assert lrs["s2ft"] == 1e-3 and lrs["lora"] == 2e-4 and lrs["full"] < lrs["lora"]
    paper = {
        c["method"]["name"]: c
        for c in (compose_run("+experiment=arith_llama", *p) for p in sweep_points("arith_llama"))
    }
    assert paper["s2ft"]["method"]["options"]["ratios"] == {"o": 0.052, "down": 0.02}
    assert paper["lora"]["method"]["options"]["r"] == 32 and paper["lora"]["method"]["options"]["lora_alpha"] == 64
    llama3 = compose_run("+experiment=arith_llama3")
    assert llama3["method"]["options"]["ratios"] == {"down": 0.03}  # not merged with the default O ratio


# The official training scripts' rates (Infini-AI-Lab/S2FT experiments/train_script/*.sh), per task and method.
PAPER_LRS = {
    "arith": {"s2ft": 1e-3, "lora": 2e-4, "dora": 2e-4, "full": 2e-5},
    "commonsense": {"s2ft": 2e-4, "lora": 5e-5, "dora": 5e-5, "full": 1e-5},
}


@pytest.mark.parametrize(
    ("experiment", "task"),
    [
        ("arith_llama", "arith"),
        ("arith_llama7b", "arith"),
        ("arith_llama13b", "arith"),
        ("arith_llama3", "arith"),
        ("commonsense_llama", "commonsense"),
        ("commonsense_llama7b", "commonsense"),
        ("commonsense_llama13b", "commonsense"),
        ("commonsense_llama3", "commonsense"),
    ],
)
def test_paper_studies_use_the_official_learning_rates(experiment, task):
    lrs = {
        c["method"]["name"]: c["method"]["lr"]
        for c in (compose_run(f"+experiment={experiment}", *p) for p in sweep_points(experiment))
    }
    assert lrs == PAPER_LRS[task]


@pytest.mark.parametrize("experiment", sorted(PAPER))
def test_paper_studies_train_on_their_whole_training_set(experiment):
    """The paper trains on all of Commonsense170K, Math10K or Alpaca-GPT4: no data group's demo-sized limit survives
    (conf/data/commonsense_mix.yaml keeps 2000 items for the CPU demo)."""
    for point in sweep_points(experiment)[:1] + sweep_points(experiment)[-1:]:
        assert compose_run(f"+experiment={experiment}", *point)["data"]["limit"] is None


def test_paper_fusion_legs_selection_and_instruct_settings():
    legs = [compose_run("+experiment=fusion", *p) for p in sweep_points("fusion")]
    assert [(c["data"]["train"], c["method"]["lr"]) for c in legs] == [
        (["math_10k"], 1e-3),
        (["commonsense_170k"], 2e-4),
    ]
    assert all(c["method"]["options"]["ratios"] == {"down": 0.03} for c in legs)
    for experiment in ("selection_ablation", "selection_ablation_arith"):
        options = compose_run(f"+experiment={experiment}")["method"]["options"]
        assert options["calibration_size"] == 0.01 and options["ratios"] == {"down": 0.03}
    instruct = compose_run("+experiment=instruct_mistral")
    assert instruct["method"]["options"]["ratios"] == {"down": 0.03} and instruct["trainer"]["warmup_steps"] == 0


def test_component_and_generalization_sweeps_vary_one_thing():
    splits = [
        compose_run("+experiment=components_smollm", *p)["method"]["options"]["target_split"]
        for p in sweep_points("components_smollm")
    ]
    assert sorted({tuple(s.items()) for s in splits}) == sorted(
        {((c, 1.0),) for c in ("q", "k", "v", "o", "gate", "up", "down")}
    )
    budgets = {
        (c["method"]["name"], c["budget"], c["method"]["options"].get("p", c["method"]["options"].get("budget")))
        for c in (
            compose_run("+experiment=generalization_smollm", *p)
            for p in sweep_points("generalization_smollm", ("seed",))
        )
    }
    assert budgets == {(m, b, b) for m in ("spft", "lora") for b in (0.1, 0.01, 0.001)}


@pytest.mark.parametrize("budget", [0.1, 0.01, 0.001])
def test_generalization_sweep_counts_both_budgets_the_same_way(budget):
    """SpFT's p and LoRA's rank both count the linear-layer entries: LoRA's rank is the one nearest SpFT's count.

    On SmolLM2 one LoRA rank (q, k, v, up, down) is 207,360 parameters, 0.2% of the linear entries: at 1% the nearest
    rank trains 2.3% less than SpFT, and at 0.1% rank 1, the smallest, trains 1.95x SpFT's count.
    """
    counts = {}
    for method in ("budget/spft", "budget/lora_linear"):
        cfg = compose_run("+experiment=generalization_smollm", f"method={method}", f"budget={budget}")
        model = smollm2_layers()
        model = prepare_model(model, cfg["method"]["name"], cfg["method"]["options"])
        counts[cfg["method"]["name"]] = trainable_summary(model)["trainable_params"]
    plain = smollm2_layers()
    per_rank = lora_param_count(plain, 1, cfg["method"]["options"]["target_modules"])
    assert per_rank == 2 * (2 * 576 + 2 * (576 + 192) + 2 * (576 + 1536))
    assert abs(counts["lora"] - counts["spft"]) <= per_rank / 2


def test_smollm_methods_have_matched_trainable_budgets():
    """The method variants of the SmolLM2 studies train the same count (within 2%) on SmolLM2's layer shapes."""
    counts = {}
    for method in ("s2ft", "lora", "dora", "spft"):
        cfg = compose_run(f"method=smollm/{method}")
        model = smollm2_layers()
        model = prepare_model(model, cfg["method"]["name"], cfg["method"]["options"])
        counts[method] = trainable_summary(model)["trainable_params"]
    lora = counts["lora"]
    assert lora == 2 * 9 * (2 * 576 + 2 * (576 + 192) + 2 * (576 + 1536))
    for method in ("s2ft", "spft"):
        assert abs(counts[method] - lora) <= 0.02 * lora, counts
    assert counts["dora"] - lora == 2 * (576 + 192 + 192 + 1536 + 576)  # DoRA adds a magnitude per output row


def run_smoke(experiment: str, point: list[str], run_dir: Path, *extra: str) -> dict:
    from s2ft.lightning import run_experiment

    cfg = compose_run(f"+experiment={experiment}", *point, "debug=smoke", "logger=none", *extra)
    # Two tasks of the study (both suites where it has both) keep the smoke fast; the configs are checked above.
    tasks = [task.name for task in resolve_tasks(cfg["eval"]["tasks"])]
    cfg["eval"]["tasks"] = list(dict.fromkeys([tasks[0], tasks[-1]]))
    cfg["eval"]["limit"], cfg["eval"]["heldout_limit"], cfg["trainer"]["max_steps"] = 2, 4, 2
    return run_experiment(cfg, run_dir)


FAST_SMOKES = [
    ("commonsense_smollm", ["method=smollm/lora", "seed=1"]),
    ("generalization_smollm", ["method=budget/spft", "budget=0.1"]),
    ("selection_smollm", ["method.options.strategy=gradient", "method.options.order=small"]),
    ("components_smollm", ["method.options.target_split={k:1.0}"]),
]


@pytest.mark.parametrize(("experiment", "point"), FAST_SMOKES, ids=[e for e, _ in FAST_SMOKES])
def test_study_family_smoke_runs(experiment, point, tmp_path):
    summary = run_smoke(experiment, point, tmp_path)
    cfg = compose_run(f"+experiment={experiment}", *point)
    assert summary["experiment"] == experiment and summary["method"] == cfg["method"]["name"]
    assert summary["train"]["steps"] == 2 and summary["trainable_params"] > 0
    assert set(summary["heldout"]) == set(cfg["eval"]["heldout"])
    assert (tmp_path / "adapter").is_dir() and (tmp_path / "summary.json").is_file()


def test_fusion_study_smoke(tmp_path):
    first = tmp_path / "gsm8k"
    run_smoke("fusion_smollm", ["data.train=[gsm8k]"], first)
    second = tmp_path / "commonsense"
    run_smoke("fusion_smollm", ["data.train=[commonsense_mix]", f"method.options.exclude={first}/adapter"], second)
    fused = fuse_and_evaluate(first, second, tmp_path / "fused")
    assert fused["method"] == "fused" and fused["fusion"]["shared_units"] == 0  # the exclude made them disjoint
    runs = {path.name: json.loads((path / "summary.json").read_text()) for path in (first, second)}
    # Disjoint adapters change both runs' parameters; an adapter fused with itself changes only its own.
    assert fused["trainable_params"] == runs["gsm8k"]["trainable_params"] + runs["commonsense"]["trainable_params"]
    assert fused["total_params"] == runs["gsm8k"]["total_params"]
    assert fused["trainable_pct"] == pytest.approx(100 * fused["trainable_params"] / fused["total_params"])
    assert fused_parameter_count([load_adapter_file(first / "adapter")] * 2) == runs["gsm8k"]["trainable_params"]
    assert set(fused["eval"]) == {"gsm8k", "openbookqa"}
    assert (tmp_path / "fused" / "predictions" / "openbookqa.jsonl").is_file()
    # The report tells the three runs apart by what differs; the excluded adapter by its run, not its full path.
    labels = [row.label for row in build_rows(find_runs([tmp_path]))]
    assert labels == [
        "fused",
        's2ft data.train=["commonsense_mix"] exclude=gsm8k/adapter',
        's2ft data.train=["gsm8k"] exclude=null',
    ]


def fake_run(run_dir: Path, model: str = "tiny_llama", method: str = "s2ft") -> dict[str, bytes]:
    """A finished-looking run directory (config.yaml + adapter/); returns its files' bytes."""
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"model: {{name: {model}}}\nmethod: {{name: {method}}}\n")
    (run_dir / "summary.json").write_text('{"method": "s2ft"}')
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("not_a_run", "is not a finished run directory (needs config.yaml and adapter/)"),
        ("lora_run", "trained 'lora'; only S2FT adapters can be fused"),
        ("other_model", "fine-tuned different models (tiny_llama vs smollm2_135m); fuse adapters of one base model"),
        ("out_is_a_run", "already holds run outputs (config.yaml, summary.json, adapter); writing the fused run there"),
    ],
)
def test_fuse_refuses_bad_input_with_one_message_and_touches_nothing(tmp_path, capsys, case, message):
    first = fake_run(tmp_path / "a")
    second = {
        "not_a_run": lambda: (tmp_path / "b").mkdir() or {},
        "lora_run": lambda: fake_run(tmp_path / "b", method="lora"),
        "other_model": lambda: fake_run(tmp_path / "b", model="smollm2_135m"),
        "out_is_a_run": lambda: fake_run(tmp_path / "b"),
    }[case]()
    out = tmp_path / ("a" if case == "out_is_a_run" else "fused")
    with pytest.raises(SystemExit) as exit_info:
        fuse_main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)])
    assert str(exit_info.value).startswith("error: ") and message in str(exit_info.value)
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir() if p.is_file()} == first
    assert {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir() if p.is_file()} == second
    assert not (tmp_path / "fused").exists()


@pytest.mark.slow
@pytest.mark.parametrize("experiment", [e for e in SMOLLM if e != "fusion_smollm"])
def test_every_smollm_sweep_point_smoke_runs(experiment, tmp_path):
    for i, point in enumerate(sweep_points(experiment)):
        summary = run_smoke(experiment, point, tmp_path / str(i))
        assert summary["train"]["steps"] == 2
