"""The base digest: an adapter records its base model's values at its trained slots, and every load path refuses
another base of the same architecture (another seed here) before the model changes; a base in another dtype of the
same checkpoint loads, and adapters saved without a digest still load."""

import copy
import hashlib
import json
import logging

import pytest
import torch
from conftest import RATIOS, adapter_files, assert_same_state, build_tiny, logits, smoke_config, snapshot, trained

import s2ft
from s2ft.adapter import base_digest, extract_adapter
from s2ft.adapter_format import CONFIG_NAME, AdapterError
from s2ft.export import export_lora
from s2ft.lightning import run_experiment
from s2ft.models import build_run_model, tiny_model
from s2ft.multi_adapter import add_adapter, load_adapters, loaded_adapters

OTHER = {"o": 0.25, "up": 0.1}  # the selection of base B's own adapter
REFUSED = r"this model \(base-b, float32\) is not the base the adapter was trained on \(base-a, float32\)"


def named_tiny(name: str, seed: int) -> torch.nn.Module:
    model = build_tiny("llama_gqa", seed=seed)
    model.name_or_path = name
    return model


def hand_digest(base, adapter, dtype) -> str:
    """The recorded digest, computed from the plain base's weights as the format describes it."""
    sha = hashlib.sha256()
    for name in sorted(adapter.modules):
        m = adapter.modules[name]
        values = base.get_submodule(name).weight.detach().index_select(m.axis, m.positions).to(dtype)
        sha.update(f"{name}:{tuple(values.shape)};".encode())
        sha.update(values.contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def test_the_digest_is_the_bases_whether_saved_merged_unmerged_permuted_or_switched(tmp_path):
    base = build_tiny("llama_gqa")
    digests, units = {}, {}
    for layout in ("gather", "permuted"):
        model = trained(copy.deepcopy(base), s2ft.S2FTConfig(ratios=RATIOS, seed=1, layout=layout))
        digests[layout] = extract_adapter(model).base_digest
        s2ft.merge_adapter(model)
        digests[layout + " merged"] = extract_adapter(model).base_digest
        s2ft.save_adapter(model, tmp_path / layout)
        digests[layout + " saved"] = json.loads((tmp_path / layout / CONFIG_NAME).read_text())["base_digest"]
        units[layout] = s2ft.load_adapter_file(tmp_path / layout).units()
    assert units["gather"].keys() == units["permuted"].keys()
    assert all(torch.equal(units["gather"][key], units["permuted"][key]) for key in units["gather"])
    adapter = s2ft.load_adapter_file(tmp_path / "gather")
    expected = {
        "dtype": "float32",
        "sha256": {
            name: hand_digest(base, adapter, getattr(torch, name)) for name in ("float32", "bfloat16", "float16")
        },
    }
    assert base_digest(base, adapter.modules) == expected
    assert digests == dict.fromkeys(digests, expected)
    # A model switched to another adapter (column-major weights, slots restored and retargeted) records that one's.
    other = adapter_files(tmp_path, base, OTHER, seed=2)
    for layout in ("gather", "permuted"):
        model = trained(copy.deepcopy(base), s2ft.S2FTConfig(ratios=RATIOS, seed=1, layout=layout))
        s2ft.merge_adapter(model)
        s2ft.switch_adapter(model, other)
        switched = extract_adapter(model)
        assert switched.base_digest == s2ft.load_adapter_file(other).base_digest
        assert switched.base_digest == base_digest(base, switched.modules)


def s2ft_model_of_b(paths, layout="gather", merged=False):
    """Base B with its own adapter loaded (gather), or trained co-permuted; merged or not."""
    if layout == "gather":
        model = s2ft.load_adapter(named_tiny("base-b", 1), paths["b"])
    else:
        model = trained(named_tiny("base-b", 1), s2ft.S2FTConfig(ratios=OTHER, seed=2, layout=layout))
    if merged:
        s2ft.merge_adapter(model)
    return model


# Load path -> (the model it is applied to, built from base B; the call with base A's adapter).
LOAD_PATHS = {
    "load_adapter": (lambda p: named_tiny("base-b", 1), lambda m, p: s2ft.load_adapter(m, p["a"])),
    "load_adapter trainable": (
        lambda p: named_tiny("base-b", 1),
        lambda m, p: s2ft.load_adapter(m, p["a"], trainable=True),
    ),
    "load_adapter of an Adapter": (
        lambda p: named_tiny("base-b", 1),
        lambda m, p: s2ft.load_adapter(m, s2ft.load_adapter_file(p["a"])),
    ),
    "fuse_adapters": (lambda p: named_tiny("base-b", 1), lambda m, p: s2ft.fuse_adapters(m, [p["b"], p["a"]])),
    "export_lora": (lambda p: named_tiny("base-b", 1), lambda m, p: export_lora(p["a"], p["lora"], m)),
    "load_adapters": (lambda p: named_tiny("base-b", 1), lambda m, p: load_adapters(m, {"b": p["b"], "a": p["a"]})),
    "add_adapter": (
        lambda p: load_adapters(named_tiny("base-b", 1), {"b": p["b"]}),
        lambda m, p: add_adapter(m, "a", p["a"]),
    ),
    "switch_adapter": (s2ft_model_of_b, lambda m, p: s2ft.switch_adapter(m, p["a"])),
    "switch_adapter merged": (lambda p: s2ft_model_of_b(p, merged=True), lambda m, p: s2ft.switch_adapter(m, p["a"])),
    "switch_adapter permuted": (
        lambda p: s2ft_model_of_b(p, layout="permuted", merged=True),
        lambda m, p: s2ft.switch_adapter(m, p["a"]),
    ),
    "prepare_adapter": (s2ft_model_of_b, lambda m, p: s2ft.prepare_adapter(m, p["a"])),
}


@pytest.mark.parametrize("path", list(LOAD_PATHS))
def test_an_adapter_of_another_base_is_refused_on_every_load_path_and_the_model_kept(tmp_path, path):
    paths = {
        "a": adapter_files(tmp_path / "a", named_tiny("base-a", 0), RATIOS, seed=1),
        "b": adapter_files(tmp_path / "b", named_tiny("base-b", 1), OTHER, seed=2),
        "lora": tmp_path / "lora",
    }
    build, load = LOAD_PATHS[path]
    model = build(paths)
    before, flags = snapshot(model), {n: p.requires_grad for n, p in model.named_parameters()}
    kinds = {name: type(module) for name, module in model.named_modules()}
    attributes = (getattr(model, "s2ft_state", None), getattr(model, "s2ft_adapters", None))
    recorded = None if attributes[0] is None else copy.deepcopy((attributes[0].modules, attributes[0].config))
    mixed = loaded_adapters(model) if attributes[1] is not None else None
    with pytest.raises(AdapterError, match=REFUSED + r".*Load the adapter onto the model it was trained on$"):
        load(model, paths)
    assert_same_state(model, before)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert kinds == {name: type(module) for name, module in model.named_modules()}
    current = (getattr(model, "s2ft_state", None), getattr(model, "s2ft_adapters", None))
    assert all(now is then for now, then in zip(current, attributes, strict=True))
    assert recorded == (None if current[0] is None else (current[0].modules, current[0].config))
    assert mixed == (loaded_adapters(model) if attributes[1] is not None else None)
    assert not paths["lora"].exists()


def test_the_same_checkpoint_in_another_dtype_loads_and_another_base_is_refused_naming_dtypes(tmp_path):
    base = named_tiny("base-a", 0)
    fp32 = adapter_files(tmp_path / "fp32", base, RATIOS, seed=1)
    bf16 = tmp_path / "bf16"
    s2ft.save_adapter(trained(copy.deepcopy(base).to(torch.bfloat16), s2ft.S2FTConfig(ratios=RATIOS, seed=1)), bf16)
    assert json.loads((bf16 / CONFIG_NAME).read_text())["base_digest"]["dtype"] == "bfloat16"
    # fp32-trained onto bf16, fp16 and fp64 copies; bf16-trained onto the fp32 and fp64 checkpoint.
    for adapter, dtype in [(fp32, torch.bfloat16), (fp32, torch.float16), (fp32, torch.float64)] + [
        (bf16, torch.float32),
        (bf16, torch.float64),
    ]:
        model = s2ft.load_adapter(copy.deepcopy(base).to(dtype), adapter)
        assert next(model.parameters()).dtype == dtype
    # A bf16 base rounded on to fp16 is not the fp16 checkpoint: refused, naming the dtype to load the base in.
    fp16 = copy.deepcopy(base).to(torch.float16)
    before = snapshot(fp16)
    with pytest.raises(AdapterError, match=r"\(base-a, float16\) is not .* \(base-a, bfloat16\).*in bfloat16$"):
        s2ft.load_adapter(fp16, bf16)
    assert_same_state(fp16, before)
    with pytest.raises(AdapterError, match=r"\(base-b, bfloat16\) is not .* \(base-a, float32\).*in float32$"):
        s2ft.load_adapter(named_tiny("base-b", 1).to(torch.bfloat16), fp32)
    with pytest.raises(AdapterError, match=r"\(base-b, float32\) is not .* \(base-a, bfloat16\).*in bfloat16$"):
        s2ft.fuse_adapters(named_tiny("base-b", 1), [bf16])


@pytest.mark.parametrize("old", ["no field", "null"])
def test_an_adapter_saved_without_a_digest_loads_with_a_warning(tmp_path, caplog, old):
    base = named_tiny("base-a", 0)
    path = adapter_files(tmp_path, base, RATIOS, seed=1)
    expected = logits(s2ft.load_adapter(copy.deepcopy(base), path))
    config = json.loads((path / CONFIG_NAME).read_text())
    if old == "no field":
        del config["base_digest"]
    else:
        config["base_digest"] = None
    (path / CONFIG_NAME).write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="s2ft.adapter"):
        model = s2ft.load_adapter(copy.deepcopy(base), path)
    assert torch.equal(logits(model), expected)
    assert [r.getMessage() for r in caplog.records] == [
        "the S2FT adapter of base-a records no base digest (saved by an older s2ft): its base weights are not checked"
    ]
    # Unchecked, so another base of the same shapes takes it, as before the digest.
    s2ft.load_adapter(named_tiny("base-b", 1), path)


