"""The comparison report: `report.md` with one table per (experiment, model) and PNG figures.

    python -m experiments.report outputs/multirun/commonsense_smollm [more run or sweep dirs] --out reports/cs
    python -m experiments.report --wandb ENTITY/PROJECT --out reports/wandb      (needs a network)
    python -m experiments.report outputs/STUDY --export-records results/STUDY/runs --out results/STUDY
    python -m experiments.report results/STUDY/runs --out results/STUDY          (the same report, from the records)

Rows are methods (and the settings that vary within a method, e.g. strategy and order), columns the tasks, then the
average, its 95% CI over seeds, the p-value of its difference from the best row, held-out losses, trainable %, train
time and peak memory; cells are mean ± std over seeds. Different experiments or models are never averaged together.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from experiments.report.figures import accuracy_vs_trainable, id_vs_ood, loss_curves
from experiments.report.records import export_records, plan_records
from experiments.report.runs import ReportError, Run, Unfinished, find_runs, find_unfinished, wandb_runs
from experiments.report.stats import ALPHA, Estimate, estimate, seed_level_p
from experiments.report.table import (
    UNKNOWN,
    Comparison,
    Row,
    avg_accuracy,
    build_rows,
    compare_heldout,
    compare_mtbench,
    compare_to_best,
    group_accuracy,
    group_runs,
    heldout_after,
    heldout_roles,
    mtbench_score,
    pair_separable,
    separable,
    task_accuracy,
    train_domain,
    train_field,
    trainable_pct,
    unknown_splits,
)
from s2ft.data.tasks import GROUPS
from s2ft.errors import UserError

SEED_LEVEL = (
    "Over seeds p: a t-test over the rows' per-seed differences (n - 1 degrees of freedom). With two or three seeds "
    "the bootstrap's p cannot see the seed-to-seed spread in full; read a pair as separable only where both are "
    f"below {ALPHA}."
)

# The accuracy p column: the item bootstrap's p against the best row, and the seed-level one where there is one.
P_HEADER = "p vs best (items / seeds)"

# Column titles of the generalization study's groups (s2ft.data.tasks.GROUPS), in the paper's Figure 2 order.
SPLIT_GROUPS = {"id": "ID", "near_ood_easy": "near-OOD easy", "near_ood_hard": "near-OOD hard", "far_ood": "far-OOD"}


def write_report(runs: list[Run], out: Path, reference: str | None = "s2ft", unfinished: list[Unfinished] = ()) -> Path:
    """Write `out/report.md` and `out/figures/*.png` for ``runs``; return the report's path.

    ``reference``: a row label (default "s2ft") whose differences from every other row are listed with p-values.
    ``unfinished``: run directories without a summary (`find_unfinished`), named in their study's section, or
    under the title when no finished run is of their study.
    """
    out.mkdir(parents=True, exist_ok=True)
    sections = ["# S2FT study report", ""]
    groups = group_runs(runs)
    elsewhere = [run for run in unfinished if run.group not in groups]
    sections += [unfinished_statement(elsewhere, "of no study below"), ""] if elsewhere else []
    for (experiment, model), group in groups.items():
        lacking = [run for run in unfinished if run.group == (experiment, model)]
        sections += study_section(experiment, model, group, out, reference, lacking)
    path = out / "report.md"
    path.write_text("\n".join(sections) + "\n")
    return path


def check_reference(runs: list[Run], reference: str) -> None:
    """Refuse a ``--reference`` that is no row's label in any study of ``runs`` (a typo would drop the comparisons).

    Raises:
        ReportError: Naming the labels there are.
    """
    labels = [row.label for group in group_runs(runs).values() for row in build_rows(group)]
    if reference not in labels:
        raise ReportError(
            f"--reference {reference!r} is no row of these runs; give one of: {', '.join(map(repr, labels))} "
            "(or '' for no reference)"
        )


def unfinished_statement(unfinished: list[Unfinished], where: str = "of this study") -> str:
    """One line naming the run directories without a summary.json, so a missing seed or row reads as missing."""
    count = f"{len(unfinished)} run director{'ies' if len(unfinished) > 1 else 'y'}"
    named = ", ".join(f"`{run.path}` ({run.state})" for run in unfinished)
    return f"Not in the table: {count} {where} without a summary.json (crashed, killed or still running): {named}."


def task_sets_statement(rows: list[Row]) -> str | None:
    """One line naming each row's tasks where the runs were scored on different ones (None when all on the same):
    their Avg values are then means over different tasks, while a p-value compares the tasks both rows scored."""
    # A row's runs can differ too: eval.tasks is a row setting, but a summary can lack tasks its config names.
    sets = {row.label: [sorted(run.summary.get("eval") or {}) for run in row.runs] for row in rows}
    if len({tuple(tasks) for runs in sets.values() for tasks in runs}) < 2:
        return None
    sets = {label: sorted({t for tasks in runs for t in tasks}) for label, runs in sets.items()}
    named = "; ".join(f"`{label}` ({', '.join(tasks) or 'none'})" for label, tasks in sets.items())
    return (
        f"Scored on different tasks, so Avg is a mean over different tasks from row to row (a p-value compares only "
        f"the items of tasks both rows scored; compare the task columns): {named}."
    )


def unknown_statement(rows: list[Row]) -> str | None:
    """One line naming the rows kept apart only by settings some of their runs' configs lack (None when none)."""
    pairs = unknown_splits(rows)
    if not pairs:
        return None
    named = "; ".join(f"`{a.label}` and `{b.label}` ({', '.join(keys)})" for a, b, keys in pairs)
    return (
        f"Kept apart, differing only in settings marked `{UNKNOWN}`, which their runs' configs lack (code from before "
        f"the option; whether those runs ran the other row's value the records cannot say): {named}."
    )


