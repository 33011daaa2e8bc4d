"""What a run measures on a model, from its resolved config: task accuracy, held-out losses, MT-Bench, the harness.

The runner measures the untrained and the trained model with it, `mode=eval` a saved one, the fusion study a fused
one; every output file goes under the given run directory (``predictions/``, ``lm_eval/``).
"""

from __future__ import annotations

from pathlib import Path

from s2ft.data import eval_subset, load_heldout
from s2ft.data.sources import heldout_name
from s2ft.evaluation.evaluate import evaluate, write_predictions
from s2ft.evaluation.heldout import heldout_item_losses, mean_token_loss
from s2ft.evaluation.mtbench import run_mtbench


def measure_model(model, tokenizer, cfg: dict, out_dir: Path) -> dict:
    """Task accuracy (`s2ft.evaluation.evaluate`) and held-out losses of `model`, predictions under `out_dir`.

    Returns:
        ``{"eval": evaluate's result or None, "heldout": {NAME: loss}}``, plus ``"mtbench"`` with ``eval.mtbench``
        and ``"lm_eval"`` with ``eval.backend=lm_eval``.
    """
    ev, data_dir = cfg["eval"], cfg["paths"]["data_dir"]
    result = {"eval": None}
    if ev.get("tasks"):
        kwargs = {"max_new_tokens": ev["max_new_tokens"]} if ev.get("max_new_tokens") else {}
        result["eval"] = evaluate(
            model,
            tokenizer,
            ev["tasks"],
            data_dir=data_dir,
            mode=ev.get("mode", "generate"),
            limit=ev.get("limit"),
            seed=cfg["seed"],
            batch_size=ev.get("batch_size", 8),
            num_beams=ev.get("num_beams", 1),
            out_dir=out_dir,
            template=cfg["data"].get("template", "alpaca"),
            groups=ev.get("groups"),
            **kwargs,
        )
    if ev.get("mtbench"):
        result["mtbench"] = run_mtbench(model, tokenizer, cfg, out_dir)
    result["heldout"] = heldout_losses(model, tokenizer, cfg, out_dir)
    if ev.get("backend", "s2ft") == "lm_eval":
        result["lm_eval"] = harness_results(model, tokenizer, cfg, out_dir)
    return result


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
    for item in ev.get("heldout") or []:
        name = heldout_name(item)
        examples = eval_subset(load_heldout(item, cfg["paths"]["data_dir"]), ev.get("heldout_limit"), cfg["seed"])
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
