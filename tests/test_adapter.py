"""Adapters: save/load, merge/unmerge, merge_and_unload, fusion, switching, and refusal of bad adapters."""

import copy
import hashlib
import json
import re
import shutil

import pytest
import torch
from conftest import (
    BAD_ADAPTERS,
    INPUT_IDS,
    OTHER_BASES,
    RATIOS,
    adapter_files,
    assert_same_state,
    build_tiny,
    logits,
    snapshot,
    trained,
)
from torch import nn
from transformers import AutoModelForCausalLM

import s2ft
from s2ft.adapter import extract_adapter
from s2ft.adapter_format import CONFIG_NAME, WEIGHTS_NAME, AdapterError
from s2ft.api import apply_selection
from s2ft.layers import S2FTLinear
from s2ft.state import fingerprint, s2ft_modules
from s2ft.structures import AXIS, find_structures, unit_positions


@pytest.mark.parametrize("family", ["llama_gqa", "llama_9_3", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("layout", ["gather", "permuted"])
def test_save_then_load_on_a_fresh_base_reproduces_logits(tmp_path, family, layout):
    # A permuted model sums in another order than the unpermuted base: compare in fp64 there.
    dtype, atol = (torch.float32, 1e-6) if layout == "gather" else (torch.float64, 1e-10)
    base = build_tiny(family).to(dtype)
    model = trained(copy.deepcopy(base), s2ft.S2FTConfig(ratios=RATIOS, seed=3, layout=layout))
    expected = logits(model)
    s2ft.save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [WEIGHTS_NAME, CONFIG_NAME]  # no temp files left

    loaded = s2ft.load_adapter(base, tmp_path)
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=atol)
    assert s2ft.trainable_parameter_count(loaded) == 0
    assert set(s2ft_modules(loaded)) == set(s2ft_modules(model))


def test_adapter_config_records_base_selection_and_original_units(tmp_path):
    base = build_tiny("llama_gqa")
    cfg = s2ft.S2FTConfig(ratios={"o": 0.25, "down": 0.05}, strategy="weight", order="small", seed=7)
    model = copy.deepcopy(base)
    expected_units = s2ft.select_units(model, cfg)
    trained(model, cfg)
    s2ft.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["library_version"] == s2ft.__version__
    assert config["components"] == ["down", "o"]
    assert config["config"] | {"layout": "gather"} == config["config"]
    assert {k: config["config"][k] for k in ("ratios", "strategy", "order", "seed", "allocation")} == {
        "ratios": {"o": 0.25, "down": 0.05},
        "strategy": "weight",
        "order": "small",
        "seed": 7,
        "allocation": "uniform",
    }
    assert config["fingerprint"] == fingerprint(base)
    adapter = s2ft.load_adapter_file(tmp_path)
    assert adapter.units().keys() == expected_units.keys()
    assert all(torch.equal(adapter.units()[key], units) for key, units in expected_units.items())
    layer0_o = config["modules"]["model.layers.0.self_attn.o_proj"]
    assert layer0_o | {"layer": 0, "component": "o", "axis": 1, "unit_size": 8, "shape": [64, 64]} == layer0_o


def test_a_save_that_fails_leaves_the_adapter_in_its_folder_byte_identical(tmp_path):
    """A selection setting json cannot write: the weights were written first, so the folder held the new weights
    beside the old config and no longer loaded ("values have shape (64, 32), expected (64, 16)")."""
    base = build_tiny("llama_gqa")
    s2ft.save_adapter(trained(copy.deepcopy(base), s2ft.S2FTConfig(ratios={"o": 0.25}, seed=1)), tmp_path)
    files = {name: (tmp_path / name).read_bytes() for name in (WEIGHTS_NAME, CONFIG_NAME)}
    other = trained(copy.deepcopy(base), s2ft.S2FTConfig(ratios={"o": 0.5}, seed=2))
    other.s2ft_state.config["note"] = torch.tensor(1.0)
    with pytest.raises(TypeError, match="not JSON serializable"):
        s2ft.save_adapter(other, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files
    s2ft.load_adapter_file(tmp_path)


@pytest.mark.parametrize("where", ["the file", "under the file"])
def test_a_save_to_a_files_path_is_refused_naming_it(tmp_path, where):
    """It was a FileExistsError or NotADirectoryError traceback."""
    model = trained(build_tiny("llama_gqa"), s2ft.S2FTConfig(ratios={"o": 0.25}, seed=1))
    (tmp_path / "notes.txt").write_text("mine")
    target = tmp_path / "notes.txt" / ("adapter" if where == "under the file" else "")
    with pytest.raises(AdapterError, match=re.escape(f"{tmp_path / 'notes.txt'} is a file, not a folder")):
        s2ft.save_adapter(model, target)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_weights_from_another_save_beside_the_config_are_refused(tmp_path):
    """A save stopped between its two files leaves the new weights beside the old config. Two adapters of the same
    budget have the same shapes, so the pair loaded: one selection's units with the other's values."""
    base = build_tiny("llama_gqa")
    first, second = tmp_path / "first", tmp_path / "second"
    s2ft.save_adapter(trained(copy.deepcopy(base), s2ft.S2FTConfig(ratios={"o": 0.25}, seed=1)), first)
    s2ft.save_adapter(trained(copy.deepcopy(base), s2ft.S2FTConfig(ratios={"o": 0.25}, seed=2)), second)
    config = json.loads((first / CONFIG_NAME).read_text())
    assert config["weights_sha256"] == hashlib.sha256((first / WEIGHTS_NAME).read_bytes()).hexdigest()
    shutil.copy(second / WEIGHTS_NAME, first / WEIGHTS_NAME)
    untouched = copy.deepcopy(base)
    with pytest.raises(AdapterError, match=r"is not the file .* was saved with \(its SHA-256 differs\)"):
        s2ft.load_adapter(base, first)
    assert base.state_dict().keys() == untouched.state_dict().keys()
    assert all(torch.equal(value, untouched.state_dict()[key]) for key, value in base.state_dict().items())
    # An adapter saved before the checksum (no weights_sha256) still loads.
    old = json.loads((second / CONFIG_NAME).read_text())
    del old["weights_sha256"]
    (second / CONFIG_NAME).write_text(json.dumps(old))
    assert s2ft.load_adapter_file(second).config["seed"] == 2


def test_permuted_adapter_holds_original_units_and_values():
    base = build_tiny("llama_9_3")
    cfg = s2ft.S2FTConfig(ratios=RATIOS, seed=5)
    expected_units = s2ft.select_units(base, cfg)
    permuted = s2ft.apply_s2ft(copy.deepcopy(base), cfg, layout="permuted")
    assert permuted.s2ft_state.unit_perms  # really permuted
    adapter = extract_adapter(permuted)
    assert adapter.units().keys() == expected_units.keys()
    for name, m in adapter.modules.items():
        assert torch.equal(m.units, expected_units[m.layer, m.component]), name
        assert torch.equal(m.values, base.get_submodule(name).weight.index_select(m.axis, m.positions)), name
    assert adapter.fingerprint == fingerprint(base)


def test_load_trainable_keeps_values_trainable(tmp_path):
    base = build_tiny("qwen2")
    model = trained(copy.deepcopy(base), s2ft.S2FTConfig(ratios={"o": 0.5, "up": 0.1}))
    s2ft.save_adapter(model, tmp_path)
    loaded = s2ft.load_adapter(base, tmp_path, trainable=True)
    assert s2ft.trainable_parameter_count(loaded) == s2ft.trainable_parameter_count(model)
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == [
        n for n, p in model.named_parameters() if p.requires_grad
    ]


@pytest.mark.parametrize("layout", ["gather", "permuted"])
def test_merge_unmerge_round_trip_is_bit_exact(layout):
    model = trained(build_tiny("llama_9_3"), s2ft.S2FTConfig(ratios=RATIOS, layout=layout))
    before, unmerged_logits = snapshot(model), logits(model)
    s2ft.merge_adapter(model)
    assert all(m.merged for m in s2ft_modules(model).values())
    for module in s2ft_modules(model).values():
        assert torch.equal(module.weight.index_select(module.axis, module.index), module.values)
    torch.testing.assert_close(logits(model), unmerged_logits, rtol=0, atol=1e-5)
    s2ft.unmerge_adapter(model)
    assert_same_state(model, before)


def test_training_a_merged_model_is_refused_as_a_user_error():
    """It was a RuntimeError (a traceback, a bug's) naming unmerge(), a method of each layer."""
    model = trained(build_tiny("llama_9_3"), s2ft.S2FTConfig(ratios=RATIOS)).train()
    s2ft.merge_adapter(model)
    with pytest.raises(AdapterError, match=r"merged, so its values get no gradient: call s2ft\.unmerge_adapter"):
        model(INPUT_IDS)
    expected = logits(model)  # no gradient: the merged model runs
    s2ft.unmerge_adapter(model)
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-5)
    model(INPUT_IDS).logits.sum().backward()  # unmerged it trains


def bf16_trained(cfg: s2ft.S2FTConfig) -> nn.Module:
    """A trained S2FT model in bf16 whose values are fp32, as training keeps them."""
    model = build_tiny("llama_9_3").to(torch.bfloat16)
    s2ft.apply_s2ft(model, cfg)
    for module in s2ft_modules(model).values():
        module.values.data = module.values.data.float()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("merged_source", [True, False])
def test_a_state_dict_loads_into_a_model_in_the_other_merged_state(merged_source, dtype):
    """A merged model's state dict (values written into the weight) loaded into an unmerged one counted the values
    twice, and an unmerged one's into a merged model not at all: logits off by ~1, no error. The merged flag stays
    out of the state dict (as extra state it broke FSDP2 resume)."""
    cfg = s2ft.S2FTConfig(ratios=RATIOS)
    model = trained(build_tiny("llama_9_3"), cfg) if dtype == torch.float32 else bf16_trained(cfg)
    source, target = copy.deepcopy(model), copy.deepcopy(model)
    s2ft.merge_adapter(source if merged_source else target)
    expected = logits(target)  # the same model, in the target's state
    target.load_state_dict(source.state_dict())
    assert not any(key.endswith("_extra_state") for key in source.state_dict())
    assert all(m.merged != merged_source for m in s2ft_modules(target).values())
    assert torch.equal(logits(target), expected)
    s2ft.unmerge_adapter(target)
    assert_same_state(target, snapshot(model))
    assert all(m.values.dtype == torch.float32 for m in s2ft_modules(target).values())


def test_a_plain_models_state_dict_is_refused_by_an_s2ft_model():
    """A plain model's weights hold the base at the trained slots: loaded (strict=False) into an unmerged S2FT model,
    they were added to its values, silently."""
    base = build_tiny("llama_9_3")
    model = trained(copy.deepcopy(base), s2ft.S2FTConfig(ratios=RATIOS))
    with pytest.raises(AdapterError, match="neither zeros .* nor its values"):
        model.load_state_dict(base.state_dict(), strict=False)


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("bad", ["weight", "base_values"])
def test_a_state_dict_refused_at_its_last_s2ft_layer_loads_nothing(merged, bad):
    """Each S2FT layer checked only its own part of a state dict as it loaded: one refused at the last layer left
    every tensor before it loaded, a half-loaded model. Now nothing is copied until every layer's part is checked."""
    model = trained(build_tiny("llama_9_3"), s2ft.S2FTConfig(ratios=RATIOS))
    # Other slots and values in every layer, so that a load of any layer before the last would show.
    source = trained(build_tiny("llama_9_3"), s2ft.S2FTConfig(ratios=RATIOS, seed=2), seed=2)
    last = list(s2ft_modules(model))[-1]
    assert not torch.equal(model.get_submodule(last).index, source.get_submodule(last).index)
    if merged:
        s2ft.merge_adapter(model)
    if bad == "weight":  # the base at the trained slots, as a plain model's weight holds
        source.get_submodule(last).restore_base()
        state, message = source.state_dict(), "neither zeros .* nor its values"
    else:  # trained tensors without the weight, whose base is not this model's
        state = {k: v for k, v in source.state_dict().items() if k != f"{last}.weight"}
        state[f"{last}.base_values"] = state[f"{last}.base_values"] + 1
        message = "another base model or layout"
    before, flags = snapshot(model), [m.merged for m in s2ft_modules(model).values()]
    with pytest.raises(AdapterError, match=message):
        model.load_state_dict(state, strict=False)
    assert_same_state(model, before)
    assert [m.merged for m in s2ft_modules(model).values()] == flags


def test_the_check_before_a_load_goes_with_the_model():
    """The check before a load is a hook on the model: a deep copy checks its own layers (not the original's), and
    merge_and_unload removes it with the rest of the S2FT state."""
    model = trained(build_tiny("llama_9_3"), s2ft.S2FTConfig(ratios=RATIOS))
    copied = copy.deepcopy(model)
    source = trained(build_tiny("llama_9_3"), s2ft.S2FTConfig(ratios=RATIOS, seed=2), seed=2)
    list(s2ft_modules(source).values())[-1].restore_base()
    before = snapshot(copied)
    with pytest.raises(AdapterError, match="neither zeros"):
        copied.load_state_dict(source.state_dict())
    assert_same_state(copied, before)
    s2ft.merge_and_unload(copied)
    assert not any(m._load_state_dict_pre_hooks for m in copied.modules())
    assert len(model._load_state_dict_pre_hooks) == 1 and model.model.layers[0]._load_state_dict_pre_hooks


def layout_pair(source_layout, target_layout, target_seed, target_values_seed=None):
    """An fp64 source and target S2FT model of one base (seeds pick the selection; the target's values differ)."""
    base = build_tiny("llama_9_3").double()
    source = trained(copy.deepcopy(base), s2ft.S2FTConfig(ratios=RATIOS, seed=1, layout=source_layout), seed=1)
    cfg = s2ft.S2FTConfig(ratios=RATIOS, seed=target_seed, layout=target_layout)
    return base, source, trained(copy.deepcopy(base), cfg, seed=target_values_seed or target_seed + 10)


def trained_tensors(model) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of an S2FT model: its S2FT layers' values, index and base values."""
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[1] in ("values", "index", "base_values")}


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("what", ["state_dict", "trained tensors"])
@pytest.mark.parametrize(
    ("source_layout", "target_layout", "target_seed"),
    [("permuted", "gather", 1), ("gather", "permuted", 1), ("permuted", "permuted", 2)],
)
def test_a_state_dict_in_another_unit_order_is_refused_and_loads_nothing(
    source_layout, target_layout, target_seed, what, merged
):
    """A co-permuted model's state dict loaded into a gather-layout model of the same adapter (or the reverse, or into
    a model permuted for another selection): the whole state dict loaded, so the logits were the source's, but under
    the target's permutation (``unit_perms``, not in the dict): save_adapter wrote other units (an adapter refused
    by the base digest) and merge_and_unload permuted the weights out of the base's order. Now refused, naming the
    adapter API that moves an adapter between layouts; every tensor and merged flag stays as it was."""
    _, source, target = layout_pair(source_layout, target_layout, target_seed)
    if merged:
        s2ft.merge_adapter(source)
    state = source.state_dict() if what == "state_dict" else trained_tensors(source)
    found = "weight is not this model's base weight" if what == "state_dict" else "base_values are not"
    before, expected = snapshot(target), logits(target)
    with pytest.raises(AdapterError, match=rf"{found}.* another base model or layout .* s2ft\.save_adapter"):
        target.load_state_dict(state, strict=what == "state_dict")
    assert_same_state(target, before)
    assert not any(m.merged for m in s2ft_modules(target).values())
    assert torch.equal(logits(target), expected)


