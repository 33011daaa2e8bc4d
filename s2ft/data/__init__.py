"""Data: benchmark readers, the task and training-source registries, the prompt, tokenization and the overlap guard."""

from s2ft.data.prompt import build_prompt
from s2ft.data.records import DataError, Example, load_hub, read_gsm8k, read_llm_adapters, read_mawps_raw
from s2ft.data.sources import HELDOUT_DOMAINS, eval_subset, load_eval, load_heldout, load_train, split_validation
from s2ft.data.tasks import (
    GROUPS,
    TASKS,
    TRAIN_GROUPS,
    TRAIN_SETS,
    TaskSpec,
    TrainSource,
    UnknownNameError,
    data_path,
    resolve_tasks,
    resolve_train_sources,
)

__all__ = [
    "GROUPS",
    "HELDOUT_DOMAINS",
    "TASKS",
    "TRAIN_GROUPS",
    "TRAIN_SETS",
    "DataError",
    "Example",
    "TaskSpec",
    "TrainSource",
    "UnknownNameError",
    "build_prompt",
    "data_path",
    "eval_subset",
    "load_eval",
    "load_heldout",
    "load_hub",
    "load_train",
    "read_gsm8k",
    "read_llm_adapters",
    "read_mawps_raw",
    "resolve_tasks",
    "resolve_train_sources",
    "split_validation",
]
