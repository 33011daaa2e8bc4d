"""Study tables: rows (a method and the settings that set it apart), averaged over seeds, compared with the best."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import NamedTuple

from experiments.report.runs import OPTIONAL_EVALS, ReportError, Run, flatten
from experiments.report.stats import ALPHA, Estimate, estimate, paired_bootstrap_p, welch_p
from s2ft.data import HELDOUT_DOMAINS

# A row's value of a setting its runs' configs lack (`Run.lacks`), as its label shows it.
UNKNOWN = "?"


@dataclass
class Row:
    """The runs (seeds) of one method variant within one (experiment, model) group.

    Attributes:
        label: The method and the settings that vary within it.
        runs: Its runs, one per seed.
        setting: Each varying setting's JSON value (None: a dict setting without that component; UNKNOWN: the
            runs' configs lack the setting).
    """

    label: str
    runs: list[Run]
    setting: dict[str, str | None] = field(default_factory=dict)

    def values(self, metric) -> list[float]:
        return [v for v in (metric(run.summary) for run in self.runs) if v is not None]

    def estimate(self, metric) -> Estimate | None:
        return estimate(self.values(metric))


class Comparison(NamedTuple):
    """Rows against one row: that row, each other row's p-value (None: untested) and the seeds its paired test used
    (None: Welch over all seeds, or untested)."""

    best: Row | None
    pvalues: dict[str, float | None]
    seeds: dict[str, list | None]


def group_runs(runs: list[Run]) -> dict[tuple[str, str], list[Run]]:
    """Runs by (experiment, model), in a stable order."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    return dict(sorted(groups.items()))


def build_rows(runs: list[Run]) -> list[Row]:
    """Rows of one group: runs with the same method and settings are seeds of one row.

    A row's label is the method plus the settings that vary between the runs of that method in this group, so a
    method sweep reads "s2ft", "lora", and a strategy sweep "s2ft options.strategy=weight options.order=small".

    A setting some runs' configs lack (an option added to the code after they ran: `Run.lacks`) is unknown for them,
    shown as ``key=?``, and their rows stay apart from those that name a value; `unknown_splits` names the rows that
    differ in nothing else. Merging them would assume the older code ran what the newer names (that of today's
    conf/ or another run's value), which neither record shows: a new option's default need not be the old behaviour.
    """
    _refuse_other_files(runs)
    by_method: dict[str, list[Run]] = {}
    for run in runs:
        by_method.setdefault(run.method, []).append(run)
    rows = []
    for method, method_runs in sorted(by_method.items()):
        settings = [run.settings() for run in method_runs]
        keys = sorted({k for s in settings for k in s})
        # An optional evaluation's setting is none for runs that did not run it (`Run.lacks`), which other settings
        # set apart (eval.backend, eval.tasks), so it labels rows only where it differs between runs that ran it.
        varying = [
            k for k in keys if len({s.get(k) for s in settings if k in s or not k.startswith(OPTIONAL_EVALS)}) > 1
        ]
        variants: dict[tuple, list[Run]] = {}
        for run, s in zip(method_runs, settings, strict=True):
            values = tuple(s.get(k, UNKNOWN if run.lacks(k) else None) for k in varying)
            variants.setdefault(values, []).append(run)
        ordered = sorted(variants.items(), key=lambda item: str(item[0]))
        labels = [_label(method, varying, values, _short) for values, _ in ordered]
        if len(set(labels)) < len(labels):  # shortened values that coincide (paths ending alike): the JSON values
            labels = [_label(method, varying, values, str) for values, _ in ordered]
        for label, (values, variant_runs) in zip(labels, ordered, strict=True):
            _refuse_repeated_seeds(label, variant_runs)
            rows.append(Row(label, variant_runs, dict(zip(varying, values, strict=True))))
    return rows


def unknown_splits(rows: list[Row]) -> list[tuple[Row, Row, list[str]]]:
    """Pairs of rows of one method whose settings differ only where one row's runs lack the setting (UNKNOWN), with
    those settings: perhaps one setting run by older and newer code, kept apart. The row lacking the first is first."""
    pairs = []
    for i, row in enumerate(rows):
        for other in rows[i + 1 :]:
            if other.runs[0].method != row.runs[0].method:
                continue
            differ = [k for k in row.setting if row.setting[k] != other.setting.get(k)]
            if all(UNKNOWN in (row.setting[k], other.setting.get(k)) for k in differ):
                pairs.append((row, other, differ) if row.setting[differ[0]] == UNKNOWN else (other, row, differ))
    return pairs


