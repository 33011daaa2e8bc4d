"""The LightningModule: a causal LM with a fine-tuning method applied, trained with AdamW over its trainable params."""

from __future__ import annotations

import math
import time

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric

from s2ft.data.tokenize import IGNORE_INDEX
from s2ft.lightning.optimizer import MasterWeightAdamW
from s2ft.lightning.sharding import FSDP2Strategy, shard_model
from s2ft.memory import peak_memory_mb


class FineTuneModule(L.LightningModule):
    """Trains the parameters a method left trainable; checkpoints hold only those (and the optimizer state).

    Trainable tensors keep the dtype the method gave them (fp32 for adapters, whatever the model's dtype) through
    Lightning's precision plugins, and low-precision ones (full fine-tuning of a bf16 model) train through fp32 master
    weights (`MasterWeightAdamW`), so no update is lost to bf16 rounding.

    Args:
        model: The prepared causal LM (`s2ft.methods.prepare_model`); frozen parameters get no optimizer state.
        lr: Peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up from 0 to `lr`, in optimizer steps.
        scheduler: "linear" or "cosine" decay to 0 at the last step.
        betas: AdamW's (beta1, beta2); the official S2FT scripts train with (0.9, 0.95).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        scheduler: str = "linear",
        betas: tuple[float, float] = (0.9, 0.999),
    ):
        super().__init__()
        if scheduler not in ("linear", "cosine"):
            raise ValueError(f"scheduler must be 'linear' or 'cosine', got {scheduler!r}")
        # from_pretrained returns models in eval mode and Lightning keeps the mode it finds; dropout must train.
        self.model = model.train()
        self.lr, self.weight_decay, self.warmup_steps, self.scheduler = lr, weight_decay, warmup_steps, scheduler
        self.betas = tuple(betas)
        # A true-half precision plugin (bf16-true) casts the whole module, fp32 trainable tensors included, after the
        # model is built and a checkpoint's weights are loaded; configure_optimizers undoes that for trained tensors.
        self._trained_dtypes = {name: p.dtype for name, p in self.named_parameters() if p.requires_grad}
        self._resumed_state: dict[str, torch.Tensor] = {}
        # Checkpoints omit the frozen weights, which the run rebuilds from its config.
        self.strict_loading = False
        self.tokens_seen = 0
        self.last_loss: float | None = None
        self.loss_curve: list[tuple[int, float]] = []
        self.val_curve: list[tuple[int, float]] = []
        self.val_loss = MeanMetric()
        # Tokens per second of each training batch: their median is a run's pace, which other jobs on the machine
        # or a stall (checkpointing, validation) barely move, unlike its wall time.
        self.pace: list[float] = []
        self._batch_start = 0.0
        # Training seconds of earlier sessions of a resumed run (up to their last checkpoint) plus this session's.
        self._wall_before = 0.0
        self._fit_start: float | None = None
        self.wall_s = 0.0
        # The peak memory of earlier sessions: a session resumed near the end never reaches the training peak itself.
        self.peak_mem_before = 0.0

    def trained_keys(self) -> set[str]:
        """State-dict keys of what training changes: trainable params and the buffers of modules that own them."""
        keys = {name for name, p in self.named_parameters(remove_duplicate=False) if p.requires_grad}
        for prefix, module in self.named_modules(remove_duplicate=False):
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                persistent = set(module._buffers) - module._non_persistent_buffers_set
                keys |= {f"{prefix}.{name}" for name in persistent}
        return keys

    def configure_model(self) -> None:
        # trainer.strategy=fsdp: one FSDP2 unit per decoder block, before the optimizer is built from the shards.
        if isinstance(self.trainer.strategy, FSDP2Strategy):
            shard_model(self.model, self.device_mesh["data_parallel"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, global_loss = self._train_loss(batch)
        tokens = int(batch["attention_mask"].sum())
        self.tokens_seen += tokens
        # Kept here: the loss Lightning hands to on_train_batch_end is divided by accumulate_grad_batches.
        self.last_loss = float(global_loss)
        self.log("train/loss", global_loss, prog_bar=True)
        self.log("train/tokens", float(self.tokens_seen))
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss * self._window_scale(batch_idx)

    def _window_scale(self, batch_idx: int) -> float:
        """Lightning divides each micro-batch's loss by accumulate_grad_batches, also in an epoch's last window when
        it holds fewer batches; scaled back here, every optimizer step takes the mean gradient of its batches."""
        accumulate, batches = self.trainer.accumulate_grad_batches, self.trainer.num_training_batches
        tail = batches % accumulate if math.isfinite(batches) else 0
        return accumulate / tail if tail and batch_idx >= batches - tail else 1.0

    def _train_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss to back-propagate and the loss of the whole global batch (what a single process would log).

        Data-parallel ranks average their gradients, so each rank's loss is its sum of token losses over the tokens
        of all ranks, times the world size: the mean of those gradients is the gradient of the global batch's
        token-mean loss, whatever the number of tokens on each rank.
        """
        world = self.trainer.world_size
        if world == 1:
            loss = self.model(**batch).loss
            return loss, loss.detach()
        strategy = self.trainer.strategy
        tokens = (batch["labels"][..., 1:] != -100).sum()
        total = strategy.reduce(tokens.float(), reduce_op="sum")
        loss = self.model(**batch, num_items_in_batch=total).loss
        return loss * world, strategy.reduce(loss.detach(), reduce_op="sum")

    def on_fit_start(self) -> None:
        self._fit_start = time.perf_counter()

    def on_fit_end(self) -> None:
        self.wall_s = self._elapsed()

    def _elapsed(self) -> float:
        running = time.perf_counter() - self._fit_start if self._fit_start is not None else 0.0
        return self._wall_before + running

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._batch_start = time.perf_counter()

    def record_batch(self, batch: dict[str, torch.Tensor]) -> None:
        """Record a finished training batch: its pace, memory and, once the optimizer stepped, the loss curve.

        Called by the `RecordBatch` callback, first of the batch-end hooks, so a checkpoint saved at that batch's end
        includes it (Lightning runs the callbacks' hooks before the module's own `on_train_batch_end`).
        """
        elapsed = max(time.perf_counter() - self._batch_start, 1e-9)
        self.pace.append(float(batch["attention_mask"].sum()) / elapsed)
        self.log("train/tokens_per_s", self.pace[-1])
        self.log("train/peak_mem_mb", self.peak_mem_mb())
        if self.trainer.fit_loop.epoch_loop._should_accumulate():
            return
        self.loss_curve.append((self.trainer.global_step, self.last_loss))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        # The model's loss is the mean over the batch's label tokens; weighted by their count, val/loss is the mean
        # over every validation token, as the held-out losses are. Weighted by items it moved with the batch size.
        self.val_loss.update(loss.detach().float(), weight=(batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        self.log("val/loss", self.val_loss, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def on_validation_epoch_end(self) -> None:
        value = self.trainer.callback_metrics.get("val/loss")
        if value is not None and not self.trainer.sanity_checking:
            self.val_curve.append((self.trainer.global_step, float(value)))

    def configure_optimizers(self):
        self._restore_trained_dtypes()
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters; check method.name and method.options")
        optimizer = MasterWeightAdamW(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(self.warmup_steps, total, self.scheduler))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _restore_trained_dtypes(self) -> None:
        """Gives trainable tensors back the dtype they were prepared in (and a resumed checkpoint's exact values)."""
        for name, param in self.named_parameters():
            dtype = self._trained_dtypes.get(name)
            if dtype is not None and param.dtype != dtype:
                param.data = param.data.to(dtype)
        if self._resumed_state:
            self.load_state_dict(self._resumed_state, strict=False)
            self._resumed_state = {}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keys = self.trained_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keys}
        checkpoint["s2ft"] = {
            "tokens_seen": self.tokens_seen,
            # Each rank counts its own batches' tokens and rank 0 writes the checkpoint: every rank's count is kept.
            "tokens_seen_per_rank": self._tokens_per_rank(),
            "device_type": self.device.type,  # cpu, cuda, mps: a resume continues on the same kind (check_same_world)
            "last_loss": self.last_loss,
            "loss_curve": self.loss_curve,
            "val_curve": self.val_curve,
            "pace": self.pace,
            "wall_s": self._elapsed(),
            "peak_mem_mb": self.peak_mem_mb(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        missing = sorted(self.trained_keys() - set(checkpoint["state_dict"]))
        if missing:
            raise RuntimeError(
                f"the checkpoint lacks {len(missing)} trained tensors (e.g. {missing[:3]}): it was written by a run "
                "with another method or selection; resume with the same config or start a new run directory"
            )
        keys = self.trained_keys()
        self._resumed_state = {k: v for k, v in checkpoint["state_dict"].items() if k in keys}
        self._adopt_legacy_data_position(checkpoint)
        state = checkpoint.get("s2ft", {})
        per_rank = state.get("tokens_seen_per_rank")
        self.tokens_seen = per_rank[self.global_rank] if per_rank else state.get("tokens_seen", 0)
        self.last_loss = state.get("last_loss")
        self.loss_curve = [tuple(point) for point in state.get("loss_curve", [])]
        self.val_curve = [tuple(point) for point in state.get("val_curve", [])]
        self.pace = list(state.get("pace", []))
        self._wall_before = state.get("wall_s", 0.0)
        self.peak_mem_before = state.get("peak_mem_mb", 0.0)

    def _tokens_per_rank(self) -> list[int]:
        if self.trainer.world_size == 1:
            return [self.tokens_seen]
        counts = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(counts, self.tokens_seen)  # every rank saves (`LastCheckpoint`)
        return counts

    def _adopt_legacy_data_position(self, checkpoint: dict) -> None:
        """Checkpoints written before the data module held the sampler's position kept it as the dataloader's state;
        Lightning would fail to load that into today's plain dataloader, so the data module takes it over."""
        loop_state = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
        legacy = loop_state.pop("combined_loader", None)
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if legacy and datamodule is not None and type(datamodule).__qualname__ not in checkpoint:
            datamodule.load_state_dict(legacy[0])

    def peak_mem_mb(self) -> float:
        """Peak memory of the training so far, over this session and the sessions it resumed."""
        return max(self.peak_mem_before, peak_memory_mb())


def lr_lambda(warmup_steps: int, total_steps: int, scheduler: str):
    """Multiplier of the peak lr at each optimizer step: linear warm-up, then linear or cosine decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return 1.0 - progress if scheduler == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
