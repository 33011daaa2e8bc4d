"""Mixed-adapter batches: every row equals its adapter's merged model; loading is validated; memory is the deltas."""

import copy
import re
import threading

import pytest
import torch
from conftest import BAD_ADAPTERS, OTHER_BASES, VOCAB, assert_same_state, build_tiny, snapshot, trained
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

import s2ft
from s2ft.adapter_format import WEIGHTS_NAME, AdapterError, load_adapter_file
from s2ft.errors import UserError
from s2ft.multi_adapter import BASE, MultiAdapterLinear, add_adapter, load_adapters, loaded_adapters, remove_adapter

# Adapter "cols" trains input columns only (o, down), "rows" output rows only, "both" every component.
SELECTIONS = {
    "cols": ({"o": 0.25, "down": 0.1}, 1),
    "rows": ({"q": 0.25, "k": 0.5, "v": 0.5, "gate": 0.1, "up": 0.1}, 2),
    "both": ({"q": 0.25, "k": 0.5, "v": 0.5, "o": 0.25, "gate": 0.1, "up": 0.1, "down": 0.1}, 3),
}
NAMES = ["cols", "rows", BASE, "both", "rows", "cols"]


def save_adapters(base, root, selections=SELECTIONS) -> dict[str, str]:
    """Saves one perturbed ("trained") adapter of ``base`` per selection; returns name -> folder."""
    paths = {}
    for name, (ratios, seed) in selections.items():
        model = trained(copy.deepcopy(base), s2ft.S2FTConfig(ratios=ratios, seed=seed), seed=seed)
        s2ft.save_adapter(model, root / name)
        paths[name] = str(root / name)
    return paths


def merged_models(base, paths) -> dict[str, nn.Module]:
    models = {name: s2ft.merge_and_unload(s2ft.load_adapter(copy.deepcopy(base), p)) for name, p in paths.items()}
    return models | {BASE: base}


def left_padded(rows: int, length: int = 9, vocab: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab, (rows, length), generator=generator)
    pads = torch.arange(rows) % 4  # rows 1, 2, 3 have 1, 2, 3 pad tokens on the left
    mask = (torch.arange(length) >= pads[:, None]).long()
    return input_ids * mask, mask


def assert_rows_match(
    model, references, names, input_ids, mask, new_tokens: int = 6, alone: bool = True, atol: float = 1e-5
) -> None:
    """Every row's logits and greedy generation (KV cache) equal its adapter's merged model's.

    Logits are compared with the merged model on the same (left-padded) batch, and with ``alone`` also with the
    merged model run on the row alone: padding alone changes fp32 logits by up to 6e-5 on SmolLM2 (the base model
    does that too), so there only the greedy tokens are compared with the row run alone.
    """
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=mask, adapter_names=names).logits
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            adapter_names=names,
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        batch_logits = {name: references[name](input_ids=input_ids, attention_mask=mask).logits for name in set(names)}
        for row, name in enumerate(names):
            real = mask[row].bool()
            torch.testing.assert_close(logits[row, real], batch_logits[name][row, real], rtol=1e-5, atol=atol)
            prompt = input_ids[row : row + 1, real]
            if alone:
                expected = references[name](input_ids=prompt).logits[0]
                torch.testing.assert_close(logits[row, real], expected, rtol=1e-5, atol=1e-5)
            want = references[name].generate(input_ids=prompt, max_new_tokens=new_tokens, do_sample=False)
            got = until_eos(generated[row, input_ids.shape[1] :].tolist(), model.generation_config.eos_token_id)
            assert got == want[0, prompt.shape[1] :].tolist(), (row, name)


def until_eos(tokens: list[int], eos: int | list[int]) -> list[int]:
    """The tokens up to and including the first EOS (a finished row is padded after it)."""
    ends = [i for i, token in enumerate(tokens) if token in (eos if isinstance(eos, list) else [eos])]
    return tokens[: ends[0] + 1] if ends else tokens


@pytest.mark.parametrize("family", ["llama_gqa", "llama_9_3", "qwen3"])
def test_every_row_equals_its_adapters_merged_model(tmp_path, family):
    base = build_tiny(family)
    paths = save_adapters(base, tmp_path)
    references = merged_models(base, paths)
    model = load_adapters(copy.deepcopy(base), paths)
    assert loaded_adapters(model) == list(SELECTIONS)
    assert_rows_match(model, references, NAMES, *left_padded(len(NAMES)))
    # The same rows in another order, and a batch of a single adapter.
    shuffled = NAMES[::-1]
    assert_rows_match(model, references, shuffled, *left_padded(len(shuffled), seed=1))
    assert_rows_match(model, references, ["both"] * 3, *left_padded(3, seed=2))


def on_device(module: nn.Module, device: str) -> None:
    """Moves ``module`` to ``device`` and its inputs there as it is called, as a device_map split of a model does."""

    def move(value):
        if isinstance(value, torch.Tensor):
            return value.to(device)
        return type(value)(move(v) for v in value) if isinstance(value, tuple | list) else value

    module.to(device)
    module.register_forward_pre_hook(
        lambda m, args, kwargs: (move(args), {k: move(v) for k, v in kwargs.items()}), with_kwargs=True
    )


