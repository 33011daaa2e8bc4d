"""Method contract suite (PEFT testing_common style): one set of checks parametrised over every method."""

import copy
import dataclasses
import warnings
from pathlib import Path

import peft.utils.save_and_load as peft_save
import pytest
import safetensors.torch
import torch
import yaml
from conftest import ROOT, smollm2_layers
from torch import nn

from s2ft.config import S2FTConfig
from s2ft.methods import (
    METHODS,
    load_trained,
    merge_trained,
    method_options,
    prepare_model,
    save_trained,
    trainable_summary,
)
from s2ft.methods import spft as spft_method
from s2ft.methods.peft_lora import lora_param_count
from s2ft.methods.s2ft import calibration_count
from s2ft.models import tiny_model

VOCAB = 64
# tiny llama: hidden 64, intermediate 128, 4 query heads / 2 KV heads (GQA) of head_dim 16, 2 layers
HIDDEN, INTER, HEADS, KV, HEAD_DIM, LAYERS = 64, 128, 4, 2, 16, 2
LINEAR_SHAPES = {  # name -> (out_features, in_features)
    "q_proj": (HEADS * HEAD_DIM, HIDDEN),
    "k_proj": (KV * HEAD_DIM, HIDDEN),
    "v_proj": (KV * HEAD_DIM, HIDDEN),
    "o_proj": (HIDDEN, HEADS * HEAD_DIM),
    "gate_proj": (INTER, HIDDEN),
    "up_proj": (INTER, HIDDEN),
    "down_proj": (HIDDEN, INTER),
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]

OPTIONS = {
    # o: 2 of 4 heads, down: 32 of 128 channels -> exact unit counts, no rounding
    "s2ft": {"ratios": {"o": 0.5, "down": 0.25}},
    "lora": {"r": 4, "lora_dropout": 0.0},
    "dora": {"r": 4, "lora_dropout": 0.0},
    "full": {},
    "spft": {"p": 0.1, "seed": 3},
    "none": {},
}
ALL = sorted(METHODS)
TRAINING = [m for m in ALL if m != "none"]


def base_model() -> nn.Module:
    return tiny_model("llama", vocab_size=VOCAB, seed=0).double()


def batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def loss_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def trained_model(method: str) -> nn.Module:
    """The base model prepared for ``method`` with ``OPTIONS[method]``, after one AdamW step (when it trains)."""
    model = prepare_model(base_model(), method, OPTIONS[method])
    trainable = [p for p in model.parameters() if p.requires_grad]
    if trainable:
        optimizer = torch.optim.AdamW(trainable, lr=1e-2)
        loss_of(model, batch()).backward()
        optimizer.step()
    return model


def claimed_count(method: str) -> int:
    """What each method says it trains, computed from the architecture, not from the method's code."""
    if method == "none":
        return 0
    if method == "full":
        return sum(p.numel() for p in base_model().parameters())
    if method in ("lora", "dora"):
        r = OPTIONS[method]["r"]
        count = sum(r * (out + inp) for name, (out, inp) in LINEAR_SHAPES.items() if name in LORA_TARGETS)
        magnitude = sum(out for name, (out, _) in LINEAR_SHAPES.items() if name in LORA_TARGETS)
        return LAYERS * (count + (magnitude if method == "dora" else 0))
    if method == "spft":
        return LAYERS * sum(round(0.1 * out * inp) for out, inp in LINEAR_SHAPES.values())
    return LAYERS * (2 * HEAD_DIM * HIDDEN + 32 * HIDDEN)  # s2ft: 2 O heads (columns) + 32 Down channels (columns)


