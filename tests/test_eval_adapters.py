"""mode=eval adapters=[...]: several S2FT adapters on one base model, evaluated in one batched pass, give what
evaluating each alone gives (predictions, correctness, held-out losses; fp32), and bad input is refused first."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import DATA, ROOT, smoke_config
from test_data_template import CHATML

import s2ft
from s2ft.config import S2FTConfig
from s2ft.data import eval_subset, load_heldout
from s2ft.data.overlap import DataOverlapError
from s2ft.errors import UserError
from s2ft.evaluation import evaluate, heldout_item_losses
from s2ft.evaluation.evaluate import evaluate_adapters
from s2ft.evaluation.heldout import adapter_item_losses
from s2ft.lightning import evaluation as lightning_evaluation
from s2ft.lightning import run_experiment
from s2ft.lightning.provenance import read_adapter_record, write_adapter_record
from s2ft.lightning.run_dir import RunDirError
from s2ft.methods import prepare_model, save_trained
from s2ft.models import build_run_model

# Shared by every evaluation here: batches of 3 rows, so batches mix adapters and split an item's rows.
EVAL = ("mode=eval", "eval.limit=4", "eval.batch_size=3", "eval.max_new_tokens=6", "eval.heldout_limit=5")
TASKS = {"generate": "eval.tasks=[gsm8k,piqa]", "loglik": "eval.tasks=[piqa,aqua]"}
TIMINGS = ("tokens_per_s", "wall_s")  # the batched pass's, not one adapter's


def add_noise(model, seed: int) -> None:
    """Moves the trained values far from the base, so that every adapter generates its own text."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator))


def noisy_adapter(folder: Path, seed: int, model_name: str = "tiny_llama") -> Path:
    model, _ = build_run_model({"name": model_name})
    model = s2ft.apply_s2ft(model, S2FTConfig(ratios={"q": 0.25, "o": 0.25, "up": 0.1, "down": 0.1}, seed=seed))
    add_noise(model, seed)
    s2ft.save_adapter(model, folder)
    return folder


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """A trained run directory ("cs", commonsense_mix; its adapter noised, its training record kept), two adapter
    folders ("n1", "n2"), a run trained on math_data ("math"), a LoRA run's adapter and a Qwen2 S2FT adapter."""
    base = tmp_path_factory.mktemp("sources")
    run_experiment(smoke_config("trainer.max_steps=1", "trainer.warmup_steps=0"), base / "cs")
    folder = base / "cs" / "adapter"
    record = read_adapter_record(folder)
    model, _ = build_run_model({"name": "tiny_llama"})
    model = s2ft.load_adapter(model, folder, trainable=True)
    add_noise(model, 3)
    s2ft.save_adapter(model, folder)
    write_adapter_record(folder, "s2ft", record)
    run_experiment(
        smoke_config("trainer.max_steps=1", "trainer.warmup_steps=0", "data.train=[math_data]"), base / "math"
    )
    lora, _ = build_run_model({"name": "tiny_llama"})
    save_trained(prepare_model(lora, "lora", {}), "lora", base / "lora")
    return {
        "cs": base / "cs",
        "n1": noisy_adapter(base / "n1", 1),
        "n2": noisy_adapter(base / "n2", 2),
        "math": base / "math",
        "lora": base / "lora",
        "qwen": noisy_adapter(base / "qwen", 1, "tiny_qwen2"),
    }


def single_command(path: Path) -> str:
    return f"run_dir={path}" if (path / "adapter").is_dir() else f"adapter={path}"


def records(file: Path) -> list[dict]:
    return [json.loads(line) for line in file.read_text().splitlines()]


def without_timings(summary: dict) -> dict:
    summary = json.loads(json.dumps(summary))
    for result in summary["eval"].values():
        for key in TIMINGS:
            result.pop(key, None)
    summary.pop("heldout")
    summary.pop("measure_wall_s")
    return summary