@pytest.mark.gpu
def test_rows_of_a_model_spread_over_devices_equal_their_merged_models(tmp_path):
    """The row groups are made on model.device (the first parameter's); on a model spread over devices
    (device_map="auto") the layers elsewhere indexed their inputs with them: a device mismatch at the first mixed call.
    Unrun where this was written (no GPU): here the second half of the layers is on the GPU."""
    base = build_tiny("llama_9_3")
    paths = save_adapters(base, tmp_path)
    references = merged_models(base, paths)
    input_ids, mask = left_padded(len(NAMES))
    with torch.no_grad():
        expected = {name: references[name](input_ids=input_ids, attention_mask=mask).logits for name in set(NAMES)}
    model = load_adapters(copy.deepcopy(base), paths)
    layers = model.model.layers
    for module in [*layers[len(layers) // 2 :], model.model.norm, model.lm_head]:
        on_device(module, "cuda")
    assert model.device.type == "cpu"
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=mask, adapter_names=NAMES).logits.cpu()
    for row, name in enumerate(NAMES):
        real = mask[row].bool()
        torch.testing.assert_close(logits[row, real], expected[name][row, real], rtol=1e-4, atol=1e-4)


def test_rows_of_a_float64_model_equal_its_merged_models_to_float64_rounding(tmp_path):
    """The deltas were taken in fp32 whatever the model's dtype: an fp64 model's rows were 4e-7 off its merged
    models'. (Unpadded: fp64 eager attention gives NaN at left-padded positions, on the base model too.)"""
    base = build_tiny("llama_gqa").double()
    paths = save_adapters(base, tmp_path)
    references = merged_models(base, paths)
    model = load_adapters(copy.deepcopy(base), paths)
    input_ids = left_padded(len(NAMES))[0][:, 3:]
    with torch.no_grad():
        logits = model(input_ids=input_ids, adapter_names=NAMES).logits
        for row, name in enumerate(NAMES):
            expected = references[name](input_ids=input_ids[row : row + 1]).logits[0]
            torch.testing.assert_close(logits[row], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", ["llama_gqa", "llama_9_3", "qwen3"])
def test_rows_on_a_bf16_base_are_as_close_to_fp32_as_the_merged_bf16_models(tmp_path, family):
    """On a bf16 base each row's delta is a bf16 matmul of its own: its logits lie about as far from the fp32 merged
    model as the merged bf16 model's do (0.04 on logits of about 3; an unapplied delta is off by ~3)."""
    base = build_tiny(family)
    paths = save_adapters(base, tmp_path)
    references = merged_models(base, paths)
    input_ids = left_padded(len(NAMES))[0].clamp(min=1)
    model = load_adapters(copy.deepcopy(base).to(torch.bfloat16), paths)
    with torch.no_grad():
        mixed = model(input_ids=input_ids, adapter_names=NAMES).logits.float()
        fp32, bf16 = {}, {}
        for name in set(NAMES):
            fp32[name] = references[name](input_ids=input_ids).logits
            bf16[name] = copy.deepcopy(references[name]).to(torch.bfloat16)(input_ids=input_ids).logits.float()
    mixed_error = max((mixed[row] - fp32[name][row]).abs().max().item() for row, name in enumerate(NAMES))
    merged_error = max((bf16[name][row] - fp32[name][row]).abs().max().item() for row, name in enumerate(NAMES))
    assert mixed_error <= 1.5 * merged_error, (mixed_error, merged_error)


def test_without_adapter_names_every_row_is_the_base_model_bit_for_bit(tmp_path):
    base = build_tiny("llama_9_3")
    model = load_adapters(copy.deepcopy(base), save_adapters(base, tmp_path))
    input_ids, mask = left_padded(4)
    with torch.no_grad():
        expected = base(input_ids=input_ids, attention_mask=mask).logits
        assert torch.equal(model(input_ids=input_ids, attention_mask=mask).logits, expected)
        names = [BASE] * 4
        assert torch.equal(model(input_ids=input_ids, attention_mask=mask, adapter_names=names).logits, expected)
        want = base.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        got = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        assert torch.equal(got, want)


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["cols", "nope", BASE, BASE], r"unknown adapter names \['nope'\]"),
        (["cols", "rows"], "2 names for a batch of 4 rows"),
        ("cols", "one adapter name per row"),
    ],
)
def test_bad_adapter_names_are_refused(tmp_path, names, message):
    base = build_tiny("llama_gqa")
    model = load_adapters(base, save_adapters(base, tmp_path))
    input_ids, mask = left_padded(4)
    with pytest.raises(ValueError, match=message):
        model(input_ids=input_ids, attention_mask=mask, adapter_names=names)
    with pytest.raises(ValueError, match=message):
        model.generate(input_ids=input_ids, attention_mask=mask, adapter_names=names, max_new_tokens=2)
    # generate's own name for the prompt: a wrong count was reported as beam search expanding the batch.
    with pytest.raises(ValueError, match=message):
        model.generate(inputs=input_ids, attention_mask=mask, adapter_names=names, max_new_tokens=2)


@pytest.mark.parametrize("expand", [dict(num_beams=2), dict(do_sample=True, num_return_sequences=2)])
def test_beam_search_expanding_the_batch_is_refused(tmp_path, expand):
    """The refusal said to give one adapter name per expanded row, which the row count check refuses in turn."""
    base = build_tiny("llama_gqa")
    model = load_adapters(base, save_adapters(base, tmp_path))
    input_ids, mask = left_padded(2)
    names = ["cols", "rows"]
    with pytest.raises(AdapterError, match=r"expand the batch.*repeat_interleave\(n, 0\).*each adapter name n"):
        model.generate(input_ids=input_ids, attention_mask=mask, adapter_names=names, max_new_tokens=2, **expand)
    # What it says to do instead: the rows repeated, each with its name.
    torch.manual_seed(0)
    out = model.generate(
        input_ids=input_ids.repeat_interleave(2, 0),
        attention_mask=mask.repeat_interleave(2, 0),
        adapter_names=[name for name in names for _ in range(2)],
        max_new_tokens=2,
        do_sample=True,
        pad_token_id=0,
    )
    assert out.shape[0] == 4
    assert torch.equal(out[:, : input_ids.shape[1]], input_ids.repeat_interleave(2, 0))