@pytest.mark.parametrize(
    ("trained_on", "loaded_onto", "message"),
    [
        (
            None,
            None,
            r"this model \(unnamed, float32\) is not the base the adapter was trained on \(recorded without a name, "
            r"float32; neither model has a name_or_path, so only their weights tell them apart\)",
        ),
        (None, "base-b", r"this model \(base-b, float32\) is not the base .* \(recorded without a name, float32\):"),
        ("base-a", None, r"this model \(unnamed, float32\) is not the base .* \(base-a, float32\):"),
    ],
)
def test_a_refusal_between_unnamed_models_says_which_is_which(tmp_path, trained_on, loaded_onto, message):
    """Two unnamed models (name_or_path None or "") compared equal by name: the refusal said "(unnamed, float32) ...
    (unknown, float32; the same name, so the weights behind it changed)", about models that have no name."""
    source = build_tiny("llama_gqa")
    source.name_or_path = trained_on
    path = adapter_files(tmp_path, source, RATIOS, seed=1)
    other = build_tiny("llama_gqa", seed=1)
    other.name_or_path = loaded_onto
    before = snapshot(other)
    with pytest.raises(AdapterError, match=message) as refused:
        s2ft.load_adapter(other, path)
    assert "the same name" not in str(refused.value)
    assert_same_state(other, before)
    assert not hasattr(other, "s2ft_state")


