"""What a run measures on a model, from its resolved config: task accuracy, held-out losses, MT-Bench, the harness.

The runner measures the untrained and the trained model with it, `mode=eval` a saved one, the fusion study a fused
one; every output file goes under the given run directory (``predictions/``, ``lm_eval/``). `measure_adapters`
measures every adapter of a mixed-adapter model (`s2ft.load_adapters`) in one batched pass, with the same settings.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

from s2ft.data import eval_subset, load_heldout
from s2ft.data.sources import describe_eval_sources, heldout_name
from s2ft.data.tokenize import example_texts, special_token_problems
from s2ft.data.user import file_digest
from s2ft.evaluation.evaluate import evaluate, evaluate_adapters, prepare_tasks, task_problems, write_predictions
from s2ft.evaluation.heldout import adapter_item_losses, heldout_item_losses, mean_token_loss
from s2ft.evaluation.mtbench import load_questions, question_file, run_mtbench, select_questions


def measure_model(model, tokenizer, cfg: dict, out_dir: Path) -> dict:
    """Task accuracy (`s2ft.evaluation.evaluate`) and held-out losses of `model`, predictions under `out_dir`.

    Returns:
        ``{"eval": evaluate's result or None, "heldout": {NAME: loss}, "wall_s": {PART: seconds}}``, plus
        ``"mtbench"`` with ``eval.mtbench`` and ``"lm_eval"`` with ``eval.backend=lm_eval``; ``wall_s`` times each
        part measured ("tasks", "mtbench", "heldout", "lm_eval"), so a study's jobs can be sized by measurement.
    """
    ev = cfg["eval"]
    result, wall = {"eval": None}, {}
    if ev.get("tasks"):
        with _timed(wall, "tasks"):
            result["eval"] = evaluate(
                model,
                tokenizer,
                ev["tasks"],
                out_dir=out_dir,
                template=cfg["data"].get("template", "alpaca"),
                **_evaluate_settings(cfg),
            )
    if ev.get("mtbench"):
        with _timed(wall, "mtbench"):
            result["mtbench"] = run_mtbench(model, tokenizer, cfg, out_dir)
    if ev.get("heldout"):
        with _timed(wall, "heldout"):
            result["heldout"] = heldout_losses(model, tokenizer, cfg, out_dir)
    else:
        result["heldout"] = {}
    if ev.get("backend", "s2ft") == "lm_eval":
        with _timed(wall, "lm_eval"):
            result["lm_eval"] = harness_results(model, tokenizer, cfg, out_dir)
    result["wall_s"] = wall
    return result


@contextmanager
def _timed(wall: dict[str, float], part: str):
    start = time.perf_counter()
    yield
    wall[part] = round(time.perf_counter() - start, 2)


def special_token_check(tokenizer, cfg: dict) -> list[str]:
    """The problems (`s2ft.data.tokenize.special_token_problems`) of every text `measure_model` would give the model:
    the ``eval.tasks`` items and options, the MT-Bench turns and the ``eval.heldout`` items, as drawn for ``cfg``.

    Each measurement checks its own texts too, but only when it starts: a held-out set after every task was
    evaluated, a task after training when ``eval.before`` is off. The runner and ``mode=eval`` ask here as soon as
    the tokenizer loads, before any file of the run is written.
    """
    ev, problems = cfg["eval"], []
    if ev.get("tasks"):
        settings = _evaluate_settings(cfg)
        prepared = prepare_tasks(
            ev["tasks"], settings["data_dir"], settings["mode"], settings["limit"], cfg["seed"], ev.get("groups")
        )
        problems += task_problems(prepared, tokenizer, "eval task")
    if ev.get("mtbench"):
        path = question_file(ev["mtbench"], cfg["paths"]["data_dir"])
        every = load_questions(path, ev["mtbench"].get("references"))
        questions = select_questions(every, ev.get("limit"), cfg["seed"])
        turns = [(str(q.question_id), f"turn {i + 1}", turn) for q in questions for i, turn in enumerate(q.turns)]
        problems += special_token_problems(turns, tokenizer, f"eval.mtbench questions {path}")
    for name, examples in _heldout_sets(cfg):
        problems += special_token_problems(example_texts(examples), tokenizer, f"eval.heldout {name}")
    return problems


def eval_data(cfg: dict) -> list[dict]:
    """The provenance of every file `measure_model` reads for ``cfg``: the ``eval.tasks`` and ``eval.heldout`` files
    (`s2ft.data.sources.describe_eval_sources`) and the ``eval.mtbench`` question and reference files (role
    "mtbench"), each with its SHA-256, for a run's summary (``eval_data``): a user's file can change under its name.
    """
    ev, data_dir = cfg["eval"], cfg["paths"]["data_dir"]
    described = describe_eval_sources(ev.get("tasks"), ev.get("heldout"), data_dir, ev.get("groups"))
    if ev.get("mtbench"):
        files = {"questions": question_file(ev["mtbench"], data_dir), "references": ev["mtbench"].get("references")}
        described += [
            {"name": name, "role": "mtbench", "file": str(path), "sha256": file_digest(Path(path))}
            for name, path in files.items()
            if path
        ]
    return described


def measure_adapters(
    model, tokenizer, cfg: dict, templates: dict[str, str], out_dirs: dict[str, Path]
) -> dict[str, dict]:
    """`measure_model`'s task accuracy and held-out losses for every adapter of a mixed-adapter model, in one pass.

    Args:
        model: A model with the adapters loaded (`s2ft.load_adapters`).
        tokenizer: Its tokenizer.
        cfg: The evaluation's config (``eval`` settings, seed, data.max_length), shared by every adapter.
        templates: Adapter name -> the prompt template it was trained in.
        out_dirs: Adapter name -> its run directory (``predictions/`` under it).

    Returns:
        Adapter name -> ``{"eval", "heldout"}`` as `measure_model` gives them for that adapter alone, and ``wall_s``,
        the one batched pass's (every adapter's the same).
    """
    ev, wall = cfg["eval"], {}
    results = {name: {"eval": None, "heldout": {}, "wall_s": wall} for name in templates}
    if ev.get("tasks"):
        with _timed(wall, "tasks"):
            evaluated = evaluate_adapters(
                model, tokenizer, ev["tasks"], templates=templates, out_dirs=out_dirs, **_evaluate_settings(cfg)
            )
        for name, evaluation in evaluated.items():
            results[name]["eval"] = evaluation
    if ev.get("heldout"):
        with _timed(wall, "heldout"):
            for set_name, examples in _heldout_sets(cfg):
                scored = adapter_item_losses(
                    model, tokenizer, examples, ev.get("batch_size", 8), cfg["data"].get("max_length", 512), templates
                )
                for name, items in scored.items():
                    results[name]["heldout"][set_name] = mean_token_loss(items)
                    write_predictions(out_dirs[name] / "predictions" / f"heldout_{set_name}.jsonl", items)
    return results


def _evaluate_settings(cfg: dict) -> dict:
    """The keyword arguments of `evaluate` a run's ``eval`` config gives (all but the tasks, template and output)."""
    ev = cfg["eval"]
    return dict(
        data_dir=cfg["paths"]["data_dir"],
        mode=ev.get("mode", "generate"),
        limit=ev.get("limit"),
        seed=cfg["seed"],
        batch_size=ev.get("batch_size", 8),
        num_beams=ev.get("num_beams", 1),
        groups=ev.get("groups"),
        **({"max_new_tokens": ev["max_new_tokens"]} if ev.get("max_new_tokens") else {}),
    )