def buffer_bytes(model) -> int:
    return sum(b.numel() * b.element_size() for b in model.buffers())


def test_memory_grows_only_by_the_deltas_and_their_positions(tmp_path):
    base = build_tiny("llama_9_3")
    paths = save_adapters(base, tmp_path)
    parameters = {name: p.data_ptr() for name, p in base.named_parameters()}
    before = buffer_bytes(base)
    model = load_adapters(base, paths)
    # The base Parameters are the same tensors (nothing copied or zeroed), and no parameter was added.
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == parameters
    adapters = [s2ft.load_adapter_file(p) for p in paths.values()]
    expected = sum(m.values.numel() * 4 + m.positions.numel() * 8 for a in adapters for m in a.modules.values())
    assert buffer_bytes(model) - before == expected


@pytest.mark.parametrize("case", sorted(BAD_ADAPTERS))
def test_bad_adapter_is_refused_and_the_model_left_unchanged(tmp_path, case):
    base = build_tiny("llama_gqa")
    paths = save_adapters(base, tmp_path, {"good": SELECTIONS["cols"], "bad": SELECTIONS["cols"]})
    breaks, message = BAD_ADAPTERS[case]
    breaks(tmp_path / "bad")
    before = snapshot(base)
    with pytest.raises(AdapterError, match=message):
        load_adapters(base, paths)
    assert_same_state(base, before)
    assert not hasattr(base, "s2ft_adapters") and not any(isinstance(m, MultiAdapterLinear) for m in base.modules())
    model = load_adapters(base, {"good": paths["good"]})
    before = snapshot(model)
    with pytest.raises(AdapterError, match=message):
        add_adapter(model, "bad", paths["bad"])
    assert_same_state(model, before)
    assert loaded_adapters(model) == ["good"]


# Ways the third of three adapters is refused: made for another shape, for another checkpoint of the same
# architecture (its base digest), or a corrupt file.
BOTH = {"both": SELECTIONS["both"]}
THIRD_REFUSED = {
    "other shape": (lambda root: save_adapters(build_tiny("llama_gqa", hidden_size=32), root, BOTH), "weight shape"),
    "other base": (lambda root: save_adapters(build_tiny("llama_gqa", seed=1), root, BOTH), "not the base the adapter"),
    "corrupt file": (
        lambda root: (root / "both" / WEIGHTS_NAME).write_bytes(b"\x00garbage"),
        "corrupt adapter weights",
    ),
}


@pytest.mark.parametrize("case", sorted(THIRD_REFUSED))
def test_a_refused_adapter_among_several_is_named_and_none_is_loaded(tmp_path, case):
    """A refusal among several adapters did not say which one it was (a bare "adapter module ... has weight shape"):
    now it names the adapter and its folder, and none of the adapters before it is left attached."""
    base = build_tiny("llama_gqa")
    paths = save_adapters(base, tmp_path)
    breaks, message = THIRD_REFUSED[case]
    breaks(tmp_path)  # the third, "both", is made for another model or broken
    named = rf"^adapter 'both' \({re.escape(paths['both'])}\): .*{message}"
    before = snapshot(base)
    with pytest.raises(AdapterError, match=named):
        load_adapters(base, paths)
    assert_same_state(base, before)
    assert not hasattr(base, "s2ft_adapters") and "generate" not in vars(base) and "save_pretrained" not in vars(base)
    assert not any(isinstance(m, MultiAdapterLinear) for m in base.modules())
    assert not base._forward_pre_hooks and not base._forward_hooks
    model = load_adapters(base, {"cols": paths["cols"], "rows": paths["rows"]})
    before, configs = snapshot(model), copy.deepcopy(model.s2ft_adapters.configs)
    with pytest.raises(AdapterError, match=named):
        add_adapter(model, "both", paths["both"])
    assert_same_state(model, before)
    assert model.s2ft_adapters.configs == configs and loaded_adapters(model) == ["cols", "rows"]
    if case != "corrupt file":  # an Adapter object has no folder to name
        with pytest.raises(AdapterError, match=rf"^adapter 'both': .*{message}"):
            add_adapter(model, "both", load_adapter_file(paths["both"]))


@pytest.mark.parametrize(("other", "message"), OTHER_BASES)
def test_adapter_for_another_base_model_is_refused(tmp_path, other, message):
    paths = save_adapters(build_tiny("llama_gqa"), tmp_path, {"cols": SELECTIONS["cols"]})
    base = other()
    before = snapshot(base)
    with pytest.raises(AdapterError, match=message):
        load_adapters(base, paths)
    assert_same_state(base, before)
    own = save_adapters(base, tmp_path / "own", {"own": SELECTIONS["rows"]})
    model = load_adapters(base, own)
    before = snapshot(model)
    with pytest.raises(AdapterError, match=message):
        add_adapter(model, "cols", paths["cols"])
    assert_same_state(model, before)


