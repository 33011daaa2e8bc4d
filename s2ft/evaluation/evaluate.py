"""`evaluate`: accuracy of a model on benchmark tasks, by generation or by option log-likelihood.

Every input is checked before the model runs: task names, the test files, each record's gold answer and, in
log-likelihood mode, each item's options. Then, per task:

- ``generate``: the training prompt, greedy decoding (or ``num_beams`` beam search), the suite's ``max_new_tokens``
  unless overridden, and the LLM-Adapters answer extraction (`s2ft.evaluation.extract`). Commonsense rows stop as
  soon as their answer is settled (the first label is followed by another character), which cannot change the
  extracted answer: only the first label counts. Arithmetic rows run to EOS or ``max_new_tokens``, since the last
  number counts.
- ``loglik`` (multiple-choice tasks only: commonsense, AQuA and a user's tasks with options): each option's text is
  scored as the response to the prompt. Two accuracies are kept: by the summed log-probability (``accuracy_sum``) and
  by the mean per response token (``accuracy_mean``). The primary ``accuracy`` is the mean per token: the summed score
  favours short options (every extra token can only lower it), which the options of a question differ in.

Accuracy is torchmetrics' binary accuracy of "answered correctly" in float64; ``avg_accuracy`` is the unweighted mean
over tasks (the paper's "Avg"), and ``groups`` the mean over each registered group whose tasks were all evaluated.
"""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torchmetrics.classification import BinaryAccuracy

from s2ft.checks import require_positive_int
from s2ft.data import GROUPS, Example, TaskSpec, build_prompt, eval_subset, load_eval
from s2ft.data.prompt import check_template
from s2ft.data.tokenize import refuse_special_tokens, special_token_problems
from s2ft.data.user import file_lines
from s2ft.data.user_tasks import group_members, load_user_task, resolve_eval_tasks
from s2ft.evaluation.extract import extract, is_correct, label_settled, parse_gold
from s2ft.evaluation.generate import generate
from s2ft.evaluation.loglik import encode_pairs, score_pairs
from s2ft.evaluation.options import OptionParseError, parse_options
from s2ft.evaluation.progress import progress_bar

MODES = ("generate", "loglik")


@dataclass
class TaskItems:
    """One task's items, validated and ready to run.

    Attributes:
        spec: The task.
        examples: The (subset of) test items, in file order.
        golds: Parsed gold answers (`parse_gold`), one per example.
        options: Per example, ``{label: option text}`` (log-likelihood mode only).
        mode: "generate" or "loglik": how this task runs.
    """

    spec: TaskSpec
    examples: list[Example]
    golds: list[str | float]
    options: list[dict[str, str]] = field(default_factory=list)
    mode: str = "generate"


def prepare_tasks(
    tasks: list[TaskSpec] | list[str | dict],
    data_dir: str | Path,
    mode: str,
    limit: int | None = None,
    seed: int = 0,
    groups: dict[str, list] | None = None,
) -> list[TaskItems]:
    """Loads and validates the items of every task, without touching a model.

    A task whose spec fixes its mode (a user's ``mode: loglik`` task) runs in that mode; the others in ``mode``.
    A user's log-likelihood task takes its options from its records (`s2ft.data.user_tasks`).

    Raises:
        ValueError: A bad mode, a numeric task in log-likelihood mode, a gold answer that cannot be scored or an item
            whose options cannot be parsed (the task and item id are named).
        UnknownNameError: An unknown task or group; FileNotFoundError: a missing test file.
    """
    if mode not in MODES:
        raise ValueError(f"unknown evaluation mode {mode!r}; use one of {', '.join(MODES)}")
    specs = resolve_eval_tasks(tasks, groups)
    if mode == "loglik":
        numeric = [spec.name for spec in specs if spec.answer_kind in ("number", "text") and spec.mode is None]
        if numeric:
            raise ValueError(
                f"log-likelihood mode scores answer options, and {numeric} have numeric answers without options; "
                "evaluate them with mode=generate (or leave them out of eval.tasks)"
            )
    prepared = []
    for spec in specs:
        task_mode = spec.mode or mode
        if spec.source is not None:
            everything, user_options = load_user_task(spec, data_dir, mode)
        else:
            everything, user_options = load_eval(spec, data_dir), None
        picked = eval_subset(list(range(len(everything))), limit, seed)  # indices: options are kept per item
        examples = [everything[i] for i in picked]
        if not examples:
            raise ValueError(f"task {spec.name} has no items")
        items = TaskItems(spec, examples, [], mode=task_mode)
        for index, example in zip(picked, examples, strict=True):
            try:
                items.golds.append(parse_gold(spec.answer_kind, example.answer, spec.labels))
                if task_mode == "loglik":
                    if user_options is not None:
                        items.options.append(user_options[index])
                    else:
                        items.options.append(parse_options(example.instruction, spec.answer_kind, spec.labels))
                    if items.golds[-1] not in items.options[-1]:
                        raise ValueError(f"gold answer {example.answer!r} is not among the parsed options")
            except (ValueError, OptionParseError) as err:
                place = _place(spec, index, len(everything), data_dir)
                raise ValueError(f"task {spec.name}, item {example.id}{place}: {err}") from None
        prepared.append(items)
    return prepared