@pytest.mark.parametrize("what", ["state_dict", "trained tensors"])
@pytest.mark.parametrize(("layout", "target_seed"), [("gather", 2), ("permuted", 1)])
def test_a_state_dict_in_the_same_unit_order_loads_the_sources_adapter(tmp_path, layout, target_seed, what):
    """The check above passes a state dict of the same unit order: another gather selection of the base, or the
    same co-permuted one with other values. The loaded model is the source's, adapter included."""
    base, source, target = layout_pair(layout, layout, target_seed)
    target.load_state_dict(source.state_dict() if what == "state_dict" else trained_tensors(source), strict=False)
    assert torch.equal(logits(target), logits(source))
    s2ft.save_adapter(target, tmp_path)
    assert torch.equal(logits(s2ft.load_adapter(copy.deepcopy(base), tmp_path)), logits(source))


@pytest.mark.parametrize("merged", [False, True])
def test_a_refused_submodule_load_loads_nothing(merged):
    """load_state_dict on a submodule (one decoder layer) did not run the model's check first: each S2FT layer
    refused only its own part, so one refused at the layer's last S2FT module left the six before it loaded."""
    model = trained(build_tiny("llama_9_3"), s2ft.S2FTConfig(ratios=RATIOS))
    source = trained(build_tiny("llama_9_3"), s2ft.S2FTConfig(ratios=RATIOS, seed=2), seed=2)
    layer = model.model.layers[1]
    assert not torch.equal(layer.self_attn.q_proj.index, source.model.layers[1].self_attn.q_proj.index)
    source.model.layers[1].mlp.down_proj.restore_base()  # the last S2FT module: a plain model's weight
    if merged:
        s2ft.merge_adapter(model)
    before = snapshot(model)
    with pytest.raises(AdapterError, match="S2FT layer mlp.down_proj: .*neither zeros"):
        layer.load_state_dict(source.model.layers[1].state_dict())
    assert_same_state(model, before)
    assert all(m.merged == merged for m in s2ft_modules(model).values())