def _label(method: str, keys: list[str], values: tuple, show) -> str:
    """The method and its varying settings as ``key=show(value)``."""
    # A key that only some runs have (one component of a target_split dict) labels only those runs.
    present = [(k, v) for k, v in zip(keys, values, strict=True) if v is not None]
    shown = [f"{k.removeprefix('options.')}={UNKNOWN if v == UNKNOWN else show(v)}" for k, v in present]
    return " ".join([method, *shown])


def _refuse_other_files(runs: list[Run]) -> None:
    """Refuse runs of one study that measured a task or held-out set of one name on files of different content (the
    summaries' ``eval_data`` digests; runs that predate it are not checked): their numbers are of other items, and
    the item-paired tests would pair items by id across them.

    Raises:
        ReportError: Naming every such set, its digests and the runs of each.
    """
    measured: dict[tuple[str, str], dict[tuple, list[Run]]] = {}
    for run in runs:
        digests: dict[tuple[str, str], list] = {}
        for entry in run.summary.get("eval_data") or []:
            digests.setdefault((entry["role"], entry["name"]), []).append(entry.get("sha256"))
        for key, values in digests.items():
            measured.setdefault(key, {}).setdefault(tuple(values), []).append(run)
    problems = []
    for (role, name), by_digest in sorted(measured.items()):
        if len(by_digest) > 1:
            each = "; ".join(
                f"sha256 {', '.join(str(d)[:12] for d in digest)} in "
                + ", ".join(str(run.path) if run.path is not None else "a W&B run" for run in same)
                for digest, same in by_digest.items()
            )
            problems.append(f"{role} {name!r} was measured on files of other content ({each})")
    if problems:
        raise ReportError(
            "; ".join(problems) + ": report runs measured on one file, or give the changed file's task another name"
        )


def _refuse_repeated_seeds(label: str, runs: list[Run]) -> None:
    """Refuse two runs of one row with the same seed: counted as two seeds they would shift the row's mean and
    narrow its CI, while the item-paired tests would keep only one of them.

    Raises:
        ReportError: Naming the runs, the settings their configs differ in, and the fix.
    """
    by_seed: dict = {}
    for run in runs:
        by_seed.setdefault(run.summary.get("seed"), []).append(run)
    for seed, same in by_seed.items():
        if len(same) < 2:
            continue
        names = ", ".join(str(run.path) if run.path is not None else "a W&B run" for run in same)
        configs = [flatten(run.config or {}, "") for run in same]
        differ = sorted(k for k in {k for c in configs for k in c} if len({repr(c.get(k)) for c in configs}) > 1)
        differ = [k for k in differ if not k.startswith(".paths.") and k != ".ckpt_path"]
        what = f"their configs differ in {', '.join(k[1:] for k in differ)}" if differ else "a rerun of one config"
        raise ReportError(
            f"row {label!r} has {len(same)} runs of seed {seed} ({names}; {what}): pass only the run directories "
            "to report, one run per seed and setting"
        )


def _short(value: str) -> str:
    """A setting as a label shows it: a string without JSON quotes, a path (a fusion run's excluded adapter) by its
    last two parts, anything else as JSON."""
    setting = json.loads(value)
    if not isinstance(setting, str):
        return value
    return "/".join(PurePath(setting).parts[-2:]) if "/" in setting else setting


def avg_accuracy(summary: dict) -> float | None:
    return summary.get("avg_accuracy")


def task_accuracy(task: str):
    return lambda summary: (summary.get("eval") or {}).get(task, {}).get("accuracy")


def group_accuracy(group: str):
    return lambda summary: (summary.get("groups") or {}).get(group)


def heldout_after(name: str):
    return lambda summary: ((summary.get("heldout") or {}).get(name) or {}).get("after")


def mtbench_score(summary: dict) -> float | None:
    """The MT-Bench-style score (1-10, the mean over rated turns); None for runs without MT-Bench."""
    return (summary.get("mtbench") or {}).get("score")


def train_field(key: str):
    return lambda summary: (summary.get("train") or {}).get(key)


def train_domain(runs: list[Run]) -> str | None:
    """The domain of the runs' training data when every run's config names it and all of it is of one domain."""
    domains = [run.train_domains() for run in runs]
    if not domains or any(d is None for d in domains) or len(set.union(*domains)) != 1:
        return None
    return next(iter(domains[0]))


