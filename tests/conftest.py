"""Shared fixtures: run configs composed as run.py composes them, tiny random decoders (`s2ft.models.tiny_model`
with test sizes), calibration batches, S2FT adapters of them (stand-in trained, saved, broken on purpose) and scripted
generation.

Every model fixture builds a fresh fp32 model from a fixed seed, so tests may mutate it. Import the builders
(`from conftest import build_tiny, calibration_batches`) or use the fixtures of the same names. A test's run config
comes from `compose_run` (`compose_config` where it needs the composed config itself), through run.py's own code;
`smoke_config` is the short training run, `logged` and `adapter_tensors` read what it wrote.
"""

import copy
import csv
import importlib
import json
import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hydra import initialize_config_dir
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file

import s2ft
from s2ft.adapter_format import CONFIG_NAME, WEIGHTS_NAME, file_sha256
from s2ft.evaluation.generate import Generation
from s2ft.lightning.jobs import compose_job, resolved_job
from s2ft.models import MODEL_SHAPES, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]  # the repository
DATA = ROOT / "data"  # the shipped benchmark files
CONF = ROOT / "conf"  # run.py's configs
os.environ["S2FT_ROOT"] = str(ROOT)  # as run.py sets it: paths.root, and so paths.data_dir, is this checkout


@contextmanager
def run_hydra():
    """Hydra initialized on run.py's conf/ (what `@hydra.main(config_path="conf")` does for run.py)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


def compose_config(*overrides: str) -> DictConfig:
    """The config Hydra composes for `python run.py OVERRIDES`, unresolved, its `hydra` node included."""
    with run_hydra():
        return compose_job(list(overrides))


def compose_run(*overrides: str) -> dict:
    """The resolved config `python run.py OVERRIDES` runs: run.py's own `s2ft.lightning.jobs.job_config` (so
    `debug=NAME` is merged last and the command line's keys win), as a plain dict; not validated."""
    return resolved_job(compose_config(*overrides))


def smoke_config(*overrides: str, logger: str = "none") -> dict:
    """`compose_run` of a `debug=smoke` training run without evaluation (and without a logger unless named)."""
    return compose_run("debug=smoke", "eval=none", f"logger={logger}", *overrides)


def logged(run_dir: Path, timings: bool = False) -> dict[tuple[str, int], float]:
    """(metric, step) -> value of the loss and lr rows of a run's metrics.csv (timings, which vary by run, too)."""
    with (run_dir / "metrics.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    keys = ("train/loss", "train/lr", "train/tokens", "val/loss") + ("train/tokens_per_s",) * timings
    values = {(k, int(row["step"])): float(row[k]) for row in rows for k in keys if row.get(k)}
    assert len(values) == sum(1 for row in rows for k in keys if row.get(k)), "a metric was logged twice at one step"
    return values


def adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the run's saved adapter files, keyed `FILE:TENSOR`."""
    files = sorted((run_dir / "adapter").glob("*.safetensors"))
    assert files, f"no adapter written in {run_dir}"
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(f).items()}


VOCAB = 128
COMMON = dict(
    num_hidden_layers=2,
    intermediate_size=96,
    max_position_embeddings=64,
    # A larger init than the default 0.02 gives logits of order 1, so permutation or scoring bugs show clearly.
    initializer_range=0.1,
    attn_implementation="eager",
    pad_token_id=None,  # no zeroed padding row in the embedding
    tie_word_embeddings=False,
)

# name -> (family of `s2ft.models.tiny_model`, sizes); head counts chosen to cover GQA groups of 2, 3 and 4.
TINY = {
    "llama_gqa": (
        "llama",
        dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=4, head_dim=8, tie_word_embeddings=True),
    ),
    "llama_9_3": (
        "llama",
        dict(
            hidden_size=72,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=8,
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
        ),
    ),
    "mistral": (
        "mistral",
        dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=8, sliding_window=None),
    ),
    "qwen2": ("qwen2", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16)),
    "qwen3": ("qwen3", dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=4, head_dim=16)),
}


