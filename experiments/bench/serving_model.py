"""Serving a batch whose rows use different adapters, on a whole model: prefill, then greedy decode with a KV cache.

Every method serves the same batch (``batch`` prompts of ``prefill`` random tokens, row i with adapter i mod K) for
``decode`` steps, in one hand-written greedy loop, so prefill and each decode step are timed alike:

- ``base``: the plain base model (the floor: no adapter work at all);
- ``s2ft``: ``s2ft.load_adapters`` with K adapters, ``adapter_names`` per row;
- ``peft_lora``: PEFT LoRA with K adapters of the same parameter budget, ``adapter_names`` per row;
- ``s2ft_as_lora``: the K S2FT adapters exported with ``s2ft.export_lora`` and served by PEFT like ``peft_lora``;
- ``switching``: one S2FT model serving the rows of one adapter at a time, ``switch_adapter`` (prepared, merged)
  before each group: what a user does without mixed batches. Its step time is the sum over the groups.

The adapters' values are the base values plus noise (a serving step costs the same whatever the values are).
"""

import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import s2ft
from s2ft.adapter import base_digest
from s2ft.adapter_format import Adapter, AdapterModule
from s2ft.selection import select_units
from s2ft.state import fingerprint
from s2ft.structures import AXIS, find_structures, unit_positions

METHODS = ("base", "s2ft", "peft_lora", "s2ft_as_lora", "switching")


def random_adapter(base: nn.Module, target_params: int, seed: int) -> Adapter:
    """An S2FT adapter of ``base`` with ``target_params`` values: random units (``seed``), perturbed base values."""
    selection = select_units(base, s2ft.S2FTConfig(target_params=target_params, seed=seed))
    structures = {s.index: s for s in find_structures(base)}
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for (layer, component), units in sorted(selection.items()):
        if not len(units):
            continue
        structure, axis = structures[layer], AXIS[component]
        size, linear = structure.unit_size(component), structure.linear(component)
        positions = unit_positions(units, size)
        values = linear.weight.detach().index_select(axis, positions.to(linear.weight.device)).cpu().float()
        values += 0.01 * values.abs().mean() * torch.randn(values.shape, generator=generator)
        shape = (linear.out_features, linear.in_features)
        modules[structure.module_name(component)] = AdapterModule(layer, component, axis, size, shape, units, values)
    # With the base's digest, as a saved adapter has it: the loads it is timed through check the base, not warn.
    digest = base_digest(base, modules)
    return Adapter(
        modules, base_model=getattr(base, "name_or_path", None), fingerprint=fingerprint(base), base_digest=digest
    )


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def greedy(model, input_ids: torch.Tensor, steps: int, device: str, **kwargs) -> tuple[float, list, torch.Tensor]:
    """Prefill seconds, seconds of each decode step, and the prefill's last-position logits (for exactness checks)."""
    with torch.inference_mode():
        _sync(device)
        start = time.perf_counter()
        out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **kwargs)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        prefill_s, last_logits = time.perf_counter() - start, out.logits[:, -1].float().cpu()
        cache, step_s = out.cache, []
        for _ in range(steps):
            start = time.perf_counter()
            out = model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1, **kwargs)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            cache = out.cache
            _sync(device)
            step_s.append(time.perf_counter() - start)
    return prefill_s, step_s, last_logits