def heldout_roles(domain: str | None, names: list[str]) -> tuple[str, str] | None:
    """The (in-domain, out-of-domain) held-out sets among ``names`` for training data of ``domain``, if both exist."""
    inside = [name for name in names if domain is not None and HELDOUT_DOMAINS.get(name) == domain]
    outside = [name for name in names if HELDOUT_DOMAINS.get(name, domain) != domain]
    return (inside[0], outside[0]) if inside and outside else None


def trainable_pct(summary: dict) -> float | None:
    return summary.get("trainable_pct")


def compare_to_best(rows: list[Row], tasks: list[str], reference: str | None = None) -> Comparison:
    """The row with the best mean average accuracy and, per other row, the p-value of its difference from it.

    With ``reference`` (a row label) that row takes the best row's place (None, {}, {} when no row has accuracies).

    A paired bootstrap over the items of every task answered by the runs of both rows with the same seed (evaluation
    subsets are drawn per seed, so a seed's runs share their items) of the difference of the mean task accuracy,
    hierarchical over seeds when they share several;
    Welch's t-test over seeds for rows without shared items and two or more seeds each; else None.
    """

    def items(mine: list[Run], theirs: list[Run]):
        def correct(run: Run) -> dict:
            return {(task, item): ok for task in tasks for item, ok in run.item_correct(task).items()}

        a, b = _by_seed(mine, correct), _by_seed(theirs, correct)
        shared = sorted(a.keys() & b.keys())
        # Each item weighs 1/n of its (seed, task): the statistic is the unweighted mean over tasks that Avg is, not
        # the pooled item accuracy, which full test sets of different sizes (BoolQ's 3270 against OpenBookQA's 500)
        # would tilt towards the larger tasks, even to the other sign.
        n = Counter((seed, task) for seed, (task, _) in shared)
        weight = [1 / n[seed, task] for seed, (task, _) in shared]
        return _weighted_pairs(a, b, shared, weight)

    return _compare(rows, avg_accuracy, min_is_best=False, paired_items=items, reference=reference)


def compare_mtbench(rows: list[Row], reference: str | None = None) -> Comparison:
    """The row with the highest mean MT-Bench-style score and, per other row, the p-value of its difference.

    A paired bootstrap over the questions, of the mean rating over the turns (question, turn) that the runs of both
    rows with the same seed had rated (the summary's ``mtbench.ratings``), each seed weighing as one, hierarchical
    over seeds when they share several; Welch's t-test over seeds for rows without shared rated turns and two or more
    seeds each; else None.
    """

    def rated(run: Run) -> dict:
        ratings = (run.summary.get("mtbench") or {}).get("ratings") or {}
        return {(q, turn): r for q, turns in ratings.items() for turn, r in enumerate(turns) if r is not None}

    def items(mine: list[Run], theirs: list[Run]):
        a, b = _by_seed(mine, rated), _by_seed(theirs, rated)
        shared = sorted(a.keys() & b.keys(), key=str)
        n = Counter(seed for seed, _ in shared)
        # A question's turns are one conversation, its second turn asked after the model's first answer, rated by
        # one judge: they are resampled together, as one item of summed (weighted) ratings and weights, so the
        # statistic is still the mean over rated turns that the score is.
        question: dict[tuple, list[float]] = {}
        for seed, (q, turn) in shared:
            sums = question.setdefault((seed, q), [0.0, 0.0, 0.0])
            for slot, value in enumerate((a[seed, (q, turn)], b[seed, (q, turn)], 1.0)):
                sums[slot] += value / n[seed]
        return (
            [x for x, _, _ in question.values()],
            [y for _, y, _ in question.values()],
            [weight for _, _, weight in question.values()],
            [seed for seed, _ in question],
        )

    return _compare(rows, mtbench_score, min_is_best=False, paired_items=items, reference=reference)


