"""The serving benchmark (`python -m experiments.bench.serving`) in its quick mode: complete, consistent results files.

No timing is asserted.
"""

import json

import pytest
import torch
from test_bench import _check_outputs

from experiments.bench import serving
from experiments.bench.models import build_bench_model
from experiments.bench.serving_layer import VARIANTS, bench_layer_adapters
from experiments.bench.serving_model import METHODS, random_adapter
from s2ft.adapter import base_digest

KEYS = {"adapters"} | {f"{method}_tok_s" for method in METHODS}


def test_serving_quick(tmp_path):
    returned = serving.main(["--quick", "--out", str(tmp_path)])
    results = _check_outputs(tmp_path, ["1", "2", "4", "10", "100"])
    assert results == json.loads(json.dumps(returned))
    config = results["config"]
    assert (config["model"], config["batch"], config["prefill"], config["decode"]) == ("tiny_llama", 4, 16, 4)
    for phase in ("decode", "prefill"):
        assert [row["adapters"] for row in results[phase]] == [1, 2, 4]
        assert all(set(row) == KEYS and min(row[k] for k in KEYS - {"adapters"}) > 0 for row in results[phase])
    # S2FT's mixed batch and its LoRA export agree to fp32 rounding, and both differ from the base model.
    for difference in results["max_abs_logit_diff"].values():
        assert difference["s2ft_vs_export"] <= 1e-5 < 1e-4 < difference["s2ft_vs_base"]
    assert [row["adapters"] for row in results["layer"]] == [1, 10, 100]
    assert all(row[f"{v}_ms"] > 0 for row in results["layer"] for v in VARIANTS)
    targets = results["targets"]
    row = results["decode"][-1]  # 4 adapters: the most measured below the target's 16
    assert targets[0]["ratio"] == pytest.approx(row["base_tok_s"] / row["s2ft_tok_s"])
    assert targets[0]["met"] == (targets[0]["ratio"] <= serving.TARGETS["base_step_ratio"])
    assert targets[1]["ratio"] == pytest.approx(row["s2ft_tok_s"] / row["peft_lora_tok_s"])
    assert targets[1]["met"] == (targets[1]["ratio"] >= serving.TARGETS["peft_speedup"])
    assert "4 adapters" in targets[0]["what"]


def test_random_adapter_has_the_budget_and_perturbed_values():
    base = build_bench_model("tiny_llama").eval()
    adapter = random_adapter(base, target_params=4096, seed=0)
    count = sum(m.values.numel() for m in adapter.modules.values())
    assert abs(count - 4096) <= base.config.hidden_size
    for name, m in adapter.modules.items():
        original = base.get_submodule(name).weight.detach().index_select(m.axis, m.positions)
        assert not torch.equal(m.values, original) and torch.allclose(m.values, original, atol=0.1)
    assert adapter.base_digest == base_digest(base, adapter.modules)


def test_layer_forms_agree_and_report_every_variant():
    row = bench_layer_adapters(8, d=32, columns=4, repeats=1, device="cpu", dtype=torch.float32)
    assert set(row) == {"adapters", "lora_over_s2ft_bmm"} | {f"{v}_ms" for v in VARIANTS}
    assert row["lora_over_s2ft_bmm"] == pytest.approx(row["lora_bmm_ms"] / row["s2ft_bmm_ms"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--adapters", "64"], "--adapters"),
        (["--batch", "0"], "--batch"),
        (["--budget", "2"], "--budget"),
        (["--layer-columns", "4096", "--layer-d", "64"], "--layer-columns"),
    ],
)
def test_serving_rejects_bad_options(argv, message, capsys):
    with pytest.raises(SystemExit):
        serving.parse_args(argv)
    assert message in capsys.readouterr().err
