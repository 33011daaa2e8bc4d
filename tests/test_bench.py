"""Tests of the efficiency benchmarks (`experiments.bench`: the training and switch commands and their parts).

The commands run in their quick modes (tiny models, two steps) and their results files are checked for completeness
and consistency; no timing is asserted.
"""

import json
import math
import statistics
import sys
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from experiments.bench import layout, silence_peft_deprecation, switch, training
from experiments.bench.models import build_bench_model
from experiments.bench.redraw import recompute_targets, redraw
from experiments.bench.results import switch_chart, switch_table, write_results
from experiments.bench.switch_layer import bench_layer, check_nearer
from experiments.bench.targets import target, targets_line
from experiments.bench.train_worker import METHODS, prepare, trained_parameter_count
from s2ft.memory import PeakMemory
from s2ft.methods import trainable_summary
from s2ft.methods.peft_lora import DEFAULTS as LORA_DEFAULTS
from s2ft.methods.peft_lora import lora_param_count, rank_for_budget

LORA_TARGETS = LORA_DEFAULTS["target_modules"]
REPO = Path(__file__).resolve().parents[1]
MACHINE_KEYS = {"cpu", "cores", "torch", "transformers", "peft", "device", "torch_threads"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_outputs(out, rows: list[str]) -> dict:
    results = json.loads((out / "results.json").read_text())
    assert MACHINE_KEYS <= set(results["machine"])
    table = (out / "results.md").read_text()
    for row in rows:
        assert f"| {row} |" in table
    png = (out / "results.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    return results


def test_training_quick_every_method(tmp_path):
    returned = training.main(["--quick", "--in-process", "--out", str(tmp_path)])
    results = _check_outputs(tmp_path, list(METHODS))
    assert results == json.loads(json.dumps(returned))
    config, methods = results["config"], results["methods"]
    assert list(methods) == list(METHODS)
    assert results["settings"][0]["methods"] == methods and len(results["settings"]) == 1
    assert (config["model"], config["batch_sizes"], config["seq_lens"]) == ("tiny_llama", [2], [32])

    total, target = config["total_params"], config["target_params"]
    for name, r in methods.items():
        assert r["step_s"] > 0 and r["peak_mem_mb"] > 0, name
        timed = config["steps"] * config["rounds"]  # every timed step of every interleaved round
        assert len(r["step_s_all"]) == timed and r["step_s"] == statistics.median(r["step_s_all"])
        assert len(r["round_step_s"]) == config["rounds"] == 2
        n = config["steps"]
        assert r["round_step_s"] == [statistics.median(r["step_s_all"][i * n : (i + 1) * n]) for i in range(2)]
        phases = r["phase_s"]
        assert all(len(phases[k]) == timed for k in ("forward", "backward", "optimizer")), name
        sums = [sum(step) for step in zip(phases["forward"], phases["backward"], phases["optimizer"], strict=True)]
        assert r["step_s_all"] == pytest.approx(sums, rel=1e-12) and min(phases["backward"]) > 0, name
        assert (max(phases["optimizer"]) == 0) == (name == "floor"), name  # the floor has no optimizer
        assert r["total_params"] == total and math.isfinite(r["final_loss"])
        assert r["step_ratio_full"] == pytest.approx(r["step_s"] / methods["full"]["step_s"], rel=1e-12)
        assert r["mem_ratio_full"] == pytest.approx(r["peak_mem_mb"] / methods["full"]["peak_mem_mb"], rel=1e-12)
        # Everything a method marked trainable received a gradient and an update.
        assert r["trainable_params"] == r["intended_params"], name
    assert methods["full"]["step_ratio_full"] == methods["full"]["mem_ratio_full"] == 1.0
    assert methods["full"]["trainable_params"] == total
    assert methods["floor"]["trainable_params"] == 0
    tiny = _tiny().config
    assert methods["lora"]["trainable_params"] == target == config["lora_rank"] * _lora_params_per_rank(tiny)
    assert methods["dora"]["trainable_params"] > target  # plus DoRA's magnitude vectors
    # S2FT's budget rule lands within half a Down channel (hidden_size weights) of the target.
    assert abs(methods["s2ft"]["trainable_params"] - target) <= tiny.hidden_size / 2
    assert abs(methods["spft"]["trainable_params"] - target) <= 10  # per-layer rounding of the SpFT fraction

    assert len(results["targets"]) == len(training.TARGETS)
    for t, (metric, other, op, limit) in zip(results["targets"], training.TARGETS, strict=True):
        assert (t["what"], t["op"], t["limit"]) == (f"{training.METRIC_NAMES[metric]} / {other}", op, limit)
        assert t["ratio"] == pytest.approx(methods["s2ft"][metric] / methods[other][metric], rel=1e-12)
        assert t["met"] == (t["ratio"] <= t["limit"])


def test_training_measures_each_method_in_its_own_process(tmp_path):
    results = training.main(["--quick", "--methods", "s2ft", "floor", "--out", str(tmp_path)])
    _check_outputs(tmp_path, ["s2ft", "floor"])
    methods = results["methods"]
    assert list(methods) == ["s2ft", "floor"]
    assert methods["s2ft"]["trainable_params"] == methods["s2ft"]["intended_params"] > 0
    assert methods["floor"]["trainable_params"] == 0
    assert all(r["live_mem_mb"] > 0 for r in methods.values())  # the second, fixed-mmap-threshold run per method
    assert "step_ratio_full" not in methods["s2ft"]  # no full FT to compare with
    assert [t["what"] for t in results["targets"]] == ["step time / floor"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "--steps"),
        (["--rounds", "0"], "--rounds"),
        (["--budget", "0"], "--budget"),
        (["--lora-dropout", "1"], "--lora-dropout"),
        (["--batch-sizes", "0"], "--batch-sizes"),
        (["--methods", "adapterx"], "invalid choice"),
        (["--model", "gpt5"], "invalid choice"),
    ],
)
def test_training_rejects_bad_options(argv, message, capsys):
    with pytest.raises(SystemExit):
        training.parse_args(argv)
    assert message in capsys.readouterr().err


