"""Switching to adapters validated once (``prepare_adapter``): the same weights as switching to their folders."""

import copy

import pytest
import torch
from conftest import (
    INPUT_IDS,
    RATIOS,
    adapter_files,
    assert_same_state,
    build_tiny,
    logits,
    smollm2_layers,
    snapshot,
    trained,
)
from safetensors.torch import save_file

import s2ft
from s2ft.adapter import extract_adapter
from s2ft.adapter_format import AdapterError, load_adapter_file
from s2ft.methods import upcast_trainable
from s2ft.state import s2ft_modules

# Adapters of build_tiny("llama_9_3") by seed: 2 trains o, up, down; 3 trains q, down (so a switch 2 -> 3 -> 2 unwraps
# o and up to plain linears with their base restored, then wraps them again).
SELECTIONS = {2: {"o": 0.4, "up": 0.1, "down": 0.2}, 3: {"q": 0.3, "down": 0.1}}


def column_major_weights(model) -> int:
    """How many of the model's linear weights are stored column-major (and not also row-major)."""
    weights = [p for name, p in model.named_parameters() if name.endswith(".weight") and p.ndim == 2]
    return sum(p.t().is_contiguous() and not p.is_contiguous() for p in weights)


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("layout", ["gather", "permuted"])
def test_prepared_switches_leave_the_same_weights_as_switching_to_folders(tmp_path, merged, layout):
    base = build_tiny("llama_9_3")
    paths = [
        adapter_files(tmp_path, base, {"o": 0.4, "up": 0.1, "down": 0.2}, seed=2),
        adapter_files(tmp_path, base, {"q": 0.3, "down": 0.1}, seed=3),
        adapter_files(tmp_path, base, RATIOS, seed=4),
    ]
    by_path = trained(copy.deepcopy(base), s2ft.S2FTConfig(ratios=RATIOS, seed=1, layout=layout), seed=1)
    if merged:
        s2ft.merge_adapter(by_path)
    by_prepared = copy.deepcopy(by_path)
    prepared = [s2ft.prepare_adapter(by_prepared, path) for path in paths]
    for step in [0, 1, 2, 0, 2, 1, 1]:
        s2ft.switch_adapter(by_path, paths[step])
        s2ft.switch_adapter(by_prepared, prepared[step])
        assert_same_state(by_prepared, snapshot(by_path))
    fresh = s2ft.load_adapter(copy.deepcopy(base), paths[1])
    torch.testing.assert_close(logits(by_prepared), logits(fresh), rtol=0, atol=1e-5)


def test_an_adapter_prepared_for_another_model_is_validated_again(tmp_path):
    base = build_tiny("llama_9_3")
    path = adapter_files(tmp_path, base, {"o": 0.4, "down": 0.2}, seed=2)
    # Two co-permuted models with different selections: the same adapter has other current coordinates in each.
    first = trained(copy.deepcopy(base), s2ft.S2FTConfig(ratios=RATIOS, seed=1, layout="permuted"), seed=1)
    second = trained(copy.deepcopy(base), s2ft.S2FTConfig(ratios=RATIOS, seed=5, layout="permuted"), seed=5)
    prepared = s2ft.prepare_adapter(first, path)
    s2ft.switch_adapter(second, prepared)
    fresh = s2ft.load_adapter(copy.deepcopy(base), path)
    torch.testing.assert_close(logits(second), logits(fresh), rtol=0, atol=1e-5)

    other = trained(build_tiny("llama_9_3", hidden_size=36, head_dim=4), s2ft.S2FTConfig(ratios={"o": 0.4}), seed=1)
    before = snapshot(other)
    with pytest.raises(AdapterError, match="another base model|differ"):
        s2ft.switch_adapter(other, prepared)
    assert_same_state(other, before)
    with pytest.raises(AdapterError, match="another base model|differ"):
        s2ft.prepare_adapter(other, path)
    with pytest.raises(ValueError, match="no S2FT adapter"):
        s2ft.prepare_adapter(base, path)


