"""S2FTLinear: same function as the linear it replaces, exact gradients, partial back-propagation, merge/unmerge."""

import copy

import pytest
import torch
from torch import nn

from s2ft.adapter_format import AdapterError
from s2ft.layers import S2FTLinear, contiguous_span

# (axis, positions): gathered, contiguous from 0 (permuted layout), contiguous in the middle, contiguous at the end.
CASES = [
    (0, [1, 5, 6, 11]),
    (0, [0, 1, 2]),
    (0, [3, 4, 5, 6]),
    (0, [9, 10, 11]),
    (1, [3, 7, 8, 15]),
    (1, [0, 1, 2, 3, 4]),
    (1, [4, 5, 6, 7]),
    (1, [13, 14, 15]),
]


def make_pair(bias: bool, seed: int = 0) -> tuple[nn.Linear, nn.Linear]:
    """Two identical fp64 linears (16 -> 12): one to wrap, one as the reference."""
    torch.manual_seed(seed)
    linear = nn.Linear(16, 12, bias=bias, dtype=torch.float64)
    reference = nn.Linear(16, 12, bias=bias, dtype=torch.float64)
    reference.load_state_dict(linear.state_dict())
    return linear, reference


def assert_slot_major(layer: S2FTLinear) -> None:
    """Every trained slot of the layer's weight, base values and (unless they train) values is one contiguous run of
    memory; trainable values keep the row-major layout an optimizer's state was made for."""
    for name in ("weight", "values", "base_values"):
        tensor = getattr(layer, name)
        if name == "values" and tensor.requires_grad:
            assert tensor.is_contiguous(), name
        else:
            assert (tensor.t() if layer.axis == 1 else tensor).is_contiguous(), name


@pytest.mark.parametrize("slot_major", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("axis", "positions"), CASES)
def test_forward_and_gradients_match_the_full_linear(axis, positions, bias, slot_major):
    linear, reference = make_pair(bias)
    index = torch.tensor(positions)
    layer = S2FTLinear(linear, axis, index)
    if slot_major:  # the layout switch_adapter leaves
        layer.store_slot_major()
        assert_slot_major(layer)
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, out_ref = layer(x), reference(x_ref)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-12)

    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    out_ref.backward(grad_out)
    torch.testing.assert_close(layer.values.grad, reference.weight.grad.index_select(axis, index), rtol=0, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-12)
    assert layer.weight.grad is None and (layer.bias is None or layer.bias.grad is None)
    assert [name for name, p in layer.named_parameters() if p.requires_grad] == ["values"]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("axis", "positions"), CASES)
def test_inference_path_matches_the_full_linear(axis, positions, bias):
    linear, reference = make_pair(bias)
    layer = S2FTLinear(linear, axis, torch.tensor(positions))
    with torch.no_grad():
        layer.values.mul_(1.5)
        reference.weight.index_copy_(axis, layer.index, layer.values)
        x = torch.randn(2, 5, 16, dtype=torch.float64)
        torch.testing.assert_close(layer(x), reference(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("axis", "positions"), CASES)
def test_frozen_values_pass_the_input_gradient_only(axis, positions):
    linear, reference = make_pair(bias=True)
    layer = S2FTLinear(linear, axis, torch.tensor(positions))
    layer.values.requires_grad_(False)
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    layer(x).sum().backward()
    reference(x_ref).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-12)
    assert layer.values.grad is None


@pytest.mark.parametrize(("axis", "positions"), CASES)
def test_weight_holds_zeroed_slots_and_values_hold_the_base(axis, positions):
    linear, reference = make_pair(bias=True)
    index = torch.tensor(positions)
    layer = S2FTLinear(linear, axis, index)
    assert layer.weight is linear.weight  # no copy of the full matrix
    assert torch.equal(layer.values, reference.weight.index_select(axis, index))
    assert torch.equal(layer.base_values, reference.weight.index_select(axis, index))
    assert not layer.weight.index_select(axis, index).any()
    keep = torch.ones(reference.weight.shape[axis], dtype=torch.bool)
    keep[index] = False
    assert torch.equal(
        layer.weight.index_select(axis, keep.nonzero()[:, 0]),
        reference.weight[keep] if axis == 0 else reference.weight[:, keep],
    )
    assert layer.span == contiguous_span(index)