def _tiny() -> nn.Module:
    return build_bench_model("tiny_llama")


def _lora_params_per_rank(config) -> int:
    """In + out features of q, k, v, up and down in every layer, from the model config."""
    hidden, head_dim = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per_layer = (hidden + q) + 2 * (hidden + kv) + 2 * (hidden + config.intermediate_size)
    return config.num_hidden_layers * per_layer


def test_floor_runs_backward_to_the_embeddings_and_trains_nothing():
    model = prepare(_tiny(), "floor", target_params=0, rank=1, targets=LORA_TARGETS, layout="gather", seed=0)
    reached = []

    def watch_gradient(module, inputs, output) -> None:
        output.register_hook(reached.append)

    model.get_input_embeddings().register_forward_hook(watch_gradient)
    ids = torch.randint(model.config.vocab_size, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(reached) == 1 and reached[0].abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_lora_and_dora_train_with_the_requested_dropout(method):
    kwargs = dict(target_params=0, rank=2, targets=LORA_TARGETS, layout="gather", seed=0)
    model = prepare(_tiny(), method, lora_dropout=0.05, **kwargs)
    dropouts = [m for name, m in model.named_modules() if isinstance(m, nn.Dropout) and "lora_dropout" in name]
    assert len(dropouts) == len(LORA_TARGETS) * model.config.num_hidden_layers
    assert all(d.p == 0.05 for d in dropouts)
    plain = prepare(_tiny(), method, **kwargs)
    assert not any(isinstance(m, nn.Dropout) for name, m in plain.named_modules() if "lora_dropout" in name)


def test_the_benchmarks_lora_rank_matches_the_budget():
    model = _tiny()
    per_rank = lora_param_count(model, 1, LORA_TARGETS)
    assert per_rank == _lora_params_per_rank(model.config)
    assert rank_for_budget(model, 3 * per_rank, LORA_TARGETS) == 3
    assert rank_for_budget(model, 3.4 * per_rank, LORA_TARGETS) == 3
    total = trainable_summary(model)["total_params"]
    assert rank_for_budget(model, 0.01, LORA_TARGETS) == max(1, round(0.01 * total / per_rank))
    with pytest.raises(ValueError, match="match no nn.Linear"):
        lora_param_count(model, 1, ["qkv"])


def test_trained_parameter_count_needs_a_gradient_and_the_optimizer():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model[1].parameters())
    model(torch.randn(5, 3)).sum().backward()
    assert trained_parameter_count(model, optimizer) == 4 * 2 + 2  # model[0] has gradients but is not optimised
    model[1].bias.grad = None
    assert trained_parameter_count(model, optimizer) == 4 * 2
    assert trained_parameter_count(model, None) == 0