def build_tiny(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A fresh tiny fp32 causal LM (`TINY[name]`), initialized from `seed`, in eval mode."""
    family, sizes = TINY[name]
    fields = {"vocab_size": VOCAB, **COMMON, **sizes, **overrides}
    return tiny_model(family, seed=seed, **fields).eval()


SMOLLM2_LAYER = ("hidden_size", "intermediate_size", "head_dim", "num_attention_heads", "num_key_value_heads")


def smollm2_layers(num_hidden_layers: int = 2, vocab_size: int = 32) -> torch.nn.Module:
    """A llama with SmolLM2-135M's layer shapes (`s2ft.models.MODEL_SHAPES`), few layers and a tiny vocabulary:
    per-layer budgets are the real model's."""
    _, shapes = MODEL_SHAPES["smollm2_135m"]
    fields = {key: shapes[key] for key in SMOLLM2_LAYER}
    return tiny_model("llama", vocab_size=vocab_size, num_hidden_layers=num_hidden_layers, **fields)


def calibration_batches(
    vocab: int = VOCAB, num_batches: int = 2, batch_size: int = 3, seq_len: int = 10, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches (pad id 0; every row but the first has padding) with input_ids, attention_mask, labels.

    labels are the input_ids with -100 at padding, as a causal-LM collator makes them.
    """
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        input_ids = torch.randint(1, vocab, (batch_size, seq_len), generator=generator)
        lengths = torch.tensor([seq_len] + [seq_len - 1 - i % (seq_len - 2) for i in range(batch_size - 1)])
        attention_mask = (torch.arange(seq_len) < lengths[:, None]).long()
        input_ids = input_ids * attention_mask
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return batches


# S2FT adapters of the tiny models, for the adapter, switching, serving and export tests.
RATIOS = {"q": 0.25, "k": 0.5, "v": 0.5, "o": 0.25, "gate": 0.05, "up": 0.05, "down": 0.05}
INPUT_IDS = calibration_batches()[0]["input_ids"]


def trained(model, cfg, seed: int = 1):
    """Applies S2FT and perturbs every trainable value, standing in for training."""
    s2ft.apply_s2ft(model, cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return model


def logits(model) -> torch.Tensor:
    """The model's logits on `INPUT_IDS`, without gradients."""
    with torch.no_grad():
        return model(INPUT_IDS).logits


def snapshot(model) -> dict[str, torch.Tensor]:
    """A copy of every tensor of the model's state dict (for `assert_same_state`)."""
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def assert_same_state(model, state) -> None:
    """The model's state dict equals `state` (a `snapshot`) exactly, key for key."""
    current = model.state_dict()
    assert current.keys() == state.keys()
    assert all(torch.equal(current[name], state[name]) for name in state)


def adapter_files(tmp_path, base, ratios, seed, exclude=None):
    """Saves a `trained` copy of `base` (S2FT with `ratios`, `seed`, `exclude`) under `tmp_path/a{seed}`; its path."""
    model = trained(copy.deepcopy(base), s2ft.S2FTConfig(ratios=ratios, seed=seed, exclude=exclude), seed=seed)
    s2ft.save_adapter(model, tmp_path / f"a{seed}")
    return tmp_path / f"a{seed}"


def corrupt_units(path, units, key="units"):
    config = json.loads((path / CONFIG_NAME).read_text())
    config["modules"]["model.layers.0.self_attn.o_proj"][key] = units
    (path / CONFIG_NAME).write_text(json.dumps(config))


def corrupt_entry(path, entry, name="model.layers.0.self_attn.o_proj"):
    config = json.loads((path / CONFIG_NAME).read_text())
    config["modules"][name] = entry
    (path / CONFIG_NAME).write_text(json.dumps(config))


def rename_module(path, new, name="model.layers.0.self_attn.o_proj"):
    """Renames module ``name`` to ``new`` in the config (its weights keep the old name)."""
    config = json.loads((path / CONFIG_NAME).read_text())
    config["modules"][new] = config["modules"].pop(name)
    (path / CONFIG_NAME).write_text(json.dumps(config))


def rewrite_weights(path, tensors):
    """Writes ``tensors`` as the adapter's weights and records their checksum in its config, as a save would: the
    bad values themselves, not a mismatched pair, are what the loader must refuse."""
    save_file(tensors, path / WEIGHTS_NAME)
    corrupt_field(path, "weights_sha256", file_sha256(path / WEIGHTS_NAME))


def corrupt_values(path, value):
    tensors = load_file(path / WEIGHTS_NAME)
    tensors["model.layers.0.self_attn.o_proj.values"][0, 0] = value
    rewrite_weights(path, tensors)


def corrupt_field(path, key, value):
    config = json.loads((path / CONFIG_NAME).read_text())
    config[key] = value
    (path / CONFIG_NAME).write_text(json.dumps(config))


def cast_values(path, dtype):
    rewrite_weights(path, {name: t.to(dtype) for name, t in load_file(path / WEIGHTS_NAME).items()})


# A broken adapter of build_tiny("llama_gqa") (o_proj trained): how to break it, what the refusal says.
BAD_ADAPTERS = {
    "missing weights": (lambda p: (p / WEIGHTS_NAME).unlink(), "adapter file missing"),
    "missing config": (lambda p: (p / CONFIG_NAME).unlink(), "adapter file missing"),
    "corrupt weights": (lambda p: (p / WEIGHTS_NAME).write_bytes(b"\x00garbage"), "corrupt adapter weights"),
    "corrupt config": (lambda p: (p / CONFIG_NAME).write_text("{not json"), "corrupt adapter config"),
    "not an adapter": (lambda p: (p / CONFIG_NAME).write_text("{}"), "not an S2FT adapter"),
    "settings not a mapping": (lambda p: corrupt_field(p, "config", None), "'config' .* must be a mapping"),
    "out of range": (lambda p: corrupt_units(p, [0, 8]), r"must lie in \[0, 8\)"),
    "negative": (lambda p: corrupt_units(p, [-1, 2]), r"must lie in \[0, 8\)"),
    "duplicated": (lambda p: corrupt_units(p, [3, 3]), "sorted and unique"),
    "unsorted": (lambda p: corrupt_units(p, [5, 2]), "sorted and unique"),
    "not integers": (lambda p: corrupt_units(p, [1.5, 2]), "list of 64-bit ints"),
    "wrong count": (lambda p: corrupt_units(p, [1, 2, 3]), "values have shape"),
    "wrong layer": (lambda p: corrupt_units(p, 1, key="layer"), "recorded as the o projection of layer 1"),
    "nan": (lambda p: corrupt_values(p, float("nan")), "NaN/inf"),
    "inf": (lambda p: corrupt_values(p, float("inf")), "NaN/inf"),
    "integers": (lambda p: cast_values(p, torch.int32), "values are torch.int32; S2FT computes with float16"),
    "float8": (lambda p: cast_values(p, torch.float8_e4m3fn), "values are torch.float8_e4m3fn; S2FT computes with"),
    "base digest without its dtype's": (
        lambda p: corrupt_field(p, "base_digest", {"dtype": "float32", "sha256": {"bfloat16": "0" * 64}}),
        "corrupt base_digest",
    ),
    "base digest dtype not a name": (
        lambda p: corrupt_field(p, "base_digest", {"dtype": [], "sha256": {"float32": "0" * 64}}),
        "corrupt base_digest",
    ),
    "empty module name": (lambda p: rename_module(p, ""), r"'modules' has an entry with an empty module name"),
    "empty module entry": (lambda p: corrupt_entry(p, {}), r"corrupt entry for module '.*o_proj' in .*: it is empty"),
    "float shape": (lambda p: corrupt_units(p, [64.0, 64], key="shape"), r"'shape' must be .* got \[64.0, 64\]"),
    "fractional shape": (lambda p: corrupt_units(p, [64.5, 64], key="shape"), r"'shape' .* got \[64.5, 64\]"),
    "float layer": (lambda p: corrupt_units(p, 0.0, key="layer"), r"'layer' must be an integer, got 0.0"),
    "base digest not hex": (
        lambda p: corrupt_field(p, "base_digest", {"dtype": "float32", "sha256": {"float32": "xyz"}}),
        "corrupt base_digest",
    ),
}

# Base models an adapter of build_tiny("llama_gqa") does not fit, and what the refusal says.
OTHER_BASES = [
    (lambda: build_tiny("llama_gqa", hidden_size=32), "weight shape"),
    (lambda: build_tiny("llama_gqa", num_hidden_layers=1), "not a linear layer"),
    (lambda: build_tiny("llama_gqa", vocab_size=64), "names/shapes differ"),
    # The same weights' shapes, other heads: 4 of 16 instead of 8 of 8.
    (lambda: build_tiny("llama_gqa", num_attention_heads=4, num_key_value_heads=2, head_dim=16), "another head_dim"),
]


@pytest.fixture(name="calibration_batches")
def calibration_batches_fixture():
    """The `calibration_batches(vocab, ...)` builder."""
    return calibration_batches


@pytest.fixture(name="build_tiny")
def build_tiny_fixture():
    """The `build_tiny(family, seed=0, **overrides)` builder."""
    return build_tiny


@pytest.fixture
def tiny_llama_gqa():
    """Llama, 8 query / 4 KV heads, hidden 64, tied embeddings."""
    return build_tiny("llama_gqa")


@pytest.fixture
def tiny_llama_9_3():
    """Llama, 9 query / 3 KV heads (SmolLM2's grouping), hidden 72, attention and MLP biases, tied embeddings."""
    return build_tiny("llama_9_3")


@pytest.fixture
def tiny_mistral():
    """Mistral, 8 query / 2 KV heads, hidden 64."""
    return build_tiny("mistral")


@pytest.fixture
def tiny_qwen2():
    """Qwen2, 4 query / 2 KV heads of dim 16, q/k/v biases."""
    return build_tiny("qwen2")


@pytest.fixture
def tiny_qwen3():
    """Qwen3, 8 query / 4 KV heads with an explicit head_dim 16 (q_proj is wider than hidden), q_norm / k_norm."""
    return build_tiny("qwen3")


@pytest.fixture(params=sorted(TINY))
def tiny_decoder(request):
    """Each tiny family in turn (parametrized); `.family` on the returned model names it."""
    model = build_tiny(request.param)
    model.family = request.param
    return model


@pytest.fixture(scope="module")
def tokenizer():
    """`s2ft.models.tiny_tokenizer()`: byte-level, built in code (one per test module)."""
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    """A tiny fp32 Llama (`s2ft.models.tiny_model`) for `tokenizer`, in eval mode (one per test module).

    A larger init than the default makes the random model's greedy continuations depend on the prompt.
    """
    return tiny_model("llama", vocab_size=len(tokenizer), initializer_range=0.2).eval()


@pytest.fixture(scope="module")
def model64(tokenizer):
    """The `model` architecture and weights in float64, for exact comparisons of losses and log-likelihoods."""
    return tiny_model("llama", vocab_size=len(tokenizer), initializer_range=0.2).double().eval()


def read_predictions(out_dir: Path, task: str) -> list[dict]:
    """The records of `out_dir/predictions/TASK.jsonl` that `s2ft.evaluation.evaluate` wrote."""
    return [json.loads(line) for line in (out_dir / "predictions" / f"{task}.jsonl").read_text().splitlines()]


@pytest.fixture
def scripted(monkeypatch):
    """Generation in `s2ft.evaluation.evaluate` replaced by scripted outputs: returns `(script, calls)`.

    `script` maps a substring of the prompt to the output text (fill it before evaluating; exactly one key must
    match each prompt); `calls` records each generate call (max_new_tokens, num_beams, stop, n prompts).
    """
    script: dict[str, str] = {}
    calls: list[dict] = []

    def fake_generate(model, tokenizer, prompts, *, max_new_tokens, batch_size, num_beams, stop, on_batch):
        calls.append(dict(max_new_tokens=max_new_tokens, num_beams=num_beams, stop=stop, n=len(prompts)))
        outputs = []
        for prompt in prompts:
            (text,) = [text for key, text in script.items() if key in prompt]
            outputs.append(Generation(text, list(range(len(text.split())))))
        on_batch(len(prompts))
        return outputs

    monkeypatch.setattr(importlib.import_module("s2ft.evaluation.evaluate"), "generate", fake_generate)
    return script, calls


@pytest.fixture(autouse=True)
def judge_key(monkeypatch):
    """instruct_mistral's MT-Bench judge is an OpenAI-compatible endpoint, and validation requires its key variable
    (never sent anywhere here: no test calls a remote judge). Tests of the missing key delete it themselves."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-used")
