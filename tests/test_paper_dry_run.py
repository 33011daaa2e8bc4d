"""Paper dry runs: every paper-scale experiment's whole config through `run_experiment` (run.py's code path), with
only the model replaced by a tiny bf16 one of the same family and attention layout, on CPU.

Also replaced, because nothing here reaches the hub or a GPU: the training set by a local one of the same kind (a
small `data.limit`), `trainer.accelerator` by cpu, the evaluation by none (its settings are checked on the config),
and an absolute S2FT budget (component_ablation's count) by the same fraction of the tiny model. Precision plugin,
dtype, epochs, batch size, accumulation, scheduler, warm-up, betas, validation and checkpoint selection are the
config's own; `debug=smoke` is not used, so it hides nothing.
"""

import hashlib
import itertools
import math

import lightning as L
import pytest
import torch
from conftest import compose_run
from test_experiment_configs import PAPER
from test_paper_budgets import PAPER_PCT

from s2ft.lightning import runner
from s2ft.lightning.callbacks import KeepBest, LastCheckpoint
from s2ft.lightning.module import lr_lambda
from s2ft.methods import method_options
from s2ft.methods.s2ft import planned_params
from s2ft.models import DTYPES, PAPER_SHAPES, shape_model, tiny_model, tiny_tokenizer

# Local sets of the same kind as the hub ones, with short items (byte-level tokens: BoolQ's passages would be slow).
COMMONSENSE = ["arc_easy", "arc_challenge", "openbookqa"]
LOCAL_TRAIN = {"commonsense_170k": COMMONSENSE, "math_10k": ["gsm8k"], "alpaca_gpt4": COMMONSENSE}
TRAIN_ITEMS = 72  # 4 full batches of 16 (a tail of 8 left out, another in each epoch): one step per epoch at 4 x 16
FAST = ["instruct_mistral"]  # one epoch; the three-epoch runs take ~30 s each on a quiet 2-core machine (slow)


def tiny_like(name: str, dtype: torch.dtype) -> torch.nn.Module:
    """A tiny random model of the paper model's family and attention layout: its GQA ratio, untied embeddings."""
    family, shape = PAPER_SHAPES[name]
    group = shape["num_attention_heads"] // shape["num_key_value_heads"]
    # 20 query heads: the paper's 5.2% of heads is one head per layer, as at full size it is one or two.
    return tiny_model(
        family,
        len(tiny_tokenizer()),
        num_attention_heads=20,
        num_key_value_heads=20 // group,
        head_dim=4,
        hidden_size=80,
        intermediate_size=128,
        max_position_embeddings=2048,
        tie_word_embeddings=shape.get("tie_word_embeddings", False),
    ).to(dtype)


class Probe(L.Callback):
    """Records what the assertions need: batches per epoch, the lr of every step, dtypes and the first update."""

    def __init__(self):
        self.batches, self.lrs, self.first = [], [], None
        self.changed: float | None = None

    def on_train_start(self, trainer, pl_module):
        self.trainable = {n: p.dtype for n, p in pl_module.named_parameters() if p.requires_grad}
        self.frozen = {n: p.dtype for n, p in pl_module.named_parameters() if not p.requires_grad}
        self.batches_per_epoch = len(trainer.train_dataloader)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        rows = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 0)
        self.batches.append((trainer.current_epoch, hashlib.sha256(rows.numpy().tobytes()).hexdigest()))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])
        if self.first is None:  # the fp32 state each parameter trains (its master, for a bf16 one) before step 1
            self.first = [
                (p, optimizer.state[p].get("master", p).detach().float().clone(), p.grad != 0)
                for group in optimizer.param_groups
                for p in group["params"]
            ]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.changed is None and trainer.global_step == 1:
            state = trainer.optimizers[0].state
            moved = sum(int((state[p].get("master", p).detach() != b)[g].sum()) for p, b, g in self.first)
            self.changed = moved / sum(int(g.sum()) for _, _, g in self.first)
            self.state_dtypes = {v.dtype for s in state.values() for k, v in s.items() if k != "step"}
            self.betas = trainer.optimizers[0].param_groups[0]["betas"]