def test_names_and_models_are_checked(tmp_path):
    base = build_tiny("llama_gqa")
    paths = save_adapters(base, tmp_path, {"cols": SELECTIONS["cols"]})
    for name in (BASE, "a.b", ""):
        with pytest.raises(ValueError, match="adapter name"):
            load_adapters(base, {name: paths["cols"]})
    with pytest.raises(ValueError, match="at least one adapter"):
        load_adapters(base, {})
    # A list of folders (as run.py's adapters=[...] takes): once an AttributeError ('list' object has no 'items').
    with pytest.raises(AdapterError, match="takes a mapping of names to adapters"):
        load_adapters(base, [paths["cols"]])
    assert not hasattr(base, "s2ft_adapters")
    model = load_adapters(base, paths)
    with pytest.raises(ValueError, match="already has S2FT adapters"):
        load_adapters(model, paths)
    with pytest.raises(ValueError, match="already loaded"):
        add_adapter(model, "cols", paths["cols"])
    with pytest.raises(ValueError, match="no adapter named"):
        remove_adapter(model, "rows")
    single = s2ft.load_adapter(build_tiny("llama_gqa"), paths["cols"])
    with pytest.raises(ValueError, match="already has an S2FT adapter; load_adapters needs the plain base model"):
        load_adapters(single, paths)
    # The other way round: a mixed-adapter model is no base for one adapter either.
    with pytest.raises(ValueError, match="already has an S2FT adapter"):
        s2ft.load_adapter(model, paths["cols"])
    with pytest.raises(ValueError, match="already has an S2FT adapter"):
        s2ft.apply_s2ft(model, s2ft.S2FTConfig(ratios={"o": 0.25}))


@pytest.mark.parametrize("name", ["train", "eval", "values", "cuda"])
def test_any_name_works_also_the_attributes_of_torch_containers(tmp_path, name):
    """Names like "train" or "eval" are attributes of the nn.ModuleDict that holds the adapters: once a KeyError
    halfway through the load, which left the model with one projection wrapped."""
    base = build_tiny("llama_9_3")
    paths = save_adapters(base, tmp_path, {"cols": SELECTIONS["cols"]})
    references = merged_models(base, paths)
    model = load_adapters(copy.deepcopy(base), {name: paths["cols"]})
    assert loaded_adapters(model) == [name]
    assert_rows_match(model, {name: references["cols"], BASE: base}, [name, BASE], *left_padded(2))
    add_adapter(model, "other", paths["cols"])
    remove_adapter(model, name)
    remove_adapter(model, "other")
    assert not any(isinstance(m, MultiAdapterLinear) for m in model.modules())


def test_adapters_are_added_and_removed_on_a_live_model(tmp_path):
    base = build_tiny("llama_9_3")
    paths = save_adapters(base, tmp_path)
    references = merged_models(base, paths)
    buffers_before, parameters = buffer_bytes(base), [p.data_ptr() for p in base.parameters()]
    model = load_adapters(copy.deepcopy(base), {"cols": paths["cols"]})
    add_adapter(model, "rows", paths["rows"])
    add_adapter(model, "both", paths["both"])
    assert loaded_adapters(model) == ["cols", "rows", "both"]
    assert_rows_match(model, references, NAMES, *left_padded(len(NAMES)))
    remove_adapter(model, "cols")
    with pytest.raises(ValueError, match=r"unknown adapter names \['cols'\]"):
        model(input_ids=left_padded(1)[0], adapter_names=["cols"])
    names = ["rows", "both", BASE]
    assert_rows_match(model, references, names, *left_padded(len(names)))
    remove_adapter(model, "rows")
    remove_adapter(model, "both")
    # The plain base model again: nn.Linear modules, no hook, no extra memory, the base's outputs bit for bit.
    assert not hasattr(model, "s2ft_adapters") and "generate" not in vars(model)
    assert all(type(m) is not MultiAdapterLinear for m in model.modules())
    assert buffer_bytes(model) == buffers_before
    input_ids, mask = left_padded(3)
    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids).logits, base(input_ids=input_ids).logits)
    model = load_adapters(model, {"rows": paths["rows"]})
    assert_rows_match(model, references, ["rows", BASE], *left_padded(2))
    assert len(parameters) == len(list(model.parameters()))


def test_save_pretrained_of_a_mixed_adapter_model_is_refused(tmp_path):
    """transformers' save_pretrained wrote the base weights beside every adapter's deltas, which from_pretrained
    dropped with a warning: the folder loaded as the base model, without the adapters it was saved with."""
    base = build_tiny("llama_9_3")
    paths = save_adapters(base, tmp_path)
    model = load_adapters(copy.deepcopy(base), paths)
    with pytest.raises(AdapterError, match=r"mixed-adapter model.*s2ft\.save_adapter"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    for name in paths:
        remove_adapter(model, name)
    assert "save_pretrained" not in vars(model)  # the plain base model again: transformers' save_pretrained
    model.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("how", ["pickled", "copied"])
def test_a_pickled_or_copied_mixed_adapter_model_serves_its_adapters(tmp_path, how):
    """generate was a bound method, pickled as getattr(model, "_generate"): torch.save of a mixed-adapter model
    worked and torch.load of it failed with an AttributeError. A copy's generate runs the copy, not the original
    (whose adapters are removed here)."""
    base = build_tiny("llama_gqa")
    paths = save_adapters(base, tmp_path)
    references = merged_models(base, paths)
    original = load_adapters(copy.deepcopy(base), paths)
    if how == "pickled":
        torch.save(original, tmp_path / "model.pt")
        model = torch.load(tmp_path / "model.pt", weights_only=False)
    else:
        model = copy.deepcopy(original)
    for name in paths:
        remove_adapter(original, name)
    assert loaded_adapters(model) == list(SELECTIONS)
    assert_rows_match(model, references, NAMES, *left_padded(len(NAMES)))
    for name in paths:
        remove_adapter(model, name)
    assert "generate" not in vars(model)
    input_ids, mask = left_padded(2)
    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids).logits, base(input_ids=input_ids).logits)