def item_texts(items: TaskItems):
    """The texts of a task's items that the model reads: prompts and, in loglik mode, the answer options (not the
    gold output, which only the scorer reads)."""
    for example in items.examples:
        yield example.id, "instruction", example.instruction
        yield example.id, "input", example.input
    for example, options in zip(items.examples, items.options, strict=False):
        for label, text in options.items():
            yield example.id, f"option {label}", text


def task_problems(prepared: list[TaskItems], tokenizer, label: str) -> list[str]:
    """`special_token_problems` of every prepared task's `item_texts`, each named ``"{label} {task}"``."""
    return [
        problem
        for items in prepared
        for problem in special_token_problems(item_texts(items), tokenizer, f"{label} {items.spec.name}")
    ]


def _place(spec: TaskSpec, index: int, count: int, data_dir: str | Path) -> str:
    """Where a user task's record is in its file (" (FILE: line N)"; its item id counts records from 0); ``count``:
    the task's number of records."""
    if spec.source is None:
        return ""
    lines = file_lines(spec.source, data_dir, count)
    return f" ({spec.source.where}: {lines[index] if lines else f'record {index}'})"


def evaluate(
    model,
    tokenizer,
    tasks: list[TaskSpec] | list[str],
    *,
    data_dir: str | Path,
    mode: str = "generate",
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    num_beams: int = 1,
    max_new_tokens: int | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
    template: str = "alpaca",
    groups: dict[str, list] | None = None,
) -> dict:
    """Evaluates ``model`` on ``tasks`` and writes one predictions file per task.

    Args:
        model: A causal LM (any method's model; evaluated in eval mode, its training mode restored afterwards).
        tokenizer: Its tokenizer, with a pad token.
        tasks: Task or group names (``["arithmetic", "boolq"]``), a user's task definitions (`s2ft.data.user_tasks`)
            or TaskSpecs.
        data_dir: The data directory (``paths.data_dir``).
        mode: "generate" or "loglik" (see the module docstring).
        limit: Evaluate a deterministic subset of this many items per task (`s2ft.data.eval_subset` with ``seed``).
        seed: Subset seed: the same seed gives the same items in every run.
        batch_size: Prompts (generate) or questions (loglik, all options of each) per forward batch; results do not
            depend on it.
        num_beams: 1 for greedy decoding, 4 for the paper's beam search (generate mode).
        max_new_tokens: Generation budget for every task; None uses each suite's (commonsense 32, arithmetic 256).
        out_dir: The run directory; predictions go to ``out_dir/predictions/TASK.jsonl``. None writes nothing.
        progress: Show a progress bar.
        template: The prompt template, "alpaca" or "chat" (`s2ft.data.prompt`), as the model was trained with.
        groups: User groups (``eval.groups``: name -> tasks), expanded in ``tasks`` and averaged like the registered.

    Returns:
        ``{"tasks": {TASK: {"accuracy", "n", "mode", "tokens_per_s", ...}}, "avg_accuracy", "groups": {GROUP: acc}}``;
        ``tokens_per_s`` is generated tokens per second (None in loglik mode, which generates nothing).
    """
    results = evaluate_adapters(
        model,
        tokenizer,
        tasks,
        templates={None: template},
        data_dir=data_dir,
        mode=mode,
        limit=limit,
        seed=seed,
        batch_size=batch_size,
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        out_dirs=None if out_dir is None else {None: out_dir},
        progress=progress,
        groups=groups,
    )
    return results[None]


