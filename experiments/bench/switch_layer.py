"""Switching adapters on one d x d linear layer: S2FT row copies against LoRA's low-rank unmerge + merge.

Both sides are the bare tensor operations a server would run (library overheads are measured on the whole model in
`bench_switch_model.py`). S2FT: write the base rows back over the old adapter's rows, then the new adapter's rows
(both exact copies). LoRA: subtract the old adapter's B @ A, add the new one's (two rank-r matmuls over all of W).
"""

import torch

from experiments.bench.timing import median_time


def check_nearer(weight: torch.Tensor, expected: torch.Tensor, other: torch.Tensor, what: str) -> None:
    """Asserts that `weight` is `expected` up to rounding: far nearer to it than to `other`, the other adapter's.

    Every unmerge + merge rounds the whole of W once more, so repeated LoRA switches drift by a few ulps per switch
    (much more in bf16 than in fp32); the allowed drift is a small fraction of the distance between the adapters.
    """
    tolerance = 1e-3 if weight.dtype == torch.float32 else 0.3
    drift = (weight.float() - expected.float()).norm() / (other.float() - expected.float()).norm()
    assert drift <= tolerance, f"{what} produced wrong weights (drift {drift:.2e} of the adapters' distance)"


def _row_adapter(d: int, rows: int, generator: torch.Generator, device: str, dtype: torch.dtype) -> tuple:
    index = torch.randperm(d, generator=generator)[:rows].sort().values.to(device)
    values = torch.randn(rows, d, generator=generator).to(device, dtype)
    return index, values


def _lora_adapter(d: int, rank: int, generator: torch.Generator, device: str, dtype: torch.dtype) -> tuple:
    b = (0.1 * torch.randn(d, rank, generator=generator)).to(device, dtype)
    a = (0.1 * torch.randn(rank, d, generator=generator)).to(device, dtype)
    return b, a


def bench_layer(d: int, rows: int, rank: int, repeats: int, device: str, dtype: torch.dtype, seed: int = 0) -> dict:
    """Median milliseconds of one adapter switch on a d x d weight, for S2FT (`rows` rows) and LoRA (rank `rank`).

    Switches alternate between two adapters; after the timed switches the weight is checked against the one
    expected for the adapter last switched to (exactly for S2FT, to fp tolerance for LoRA).

    Returns:
        {"d", "s2ft_ms", "lora_ms", "speedup"}.

    Raises:
        AssertionError: If a switch left wrong weights.
    """
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(d, d, generator=generator).to(device, dtype)
    result = {"d": d}

    adapters = [_row_adapter(d, rows, generator, device, dtype) for _ in range(2)]
    base_rows = [base.index_select(0, index) for index, _ in adapters]  # part of the base model, stored once
    weight = base.clone()
    weight.index_copy_(0, *adapters[0])
    active = [0]

    def s2ft_switch() -> None:
        old, new = active[0], 1 - active[0]
        weight.index_copy_(0, adapters[old][0], base_rows[old])
        weight.index_copy_(0, *adapters[new])
        active[0] = new

    result["s2ft_ms"] = 1000 * median_time(s2ft_switch, device, repeats)
    expected = base.clone()
    expected.index_copy_(0, *adapters[active[0]])
    assert torch.equal(weight, expected), f"S2FT switch at d={d} produced wrong weights"
    del weight, expected

    scaling = 2.0  # lora_alpha / r with PEFT's usual alpha = 2r
    factors = [_lora_adapter(d, rank, generator, device, dtype) for _ in range(2)]
    weight = base.clone()
    weight.addmm_(*factors[0], alpha=scaling)
    active = [0]

    def lora_switch() -> None:
        old, new = active[0], 1 - active[0]
        weight.addmm_(*factors[old], alpha=-scaling)
        weight.addmm_(*factors[new], alpha=scaling)
        active[0] = new

    result["lora_ms"] = 1000 * median_time(lora_switch, device, repeats)
    expected = torch.addmm(base, *factors[active[0]], alpha=scaling)
    other = torch.addmm(base, *factors[1 - active[0]], alpha=scaling)
    check_nearer(weight, expected, other, f"LoRA switch at d={d}")
    result["speedup"] = result["lora_ms"] / result["s2ft_ms"]
    return result
