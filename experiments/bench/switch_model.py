"""Switching adapters on a whole model: `s2ft.switch_adapter` against PEFT LoRA's unmerge, set_adapter, merge.

The two S2FT adapters select different random units (seeds 0 and 1) of the same budget, and their values are the
base values plus noise, as training would leave them: a switch costs the same whatever the values are. The two LoRA
adapters have the rank whose parameter count is nearest to that budget (the S2FT budget is set to it exactly) and
random A and B (so their deltas are not zero). Both sides switch between adapters already in memory, merged.

Also timed: the floor of an S2FT switch, the slot writes alone (the old slots back to the base, the new values in)
on a plain copy of the model in the layout `switch_adapter` keeps (trained columns column-major); and a switch
between two adapters of the same selection (the same strategy and seed trained on other data), which
writes only the new values.
"""

import copy
import tempfile

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from experiments.bench.models import build_bench_model
from experiments.bench.switch_layer import check_nearer
from experiments.bench.timing import median_time
from s2ft import (
    S2FTConfig,
    apply_s2ft,
    load_adapter,
    load_adapter_file,
    merge_adapter,
    prepare_adapter,
    save_adapter,
    switch_adapter,
)
from s2ft.layers import S2FTLinear, read_slots, slot_major, write_slots
from s2ft.methods.peft_lora import lora_param_count, rank_for_budget


def _s2ft_adapter(base: nn.Module, target_params: int, seed: int, noise_seed: int | None = None):
    """A "trained" S2FT adapter of `base`: selected with `seed`, values perturbed (`noise_seed`, default `seed`),
    saved and read back."""
    model = apply_s2ft(copy.deepcopy(base), S2FTConfig(target_params=target_params, seed=seed))
    generator = torch.Generator().manual_seed(seed if noise_seed is None else noise_seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, S2FTLinear):
                noise = torch.randn(module.values.shape, generator=generator)
                module.values.add_(0.01 * noise.to(module.values))
    with tempfile.TemporaryDirectory() as folder:
        save_adapter(model, folder)
        return load_adapter_file(folder)


def _expected_s2ft_weights(reference: nn.Module, adapter) -> dict[str, torch.Tensor]:
    weights = {}
    for name, m in adapter.modules.items():
        weight = reference.get_submodule(name).weight.detach().clone()
        weights[name] = weight.index_copy_(m.axis, m.positions.to(weight.device), m.values.to(weight))
    return weights


def _time_switches(model: nn.Module, reference: nn.Module, adapters: list, targets: list, repeats: int, device: str):
    """Median seconds of `switch_adapter` back and forth between `targets` (of `adapters`), then checks the weights."""
    active = [0]

    def switch() -> None:
        active[0] = 1 - active[0]
        switch_adapter(model, targets[active[0]])

    seconds = median_time(switch, device, repeats)
    expected = _expected_s2ft_weights(reference, adapters[active[0]])
    for name in adapters[0].modules.keys() | adapters[1].modules.keys():
        weight = model.get_submodule(name).weight
        want = expected.get(name, reference.get_submodule(name).weight)
        assert torch.equal(weight, want), f"S2FT switch left wrong weights in {name}"
    return seconds


def _time_slot_writes(reference: nn.Module, adapters: list, repeats: int, device: str) -> float:
    """Median seconds of only the weight writes a switch between `adapters` makes, on a plain copy of the model."""
    plain = copy.deepcopy(reference)
    weights = {}
    for name, m in {n: m for a in adapters for n, m in a.modules.items()}.items():
        weight = plain.get_submodule(name).weight
        weight.data = slot_major(weight.data, m.axis)  # the layout switch_adapter keeps
        weights[name] = weight
    writes = []  # per direction: (weight, axis, positions, what to write there)
    for old, new in ((adapters[0], adapters[1]), (adapters[1], adapters[0])):
        restore = [
            (weights[n], m.axis, m.positions.to(device), read_slots(weights[n].detach(), m.axis, m.positions))
            for n, m in old.modules.items()
        ]
        write = [
            (weights[n], m.axis, m.positions.to(device), slot_major(m.values.to(weights[n]), m.axis))
            for n, m in new.modules.items()
        ]
        writes.append(restore + write)
    for name, weight in _expected_s2ft_weights(reference, adapters[0]).items():
        weights[name].data.copy_(weight)
    active = [0]

    def switch() -> None:
        for weight, axis, positions, values in writes[active[0]]:
            write_slots(weight, axis, positions, values)
        active[0] = 1 - active[0]

    seconds = median_time(switch, device, repeats)
    expected = _expected_s2ft_weights(reference, adapters[active[0]])
    for name, weight in weights.items():
        assert torch.equal(weight, expected.get(name, reference.get_submodule(name).weight)), f"slot writes in {name}"
    return seconds