def evaluate_adapters(
    model,
    tokenizer,
    tasks: list[TaskSpec] | list[str],
    *,
    templates: dict[str | None, str],
    data_dir: str | Path,
    mode: str = "generate",
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    num_beams: int = 1,
    max_new_tokens: int | None = None,
    out_dirs: dict[str | None, str | Path] | None = None,
    progress: bool = True,
    groups: dict[str, list] | None = None,
) -> dict[str | None, dict]:
    """`evaluate` for every adapter of a mixed-adapter model (`s2ft.load_adapters`) in one batched pass.

    Each item is asked once per adapter, in that adapter's prompt template; a batch mixes the rows of different
    adapters (``adapter_names`` per row), so the items and settings are shared and the model runs once over them.
    ``tokens_per_s`` and ``wall_s`` are the whole pass's; ``generated_tokens`` is each adapter's own.

    Args:
        templates: Adapter name -> its prompt template; ``{None: template}`` evaluates the model as it is.
        out_dirs: Adapter name -> its run directory (``predictions/TASK.jsonl`` under it); None writes nothing.
        model, tokenizer, tasks, data_dir, mode, limit, seed, batch_size, num_beams, max_new_tokens, progress,
            groups: As for `evaluate`.

    Returns:
        Adapter name -> what `evaluate` returns for it.
    """
    for name, value in (("batch_size", batch_size), ("num_beams", num_beams), ("max_new_tokens", max_new_tokens)):
        if not (value is None and name == "max_new_tokens"):
            require_positive_int(f"eval {name}", value)
    if mode == "loglik" and num_beams != 1:
        raise ValueError("num_beams applies to generation; log-likelihood mode does not generate (use num_beams=1)")
    prepared = prepare_tasks(tasks, data_dir, mode, limit, seed, groups)
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos_token)")
    for template in templates.values():
        check_template(template, tokenizer)
    refuse_special_tokens(task_problems(prepared, tokenizer, "task"))
    settings = dict(batch_size=batch_size, num_beams=num_beams, max_new_tokens=max_new_tokens, templates=templates)
    was_training = model.training
    model.eval()
    results = {name: {} for name in templates}
    try:
        with progress_bar(progress) as bar:
            for items in prepared:
                run = _run_generate if items.mode == "generate" else _run_loglik
                for name, (metrics, records) in run(model, tokenizer, items, bar, **settings).items():
                    results[name][items.spec.name] = metrics
                    if out_dirs is not None:
                        write_predictions(Path(out_dirs[name]) / "predictions" / f"{items.spec.name}.jsonl", records)
    finally:
        model.train(was_training)
    members = group_members(groups, [items.spec for items in prepared])
    return {name: summarize(task_results, members) for name, task_results in results.items()}


def summarize(task_results: dict[str, dict], user_groups: dict[str, list[str]] | None = None) -> dict:
    """Adds the unweighted mean over tasks and the mean of every fully evaluated group (registered or the user's:
    group name -> task names)."""
    accuracies = {name: result["accuracy"] for name, result in task_results.items()}
    groups = {
        group: sum(accuracies[name] for name in members) / len(members)
        for group, members in {**GROUPS, **(user_groups or {})}.items()
        if all(name in accuracies for name in members)
    }
    return {
        "tasks": task_results,
        "avg_accuracy": sum(accuracies.values()) / len(accuracies),
        "groups": groups,
    }


def accuracy(correct: list[bool]) -> float:
    """Fraction answered correctly (torchmetrics binary accuracy against all-correct, in float64)."""
    metric = BinaryAccuracy().set_dtype(torch.float64)
    metric.update(torch.tensor(correct, dtype=torch.long), torch.ones(len(correct), dtype=torch.long))
    return metric.compute().item()


def _rows(items: TaskItems, templates: dict[str | None, str]) -> list[tuple[str | None, int]]:
    """(adapter, item index) per row, item-major: an item's rows under every adapter are neighbours in a batch."""
    return [(name, index) for index in range(len(items.examples)) for name in templates]


def _adapter_names(rows: list[tuple[str | None, int]]) -> dict[str, list[str]]:
    """``adapter_names`` (the rows' adapters) for a mixed-adapter model; nothing for a model evaluated as it is."""
    names = [name for name, _ in rows]
    return {} if set(names) == {None} else {"adapter_names": names}