@pytest.mark.parametrize("mode", ["generate", "loglik"])
def test_one_batched_pass_gives_what_each_adapter_alone_gives(mode, sources, tmp_path):
    legs = {name: sources[name] for name in ("cs", "n1", "n2")}
    common = (*EVAL, TASKS[mode], f"eval.mode={mode}", "eval.heldout=[gsm8k_test]")
    mapping = "{" + ",".join(f"{name}:{path}" for name, path in legs.items()) + "}"
    index = run_experiment(smoke_config(*common, f"adapters={mapping}"), tmp_path / "batched")
    assert json.loads((tmp_path / "batched" / "adapters.json").read_text()) == index
    assert list(index["adapters"]) == list(legs)
    outputs = {}
    for name, path in legs.items():
        alone = run_experiment(smoke_config(*common, single_command(path)), tmp_path / f"alone_{name}")
        batched_dir, alone_dir = tmp_path / "batched" / "adapters" / name, tmp_path / f"alone_{name}"
        assert index["adapters"][name]["source"] == str(path)
        assert index["adapters"][name]["results"] == f"adapters/{name}"
        # The same files, the same config as the one-adapter command, the same summary but the pass's timings.
        assert sorted(p.name for p in (batched_dir / "predictions").iterdir()) == sorted(
            p.name for p in (alone_dir / "predictions").iterdir()
        )
        assert (batched_dir / "config.yaml").read_text() == (alone_dir / "config.yaml").read_text()
        batched = json.loads((batched_dir / "summary.json").read_text())
        assert without_timings(batched) == without_timings(alone)
        # The one pass's timing, by part, in every adapter's summary.
        parts = {"tasks", "heldout"}
        assert batched["measure_wall_s"]["after"].keys() == alone["measure_wall_s"]["after"].keys() == parts
        first = json.loads((tmp_path / "batched" / "adapters" / next(iter(legs)) / "summary.json").read_text())
        assert batched["measure_wall_s"] == first["measure_wall_s"]
        assert batched["heldout"]["gsm8k_test"]["after"] == pytest.approx(alone["heldout"]["gsm8k_test"]["after"], 1e-6)
        assert index["adapters"][name]["heldout"] == {"gsm8k_test": batched["heldout"]["gsm8k_test"]["after"]}
        for file in sorted((alone_dir / "predictions").iterdir()):
            got, want = records(batched_dir / "predictions" / file.name), records(file)
            if file.name.startswith("heldout_"):
                assert [(r["id"], r["tokens"]) for r in got] == [(r["id"], r["tokens"]) for r in want]
                assert [r["nll"] for r in got] == pytest.approx([r["nll"] for r in want], rel=1e-6)
                continue
            exact = ("id", "prompt", "output", "extracted", "gold", "correct", "extracted_sum", "correct_sum")
            assert [{k: r.get(k) for k in exact} for r in got] == [{k: r.get(k) for k in exact} for r in want]
            if mode == "loglik":
                for g, w in zip(got, want, strict=True):
                    assert g["logprob"] == pytest.approx(w["logprob"], rel=1e-5, abs=1e-5)
        outputs[name] = [r["output"] for r in records(batched_dir / "predictions" / "piqa.jsonl")]
    if mode == "generate":  # every adapter answers in its own way, so a mix-up of rows would show
        assert outputs["n1"] != outputs["n2"] and outputs["n1"] != outputs["cs"]


def test_auto_skips_a_finished_batched_pass(sources, tmp_path, monkeypatch):
    """An adapters=[...] run finishes with adapters.json, not summary.json: ckpt_path=auto (a rerun study sweep) took
    its directory for an attempt that never finished and evaluated every adapter again, rewriting their results."""
    overrides = (*EVAL, TASKS["loglik"], "eval.heldout=[]", f"adapters=[{sources['n1']},{sources['n2']}]")
    index = run_experiment(smoke_config(*overrides, "ckpt_path=auto"), tmp_path / "eval")
    before = snapshot(tmp_path / "eval")
    monkeypatch.setattr(lightning_evaluation, "measure_adapters", lambda *args: pytest.fail("evaluated again"))
    assert run_experiment(smoke_config(*overrides, "ckpt_path=auto"), tmp_path / "eval") == index
    assert snapshot(tmp_path / "eval") == before
    # Other evaluation files under the same config (paths.data_dir elsewhere): refused, not skipped.
    data = tmp_path / "data"
    shutil.copytree(DATA, data)
    piqa = json.loads((tmp_path / "eval" / "adapters" / "n1" / "summary.json").read_text())["eval_data"][0]
    edited = data / Path(piqa["file"]).relative_to(DATA)
    edited.write_text(edited.read_text().replace("a", "b", 1))
    with pytest.raises(RunDirError, match=rf"evaluation file piqa \({edited}: SHA-256 .*overwrite=true"):
        run_experiment(smoke_config(*overrides, "ckpt_path=auto", f"paths.data_dir={data}"), tmp_path / "eval")
    assert snapshot(tmp_path / "eval") == before