@pytest.mark.slow
def test_smollm2_rows_equal_their_merged_models(tmp_path):
    """SmolLM2-135M with two trained adapters (a few AdamW steps each, on different texts)."""
    from s2ft.models import build_model

    base, tokenizer = build_model("smollm2_135m")
    base.eval()
    selections = {
        "heads": ({"o": 0.12, "down": 0.01}, 1),
        "rows": ({"q": 0.12, "v": 0.34, "up": 0.01, "down": 0.01}, 2),
    }
    texts = {
        "heads": ["Question: 12 + 30 = ?\nAnswer: 42", "Question: 7 * 6 = ?\nAnswer: 42"],
        "rows": ["Question: Is the sea salty?\nAnswer: yes", "Question: Do fish fly?\nAnswer: no"],
    }
    paths = {}
    for name, (ratios, seed) in selections.items():
        model = s2ft.apply_s2ft(copy.deepcopy(base), s2ft.S2FTConfig(ratios=ratios, seed=seed))
        train = tokenizer(texts[name], return_tensors="pt", padding=True)
        labels = train["input_ids"].masked_fill(train["attention_mask"] == 0, -100)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        for _ in range(3):
            model(**train, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        s2ft.save_adapter(model, tmp_path / name)
        paths[name] = str(tmp_path / name)
        del model
    references = merged_models(base, paths)
    prompts = ["The capital of France is", "2 + 2 =", "Write a haiku about the sea:", "Q: What is an atom?\nA:"]
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    model = load_adapters(copy.deepcopy(base), paths)
    names = ["heads", "rows", BASE, "heads"]
    # Logits of order 30 through 30 layers: 1e-5 of their scale (measured: at most 5.6e-5, i.e. 1.8e-6 of it).
    atol = 1e-5 * 30
    assert_rows_match(model, references, names, batch["input_ids"], batch["attention_mask"], 8, alone=False, atol=atol)


def test_a_submodule_called_after_a_mixed_call_is_the_base_model(tmp_path):
    """The rows of the last call stayed set: the decoder called on its own (``model.model(...)``, for hidden states)
    applied the previous call's adapters to its rows, after a forward, a generate or a forward that failed."""
    base = build_tiny("llama_9_3")
    model = load_adapters(copy.deepcopy(base), save_adapters(base, tmp_path))
    input_ids, mask = left_padded(len(NAMES))
    with torch.no_grad():
        expected = base.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        calls = {
            "forward": lambda: model(input_ids=input_ids, attention_mask=mask, adapter_names=NAMES),
            "generate": lambda: model.generate(
                input_ids=input_ids, attention_mask=mask, adapter_names=NAMES, max_new_tokens=2, do_sample=False
            ),
            "failed forward": lambda: model(input_ids=input_ids + VOCAB, adapter_names=NAMES),  # ids out of range
        }
        for call, run in calls.items():
            if call == "failed forward":
                with pytest.raises(IndexError):
                    run()
            else:
                run()
            assert torch.equal(model.model(input_ids=input_ids, attention_mask=mask).last_hidden_state, expected), call


def test_adapter_names_given_past_the_models_call_are_refused(tmp_path):
    """model.forward(...) skips the pre-hook that reads adapter_names, and transformers' decoders accept and ignore
    unknown keyword arguments: every row ran the base model (logits off by about 3), silently."""
    base = build_tiny("llama_9_3")
    paths = save_adapters(base, tmp_path)
    model = load_adapters(copy.deepcopy(base), paths)
    input_ids, mask = left_padded(len(NAMES))
    with torch.no_grad():
        for call in (model.forward, model.model):
            with pytest.raises(AdapterError, match=r"call model\(\.\.\., adapter_names=\.\.\.\)"):
                call(input_ids=input_ids, attention_mask=mask, adapter_names=NAMES)
        expected = base(input_ids=input_ids, attention_mask=mask).logits
        assert torch.equal(model.forward(input_ids=input_ids, attention_mask=mask, adapter_names=None).logits, expected)
        assert_rows_match(model, merged_models(base, paths), NAMES, input_ids, mask, new_tokens=2)
    for name in paths:
        remove_adapter(model, name)
    assert not model.model._forward_pre_hooks


def test_an_adapter_is_not_removed_while_generate_runs_with_it(tmp_path):
    """From a stopping criterion (or a streamer, or another thread): its rows went on decoding as the base model."""
    base = build_tiny("llama_gqa")
    paths = save_adapters(base, tmp_path, {"cols": SELECTIONS["cols"], "rows": SELECTIONS["rows"]})
    model = load_adapters(copy.deepcopy(base), paths)
    refusals = []

    class RemoveAtStep2(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            if input_ids.shape[1] == prompt_length + 2:
                with pytest.raises(AdapterError, match="generate is running with adapter_names") as refused:
                    remove_adapter(model, "cols")
                refusals.append(refused)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    input_ids, mask = left_padded(3)
    prompt_length = input_ids.shape[1]
    names = ["cols", "rows", "cols"]
    with torch.no_grad():
        expected = model.generate(
            input_ids=input_ids, attention_mask=mask, adapter_names=names, max_new_tokens=5, do_sample=False
        )
        got = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            adapter_names=names,
            max_new_tokens=5,
            do_sample=False,
            stopping_criteria=StoppingCriteriaList([RemoveAtStep2()]),
        )
    assert len(refusals) == 1 and torch.equal(got, expected)
    remove_adapter(model, "cols")  # once it returned
    assert loaded_adapters(model) == ["rows"]


def test_two_threads_running_the_model_at_once_each_get_their_own_rows(tmp_path):
    """The current call's rows were one record on the model: a generate whose step ran while another thread's forward
    started and ended went on with that call's rows, then with none (the base model's output, no error)."""
    base = build_tiny("llama_gqa")
    paths = save_adapters(base, tmp_path, {"cols": SELECTIONS["cols"], "rows": SELECTIONS["rows"]})
    model = load_adapters(copy.deepcopy(base), paths)
    input_ids, mask = left_padded(2)
    names = {"generate": ["cols", "rows"], "forward": ["rows", BASE]}
    options = {"max_new_tokens": 4, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}

    def generate():
        return model.generate(input_ids=input_ids, attention_mask=mask, adapter_names=names["generate"], **options)

    def forward():
        return model(input_ids=input_ids, attention_mask=mask, adapter_names=names["forward"]).logits

    with torch.no_grad():
        expected = {"generate": generate().logits, "forward": forward()}
    paused, resume, got, calls = threading.Event(), threading.Event(), {}, []

    def pause_the_second_step(module, args):
        if threading.current_thread().name == "generate":
            calls.append(1)
            if len(calls) == 2:
                paused.set()
                resume.wait(30)

    def run(name):
        with torch.no_grad():
            got[name] = generate().logits if name == "generate" else forward()

    hook = model.model.layers[0].register_forward_pre_hook(pause_the_second_step)
    first = threading.Thread(target=run, args=("generate",), name="generate")
    first.start()
    try:
        assert paused.wait(30)
        second = threading.Thread(target=run, args=("forward",), name="forward")
        second.start()
        second.join(30)
        # generate runs in another thread: its rows' adapter stays.
        with pytest.raises(AdapterError, match="generate is running with adapter_names"):
            remove_adapter(model, "cols")
    finally:
        resume.set()
        first.join(30)
        hook.remove()
    assert len(got["generate"]) == len(expected["generate"]) == 4
    for step, logits in zip(got["generate"], expected["generate"], strict=True):
        torch.testing.assert_close(logits, step, rtol=0, atol=1e-6)
    torch.testing.assert_close(got["forward"], expected["forward"], rtol=0, atol=1e-6)
    remove_adapter(model, "cols")  # nothing runs now
    assert loaded_adapters(model) == ["rows"]


def test_mixed_adapters_onto_a_model_with_one_adapter_are_refused_naming_a_fresh_base(tmp_path):
    """The refusal said to call merge_and_unload, whose model keeps the adapter merged: "rows" then loaded onto it
    (it trains other rows/columns than "cols", so the base check passed) and every row, the base's too, was off by
    about 2.7 in the logits, silently."""
    base = build_tiny("llama_gqa")
    paths = save_adapters(base, tmp_path)
    single = s2ft.load_adapter(copy.deepcopy(base), paths["cols"])
    before = snapshot(single)
    with pytest.raises(
        AdapterError,
        match=r"plain base model the adapters were trained on: s2ft.unload\(model\) gives it back, or load a fresh",
    ) as err:
        load_adapters(single, {"rows": paths["rows"]})
    assert "call merge_and_unload" not in str(err.value)
    assert_same_state(single, before)


def test_refusals_of_the_adapter_lifecycle_are_user_errors(tmp_path):
    """They were bare ValueErrors, which run.py shows as a traceback (a bug) instead of `error: ...`."""
    base = build_tiny("llama_gqa")
    paths = save_adapters(base, tmp_path, {"cols": SELECTIONS["cols"]})
    mixed = load_adapters(copy.deepcopy(base), paths)
    single = s2ft.load_adapter(copy.deepcopy(base), paths["cols"])
    input_ids, mask = left_padded(2)
    refusals = {
        "no adapter to save": lambda: s2ft.save_adapter(base, tmp_path / "none"),
        "load onto an S2FT model": lambda: s2ft.load_adapter(single, paths["cols"]),
        "apply onto a mixed model": lambda: s2ft.apply_s2ft(mixed, s2ft.S2FTConfig(ratios={"o": 0.25})),
        "load_adapters twice": lambda: load_adapters(mixed, paths),
        "no adapters given": lambda: load_adapters(copy.deepcopy(base), {}),
        "reserved name": lambda: load_adapters(copy.deepcopy(base), {BASE: paths["cols"]}),
        "name taken": lambda: add_adapter(mixed, "cols", paths["cols"]),
        "add to a plain model": lambda: add_adapter(copy.deepcopy(base), "x", paths["cols"]),
        "remove unknown": lambda: remove_adapter(mixed, "rows"),
        "unknown row name": lambda: mixed(input_ids=input_ids, attention_mask=mask, adapter_names=["cols", "x"]),
        "beam search": lambda: mixed.generate(
            input_ids=input_ids, attention_mask=mask, adapter_names=["cols", BASE], num_beams=2, max_new_tokens=2
        ),
    }
    for case, refused in refusals.items():
        with pytest.raises(UserError):
            refused()
        assert loaded_adapters(mixed) == ["cols"], case
    # One adapter's operations on a mixed model: once "this model has no S2FT adapter; call s2ft.apply_s2ft".
    before = snapshot(mixed)
    for operation in (s2ft.merge_adapter, s2ft.merge_and_unload, lambda m: s2ft.save_adapter(m, tmp_path / "x")):
        with pytest.raises(AdapterError, match="this model serves mixed adapters"):
            operation(mixed)
    with pytest.raises(AdapterError, match="this model serves mixed adapters"):
        s2ft.switch_adapter(mixed, paths["cols"])
    assert_same_state(mixed, before)


@pytest.mark.parametrize("source", [3, None, {"path": "out/a"}], ids=["int", "None", "dict"])
def test_an_adapter_source_that_is_no_path_is_refused_naming_the_adapter_and_its_type(tmp_path, source):
    """An int, None or a dict as a mapping's value reached ``Path(source)``: a TypeError traceback from pathlib."""
    base = build_tiny("llama_gqa")
    paths = save_adapters(base, tmp_path, {"cols": SELECTIONS["cols"]})
    before = snapshot(base)
    kind = type(source).__name__
    refused = rf"^adapter 'bad' .*an adapter is a folder \(str or os.PathLike\) or an s2ft.Adapter, got {kind}: "
    with pytest.raises(AdapterError, match=refused):
        load_adapters(base, {"cols": paths["cols"], "bad": source})
    assert_same_state(base, before)
    assert not hasattr(base, "s2ft_adapters") and not any(isinstance(m, MultiAdapterLinear) for m in base.modules())
    model = load_adapters(base, paths)
    before = snapshot(model)
    with pytest.raises(AdapterError, match=refused):
        add_adapter(model, "bad", source)
    assert_same_state(model, before)
    assert loaded_adapters(model) == ["cols"]


@pytest.mark.parametrize(
    "names",
    [{"cols", "rows"}, {"cols": 0, "rows": 1}, 2, iter(["cols", "rows"]), "cr"],
    ids=["set", "dict", "int", "iterator", "str"],
)
def test_adapter_names_that_are_no_list_or_tuple_are_refused_naming_the_type(tmp_path, names):
    """A set ran its rows in arbitrary order, a dict by its keys, an iterator was used up by the check (then a
    TypeError from len), an int raised a TypeError: each would run or fail without saying what adapter_names takes."""
    base = build_tiny("llama_gqa")
    model = load_adapters(base, save_adapters(base, tmp_path, {"cols": SELECTIONS["cols"], "rows": SELECTIONS["rows"]}))
    input_ids, mask = left_padded(2)
    refused = rf"adapter_names must be a list or tuple with one adapter name per row, got {type(names).__name__}"
    with pytest.raises(AdapterError, match=refused):
        model(input_ids=input_ids, attention_mask=mask, adapter_names=names)
    with pytest.raises(AdapterError, match=refused):
        model.generate(input_ids=input_ids, attention_mask=mask, adapter_names=names, max_new_tokens=2)
    assert not model.s2ft_adapters.groups and not model.s2ft_adapters.generating
    with torch.no_grad():  # a tuple is a sequence of one name per row too
        as_list = model(input_ids=input_ids, attention_mask=mask, adapter_names=["cols", "rows"]).logits
        assert torch.equal(
            model(input_ids=input_ids, attention_mask=mask, adapter_names=("cols", "rows")).logits, as_list
        )


def test_an_adapter_is_not_removed_while_a_forward_call_runs_with_adapter_names(tmp_path):
    """Only generate was counted: a forward call with adapter_names in another thread had its adapter removed under
    it, and its rows ran the base model from that layer on, silently."""
    base = build_tiny("llama_gqa")
    paths = save_adapters(base, tmp_path, {"cols": SELECTIONS["cols"], "rows": SELECTIONS["rows"]})
    model = load_adapters(copy.deepcopy(base), paths)
    input_ids, mask = left_padded(2)
    names = ["cols", "rows"]
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=mask, adapter_names=names).logits
    paused, resume, got = threading.Event(), threading.Event(), {}

    def pause_in_the_second_layer(module, args):
        if threading.current_thread().name == "serving":
            paused.set()
            resume.wait(30)

    def serve():
        with torch.no_grad():
            got["logits"] = model(input_ids=input_ids, attention_mask=mask, adapter_names=names).logits

    hook = model.model.layers[1].register_forward_pre_hook(pause_in_the_second_layer)
    serving = threading.Thread(target=serve, name="serving")
    serving.start()
    try:
        assert paused.wait(30)
        before, configs = snapshot(model), copy.deepcopy(model.s2ft_adapters.configs)
        with pytest.raises(AdapterError, match="a forward call with adapter_names is running; remove adapter 'cols'"):
            remove_adapter(model, "cols")
        assert_same_state(model, before)
        assert model.s2ft_adapters.configs == configs and loaded_adapters(model) == ["cols", "rows"]
    finally:
        resume.set()
        serving.join(30)
        hook.remove()
    torch.testing.assert_close(got["logits"], expected, rtol=0, atol=0)
    # A call refused in its pre-hook, or one that fails inside, holds nothing once it returned.
    with pytest.raises(AdapterError, match="unknown adapter names"):
        model(input_ids=input_ids, attention_mask=mask, adapter_names=["cols", "nope"])

    def fail(module, args):
        raise RuntimeError("a layer failed")

    failing = model.model.layers[0].register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="a layer failed"):
        model(input_ids=input_ids, attention_mask=mask, adapter_names=names)
    failing.remove()
    assert model.s2ft_adapters.forwarding == 0 and not model.s2ft_adapters.groups
    remove_adapter(model, "cols")  # nothing runs now
    assert loaded_adapters(model) == ["rows"]