@pytest.mark.parametrize("positions", [[3, 7, 8, 15], [0, 1, 2, 3, 4], [4, 5, 6, 7], [13, 14, 15]])
def test_input_side_layer_saves_only_the_selected_input_columns(positions):
    linear, _ = make_pair(bias=True)
    layer = S2FTLinear(linear, 1, torch.tensor(positions))
    x = torch.randn(2, 5, 16, requires_grad=True, dtype=torch.float64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    input_storage = x.untyped_storage().data_ptr()
    assert not any(t.untyped_storage().data_ptr() == input_storage for t in saved), "a view of x is kept"
    inputs_kept = [t for t in saved if t.shape[-1] == len(positions) and t.numel() == 10 * len(positions)]
    assert len(inputs_kept) == 1  # the compact x[..., index]
    assert sum(t.numel() for t in saved if t.dtype.is_floating_point) < x.numel() + 2 * linear.weight.numel()
    assert not any(t.numel() == x.numel() for t in saved)


@pytest.mark.parametrize(("axis", "positions"), CASES)
def test_merge_unmerge_round_trip_is_bit_exact(axis, positions):
    linear, reference = make_pair(bias=True)
    layer = S2FTLinear(linear, axis, torch.tensor(positions))
    with torch.no_grad():
        layer.values.add_(torch.randn_like(layer.values))
    x = torch.randn(3, 16, dtype=torch.float64)
    unmerged_weight, unmerged_out = layer.weight.clone(), layer(x)

    layer.merge()
    expected = reference.weight.detach().index_copy(axis, layer.index, layer.values.detach())
    assert torch.equal(layer.weight, expected)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), unmerged_out, rtol=0, atol=1e-12)
    layer.merge()  # idempotent
    assert torch.equal(layer.weight, expected)

    layer.unmerge()
    assert torch.equal(layer.weight, unmerged_weight)
    layer.restore_base()
    assert torch.equal(layer.weight, reference.weight)


def test_training_while_merged_is_refused():
    linear, _ = make_pair(bias=False)
    layer = S2FTLinear(linear, 1, torch.tensor([2, 3]))
    layer.merge()
    with pytest.raises(AdapterError, match="unmerge_adapter"):
        layer(torch.randn(2, 16, dtype=torch.float64))
    with torch.no_grad():
        layer(torch.randn(2, 16, dtype=torch.float64))
    layer.eval()
    layer(torch.randn(2, 16, dtype=torch.float64))


# resized, same size (reused in place), the same positions (no restore needed)
@pytest.mark.parametrize("new_positions", [[0, 4, 7, 9], [2, 3, 10], [1, 2, 3]])
@pytest.mark.parametrize("merged_before, merged_after", [(False, False), (True, True), (False, True), (True, False)])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("slot_major", [False, True])
def test_retarget_equals_a_fresh_layer(axis, new_positions, merged_before, merged_after, slot_major):
    linear, reference = make_pair(bias=True)
    layer = S2FTLinear(linear, axis, torch.tensor([1, 2, 3]))
    with torch.no_grad():
        layer.values.mul_(3.0)
    if merged_before:
        layer.merge()
    if slot_major:  # as served: values that do not train
        layer.values.requires_grad_(False)
        layer.store_slot_major()
    values_param = layer.values
    new_index = torch.tensor(new_positions)
    new_values = torch.randn_like(reference.weight.index_select(axis, new_index))
    layer.retarget(new_index, new_values, merged=merged_after)

    fresh_linear, _ = make_pair(bias=True)
    fresh = S2FTLinear(fresh_linear, axis, new_index, values=new_values)
    if merged_after:
        fresh.merge()
    assert layer.merged == merged_after
    for name in ("weight", "bias", "values", "index", "base_values"):
        assert torch.equal(getattr(layer, name), getattr(fresh, name)), name
    x = torch.randn(4, 16, dtype=torch.float64)
    with torch.no_grad():  # a merged layer trains nothing
        assert torch.equal(layer(x), fresh(x))
    assert (layer.values is values_param) == (len(new_positions) == 3)
    if slot_major:  # read, written and zeroed along contiguous runs, and kept that way
        assert_slot_major(layer)
    layer.unmerge()
    fresh.unmerge()
    assert torch.equal(layer.weight, fresh.weight)


def test_units_recover_the_unit_indices():
    linear = nn.Linear(16, 12, dtype=torch.float64)
    layer = S2FTLinear(linear, 0, torch.tensor([4, 5, 6, 7, 8, 9, 10, 11]), unit_size=4)
    assert layer.units.tolist() == [1, 2]


@pytest.mark.parametrize(
    ("axis", "index", "values", "error", "match"),
    [
        (2, [0], None, ValueError, "axis must be 0"),
        (0, [12], None, IndexError, "out of range"),
        (1, [-1], None, IndexError, "out of range"),
        (0, [1, 1], None, ValueError, "duplicate"),
        (0, [], None, ValueError, "non-empty"),
        (0, [1, 2], torch.zeros(3, 16), ValueError, "shape"),
    ],
)
def test_bad_input_is_refused(axis, index, values, error, match):
    linear, reference = make_pair(bias=True)
    with pytest.raises(error, match=match):
        S2FTLinear(linear, axis, torch.tensor(index, dtype=torch.long), values=values)
    assert torch.equal(linear.weight, reference.weight)