@pytest.fixture(scope="module")
def run_on_a_folder(tmp_path_factory):
    """A one-step run trained on a local model folder (tiny_llama's weights), whose folder then holds another seed's
    model: the base changed under the run's recorded model name."""
    root = tmp_path_factory.mktemp("moved")
    model, tokenizer = build_run_model({"name": "tiny_llama"})
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    run_experiment(
        smoke_config("trainer.max_steps=1", "trainer.warmup_steps=0", f"model.name={root / 'base'}"), root / "run"
    )
    fields = {
        k: getattr(model.config, k) for k in ("num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size")
    }
    tiny_model("llama", len(tokenizer), seed=1, **fields).save_pretrained(root / "base")
    return root


EVAL = ("mode=eval", "eval.limit=2", "eval.tasks=[piqa]", "eval.heldout=[]")


@pytest.mark.parametrize(
    "source", ["run_dir={run}", "adapter={run}/adapter model.name={base}", "adapters=[{run}/adapter] model.name={base}"]
)
def test_the_runner_refuses_an_adapter_on_another_base_before_writing(run_on_a_folder, tmp_path, source):
    root = run_on_a_folder
    overrides = source.format(run=root / "run", base=root / "base").split()
    name = str(root / "base")
    refused = rf"this model \({name}, float32\) is not the base .* \({name}, float32; the same name, so the weights "
    with pytest.raises(AdapterError, match=refused):
        run_experiment(smoke_config(*EVAL, *overrides), tmp_path / "eval")
    assert not (tmp_path / "eval").exists()


def test_the_runner_evaluates_the_adapter_on_its_checkpoint_in_bf16(run_on_a_folder, tmp_path):
    # tiny_llama holds the weights the run trained on, under another name.
    adapter = run_on_a_folder / "run" / "adapter"
    run_experiment(smoke_config(*EVAL, f"adapter={adapter}", "model.name=tiny_llama", "model.dtype=bfloat16"), tmp_path)
    assert (tmp_path / "summary.json").is_file()


