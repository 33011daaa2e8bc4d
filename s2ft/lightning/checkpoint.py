"""Reading a run's checkpoint safely and checking it against the run before anything is written.

Checkpoints hold only tensors and plain values (dicts, lists, numbers, strings), so they load with
``torch.load(weights_only=True)``: a file that needs anything else is refused, never unpickled, since unpickling can run
arbitrary code.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from s2ft.errors import UserError

CHECKPOINT = Path("checkpoints") / "last.ckpt"
PREVIOUS = Path("checkpoints") / "previous.ckpt"
REQUIRED = ("state_dict", "global_step", "loops", "optimizer_states")
BASE_SAMPLE = 4096  # values of each base tensor that `base_sample` hashes
log = logging.getLogger(__name__)


class CheckpointError(UserError):
    """A checkpoint that cannot be read safely or does not belong to the run resuming from it."""


def resume_command(run_dir: Path, ckpt: str = "last") -> str:
    """The command that resumes the run in ``run_dir`` (from ``ckpt``: "last" or a checkpoint file)."""
    return f"python run.py <same overrides> hydra.run.dir={run_dir} ckpt_path={ckpt}"


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint with ``weights_only=True`` and check its top-level fields.

    Raises:
        CheckpointError: The file is truncated, empty, not a checkpoint, or holds objects other than tensors and plain
            values; the message names the file and what to do (resume from ``previous.ckpt`` when there is one).
    """
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        # Whatever torch's reader raises on a damaged file (a torn pickle or legacy-format file fails in it with a
        # struct.error or IndexError), the file is what failed; weights_only runs none of its code.
        # torch's first sentence says what failed; the later ones advise `weights_only=False`, the unsafe load refused.
        reason = str(err).strip().splitlines()[0].split(". ")[0][:200].rstrip(".") if str(err).strip() else ""
        reason = reason or type(err).__name__
        raise CheckpointError(
            f"checkpoint {path} cannot be loaded safely ({reason}): it is truncated or damaged, or it holds objects "
            f"other than tensors and plain values, which are never unpickled (they could run code). {_fix(path)}"
        ) from err
    missing = [key for key in REQUIRED if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} is not a checkpoint of this runner (lacks {', '.join(missing)}). {_fix(path)}")
    state = checkpoint["state_dict"]
    tensors = isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    if not tensors or not isinstance(checkpoint["loops"], dict):
        raise CheckpointError(f"{path} is not a checkpoint of this runner (bad state_dict or loops). {_fix(path)}")
    return checkpoint


def _fix(path: Path) -> str:
    run_dir = path.parent.parent
    previous = run_dir / PREVIOUS
    if path != previous and previous.is_file():
        return (
            f"The checkpoint before it is kept: resume from it with {resume_command(run_dir, str(previous))} "
            "(training repeats the steps after it)"
        )
    return "Start the run again in a new directory, or in this one with overwrite=true (deletes its outputs)"


def check_checkpoint_fits(checkpoint: dict, path: Path, trained: dict[str, torch.Size], batches_per_epoch: int) -> None:
    """Check that a checkpoint holds exactly the run's trained tensors and a data position within its epoch.

    Args:
        checkpoint: The loaded checkpoint (`read_checkpoint`).
        path: Its file, for the message.
        trained: State-dict key -> shape of every tensor the run trains (`FineTuneModule.trained_keys`).
        batches_per_epoch: Training batches per epoch of this run's data and batch size.

    Raises:
        CheckpointError: Other tensor names or shapes (another method or selection), or more consumed batches than an
            epoch has (another data.batch_size or data.limit); the message names the difference and the fix.
    """
    stored = {key: tuple(value.shape) for key, value in checkpoint["state_dict"].items()}
    expected = {key: tuple(shape) for key, shape in trained.items()}
    fix = "resume with the config that wrote it, or start this config in a new directory"
    if stored != expected:
        missing, extra = sorted(expected.keys() - stored.keys()), sorted(stored.keys() - expected.keys())
        shapes = sorted(k for k in expected.keys() & stored.keys() if expected[k] != stored[k])
        differences = [f"{label} {keys[:3]}" for label, keys in (("missing", missing), ("unexpected", extra)) if keys]
        differences += [f"shape of {k}: {stored[k]} in the checkpoint, {expected[k]} here" for k in shapes[:3]]
        raise CheckpointError(
            f"checkpoint {path} does not fit this run's trained tensors ({'; '.join(differences)}): it was written by "
            f"a run with another method or selection; {fix}"
        )
    fit_loop = (checkpoint["loops"].get("fit_loop") or {}).get("state_dict") or {}
    # The data position: the data module's state (SFTDataModule), or Lightning's dataloader state in older checkpoints.
    positions = [checkpoint.get("SFTDataModule") or {}, *(fit_loop.get("combined_loader") or [])]
    for state in positions:
        consumed = state.get("consumed") if isinstance(state, dict) else None
        if isinstance(consumed, int) and consumed > batches_per_epoch:
            raise CheckpointError(
                f"checkpoint {path} stopped after batch {consumed} of an epoch, but an epoch of this run has only "
                f"{batches_per_epoch} batches: it was written with another data.batch_size or data.limit; {fix}"
            )