def _run_generate(model, tokenizer, items: TaskItems, bar, *, batch_size, num_beams, max_new_tokens, templates):
    spec = items.spec
    prompts = {
        name: [build_prompt(example.instruction, example.input, template, tokenizer) for example in items.examples]
        for name, template in templates.items()
    }
    rows = _rows(items, templates)
    stop = (lambda text: label_settled(text, spec.labels)) if spec.answer_kind == "label" else None
    budget = spec.max_new_tokens if spec.own_budget else max_new_tokens or spec.max_new_tokens
    with bar.task(spec.name, len(rows)) as advance:
        start = time.perf_counter()
        generated = generate(
            model,
            tokenizer,
            [prompts[name][index] for name, index in rows],
            max_new_tokens=budget,
            batch_size=batch_size,
            num_beams=num_beams,
            stop=stop,
            on_batch=advance,
            **_adapter_names(rows),
        )
        wall = time.perf_counter() - start
    pace = sum(generation.num_tokens for generation in generated) / wall if wall > 0 else None
    by_adapter = {name: [None] * len(items.examples) for name in templates}
    for (name, index), generation in zip(rows, generated, strict=True):
        by_adapter[name][index] = generation
    results = {}
    for name, generations in by_adapter.items():
        records, correct = [], []
        for example, prompt, generation, gold in zip(
            items.examples, prompts[name], generations, items.golds, strict=True
        ):
            extracted = extract(spec.answer_kind, generation.text, spec.labels)
            correct.append(is_correct(spec.answer_kind, extracted, gold, spec.tolerance))
            records.append(
                dict(
                    id=example.id,
                    prompt=prompt,
                    output=generation.text,
                    extracted=extracted,
                    gold=gold,
                    correct=correct[-1],
                    num_tokens=generation.num_tokens,
                )
            )
        metrics = dict(
            accuracy=accuracy(correct),
            n=len(correct),
            mode="generate",
            tokens_per_s=pace,
            generated_tokens=sum(generation.num_tokens for generation in generations),
            wall_s=wall,
            num_beams=num_beams,
            max_new_tokens=budget,
        )
        results[name] = (metrics, records)
    return results


def _run_loglik(model, tokenizer, items: TaskItems, bar, *, batch_size, num_beams, max_new_tokens, templates):
    spec = items.spec
    flat = [(index, label, text) for index, options in enumerate(items.options) for label, text in options.items()]
    examples = [items.examples[index] for index, _, _ in flat]
    pairs = {
        name: encode_pairs(
            [example.instruction for example in examples],
            [example.input for example in examples],
            [text for _, _, text in flat],
            tokenizer,
            template,
        )
        for name, template in templates.items()
    }
    rows = [(name, position) for position in range(len(flat)) for name in templates]
    with bar.task(spec.name, len(rows)) as advance:
        start = time.perf_counter()
        scored = score_pairs(
            model,
            [pairs[name][position] for name, position in rows],
            pad_token_id=tokenizer.pad_token_id,
            batch_size=batch_size,
            on_batch=advance,
            **_adapter_names(rows),
        )
        wall = time.perf_counter() - start
    by_adapter = {name: [{} for _ in items.examples] for name in templates}
    for (name, position), score in zip(rows, scored, strict=True):
        index, label, _ = flat[position]
        by_adapter[name][index][label] = score
    results = {}
    for name, by_item in by_adapter.items():
        records, correct_sum, correct_mean = [], [], []
        for example, options, item_scores, gold in zip(
            items.examples, items.options, by_item, items.golds, strict=True
        ):
            # max() keeps the first of tied options, so ties resolve to the earliest option, deterministically.
            by_sum = max(item_scores, key=lambda label: item_scores[label].logprob)
            by_mean = max(item_scores, key=lambda label: item_scores[label].mean)
            correct_sum.append(by_sum == gold)
            correct_mean.append(by_mean == gold)
            records.append(
                dict(
                    id=example.id,
                    prompt=build_prompt(example.instruction, example.input, templates[name], tokenizer),
                    output=options[by_mean],
                    extracted=by_mean,
                    gold=gold,
                    correct=correct_mean[-1],
                    extracted_sum=by_sum,
                    correct_sum=correct_sum[-1],
                    options=options,
                    logprob={label: score.logprob for label, score in item_scores.items()},
                    num_tokens={label: score.num_tokens for label, score in item_scores.items()},
                )
            )
        metrics = dict(
            accuracy=accuracy(correct_mean),
            n=len(records),
            mode="loglik",
            tokens_per_s=None,
            accuracy_mean=accuracy(correct_mean),
            accuracy_sum=accuracy(correct_sum),
            primary="mean",
            wall_s=wall,
        )
        results[name] = (metrics, records)
    return results


def write_predictions(path: Path, records: list[dict]) -> None:
    """One JSON object per record and line (the ``predictions/*.jsonl`` files of a run)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