def compare_heldout(rows: list[Row], name: str, reference: str | None = None) -> Comparison:
    """The row with the lowest mean held-out loss on ``name`` and, per other row, the p-value of its difference.

    With ``reference`` (a row label) that row takes the lowest row's place (None, {}, {} when no row has the loss).

    A paired bootstrap (per-token loss difference, each seed weighing as one) over the held-out items scored by the
    runs of both rows with the same seed, hierarchical over seeds when they share several; Welch's t-test over seeds
    for rows without shared items and two or more seeds each; else None.
    """

    def items(mine: list[Run], theirs: list[Run]):
        a = _by_seed(mine, lambda run: run.item_losses(name))
        b = _by_seed(theirs, lambda run: run.item_losses(name))
        # The same items tokenize to the same counts; a mismatch means different data or tokenizers: no pairing.
        shared = [item for item in sorted(a.keys() & b.keys()) if a[item][1] == b[item][1]]
        # Each seed weighs as one, as in the mean over seeds the table shows: its items' losses and tokens over its
        # token total (pooled tokens would weigh the seed that drew longer answers more).
        total = Counter()
        for seed, item in shared:
            total[seed] += a[seed, item][1]
        scale = [1 / total[seed] for seed, _ in shared]
        return (
            [a[i][0] * k for i, k in zip(shared, scale, strict=True)],
            [b[i][0] * k for i, k in zip(shared, scale, strict=True)],
            [a[i][1] * k for i, k in zip(shared, scale, strict=True)],
            [s for s, _ in shared],
        )

    return _compare(rows, heldout_after(name), min_is_best=True, paired_items=items, reference=reference)


def _weighted_pairs(a: dict, b: dict, shared: list, weight: list[float]):
    """The ``paired_items`` of `_compare` from two rows' ``(seed, item) -> score``: the shared items' scores times
    their weights, the weights, and each item's seed."""
    return (
        [a[i] * w for i, w in zip(shared, weight, strict=True)],
        [b[i] * w for i, w in zip(shared, weight, strict=True)],
        weight,
        [seed for seed, _ in shared],
    )


def _by_seed(runs: list[Run], read) -> dict:
    """``(seed, item) -> value`` over the runs of a row, from ``read(run)``: item -> value."""
    return {(run.summary.get("seed"), item): value for run in runs for item, value in read(run).items()}


def _compare(rows: list[Row], metric, min_is_best: bool, paired_items, reference: str | None = None) -> Comparison:
    """The best row by ``metric`` and each other row's p-value: ``paired_items`` bootstrapped, else Welch over seeds.

    ``paired_items(mine, theirs)`` takes two rows' runs and gives their paired item scores, optional weights and the
    seed of each item. A row with a non-finite value (a diverged run's NaN loss) is never the best and is untested:
    NaN compares as neither larger nor smaller, so it would have been "separable" at p = 0 and could be the best.
    """
    scored = [row for row in rows if row.values(metric)]
    if not scored:
        return Comparison(None, {}, {})
    if reference is None:
        finite = [row for row in scored if _finite(row.values(metric))]
        if not finite:
            return Comparison(None, {}, {})
        best = (min if min_is_best else max)(finite, key=lambda row: row.estimate(metric).mean)
    else:
        best = next((row for row in scored if row.label == reference), None)
        if best is None:
            return Comparison(None, {}, {})
    pvalues: dict[str, float | None] = {}
    seeds: dict[str, list | None] = {}
    for row in scored:
        if row is best:
            continue
        mine, theirs, weights, clusters = paired_items(row.runs, best.runs)
        a, b = row.values(metric), best.values(metric)
        pvalues[row.label], seeds[row.label] = None, None
        if not _finite(a + b + mine + theirs):
            continue
        if mine:
            pvalues[row.label] = paired_bootstrap_p(mine, theirs, weights=weights, clusters=clusters)
            seeds[row.label] = list(dict.fromkeys(clusters))
        elif len(a) >= 2 and len(b) >= 2:
            pvalues[row.label] = welch_p(a, b)
    return Comparison(best, pvalues, seeds)


def _finite(values: list[float]) -> bool:
    return all(math.isfinite(v) for v in values)


def separable(pvalues: dict[str, float | None], over_seeds: dict[str, float] | None = None) -> bool:
    """Whether at least one row differs from the best at the ALPHA level: its p, and its seed-level p where
    ``over_seeds`` has one (`markdown.seed_level_ps`)."""
    over_seeds = over_seeds or {}
    return any(p is not None and pair_separable(p, over_seeds.get(label)) for label, p in pvalues.items())


def pair_separable(p: float, over_seeds: float | None) -> bool:
    """Whether one pair differs at the ALPHA level: its p, and its seed-level p where it has one."""
    return p < ALPHA and (over_seeds is None or over_seeds < ALPHA)