def study_section(
    experiment: str,
    model: str,
    runs: list[Run],
    out: Path,
    reference: str | None = None,
    unfinished: list[Unfinished] = (),
) -> list[str]:
    """The markdown of one study: table, significance statement and figures (and the study's ``unfinished`` runs,
    and the rows that differ only in settings some runs lack, where there are any)."""
    rows = build_rows(runs)
    tasks = list(dict.fromkeys(task for run in runs for task in (run.summary.get("eval") or {})))
    heldout = list(dict.fromkeys(name for run in runs for name in (run.summary.get("heldout") or {})))
    accuracy = compare_to_best(rows, tasks)
    best, pvalues = accuracy.best, accuracy.pvalues
    # The generalization study's split (Figure 2), shown when the runs were evaluated on more than one of its groups.
    groups = [g for g in SPLIT_GROUPS if any(g in (run.summary.get("groups") or {}) for run in runs)]
    groups = groups if len(groups) > 1 else []
    header = ["method", *tasks, "Avg", "Avg 95% CI", P_HEADER, *(SPLIT_GROUPS[g] for g in groups)]
    has_val = any((run.summary.get("train") or {}).get("val_loss") is not None for run in runs)
    # MT-Bench-style instruction scores (paper Table 3), where any run was judged.
    has_mtbench = any(mtbench_score(run.summary) is not None for run in runs)
    header += ["MT-Bench (1-10)"] * has_mtbench
    header += ["val loss"] * has_val + [f"loss {name}" for name in heldout]
    # Runs from before the pace was recorded have only wall time, which absorbs whatever else the machine ran.
    has_pace = any((run.summary.get("train") or {}).get("median_tokens_per_s") is not None for run in runs)
    header += ["trainable %", "train time (s)"] + ["train tokens/s"] * has_pace + ["peak mem (MB)", "seeds"]
    lines = [
        f"## {experiment} — {model}",
        "",
        f"{len(runs)} runs, {len(rows)} rows; accuracy in %, mean ± std over seeds.",
        "",
    ]
    lines += [unfinished_statement(unfinished), ""] if unfinished else []
    lines += [unknown, ""] if (unknown := unknown_statement(rows)) else []
    lines += [mixed, ""] if (mixed := task_sets_statement(rows)) else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    tops = tied(rows, best, avg_accuracy)
    # The accuracy pairs get their seed-level p as the held-out and MT-Bench ones do: the verdict needs both, and the
    # table's column shows both, starred only where the statement calls the pair separable.
    over_seeds = seed_level_ps(rows, best, avg_accuracy, accuracy.seeds, task_parts(tasks)) if best is not None else {}
    for row in rows:
        avg = row.estimate(avg_accuracy)
        p = pvalues.get(row.label)
        cells = [f"**{row.label}**" if row is best or row in tops else row.label]
        cells += [_fmt(row.estimate(task_accuracy(task)), 100, 1) for task in tasks]
        cells += [_fmt(avg, 100, 1), "-" if avg is None or avg.ci is None else f"± {100 * avg.ci:.1f}"]
        cells += ["best" if row is best else "-" if p is None else _p_cell(p, over_seeds.get(row.label))]
        cells += [_fmt(row.estimate(group_accuracy(g)), 100, 1) for g in groups]
        cells += [_fmt(row.estimate(mtbench_score), 1, 2)] * has_mtbench
        cells += [_fmt(row.estimate(train_field("val_loss")), 1, 4)] * has_val
        cells += [_fmt(row.estimate(heldout_after(name)), 1, 4) for name in heldout]
        cells += [_fmt(row.estimate(trainable_pct), 1, 3), _fmt(row.estimate(train_field("wall_s")), 1, 0)]
        cells += [_fmt(row.estimate(train_field("median_tokens_per_s")), 1, 0)] * has_pace
        cells += [_fmt(row.estimate(train_field("peak_mem_mb")), 1, 0), str(len(row.runs))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", significance_statement(best, pvalues, tops, over_seeds), ""]
    lowest = {name: compare_heldout(rows, name) for name in heldout}
    lines += [
        line
        for name in heldout
        if (
            line := heldout_statement(
                name, *lowest[name], rows, heldout_after(name), tied(rows, lowest[name].best, heldout_after(name))
            )
        )
    ]
    lines += [""] if heldout else []
    highest = compare_mtbench(rows) if has_mtbench else Comparison(None, {}, {})
    if highest.best is not None and any(p is not None for p in highest.pvalues.values()):
        over_seeds = seed_level_ps(rows, highest.best, mtbench_score, highest.seeds, turn_parts)
        verdict = pairs_verdict(highest.pvalues, over_seeds)
        top = _named(highest.best, tied(rows, highest.best, mtbench_score))
        lines += [f"- MT-Bench-style score: highest {top}; {verdict}.", ""]
    if reference is not None:

        def against_reference(found: Comparison, compare) -> Comparison:
            # When the reference is the best row its comparisons are the ones already made.
            return found if found.best is not None and found.best.label == reference else compare()

        accuracy = against_reference(accuracy, lambda: compare_to_best(rows, tasks, reference))
        against = [reference_statement("Avg accuracy", avg_accuracy, 100, 1, rows, *accuracy, parts=task_parts(tasks))]
        against += [
            reference_statement(
                f"held-out loss {name}",
                heldout_after(name),
                1,
                4,
                rows,
                *against_reference(lowest[name], lambda name=name: compare_heldout(rows, name, reference)),
                parts=heldout_parts(name),
            )
            for name in heldout
        ]
        if has_mtbench:
            mtbench = against_reference(highest, lambda: compare_mtbench(rows, reference))
            against.append(
                reference_statement("MT-Bench-style score", mtbench_score, 1, 2, rows, *mtbench, parts=turn_parts)
            )
        against = [line for line in against if line]
        if against:
            title = (
                f"`{reference}` against each other row (difference of means, other row minus `{reference}`; "
                "p as above):"
            )
            lines += [title, "", *against, ""]
    lines += [SEED_LEVEL, ""] if any("over seeds p=" in line for line in lines) else []
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{experiment}_{model}")
    title = f"{experiment} ({model})"
    domain = train_domain(runs)
    # GROUPS' id / far_ood tasks are the generalization study's split, for training on arithmetic.
    id_tasks = [t for t in tasks if t in GROUPS["id"]] if domain == "arithmetic" else []
    ood_tasks = [t for t in tasks if t in GROUPS["far_ood"] and t not in id_tasks]
    roles = heldout_roles(domain, heldout)
    figures = [
        accuracy_vs_trainable(rows, title, out / "figures" / f"{stem}_accuracy_vs_trainable.png"),
        id_vs_ood(rows, id_tasks, ood_tasks, roles, title, out / "figures" / f"{stem}_id_vs_ood.png"),
        loss_curves(rows, title, out / "figures" / f"{stem}_loss_curves.png"),
    ]
    lines += [f"![{fig.stem}](figures/{fig.name})" for fig in figures if fig is not None]
    return lines + [""]


def tied(rows: list[Row], best: Row | None, metric) -> list[Row]:
    """The other rows whose mean of ``metric`` is exactly ``best``'s: the best mean is theirs as much as its (it
    came first among them by label), so the table bolds them all and the prose names them all."""
    top = None if best is None else best.estimate(metric)
    if top is None:
        return []
    return [
        row for row in rows if row is not best and (mean := row.estimate(metric)) is not None and mean.mean == top.mean
    ]


def _named(best: Row, tops: list[Row]) -> str:
    """The best row's label in a code span, with the rows tied with it."""
    return f"`{best.label}`" + (f", tied with {', '.join(f'`{row.label}`' for row in tops)}" if tops else "")


def significance_statement(
    best: Row | None,
    pvalues: dict[str, float | None],
    tops: list[Row] = (),
    over_seeds: dict[str, float] | None = None,
) -> str:
    """One sentence on whether the study separates its rows (never a ranking the data do not support); ``tops``:
    the rows tied with ``best`` (`tied`); ``over_seeds``: the seed-level p of the pairs compared over two or more
    seeds (`seed_level_ps`), which a pair's verdict needs below the level as well (`pairs_verdict`).

    Row labels go in code spans wherever they appear in prose: the untrained row is "none", which reads as "no row".
    """
    if best is None:
        return "No run has task accuracies, so no row is compared."
    if not pvalues:
        return f"Only one row (`{best.label}`): nothing to compare."
    untested = [f"`{label}`" for label, p in sorted(pvalues.items()) if p is None]
    if len(untested) == len(pvalues):
        # Not "not separable": no test ran (one seed each and no item predictions to pair, or a NaN).
        return (
            f"Untested: no row could be compared with the best mean ({_named(best, tops)}) (no items both rows' runs "
            "of one seed scored, and not two seeds each for Welch); do not rank these rows."
        )
    over_seeds = over_seeds or {}
    if not separable(pvalues, over_seeds):
        # Pairs the item bootstrap alone separates stay named with both p: "no row differs" would hide them.
        alone = [
            f"`{label}` ({_p_text(p, over_seeds.get(label))})"
            for label, p in sorted(pvalues.items())
            if p is not None and p < ALPHA
        ]
        tail = f"; separable by the item bootstrap alone: {', '.join(alone)}" if alone else ""
        tail += f"; untested: {', '.join(untested)}" if untested else ""
        return (
            f"Not separable: no row differs from the best mean ({_named(best, tops)}) at the {ALPHA:.0%} level "
            "(paired bootstrap over the items of runs with the same seed, hierarchical over seeds, and the t-test "
            f"over seeds where they share two or more; else Welch over seeds){tail}; do not rank these rows."
        )
    return f"Best mean: {_named(best, tops)}; {pairs_verdict(pvalues, over_seeds)} (p < {ALPHA} marked *)."


def heldout_statement(
    name: str,
    best: Row | None,
    pvalues: dict[str, float | None],
    seeds: dict | None = None,
    rows: list[Row] | None = None,
    metric=None,
    tops: list[Row] = (),
) -> str | None:
    """One line per held-out set: the lowest loss and which rows differ from it, and which were untested (a NaN
    loss, one seed without items to pair); None when nothing was tested. With ``seeds``, ``rows`` and ``metric``,
    pairs compared over two or more seeds also get their seed-level p (`seed_level_ps`); ``tops``: rows tied with
    ``best`` (`tied`)."""
    if best is None or all(p is None for p in pvalues.values()):
        return None
    over_seeds = seed_level_ps(rows, best, metric, seeds, heldout_parts(name)) if rows is not None else {}
    return f"- Held-out loss {name}: lowest {_named(best, tops)}; {pairs_verdict(pvalues, over_seeds)}."


def seed_level_ps(rows: list[Row], reference: Row, metric, seeds: dict | None, parts=None) -> dict[str, float]:
    """Per row whose paired test compared two or more seeds with ``reference``: the t-test p over its per-seed
    differences (`stats.seed_level_p`), which charges the seed-to-seed spread that few seeds hide from the
    hierarchical bootstrap. ``parts`` (`task_parts`, `heldout_parts`, `turn_parts`): what ``metric`` is a mean of,
    so that a seed whose two runs scored different parts differs over those both scored (`_seed_difference`)."""
    by_label, found = {row.label: row for row in rows}, {}
    for label, shared in (seeds or {}).items():
        if shared and len(shared) >= 2 and label in by_label:
            row = by_label[label]
            found[label] = seed_level_p([_seed_difference(row, reference, metric, s, parts) for s in shared])
    return found


def task_parts(tasks: list[str]):
    """Avg accuracy's parts (`seed_level_ps`): each task's accuracy, weighing one."""
    return lambda run: {t: (a, 1.0) for t in tasks if (a := task_accuracy(t)(run.summary)) is not None}


def heldout_parts(name: str):
    """A held-out loss's parts (`seed_level_ps`): each item's summed loss, weighing its tokens."""
    return lambda run: {item: (nll, float(tokens)) for item, (nll, tokens) in run.item_losses(name).items()}


def turn_parts(run: Run) -> dict:
    """The MT-Bench score's parts (`seed_level_ps`): each rated turn's rating, weighing one."""
    ratings = (run.summary.get("mtbench") or {}).get("ratings") or {}
    return {(q, t): (r, 1.0) for q, turns in ratings.items() for t, r in enumerate(turns) if r is not None}


def _seed_difference(row: Row, reference: Row, metric, seed, parts=None) -> float:
    """``row``'s ``metric`` minus ``reference``'s at ``seed``. Where the two runs scored different ``parts`` (tasks,
    held-out items, rated turns), the difference over the parts both scored with the same weight, as the bootstrap
    pairs them (`table.compare_to_best` and the like): the summaries' values are over parts it never compares."""
    if parts is not None:
        mine, theirs = (next(run for run in r.runs if run.summary.get("seed") == seed) for r in (row, reference))
        a, b = parts(mine), parts(theirs)
        both = [key for key in a.keys() & b.keys() if a[key][1] == b[key][1]]
        if both and not len(both) == len(a) == len(b):
            return sum(a[k][0] - b[k][0] for k in both) / sum(a[k][1] for k in both)
    return _mean_over(row, metric, [seed]) - _mean_over(reference, metric, [seed])


def _p_text(p: float, over_seeds: float | None) -> str:
    seeds = "" if over_seeds is None else f"; over seeds {_p_is(over_seeds)}"
    return f"{_p_is(p)}{seeds}"


def _p_is(p: float) -> str:
    """``p=0.010 *``, or ``p<0.001 *`` for a p `_fmt_p` prints as below a thousandth."""
    text = _fmt_p(p)
    return f"p{text}" if text.startswith("<") else f"p={text}"


def pairs_verdict(pvalues: dict[str, float | None], over_seeds: dict[str, float] | None = None) -> str:
    """Which rows differ from the compared row and which do not, each with its p-value (and its seed-level p).

    One separable row (often the untrained one) says nothing of the others, so every pair is named on its side. A
    pair with a seed-level p is separable only where it is below the level too (`SEED_LEVEL`): with two or three
    seeds the bootstrap's p alone was "separable" at p = 0.000 beside a seed-level p of 0.053.
    """
    over_seeds = over_seeds or {}
    tested = sorted((label, p) for label, p in pvalues.items() if p is not None)
    split = {label: pair_separable(p, over_seeds.get(label)) for label, p in tested}
    apart = [f"`{label}` ({_p_text(p, over_seeds.get(label))})" for label, p in tested if split[label]]
    close = [f"`{label}` ({_p_text(p, over_seeds.get(label))})" for label, p in tested if not split[label]]
    untested = [f"`{label}`" for label, p in sorted(pvalues.items()) if p is None]
    parts = [f"separable from it: {', '.join(apart) or 'no row'}"]
    parts += [f"not separable from it: {', '.join(close)}"] * bool(close)
    parts += [f"untested: {', '.join(untested)}"] * bool(untested)
    return "; ".join(parts)


def reference_statement(
    what: str,
    metric,
    scale: float,
    digits: int,
    rows: list[Row],
    reference: Row | None,
    pvalues: dict,
    seeds: dict | None = None,
    parts=None,
) -> str | None:
    """One line: each row's mean difference from the reference row on ``metric`` and its p-value.

    ``seeds``: per row, the seeds its paired test compared (`Comparison.seeds`). Where those are not all the seeds
    of both rows, the difference is of the means over those seeds, named: the means over each row's own seeds (and
    so, with evaluation items drawn per seed, over different items) can differ in sign from what the p-value tests.
    ``parts``: what ``metric`` is a mean of (`seed_level_ps`).
    """
    if reference is None or not pvalues:
        return None
    by_label = {row.label: row for row in rows}
    over_seeds = seed_level_ps(rows, reference, metric, seeds, parts)
    cells = []
    for label, p in sorted(pvalues.items()):
        row, shared = by_label[label], (seeds or {}).get(label)
        ran = {run.summary.get("seed") for run in row.runs} | {run.summary.get("seed") for run in reference.runs}
        if shared is None or set(shared) == ran:
            diff, over = row.estimate(metric).mean - reference.estimate(metric).mean, ""
        else:
            diff = _mean_over(row, metric, shared) - _mean_over(reference, metric, shared)
            over = f" over seed{'s' * (len(shared) > 1)} {', '.join(map(str, shared))}"
        tested = "untested" if p is None else _p_text(p, over_seeds.get(label))
        cells.append(f"`{label}` {scale * diff:+.{digits}f}{over} ({tested})")
    return f"- {what}: {', '.join(cells)}."


def _mean_over(row: Row, metric, seeds: list) -> float:
    return estimate(Row(row.label, [run for run in row.runs if run.summary.get("seed") in seeds]).values(metric)).mean


def _p_cell(p: float, over_seeds: float | None) -> str:
    """The table's `P_HEADER` cell: the item bootstrap's p and the seed-level one ("0.005 / 0.055"), starred only
    where the pair is separable (`table.pair_separable`): a lone bootstrap star beside "not separable" read as a
    difference."""
    text = _fmt_p(p).removesuffix(" *")
    text += "" if over_seeds is None else f" / {_fmt_p(over_seeds).removesuffix(' *')}"
    return f"{text} *" if pair_separable(p, over_seeds) else text


def _fmt_p(p: float) -> str:
    """A p-value as the report prints it, starred when significant: three digits, "<0.001" where they would print
    0.000, and as many more digits as it takes where three would round it up to the level ("0.050 *" would read as
    not significant beside its star)."""
    if p < 0.0005:
        # What three digits print as 0.000: a bootstrap with no resample as extreme says p is below a few in 10,000,
        # never that it is zero.
        return f"<0.001{' *' if p < ALPHA else ''}"
    digits = 3
    text = f"{p:.{digits}f}"
    while p < ALPHA <= float(text):  # a t-test's p can be 0.04996, which four digits round up as well
        digits += 1
        text = f"{p:.{digits}f}"
    return f"{text}{' *' if p < ALPHA else ''}"


def _fmt(value: Estimate | None, scale: float, digits: int) -> str:
    if value is None:
        return "-"
    mean = f"{scale * value.mean:.{digits}f}"
    return mean if value.n == 1 else f"{mean} ± {scale * value.std:.{digits}f}"


def _records_in(folder: Path) -> list[Run]:
    """The records already in ``folder`` (none where it holds none yet)."""
    has_records = folder.is_dir() and any(folder.rglob("summary.json"))
    return find_runs([folder]) if has_records else []


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", help="run directories, sweep directories or summary.json files")
    parser.add_argument("--out", type=Path, default=Path("outputs/report"), help="folder for report.md and figures")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read the runs from W&B instead of local folders")
    parser.add_argument(
        "--reference", help="row label compared with every other row (default s2ft where there is one; '' for none)"
    )
    parser.add_argument(
        "--export-records",
        metavar="DIR",
        type=Path,
        help="first write the runs' compact records into DIR (e.g. results/STUDY/runs), then report every record there",
    )
    args = parser.parse_args(argv)
    if bool(args.paths) == bool(args.wandb):
        parser.error("give run/sweep directories or --wandb ENTITY/PROJECT (exactly one of them)")
    if args.wandb and args.export_records:
        parser.error("--export-records needs run directories: W&B runs have no per-item predictions to keep")
    try:
        for flag, folder in (("--out", args.out), ("--export-records", args.export_records)):
            if folder is not None and folder.exists() and not folder.is_dir():
                raise ReportError(f"{flag} {folder} is a file; give a folder (it is created where missing)")
        runs = wandb_runs(args.wandb) if args.wandb else find_runs(args.paths)
        unfinished = [] if args.wandb else find_unfinished(args.paths)
        if args.reference:
            check_reference(runs, args.reference)
        # What the report would refuse (a second run of one seed) is refused before --out or a record is written;
        # a record given beside the run it came from is that run.
        planned = runs
        if args.export_records:
            plan = plan_records(runs, args.export_records)
            names = {args.export_records.resolve() / name for _, name in plan}
            kept = _records_in(args.export_records)  # the report reads those other records too
            planned = [run for run, _ in plan] + [run for run in kept if run.path.resolve() not in names]
        for group in group_runs(planned).values():
            build_rows(group)
        if args.export_records:
            records = export_records(runs, args.export_records)
            print(f"wrote {len(records)} records under {args.export_records}")
            runs = find_runs([args.export_records])
        # The report names what it read: records are of finished runs only, so it is their records' report again.
        reported = find_unfinished([args.export_records]) if args.export_records else unfinished
        reference = "s2ft" if args.reference is None else args.reference or None
        path = write_report(runs, args.out, reference, reported)
    except UserError as err:
        sys.exit(f"error: {err}")
    print(f"wrote {path} ({len(runs)} runs)")
    if unfinished:
        where = "not exported: no record, no row" if args.export_records else "no row; the report names them"
        print(
            f"{len(unfinished)} run director{'ies' if len(unfinished) > 1 else 'y'} without a summary.json ({where}):"
        )
        print("".join(f"  {run.path} ({run.state})\n" for run in unfinished), end="")
    return path


if __name__ == "__main__":
    main()