def test_a_switched_model_keeps_trained_columns_column_major_and_saves_and_unloads_exactly(tmp_path):
    base = build_tiny("llama_9_3")
    paths = [adapter_files(tmp_path, base, {"o": 0.4, "up": 0.1, "down": 0.2}, seed=seed) for seed in (2, 3)]
    model = trained(copy.deepcopy(base), s2ft.S2FTConfig(ratios=RATIOS, seed=1), seed=1)
    prepared = [s2ft.prepare_adapter(model, path) for path in paths]
    s2ft.switch_adapter(model, prepared[0])
    s2ft.switch_adapter(model, prepared[1])
    for module in s2ft_modules(model).values():
        # A switch copies whole runs of memory: trained columns column-major, trained rows row-major.
        for tensor in (module.weight, module.values, module.base_values):
            assert (tensor.t() if module.axis == 1 else tensor).is_contiguous()

    s2ft.save_adapter(model, tmp_path / "again")
    saved, again = load_adapter_file(paths[1]), load_adapter_file(tmp_path / "again")
    assert saved.modules.keys() == again.modules.keys()
    assert all(torch.equal(saved.modules[n].values, again.modules[n].values) for n in saved.modules)

    fresh = s2ft.load_adapter(copy.deepcopy(base), paths[1])
    expected = logits(fresh)
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-5)
    s2ft.merge_and_unload(model).save_pretrained(tmp_path / "merged")
    reloaded = type(base).from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(reloaded), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", ["gather", "permuted"])
def test_switching_a_bf16_model_keeps_every_modules_fp32_values_exactly(tmp_path, layout):
    base = build_tiny("llama_9_3")
    paths = {seed: adapter_files(tmp_path, base, ratios, seed) for seed, ratios in SELECTIONS.items()}
    bf16 = copy.deepcopy(base).bfloat16()
    model = upcast_trainable(s2ft.apply_s2ft(copy.deepcopy(bf16), s2ft.S2FTConfig(ratios=RATIOS, layout=layout)))
    for seed in (3, 2):  # o and up are unwrapped, then wrapped again by the second switch
        s2ft.switch_adapter(model, paths[seed])
    # Trainable and fp32 like the modules retargeted in place, not rounded to the weight's bf16.
    assert all(m.values.dtype == torch.float32 and m.values.requires_grad for m in s2ft_modules(model).values())
    s2ft.save_adapter(model, tmp_path / "again")
    saved, again = load_adapter_file(paths[2]), load_adapter_file(tmp_path / "again")
    assert saved.modules.keys() == again.modules.keys()
    assert all(torch.equal(saved.modules[n].values, again.modules[n].values) for n in saved.modules)

    fresh = s2ft.merge_and_unload(s2ft.load_adapter(copy.deepcopy(bf16), paths[2]))
    assert column_major_weights(model) == 4  # o and down of both layers
    s2ft.merge_and_unload(model)
    for (name, param), (_, expected) in zip(model.named_parameters(), fresh.named_parameters(), strict=True):
        assert param.dtype == torch.bfloat16 and torch.equal(param, expected), name


def switched_model(tmp_path, layout: str, merged: bool, seeds: tuple[int, ...]):
    """The base, the adapter files of SELECTIONS, and a trained model (merged or not) switched to ``seeds`` in turn."""
    base = build_tiny("llama_9_3")
    paths = {seed: adapter_files(tmp_path, base, ratios, seed) for seed, ratios in SELECTIONS.items()}
    model = trained(copy.deepcopy(base), s2ft.S2FTConfig(ratios=RATIOS, seed=1, layout=layout), seed=1)
    if merged:
        s2ft.merge_adapter(model)
    for seed in seeds:
        s2ft.switch_adapter(model, paths[seed])
    return base, paths, model


def assert_same_parameters(model, expected) -> None:
    """Every parameter of ``model`` equals ``expected``'s bit for bit."""
    for (name, param), (_, want) in zip(model.named_parameters(), expected.named_parameters(), strict=True):
        assert torch.equal(param, want), name