def test_each_adapter_is_evaluated_in_its_own_template(tmp_path):
    """Library level: one adapter in the Alpaca template, one in the chat template, in one pass."""
    base, tokenizer = build_run_model({"name": "tiny_llama"})
    tokenizer.chat_template = CHATML
    folders = {"n1": noisy_adapter(tmp_path / "n1", 1), "n2": noisy_adapter(tmp_path / "n2", 2)}
    templates = {"n1": "alpaca", "n2": "chat"}
    mixed = s2ft.load_adapters(base, folders)
    settings = dict(data_dir=DATA, limit=3, batch_size=4, max_new_tokens=5, progress=False)
    out_dirs = {name: tmp_path / "mixed" / name for name in folders}
    together = evaluate_adapters(mixed, tokenizer, ["boolq"], templates=templates, out_dirs=out_dirs, **settings)
    examples = eval_subset(load_heldout("gsm8k_test", DATA), 4, 0)
    losses = adapter_item_losses(mixed, tokenizer, examples, 3, 512, templates)
    for name, folder in folders.items():
        alone_model = s2ft.load_adapter(build_run_model({"name": "tiny_llama"})[0], folder)
        alone_dir = tmp_path / "alone" / name
        alone = evaluate(alone_model, tokenizer, ["boolq"], template=templates[name], out_dir=alone_dir, **settings)
        assert together[name]["avg_accuracy"] == alone["avg_accuracy"]
        got, want = (
            records(out_dirs[name] / "predictions" / "boolq.jsonl"),
            records(alone_dir / "predictions" / "boolq.jsonl"),
        )
        assert [(r["prompt"], r["output"], r["correct"]) for r in got] == [
            (r["prompt"], r["output"], r["correct"]) for r in want
        ]
        single = heldout_item_losses(alone_model, tokenizer, examples, 3, 512, templates[name])
        assert [r["tokens"] for r in losses[name]] == [r["tokens"] for r in single]
        assert [r["nll"] for r in losses[name]] == pytest.approx([r["nll"] for r in single], rel=1e-6)
    assert records(out_dirs["n2"] / "predictions" / "boolq.jsonl")[0]["prompt"].startswith("<|im_start|>user")