def in_dtypes(model: torch.nn.Module, dtypes: dict[str, torch.dtype]) -> torch.nn.Module:
    """``model`` with the linear layers whose names end with a key of ``dtypes`` cast to its dtype (in place)."""
    for name, module in model.named_modules():
        for suffix, dtype in dtypes.items():
            if name.endswith(suffix):
                module.to(dtype)
    return model


HALF_ATTENTION = {"q_proj": torch.bfloat16, "o_proj": torch.bfloat16}  # bf16 attention, the rest fp32


def test_a_base_loaded_in_mixed_dtypes_is_compared_in_its_narrowest_dtype(tmp_path):
    """A base with some linear weights in bf16 and the rest in fp32 (the same checkpoint) was compared in the
    adapter's fp32, its bf16 slots against fp32 values: refused as "(base-a, mixed dtypes) is not the base". Rounded
    to bf16, every slot is what a bf16 load of the checkpoint holds, which the adapter records."""
    base = named_tiny("base-a", 0)
    fp32 = adapter_files(tmp_path / "fp32", base, RATIOS, seed=1)
    bf16 = tmp_path / "bf16"
    s2ft.save_adapter(trained(copy.deepcopy(base).to(torch.bfloat16), s2ft.S2FTConfig(ratios=RATIOS, seed=1)), bf16)
    for adapter in (fp32, bf16):
        mixed = in_dtypes(copy.deepcopy(base), HALF_ATTENTION)
        assert {p.dtype for p in mixed.parameters()} == {torch.float32, torch.bfloat16}
        s2ft.load_adapter(mixed, adapter)
        load_adapters(in_dtypes(copy.deepcopy(base), HALF_ATTENTION), {"a": adapter})
    # Trained on the mixed model, the adapter records the dtype its slots compare in (bf16; its fp32 digest held
    # bf16-rounded values, so the fp32 checkpoint was refused), and loads onto the checkpoint in either dtype.
    on_mixed = tmp_path / "mixed"
    s2ft.save_adapter(trained(in_dtypes(copy.deepcopy(base), HALF_ATTENTION), s2ft.S2FTConfig(ratios=RATIOS)), on_mixed)
    recorded = json.loads((on_mixed / CONFIG_NAME).read_text())["base_digest"]
    assert recorded["dtype"] == "bfloat16" and set(recorded["sha256"]) == {"bfloat16", "float16"}
    for model in (copy.deepcopy(base), copy.deepcopy(base).to(torch.bfloat16), in_dtypes(copy.deepcopy(base), {})):
        s2ft.load_adapter(model, on_mixed)
    # Another base in mixed dtypes is still refused, naming them.
    other = in_dtypes(named_tiny("base-b", 1), HALF_ATTENTION)
    before = snapshot(other)
    with pytest.raises(
        AdapterError,
        match=r"this model \(base-b, mixed dtypes: bfloat16, float32\) is not the base .* \(base-a, float32\).*"
        r"differ \(SHA-256 in bfloat16\)",
    ):
        s2ft.load_adapter(other, fp32)
    assert_same_state(other, before)


def test_a_model_in_dtypes_that_compare_in_none_is_refused_saying_so_and_how_to_load_it(tmp_path):
    """bf16 and fp16 weights round the checkpoint each its own way, so no one dtype holds both as a load of it: the
    refusal said "(base-a, mixed dtypes) is not the base the adapter was trained on", as for another checkpoint."""
    base = named_tiny("base-a", 0)
    fp32 = adapter_files(tmp_path, base, RATIOS, seed=1)
    model = in_dtypes(copy.deepcopy(base), {"q_proj": torch.bfloat16, "o_proj": torch.float16})
    before = snapshot(model)
    with pytest.raises(AdapterError) as refused:
        s2ft.load_adapter(model, fp32)
    message = str(refused.value)
    assert message.startswith(
        "this model (base-a, mixed dtypes: bfloat16, float16, float32) holds the adapter's modules in dtypes that "
        "round the base each its own way, so its weights cannot be compared with the base the adapter was trained on "
        "(base-a, float32):"
    )
    assert (
        "load the base model in one dtype, the adapter's float32: from_pretrained(..., torch_dtype=torch.float32)"
        in (message)
    )
    assert "is not the base" not in message
    assert_same_state(model, before)
    assert not hasattr(model, "s2ft_state")
