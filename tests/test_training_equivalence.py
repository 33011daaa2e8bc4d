"""Training an S2FT model equals full fine-tuning restricted to the selected units (both layouts, GQA included)."""

import copy

import pytest
import torch
from conftest import build_tiny, calibration_batches

from s2ft.adapter import merge_and_unload, trainable_parameter_count
from s2ft.api import apply_selection
from s2ft.state import s2ft_modules
from s2ft.structures import AXIS, find_structures, unit_positions

# Hand-made selections touching all 7 components, with units in both KV groups and gathered (non-contiguous) units.
SELECTIONS = {
    "llama_gqa": {
        (0, "q"): [1, 6],
        (0, "k"): [2],
        (0, "v"): [0, 3],
        (0, "o"): [2, 5],
        (0, "gate"): [3, 50, 90],
        (0, "up"): [1, 2],
        (0, "down"): [7, 8, 40],
        (1, "o"): [0, 7],
        (1, "down"): [10, 11, 95],
    },
    "llama_9_3": {
        (0, "q"): [0, 4, 8],
        (0, "k"): [1],
        (0, "v"): [2],
        (0, "o"): [3, 4],
        (1, "gate"): [0, 95],
        (1, "up"): [5, 6, 7],
        (1, "down"): [5, 60],
    },
    "qwen3": {(0, "q"): [1], (0, "k"): [3], (0, "v"): [3], (1, "o"): [6], (1, "up"): [4], (1, "down"): [4, 9]},
}


def make_models(family: str, layout: str, dtype=torch.float64):
    """(S2FT model, full reference copy, selection in original coordinates)."""
    model = build_tiny(family).to(dtype)
    reference = copy.deepcopy(model)
    selection = {key: torch.tensor(units) for key, units in SELECTIONS[family].items()}
    apply_selection(model, selection, layout)
    return model, reference, selection


def batch(size: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch without padding, so the mean loss of two halves averages to the loss of the whole."""
    input_ids = torch.randint(1, 128, (size, 12), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": input_ids, "labels": input_ids}


def original_grads(model) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """(layer, component) -> (positions in original coordinates, values.grad in that order)."""
    state = model.s2ft_state
    result = {}
    for name, module in s2ft_modules(model).items():
        layer, component = state.modules[name]
        units = module.units
        if (layer, component) in state.unit_perms:
            units = state.unit_perms[layer, component][units]
        result[layer, component] = (unit_positions(units, module.unit_size), module.values.grad)
    return result


def masked_full_grads(reference, selection) -> None:
    """Keeps only the selected rows/columns of the reference's gradients; every other gradient becomes None."""
    structures = find_structures(reference)
    keep = {}
    for (layer, component), units in selection.items():
        linear = structures[layer].linear(component)
        mask = torch.zeros_like(linear.weight, dtype=torch.bool)
        mask.index_fill_(AXIS[component], unit_positions(units, structures[layer].unit_size(component)), True)
        keep[linear.weight] = mask
    for param in reference.parameters():
        if param in keep:
            param.grad.mul_(keep[param])
        else:
            param.grad = None


@pytest.mark.parametrize("layout", ["gather", "permuted"])
@pytest.mark.parametrize("family", sorted(SELECTIONS))
def test_block_gradients_equal_slices_of_the_full_gradient(family, layout):
    model, reference, selection = make_models(family, layout)
    data = batch()
    model(**data).loss.backward()
    reference(**data).loss.backward()
    structures = find_structures(reference)
    grads = original_grads(model)
    assert set(grads) == set(selection)
    for (layer, component), (positions, grad) in grads.items():
        full = structures[layer].linear(component).weight.grad
        torch.testing.assert_close(grad, full.index_select(AXIS[component], positions), rtol=1e-9, atol=1e-12)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("layout", ["gather", "permuted"])
@pytest.mark.parametrize("family", ["llama_gqa", "llama_9_3"])
def test_adamw_steps_equal_masked_full_training_and_frozen_tensors_stay_bit_identical(family, layout):
    model, reference, selection = make_models(family, layout)
    frozen_before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    reference.train()
    for step in range(3):
        data = batch(seed=step)
        model(**data).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        reference(**data).loss.backward()
        masked_full_grads(reference, selection)
        reference_optimizer.step()
        reference_optimizer.zero_grad()

    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param, frozen_before[name]), f"frozen {name} changed"
    trained_values = {id(p) for p in optimizer.state}
    assert trained_values == {id(m.values) for m in s2ft_modules(model).values()}

    merged = merge_and_unload(model).state_dict()
    expected = reference.state_dict()
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-9, atol=1e-10, msg=name)


def test_only_the_selected_values_get_gradients_and_optimizer_state():
    model, _, selection = make_models("llama_gqa", "gather", dtype=torch.float32)
    structures = find_structures(model)
    expected_count = sum(
        len(units) * structures[layer].unit_params(component) for (layer, component), units in selection.items()
    )
    assert trainable_parameter_count(model) == expected_count
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    model(**batch()).loss.backward()
    optimizer.step()
    for name, param in model.named_parameters():
        if name.endswith(".values"):
            assert param.grad is not None and param in optimizer.state, name
        else:
            assert param.grad is None and param not in optimizer.state, name


@pytest.mark.parametrize("layout", ["gather", "permuted"])
def test_gradient_accumulation_over_two_micro_batches_equals_one_double_batch(layout):
    model, _, _ = make_models("llama_gqa", layout)
    data = batch(size=4)
    model(**data).loss.backward()
    whole = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    for half in (slice(0, 2), slice(2, 4)):
        (model(**{k: v[half] for k, v in data.items()}).loss / 2).backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, whole[name], rtol=1e-9, atol=1e-12, msg=name)


def test_gradient_checkpointing_gives_the_same_gradients():
    model, _, _ = make_models("llama_gqa", "gather")
    model.train()
    data = batch()
    model(**data).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    model(**data).loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, name
            torch.testing.assert_close(param.grad, plain[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("layout", ["gather", "permuted"])
def test_bf16_autocast_trains_with_finite_fp32_gradients(layout):
    model, _, _ = make_models("llama_9_3", layout, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**calibration_batches()[0]).loss
    loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad.dtype == torch.float32 and torch.isfinite(param.grad).all() and param.grad.any(), name
    optimizer.step()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