def check_same_world(checkpoint: dict, path: Path, world_size: int, device_type: str) -> None:
    """Check that a checkpoint was written by as many processes, on the same kind of device, as the run resuming it.

    Each rank's sampler position, token count and random state travel in the checkpoint; ``trainer.devices=auto`` (or
    -1) is the same config on a machine with another number of GPUs, which would continue none of them exactly, and
    ``trainer.accelerator=auto`` the same config on a machine without a GPU, whose kernels and random generators
    (dropout, the GPU's own state) would continue none of it exactly either.

    Raises:
        CheckpointError: Another number of processes or another kind of device; the message names both and the fix.
    """
    state = checkpoint.get("s2ft") or {}
    written_on = state.get("device_type")  # None: written before checkpoints kept it
    if written_on is not None and written_on != device_type:
        raise CheckpointError(
            f"checkpoint {path} was written on {written_on}, but this run trains on {device_type} "
            "(trainer.accelerator=auto picks what this machine has): its random state and numerics would not "
            f"continue. Resume on a machine with {written_on} (trainer.accelerator="
            f"{_ACCELERATORS.get(written_on, written_on)}), or start in a new directory"
        )
    per_rank = state.get("tokens_seen_per_rank")
    if per_rank is None:  # written before checkpoints kept each rank's count: not known
        return
    ranks = len(per_rank)
    if ranks != world_size:
        raise CheckpointError(
            f"checkpoint {path} was written by {_processes(ranks)}, but this run has {world_size} (trainer.devices="
            "auto or -1 counts this machine's GPUs): each rank's data position and random state would not continue. "
            f"Resume with trainer.devices x trainer.num_nodes = {_processes(ranks)}, or start in a new directory"
        )


# Lightning's accelerator name for a torch device type.
_ACCELERATORS = {"cuda": "gpu", "cpu": "cpu", "mps": "mps"}


def _processes(count: int) -> str:
    return f"{count} process" + "es" * (count != 1)


def check_same_data(checkpoint: dict, path: Path, sources: list[dict]) -> None:
    """Check that the training files hold what they held when the checkpoint was written.

    Args:
        checkpoint: The loaded checkpoint; one written before checkpoints stored their sources is not checked.
        path: Its file, for the message.
        sources: The run's training sources now (`s2ft.lightning.provenance.training_record`'s ``sources``).

    Raises:
        CheckpointError: A file whose SHA-256 differs (edited, replaced or regenerated since): the resumed run would
            train on other items than the run it continues.
    """
    saved = {(s["name"], s["file"]): s.get("sha256") for s in checkpoint.get("training_sources") or []}
    for source in sources:
        before = saved.get((source["name"], source["file"]))
        if before and source.get("sha256") and before != source["sha256"]:
            raise CheckpointError(
                f"checkpoint {path} was written while {source['file']} had other contents (SHA-256 {before[:12]}..., "
                f"now {source['sha256'][:12]}...): the resumed run would train on other items than the run it "
                "continues. Restore that file, or start the run again in a new directory"
            )