def test_peak_memory_counts_an_allocation_above_the_baseline():
    meter = PeakMemory("cpu")
    meter.start_baseline()
    meter.reset_peak()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, written so every page is resident
    del block
    assert meter.peak_mb() >= 63


def test_switch_quick(tmp_path):
    returned = switch.main(["--quick", "--out", str(tmp_path)])
    results = _check_outputs(tmp_path, ["256", "512"])
    assert results == json.loads(json.dumps(returned))
    assert [row["d"] for row in results["layer"]] == [256, 512]
    for row in results["layer"] + [results["model"]]:
        assert row["s2ft_ms"] > 0 and row["lora_ms"] > 0
        assert row["speedup"] == pytest.approx(row["lora_ms"] / row["s2ft_ms"], rel=1e-12)
    model = results["model"]
    assert model["name"] == "tiny_llama" and model["lora_rank"] >= 1 and model["budget_params"] > 0
    assert model["s2ft_checked_ms"] > 0  # switching to adapters validated on every call is timed too
    assert model["s2ft_floor_ms"] > 0 and model["s2ft_same_selection_ms"] > 0  # each timed run checks its weights
    assert model["same_selection_speedup"] == pytest.approx(model["lora_ms"] / model["s2ft_same_selection_ms"])
    assert "The floor, the slot writes alone" in (tmp_path / "results.md").read_text()
    # Quick dims are below 4096, so only the whole-model target applies.
    assert [(t["what"], t["op"], t["ratio"]) for t in results["targets"]] == [
        ("model tiny_llama", ">=", model["speedup"])
    ]
    assert results["targets"][0]["met"] == (model["speedup"] >= switch.MODEL_TARGET["speedup"])


def test_switch_layer_result_and_target_checks():
    row = bench_layer(64, rows=8, rank=4, repeats=2, device="cpu", dtype=torch.float32)
    assert set(row) == {"d", "s2ft_ms", "lora_ms", "speedup"} and row["d"] == 64
    rows = [{"d": 2048, "speedup": 1.0}, {"d": 4096, "speedup": 7.0}, {"d": 8192, "speedup": 4.0}]
    checks = switch.check_targets(rows, {"name": "m", "speedup": 10.5})
    assert [(c["ratio"], c["op"], c["limit"], c["met"]) for c in checks] == [
        (4.0, ">=", 5.0, False),
        (10.5, ">=", 10.0, True),
    ]
    assert not switch.check_targets(rows, {"name": "m", "speedup": 9.5})[1]["met"]


def test_layout_quick_writes_json_table_and_chart(tmp_path):
    returned = layout.main(["--quick", "--out", str(tmp_path)])
    results = _check_outputs(tmp_path, list(layout.BUDGETS))
    assert results == json.loads(json.dumps(returned))
    config = results["config"]
    assert (config["layers"], config["vocab"], config["batch"], config["seq"], config["steps"]) == (1, 512, 1, 32, 2)
    assert list(results["budgets"]) == list(layout.BUDGETS)
    for budget, row in results["budgets"].items():
        assert row["ratios"] == layout.BUDGETS[budget] and row["trainable_params"] > 0
        assert all(row[name]["median_s"] >= row[name]["min_s"] > 0 for name in ("gather", "permuted"))
        assert row["permuted_over_gather"] == pytest.approx(row["permuted"]["median_s"] / row["gather"]["median_s"])
    table = (tmp_path / "results.md").read_text()
    assert (
        f"| all | q 0.12, k 0.34, v 0.34, o 0.12, gate 0.02, up 0.02, down 0.02 | {row['trainable_params']:,} |"
        in table
    )
    (tmp_path / "results.md").unlink()
    redraw(tmp_path)
    assert (tmp_path / "results.md").read_text() == table


