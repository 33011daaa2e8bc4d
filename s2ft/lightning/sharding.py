"""FSDP2 for `trainer.strategy=fsdp`: one `fully_shard` unit per decoder block, checkpoints of the trained state only.

Lightning's `ModelParallelStrategy` is its FSDP2 path (`FSDPStrategy` wraps the older FSDP1). Every parameter of a
decoder block, frozen or trainable (an S2FT layer's frozen `weight` beside its trainable `values`, a LoRA factor
beside its base weight, every weight under full FT), is sharded in that block's unit; buffers (S2FT's `index` and
`base_values`) stay whole on every rank. The optimizer is built after sharding from the trainable parameters only,
so it holds the trainable shards and nothing of the frozen weights. A checkpoint gathers the trained tensors and
their optimizer state to rank 0 into one `last.ckpt` (the same keys a single-process run writes), never a frozen
weight; on resume every rank reads that file and keeps its shard.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class FSDP2Strategy(ModelParallelStrategy):
    """`ModelParallelStrategy` as plain FSDP2: all processes of all nodes form one data-parallel (sharding) group.

    The model is sharded by the LightningModule's `configure_model` (`shard_model`). Checkpoints hold only
    `module.trained_keys()` and the optimizer state, gathered on rank 0 and written by the checkpoint IO plugin.
    """

    def __init__(self, **kwargs):
        super().__init__(save_distributed_checkpoint=False, **kwargs)

    def setup_environment(self) -> None:
        # ModelParallelStrategy's "auto" sizes would make the processes of a node a tensor-parallel group.
        self._data_parallel_size, self._tensor_parallel_size = self.num_nodes * self.num_processes, 1
        super().setup_environment()

    def lightning_module_state_dict(self) -> dict[str, torch.Tensor]:
        return gather_trained(self.lightning_module, self.lightning_module.trained_keys())

    def optimizer_state(self, optimizer) -> dict:
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        reshard(self.model)
        return get_optimizer_state_dict(self.model, optimizer, options=FULL)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        # The file holds only trained tensors (small next to the model), so every rank reads it and keeps its shard.
        path = Path(self.broadcast(checkpoint_path))
        checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only)
        load_whole(self.model, checkpoint["state_dict"])
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"], strict=True):
            set_optimizer_state_dict(self.model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return checkpoint


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's decoder blocks: the modules `transformers` names as never to be split (`_no_split_modules`).

    Raises:
        ValueError: The model names none, or none of its modules is of those classes.
    """
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [module for module in model.modules() if type(module).__name__ in names]
    if not blocks:
        raise ValueError(
            f"trainer.strategy=fsdp found no decoder block to shard in {type(model).__name__} "
            f"(_no_split_modules: {sorted(names)}); FSDP needs a transformers decoder"
        )
    return blocks


def shard_model(model: nn.Module, mesh: DeviceMesh) -> int:
    """Shard `model` in place over `mesh`: one FSDP2 unit per decoder block, the rest (embeddings, head) in the root's.

    Returns:
        The number of decoder-block units (0 when the model was sharded already).
    """
    if isinstance(model, FSDPModule):
        return 0
    blocks = decoder_blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return len(blocks)


def reshard(module: nn.Module) -> None:
    """Put every FSDP2 unit of `module` in its sharded state (no communication).

    The root unit stays unsharded after a forward without backward (validation); its parameters must be the
    sharded ones the optimizer holds before they are named (optimizer state) or read.
    """
    for unit in module.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()


def gather_trained(module: nn.Module, keys: Iterable[str], everywhere: bool = False) -> dict[str, torch.Tensor]:
    """The state-dict entries `keys` of `module` as whole CPU copies, on rank 0 only (empty elsewhere) or everywhere.

    Sharded entries are gathered, so when `module` is sharded this is a collective: every rank must call it with the
    same keys. Only these tensors are gathered, never the others.
    """
    reshard(module)
    tensors = dict(module.named_parameters(remove_duplicate=False)) | dict(module.named_buffers(remove_duplicate=False))
    keep = everywhere or not dist.is_initialized() or dist.get_rank() == 0
    gathered, first_key = {}, {}
    for key in sorted(keys):
        tensor = tensors[key]
        if id(tensor) in first_key:  # tied (e.g. embeddings and head): one copy, as torch.save stores it
            if keep:
                gathered[key] = gathered[first_key[id(tensor)]]
            continue
        first_key[id(tensor)] = key
        value = tensor.detach()
        if isinstance(value, DTensor):
            value = value.full_tensor()
        if keep:
            gathered[key] = value.to("cpu", copy=True)
    return gathered


def load_whole(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load whole tensors (`gather_trained(..., everywhere=True)`) into `module`, each rank keeping its shard."""
    reshard(module)
    if any(isinstance(p, DTensor) for p in module.parameters()):
        set_model_state_dict(module, dict(state), options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        module.load_state_dict(state, strict=False)


def local_elements(optimizer: torch.optim.Optimizer) -> int:
    """Elements of the parameters `optimizer` holds on this rank (a sharded parameter counts its local shard)."""
    return sum(
        (p.to_local() if isinstance(p, DTensor) else p).numel()
        for group in optimizer.param_groups
        for p in group["params"]
    )