def _lora_model(base: nn.Module, names: list[str], rank: int, targets) -> nn.Module:
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(targets))
    config.init_lora_weights = False  # random B as well as A: the deltas are not zero, as after training
    model = get_peft_model(copy.deepcopy(base), config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    return model.eval()


def _exported_model(base: nn.Module, folders: list[Path], names: list[str]) -> nn.Module:
    model = PeftModel.from_pretrained(copy.deepcopy(base), folders[0], adapter_name=names[0])
    for folder, name in zip(folders[1:], names[1:], strict=True):
        model.load_adapter(folder, adapter_name=name)
    return model.eval()


def _switching(model, prepared: list, input_ids: torch.Tensor, steps: int, device: str) -> tuple[float, list[float]]:
    """One adapter at a time: switch, then prefill and decode its rows; step times summed over the groups."""
    prefill_s, step_s = 0.0, [0.0] * steps
    for k, adapter in enumerate(prepared):
        _sync(device)
        start = time.perf_counter()
        s2ft.switch_adapter(model, adapter)
        _sync(device)
        prefill_s += time.perf_counter() - start
        rows = input_ids[k :: len(prepared)]
        group_prefill, group_steps, _ = greedy(model, rows, steps, device)
        prefill_s += group_prefill
        step_s = [total + s for total, s in zip(step_s, group_steps, strict=True)]
    return prefill_s, step_s


def bench_adapters(
    base: nn.Module,
    adapters: list[Adapter],
    input_ids: torch.Tensor,
    steps: int,
    lora_rank: int,
    targets,
    rounds: int,
    device: str,
    folder: Path,
) -> dict:
    """Times every method with ``len(adapters)`` distinct adapters in the batch.

    Returns:
        Per method: ``{"prefill_s", "step_s"}`` (medians over rounds / over every decode step of every round), plus
        ``s2ft_vs_export_max_abs`` (largest prefill-logit difference between S2FT's mixed batch and its LoRA export)
        and ``s2ft_vs_base_max_abs`` (the same against the base model: the adapters change the outputs).
    """
    k = len(adapters)
    names = [f"a{i}" for i in range(k)]
    row_names = [names[i % k] for i in range(input_ids.shape[0])]
    folders = []
    for name, adapter in zip(names, adapters, strict=True):
        folders.append(folder / f"k{k}_{name}")
        s2ft.export_lora(adapter, folders[-1], base)
    models = {
        "base": base,
        "s2ft": s2ft.load_adapters(copy.deepcopy(base), dict(zip(names, adapters, strict=True))),
        "peft_lora": _lora_model(base, names, lora_rank, targets),
        "s2ft_as_lora": _exported_model(base, folders, names),
    }
    switching = s2ft.load_adapter(copy.deepcopy(base), adapters[0])
    s2ft.merge_adapter(switching)
    prepared = [s2ft.prepare_adapter(switching, adapter) for adapter in adapters]
    times = {method: {"prefill": [], "steps": []} for method in METHODS}
    logits = {}
    for _ in range(rounds):
        for method in METHODS:
            if method == "switching":
                prefill_s, step_s = _switching(switching, prepared, input_ids, steps, device)
            else:
                kwargs = {} if method == "base" else {"adapter_names": row_names}
                prefill_s, step_s, logits[method] = greedy(models[method], input_ids, steps, device, **kwargs)
            times[method]["prefill"].append(prefill_s)
            times[method]["steps"] += step_s
    result = {
        method: {"prefill_s": statistics.median(t["prefill"]), "step_s": statistics.median(t["steps"])}
        for method, t in times.items()
    }
    result["s2ft_vs_export_max_abs"] = float((logits["s2ft"] - logits["s2ft_as_lora"]).abs().max())
    result["s2ft_vs_base_max_abs"] = float((logits["s2ft"] - logits["base"]).abs().max())
    return result


def bench_serving(
    base: nn.Module,
    adapter_counts: list[int],
    batch: int,
    prefill: int,
    decode: int,
    target_params: int,
    lora_rank: int,
    targets,
    rounds: int,
    device: str,
    seed: int = 0,
) -> tuple[list[dict], list[dict], dict]:
    """Decode and prefill throughput of every method for each number of distinct adapters in the batch.

    Returns:
        ``decode`` and ``prefill`` rows ``{"adapters", "<method>_tok_s"}`` (generated tokens per second in decode,
        prompt tokens per second in prefill, the switching method's switches included), and per adapter count the
        largest prefill-logit differences of S2FT's mixed batch from its LoRA export and from the base model.
    """
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(base.config.vocab_size, (batch, prefill), generator=generator).to(device)
    adapters = [random_adapter(base, target_params, seed + i) for i in range(max(adapter_counts))]
    decode_rows, prefill_rows, differences = [], [], {}
    with tempfile.TemporaryDirectory() as folder:
        for k in adapter_counts:
            result = bench_adapters(
                base, adapters[:k], input_ids, decode, lora_rank, targets, rounds, device, Path(folder)
            )
            differences[str(k)] = {
                "s2ft_vs_export": result.pop("s2ft_vs_export_max_abs"),
                "s2ft_vs_base": result.pop("s2ft_vs_base_max_abs"),
            }
            decode_rows.append({"adapters": k} | {f"{m}_tok_s": batch / r["step_s"] for m, r in result.items()})
            prefill_rows.append(
                {"adapters": k} | {f"{m}_tok_s": batch * prefill / r["prefill_s"] for m, r in result.items()}
            )
            line = ", ".join(f"{m} {batch / r['step_s']:.0f}" for m, r in result.items())
            print(f"{k} adapters, decode tok/s: {line}", flush=True)
    return decode_rows, prefill_rows, differences