@pytest.mark.parametrize("where", ["model", "submodule", "wrapper"])
@pytest.mark.parametrize("what", ["state_dict", "trained tensors"])
def test_each_s2ft_layer_is_fitted_once_per_load(monkeypatch, where, what):
    """The model's check fitted every S2FT layer's part of the dict, then each layer fitted it again as it loaded
    (the same result: wasted work, a weight copy for a dict without the weight). Now each layer takes the check's
    result: one fit per layer, on the model, on a submodule, and on a module holding the model (a LightningModule)."""
    model = trained(build_tiny("llama_9_3"), s2ft.S2FTConfig(ratios=RATIOS))
    source = trained(build_tiny("llama_9_3"), s2ft.S2FTConfig(ratios=RATIOS, seed=2), seed=2)
    s2ft.merge_adapter(model)  # both cases convert: a weight to unmerge, or new slots to set in the merged weight
    merged_source = copy.deepcopy(source)
    s2ft.merge_adapter(merged_source)  # what the target must hold after the load
    pick = {
        "model": lambda m: m,
        "submodule": lambda m: m.model.layers[1],
        "wrapper": lambda m: nn.ModuleDict({"m": m}),
    }
    loaded, expected = pick[where](model), pick[where](merged_source).state_dict()
    state = pick[where](source).state_dict() if what == "state_dict" else trained_tensors(pick[where](source))
    calls = []
    fit = S2FTLinear._fit_state_dict
    monkeypatch.setattr(S2FTLinear, "_fit_state_dict", lambda self, *args: calls.append(self) or fit(self, *args))
    loaded.load_state_dict(state, strict=what == "state_dict")
    assert sorted(map(id, calls)) == sorted(id(m) for m in s2ft_modules(loaded).values())
    assert_same_state(loaded, expected)
    assert all(m.merged for m in s2ft_modules(model).values())