# Ending on 2: o is wrapped again; ending on 3: o is left a plain linear, restored to the base, column-major.
@pytest.mark.parametrize("seeds", [(2, 3, 2), (2, 3)])
@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("layout", ["gather", "permuted"])
def test_a_switched_and_unloaded_model_is_the_fresh_merged_model_bit_for_bit(tmp_path, merged, layout, seeds):
    base, paths, model = switched_model(tmp_path, layout, merged, seeds)
    adapter = extract_adapter(model)
    # The in-memory adapter is a plain one: contiguous values, which safetensors can write.
    assert all(m.values.is_contiguous() for m in adapter.modules.values())
    save_file({name: m.values for name, m in adapter.modules.items()}, tmp_path / "values.safetensors")

    fresh = s2ft.merge_and_unload(s2ft.load_adapter(copy.deepcopy(base), paths[seeds[-1]]))
    assert column_major_weights(model) == 4  # o and down of both layers, column-major since the first switch
    s2ft.merge_and_unload(model)
    # A plain model in from_pretrained's layout: row-major weights, so its matmuls round as the fresh model's do.
    assert all(param.is_contiguous() for param in model.parameters())
    assert_same_parameters(model, fresh)
    model.save_pretrained(tmp_path / "merged")
    reloaded = type(base).from_pretrained(tmp_path / "merged")
    assert_same_parameters(reloaded, fresh)


@pytest.mark.parametrize("seeds", [(2, 3, 2), ()])
@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("layout", ["gather", "permuted"])
def test_unload_gives_back_the_base_model_bit_for_bit(tmp_path, merged, layout, seeds):
    """Before, the way from one adapter to the plain base was to load the base again: merge_and_unload keeps the
    adapter in the weights (mixed adapters served on it were off by ~3). unload restores the base's own values."""
    base, paths, model = switched_model(tmp_path, layout, merged, seeds)
    assert s2ft.unload(model) is model and not hasattr(model, "s2ft_state") and not s2ft_modules(model)
    assert all(param.is_contiguous() and param.requires_grad for param in model.parameters())
    assert_same_parameters(model, base)
    served = s2ft.load_adapters(model, {"two": paths[2]})
    fresh = s2ft.merge_and_unload(s2ft.load_adapter(copy.deepcopy(base), paths[2]))
    with torch.no_grad():
        torch.testing.assert_close(
            served(INPUT_IDS, adapter_names=["two"] * len(INPUT_IDS)).logits, fresh(INPUT_IDS).logits
        )


def test_training_after_a_switch_equals_training_the_freshly_loaded_adapter(tmp_path):
    base = build_tiny("llama_9_3")
    paths = {seed: adapter_files(tmp_path, base, ratios, seed) for seed, ratios in SELECTIONS.items()}
    switched = s2ft.load_adapter(copy.deepcopy(base), paths[3], trainable=True)
    for seed in (2, 3, 2):
        s2ft.switch_adapter(switched, paths[seed])
    fresh = s2ft.load_adapter(copy.deepcopy(base), paths[2], trainable=True)
    losses = {}
    for name, model in (("switched", switched), ("fresh", fresh)):
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses[name] = []
        for _ in range(3):
            optimizer.zero_grad()
            loss = model(INPUT_IDS, labels=INPUT_IDS).loss
            loss.backward()
            optimizer.step()
            losses[name].append(loss.item())
    # Column-major weights can change the matmuls' rounding, not more.
    torch.testing.assert_close(losses["switched"], losses["fresh"], rtol=0, atol=1e-6)
    trained_values = [extract_adapter(m) for m in (switched, fresh)]
    assert trained_values[0].modules.keys() == trained_values[1].modules.keys()
    for name, m in trained_values[0].modules.items():
        assert not torch.equal(m.values, load_adapter_file(paths[2]).modules[name].values), name  # it trained
        torch.testing.assert_close(m.values, trained_values[1].modules[name].values, rtol=0, atol=1e-6)
    for module in s2ft_modules(switched).values():  # the optimizer's updates kept the layout
        assert (module.values.t() if module.axis == 1 else module.values).is_contiguous()