def test_check_nearer_rejects_the_wrong_adapter():
    generator = torch.Generator().manual_seed(0)
    expected, other = torch.randn(16, 16, generator=generator), torch.randn(16, 16, generator=generator)
    check_nearer(expected + 1e-7, expected, other, "ok")
    with pytest.raises(AssertionError, match="wrong weights"):
        check_nearer(other, expected, other, "swapped")


COMMITTED = ["training_cpu", "switch_cpu", "serving_cpu"]


@pytest.mark.parametrize("name", COMMITTED)
def test_redraw_rebuilds_the_committed_table_and_chart(tmp_path, name):
    committed = REPO / "results" / name
    (tmp_path / "results.json").write_text((committed / "results.json").read_text())
    redraw(tmp_path)
    assert (tmp_path / "results.md").read_text() == (committed / "results.md").read_text()
    assert (tmp_path / "results.json").read_text() == (committed / "results.json").read_text()
    assert (tmp_path / "results.png").read_bytes().startswith(PNG_MAGIC)


def _without_op(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "op"} for record in records]


@pytest.mark.parametrize("name", COMMITTED)
def test_redraw_recomputes_target_records_that_lack_their_comparison(tmp_path, name):
    committed = json.loads((REPO / "results" / name / "results.json").read_text())
    old = committed | {"targets": _without_op(committed["targets"])}
    if "settings" in old:
        old["settings"] = [s | {"targets": _without_op(s["targets"])} for s in old["settings"]]
    assert recompute_targets(old) == committed  # the measured numbers as they were, the records as the check makes them
    (tmp_path / "results.json").write_text(json.dumps(old, indent=2) + "\n")
    redraw(tmp_path)
    assert json.loads((tmp_path / "results.json").read_text()) == committed


def test_target_records_carry_their_comparison_into_the_line():
    records = [target("step / full", 0.6495, "<=", 0.55), target("model m", 22.61, ">=", 10.0)]
    assert [t["met"] for t in records] == [False, True]
    assert target("at the limit", 1.5, ">=", 1.5)["met"] and target("at the limit", 1.3, "<=", 1.3)["met"]
    line = "\nS2FT targets: step / full: 0.65× (≤ 0.55×) MISSED; model m: 22.61× (≥ 10×) met.\n"
    assert targets_line(records) == line
    assert targets_line([]) == ""
    with pytest.raises(ValueError, match="op is one of <=, >="):
        target("x", 1.0, "<", 1.0)


def test_results_without_matplotlib_keep_json_and_table(tmp_path, monkeypatch, capsys):
    results = json.loads((REPO / "results" / "switch_cpu" / "results.json").read_text())
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as on a machine without it: import raises ImportError
    write_results(results, tmp_path, switch_table, switch_chart)
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert (tmp_path / "results.md").read_text() == switch_table(results)
    assert not (tmp_path / "results.png").exists()
    assert "python -m experiments.bench.redraw" in capsys.readouterr().out


def test_redraw_names_a_missing_results_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="results.json does not exist"):
        redraw(tmp_path)


def _peft_warnings(silence: bool) -> list[str]:
    """The warnings raised while PEFT wraps a tiny model and another FutureWarning is raised, every one recorded."""
    model = _tiny()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if silence:
            silence_peft_deprecation()
        get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
        warnings.warn("another deprecation", FutureWarning, stacklevel=1)
    return [str(w.message) for w in caught]


def test_benchmarks_silence_exactly_peft_s_gradient_checkpointing_warning():
    unsilenced = _peft_warnings(silence=False)
    assert any(m.startswith("`is_gradient_checkpointing` is deprecated") for m in unsilenced)  # the filter is needed
    silenced = _peft_warnings(silence=True)
    assert silenced == [m for m in unsilenced if not m.startswith("`is_gradient_checkpointing` is deprecated")]
    assert "another deprecation" in silenced
