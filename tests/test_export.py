"""export_lora: an S2FT adapter as a PEFT LoRA folder whose outputs equal S2FT's within fp32 rounding."""

import copy
import json
import re

import pytest
import torch
from conftest import BAD_ADAPTERS, build_tiny
from peft import LoraConfig, PeftModel
from test_multi_adapter import SELECTIONS, left_padded, save_adapters

import s2ft
from s2ft.adapter_format import AdapterError
from s2ft.export import WEIGHTS_NAME, export_lora, lora_factors


@pytest.mark.parametrize("family", ["llama_gqa", "llama_9_3", "qwen3"])
@pytest.mark.parametrize("selection", sorted(SELECTIONS))
def test_exported_lora_gives_the_s2ft_models_logits(tmp_path, family, selection):
    base = build_tiny(family)
    path = save_adapters(base, tmp_path, {selection: SELECTIONS[selection]})[selection]
    config = export_lora(path, tmp_path / "lora", base)
    adapter = s2ft.load_adapter_file(path)
    ranks = {name: m.positions.numel() for name, m in adapter.modules.items()}
    # Every module's rank is its number of trained rows/columns, with scale alpha / r = 1.
    assert set(config.target_modules) == set(ranks)
    for name, rank in ranks.items():
        key = next((k for k in config.rank_pattern if k.replace("\\", "") == name), None)
        assert (config.rank_pattern[key] if key else config.r) == rank
        assert (config.alpha_pattern[key] if key else config.lora_alpha) == rank
    assert bool(config.rank_pattern) == (len(set(ranks.values())) > 1)
    saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == saved["lora_alpha"] == config.r

    lora = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").eval()
    s2ft_model = s2ft.load_adapter(copy.deepcopy(base), path)
    input_ids, mask = left_padded(4)
    with torch.no_grad():
        expected = s2ft_model(input_ids=input_ids, attention_mask=mask).logits
        got = lora(input_ids=input_ids, attention_mask=mask).logits
        assert not torch.allclose(base(input_ids=input_ids, attention_mask=mask).logits, expected, atol=1e-3)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("axis", [0, 1])
def test_lora_factors_scatter_the_delta_exactly(axis):
    generator = torch.Generator().manual_seed(0)
    shape = (6, 10)
    positions = torch.tensor([1, 4, 5]) if axis == 0 else torch.tensor([0, 3, 7])
    delta_shape = (3, 10) if axis == 0 else (6, 3)
    delta = torch.randn(delta_shape, generator=generator)
    a, b = lora_factors(delta, positions, axis, shape)
    assert a.shape == (3, 10) and b.shape == (6, 3)
    expected = torch.zeros(shape).index_copy_(axis, positions, delta)
    assert torch.equal(b @ a, expected)


def test_export_is_validated_and_overwrites_nothing(tmp_path):
    base = build_tiny("llama_gqa")
    paths = save_adapters(base, tmp_path, {"good": SELECTIONS["cols"], "bad": SELECTIONS["cols"]})
    breaks, message = BAD_ADAPTERS["nan"]
    breaks(tmp_path / "bad")
    with pytest.raises(AdapterError, match=message):
        export_lora(paths["bad"], tmp_path / "out", base)
    assert not (tmp_path / "out").exists()
    with pytest.raises(AdapterError, match="weight shape"):
        export_lora(paths["good"], tmp_path / "out", build_tiny("llama_gqa", hidden_size=32))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(AdapterError, match="not an empty folder"):
        export_lora(paths["good"], tmp_path / "out", base)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    for merged in (False, True):  # an S2FT model's slots are zeroed or merged: no base to take the deltas from
        model = s2ft.load_adapter(copy.deepcopy(base), paths["good"])
        if merged:
            s2ft.merge_adapter(model)
        with pytest.raises(ValueError, match="export_lora needs the plain base model"):
            export_lora(paths["good"], tmp_path / "fresh", model)
    assert not (tmp_path / "fresh").exists()
    export_lora(paths["good"], tmp_path / "fresh", base)
    assert sorted(p.name for p in (tmp_path / "fresh").iterdir()) == ["adapter_config.json", WEIGHTS_NAME]


def test_an_export_stopped_between_its_files_leaves_no_folder(tmp_path, monkeypatch):
    """The weights used to be written into out_dir before the config: a stop between them left a folder PEFT
    cannot load, which a second export then refused as not empty."""
    base = build_tiny("llama_gqa")
    path = save_adapters(base, tmp_path, {"cols": SELECTIONS["cols"]})["cols"]

    def stopped(self, save_directory, **kwargs):
        raise KeyboardInterrupt

    (tmp_path / "empty").mkdir()
    with monkeypatch.context() as patched:
        patched.setattr(LoraConfig, "save_pretrained", stopped)
        for out in ("new", "empty"):
            with pytest.raises(KeyboardInterrupt):
                export_lora(path, tmp_path / out, base)
    assert not (tmp_path / "new").exists() and list((tmp_path / "empty").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cols", "empty"]  # no staging folder left behind
    export_lora(path, tmp_path / "new", base)
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["adapter_config.json", WEIGHTS_NAME]


def test_export_lora_is_part_of_the_package_api():
    assert s2ft.export_lora is export_lora


def test_an_exported_folder_or_an_adapter_file_given_to_load_adapter_is_named(tmp_path):
    """Both have an adapter_config.json or are the adapter's own file: the refusal used to say only that
    adapter.safetensors was missing (under the LoRA folder, or under the file as if it were a folder)."""
    base = build_tiny("llama_gqa")
    path = save_adapters(base, tmp_path, {"cols": SELECTIONS["cols"]})["cols"]
    export_lora(path, tmp_path / "lora", base)
    with pytest.raises(AdapterError, match="is a PEFT LORA adapter: load it with peft.PeftModel.from_pretrained"):
        s2ft.load_adapter(base, tmp_path / "lora")
    with pytest.raises(AdapterError, match="adapter.safetensors is a file; give the adapter's folder"):
        s2ft.load_adapter(base, tmp_path / "cols" / "adapter.safetensors")
    assert not hasattr(base, "s2ft_state")


@pytest.mark.parametrize("under", ["sub", "sub/deeper"])
def test_an_out_dir_under_a_file_is_refused_naming_the_file(tmp_path, under):
    """out_dir's parent was made with mkdir(parents=True): under a file, a FileExistsError or NotADirectoryError
    traceback instead of a user error."""
    base = build_tiny("llama_gqa")
    path = save_adapters(base, tmp_path, {"cols": SELECTIONS["cols"]})["cols"]
    (tmp_path / "notes.txt").write_text("mine")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    out_dir = tmp_path / "notes.txt" / under
    refused = rf"cannot export to {re.escape(str(out_dir))}: {re.escape(str(tmp_path / 'notes.txt'))} is a file"
    with pytest.raises(AdapterError, match=refused):
        export_lora(path, out_dir, base)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "notes.txt").read_text() == "mine"