def test_an_unloaded_switched_model_decodes_bit_for_bit_like_the_fresh_merged_model(tmp_path):
    """SmolLM2's layer shapes, one token: there a column-major weight changes the fp32 matmul's rounding on CPU."""
    base = smollm2_layers().eval()
    paths = {seed: adapter_files(tmp_path, base, {"o": 0.12, "down": 0.02}, seed) for seed in (1, 2)}
    model = s2ft.load_adapter(copy.deepcopy(base), paths[1])
    s2ft.switch_adapter(model, paths[2])
    s2ft.merge_and_unload(model)
    fresh = s2ft.merge_and_unload(s2ft.load_adapter(copy.deepcopy(base), paths[2]))
    input_ids = torch.tensor([[3, 5, 7, 1]])  # smollm2_layers has a vocabulary of 32
    with torch.no_grad():
        for length in (1, 4):
            assert torch.equal(model(input_ids[:, :length]).logits, fresh(input_ids[:, :length]).logits)


def test_an_optimizer_keeps_stepping_the_values_it_holds_across_a_switch_exactly(tmp_path):
    """Adapters of one selection size: the switch keeps the values Parameters, so an optimizer made before it goes on
    stepping them. torch's fused AdamW steps a parameter and its state as flat memory: the same result as the
    stride-aware single-tensor kernel only while the values keep the layout their state was made in."""
    base = build_tiny("llama_9_3")
    paths = {seed: adapter_files(tmp_path, base, {"o": 0.4, "down": 0.2}, seed) for seed in (1, 2)}
    trained_values = {}
    for fused in (False, True):
        model = s2ft.load_adapter(copy.deepcopy(base), paths[1], trainable=True).train()
        held = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(held, lr=1e-2, fused=fused, foreach=False if not fused else None)
        for step in range(4):
            if step == 2:
                s2ft.switch_adapter(model, paths[2])
                assert [p for p in model.parameters() if p.requires_grad] == held
            optimizer.zero_grad()
            model(INPUT_IDS, labels=INPUT_IDS).loss.backward()
            optimizer.step()
        trained_values[fused] = extract_adapter(model).modules
    for name, m in trained_values[True].items():
        torch.testing.assert_close(m.values, trained_values[False][name].values, rtol=0, atol=1e-6)


def test_switching_back_to_a_prepared_adapter_after_one_of_its_size_restores_it_exactly(tmp_path):
    """Two prepared adapters of one selection size after a model of another size: the first switch made the layers'
    index the prepared adapter's own positions tensor, and the switch to the second wrote its positions into it, so
    switching back put the first adapter's values at the second one's positions (logits off by ~4)."""
    base = build_tiny("llama_9_3")
    paths = [adapter_files(tmp_path, base, {"o": 0.25, "down": 0.1}, seed=seed) for seed in (2, 3)]
    model = trained(copy.deepcopy(base), s2ft.S2FTConfig(ratios={"o": 0.12, "down": 0.05}, seed=1), seed=1)
    prepared = [s2ft.prepare_adapter(model, path) for path in paths]
    positions = [{name: p.clone() for name, (p, _) in adapter.slots.items()} for adapter in prepared]
    for step in (0, 1, 0):
        s2ft.switch_adapter(model, prepared[step])
    for adapter, before in zip(prepared, positions, strict=True):
        assert all(torch.equal(adapter.slots[name][0], p) for name, p in before.items())
    fresh = s2ft.load_adapter(copy.deepcopy(base), paths[0])
    for name, module in s2ft_modules(fresh).items():
        assert torch.equal(s2ft_modules(model)[name].index, module.index), name
    torch.testing.assert_close(logits(model), logits(fresh), rtol=0, atol=1e-5)