@pytest.mark.parametrize("axis", [0, 1])
def test_a_loaded_state_dict_with_another_index_computes_with_that_index(axis):
    """A layer trained on a contiguous range (the permuted layout's) loading the state dict of one trained on gathered
    slots of the same count: the forward's contiguous fast path kept slicing the old range."""
    linear, reference = make_pair(bias=True)
    contiguous = S2FTLinear(linear, axis, torch.tensor([0, 1, 2, 3]))
    gathered = S2FTLinear(reference, axis, torch.tensor([2, 5, 6, 9]))
    with torch.no_grad():
        gathered.values.add_(torch.randn(gathered.values.shape, dtype=torch.float64))
    contiguous.load_state_dict(gathered.state_dict())
    x = torch.randn(5, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(contiguous(x), gathered(x), rtol=0, atol=1e-12)
    for layer in (contiguous, gathered):  # training: the fused function, and the values' gradient
        layer(x).pow(2).sum().backward()
    torch.testing.assert_close(contiguous.values.grad, gathered.values.grad, rtol=0, atol=1e-12)


def trained_pair(axis: int, weight_dtype: torch.dtype, values_dtype: torch.dtype) -> tuple[S2FTLinear, S2FTLinear]:
    """Two layers on the same base, the first with trained values (in ``values_dtype`` beside a ``weight_dtype``
    weight, as training keeps a bf16 model's), the second untrained: a source and a target for state dicts."""
    layers = []
    for _ in range(2):
        linear, _ = make_pair(bias=True)
        layers.append(S2FTLinear(linear.to(weight_dtype), axis, torch.tensor([1, 5, 6]), values_dtype=values_dtype))
    with torch.no_grad():
        layers[0].values.add_(torch.randn(layers[0].values.shape, generator=torch.Generator().manual_seed(1)))
    return layers[0], layers[1]


@pytest.mark.parametrize("dtypes", [(torch.float64, torch.float64), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize(("source_merged", "target_merged"), [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("axis", [0, 1])
def test_a_state_dict_loads_into_a_layer_in_the_other_merged_state(axis, source_merged, target_merged, dtypes):
    """The slots of ``weight`` hold the values when merged and zeros when not: a merged layer's state dict loaded into
    an unmerged layer counted the values twice, an unmerged one's into a merged layer not at all (no error)."""
    source, target = trained_pair(axis, *dtypes)
    reference = copy.deepcopy(source)  # the source's function, in the target's state
    for layer, merged in ((source, source_merged), (target, target_merged), (reference, target_merged)):
        if merged:
            layer.merge()
    target.load_state_dict(source.state_dict())
    assert target.merged == target_merged
    x = torch.randn(3, 16, dtype=dtypes[0], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(target(x), reference(x))
    for name in ("weight", "values", "index", "base_values"):
        assert torch.equal(getattr(target, name), getattr(reference, name)), name
    assert target.values.dtype == dtypes[1]
    target.unmerge()
    target.restore_base()
    assert torch.equal(target.weight, make_pair(bias=True)[0].weight.to(dtypes[0]))  # the base, bit for bit


def _load_trained_tensors_alone(target: S2FTLinear, source: S2FTLinear) -> None:
    """Loads ``source``'s trained tensors without its weight (what a checkpoint keeps) into ``target``, which must
    then compute ``source``'s function."""
    trained_only = {k: v for k, v in source.state_dict().items() if k in ("values", "index", "base_values")}
    target.load_state_dict(trained_only, strict=False)
    x = torch.randn(3, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("axis", [0, 1])
def test_values_loaded_without_the_weight_into_a_merged_layer_are_merged(axis):
    """A checkpoint keeps the trained tensors only (values, index, base values): loaded into a merged layer, the
    weight kept the old values and the layer computed with them."""
    source, target = trained_pair(axis, torch.float64, torch.float64)
    target.merge()
    _load_trained_tensors_alone(target, source)


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("axis", [0, 1])
def test_trained_tensors_of_another_index_loaded_without_the_weight_move_the_slots(axis, merged):
    """The trained tensors of a layer trained at other slots, without the weight: the old slots stayed zeroed and
    the new ones kept the base, so the layer computed neither the source's function nor the base's."""
    linear, reference = make_pair(bias=True)
    target = S2FTLinear(linear, axis, torch.tensor([0, 1, 2]))
    source = S2FTLinear(reference, axis, torch.tensor([3, 7, 9]))
    with torch.no_grad():
        source.values.add_(torch.randn(source.values.shape, dtype=torch.float64))
    if merged:
        target.merge()
    _load_trained_tensors_alone(target, source)
    target.unmerge()
    target.restore_base()
    assert torch.equal(target.weight, make_pair(bias=True)[0].weight)


def test_a_state_dict_whose_weight_is_neither_merged_nor_unmerged_is_refused():
    """Trained slots of the weight that hold neither zeros (unmerged) nor the values (merged): which of the two the
    layer should compute cannot be told, so nothing is loaded."""
    source, target = trained_pair(1, torch.float64, torch.float64)
    state = source.state_dict()
    state["weight"] = make_pair(bias=True)[0].weight.detach().clone()  # a plain base weight: the base at the slots
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(AdapterError, match="neither zeros .* nor its values"):
        target.load_state_dict(state)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_the_layers_own_weight_beside_a_state_dict_is_not_taken_as_a_given_one():
    """FSDP2's loader (``set_model_state_dict``) fills in what a checkpoint lacks with the module's own tensors: a
    merged layer's own weight beside new values is the old merged weight, not a weight to check against them."""
    source, target = trained_pair(0, torch.float64, torch.float64)
    target.merge()
    state = {"weight": target.weight, "values": source.state_dict()["values"]}
    target.load_state_dict(state, strict=False)
    x = torch.randn(3, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=1e-12)


def test_a_bf16_state_dict_merges_into_an_fp32_layer_at_the_layers_precision():
    """The fp32 values of a bf16 model's state dict, loaded into a merged fp32 layer: the merged slots hold the values
    in fp32, not rounded to bf16 on the way."""
    source, _ = trained_pair(1, torch.bfloat16, torch.float32)
    linear, _ = make_pair(bias=True)
    target = S2FTLinear(linear.float(), 1, torch.tensor([1, 5, 6]))
    target.merge()
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.weight.index_select(1, target.index), source.values.detach())


def test_trained_tensors_of_another_base_at_other_slots_are_refused():
    """Trained tensors without the weight whose base_values are not this layer's base at their slots (another base
    model, or another layout) cannot be placed into this weight: refused, and the layer keeps what it had."""
    linear, _ = make_pair(bias=True)
    other, _ = make_pair(bias=True, seed=1)
    target = S2FTLinear(linear, 0, torch.tensor([0, 1, 2]))
    source = S2FTLinear(other, 0, torch.tensor([3, 7, 9]))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    trained_only = {k: v for k, v in source.state_dict().items() if k in ("values", "index", "base_values")}
    with pytest.raises(AdapterError, match="another base model or layout"):
        target.load_state_dict(trained_only, strict=False)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


@pytest.mark.parametrize("axis", [0, 1])
def test_trained_tensors_of_another_base_at_the_same_slots_are_refused(axis):
    """The same slots as this layer's, so nothing moved and nothing was checked: the dict's base values replaced this
    layer's, and a later restore_base (unloading, switching) wrote another base into the weight."""
    linear, _ = make_pair(bias=True)
    other, _ = make_pair(bias=True, seed=1)
    target = S2FTLinear(linear, axis, torch.tensor([1, 5, 6]))
    source = S2FTLinear(other, axis, torch.tensor([1, 5, 6]))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    trained_only = {k: v for k, v in source.state_dict().items() if k in ("values", "index", "base_values")}
    with pytest.raises(AdapterError, match="base_values are not this model's weights .* another base model or layout"):
        target.load_state_dict(trained_only, strict=False)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("where", ["away from the slots", "at the slots"])
@pytest.mark.parametrize("axis", [0, 1])
def test_a_state_dict_of_another_base_or_unit_order_is_refused(axis, where, merged):
    """A whole state dict carries its base: the weight away from the trained slots, ``base_values`` at them. One in
    another unit order (another layout's: two untrained rows/columns swapped) or of another base was loaded as it
    was, so this layer's base and the order its model's permutation records no longer matched."""
    source, target = trained_pair(axis, torch.float64, torch.float64)
    if merged:
        source.merge()
    state = source.state_dict()
    if where == "away from the slots":
        state["weight"] = state["weight"].index_select(
            axis, torch.tensor([0, 1, 3, 2, *range(4, target.weight.shape[axis])])
        )
    else:
        state["base_values"] = state["base_values"] + 1
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(AdapterError, match="weight is not this model's base weight in this unit order"):
        target.load_state_dict(state)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    assert not target.merged