def test_add_adapter_changes_the_shared_state_under_the_lock_that_remove_adapter_takes(tmp_path, monkeypatch):
    """add_adapter attached without the lock: a remove_adapter of the last adapter in between deleted the hooks and
    s2ft_adapters, and the add went on into the orphaned state (MultiAdapterLinear modules, no adapter loaded); one
    removing a projection's last other adapter made it plain under the add, whose delta went with the old module."""
    base = build_tiny("llama_gqa")
    paths = save_adapters(base, tmp_path, {"cols": SELECTIONS["cols"], "rows": SELECTIONS["rows"]})
    references = merged_models(base, paths)
    model = load_adapters(copy.deepcopy(base), {"cols": paths["cols"]})
    state = model.s2ft_adapters
    inside, resume, errors = threading.Event(), threading.Event(), {}
    add = MultiAdapterLinear.add

    def held_add(self, name, positions, values):
        if threading.current_thread().name == "adding" and not inside.is_set():
            inside.set()
            resume.wait(30)
        add(self, name, positions, values)

    def run(key, action):
        try:
            action()
        except AdapterError as err:
            errors[key] = err

    monkeypatch.setattr(MultiAdapterLinear, "add", held_add)
    adding = threading.Thread(
        target=run, args=("add", lambda: add_adapter(model, "rows", paths["rows"])), name="adding"
    )
    adding.start()
    try:
        assert inside.wait(30)
        # Held inside the add's first module: the lock is taken, so neither a removal nor another add of the same
        # name (checked again under the lock) can come in between.
        assert state._lock.locked()
        removing = threading.Thread(target=run, args=("remove", lambda: remove_adapter(model, "cols")))
        again = threading.Thread(target=run, args=("again", lambda: add_adapter(model, "rows", paths["rows"])))
        removing.start()
        again.start()
    finally:
        resume.set()
    for thread in (adding, removing, again):
        thread.join(30)
        assert not thread.is_alive()
    assert set(errors) == {"again"}
    assert "an adapter named 'rows' is already loaded" in str(errors["again"])
    assert model.s2ft_adapters is state and loaded_adapters(model) == ["rows"]
    assert not any(isinstance(m, MultiAdapterLinear) and m.trains("cols") for m in model.modules())
    assert_rows_match(model, references, ["rows", BASE], *left_padded(2))