def dry_run(experiment: str, tmp_path, monkeypatch, *overrides: str) -> tuple[dict, dict, Probe, L.Trainer]:
    cfg = compose_run(f"+experiment={experiment}", *overrides)
    real = dict(cfg)
    cfg["data"] = {
        **cfg["data"],
        "train": [s for source in cfg["data"]["train"] for s in LOCAL_TRAIN.get(source, [source])],
        "limit": TRAIN_ITEMS + (cfg["data"].get("val_size") or 0),
        "overlap_tasks": [],
    }
    cfg["eval"] = {**cfg["eval"], "tasks": [], "heldout": [], "before": False, "mtbench": None}
    cfg["trainer"] = {**cfg["trainer"], "accelerator": "cpu", "devices": 1}
    cfg["logger"] = {**cfg["logger"], "name": "none"}
    dtype = DTYPES[cfg["model"]["dtype"]]
    target = cfg["method"]["options"].get("target_params")
    if isinstance(target, int):  # an absolute budget (component_ablation's) scales with the model it is set for
        name = cfg["model"]["name"]
        scaled = max(1, round(target * tiny_like(name, dtype).num_parameters() / shape_model(name).num_parameters()))
        cfg["method"] = {**cfg["method"], "options": {**cfg["method"]["options"], "target_params": scaled}}

    def build(model_cfg, cache_dir):
        model = tiny_like(model_cfg["name"], dtype)
        if model_cfg.get("gradient_checkpointing"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        return model, tiny_tokenizer()

    probe, built = Probe(), {}
    make_trainer = runner._trainer

    def trainer_with_probe(*args, **kwargs):
        built["trainer"] = make_trainer(*args, **kwargs)
        built["trainer"].callbacks.append(probe)
        return built["trainer"]

    monkeypatch.setattr(runner, "build_run_model", build)
    monkeypatch.setattr(runner, "_trainer", trainer_with_probe)
    summary = runner.run_experiment(cfg, tmp_path / experiment)
    return real, summary, probe, built["trainer"]


def check(experiment: str, real: dict, summary: dict, probe: Probe, trainer: L.Trainer) -> None:
    tr, method = real["trainer"], real["method"]
    # Precision and dtypes: the config's plugin; frozen weights bf16, trainable tensors and optimizer state fp32.
    assert trainer.precision == tr["precision"] == "bf16-mixed" and real["model"]["dtype"] == "bfloat16"
    assert set(probe.frozen.values()) <= {torch.bfloat16}
    want = torch.bfloat16 if method["name"] == "full" else torch.float32  # full FT: fp32 masters in the optimizer
    assert set(probe.trainable.values()) == {want}
    assert probe.state_dtypes == {torch.float32}
    assert probe.betas == (0.9, 0.95)
    # No update lost: at the first step's lr (the warm-up's smallest), every entry with a gradient moved in fp32.
    assert probe.changed >= 0.99, probe.changed
    # Steps: every epoch trains all its batches, in its own order.
    epochs, accumulate = tr["max_epochs"], tr["accumulate_grad_batches"]
    assert probe.batches_per_epoch == TRAIN_ITEMS // real["data"]["batch_size"]
    steps_per_epoch = math.ceil(probe.batches_per_epoch / accumulate)
    assert summary["train"]["steps"] == epochs * steps_per_epoch == trainer.estimated_stepping_batches
    assert [e for e, _ in probe.batches] == [e for e in range(epochs) for _ in range(probe.batches_per_epoch)]
    orders = [[h for e, h in probe.batches if e == epoch] for epoch in range(epochs)]
    assert all(len(set(order)) == len(order) for order in orders)
    assert len({tuple(order) for order in orders}) == epochs
    # The lr schedule's shape: linear warm-up over warmup_steps, or (no warm-up) the cosine/linear decay to 0.
    total, peak, warmup = summary["train"]["steps"], method["lr"], tr["warmup_steps"]
    assert probe.lrs == pytest.approx([peak * lr_lambda(warmup, total, tr["scheduler"])(s) for s in range(total)])
    if warmup >= total:
        assert probe.lrs == pytest.approx([peak * (s + 1) / (warmup + 1) for s in range(total)])
    else:
        assert probe.lrs[0] == pytest.approx(peak) and all(a > b for a, b in itertools.pairwise(probe.lrs))
    # Validation and checkpoint selection where the config puts them.
    keep = [c for c in trainer.callbacks if isinstance(c, KeepBest)]
    if tr.get("select_best") == "val_loss":
        assert trainer.val_check_batch == tr["val_check_interval"] == 320  # 80 optimizer steps x 4
        assert keep[0].after == tr["select_best_after"] == 0.5
        assert keep[0].first_candidate_step(trainer) == total // 2
    else:
        assert not keep and real["data"]["val_size"] == 0
    (last,) = [c for c in trainer.callbacks if isinstance(c, LastCheckpoint)]
    assert last.every_n_steps == tr["checkpoint_every_n_steps"] and last.path.is_file()
    # The budget, on a meta-device model of the real shape.
    if method["name"] == "s2ft" and experiment in PAPER_PCT:
        model = shape_model(real["model"]["name"])
        pct = 100 * planned_params(model, method_options("s2ft", method["options"])) / model.num_parameters()
        assert abs(pct - PAPER_PCT[experiment]) <= 0.02 * PAPER_PCT[experiment]
    if real["eval"].get("tasks"):
        assert real["eval"]["num_beams"] == 4 and real["eval"]["max_new_tokens"] == 256


CASES = [pytest.param(e, marks=() if e in FAST else pytest.mark.slow) for e in sorted(PAPER)]


@pytest.mark.parametrize("experiment", CASES)
def test_paper_dry_run(experiment, tmp_path, monkeypatch):
    check(experiment, *dry_run(experiment, tmp_path, monkeypatch))


@pytest.mark.parametrize(
    ("experiment", "method"),
    [
        ("instruct_mistral", "paper/full_instruct"),
        pytest.param("commonsense_llama", "paper/full_commonsense", marks=pytest.mark.slow),
        pytest.param("arith_llama", "paper/lora_arith", marks=pytest.mark.slow),
        pytest.param("arith_llama", "paper/dora_arith", marks=pytest.mark.slow),
    ],
)
def test_paper_dry_run_of_a_baseline(experiment, method, tmp_path, monkeypatch):
    """Full FT (at the paper's smallest lr, 1e-5, on commonsense) trains bf16 weights through fp32 masters; LoRA and
    DoRA train fp32 factors beside bf16 weights."""
    check(experiment, *dry_run(experiment, tmp_path, monkeypatch, f"method={method}"))
