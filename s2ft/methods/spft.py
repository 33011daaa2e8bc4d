"""SpFT: unstructured sparse fine-tuning of a random, seeded fraction ``p`` of the entries of each targeted linear.

Each targeted ``nn.Linear`` is wrapped in ``SpFTLinear``, which computes with ``W + scatter(index, values)``: the only
trainable tensor is ``values`` (k = round(p * numel) entries), so gradients and AdamW state cost k values, and the
sampled positions cost k int64 indices. Memory, honestly: the forward materialises the dense effective weight of each
targeted linear (kept for backward like any weight) and the backward forms the dense weight gradient transiently
before gathering the k entries, i.e. one extra dense copy per linear in activations and one transient dense gradient
per linear at a time, but no persistent dense gradient or optimizer state for frozen entries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from s2ft.adapter_format import atomic_write
from s2ft.checks import is_number
from s2ft.methods.method import Method

DEFAULTS: dict[str, Any] = {
    "p": 0.01,
    "seed": 0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
ADAPTER_FILE = "spft.safetensors"


class SpFTLinear(nn.Module):
    """A frozen ``nn.Linear`` plus trainable ``values`` added at the flat weight positions ``index``.

    Args:
        base: The layer to wrap (frozen in place, not copied).
        index: Sorted, distinct flat positions into ``base.weight``.
    """

    def __init__(self, base: nn.Linear, index: torch.Tensor):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.register_buffer("index", index.to(base.weight.device))
        self.values = nn.Parameter(base.weight.new_zeros(index.numel()))

    def effective_weight(self) -> torch.Tensor:
        """The dense weight this layer computes with (differentiable in ``values``, which may be fp32 beside a bf16
        weight: the sum is rounded to the weight's dtype, the fp32 values keep every update)."""
        weight = self.base.weight
        return weight.flatten().index_add(0, self.index, self.values.to(weight.dtype)).view_as(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.base.bias)


def option_problems(options: dict[str, Any]) -> list[str]:
    """Every problem of SpFT's ``method.options`` (merged over DEFAULTS) that shows without the model."""
    problems = []
    p = options["p"]
    if not is_number(p) or not 0 < p <= 1:
        problems.append(f"method.options.p is the trainable fraction of entries, in (0, 1]; got {p!r}")
    seed = options["seed"]
    if not isinstance(seed, int) or isinstance(seed, bool):
        problems.append(f"method.options.seed must be an int, got {seed!r}")
    return problems + module_list_problems(options["target_modules"])


def module_list_problems(targets) -> list[str]:
    """``method.options.target_modules`` must be a non-empty list of module names (LoRA's, DoRA's and SpFT's)."""
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
        return [f"method.options.target_modules must be a non-empty list of module names, got {targets!r}"]
    return []


def fit_problems(model: nn.Module, options: dict[str, Any]) -> list[str]:
    """Target modules ``model`` lacks, as `prepare` would find them."""
    try:
        targeted_linears(model, options["target_modules"])
    except ValueError as err:
        return [f"method.options.target_modules: {err}"]
    return []


def sample_index(numel: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """Sorted flat positions of round(p * numel) (at least one) distinct entries, drawn uniformly."""
    k = max(1, round(p * numel))
    return torch.randperm(numel, generator=generator)[:k].sort().values


def targeted_linears(model: nn.Module, target_modules: list[str]) -> list[tuple[str, nn.Linear]]:
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in target_modules)
    ]
    if not found:
        raise ValueError(f"spft target_modules {list(target_modules)} match no nn.Linear in the model; check the names")
    return found


def entry_count(model: nn.Module, target_modules: list[str] = DEFAULTS["target_modules"]) -> int:
    """Weight entries of the targeted linears: what SpFT's ``p`` is a fraction of (``p * entry_count`` train)."""
    return sum(linear.weight.numel() for _, linear in targeted_linears(model, target_modules))


def prepare(model: nn.Module, options: dict[str, Any], calibration, name: str = "spft") -> nn.Module:
    """Freeze ``model`` and make a seeded random fraction ``p`` of every targeted linear's entries trainable.

    Layers are visited in module order with one generator seeded by ``seed``, so the same seed and model always
    sample the same entries.
    """
    p = options["p"]
    if not isinstance(p, float | int) or not 0 < p <= 1:
        raise ValueError(f"spft option p is the trainable fraction of entries, in (0, 1]; got {p!r}")
    if isinstance(options["target_modules"], str):
        raise ValueError("spft option target_modules must be a list of module names, not a string")
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(int(options["seed"]))
    for name, linear in targeted_linears(model, options["target_modules"]):
        model.set_submodule(name, SpFTLinear(linear, sample_index(linear.weight.numel(), float(p), generator)))
    return model


def sparse_deltas(model: nn.Module) -> dict[str, SpFTLinear]:
    """Module name -> its SpFT layer."""
    return {name: module for name, module in model.named_modules() if isinstance(module, SpFTLinear)}


def save(model: nn.Module, out_dir: Path) -> None:
    """Write ``spft.safetensors``: per linear, ``NAME.index`` (flat positions) and ``NAME.values`` (trained deltas)."""
    deltas = sparse_deltas(model)
    if not deltas:
        raise ValueError("the model has no SpFT layers: prepare it with method spft before saving")
    tensors = {}
    for name, delta in deltas.items():
        tensors[f"{name}.index"] = delta.index.detach().cpu().contiguous()
        tensors[f"{name}.values"] = delta.values.detach().cpu().contiguous()
    atomic_write(out_dir / ADAPTER_FILE, lambda tmp: save_file(tensors, tmp))


def load(model: nn.Module, path: Path) -> nn.Module:
    """Parametrize ``model``'s linears with the saved indices and values (frozen: for evaluation)."""
    file = path / ADAPTER_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no {ADAPTER_FILE} in {path}: pass a folder written by save_trained(model, 'spft')")
    tensors = load_file(file)
    model.requires_grad_(False)
    for key in [k for k in tensors if k.endswith(".index")]:
        name = key.removesuffix(".index")
        linear = model.get_submodule(name) if _has_module(model, name) else None
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{file} has values for {name!r}, which is not an nn.Linear of the model")
        layer = SpFTLinear(linear, tensors[key])
        with torch.no_grad():
            layer.values.copy_(tensors[f"{name}.values"])
        model.set_submodule(name, layer.requires_grad_(False))
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold the sparse deltas into the wrapped linears and unwrap them (a standard transformers model again)."""
    for name, layer in sparse_deltas(model).items():
        with torch.no_grad():
            layer.base.weight.copy_(layer.effective_weight())
        model.set_submodule(name, layer.base)
    return model


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


METHOD = Method(
    "spft", DEFAULTS, prepare, save, load, merge, option_problems=option_problems, fit_problems=fit_problems
)
