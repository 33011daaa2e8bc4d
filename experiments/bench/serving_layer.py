"""The paper's Figure 6c as a layer micro-benchmark: one d x d linear layer, N requests, each with its own adapter.

One token per request (a decode step). At equal trainable parameters, S2FT trains ``columns`` input columns per
adapter (``y_i += D_i x_i[idx_i]``) and LoRA has rank ``columns / 2`` (``y_i += B_i A_i x_i``). Each is computed two
ways: ``bmm``, the adapters stacked into one batched matmul (one row per adapter, so no padding), and ``loop``, rows
grouped by adapter with one small matmul per adapter (what PEFT's mixed batches and ``s2ft.load_adapters`` do).
The base layer alone is the floor.
"""

import torch

from experiments.bench.timing import median_time

VARIANTS = ("base", "s2ft_bmm", "lora_bmm", "s2ft_loop", "lora_loop")


def bench_layer_adapters(n: int, d: int, columns: int, repeats: int, device: str, dtype, seed: int = 0) -> dict:
    """Median milliseconds of one forward of N single-token requests through the layer, for every variant.

    Returns:
        ``{"adapters": n, "<variant>_ms", "lora_over_s2ft_bmm"}``.

    Raises:
        AssertionError: If the batched and the grouped forms disagree.
    """
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=generator)).to(device, dtype)

    rank = max(1, columns // 2)
    weight, x = randn(d, d, scale=d**-0.5), randn(n, d)
    index = torch.rand(n, d, generator=generator).argsort(-1)[:, :columns].sort(-1).values.to(device)
    delta = randn(n, d, columns, scale=0.01)
    lora_a, lora_b = randn(n, rank, d, scale=d**-0.5), randn(n, d, rank, scale=0.01)

    def base():
        return x @ weight.T

    def s2ft_bmm():
        return base() + torch.bmm(delta, x.gather(1, index).unsqueeze(-1)).squeeze(-1)

    def lora_bmm():
        return base() + torch.bmm(lora_b, torch.bmm(lora_a, x.unsqueeze(-1))).squeeze(-1)

    def s2ft_loop():
        out = base()
        for i in range(n):
            out[i] += delta[i] @ x[i, index[i]]
        return out

    def lora_loop():
        out = base()
        for i in range(n):
            out[i] += lora_b[i] @ (lora_a[i] @ x[i])
        return out

    variants = dict(zip(VARIANTS, (base, s2ft_bmm, lora_bmm, s2ft_loop, lora_loop), strict=True))
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    with torch.inference_mode():
        torch.testing.assert_close(s2ft_loop(), s2ft_bmm(), rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(lora_loop(), lora_bmm(), rtol=tolerance, atol=tolerance)
        times = {f"{name}_ms": 1000 * median_time(fn, device, repeats) for name, fn in variants.items()}
    result = {"adapters": n} | times
    result["lora_over_s2ft_bmm"] = result["lora_bmm_ms"] / result["s2ft_bmm_ms"]
    return result
