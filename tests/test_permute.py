import copy

import pytest
import torch
from conftest import build_tiny, calibration_batches
from torch import nn

from s2ft.config import COMPONENTS, S2FTConfig
from s2ft.permute import permute_model
from s2ft.selection import select_units
from s2ft.structures import AXIS, find_structures, unit_positions


def logits(model) -> torch.Tensor:
    batch = calibration_batches()[0]
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_permutation_preserves_logits(tiny_decoder):
    """Every family (GQA 8/4, 9/3 with biases, Mistral 8/2, Qwen2, Qwen3 with q/k norms), every component."""
    before = logits(tiny_decoder)
    original = copy.deepcopy(tiny_decoder)
    selection = select_units(tiny_decoder, S2FTConfig(ratios=dict.fromkeys(COMPONENTS, 0.3), seed=1))
    new_selection, permutations = permute_model(tiny_decoder, selection)
    torch.testing.assert_close(logits(tiny_decoder), before, rtol=0, atol=1e-5)

    for s, s_old in zip(find_structures(tiny_decoder), find_structures(original), strict=True):
        p = permutations[s.index]
        # GQA invariant: the query head at new position i still uses the KV head now at position i // group
        assert torch.equal(p.q_heads // s.group_size, p.kv_heads.repeat_interleave(s.group_size))
        # "down" leads the FFN order, so its channels always form the front block
        down = new_selection[(s.index, "down")]
        assert torch.equal(down, torch.arange(len(down)))
        for c in COMPONENTS:
            units, new_units = selection[(s.index, c)], new_selection[(s.index, c)]
            assert torch.equal(p.to_original(c, new_units).sort().values, units)
            assert torch.equal(p.to_permuted(c, units).sort().values, new_units)
            # the weights at the new positions are the original selected units' weights, bias rows included
            size, axis = s.unit_size(c), AXIS[c]
            new_positions = unit_positions(new_units, size)
            old_positions = unit_positions(p.to_original(c, new_units), size)
            linear, old_linear = s.linear(c), s_old.linear(c)
            assert torch.equal(
                linear.weight.index_select(axis, new_positions), old_linear.weight.index_select(axis, old_positions)
            )
            if axis == 0 and linear.bias is not None:
                assert torch.equal(linear.bias[new_positions], old_linear.bias[old_positions])


def test_selected_units_come_first_and_stay_contiguous():
    model = build_tiny("llama_gqa")  # 8 query heads in 4 groups of 2
    selection = {
        (0, "o"): torch.tensor([2, 3, 5]),  # group 1 full, one head of group 2
        (0, "down"): torch.tensor([7, 40, 95]),
        (1, "k"): torch.tensor([3]),
        (1, "o"): torch.tensor([0, 4, 5]),
    }
    new_selection, permutations = permute_model(model, selection)
    assert new_selection[(0, "o")].tolist() == [0, 1, 2]
    assert permutations[0].q_heads.tolist() == [2, 3, 5, 4, 0, 1, 6, 7]
    assert permutations[0].kv_heads.tolist() == [1, 2, 0, 3]
    assert new_selection[(0, "down")].tolist() == [0, 1, 2]
    assert permutations[0].channels[:3].tolist() == [7, 40, 95]
    # layer 1: the full group 2 first, then group 0 (one o head); KV head 3 only leads the groups without o heads
    assert permutations[1].kv_heads.tolist() == [2, 0, 3, 1]
    assert new_selection[(1, "o")].tolist() == [0, 1, 2]
    assert new_selection[(1, "k")].tolist() == [2]
    assert torch.equal(permutations[1].channels, torch.arange(96))  # no FFN selection: channels stay


def test_scattered_heads_keep_correct_indices():
    model = build_tiny("llama_9_3")  # 9 query heads in 3 groups of 3
    before = logits(model)
    selection = {(0, "o"): torch.tensor([1, 4, 8]), (0, "q"): torch.tensor([4, 8])}  # one head in every group
    new_selection, permutations = permute_model(model, selection)
    # groups with the most selected heads first (ties: more q heads, then index); selected heads first in a group
    assert permutations[0].kv_heads.tolist() == [1, 2, 0]
    assert permutations[0].q_heads.tolist() == [4, 3, 5, 8, 6, 7, 1, 0, 2]
    assert new_selection[(0, "o")].tolist() == [0, 3, 6]
    assert new_selection[(0, "q")].tolist() == [0, 3]
    torch.testing.assert_close(logits(model), before, rtol=0, atol=1e-5)


def test_refuses_unknown_head_tensors():
    model = build_tiny("llama_gqa")
    model.model.layers[0].self_attn.sinks = nn.Parameter(torch.zeros(8))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.sinks \(shape \(8,\)\) may index heads"):
        permute_model(model, {(0, "o"): torch.tensor([1])})


def test_refuses_wrapped_projections():
    model = build_tiny("llama_gqa")
    layer = model.model.layers[1].mlp
    layer.down_proj.values = nn.Parameter(torch.zeros(64, 1))  # what an S2FT wrapper would add
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj .* permute before apply_s2ft"):
        permute_model(model, {(1, "down"): torch.tensor([1])})


def test_unknown_layer():
    with pytest.raises(ValueError, match=r"selection names layers \[2\]; the model has layers 0..1"):
        permute_model(build_tiny("qwen2"), {(2, "o"): torch.tensor([0])})


@pytest.mark.slow
def test_smollm2_permutation_preserves_logits():
    """The real 9 / 3 head model: 30 layers, so fp32 reassociation of the permuted sums leaves ~1e-4 on logits ~30."""
    from s2ft.models import build_model

    model, tokenizer = build_model("smollm2_135m")
    batch = tokenizer(["The capital of France is", "2 + 2 ="], return_tensors="pt", padding=True)
    selection = select_units(model, S2FTConfig(ratios={"o": 0.25, "k": 0.34, "down": 0.02}, strategy="weight"))
    with torch.no_grad():
        before = model(**batch).logits
        permute_model(model, selection)
        torch.testing.assert_close(model(**batch).logits, before, rtol=0, atol=1e-3)


@pytest.mark.parametrize("units", [[8], [-1], [1, 1]])
def test_bad_units_leave_the_model_unchanged(units):
    model = build_tiny("llama_gqa")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"selection \(1, 'o'\) must hold distinct unit indices in \[0, 8\)"):
        permute_model(
            model, {(0, "o"): torch.tensor([3]), (0, "down"): torch.tensor([5]), (1, "o"): torch.tensor(units)}
        )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