def check_same_items(checkpoint: dict, path, digest: str) -> None:
    """Check that the run's training and validation items are those the checkpoint was written with.

    Args:
        checkpoint: The loaded checkpoint; one written before checkpoints stored the items' digest is not checked.
        path: Its file, for the message.
        digest: `s2ft.lightning.provenance.items_digest` of this session's items.

    Raises:
        CheckpointError: Other items (the sources' files are checked first, by `check_same_data`, which names them).
    """
    saved = checkpoint.get("training_items")
    if saved and saved != digest:
        raise CheckpointError(
            f"checkpoint {path} was written while the training items were others (a hub dataset updated since, or "
            "read from another datasets cache, a converter changed): the resumed run would train on other items than "
            "the run it continues. Restore them, or start the run again in a new directory"
        )


def base_sample(model: torch.nn.Module, tokenizer=None) -> str:
    """SHA-256 of the base model as loaded (before a method changes it) and of its tokenizer: every tensor's name,
    shape and dtype and `BASE_SAMPLE` of its values, evenly strided; the tokenizer's whole definition, special tokens
    and chat template (``data.template=chat`` renders the training items with it).

    A checkpoint holds only the trained tensors, so a resumed session loads the base again by its name; another
    revision of a hub model, another conversion or a replaced folder changes nearly every value, which a sample
    shows at a cost of milliseconds where hashing a 7B model would take a minute.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // BASE_SAMPLE)][:BASE_SAMPLE]
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(sample.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    if tokenizer is not None:
        backend = getattr(tokenizer, "backend_tokenizer", None)  # a fast tokenizer's vocabulary, merges, normalizer
        definition = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
        special = {key: str(value) for key, value in tokenizer.special_tokens_map.items()}
        digest.update(json.dumps([definition, special, tokenizer.chat_template], default=str).encode())
    return digest.hexdigest()


def check_same_base(checkpoint: dict, path, sample: str, name: str) -> None:
    """Check that the base model and its tokenizer load as they did when the checkpoint was written.

    Args:
        checkpoint: The loaded checkpoint; one written before checkpoints stored the base's sample is not checked.
        path: Its file, for the message.
        sample: `base_sample` of the base model and tokenizer this session loaded.
        name: Its ``model.name``, for the message.

    Raises:
        CheckpointError: Other values or another tokenizer: the resumed run would train its tensors on another base
            model, or on other token ids.
    """
    saved = checkpoint.get("base_sample")
    if saved and saved != sample:
        raise CheckpointError(
            f"checkpoint {path} was written on another base model than model.name={name!r} loads now (other weights or "
            "another tokenizer: a hub model updated since, another conversion, a replaced folder): the resumed run "
            "would train its tensors on another base model. Restore that model, or start the run again in a new "
            "directory"
        )


def code_history(checkpoint: dict | None, path, code: dict) -> list[dict]:
    """The code each session of a run trained under, first to last, this session's (``code``) included.

    Args:
        checkpoint: The checkpoint this session resumes (None for a fresh start); one written before checkpoints
            stored the history counts as this session's code.
        path: Its file, for the warning.
        code: This session's ``{"git_commit", "versions"}`` (`s2ft.lightning.summary.code_record`).

    Returns:
        The distinct consecutive records: one unless the code changed between sessions, which is logged as a warning
        (the resumed run may then differ from an uninterrupted one).
    """
    history = list((checkpoint or {}).get("code_history") or [])
    if not history or history[-1] == code:
        return history or [code]
    before = {"git_commit": history[-1].get("git_commit"), **(history[-1].get("versions") or {})}
    now = {"git_commit": code["git_commit"], **code["versions"]}
    changes = [f"{name} {before.get(name)} -> {value}" for name, value in now.items() if before.get(name) != value]
    log.warning(
        "resuming %s, written under other code (%s): the result may differ from an uninterrupted run's; summary.json "
        "lists each session's code under code_history",
        path,
        ", ".join(changes),
    )
    return [*history, code]
