from types import SimpleNamespace

import pytest
import torch
from conftest import adapter_files, build_tiny, calibration_batches

import s2ft
from s2ft.adapter_format import AdapterError
from s2ft.config import COMPONENTS, S2FTConfig, S2FTConfigError
from s2ft.selection import (
    STRATEGIES,
    activation_scores,
    component_budgets,
    gradient_scores,
    random_scores,
    round_half_up,
    select_units,
    top_k,
    unit_counts,
    weight_activation_scores,
    weight_scores,
)
from s2ft.structures import find_structures

# llama_gqa: 2 layers, 8 query / 4 KV heads of dim 8, hidden 64, 96 channels
HEAD_PARAMS, CHANNEL_PARAMS = 8 * 64, 64


@pytest.fixture
def gqa_model():
    """`llama_gqa` (not conftest's `model`: selection needs GQA groups and more heads)."""
    return build_tiny("llama_gqa")


def total_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_top_k_is_stable_and_sorted():
    scores = torch.tensor([3.0, 1.0, 3.0, 2.0, 1.0])
    assert top_k(scores, 1, "large").tolist() == [0]  # tie 0/2: lower index wins
    assert top_k(scores, 3, "large").tolist() == [0, 2, 3]
    assert top_k(scores, 1, "small").tolist() == [1]
    assert top_k(scores, 3, "small").tolist() == [1, 3, 4]
    assert top_k(scores, 0, "small").tolist() == []
    assert top_k(scores, 5, "large").tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("scores", "k", "order", "message"),
    [
        (torch.ones(3), 4, "large", "cannot pick 4 of 3 units"),
        (torch.ones(3), -1, "large", "cannot pick -1 of 3 units"),
        (torch.ones(3), 1, "top", "unknown order 'top'"),
        (torch.tensor([1.0, float("nan")]), 1, "large", "scores contain NaN"),
    ],
)
def test_top_k_errors(scores, k, order, message):
    with pytest.raises(ValueError, match=message):
        top_k(scores, k, order)


def test_round_half_up():
    assert [round_half_up(x) for x in (0.49, 0.5, 1.5, 2.5, 0.29 * 100, 0.0)] == [0, 1, 2, 3, 29, 0]


def test_uniform_ratio_counts(gqa_model):
    structures = find_structures(gqa_model)
    cfg = S2FTConfig(ratios={"o": 0.3, "k": 0.5, "down": 0.05, "up": 0.3125 / 8})
    counts = unit_counts(cfg, structures, total_params(gqa_model))
    # o: 0.3 * 8 = 2.4 -> 2; k: 0.5 * 4 = 2; down: 0.05 * 96 = 4.8 -> 5; up: 0.3125 / 8 * 96 = 3.75 -> 4
    assert counts == {(layer, c): n for layer in (0, 1) for c, n in (("k", 2), ("o", 2), ("up", 4), ("down", 5))}
    assert unit_counts(S2FTConfig(ratios={"o": 0.3125}), structures, 0)[(0, "o")] == 3  # 2.5 rounds up
    selection = select_units(gqa_model, cfg)
    assert {key: len(units) for key, units in selection.items()} == counts


def test_zero_unit_ratio_names_the_minimum(gqa_model):
    structures = find_structures(gqa_model)
    with pytest.raises(S2FTConfigError) as err:
        unit_counts(S2FTConfig(ratios={"o": 0.05, "k": 0.5, "down": 0.001}), structures, 0)
    assert str(err.value).splitlines() == [
        "budget gives no unit:",
        "  - ratios['o']=0.05 gives 0 of 8 units per layer; the smallest ratio giving one unit is 0.0625",
        "  - ratios['down']=0.001 gives 0 of 96 units per layer; the smallest ratio giving one unit is 0.005208",
    ]
    with pytest.raises(
        S2FTConfigError,
        match=r"ratios\['o'\]=0.05 gives 0 of 8 units per layer; the smallest ratio "
        r"giving one unit is 0.0625",
    ):
        unit_counts(S2FTConfig(ratios={"o": 0.05}), structures, 0)
    global_cfg = S2FTConfig(ratios={"o": 0.03}, allocation="global")
    with pytest.raises(
        S2FTConfigError, match="gives 0 of 16 units over all layers; the smallest ratio giving one unit is 0.03125"
    ):
        select_units(gqa_model, global_cfg)