def _bench_s2ft(base: nn.Module, reference: nn.Module, target_params: int, repeats: int, device: str) -> dict:
    """Median seconds of `s2ft.switch_adapter` to adapters prepared once (`prepared`), to plain `Adapter`s validated
    on every call (`checked`), between prepared adapters of one selection (`same_selection`), and of the slot writes
    alone (`floor`)."""
    adapters = [_s2ft_adapter(base, target_params, seed) for seed in (0, 1)]
    same = [_s2ft_adapter(base, target_params, 0, noise_seed) for noise_seed in (0, 1)]
    seconds = {"floor": _time_slot_writes(reference, adapters, repeats, device)}
    model = load_adapter(copy.deepcopy(base), same[0])
    merge_adapter(model)
    seconds["same_selection"] = _time_switches(
        model, reference, same, [prepare_adapter(model, a) for a in same], repeats, device
    )
    del model
    model = load_adapter(base, adapters[0])
    merge_adapter(model)
    prepared = [prepare_adapter(model, a) for a in adapters]
    seconds["prepared"] = _time_switches(model, reference, adapters, prepared, repeats, device)
    seconds["checked"] = _time_switches(model, reference, adapters, adapters, repeats, device)
    return seconds


def _bench_lora(base: nn.Module, reference: nn.Module, rank: int, targets, repeats: int, device: str) -> float:
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(targets))
    config.init_lora_weights = False  # random B as well as A: the deltas are not zero, as after training
    model = get_peft_model(base, config, adapter_name="first")
    model.add_adapter("second", config)
    model.base_model.set_adapter("first")
    model.base_model.merge_adapter()
    names = ["first", "second"]
    active = [0]

    def switch() -> None:
        model.base_model.unmerge_adapter()
        active[0] = 1 - active[0]
        model.base_model.set_adapter(names[active[0]])
        model.base_model.merge_adapter()

    seconds = median_time(switch, device, repeats)
    reference_modules = dict(reference.named_modules())
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            base_weight = reference_modules[name].weight
            with torch.no_grad():
                expected = base_weight + module.get_delta_weight(names[active[0]])
                other = base_weight + module.get_delta_weight(names[1 - active[0]])
            check_nearer(module.get_base_layer().weight, expected, other, f"LoRA switch in {name}")
    return seconds


def bench_model(name: str, dtype: str, device: str, budget: float, targets, repeats: int) -> dict:
    """Median milliseconds of one adapter switch on the whole model, S2FT against PEFT LoRA of the same budget.

    S2FT switches between adapters prepared once (`s2ft.prepare_adapter`: validated at load, as a server holds them);
    `s2ft_checked_ms` is the switch to an `Adapter` validated on every call.

    Returns:
        {"name", "lora_rank", "budget_params", "s2ft_ms", "s2ft_checked_ms", "s2ft_floor_ms", "s2ft_same_selection_ms",
        "lora_ms", "speedup", "same_selection_speedup"}.

    Raises:
        AssertionError: If a switch left wrong weights.
    """
    base = build_bench_model(name, dtype, device).eval().requires_grad_(False)
    reference = copy.deepcopy(base)
    rank = rank_for_budget(base, budget, list(targets))
    target_params = lora_param_count(base, rank, list(targets))
    lora_s = _bench_lora(copy.deepcopy(base), reference, rank, targets, repeats, device)
    s2ft_s = _bench_s2ft(base, reference, target_params, repeats, device)
    return {
        "name": name,
        "lora_rank": rank,
        "budget_params": target_params,
        "s2ft_ms": 1000 * s2ft_s["prepared"],
        "s2ft_checked_ms": 1000 * s2ft_s["checked"],
        "s2ft_floor_ms": 1000 * s2ft_s["floor"],
        "s2ft_same_selection_ms": 1000 * s2ft_s["same_selection"],
        "lora_ms": 1000 * lora_s,
        "speedup": lora_s / s2ft_s["prepared"],
        "same_selection_speedup": lora_s / s2ft_s["same_selection"],
    }
