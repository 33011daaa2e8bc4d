"""The tiny runs tests/test_run_fsdp.py compares: 2 FSDP2 ranks of batch 2 against one process of batch 4."""

from conftest import compose_run

BATCH = 4  # the global batch: 2 per rank under FSDP
# Checkpoint selection on a validation every 4 steps.
SELECT_BEST = ["trainer.select_best=val_loss", "trainer.val_check_interval=4"]
METHODS = {
    # LoRA without dropout: the ranks' dropout masks could not match one process's. At r=32 (the paper's) its
    # tensors outweigh the checkpoint's fixed overhead per tensor (~0.4 kB), so the 1.05x size bound is meaningful.
    "s2ft": ["method=smollm/s2ft"],
    "lora": ["method=lora", "method.lr=1e-3", "method.options.lora_dropout=0.0"],
    "full": ["method=full", "method.lr=1e-4"],
}


def job_config(method: str, steps: int, *overrides: str, sharded: bool) -> dict:
    """The resolved config of a `steps`-step fp32 run of `method` on tiny_llama, within one epoch (up to 20 steps:
    80 items in batches of 4), validated and checkpointed every `steps // 2` steps."""
    # debug=smoke sets trainer.devices and trainer.strategy (it wins over trainer=...), so the keys are set here.
    trainer = ["trainer.devices=2", "trainer.strategy=fsdp", f"data.batch_size={BATCH // 2}"] if sharded else []
    trainer = trainer or [f"data.batch_size={BATCH}"]
    common = [
        "debug=smoke", "eval=none", "logger=csv", "data.limit=96", f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps // 2}", f"trainer.checkpoint_every_n_steps={steps // 2}",
        "trainer.precision=32-true",
    ]  # fmt: skip
    return compose_run(*common, *METHODS[method], *trainer, *overrides)
