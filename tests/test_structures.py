import pytest
import torch
from conftest import TINY, build_tiny
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from s2ft.structures import AXIS, find_structures, unit_positions

# family -> (num_heads, num_kv_heads, head_dim, hidden_size), as configured in conftest.TINY
EXPECTED = {
    "llama_gqa": (8, 4, 8, 64),
    "llama_9_3": (9, 3, 8, 72),
    "mistral": (8, 2, 8, 64),
    "qwen2": (4, 2, 16, 64),
    "qwen3": (8, 4, 16, 64),
}


@pytest.mark.parametrize("family", sorted(TINY))
def test_find_structures_reads_sizes_and_modules(family):
    model = build_tiny(family)
    structures = find_structures(model)
    heads, kv_heads, head_dim, hidden = EXPECTED[family]
    assert [s.index for s in structures] == [0, 1]
    for s, layer in zip(structures, model.model.layers, strict=True):
        assert s.prefix == f"model.layers.{s.index}"
        sizes = (s.num_heads, s.num_kv_heads, s.head_dim, s.hidden_size, s.intermediate_size)
        assert sizes == (heads, kv_heads, head_dim, hidden, 96)
        assert s.group_size == heads // kv_heads
        for component, module in {
            "q": layer.self_attn.q_proj,
            "k": layer.self_attn.k_proj,
            "v": layer.self_attn.v_proj,
            "o": layer.self_attn.o_proj,
            "gate": layer.mlp.gate_proj,
            "up": layer.mlp.up_proj,
            "down": layer.mlp.down_proj,
        }.items():
            assert s.linear(component) is module
            assert model.get_submodule(s.module_name(component)) is module
            # units * unit_size covers exactly the rows (axis 0) or columns (axis 1) of the matrix
            size = module.weight.shape[AXIS[component]]
            assert s.num_units(component) * s.unit_size(component) == size
            other = module.weight.shape[1 - AXIS[component]]
            assert s.unit_params(component) == s.unit_size(component) * other
        units = [s.num_units(c) for c in ("q", "o", "k", "v", "gate", "up", "down")]
        assert units == [heads, heads, kv_heads, kv_heads, 96, 96, 96]


def test_explicit_head_dim_is_used():
    s = find_structures(build_tiny("qwen3"))[0]
    assert s.head_dim == 16 and s.linear("q").weight.shape == (8 * 16, 64)


def test_base_model_and_wrappers():
    model = build_tiny("llama_gqa")
    base = find_structures(model.model)
    assert [s.prefix for s in base] == ["layers.0", "layers.1"]
    assert base[1].linear("o") is model.model.layers[1].self_attn.o_proj

    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

    wrapped = find_structures(Wrapper(model))
    assert [s.prefix for s in wrapped] == ["inner.model.layers.0", "inner.model.layers.1"]
    assert wrapped[0].num_kv_heads == 4


def test_unsupported_model_names_what_was_found():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    with pytest.raises(ValueError) as err:
        find_structures(gpt2)
    message = str(err.value)
    assert "GPT2LMHeadModel" in message and "GPT2Block" in message and "attn: GPT2Attention" in message
    assert "LlamaForCausalLM" in message and "Qwen3ForCausalLM" in message


def test_config_that_disagrees_with_weights():
    model = build_tiny("llama_gqa")
    model.config.num_key_value_heads = 2
    with pytest.raises(
        ValueError,
        match=r"model\.layers\.0\.self_attn\.k_proj\.weight has shape \(32, 64\), expected "
        r"\(16, 64\)",
    ):
        find_structures(model)


def test_heads_not_divisible_by_kv_heads():
    model = build_tiny("llama_gqa")
    model.config.num_key_value_heads = 3
    with pytest.raises(ValueError, match="not a multiple of num_key_value_heads=3"):
        find_structures(model)


def test_unit_positions():
    assert unit_positions(torch.tensor([2, 0]), 3).tolist() == [6, 7, 8, 0, 1, 2]
    assert unit_positions(torch.tensor([5, 1]), 1).tolist() == [5, 1]
    assert unit_positions(torch.tensor([], dtype=torch.long), 4).tolist() == []
