"""Cross-check with lm-evaluation-harness (``pip install "s2ft[lmeval]"``; ``eval.backend=lm_eval``).

The harness reads its task data from the hub, which a run here cannot reach, so its own task configs are reused
through ``include`` and pointed at local JSON copies of our test files (``dataset_path: json``,
``dataset_kwargs.data_files``), converted to the schema each harness task expects:

- ARC-Easy / ARC-Challenge: ``question``, ``choices {text, label}``, ``answerKey``; OpenBookQA: ``question_stem``,
  ``choices``, ``answerKey``; PIQA: ``goal``, ``sol1``, ``sol2``, ``label`` (from the LLM-Adapters instructions, the
  option texts parsed by `s2ft.evaluation.options`).
- BoolQ: ``question``, ``label``, and an empty ``passage``: the LLM-Adapters BoolQ files carry no passage, so the
  harness's prompt ("{passage}\\nQuestion: {question}?\\nAnswer:") is asked closed-book here.
- GSM8K: our ``data/gsm8k/test.jsonl`` is the original file and is used as it is (the few-shot split is not needed:
  the harness runs zero-shot here, as our evaluation does).

The copies hold exactly the items our evaluation draws (`s2ft.data.eval_subset` with the same limit and seed), so the
two sets of numbers are on the same questions. The model is the live one, wrapped in the harness's `HFLM`; what
differs is the harness's own prompts ("Question: ...\\nAnswer:", no Alpaca or chat template), its scoring (``acc``:
the summed log-likelihood of each option; ``acc_norm``: normalised by the option's length in bytes) and, for GSM8K,
its answer extraction (``strict-match``: the number after "####"; ``flexible-extract``: the last number).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import lm_eval
import yaml
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from s2ft.data import eval_subset, load_eval
from s2ft.data.records import require_file
from s2ft.data.tasks import TASKS
from s2ft.evaluation.options import OPTION_MARKER, parse_options

LM_EVAL_TASKS = ("boolq", "arc_easy", "arc_challenge", "openbookqa", "piqa", "gsm8k")
HARNESS_TASKS = Path(lm_eval.__file__).parent / "tasks"
# our task -> the harness config it includes
HARNESS_CONFIGS = {
    "boolq": "super_glue/boolq/default.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "piqa": "piqa/piqa.yaml",
    "gsm8k": "gsm8k/gsm8k.yaml",
}
QUESTION_PREFIX = re.compile(
    r"^Please (?:choose the correct (?:answer|solution) to the question|answer the following "
    r"question with true or false, question):\s*"
)
LETTERS = "ABCDE"


def _question(instruction: str) -> str:
    text = OPTION_MARKER.split(instruction, maxsplit=1)[0]
    text = text.split("\n\nAnswer format:")[0]
    return QUESTION_PREFIX.sub("", text).strip()


def _choices(example, task: str) -> tuple[list[str], int]:
    spec = TASKS[task]
    options = parse_options(example.instruction, spec.answer_kind, spec.labels)
    return list(options.values()), list(options).index(example.answer.strip().lower())


def harness_record(example, task: str) -> dict:
    """One of our test items in the schema of the harness's task (see the module docstring)."""
    if task == "boolq":
        return {
            "passage": "",
            "question": _question(example.instruction).rstrip("?"),
            "label": int(example.answer == "true"),
        }
    texts, gold = _choices(example, task)
    if task == "piqa":
        return {"goal": _question(example.instruction), "sol1": texts[0], "sol2": texts[1], "label": gold}
    choices = {"text": texts, "label": list(LETTERS[: len(texts)])}
    key = "question_stem" if task == "openbookqa" else "question"
    return {"id": example.id, key: _question(example.instruction), "choices": choices, "answerKey": LETTERS[gold]}


def write_local_tasks(
    tasks: list[str], data_dir: str | Path, out_dir: Path, limit: int | None = None, seed: int = 0
) -> dict[str, str]:
    """Writes the local data copies and one harness task config per task into ``out_dir``.

    Returns:
        Our task name -> the harness task name (``s2ft_<task>``).

    Raises:
        ValueError: A task the harness cross-check does not cover.
    """
    unknown = [task for task in tasks if task not in HARNESS_CONFIGS]
    if unknown:
        raise ValueError(f"eval.lm_eval.tasks {unknown} are not covered; use some of {', '.join(LM_EVAL_TASKS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    names = {}
    for task in tasks:
        if task == "gsm8k":
            lines = require_file(Path(data_dir) / "gsm8k" / "test.jsonl").read_text(encoding="utf-8").splitlines()
            records = eval_subset([json.loads(line) for line in lines if line.strip()], limit, seed)
        else:
            records = [harness_record(ex, task) for ex in eval_subset(load_eval(task, data_dir), limit, seed)]
        data_file = out_dir / f"{task}.jsonl"
        data_file.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
        names[task] = f"s2ft_{task}"
        config = {
            "include": str(HARNESS_TASKS / HARNESS_CONFIGS[task]),
            "task": names[task],
            "tag": [],
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {"test": str(data_file)}},
            "training_split": None,
            "validation_split": None,
            "fewshot_split": None,
            "test_split": "test",
        }
        (out_dir / f"{task}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return names


def run_lm_eval(
    model,
    tokenizer,
    data_dir: str | Path,
    out_dir: str | Path,
    tasks: list[str] | tuple[str, ...] = LM_EVAL_TASKS,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    max_gen_toks: int | None = None,
) -> dict[str, dict[str, float]]:
    """Runs lm-evaluation-harness on ``model`` (live, through `HFLM`) for ``tasks`` from the local copies.

    Args:
        model, tokenizer: The causal LM (trained or not) and its tokenizer.
        data_dir: Our data directory.
        out_dir: Where the task configs, data copies and the harness's full results (``results.json``) go.
        tasks: Some of `LM_EVAL_TASKS`.
        limit, seed: The items: the same subset our evaluation draws with this limit and seed.
        batch_size: The harness's batch size.
        max_gen_toks: GSM8K's generation budget (None: the harness's default, 256).

    Returns:
        Our task name -> the harness's metrics as floats: ``n`` (items), ``acc`` and ``acc_norm`` (BoolQ: ``acc``
        only), GSM8K's ``exact_match,strict-match`` and ``exact_match,flexible-extract``.
    """
    out_dir = Path(out_dir)
    names = write_local_tasks(list(tasks), data_dir, out_dir / "tasks", limit, seed)
    was_training = model.training
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(names.values()),
            task_manager=TaskManager(include_path=str(out_dir / "tasks"), include_defaults=False),
            num_fewshot=0,
            log_samples=False,
            gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks else None,
            bootstrap_iters=0,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    finally:
        model.train(was_training)
    (out_dir / "results.json").write_text(json.dumps(results["results"], indent=2, default=str) + "\n")
    by_name = {harness: ours for ours, harness in names.items()}
    return {
        by_name[name]: {
            ("n" if metric == "sample_len" else metric.replace(",none", "")): float(value)
            for metric, value in metrics.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        }
        for name, metrics in results["results"].items()
        if name in by_name
    }