def _heldout_sets(cfg: dict):
    """(name, items) of every ``eval.heldout`` set: its ``eval.heldout_limit`` subset."""
    ev = cfg["eval"]
    for item in ev.get("heldout") or []:
        yield (
            heldout_name(item),
            eval_subset(load_heldout(item, cfg["paths"]["data_dir"]), ev.get("heldout_limit"), cfg["seed"]),
        )


def harness_results(model, tokenizer, cfg: dict, out_dir: Path) -> dict:
    """lm-evaluation-harness on the same items (`s2ft.evaluation.lm_eval_backend`), its files in ``out_dir/lm_eval``."""
    # The harness is an optional dependency: imported only by the runs that ask for it.
    from s2ft.evaluation.lm_eval_backend import LM_EVAL_TASKS, run_lm_eval

    ev, options = cfg["eval"], cfg["eval"].get("lm_eval") or {}
    return run_lm_eval(
        model,
        tokenizer,
        cfg["paths"]["data_dir"],
        out_dir / "lm_eval",
        tasks=options.get("tasks") or LM_EVAL_TASKS,
        limit=options.get("limit") or ev.get("limit"),
        seed=cfg["seed"],
        batch_size=ev.get("batch_size", 8),
        max_gen_toks=options.get("max_gen_toks"),
    )


def heldout_losses(model, tokenizer, cfg: dict, out_dir: Path) -> dict[str, float]:
    """Mean held-out loss of each `eval.heldout` set; per-item losses go to ``predictions/heldout_NAME.jsonl``.

    The per-item files let the report test a difference between two runs on the same items (a paired bootstrap).
    """
    ev, losses = cfg["eval"], {}
    for name, examples in _heldout_sets(cfg):
        items = heldout_item_losses(
            model,
            tokenizer,
            examples,
            ev.get("batch_size", 8),
            cfg["data"].get("max_length", 512),
            cfg["data"].get("template", "alpaca"),
        )
        losses[name] = mean_token_loss(items)
        write_predictions(out_dir / "predictions" / f"heldout_{name}.jsonl", items)
    return losses