def effective_weights(model: nn.Module, method: str) -> dict[str, torch.Tensor]:
    """The dense weights the prepared model computes with, under the base model's parameter names."""
    model = copy.deepcopy(model)
    if method in ("lora", "dora"):
        model = model.merge_and_unload()
    elif method == "spft":
        spft_method.merge(model)
    elif method == "s2ft":
        from s2ft.adapter import merge_and_unload

        model = merge_and_unload(model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def expected_changes(model: nn.Module, method: str, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Boolean masks of the entries one optimizer step may change (s2ft and spft: exactly these)."""
    masks = {name: torch.zeros_like(t, dtype=torch.bool) for name, t in reference.items()}
    for name, module in model.named_modules():
        if method == "s2ft" and type(module).__name__ == "S2FTLinear":
            masks[f"{name}.weight"].index_fill_(module.axis, module.index, True)
        if method == "spft" and isinstance(module, spft_method.SpFTLinear):
            masks[f"{name}.weight"].view(-1)[module.index] = True
    return masks


@pytest.mark.parametrize("method", ALL)
def test_trainable_count_matches_the_claim(method):
    model = prepare_model(base_model(), method, OPTIONS[method])
    summary = trainable_summary(model)
    assert summary["trainable_params"] == claimed_count(method)
    assert summary["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert summary["total_params"] == sum(p.numel() for p in base_model().parameters())
    assert summary["trainable_pct"] == pytest.approx(100 * claimed_count(method) / summary["total_params"])


@pytest.mark.parametrize("method", TRAINING)
def test_only_trainable_parameters_get_gradients(method):
    model = prepare_model(base_model(), method, OPTIONS[method])
    loss_of(model, batch()).backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, name
            # LoRA's A gets a zero gradient at the start because B is initialised to zero.
            assert "lora_A" in name or param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


@pytest.mark.parametrize("method", TRAINING)
def test_one_step_changes_exactly_the_intended_entries(method):
    model = prepare_model(base_model(), method, OPTIONS[method])
    before = effective_weights(model, method)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    loss_of(model, batch()).backward()
    optimizer.step()
    after = effective_weights(model, method)
    assert before.keys() == after.keys()
    changed = {name: before[name] != after[name] for name in before}
    if method in ("s2ft", "spft"):
        expected = expected_changes(model, method, before)
        assert sum(int(m.sum()) for m in expected.values()) > 0
        for name in before:
            assert torch.equal(changed[name], expected[name]), name
    elif method in ("lora", "dora"):
        for name in before:
            targeted = any(f".{t}." in name for t in LORA_TARGETS) and name.endswith(".weight")
            assert bool(changed[name].any()) == targeted, name
    else:  # full: every tensor moves
        assert all(bool(c.any()) for c in changed.values())


@pytest.mark.parametrize("method", ALL)
def test_save_then_load_reproduces_logits(method, tmp_path):
    model = trained_model(method)
    model.eval()
    ids = batch(1)
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        base = base_model()(input_ids=ids).logits
    save_trained(model, method, tmp_path / "out")
    loaded = load_trained(base_model(), method, tmp_path / "out").eval()
    with torch.no_grad():
        reloaded = loaded(input_ids=ids).logits
    torch.testing.assert_close(reloaded, trained, rtol=1e-12, atol=1e-12)
    assert not any(p.requires_grad for p in loaded.parameters())
    if method != "none":
        assert not torch.allclose(trained, base)  # the check above is not vacuous


@pytest.mark.parametrize("method", ALL)
def test_merge_trained_gives_a_plain_model_with_the_same_logits(method):
    model = trained_model(method)
    ids = batch(2)
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
        merged = merge_trained(model, method)
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert type(merged) is type(base_model())
    assert set(merged.state_dict()) == set(base_model().state_dict())


def test_spft_value_gradient_is_the_masked_full_gradient():
    model = prepare_model(base_model(), "spft", {"p": 0.2, "seed": 1})
    with torch.no_grad():  # non-zero deltas, so the effective weight differs from the base one
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0, 0.02, generator=torch.Generator().manual_seed(param.numel()))
    dense = spft_method.merge(copy.deepcopy(model)).requires_grad_(True)
    ids = batch()
    loss_of(model, ids).backward()
    loss_of(dense, ids).backward()
    dense_modules = dict(dense.named_modules())
    deltas = spft_method.sparse_deltas(model)
    assert len(deltas) == LAYERS * len(LINEAR_SHAPES)
    for name, delta in deltas.items():
        full_grad = dense_modules[name].weight.grad.flatten()
        torch.testing.assert_close(delta.values.grad, full_grad[delta.index], rtol=1e-10, atol=1e-14)


def test_spft_sampling_is_seeded_and_sized():
    first = spft_method.sparse_deltas(prepare_model(base_model(), "spft", {"p": 0.05, "seed": 7}))
    again = spft_method.sparse_deltas(prepare_model(base_model(), "spft", {"p": 0.05, "seed": 7}))
    other = spft_method.sparse_deltas(prepare_model(base_model(), "spft", {"p": 0.05, "seed": 8}))
    for name, delta in first.items():
        out, inp = LINEAR_SHAPES[name.rsplit(".", 1)[-1]]
        assert delta.index.numel() == round(0.05 * out * inp) == torch.unique(delta.index).numel()
        assert torch.equal(delta.index, again[name].index)
    assert any(not torch.equal(delta.index, other[name].index) for name, delta in first.items())


def test_an_spft_save_stopped_mid_write_keeps_the_previous_file(tmp_path, monkeypatch):
    """spft.safetensors used to be written in place: a stop mid-write left a truncated file."""
    model = prepare_model(base_model(), "spft", {"p": 0.05, "seed": 7})
    save_trained(model, "spft", tmp_path)
    before = (tmp_path / spft_method.ADAPTER_FILE).read_bytes()

    def stopped(tensors, filename, **kwargs):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    with torch.no_grad():
        next(iter(spft_method.sparse_deltas(model).values())).values.add_(1.0)
    monkeypatch.setattr(spft_method, "save_file", stopped)
    with pytest.raises(KeyboardInterrupt):
        save_trained(model, "spft", tmp_path)
    assert (tmp_path / spft_method.ADAPTER_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [spft_method.ADAPTER_FILE]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("targets", [LORA_TARGETS, ["q_proj", "o_proj", "gate_proj"]])
def test_lora_param_count_equals_peft(family, targets):
    from peft import LoraConfig, get_peft_model

    model = tiny_model(family, vocab_size=VOCAB)
    expected = lora_param_count(model, 8, targets)
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=targets))
    assert expected == peft_model.get_nb_trainable_parameters()[0]


def test_s2ft_match_lora_is_within_two_percent_on_smollm2_shapes():
    # SmolLM2-135M's layer shapes (9 query / 3 KV heads of 64, hidden 576, intermediate 1536), two layers.
    model = smollm2_layers(vocab_size=VOCAB)
    lora = {"r": 8, "target_modules": LORA_TARGETS}
    want = 2 * 8 * (2 * 576 + 2 * (576 + 192) + 2 * (576 + 1536))  # q, k, v, up, down per layer
    assert lora_param_count(model, **lora) == want
    prepared = prepare_model(model, "s2ft", {"ratios": {"o": 0.05, "down": 0.02}, "match_lora": lora})
    got = trainable_summary(prepared)["trainable_params"]
    assert abs(got - want) <= 0.02 * want


def test_options_accept_omegaconf_and_reject_unknown_keys():
    from omegaconf import OmegaConf

    options = OmegaConf.create({"r": 2, "target_modules": ["q_proj"]})
    model = prepare_model(base_model(), "lora", options)
    assert trainable_summary(model)["trainable_params"] == LAYERS * 2 * (HEADS * HEAD_DIM + HIDDEN)
    with pytest.raises(ValueError, match=r"does not take option\(s\) \['rank'\]"):
        method_options("lora", {"rank": 8})
    with pytest.raises(ValueError, match="unknown method 'qlora'"):
        prepare_model(base_model(), "qlora", {})


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("spft", {"p": 0.0}, r"p is the trainable fraction of entries, in \(0, 1\]"),
        ("spft", {"p": 1.5}, r"in \(0, 1\]"),
        ("spft", {"target_modules": ["qkv"]}, "match no nn.Linear"),
        ("lora", {"target_modules": "q_proj"}, "must be a list of module names"),
        pytest.param("s2ft", {"match_lora": {"r": 8, "target_modules": ["nope"]}}, "match no nn.Linear"),
        pytest.param("s2ft", {"match_lora": {"r": 0, "target_modules": ["q_proj"]}}, "positive int"),
        pytest.param(
            "s2ft",
            {"ratios": {"attn": 0.1}, "match_lora": {"r": 2, "target_modules": ["q_proj"]}},
            "ratios: unknown component 'attn'",
        ),
        *(
            pytest.param(
                "s2ft",
                {"ratios": {"o": ratio}, "match_lora": {"r": 2, "target_modules": ["q_proj"]}},
                rf"ratios\['o'\] must be a number in \(0, 1\], got {ratio}",
            )
            for ratio in (1.5, -0.1)
        ),
        pytest.param(
            "s2ft",
            {"match_lora": {"r": 8, "target_modules": ["q_proj"]}, "target_params": 10},
            "not both",
        ),
        # Without a budget the ratios are the S2FTConfig's own, and it is the one that checks them.
        pytest.param("s2ft", {"ratios": {"o": 1.5}}, r"^invalid S2FTConfig:\n  - ratios\['o'\] must be a number in"),
    ],
)
def test_bad_options_fail_early_with_the_fix(method, options, message):
    with pytest.raises(ValueError, match=message):
        prepare_model(base_model(), method, options)


def test_load_trained_names_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no saved lora weights"):
        load_trained(base_model(), "lora", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no spft.safetensors"):
        load_trained(base_model(), "spft", tmp_path / "empty")


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_lora_save_asks_no_hub_and_warns_nothing(method, tmp_path, monkeypatch):
    model = prepare_model(base_model(), method, OPTIONS[method])
    model.peft_config["default"].base_model_name_or_path = "smollm2_135m"  # a local model's name, not a hub id
    asked = []
    monkeypatch.setattr(peft_save, "check_file_exists_on_hf_hub", lambda *args, **kwargs: asked.append(args))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_trained(model, method, tmp_path / "out")
    assert asked == []
    assert not any("embed" in key for key in safetensors.torch.load_file(tmp_path / "out/adapter_model.safetensors"))


def test_s2ft_options_are_s2ftconfig_fields_with_its_defaults():
    """S2FT's method.options are S2FTConfig's fields (its defaults) plus match_lora and calibration_size, and
    conf/method/s2ft.yaml, which must name every key a command line may override, sets the same values but the
    paper's LLaMA ratios and the run's seed."""
    fields = {field.name: field.default for field in dataclasses.fields(S2FTConfig)}
    defaults = METHODS["s2ft"].defaults
    assert set(defaults) == {*fields, "match_lora", "calibration_size"}
    assert {key: defaults[key] for key in fields if key != "ratios"} == {
        k: v for k, v in fields.items() if k != "ratios"
    }
    options = yaml.safe_load((ROOT / "conf/method/s2ft.yaml").read_text())["options"]
    assert options == {**defaults, "ratios": {"o": 0.052, "down": 0.02}, "seed": "${seed}"}


@pytest.mark.parametrize(
    ("size", "train_items", "count"),
    [(64, 1000, 64), (64, 10, 10), (0.01, 1000, 10), (0.01, 170_000, 1700), (0.01, 40, 1), (0.5, 3, 2)],
)
def test_calibration_count(size, train_items, count):
    assert calibration_count(size, train_items) == count


def test_calibration_items_only_for_the_strategies_that_score_on_data():
    calibration_items = METHODS["s2ft"].calibration_items
    assert calibration_items({"strategy": "random", "calibration_size": 0.5}, 100) == 0
    assert calibration_items({"strategy": "gradient"}, 1000) == 64  # the default calibration_size
    assert calibration_items({"strategy": "activation", "calibration_size": 0.01}, 1000) == 10
    # No other method asks for calibration batches; each one's defaults pass its own option rules.
    for name in sorted(set(METHODS) - {"s2ft"}):
        assert METHODS[name].calibration_items({}, 1000) == 0
        assert METHODS[name].option_problems(METHODS[name].defaults) == []