def test_a_frozen_model_switched_from_bf16_values_to_fp32_ones_keeps_them_exactly(tmp_path):
    """An adapter saved with bf16 values (S2FT applied to a bf16 model directly), then one with fp32 values: the
    switch rounded the second one's values to bf16, for retargeted and newly wrapped modules alike."""
    base = build_tiny("llama_9_3")
    bf16 = copy.deepcopy(base).bfloat16()
    s2ft.save_adapter(trained(copy.deepcopy(bf16), s2ft.S2FTConfig(ratios={"o": 0.12, "up": 0.05})), tmp_path / "b")
    paths = {seed: adapter_files(tmp_path, base, {"o": 0.25, "down": 0.1}, seed) for seed in (2, 3)}
    model = s2ft.load_adapter(copy.deepcopy(bf16), tmp_path / "b")
    assert all(m.values.dtype == torch.bfloat16 for m in s2ft_modules(model).values())
    for seed in (2, 3):  # o: another size, then the same size; down: wrapped, then retargeted; up: unwrapped
        s2ft.switch_adapter(model, paths[seed])
        s2ft.save_adapter(model, tmp_path / "again")
        saved, again = load_adapter_file(paths[seed]), load_adapter_file(tmp_path / "again")
        assert saved.modules.keys() == again.modules.keys()
        for name, m in saved.modules.items():
            assert again.modules[name].values.dtype == torch.float32, name
            assert torch.equal(again.modules[name].values, m.values), name
    s2ft.switch_adapter(model, tmp_path / "b")  # and back: bf16 values are exact in fp32
    saved, again = load_adapter_file(tmp_path / "b"), extract_adapter(model)
    assert all(torch.equal(again.modules[n].values, m.values.float()) for n, m in saved.modules.items())
    assert s2ft.trainable_parameter_count(model) == 0


MERGED = r"this model's weights already hold a merged S2FT update \(merge_and_unload or fuse_adapters\)"


@pytest.mark.parametrize("how", ["merge_and_unload", "fuse_adapters"])
def test_switching_an_s2ft_model_of_a_merged_model_is_refused_and_the_model_kept(tmp_path, how):
    """S2FT applied on a merged model keeps its mark, but switch_adapter and prepare_adapter did not read it: an
    adapter of the original base training other rows/columns than the merged one passed the base check (those slots
    hold the base's values) and was switched in on top of the merged update, silently, as load_adapter refuses."""
    base = build_tiny("llama_9_3")
    merged_one = adapter_files(tmp_path, base, {"o": 0.4}, seed=2)
    other = adapter_files(tmp_path, base, {"q": 0.3, "down": 0.1}, seed=3)  # other modules: the base check passes
    if how == "merge_and_unload":
        model = s2ft.merge_and_unload(s2ft.load_adapter(copy.deepcopy(base), merged_one))
    else:
        model = s2ft.fuse_adapters(copy.deepcopy(base), [merged_one])
    model = trained(model, s2ft.S2FTConfig(ratios={"up": 0.1}, seed=1), seed=1)
    assert model.s2ft_merged is True
    before, modules, config = snapshot(model), dict(model.s2ft_state.modules), dict(model.s2ft_state.config)
    for refused in (
        lambda: s2ft.switch_adapter(model, other),
        lambda: s2ft.switch_adapter(model, load_adapter_file(other)),
        lambda: s2ft.prepare_adapter(model, other),
    ):
        with pytest.raises(AdapterError, match=rf"^(switch|prepare)_adapter: {MERGED}.*Load the base model again"):
            refused()
        assert_same_state(model, before)
        assert model.s2ft_state.modules == modules and model.s2ft_state.config == config
        assert set(s2ft_modules(model)) == set(modules)
    # Unloaded, the merged model is still refused; the plain base switches as before.
    s2ft.unload(model)
    assert model.s2ft_merged is True
    fresh = s2ft.load_adapter(copy.deepcopy(base), merged_one)
    s2ft.switch_adapter(fresh, s2ft.prepare_adapter(fresh, other))
    torch.testing.assert_close(logits(fresh), logits(s2ft.load_adapter(copy.deepcopy(base), other)), rtol=0, atol=1e-5)