@pytest.mark.parametrize("layout", ["gather", "permuted"])
def test_merge_and_unload_saves_a_plain_model_in_original_coordinates(tmp_path, layout):
    base = build_tiny("llama_gqa")
    model = trained(copy.deepcopy(base), s2ft.S2FTConfig(ratios=RATIOS, layout=layout))
    expected = logits(model)
    adapter = extract_adapter(model)
    plain = s2ft.merge_and_unload(model)
    assert not s2ft_modules(plain) and not hasattr(plain, "s2ft_state")
    assert all(type(m) is nn.Linear for n, m in plain.named_modules() if n.endswith("_proj"))
    assert all(p.requires_grad for p in plain.parameters())
    # Original coordinates: the merged weight is the base with exactly the adapter's slots replaced.
    for name, m in adapter.modules.items():
        weight = base.get_submodule(name).weight.detach().index_copy(m.axis, m.positions, m.values)
        assert torch.equal(plain.get_submodule(name).weight, weight), name
    plain.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("how", ["applied", "merged", "loaded", "copied", "pickled"])
def test_save_pretrained_of_an_s2ft_model_is_refused_naming_the_ways_to_save(tmp_path, how):
    """transformers' save_pretrained wrote the frozen weights with the trained slots zeroed (or in the permuted order)
    beside S2FT's own tensors; from_pretrained ignored those and loaded a model off by ~4 in the logits, silently."""
    base = build_tiny("llama_gqa")
    model = trained(copy.deepcopy(base), s2ft.S2FTConfig(ratios=RATIOS))
    if how == "merged":
        s2ft.merge_adapter(model)
    elif how == "loaded":
        s2ft.save_adapter(model, tmp_path / "adapter")
        model = s2ft.load_adapter(copy.deepcopy(base), tmp_path / "adapter")
    elif how == "copied":
        model = copy.deepcopy(model)
    elif how == "pickled":
        torch.save(model, tmp_path / "model.pt")
        model = torch.load(tmp_path / "model.pt", weights_only=False)
    with pytest.raises(AdapterError, match=r"s2ft\.save_adapter\(model, path\).*s2ft\.merge_and_unload\(model\)"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    expected = logits(model)
    s2ft.merge_and_unload(model).save_pretrained(tmp_path / "out")  # the plain model saves as usual
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(logits(reloaded), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("disjoint", [False, True])
def test_fusion_equals_hand_computed_weights(tmp_path, disjoint):
    base = build_tiny("llama_gqa")
    first = adapter_files(tmp_path, base, {"o": 0.5, "down": 0.3}, seed=1)
    second = adapter_files(tmp_path, base, {"o": 0.25, "up": 0.2}, seed=2, exclude=str(first) if disjoint else None)
    adapters = [s2ft.load_adapter_file(first), s2ft.load_adapter_file(second)]
    overlap = set(adapters[0].units()) & set(adapters[1].units())
    shared = sum(len(set(adapters[0].units()[k].tolist()) & set(adapters[1].units()[k].tolist())) for k in overlap)
    assert (shared == 0) == disjoint

    expected = {name: p.detach().clone() for name, p in base.named_parameters()}
    for adapter, w in zip(adapters, (0.7, 0.4), strict=True):
        for name, m in adapter.modules.items():
            original = base.get_submodule(name).weight.detach()
            delta = m.values - original.index_select(m.axis, m.positions)
            expected[f"{name}.weight"].index_add_(m.axis, m.positions, w * delta)
    fused = s2ft.fuse_adapters(base, [first, second], [0.7, 0.4])
    for name, param in fused.named_parameters():
        torch.testing.assert_close(param, expected[name], rtol=0, atol=1e-7, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fusing_disjoint_adapters_sets_each_slot_to_its_adapters_values_exactly(tmp_path, dtype):
    """One adapter: the model merging it, bit for bit; disjoint adapters: each its own values. fp32 values on a bf16
    base used to be off by 1 ulp in about one entry in three: each delta was rounded to bf16, then added into the bf16
    weight, rounding twice."""
    base = build_tiny("llama_9_3")
    first = adapter_files(tmp_path, base, RATIOS, seed=1)
    second = adapter_files(tmp_path, base, {"o": 0.3, "up": 0.1}, seed=2, exclude=str(first))
    cast = copy.deepcopy(base).to(dtype)
    fused = s2ft.fuse_adapters(copy.deepcopy(cast), [first])
    merged = s2ft.merge_and_unload(s2ft.load_adapter(copy.deepcopy(cast), first))
    for (name, param), (_, expected) in zip(fused.named_parameters(), merged.named_parameters(), strict=True):
        assert param.dtype == dtype and torch.equal(param, expected), name
    expected = {name: p.detach().clone() for name, p in cast.named_parameters()}
    for path in (first, second):
        for name, m in s2ft.load_adapter_file(path).modules.items():
            expected[f"{name}.weight"].index_copy_(m.axis, m.positions, m.values.to(dtype))
    fused = s2ft.fuse_adapters(copy.deepcopy(cast), [first, second])
    for name, param in fused.named_parameters():
        assert torch.equal(param, expected[name]), name


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("layout", ["gather", "permuted"])
def test_switch_equals_loading_the_other_adapter_freshly(tmp_path, merged, layout):
    base = build_tiny("llama_9_3")
    first = trained(copy.deepcopy(base), s2ft.S2FTConfig(ratios=RATIOS, seed=1, layout=layout), seed=1)
    second_path = adapter_files(tmp_path, base, {"o": 0.4, "up": 0.1, "down": 0.2}, seed=2)
    third_path = adapter_files(tmp_path, base, {"q": 0.3, "down": 0.1}, seed=3)

    fresh = s2ft.load_adapter(copy.deepcopy(base), second_path)
    if merged:
        s2ft.merge_adapter(first)
        s2ft.merge_adapter(fresh)
    s2ft.switch_adapter(first, second_path)
    torch.testing.assert_close(logits(first), logits(fresh), rtol=0, atol=1e-5)
    assert all(m.merged == merged for m in s2ft_modules(first).values())
    assert set(s2ft_modules(first)) == set(s2ft_modules(fresh))

    s2ft.switch_adapter(first, third_path)
    third = s2ft.load_adapter(copy.deepcopy(base), third_path)
    torch.testing.assert_close(logits(first), logits(third), rtol=0, atol=1e-5)
    if layout == "gather":
        # Unpermuted: switching touches nothing but the slots, so every tensor equals a fresh load bit for bit.
        if merged:
            s2ft.merge_adapter(third)
        assert_same_state(first, snapshot(third))
    s2ft.switch_adapter(first, extract_adapter(fresh))
    s2ft.unmerge_adapter(first)
    s2ft.unmerge_adapter(fresh)
    torch.testing.assert_close(logits(first), logits(fresh), rtol=0, atol=1e-5)


def test_applying_or_loading_twice_is_refused(tmp_path):
    model = trained(build_tiny("llama_gqa"), s2ft.S2FTConfig(ratios={"o": 0.25}))
    s2ft.save_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="already has an S2FT adapter; start from a fresh base"):
        s2ft.apply_s2ft(model, s2ft.S2FTConfig(ratios={"o": 0.25}))
    with pytest.raises(ValueError, match="already has an S2FT adapter"):
        s2ft.load_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="plain base"):
        s2ft.fuse_adapters(model, [tmp_path])
    with pytest.raises(ValueError, match="no S2FT adapter"):
        s2ft.save_adapter(build_tiny("llama_gqa"), tmp_path / "other")


@pytest.mark.parametrize("case", sorted(BAD_ADAPTERS))
def test_bad_adapter_is_refused_and_the_model_left_unchanged(tmp_path, case):
    base = build_tiny("llama_gqa")
    model = trained(copy.deepcopy(base), s2ft.S2FTConfig(ratios={"o": 0.25, "down": 0.05}))
    s2ft.save_adapter(model, tmp_path)
    breaks, message = BAD_ADAPTERS[case]
    breaks(tmp_path)
    before = snapshot(base)
    flags = [p.requires_grad for p in base.parameters()]
    with pytest.raises(AdapterError, match=message):
        s2ft.load_adapter(base, tmp_path)
    assert_same_state(base, before)
    assert flags == [p.requires_grad for p in base.parameters()]
    assert not s2ft_modules(base) and not hasattr(base, "s2ft_state")
    with pytest.raises(AdapterError, match=message):
        s2ft.fuse_adapters(base, [tmp_path])
    assert_same_state(base, before)


def test_a_run_directory_given_as_the_adapter_is_refused_naming_its_adapter_folder(tmp_path):
    """Before, the refusal said to save an adapter into the run directory (s2ft.save_adapter(model, RUN_DIR))."""
    model = trained(build_tiny("llama_gqa"), s2ft.S2FTConfig(ratios={"o": 0.25}))
    s2ft.save_adapter(model, tmp_path / "run" / "adapter")
    base = build_tiny("llama_gqa")
    before = snapshot(base)
    adapter = re.escape(repr(str(tmp_path / "run" / "adapter")))
    message = rf"^adapter file missing: \S+/run/{CONFIG_NAME}; \S+/run is a run directory, .*: give {adapter}$"
    for action in (
        lambda: s2ft.load_adapter(base, tmp_path / "run"),
        lambda: s2ft.load_adapters(base, {"a": tmp_path / "run"}),
        lambda: s2ft.fuse_adapters(base, [tmp_path / "run"]),
    ):
        with pytest.raises(AdapterError, match=message.removeprefix("^")):
            action()
        assert_same_state(base, before)
    with pytest.raises(AdapterError, match=message):
        s2ft.load_adapter(base, tmp_path / "run")


@pytest.mark.parametrize(("other", "message"), OTHER_BASES)
def test_adapter_for_another_base_model_is_refused(tmp_path, other, message):
    model = trained(build_tiny("llama_gqa"), s2ft.S2FTConfig(ratios={"o": 0.25, "down": 0.05}))
    s2ft.save_adapter(model, tmp_path)
    base = other()
    before = snapshot(base)
    for action in (lambda: s2ft.load_adapter(base, tmp_path), lambda: s2ft.fuse_adapters(base, [tmp_path])):
        with pytest.raises(AdapterError, match=message):
            action()
        assert_same_state(base, before)
        assert not s2ft_modules(base)
    other_s2ft = trained(build_tiny("qwen2"), s2ft.S2FTConfig(ratios={"o": 0.5}))
    before = snapshot(other_s2ft)
    with pytest.raises(AdapterError, match="another base model|differ"):
        s2ft.switch_adapter(other_s2ft, tmp_path)
    assert_same_state(other_s2ft, before)


def test_a_refused_adapter_among_several_fused_ones_is_named(tmp_path):
    """fuse_adapters over several folders refused one without saying which ("corrupt adapter weights ..." names the
    file, "adapter module ... has weight shape" nothing): now every refusal names the adapter's place and folder."""
    base = build_tiny("llama_gqa")
    first, second = adapter_files(tmp_path, base, {"o": 0.25}, seed=1), adapter_files(tmp_path, base, {"down": 0.05}, 2)
    other_shape = adapter_files(tmp_path / "other", build_tiny("llama_gqa", hidden_size=32), {"o": 0.25}, seed=3)
    other_base = adapter_files(tmp_path / "instruct", build_tiny("llama_gqa", seed=1), {"o": 0.25}, seed=3)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(first, corrupt)
    (corrupt / WEIGHTS_NAME).write_bytes(b"\x00garbage")
    before = snapshot(base)
    cases = [
        ([first, second, other_shape], 3, "weight shape"),
        ([first, second, other_base], 3, "not the base the adapter was trained on"),
        ([first, corrupt, second], 2, "corrupt adapter weights"),
    ]
    for paths, at, message in cases:
        with pytest.raises(AdapterError, match=rf"^adapter {at} of 3 \({re.escape(str(paths[at - 1]))}\): .*{message}"):
            s2ft.fuse_adapters(base, paths)
        assert_same_state(base, before)
    with pytest.raises(AdapterError, match=r"^adapter 2 of 2: .*weight shape"):
        s2ft.fuse_adapters(base, [first, s2ft.load_adapter_file(other_shape)])


def test_fusion_weights_must_match_the_adapters(tmp_path):
    base = build_tiny("llama_gqa")
    path = adapter_files(tmp_path, base, {"o": 0.25}, seed=1)
    with pytest.raises(ValueError, match="one finite weight per adapter"):
        s2ft.fuse_adapters(base, [path], [0.5, 0.5])
    # One folder, or one weight, instead of lists: once read character by character ("adapter file missing:
    # /adapter_config.json") or a TypeError / "could not convert string to float".
    before = snapshot(base)
    cases = [
        (str(path), None, "takes a list of adapters"),
        (path, None, "takes a list of adapters"),
        ([path], 0.5, "weights must be a list of numbers"),
        ([path], "1", "weights must be a list of numbers"),
        ([path], ["heavy"], "weights must be a list of numbers"),
        ([path], [float("nan")], "one finite weight per adapter"),
    ]
    for adapters, weights, message in cases:
        with pytest.raises(AdapterError, match=message):
            s2ft.fuse_adapters(base, adapters, weights)
        assert_same_state(base, before)


def test_apply_selection_wraps_exactly_the_selected_slots():
    model = build_tiny("llama_9_3")
    reference = copy.deepcopy(model)
    selection = {(1, "v"): torch.tensor([2]), (0, "down"): torch.tensor([4, 90]), (0, "q"): torch.tensor([])}
    apply_selection(model, selection)
    structures = find_structures(reference)
    assert set(s2ft_modules(model)) == {"model.layers.1.self_attn.v_proj", "model.layers.0.mlp.down_proj"}
    for (layer, component), units in selection.items():
        if len(units):
            module = find_structures(model)[layer].linear(component)
            positions = unit_positions(units, structures[layer].unit_size(component))
            assert torch.equal(module.index, positions)
            assert torch.equal(
                module.values, structures[layer].linear(component).weight.index_select(AXIS[component], positions)
            )
    with pytest.raises(ValueError, match="empty"):
        apply_selection(build_tiny("llama_9_3"), {(0, "q"): torch.tensor([], dtype=torch.long)})
    with pytest.raises(ValueError, match=r"\(2, 'o'\)"):
        apply_selection(build_tiny("llama_9_3"), {(2, "o"): [0]})
    with pytest.raises(ValueError, match="unknown layout"):
        apply_selection(build_tiny("llama_9_3"), selection, layout="sideways")


@pytest.mark.parametrize("source", [3, None, {"path": "out/a"}, b"out/a"], ids=["int", "None", "dict", "bytes"])
def test_an_adapter_source_that_is_no_path_is_refused_naming_its_type(tmp_path, source):
    """An int, None or a dict reached ``Path(source)``: a TypeError traceback from pathlib, not a user error."""
    base = build_tiny("llama_gqa")
    before = snapshot(base)
    refused = rf"an adapter is a folder \(str or os.PathLike\) or an s2ft.Adapter, got {type(source).__name__}: "
    for action in (lambda: s2ft.load_adapter(base, source), lambda: s2ft.fuse_adapters(base, [source])):
        with pytest.raises(AdapterError, match=refused):
            action()
        assert_same_state(base, before)
        assert not s2ft_modules(base) and not hasattr(base, "s2ft_state")
    with pytest.raises(
        AdapterError, match=rf"an adapter is a folder \(str or os.PathLike\), got {type(source).__name__}"
    ):
        s2ft.load_adapter_file(source)


MERGED = r"this model's weights already hold a merged S2FT update \(merge_and_unload or fuse_adapters\)"


@pytest.mark.parametrize("how", ["merge_and_unload", "fuse_adapters"])
def test_an_adapter_onto_a_model_holding_a_merged_update_is_refused_and_the_model_kept(tmp_path, how):
    """An adapter training other rows/columns than the merged one passed the base check there (its slots still hold
    the base's values) and was served, fused or exported on top of the merged update, silently; one training the same
    ones was refused as "not the base the adapter was trained on ... the same name, so the weights behind it changed".
    """
    from s2ft.export import export_lora
    from s2ft.multi_adapter import load_adapters

    base = build_tiny("llama_gqa")
    merged_one = adapter_files(tmp_path, base, {"o": 0.25}, seed=1)
    other = adapter_files(tmp_path, base, {"down": 0.05}, seed=2)  # other modules: the base check passes
    same = adapter_files(tmp_path, base, {"o": 0.25}, seed=3)  # other values at the merged module
    assert not hasattr(base, "s2ft_merged")
    if how == "merge_and_unload":
        model = s2ft.merge_and_unload(s2ft.load_adapter(copy.deepcopy(base), merged_one))
    else:
        model = s2ft.fuse_adapters(copy.deepcopy(base), [merged_one])
    assert model.s2ft_merged is True
    before = snapshot(model)
    refusals = {
        "load_adapter": lambda path: s2ft.load_adapter(model, path),
        "load_adapters": lambda path: load_adapters(model, {"x": path}),
        "fuse_adapters": lambda path: s2ft.fuse_adapters(model, [path]),
        "export_lora": lambda path: export_lora(path, tmp_path / "lora", model),
    }
    for case, refused in refusals.items():
        for path in (other, same):
            with pytest.raises(AdapterError, match=rf"{MERGED}.*Load the base model again") as err:
                refused(path)
            assert "not the base" not in str(err.value), case
            assert_same_state(model, before)
            assert not s2ft_modules(model) and not hasattr(model, "s2ft_state") and not hasattr(model, "s2ft_adapters")
    assert not (tmp_path / "lora").exists()
    # Training on from the merged model is allowed; unload gives the merged model back, still marked.
    s2ft.apply_s2ft(model, s2ft.S2FTConfig(ratios={"up": 0.1}))
    s2ft.unload(model)
    assert model.s2ft_merged is True
    with pytest.raises(AdapterError, match=MERGED):
        s2ft.load_adapter(model, other)
    # A refused fusion marks nothing; the plain base and what unload gives back load as before.
    fresh = copy.deepcopy(base)
    with pytest.raises(AdapterError, match="give one finite weight per adapter"):
        s2ft.fuse_adapters(fresh, [other], [float("nan")])
    assert not hasattr(fresh, "s2ft_merged")
    assert not hasattr(s2ft.unload(s2ft.load_adapter(fresh, merged_one)), "s2ft_merged")
    s2ft.load_adapter(fresh, other)


def test_a_merged_model_given_every_weight_back_by_load_state_dict_loses_its_mark(tmp_path):
    """The mark stayed after the base's weights were loaded back (``load_state_dict``), so the model, now the base,
    was still refused; a load that leaves a weight missing keeps the mark, and a copy keeps its own."""
    base = build_tiny("llama_gqa")
    merged_one = adapter_files(tmp_path, base, {"o": 0.25}, seed=1)
    other = adapter_files(tmp_path, base, {"down": 0.05}, seed=2)
    model = s2ft.merge_and_unload(s2ft.load_adapter(copy.deepcopy(base), merged_one))
    partial = {k: v for k, v in base.state_dict().items() if ".o_proj." not in k}
    assert len(partial) < len(base.state_dict())
    model.load_state_dict(partial, strict=False)
    assert model.s2ft_merged is True
    twin = copy.deepcopy(model)
    model.load_state_dict(base.state_dict())
    assert not hasattr(model, "s2ft_merged")
    assert_same_state(model, snapshot(base))
    s2ft.load_adapter(model, other)
    assert twin.s2ft_merged is True
    with pytest.raises(AdapterError, match=MERGED):
        s2ft.load_adapter(twin, other)
    twin.load_state_dict(base.state_dict())
    assert not hasattr(twin, "s2ft_merged")
    # Marked again by a second merge: the mark is set, the hook registered once.
    again = s2ft.merge_and_unload(s2ft.load_adapter(twin, merged_one))
    assert again.s2ft_merged is True and len(again._load_state_dict_post_hooks) == 1


@pytest.mark.parametrize(
    ("field", "value", "refusal"),
    [
        ("shape", [64.0, 64], "'shape' must be two integers [out_features, in_features], got [64.0, 64]"),
        ("shape", [64.5, 64], "'shape' must be two integers [out_features, in_features], got [64.5, 64]"),
        ("shape", [64], "'shape' must be two integers [out_features, in_features], got [64]"),
        ("shape", "64x64", "'shape' must be two integers [out_features, in_features], got '64x64'"),
        ("layer", 0.0, "'layer' must be an integer, got 0.0"),
        ("layer", "0", "'layer' must be an integer, got '0'"),
        ("axis", True, "'axis' must be an integer, got True"),
        ("unit_size", 1.5, "'unit_size' must be an integer, got 1.5"),
        ("component", 3, "'component' must be a string, got 3"),
        ("units", [0, 2**70], f"'units' must be a list of 64-bit ints, got [0, {2**70}]"),
        ("units", [0.0, 1], "'units' must be a list of 64-bit ints, got [0.0, 1]"),
        (None, {}, "it is empty: expected layer, component, axis, unit_size, shape and units"),
        (None, [], "it is [], not a mapping of layer, component, axis, unit_size, shape and units"),
        (None, {"layer": 0}, "missing 'component', 'axis', 'unit_size', 'shape', 'units'"),
    ],
)
def test_a_module_entry_with_a_bad_field_is_refused_naming_the_file_the_field_and_the_value(
    tmp_path, field, value, refusal
):
    """A float shape was truncated by int() (576.5 loaded as 576) or taken (576.0), a float layer too, and an empty
    entry was refused as "'units' must be a list of ints" or a KeyError('layer') repr."""
    base = build_tiny("llama_gqa")
    path = adapter_files(tmp_path, base, {"o": 0.25, "down": 0.05}, seed=1)
    config_path, name = path / CONFIG_NAME, "model.layers.0.self_attn.o_proj"
    config = json.loads(config_path.read_text())
    config["modules"][name] = value if field is None else {**config["modules"][name], field: value}
    config_path.write_text(json.dumps(config))
    files = {f.name: f.read_bytes() for f in path.iterdir()}
    before = snapshot(base)
    for load in (s2ft.load_adapter_file, lambda p: s2ft.load_adapter(base, p)):
        with pytest.raises(AdapterError) as refused:
            load(path)
        assert (
            str(refused.value)
            == f"corrupt entry for module {name!r} in {config_path}: {refusal}; save the adapter again"
        )
    assert_same_state(base, before)
    assert not s2ft_modules(base) and not hasattr(base, "s2ft_state")
    assert files == {f.name: f.read_bytes() for f in path.iterdir()}


def test_an_empty_module_name_is_refused_naming_the_file(tmp_path):
    """An entry named "" named the model itself (get_submodule("")): refused as "adapter module '' is not a linear
    layer of this model (found LlamaForCausalLM)", or as weights that do not match the config."""
    base = build_tiny("llama_gqa")
    path = adapter_files(tmp_path, base, {"o": 0.25}, seed=1)
    config = json.loads((path / CONFIG_NAME).read_text())
    config["modules"][""] = config["modules"].pop("model.layers.0.self_attn.o_proj")
    (path / CONFIG_NAME).write_text(json.dumps(config))
    adapter = s2ft.load_adapter_file(adapter_files(tmp_path, base, {"o": 0.25}, seed=2))
    adapter.modules[""] = adapter.modules.pop("model.layers.0.self_attn.o_proj")
    before = snapshot(base)
    with pytest.raises(
        AdapterError,
        match=rf"^corrupt adapter config {re.escape(str(path / CONFIG_NAME))}: 'modules' has an entry with an empty "
        r"module name \(''\); each is named by the module it trains \(e.g. model.layers.0.self_attn.o_proj\): save "
        "the adapter again$",
    ):
        s2ft.load_adapter(base, path)
    with pytest.raises(AdapterError, match=r"^adapter: an adapter module's name is empty \(''\)"):
        s2ft.load_adapter(base, adapter)
    assert_same_state(base, before)
    assert not s2ft_modules(base) and not hasattr(base, "s2ft_state")