def test_an_add_whose_model_lost_its_last_adapter_while_it_was_read_is_refused_and_the_base_kept(tmp_path, monkeypatch):
    """The files are read outside the lock; a removal of the last adapter meanwhile leaves the plain base model, which
    the add must not turn back into a half mixed-adapter model (modules with deltas, no hooks, no s2ft_adapters)."""
    import s2ft.multi_adapter as multi_adapter

    base = build_tiny("llama_gqa")
    paths = save_adapters(base, tmp_path, {"cols": SELECTIONS["cols"], "rows": SELECTIONS["rows"]})
    model = load_adapters(copy.deepcopy(base), {"cols": paths["cols"]})
    inside, resume, errors = threading.Event(), threading.Event(), {}
    check_fits = multi_adapter.check_fits

    def held_check_fits(model, adapter):
        check_fits(model, adapter)
        inside.set()
        resume.wait(30)

    def adding():
        try:
            add_adapter(model, "rows", paths["rows"])
        except AdapterError as err:
            errors["add"] = err

    monkeypatch.setattr(multi_adapter, "check_fits", held_check_fits)
    thread = threading.Thread(target=adding)
    thread.start()
    try:
        assert inside.wait(30)
        remove_adapter(model, "cols")
        before = snapshot(model)
    finally:
        resume.set()
        thread.join(30)
    assert "the model's last mixed adapter was removed while adapter 'rows' was being read" in str(errors["add"])
    assert "s2ft.load_adapters(model, {'rows': path})" in str(errors["add"])
    assert_same_state(model, before)
    assert not hasattr(model, "s2ft_adapters") and "generate" not in vars(model)
    assert all(type(m) is not MultiAdapterLinear for m in model.modules())


