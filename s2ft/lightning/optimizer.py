"""AdamW with fp32 master weights: no update is lost to the rounding of bf16 (or fp16) trainable parameters.

A bf16 weight has 8 significant bits: an AdamW step of relative size below ~2^-9 (lr 1e-5 on a weight of 0.01 is
1e-3 relative, but on most entries of a 7B model, with Adam's ~lr-sized steps, far less) rounds back to the same
bf16 value, so the update is lost and training stalls. Adapter methods avoid this by keeping their trainable tensors
in fp32 (`s2ft.methods.prepare_model`); full fine-tuning of a bf16 model keeps the model's weights and gradients in
bf16 (they are what forward and backward use) and gives every low-precision parameter an fp32 master copy in the
optimizer state: each step updates the master in fp32 with torch's own AdamW kernel and writes it back rounded. Memory
per trained parameter: 2 (bf16 weight) + 2 (bf16 gradient) + 4 (fp32 master) + 8 (fp32 Adam moments) = 16 bytes, the
same as fp32 training and what DeepSpeed's bf16 optimizer of the official scripts holds; see docs/paper_recipe.md.
"""

from __future__ import annotations

import torch
from torch.optim import adamw


class MasterWeightAdamW(torch.optim.Optimizer):
    """`torch.optim.AdamW` (decoupled weight decay, single-tensor kernel) whose half-precision (bf16, fp16) parameters
    train through fp32 masters. On fp32 (and fp64) parameters it is exactly `torch.optim.AdamW(..., foreach=False)`:
    the same kernel and the same state keys, so checkpoints of either load in the other.

    Args:
        params: Parameters (or parameter groups) to train.
        lr: Learning rate.
        betas: Adam's (beta1, beta2).
        eps: Adam's epsilon.
        weight_decay: Decoupled weight decay (torch's default 0.01).
    """

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2):
        betas = tuple(float(b) for b in betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Adam betas must be two numbers in [0, 1), got {betas}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    if torch.finfo(param.dtype).bits < 32:
                        state["master"] = param.detach().float()
                    master = state.get("master", param)
                    state["exp_avg"] = torch.zeros_like(master, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(master, memory_format=torch.preserve_format)
                master = state.get("master", param)
                # One parameter at a time: the fp32 copy of a gradient lives only during its own update.
                grad = param.grad if master is param else param.grad.float()
                adamw.adamw(
                    [master],
                    [grad],
                    [state["exp_avg"]],
                    [state["exp_avg_sq"]],
                    [],
                    [state["step"]],
                    foreach=False,
                    amsgrad=False,
                    beta1=beta1,
                    beta2=beta2,
                    lr=group["lr"],
                    weight_decay=group["weight_decay"],
                    eps=group["eps"],
                    maximize=False,
                )
                if master is not param:
                    param.copy_(master)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """As `torch.optim.Optimizer.load_state_dict`, but the state keeps its fp32 dtype (torch would cast the masters
        and moments of a bf16 parameter to bf16, losing exactly what they are for)."""
        saved = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        # The saved groups name their parameters by index (torch) or by name (torch.distributed.checkpoint under FSDP).
        saved_ids = [key for group in state_dict["param_groups"] for key in group["params"]]
        params = dict(zip(saved_ids, (param for group in self.param_groups for param in group["params"]), strict=True))
        for key, entry in saved.items():
            param = params[key]
            self.state[param] = {
                key: value.to(param.device) if key != "step" and torch.is_tensor(value) else value
                for key, value in entry.items()
            }