def test_global_allocation_picks_over_all_layers(gqa_model):
    cfg = S2FTConfig(ratios={"o": 0.3, "down": 0.05}, allocation="global", strategy="weight")
    structures = find_structures(gqa_model)
    assert component_budgets(cfg, structures, 0) == {"o": 5, "down": 10}  # 0.3 * 16 = 4.8, 0.05 * 192 = 9.6
    with pytest.raises(S2FTConfigError, match="allocation='global' splits the budget"):
        unit_counts(cfg, structures, 0)
    selection = select_units(gqa_model, cfg)
    scores = weight_scores(gqa_model, structures, ["o", "down"])
    for c, total in (("o", 5), ("down", 10)):
        assert sum(len(selection[(layer, c)]) for layer in (0, 1)) == total
        pool = torch.cat([scores[(0, c)], scores[(1, c)]])
        expected = top_k(pool, total, "large")
        size = structures[0].num_units(c)
        assert selection[(0, c)].tolist() == expected[expected < size].tolist()
        assert selection[(1, c)].tolist() == (expected[expected >= size] - size).tolist()


@pytest.mark.parametrize("target", [3000, 5000, 10001, 2 * 512 + 3 * 64])
def test_target_params_lands_within_one_down_channel(gqa_model, target):
    cfg = S2FTConfig(target_params=target)
    counts = unit_counts(cfg, find_structures(gqa_model), total_params(gqa_model))
    o_total = counts[(0, "o")] + counts[(1, "o")]
    down_total = counts[(0, "down")] + counts[(1, "down")]
    assert o_total == round_half_up(0.5 * target / HEAD_PARAMS)  # O heads are chosen first
    trained = o_total * HEAD_PARAMS + down_total * CHANNEL_PARAMS
    assert abs(trained - target) <= CHANNEL_PARAMS
    for c, total in (("o", o_total), ("down", down_total)):
        # spread as evenly as possible, the first layer taking the odd unit
        assert (counts[(0, c)], counts[(1, c)]) == ((total + 1) // 2, total // 2)


def test_target_params_worked_example(gqa_model):
    # o: round(1500 / 512) = 3 heads (1536 params); down: round((3000 - 1536) / 64) = round(22.875) = 23 channels
    counts = unit_counts(S2FTConfig(target_params=3000), find_structures(gqa_model), 0)
    assert counts == {(0, "o"): 2, (1, "o"): 1, (0, "down"): 12, (1, "down"): 11}


def test_target_fraction_and_split(gqa_model):
    total = total_params(gqa_model)
    cfg = S2FTConfig(target_params=0.05, target_split={"q": 0.25, "up": 0.75})
    selection = select_units(gqa_model, cfg)
    target = round_half_up(0.05 * total)
    q_heads = sum(len(selection[(layer, "q")]) for layer in (0, 1))
    up_channels = sum(len(selection[(layer, "up")]) for layer in (0, 1))
    assert q_heads == round_half_up(0.25 * target / HEAD_PARAMS)
    assert abs(q_heads * HEAD_PARAMS + up_channels * CHANNEL_PARAMS - target) <= CHANNEL_PARAMS


def test_target_errors(gqa_model):
    structures = find_structures(gqa_model)
    with pytest.raises(S2FTConfigError, match="gives no 'o' unit .* the smallest target giving one is 512"):
        unit_counts(S2FTConfig(target_params=100), structures, 0)
    with pytest.raises(S2FTConfigError, match="gives no 'down' unit"):
        unit_counts(S2FTConfig(target_params=520, target_split={"o": 0.99, "down": 0.01}), structures, 0)
    with pytest.raises(S2FTConfigError, match="needs 977 'o' units but the chosen layers have only 16"):
        unit_counts(S2FTConfig(target_params=10**6), structures, 0)


def test_layers_restriction(gqa_model):
    selection = select_units(gqa_model, S2FTConfig(ratios={"o": 0.5}, layers=[1]))
    assert list(selection) == [(1, "o")]
    with pytest.raises(S2FTConfigError, match=r"layers \[5\] do not exist; the model has layers 0..1"):
        select_units(gqa_model, S2FTConfig(ratios={"o": 0.5}, layers=[1, 5]))


def test_selection_format(gqa_model):
    selection = select_units(gqa_model, S2FTConfig(ratios=dict.fromkeys(COMPONENTS, 0.5), seed=3))
    assert set(selection) == {(layer, c) for layer in (0, 1) for c in COMPONENTS}
    for units in selection.values():
        assert units.dtype == torch.long and torch.equal(units, units.sort().values)
        assert len(units.unique()) == len(units)


def test_random_is_seeded_and_independent_of_threads_and_other_components(gqa_model):
    def pick(seed, ratios):
        return select_units(gqa_model, S2FTConfig(ratios=ratios, seed=seed))

    first = pick(0, {"o": 0.5, "down": 0.25})
    assert all(torch.equal(first[k], v) for k, v in pick(0, {"o": 0.5, "down": 0.25}).items())
    assert not torch.equal(first[(0, "down")], pick(1, {"o": 0.5, "down": 0.25})[(0, "down")])
    assert not torch.equal(first[(0, "down")], first[(1, "down")])  # layers draw independent streams
    assert torch.equal(first[(0, "down")], pick(0, {"down": 0.25})[(0, "down")])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.equal(first[(1, "down")], pick(0, {"o": 0.5, "down": 0.25})[(1, "down")])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_large_and_small_are_top_and_bottom_of_the_same_scores(gqa_model, strategy):
    batches = calibration_batches()
    ratios = {"o": 0.5, "k": 0.5, "down": 0.25}
    large = select_units(gqa_model, S2FTConfig(ratios=ratios, strategy=strategy, seed=4), batches)
    small = select_units(gqa_model, S2FTConfig(ratios=ratios, strategy=strategy, order="small", seed=4), batches)
    again = select_units(gqa_model, S2FTConfig(ratios=ratios, strategy=strategy, seed=4), batches)
    assert all(torch.equal(units, again[key]) for key, units in large.items())  # deterministic
    structures = find_structures(gqa_model)
    scores = STRATEGIES[strategy](gqa_model, structures, ["o", "k", "down"], calibration=batches, seed=4)
    for key, units in large.items():
        assert torch.equal(units, top_k(scores[key], len(units), "large"))
        assert torch.equal(small[key], top_k(scores[key], len(units), "small"))
        assert scores[key][units].min() >= scores[key][small[key]].max()


def test_weight_scores_match_hand_computation(gqa_model):
    structures = find_structures(gqa_model)
    scores = weight_scores(gqa_model, structures, COMPONENTS)
    for s in structures:
        attn, mlp = gqa_model.model.layers[s.index].self_attn, gqa_model.model.layers[s.index].mlp
        for h in range(8):
            block = slice(8 * h, 8 * h + 8)
            assert scores[(s.index, "q")][h] == pytest.approx(attn.q_proj.weight[block].double().norm().item())
            assert scores[(s.index, "o")][h] == pytest.approx(attn.o_proj.weight[:, block].double().norm().item())
        for h in range(4):
            block = slice(8 * h, 8 * h + 8)
            assert scores[(s.index, "k")][h] == pytest.approx(attn.k_proj.weight[block].double().norm().item())
            assert scores[(s.index, "v")][h] == pytest.approx(attn.v_proj.weight[block].double().norm().item())
        for j in (0, 17, 95):
            assert scores[(s.index, "gate")][j] == pytest.approx(mlp.gate_proj.weight[j].double().norm().item())
            assert scores[(s.index, "up")][j] == pytest.approx(mlp.up_proj.weight[j].double().norm().item())
            assert scores[(s.index, "down")][j] == pytest.approx(mlp.down_proj.weight[:, j].double().norm().item())


def captured_activations(model, batches) -> dict[tuple[int, str], torch.Tensor]:
    """Per (layer, component): the non-padding tokens' activations, concatenated, captured by plain hooks."""
    captured = {}
    current = {}

    def keep(key, x):
        rows = [x[b, : current["lengths"][b]] for b in range(x.shape[0])]  # right padding
        captured.setdefault(key, []).append(torch.cat(rows).double())

    handles = []
    for i, layer in enumerate(model.model.layers):
        for c, module in (("q", layer.self_attn.q_proj), ("v", layer.self_attn.v_proj), ("up", layer.mlp.up_proj)):
            handles.append(module.register_forward_hook(lambda m, a, out, key=(i, c): keep(key, out)))
        for c, module in (("o", layer.self_attn.o_proj), ("down", layer.mlp.down_proj)):
            handles.append(module.register_forward_pre_hook(lambda m, a, key=(i, c): keep(key, a[0])))
    with torch.no_grad():
        for batch in batches:
            current["lengths"] = batch["attention_mask"].sum(1).tolist()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for handle in handles:
        handle.remove()
    return {key: torch.cat(parts) for key, parts in captured.items()}


def test_activation_scores_match_independent_hooks(gqa_model):
    batches = calibration_batches()
    gqa_model.train()
    scores = activation_scores(
        gqa_model, find_structures(gqa_model), ["q", "v", "o", "up", "down"], calibration=batches
    )
    assert gqa_model.training  # mode restored
    captured = captured_activations(gqa_model, batches)
    assert captured[(0, "o")].shape[0] == sum(int(b["attention_mask"].sum()) for b in batches)
    for (layer, c), tokens in captured.items():
        size = 8 if c in ("q", "v", "o") else 1
        expected = torch.stack([tokens[:, u * size : (u + 1) * size].norm() for u in range(tokens.shape[1] // size)])
        torch.testing.assert_close(scores[(layer, c)], expected, rtol=1e-6, atol=0)


def test_weight_activation_is_the_product(gqa_model):
    batches = calibration_batches()
    structures = find_structures(gqa_model)
    product = weight_activation_scores(gqa_model, structures, ["o", "gate"], calibration=batches)
    weight = weight_scores(gqa_model, structures, ["o", "gate"])
    activation = activation_scores(gqa_model, structures, ["o", "gate"], calibration=batches)
    for key in product:
        torch.testing.assert_close(product[key], weight[key] * activation[key], rtol=0, atol=0)


def test_gradient_scores_match_plain_full_gradients(gqa_model):
    batches = calibration_batches(num_batches=3)
    gqa_model.model.embed_tokens.weight.requires_grad_(False)  # a mixed set of flags, to check they are restored
    flags = {name: p.requires_grad for name, p in gqa_model.named_parameters()}
    components = ["q", "k", "o", "gate", "down"]
    scores = gradient_scores(gqa_model, find_structures(gqa_model), components, calibration=batches)
    assert {name: p.requires_grad for name, p in gqa_model.named_parameters()} == flags
    assert all(p.grad is None for p in gqa_model.parameters())

    expected = {}
    gqa_model.requires_grad_(True)
    for batch in batches:
        gqa_model.zero_grad(set_to_none=True)
        gqa_model(**batch).loss.backward()
        for i, layer in enumerate(gqa_model.model.layers):
            grads = {
                "q": layer.self_attn.q_proj.weight.grad.unflatten(0, (8, 8)).double().pow(2).sum((1, 2)),
                "k": layer.self_attn.k_proj.weight.grad.unflatten(0, (4, 8)).double().pow(2).sum((1, 2)),
                "o": layer.self_attn.o_proj.weight.grad.unflatten(1, (8, 8)).double().pow(2).sum((0, 2)),
                "gate": layer.mlp.gate_proj.weight.grad.double().pow(2).sum(1),
                "down": layer.mlp.down_proj.weight.grad.double().pow(2).sum(0),
            }
            for c, sq in grads.items():
                expected[(i, c)] = expected.get((i, c), 0) + sq
    assert set(scores) == set(expected)
    for key, sq in expected.items():
        torch.testing.assert_close(scores[key], sq.sqrt(), rtol=1e-5, atol=1e-12)


def test_gradient_scores_keep_existing_grads(gqa_model):
    weight = gqa_model.model.layers[0].self_attn.o_proj.weight
    weight.grad = torch.full_like(weight, 7.0)
    gradient_scores(gqa_model, find_structures(gqa_model), ["o"], calibration=calibration_batches(num_batches=1))
    assert torch.equal(weight.grad, torch.full_like(weight, 7.0))


@pytest.mark.parametrize("strategy", ["activation", "weight_activation", "gradient"])
def test_calibration_errors(gqa_model, strategy):
    cfg = S2FTConfig(ratios={"o": 0.5}, strategy=strategy)
    # User errors (run.py prints them without a traceback), still ValueErrors for callers that catch those.
    with pytest.raises(S2FTConfigError, match=f"strategy '{strategy}' needs calibration data"):
        select_units(gqa_model, cfg)
    with pytest.raises(S2FTConfigError, match="calibration yielded no batches"):
        select_units(gqa_model, cfg, calibration=[])
    with pytest.raises(S2FTConfigError, match=r"calibration batch 0 lacks \['attention_mask'"):
        select_units(gqa_model, cfg, calibration=[{"input_ids": torch.ones(1, 4, dtype=torch.long)}])
    assert not any(layer.self_attn.o_proj._forward_pre_hooks for layer in gqa_model.model.layers)  # hooks removed


def test_gradient_needs_labels(gqa_model):
    batch = {k: v for k, v in calibration_batches()[0].items() if k != "labels"}
    with pytest.raises(ValueError, match=r"lacks \['labels'\]; strategy 'gradient' needs"):
        select_units(gqa_model, S2FTConfig(ratios={"o": 0.5}, strategy="gradient"), calibration=[batch])


def test_random_scores_are_in_unit_interval(gqa_model):
    scores = random_scores(gqa_model, find_structures(gqa_model), ["v", "up"], seed=9)
    assert all(0 <= v.min() and v.max() < 1 for v in scores.values())
    assert scores[(0, "v")].shape == (4,) and scores[(1, "up")].shape == (96,)


@pytest.mark.parametrize("form", ["selection", "module_names", "adapter"])
def test_exclude_gives_disjoint_selections(gqa_model, form):
    ratios = {"o": 0.5, "k": 0.5, "down": 0.25}
    first = select_units(gqa_model, S2FTConfig(ratios=ratios, strategy="weight"))
    structures = find_structures(gqa_model)
    exclude = {
        "selection": first,
        "module_names": {structures[layer].module_name(c): units for (layer, c), units in first.items()},
        "adapter": SimpleNamespace(units=lambda: first),  # duck-types s2ft.adapter_format.Adapter.units()
    }[form]
    second = select_units(gqa_model, S2FTConfig(ratios=ratios, strategy="weight", exclude=exclude))
    for key, units in first.items():
        assert len(second[key]) == len(units)
        assert not set(units.tolist()) & set(second[key].tolist())
        # with half of the units excluded, the weight strategy picks exactly the rest
        if key[1] in ("o", "k"):
            assert sorted(units.tolist() + second[key].tolist()) == list(range(structures[0].num_units(key[1])))


def test_exclude_errors(gqa_model):
    first = select_units(gqa_model, S2FTConfig(ratios={"o": 0.75}))
    with pytest.raises(ValueError, match="layer 0 'o': 6 units requested but only 2 remain after excluding"):
        select_units(gqa_model, S2FTConfig(ratios={"o": 0.75}, exclude=first))
    with pytest.raises(ValueError, match="exclude names module 'model.layers.0.mlp'"):
        select_units(gqa_model, S2FTConfig(ratios={"o": 0.5}, exclude={"model.layers.0.mlp": [1]}))
    with pytest.raises(ValueError, match=r"exclude \(0, 'o'\): unit indices must lie in \[0, 8\)"):
        select_units(gqa_model, S2FTConfig(ratios={"o": 0.5}, exclude={(0, "o"): [8]}))
    with pytest.raises(ValueError, match=r"exclude has key \(2, 'o'\)"):
        select_units(gqa_model, S2FTConfig(ratios={"o": 0.5}, exclude={(2, "o"): [1]}))


def test_exclude_a_saved_adapter(tmp_path):
    from s2ft.adapter import save_adapter
    from s2ft.api import apply_s2ft

    ratios = {"o": 0.5, "down": 0.5}
    trained = apply_s2ft(build_tiny("llama_gqa"), S2FTConfig(ratios=ratios, layout="permuted", seed=2))
    save_adapter(trained, tmp_path / "adapter")
    base = build_tiny("llama_gqa")
    first = select_units(base, S2FTConfig(ratios=ratios, seed=2))
    second = select_units(base, S2FTConfig(ratios=ratios, seed=2, exclude=str(tmp_path / "adapter")))
    for key, units in first.items():
        # half of the units each: the saved adapter's (original coordinates) and exactly the others
        assert sorted(units.tolist() + second[key].tolist()) == list(range(len(units) * 2))


def test_budget_errors_come_before_calibration(gqa_model):
    with pytest.raises(S2FTConfigError, match="budget gives no unit"):
        select_units(gqa_model, S2FTConfig(ratios={"o": 0.01}, strategy="gradient"))  # no calibration either


def test_global_exclude_error(gqa_model):
    first = select_units(gqa_model, S2FTConfig(ratios={"down": 0.75}, allocation="global"))
    with pytest.raises(ValueError, match="all layers 'down': 144 units requested but only 48 remain"):
        select_units(gqa_model, S2FTConfig(ratios={"down": 0.75}, allocation="global", exclude=first))


def test_exclude_refuses_an_adapter_of_other_heads(tmp_path, gqa_model):
    """4 heads of 16 have the weights' shapes of 8 heads of 8: an adapter of the one excluded the wrong heads of the
    other silently (unit 1 of 8 is half of head 0 of 16), or, past the other's head count, was refused as out of
    range (a ValueError that did not say the adapter is another base's)."""
    path = adapter_files(tmp_path, gqa_model, {"o": 0.25, "k": 0.5}, seed=1)
    other = build_tiny("llama_gqa", num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    with pytest.raises(AdapterError, match="exclude: adapter module .* made for another base model"):
        select_units(other, S2FTConfig(ratios={"o": 0.25}, exclude=str(path)))
    second = select_units(gqa_model, S2FTConfig(ratios={"o": 0.25}, exclude=str(path)))  # its own base: disjoint
    first = s2ft.load_adapter_file(path).units()
    assert all(not set(second[key].tolist()) & set(first[key].tolist()) for key in second)