def test_a_call_nested_in_another_leaves_the_outer_call_its_rows(tmp_path):
    """One record of the current call's rows per thread: a call made inside another (a layer hook that runs the model)
    cleared it when it returned, and the outer call's later layers ran the base model for every row, silently."""
    base = build_tiny("llama_gqa")
    paths = save_adapters(base, tmp_path, {"cols": SELECTIONS["cols"], "rows": SELECTIONS["rows"]})
    model = load_adapters(copy.deepcopy(base), paths)
    input_ids, mask = left_padded(2)
    outer, inner = ["cols", "rows"], ["rows", BASE]
    with torch.no_grad():
        expected_outer = model(input_ids=input_ids, attention_mask=mask, adapter_names=outer).logits
        expected_inner = model(input_ids=input_ids, attention_mask=mask, adapter_names=inner).logits
    nested = []

    def run_the_model_inside(module, args):
        if not nested:  # once: the inner call passes through this hook too
            nested.append(None)
            nested[0] = model(input_ids=input_ids, attention_mask=mask, adapter_names=inner).logits

    hook = model.model.layers[1].register_forward_pre_hook(run_the_model_inside)
    try:
        with torch.no_grad():
            got = model(input_ids=input_ids, attention_mask=mask, adapter_names=outer).logits
    finally:
        hook.remove()
    torch.testing.assert_close(nested[0], expected_inner, rtol=0, atol=0)
    torch.testing.assert_close(got, expected_outer, rtol=0, atol=0)
    assert model.s2ft_adapters.forwarding == 0 and model.s2ft_adapters.groups == []
    remove_adapter(model, "cols")  # no call counted is left open
    assert loaded_adapters(model) == ["rows"]
