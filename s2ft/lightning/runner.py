"""One experiment from a resolved config: build the model, apply the method, train, save, evaluate, summarise.

`run.py` is a thin Hydra main around `run_experiment`; this module needs only a plain dict, so tests and notebooks
call it directly.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import statistics
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from torch.utils.data import DataLoader

from s2ft.data import DataError, load_eval, load_heldout, load_train, split_validation
from s2ft.data.overlap import check_overlap
from s2ft.data.sources import heldout_name
from s2ft.data.tokenize import example_texts, refuse_special_tokens, special_token_problems
from s2ft.data.user_tasks import resolve_eval_tasks
from s2ft.evaluation.measure import eval_data, measure_model, special_token_check
from s2ft.export import export_lora
from s2ft.lightning.callbacks import (
    AdvanceSampler,
    AtomicCheckpointIO,
    KeepBest,
    LastCheckpoint,
    RecordBatch,
    ResumeRandomState,
    RunInterrupted,
    StopOnNonFinite,
)
from s2ft.lightning.checkpoint import (
    CHECKPOINT,
    base_sample,
    check_checkpoint_fits,
    check_same_base,
    check_same_data,
    check_same_items,
    check_same_world,
    code_history,
)
from s2ft.lightning.console import StepProgressBar
from s2ft.lightning.datamodule import SFTDataModule
from s2ft.lightning.evaluation import evaluate_only, finish, write_config
from s2ft.lightning.loggers import ReplayCSVHistory, build_logger, end_wandb_run, wandb_info
from s2ft.lightning.module import FineTuneModule
from s2ft.lightning.provenance import items_digest, training_record, write_adapter_record
from s2ft.lightning.run_dir import (
    RunPlan,
    honour_umask,
    prepare_run_dir,
    run_dir_lock,
    settle_overwrite,
    write_command_record,
)
from s2ft.lightning.sharding import FSDP2Strategy, gather_trained, local_elements
from s2ft.lightning.summary import build_summary, code_record, flat_metrics, task_record
from s2ft.methods import get_method, merge_trained, prepare_model, save_trained, trainable_summary
from s2ft.models import build_run_model
from s2ft.run_config import RunConfigError, process_count, validate_run_config, whole_steps_near

ADAM_BETAS = (0.9, 0.999)  # torch's default; the paper configs set method.betas to the official (0.9, 0.95)
log = logging.getLogger(__name__)


def run_experiment(cfg: dict, run_dir: str | Path, command_record: Mapping[str, str] | None = None) -> dict | None:
    """Run the experiment `cfg` describes and fill `run_dir` with its outputs.

    Args:
        cfg: The resolved config as a plain dict (schema: conf/config.yaml, checked by `validate_run_config`).
        run_dir: The run directory (Hydra's output directory under `run.py`).
        command_record: Hydra's record of the command (`run.py`: file name -> YAML text), written to
            ``run_dir/.hydra/`` once every check has accepted the command, just before the run's first output; a
            refused command, or a finished run skipped by ``ckpt_path=auto``, leaves the record there as it was.

    Returns:
        The summary written to `run_dir/summary.json`; None on DDP ranks other than 0.
    """
    validate_run_config(cfg)
    run_dir = Path(run_dir)
    with run_dir_lock(run_dir):
        return _run_locked(cfg, run_dir, command_record)


def _run_locked(cfg: dict, run_dir: Path, command_record: Mapping[str, str] | None) -> dict | None:
    # Every check of the directory, its config and its checkpoint comes before the first write into it.
    plan = prepare_run_dir(cfg, run_dir)
    if plan.finished is not None:
        log.info("%s already holds this finished run; nothing to do (ckpt_path=auto)", run_dir)
        return plan.finished
    cfg = plan.cfg
    L.seed_everything(cfg["seed"], workers=True)
    try:
        if cfg["mode"] == "eval":
            return evaluate_only(cfg, run_dir, command_record)
        try:
            summary = _train(plan, run_dir, command_record)
        except SIGTERMException as err:
            end_wandb_run(failed=True)
            raise RunInterrupted("SIGTERM", run_dir) from err
        except BaseException:
            end_wandb_run(failed=True)
            raise
        end_wandb_run(failed=False)
        return summary
    finally:
        settle_overwrite(run_dir)


def _train(plan: RunPlan, run_dir: Path, command_record: Mapping[str, str] | None) -> dict | None:
    cfg = plan.cfg
    data, paths, tr = cfg["data"], cfg["paths"], cfg["trainer"]
    data_dir = paths["data_dir"]
    examples = load_train(data["train"], data_dir, data.get("limit"), cfg["seed"])
    # Guarded against the sets the run is meant to be judged on: data.overlap_tasks, else the ones it evaluates.
    overlap_tasks = data.get("overlap_tasks") or cfg["eval"].get("tasks") or []
    tasks = resolve_eval_tasks(overlap_tasks, cfg["eval"].get("groups")) if overlap_tasks else []
    eval_sets = {task.name: load_eval(task, data_dir) for task in tasks}
    # Every held-out set too, whole (eval.heldout_limit draws its subset per seed): a loss on training items is none.
    heldout = {heldout_name(item): load_heldout(item, data_dir) for item in cfg["eval"].get("heldout") or []}
    if eval_sets or heldout:
        check_overlap(examples, eval_sets, allow=data.get("allow_overlap", False), heldout=heldout)
    if not eval_sets:
        log.warning(
            "%s: eval.tasks is empty and data.overlap_tasks is not set; set data.overlap_tasks=[TASKS] to the tasks "
            "this run will be evaluated on",
            "the train/test overlap guard checked only eval.heldout" if heldout else "no train/test overlap guard ran",
        )
    train, val = split_validation(examples, data["val_size"], cfg["seed"]) if data.get("val_size") else (examples, [])
    processes = process_count(tr)
    if len(train) < data["batch_size"] * processes:
        # The sampler refuses it too, but only inside fit: after the model loaded, the untrained model was evaluated
        # and the run's first files were written. A small file of one's own meets it without any data.limit.
        raise DataError(
            f"{len(train)} training items (of {len(examples)}, data.val_size={data.get('val_size') or 0} held out) "
            f"cannot fill one batch of data.batch_size={data['batch_size']} on {processes} process(es); lower "
            "data.batch_size or data.val_size, or train on more items"
        )
    if val:
        check_val_fraction(tr, len(train) // (data["batch_size"] * processes))
    provenance = training_record(cfg, train, val, sorted(eval_sets) + [f"heldout:{name}" for name in heldout])
    digests = {"training_items": items_digest(train, val)}
    if plan.checkpoint is not None:
        check_same_data(plan.checkpoint, cfg["ckpt_path"], provenance["sources"])
        check_same_items(plan.checkpoint, cfg["ckpt_path"], digests["training_items"])

    model, tokenizer = build_run_model(cfg["model"], paths.get("cache_dir"))
    digests["base_sample"] = base_sample(model, tokenizer)  # as loaded, before any method changes it
    if plan.checkpoint is not None:
        check_same_base(plan.checkpoint, cfg["ckpt_path"], digests["base_sample"], cfg["model"]["name"])
    # Before the untrained model is measured and the run's first files are written: only the tokenizer can tell.
    # Every text the model will read: eval.tasks may differ from the overlap sets (data.overlap_tasks), and a task's
    # own checks run only when it is evaluated, after training when eval.before is off.
    refuse_special_tokens(
        special_token_problems(example_texts(train + val), tokenizer, "data.train")
        + special_token_check(tokenizer, cfg)
    )
    evaluated_files = eval_data(cfg)  # at the start: what the untrained model is measured on
    datamodule = SFTDataModule(
        train,
        val,
        tokenizer,
        data["max_length"],
        data["batch_size"],
        cfg["seed"],
        _cache(paths, "tokenized"),
        data.get("template", "alpaca"),
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    # Lightning checks the accelerator, the devices and the launcher's world as it builds the Trainer: before the
    # first writes of the run's own files (metrics, W&B id, config), so a command it refuses leaves none of them.
    history = code_history(plan.checkpoint, cfg["ckpt_path"], code_record(cfg))
    trainer = _trainer(cfg, run_dir, False, bool(val), plan.checkpoint, provenance["sources"], history, digests)
    if plan.checkpoint is not None:
        check_same_world(plan.checkpoint, cfg["ckpt_path"], trainer.world_size, trainer.strategy.root_device.type)
    # The untrained model is measured, and calibration batches scored, where it trains (this rank's GPU), not where
    # it was loaded (the CPU); the Trainer would move it there only at fit.
    device = trainer.strategy.root_device
    results = None
    # The untrained model's outputs stay in a hidden folder until the method is applied and a checkpoint to resume is
    # checked: a run that fails there (a budget that gives no unit, a checkpoint of another method) leaves no before/
    # that would make its own directory look like another run's, or change the directory it was refused in.
    before_dir, partial = run_dir / "before", run_dir / ".before.partial"
    if rank_zero_only.rank == 0 and cfg["eval"].get("before"):
        shutil.rmtree(partial, ignore_errors=True)
        results = measure_model(model.to(device), tokenizer, cfg, partial)

    method = cfg["method"]
    options = dict(method.get("options") or {})
    calibration = None
    count = get_method(method["name"]).calibration_items(options, len(datamodule.train_set))
    if count:
        subset = datamodule.train_set.select(range(count))  # the training list is shuffled: a random sample
        calibration = list(DataLoader(subset, batch_size=data["batch_size"], collate_fn=datamodule.collate))
        model.to(device)
    try:
        model = prepare_model(model, method["name"], options, calibration)
        module = FineTuneModule(
            model,
            method["lr"],
            method.get("weight_decay", 0.0),
            tr.get("warmup_steps", 0),
            tr.get("scheduler", "linear"),
            betas=tuple(method.get("betas") or ADAM_BETAS),
        )
        if plan.checkpoint is not None:
            state, keys = module.state_dict(), module.trained_keys()
            # The batches of one rank's epoch on a single process: an upper bound for any number of ranks.
            per_epoch = len(train) // data["batch_size"]
            check_checkpoint_fits(plan.checkpoint, cfg["ckpt_path"], {k: state[k].shape for k in keys}, per_epoch)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    # Every check has passed: the command's record, then the run's outputs.
    if command_record:  # rank 0 only, as `write_command_record` decides
        write_command_record(run_dir, command_record)
    if partial.is_dir():
        # A resumed run measured the same untrained model again: its first session's before/ makes way.
        shutil.rmtree(before_dir, ignore_errors=True)
        os.replace(partial, before_dir)
    counts = trainable_summary(model)

    logger = build_logger(cfg["logger"], cfg, run_dir)
    trainer.loggers = [logger] if logger else []
    plan.checkpoint = None  # the checkpoint IO holds it until Lightning restores it, then it is freed
    if trainer.global_rank == 0:
        write_config(cfg, run_dir)
    if logger and cfg.get("ckpt_path") is None:  # a resumed run logged them in its first session
        logger.log_metrics({"trainable_params": counts["trainable_params"], "trainable_pct": counts["trainable_pct"]})
    # Lightning warns that a mid-epoch resume "can cause unreliable results" unless the dataloader is stateful; here
    # the data module carries the sampler's position (`SFTDataModule`), so the resume is exact and the warning false.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
        _fit(trainer, module, datamodule, cfg.get("ckpt_path"))

    sharded = isinstance(trainer.strategy, FSDP2Strategy)
    if sharded:
        trained = gather_trained(module, module.trained_keys())
        shards = _gather(trainer, local_elements(trainer.optimizers[0]))
    else:
        digests = _gather(trainer, _trained_digest(module))
        if len(set(digests)) > 1:
            raise RuntimeError(f"DDP ranks ended with different trained weights: {digests}")
    # Gathered as ints: a float32 sum (a reduced tensor) rounds any count past 2**24 tokens.
    tokens = sum(_gather(trainer, module.tokens_seen))
    if trainer.global_rank != 0:
        return None
    if sharded:
        # Saving and evaluation need the whole model, as a single-process run holds it, not rank 0's shards.
        model = unsharded_model(cfg, calibration, trained, trainer.strategy.root_device)
    # Lightning's teardown moves the module to the CPU after fit; evaluate where training ran (the GPU).
    model.to(trainer.strategy.root_device)
    save_trained(model, method["name"], run_dir / "adapter")
    write_adapter_record(run_dir / "adapter", method["name"], provenance)
    honour_umask(run_dir / "adapter")
    train_stats = {
        "steps": trainer.global_step,
        "tokens": tokens,
        "wall_s": round(module.wall_s, 2),
        "peak_mem_mb": round(module.peak_mem_mb(), 1),
        "final_loss": module.last_loss,
        "loss_curve": [list(point) for point in module.loss_curve],
    }
    if module.pace:
        train_stats["median_tokens_per_s"] = round(statistics.median(module.pace), 1)
    if module.val_curve:
        # The validation split (data.val_size) is for choices such as learning rates; the test sets are not.
        train_stats["val_loss"] = module.val_curve[-1][1]
        train_stats["val_curve"] = [list(point) for point in module.val_curve]
    after = measure_model(model, tokenizer, cfg, run_dir)
    if cfg.get("save_lora"):
        _save_lora(cfg, run_dir)
    if cfg.get("save_merged"):
        _save_merged(model, tokenizer, method["name"], run_dir / "merged")
        honour_umask(run_dir / "merged")
    best = next((c.best for c in trainer.callbacks if isinstance(c, KeepBest)), None)
    if best is not None:
        train_stats["best_val_loss"] = best
    extra = {}
    if sharded:
        # Elements each rank's optimizer holds: shards of the trainable tensors only (they sum to trainable_params).
        extra["fsdp"] = {"world_size": trainer.world_size, "optimizer_elements": shards}
    elif trainer.world_size > 1:
        extra["ddp"] = {"world_size": trainer.world_size, "trained_sha256": digests}
    if results is not None:
        extra["eval_before"] = {name: task_record(r) for name, r in (results["eval"] or {}).get("tasks", {}).items()}
        extra["avg_accuracy_before"] = (results["eval"] or {}).get("avg_accuracy")
    for key, measured in (("mtbench", after), ("mtbench_before", results)):
        if measured and measured.get("mtbench"):
            extra[key] = measured["mtbench"]
    heldout = _pair(results["heldout"] if results else {}, after["heldout"])
    extra["measure_wall_s"] = {"before": results["wall_s"] if results else None, "after": after["wall_s"]}
    if "lm_eval" in after:
        extra["lm_eval"] = after["lm_eval"]
        extra["lm_eval_before"] = results.get("lm_eval") if results else None
    summary = build_summary(cfg, counts, train_stats, after["eval"], heldout=heldout, wandb=wandb_info(logger), **extra)
    summary["training_data"] = provenance
    summary["eval_data"] = evaluated_files
    if len(history) > 1:  # sessions under other code: git_commit and versions are the last one's
        summary["code_history"] = history
    if logger:
        # At the step count, after every training row: logged at no step they went to step 0 (before training, in
        # metrics.csv, so a resume of the last checkpoint replayed them and logged them again; off W&B's step axis).
        logger.log_metrics(flat_metrics(summary), step=trainer.global_step)
        logger.save()  # Lightning saved the CSV logger when fit ended; these rows come after it
    return finish(summary, run_dir)


def _fit(trainer: L.Trainer, module: FineTuneModule, datamodule: SFTDataModule, ckpt_path: str | None) -> None:
    """`trainer.fit`, with a Ctrl-C inside it left a KeyboardInterrupt: Lightning turns one (raised before training
    starts, or by a second Ctrl-C) into `SystemExit(1)`, which skips run.py's message naming the command that
    continues, and leaves SIGINT ignored for the rest of the process (a notebook could no longer be interrupted)."""
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if main else None
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SystemExit as err:
        if isinstance(err.__context__, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        raise
    finally:
        if main:
            signal.signal(signal.SIGINT, handler)


def unsharded_model(cfg: dict, calibration, trained: dict[str, torch.Tensor], device: torch.device | str = "cpu"):
    """The model of a sharded run, whole: the base model prepared again, then given the gathered trained tensors.

    Preparing again with the same options and calibration selects the same units (checked: every S2FT `index`
    must equal the trained one), so the saved adapter is exactly a single-process run's.

    Args:
        cfg: The run's resolved config.
        calibration: The calibration batches the run selected with (None if its strategy needs none).
        trained: `FineTuneModule` state-dict keys (`model.` + the model's keys) -> whole trained tensors.
        device: Where the run selected its units (its root device): calibration scores computed elsewhere (the CPU)
            could rank near-tied units otherwise, and take hours on a large model.
    """
    method = cfg["method"]
    model, _ = build_run_model(cfg["model"], cfg["paths"].get("cache_dir"))
    model.to(device)
    model = prepare_model(model, method["name"], dict(method.get("options") or {}), calibration)
    state = {key.removeprefix("model."): value for key, value in trained.items()}
    current = model.state_dict()
    moved = [key for key in state if key.endswith(".index") and not torch.equal(current[key], state[key])]
    unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    if moved or unexpected:
        raise RuntimeError(
            f"the rebuilt model does not match the trained one: other units at {moved[:3]}, "
            f"unknown tensors {unexpected[:3]}"
        )
    return model


def check_val_fraction(tr: dict, per_epoch: int) -> None:
    """Refuse a fractional ``trainer.val_check_interval`` whose batches between validations are no multiple of
    ``trainer.accumulate_grad_batches``: validation would run inside an optimizer step (the config check refuses an int
    interval of that kind; a fraction's batch count is known only once the training items are).

    Args:
        tr: The trainer config.
        per_epoch: Training batches of an epoch on each process.

    Raises:
        RunConfigError: Naming the interval's batch count and the intervals that fit.
    """
    interval, accumulate = tr.get("val_check_interval"), tr.get("accumulate_grad_batches", 1)
    if not isinstance(interval, float) or accumulate <= 1:
        return
    every = max(1, int(per_epoch * interval))  # Lightning's batches between two validations of an epoch
    if every < per_epoch and every % accumulate:
        fits = whole_steps_near(every, accumulate)
        raise RunConfigError(
            f"trainer.val_check_interval={interval} is {every} of an epoch's {per_epoch} training batches, not a "
            f"multiple of trainer.accumulate_grad_batches={accumulate}: validation would run inside an optimizer step; "
            f"give it as a batch count, trainer.val_check_interval={' or '.join(map(str, fits))}"
        )


def _trainer(
    cfg: dict,
    run_dir: Path,
    logger,
    has_val: bool,
    preloaded: dict | None,
    sources: list | None = None,
    history: list | None = None,
    digests: dict[str, str] | None = None,
) -> L.Trainer:
    tr = cfg["trainer"]
    interval = tr.get("val_check_interval")
    callbacks = [
        AdvanceSampler(),
        ResumeRandomState(),
        # The module's records of a batch, then the non-finite check, come before any save of that batch's state.
        RecordBatch(),
        StopOnNonFinite(),
        LastCheckpoint(
            run_dir / CHECKPOINT,
            tr.get("checkpoint_every_n_steps", 50),
            run_config=cfg,
            sources=sources,
            code_history=history,
            digests=digests,
        ),
        ReplayCSVHistory(),
    ]
    if tr.get("select_best") == "val_loss":  # validate_run_config made sure there is a validation split
        # Before LastCheckpoint: its best state is taken at validation end and restored before the final save.
        callbacks.insert(4, KeepBest(after=tr.get("select_best_after", 0.0)))
    io = AtomicCheckpointIO({cfg["ckpt_path"]: preloaded} if preloaded is not None else None)
    strategy = FSDP2Strategy() if tr.get("strategy") == "fsdp" else tr.get("strategy", "auto")
    try:
        trainer = L.Trainer(
            max_steps=tr.get("max_steps", -1),
            max_epochs=tr.get("max_epochs"),
            accumulate_grad_batches=tr.get("accumulate_grad_batches", 1),
            gradient_clip_val=tr.get("gradient_clip_val"),
            precision=tr.get("precision", "32-true"),
            accelerator=tr.get("accelerator", "cpu"),
            devices=tr.get("devices", 1),
            strategy=strategy,
            num_nodes=tr.get("num_nodes", 1),
            log_every_n_steps=tr.get("log_every_n_steps", 10),
            # An int interval counts training batches across epochs, so validation runs on a step schedule.
            val_check_interval=interval if has_val else None,
            check_val_every_n_epoch=None if isinstance(interval, int) else 1,
            limit_val_batches=None if has_val else 0,
            num_sanity_val_steps=0,
            logger=logger,
            callbacks=[*callbacks, StepProgressBar()],
            plugins=[io],
            enable_checkpointing=False,
            # The sampler shards by rank itself and resumes mid-epoch; Lightning's replacement would do neither.
            use_distributed_sampler=False,
            default_root_dir=run_dir,
        )
    except MisconfigurationException as err:  # the machine lacks what the config asks for: a GPU, that many devices
        raise RunConfigError(
            f"trainer.accelerator={tr.get('accelerator')!r} with trainer.devices={tr.get('devices')!r} does not fit "
            f"this machine: {err} Pick trainer.devices it has, or trainer=cpu on a machine without GPUs."
        ) from None
    _check_launcher(trainer)
    return trainer


def _check_launcher(trainer: L.Trainer) -> None:
    """Under torchrun or srun, which start the processes themselves, Lightning does not compare their number with
    num_nodes x devices; a mismatch would train with a wrong world (or fail late, in FSDP's device mesh)."""
    env = getattr(trainer.strategy, "cluster_environment", None)
    if env is None or not env.creates_processes_externally:
        return
    try:
        env.validate_settings(num_devices=trainer.num_devices, num_nodes=trainer.num_nodes)
    except ValueError as err:
        raise RunConfigError(
            f"{err} Set trainer.devices to the launcher's processes per node and trainer.num_nodes to its nodes."
        ) from None


def _pair(before: dict, after: dict) -> dict:
    return {name: {"before": before.get(name), "after": loss} for name, loss in after.items()}


def _trained_digest(module: FineTuneModule) -> str:
    """SHA-256 of the trained tensors, to check that DDP replicas stayed identical."""
    state = module.state_dict()
    digest = hashlib.sha256()
    for key in sorted(module.trained_keys()):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _gather(trainer: L.Trainer, value):
    if trainer.world_size == 1:
        return [value]
    values = [None] * trainer.world_size
    torch.distributed.all_gather_object(values, value)
    return values


def _save_merged(model, tokenizer, method: str, out_dir: Path) -> None:
    """Fold what was trained into plain weights and save a `from_pretrained`-able model."""
    model = merge_trained(model, method)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _save_lora(cfg: dict, run_dir: Path) -> None:
    """The run's S2FT adapter as an equivalent PEFT LoRA folder in ``lora/``, computed against a fresh base model (the
    trained model's weights hold zeroed slots, not the base's)."""
    base, _ = build_run_model(cfg["model"], cfg["paths"].get("cache_dir"))
    # A resumed run stopped after its export (while saving merged/, say) exports the same adapter again.
    shutil.rmtree(run_dir / "lora", ignore_errors=True)
    export_lora(run_dir / "adapter", run_dir / "lora", base)
    honour_umask(run_dir / "lora")


def _cache(paths: dict, name: str) -> Path | None:
    return Path(paths["cache_dir"]) / name if paths.get("cache_dir") else None