BAD = {
    "missing": (lambda s: [f"adapters=[{s['n1']},{s['n1'].parent}/nowhere]"], r"nowhere' is not a folder"),
    "lora": (lambda s: [f"adapters=[{s['n1']},{s['lora']}]"], r"holds a lora adapter; the batched pass serves S2FT"),
    "other_base": (lambda s: [f"adapters=[{s['n1']},{s['qwen']}]"], r"trained on different base models"),
    "same_name": (lambda s: [f"adapters=[{s['n1']},{s['cs']}/adapter,{s['cs']}]"], r"would all be named 'cs'"),
    "beams": (lambda s: [f"adapters=[{s['n1']},{s['n2']}]", "eval.num_beams=2"], r"decode greedily"),
    "with_run_dir": (lambda s: [f"adapters=[{s['n1']}]", f"run_dir={s['cs']}"], r"adapters=\[\.\.\.\] or run_dir"),
    "overlap": (
        lambda s: [f"adapters=[{s['n1']},{s['math']}]", "eval.tasks=[gsm8k]"],
        r"math/adapter was trained on math_data, which contains questions of the evaluation sets",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_adapters_are_refused_before_anything_is_written(case, sources, tmp_path):
    overrides, message = BAD[case]
    overrides = overrides(sources)
    tasks = [] if any(o.startswith("eval.tasks=") for o in overrides) else ["eval.tasks=[piqa]"]
    before = {name: snapshot(path) for name, path in sources.items()}
    error = DataOverlapError if case == "overlap" else UserError
    with pytest.raises(error, match=message):
        run_experiment(smoke_config(*EVAL, *tasks, *overrides), tmp_path / "eval")
    assert not (tmp_path / "eval").exists()
    assert {name: snapshot(path) for name, path in sources.items()} == before


def test_a_special_token_in_a_heldout_set_is_refused_before_anything_is_written(sources, tmp_path):
    """Before, config.yaml was written and every task evaluated for every adapter before the held-out set's "<s>"
    was refused."""
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(json.dumps({"instruction": "<s>Why?", "output": "Because."}) + "\n")
    definition = tmp_path / "mine.yaml"
    definition.write_text(json.dumps({"name": "mine", "path": str(heldout), "answer": "text"}))
    overrides = (f"adapters=[{sources['n1']},{sources['n2']}]", "eval.tasks=[piqa]", f"eval.heldout=[{definition}]")
    with pytest.raises(
        UserError, match=r"^eval.heldout mine: 1 item\(s\) hold the tokenizer's special token\(s\) <s> "
    ):
        run_experiment(smoke_config(*EVAL, *overrides), tmp_path / "eval")
    assert not (tmp_path / "eval").exists()


def run_py(*overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "run.py", "debug=smoke", "logger=none", *EVAL, "eval.tasks=[piqa]", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_run_py_evaluates_a_list_of_adapters(sources, tmp_path):
    done = run_py(f"adapters=[{sources['n1']},{sources['cs']}]", f"hydra.run.dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    index = json.loads((tmp_path / "adapters.json").read_text())
    assert list(index["adapters"]) == ["n1", "cs"]
    single = yaml.safe_load((tmp_path / "adapters" / "cs" / "config.yaml").read_text())
    assert single["run_dir"] == str(sources["cs"]) and single["adapters"] is None
    assert json.loads((tmp_path / "adapters" / "n1" / "summary.json").read_text())["source"] == str(sources["n1"])


def test_run_py_refuses_a_bad_adapter_with_one_error_and_exit_1(sources, tmp_path):
    done = run_py(f"adapters=[{sources['n1']},{sources['lora']}]", f"hydra.run.dir={tmp_path}")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.count("error: ") == 1, done.stderr[-3000:]
    assert re.search(r"error: 1 problem\(s\) in the config:\n  - adapters: \S+lora holds a lora adapter", done.stderr)
    assert not (tmp_path / "adapters.json").exists() and not (tmp_path / "adapters").exists()


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_an_adapters_source_without_a_readable_config_is_named_not_called_another_method(damage, tmp_path):
    """Before, a corrupt or missing adapter_config.json was reported as 'holds a unknown adapter; the batched pass
    serves S2FT adapters only', which sent the user to evaluate an S2FT adapter on its own."""
    folder = noisy_adapter(tmp_path / "n1", 1)
    config = folder / "adapter_config.json"
    if damage == "corrupt":
        config.write_text("{not json")
    else:
        config.unlink()
    why = "is missing" if damage == "missing" else r"is not an adapter's \(corrupt, or written by another tool\)"
    with pytest.raises(UserError) as info:
        run_experiment(smoke_config(*EVAL, "eval.tasks=[piqa]", f"adapters=[{folder}]"), tmp_path / "eval")
    assert re.search(rf"adapters: \S+n1 is not a saved adapter: \S+n1/adapter_config\.json {why}; ", str(info.value))
    assert "holds a" not in str(info.value)
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("method", ["s2ft", "lora"])
def test_mode_eval_of_an_adapter_with_a_corrupt_record_is_refused_naming_the_file(method, tmp_path):
    """Before, the training record's JSON was read unguarded: a JSONDecodeError traceback."""
    folder = tmp_path / "adapter"
    if method == "s2ft":
        noisy_adapter(folder, 1)
        damaged = folder / "adapter_config.json"
    else:
        save_trained(prepare_model(build_run_model({"name": "tiny_llama"})[0], "lora", {}), "lora", folder)
        damaged = folder / "training_data.json"
    damaged.write_text('{"train": ')
    overrides = (*EVAL, "eval.tasks=[piqa]", f"method={method}", f"adapter={folder}")
    with pytest.raises(s2ft.AdapterError, match=rf"^corrupt {re.escape(str(damaged))}: Expecting value: .*save the"):
        run_experiment(smoke_config(*overrides), tmp_path / "eval")
    assert not (tmp_path / "eval").exists()
