"""The report on summaries of real smoke runs: grouping, seed statistics, significance, figures, CLI."""

import copy
import gzip
import json
import math
import re
import shutil
import statistics
from pathlib import Path

import pytest
import wandb
import yaml
from conftest import ROOT, compose_run
from scipy import stats

from experiments.report import records as records_module
from experiments.report.markdown import (
    P_HEADER,
    _p_cell,
    _p_is,
    heldout_statement,
    main,
    pairs_verdict,
    significance_statement,
    write_report,
)
from experiments.report.records import export_records, write_record
from experiments.report.runs import Run, find_runs, find_unfinished, wandb_runs
from experiments.report.stats import ALPHA, estimate, paired_bootstrap_p, seed_level_p, welch_p
from experiments.report.table import (
    Row,
    avg_accuracy,
    build_rows,
    compare_heldout,
    compare_mtbench,
    compare_to_best,
    heldout_after,
    heldout_roles,
    train_domain,
    unknown_splits,
)
from experiments.study import backfill_heldout
from s2ft.data import HELDOUT_DOMAINS, TRAIN_SETS
from s2ft.lightning import run_experiment
from s2ft.lightning.summary import flat_metrics

# (method variant, seed): two seeds of each, so the rows share the items of two seeds (a hierarchical bootstrap), one
# seed of a row alone is a flat one, and W&B runs (no prediction files) fall back to Welch's t-test over seeds.
RUNS = [("smollm/s2ft", 0), ("smollm/s2ft", 1), ("smollm/lora", 0), ("smollm/lora", 1)]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A sweep directory of real smoke runs of commonsense_smollm (tiny model, 2 steps, 3 items per task)."""
    root = tmp_path_factory.mktemp("sweep")
    for i, (method, seed) in enumerate(RUNS):
        cfg = compose_run("+experiment=commonsense_smollm", f"method={method}", f"seed={seed}", "debug=smoke")
        cfg["paths"].update(root=str(ROOT), data_dir=str(ROOT / "data"))
        cfg["eval"].update(tasks=["boolq", "arc_easy"], limit=3, heldout_limit=4)
        cfg["trainer"]["max_steps"] = 2
        run_experiment(cfg, root / str(i))
    return root


def test_an_overwritten_runs_outputs_waiting_in_a_hidden_folder_are_no_run(sweep, tmp_path):
    copy = shutil.copytree(sweep, tmp_path / "sweep")
    shutil.copytree(copy / "0", copy / "1" / ".overwritten")
    assert [run.path for run in find_runs([copy])] == [copy / str(i) for i in range(len(RUNS))]


def test_a_summary_that_is_not_json_is_named(sweep, tmp_path):
    """Was json's JSONDecodeError, naming neither the file nor the run."""
    runs_dir = shutil.copytree(sweep, tmp_path / "sweep")
    (runs_dir / "2" / "summary.json").write_text('{"experiment": "commonsense_smollm", "meth')
    with pytest.raises(
        ValueError, match=rf"^{re.escape(str(runs_dir / '2' / 'summary.json'))} is not a readable summary"
    ):
        find_runs([runs_dir])


def test_runs_are_found_and_grouped_into_rows(sweep):
    runs = find_runs([sweep])
    assert len(runs) == len(RUNS)
    rows = build_rows(runs)
    assert [(row.label, len(row.runs)) for row in rows] == [("lora", 2), ("s2ft", 2)]
    s2ft = rows[1]
    accuracies = [json.loads((sweep / str(i) / "summary.json").read_text())["avg_accuracy"] for i in (0, 1)]
    got = s2ft.estimate(avg_accuracy)
    assert got.mean == pytest.approx(statistics.mean(accuracies), abs=1e-12)
    assert got.std == pytest.approx(statistics.stdev(accuracies), abs=1e-12)


def test_rows_of_a_component_sweep_are_labelled_by_their_component():
    def run(split: dict, seed: int) -> Run:
        summary = {"experiment": "components_smollm", "model": "smollm2_135m", "method": "s2ft", "seed": seed}
        options = {"target_split": split, "strategy": "random", "seed": seed}
        return Run(summary, {"method": {"name": "s2ft", "lr": 1e-3, "options": options}, "seed": seed})

    runs = [run({c: 1.0}, seed) for c in ("q", "o", "down") for seed in (0, 1)]
    rows = build_rows(runs)
    assert sorted(row.label for row in rows) == [
        "s2ft target_split.down=1.0",
        "s2ft target_split.o=1.0",
        "s2ft target_split.q=1.0",
    ]
    assert all(len(row.runs) == 2 for row in rows)

    # A string setting reads without JSON quotes (a strategy sweep).
    for r in runs:
        r.config["method"]["options"]["strategy"] = "weight" if r.config["seed"] else "gradient"
    assert "s2ft strategy=gradient target_split.q=1.0" in {row.label for row in build_rows(runs)}


def test_report_tables_and_figures(sweep, tmp_path):
    report = write_report(find_runs([sweep]), tmp_path).read_text()
    assert "## commonsense_smollm — tiny_llama" in report
    table = [line for line in report.splitlines() if line.startswith("| ")]
    assert table[0].split(" | ")[1:4] == ["boolq", "arc_easy", "Avg"]
    assert len(table) == 1 + 2  # header + two rows
    assert "Not separable" in report or "Best mean" in report
    for name in ("accuracy_vs_trainable", "id_vs_ood", "loss_curves"):
        png = tmp_path / "figures" / f"commonsense_smollm_tiny_llama_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"figures/{png.name}" in report


def _column(report: str, title: str) -> dict[str, str] | None:
    """Row label -> cell of the report's column ``title`` (None when the table has no such column)."""
    table = [line.split(" | ") for line in report.splitlines() if line.startswith("| ") and "---" not in line]
    if title not in table[0]:
        return None
    return {row[0].strip("| *"): row[table[0].index(title)] for row in table[1:]}


def test_pace_column_shows_the_runs_median_tokens_per_s_when_recorded(sweep, tmp_path):
    runs = find_runs([sweep])

    s2ft = [run for run in runs if run.method == "s2ft"]
    paces = [run.summary["train"]["median_tokens_per_s"] for run in s2ft]
    expected = f"{statistics.mean(paces):.0f} ± {statistics.stdev(paces):.0f}"
    assert _column(write_report(runs, tmp_path / "with").read_text(), "train tokens/s")["s2ft"] == expected
    for run in runs:  # runs written before the pace was recorded
        run.summary["train"].pop("median_tokens_per_s")
    assert _column(write_report(runs, tmp_path / "without").read_text(), "train tokens/s") is None


def test_generalization_groups_are_columns_of_the_table(sweep, tmp_path, monkeypatch):
    runs = find_runs([sweep])
    for i, run in enumerate(runs):  # as if each had been evaluated on the ID, near-OOD (easy) and far-OOD sets
        run.summary["groups"] = {"id": 0.1 + 0.01 * i, "near_ood_easy": 0.2 + 0.03 * i, "far_ood": 0.4 - 0.02 * i}
    report = write_report(runs, tmp_path / "split").read_text()
    assert _column(report, "near-OOD hard") is None  # not evaluated
    for group, title in (("id", "ID"), ("near_ood_easy", "near-OOD easy"), ("far_ood", "far-OOD")):
        for label, cell in _column(report, title).items():
            values = [100 * run.summary["groups"][group] for run in runs if run.method == label]
            assert cell == f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"

    # The same columns from W&B: the runner logs the groups as groups/GROUP.
    remote = [FakeWandbRun(sweep / str(i), i) for i in range(len(runs))]
    for fake, run in zip(remote, runs, strict=True):
        fake.summary.update(flat_metrics(run.summary))
    monkeypatch.setattr(wandb, "Api", lambda: type("Api", (), {"runs": lambda self, p: remote})())
    from_wandb = write_report(wandb_runs("team/s2ft"), tmp_path / "wandb").read_text()
    assert _column(from_wandb, "near-OOD easy") == _column(report, "near-OOD easy")

    # A commonsense study's only split group is far-OOD, the same sets as Avg: no group column.
    for run in runs:
        run.summary["groups"] = {"commonsense": run.summary["avg_accuracy"], "far_ood": run.summary["avg_accuracy"]}
    assert _column(write_report(runs, tmp_path / "one").read_text(), "far-OOD") is None


def test_heldout_roles_follow_the_training_data(sweep):
    runs = find_runs([sweep])
    assert train_domain(runs) == "commonsense"  # commonsense_mix: forgetting is measured on GSM8K, not the reverse
    names = ["gsm8k_test", "commonsense_test"]
    assert heldout_roles("commonsense", names) == ("commonsense_test", "gsm8k_test")
    assert heldout_roles("arithmetic", names) == ("gsm8k_test", "commonsense_test")
    assert heldout_roles("instruction", names) is None and heldout_roles(None, names) is None
    assert heldout_roles("arithmetic", ["gsm8k_test"]) is None
    arith = copy.deepcopy(runs[0])
    arith.config["data"]["train"] = ["gsm8k"]
    assert train_domain([arith]) == "arithmetic" and train_domain([arith, *runs]) is None  # mixed: no roles
    arith.config = None
    assert train_domain([arith]) is None
    assert set(HELDOUT_DOMAINS.values()) <= {source.domain for source in TRAIN_SETS.values()}


def test_different_experiments_are_never_averaged_together(sweep, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(sweep / "0", other)
    summary = json.loads((other / "summary.json").read_text())
    summary["experiment"] = "arith_smollm"
    (other / "summary.json").write_text(json.dumps(summary))
    report = write_report(find_runs([sweep, other]), tmp_path / "out").read_text()
    assert "## arith_smollm — tiny_llama" in report and "## commonsense_smollm — tiny_llama" in report
    arith = report.split("## arith_smollm")[1].split("## commonsense_smollm")[0]
    assert "1 runs, 1 rows" in arith and "Only one row" in arith


def _seed(row, seed):
    return next(run for run in row.runs if run.summary["seed"] == seed)


def _paired(mine: Row, theirs: Row, tasks: list[str]) -> tuple[list, list, list]:
    """The two rows' correct/incorrect items of the seeds both have, in (seed, task, item) order, and their seeds."""
    seeds = sorted({r.summary["seed"] for r in mine.runs} & {r.summary["seed"] for r in theirs.runs})
    keys = [(seed, t, i) for seed in seeds for t in sorted(tasks) for i in sorted(_seed(mine, seed).item_correct(t))]
    a = [_seed(mine, seed).item_correct(t)[i] for seed, t, i in keys]
    b = [_seed(theirs, seed).item_correct(t)[i] for seed, t, i in keys]
    return a, b, [seed for seed, _, _ in keys]


def test_rows_are_compared_over_the_items_of_every_shared_seed(sweep):
    rows = build_rows(find_runs([sweep]))
    best, pvalues, _ = compare_to_best(rows, ["boolq", "arc_easy"])
    other = next(row for row in rows if row is not best)
    assert set(pvalues) == {other.label}
    # Both rows ran seeds 0 and 1; each seed drew its own 3 items per task: 12 pairs in two clusters.
    mine, theirs, seeds = _paired(other, best, ["boolq", "arc_easy"])
    assert len(mine) == 12 and seeds == [0] * 6 + [1] * 6
    assert pvalues[other.label] == paired_bootstrap_p(mine, theirs, clusters=seeds)

    # A row with one seed is paired with the other row's run of that seed only: a flat bootstrap over its items.
    single = Row(other.label, [_seed(other, 1)])
    best_single, pvalues, _ = compare_to_best([single, best], ["boolq", "arc_easy"], reference=best.label)
    mine, theirs, seeds = _paired(single, best, ["boolq", "arc_easy"])
    assert best_single is best and seeds == [1] * 6
    assert pvalues[other.label] == paired_bootstrap_p(mine, theirs)


def test_items_are_paired_only_within_a_seed(sweep):
    rows = build_rows(find_runs([sweep]))
    lora, s2ft = rows
    seed0, seed1 = Row("lora", [_seed(lora, 0)]), Row("s2ft", [_seed(s2ft, 1)])
    assert not _seed(s2ft, 1).item_losses("gsm8k_test").keys() & _seed(lora, 0).item_losses("gsm8k_test").keys()
    best, pvalues, _ = compare_heldout([seed0, seed1], "gsm8k_test")
    assert list(pvalues.values()) == [None]  # seed 1's items are not seed 0's: nothing to pair, no test


def _paired_losses(mine: Row, theirs: Row, name: str) -> tuple[list, list, list, list]:
    """Summed NLLs of the held-out items both rows scored per shared seed, their token counts (each over its seed's
    token total, so that every seed weighs as one) and seeds."""
    a, b, tokens, seeds = [], [], [], []
    for seed in sorted({r.summary["seed"] for r in mine.runs} & {r.summary["seed"] for r in theirs.runs}):
        x, y = _seed(mine, seed).item_losses(name), _seed(theirs, seed).item_losses(name)
        assert x.keys() == y.keys()
        total = sum(count for _, count in x.values())
        for item in sorted(x):
            a.append(x[item][0] / total), b.append(y[item][0] / total), tokens.append(x[item][1] / total)
            seeds.append(seed)
    return a, b, tokens, seeds


def test_heldout_losses_are_compared_item_by_item(sweep):
    rows = build_rows(find_runs([sweep]))
    for name in ("commonsense_test", "gsm8k_test"):
        losses = {row.label: row.values(heldout_after(name)) for row in rows}
        best, pvalues, _ = compare_heldout(rows, name)
        assert best.label == min(losses, key=lambda label: statistics.mean(losses[label]))
        other = next(row for row in rows if row is not best)
        for run in other.runs + best.runs:
            # 4 items drawn per seed (the smoke max_length may leave one without a response token); their
            # token-weighted mean is the summary's loss.
            items = run.item_losses(name).values()
            assert 3 <= len(items) <= 4
            mean = sum(nll for nll, _ in items) / sum(tokens for _, tokens in items)
            assert mean == pytest.approx(heldout_after(name)(run.summary), rel=1e-12)
        a, b, tokens, seeds = _paired_losses(other, best, name)
        assert set(seeds) == {0, 1}
        assert pvalues == {other.label: paired_bootstrap_p(a, b, weights=tokens, clusters=seeds)}
        line = heldout_statement(name, best, pvalues)
        assert (
            line.startswith(f"- Held-out loss {name}: lowest `{best.label}`;")
            and f"`{other.label}` ({_p_is(pvalues[other.label])}" in line
        )


def test_reference_row_is_compared_with_every_other_row(sweep, tmp_path):
    runs = find_runs([sweep])
    rows = build_rows(runs)
    lora, s2ft = rows
    anchor, pvalues, _ = compare_heldout(rows, "gsm8k_test", reference="s2ft")
    assert anchor is s2ft and set(pvalues) == {"lora"}
    a, b, tokens, seeds = _paired_losses(lora, s2ft, "gsm8k_test")
    expected = paired_bootstrap_p(a, b, weights=tokens, clusters=seeds)
    assert pvalues["lora"] == expected
    assert compare_to_best(rows, ["boolq"], reference="dora") == (None, {}, {})

    report = write_report(runs, tmp_path / "ref").read_text()
    diff = statistics.mean(lora.values(heldout_after("gsm8k_test"))) - statistics.mean(
        s2ft.values(heldout_after("gsm8k_test"))
    )
    assert "`s2ft` against each other row" in report
    assert f"- held-out loss gsm8k_test: `lora` {diff:+.4f} ({_p_is(expected)}" in report
    assert "against each other row" not in write_report(runs, tmp_path / "none", reference=None).read_text()


def test_heldout_statement_needs_something_tested():
    assert heldout_statement("x", None, {}) is None
    rows = build_rows([])
    assert rows == [] and compare_heldout(rows, "x") == (None, {}, {})


def test_cli_writes_the_report(sweep, tmp_path):
    path = main([str(sweep), "--out", str(tmp_path)])
    assert path == tmp_path / "report.md" and path.is_file()
    with pytest.raises(SystemExit):
        main([])
    with pytest.raises(SystemExit, match=r"^error: .*missing does not exist; pass run or sweep directories"):
        main([str(tmp_path / "missing"), "--out", str(tmp_path)])
    # A --reference that is no row (a typo) would silently drop the comparisons: refused, nothing written.
    with pytest.raises(SystemExit, match=r"^error: --reference 's2ft strategy=randon' is no row of these runs"):
        main([str(sweep), "--out", str(tmp_path / "typo"), "--reference", "s2ft strategy=randon"])
    assert not (tmp_path / "typo").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"^error: no summary.json under .*empty.*: have the runs finished\?"):
        main([str(tmp_path / "empty"), "--out", str(tmp_path)])


def test_estimate_and_welch_match_scipy():
    values = [0.41, 0.45, 0.38, 0.44]
    got = estimate(values)
    sd = statistics.stdev(values)
    assert (got.mean, got.std, got.n) == (pytest.approx(statistics.mean(values)), pytest.approx(sd), 4)
    assert got.ci == pytest.approx(stats.t.ppf(0.975, 3) * sd / 2)
    assert estimate([0.5]).ci is None and estimate([]) is None
    other = [0.30, 0.33, 0.29]
    assert welch_p(values, other) == pytest.approx(stats.ttest_ind(values, other, equal_var=False).pvalue)
    assert welch_p([0.5, 0.5], [0.5, 0.5]) == 1.0


def test_paired_bootstrap_detects_only_real_differences():
    same = [True, False] * 50
    assert paired_bootstrap_p(same, same) == 1.0
    assert paired_bootstrap_p([True] * 100, [False] * 100) == 0.0
    mostly = [True] * 60 + [False] * 40
    assert paired_bootstrap_p(mostly, mostly[1:] + mostly[:1]) > 0.5  # one item apart
    with pytest.raises(ValueError, match="equally long"):
        paired_bootstrap_p([True], [True, False])


def test_hierarchical_bootstrap_does_not_read_one_seeds_luck_as_certainty():
    # Seed 0: the first row is right on all 50 items the second gets wrong; seed 1: the rows tie (25 wins each way).
    a = [True] * 50 + [True] * 25 + [False] * 25
    b = [False] * 50 + [False] * 25 + [True] * 25
    seeds = [0] * 50 + [1] * 50
    # Pooled items, a +0.5 difference looks certain. Resampling seeds first, a quarter of the resamples draw seed 0
    # twice (+1.0, as far from +0.5 as zero is) and a quarter seed 1 twice (its 100 resampled items' mean is <= 0,
    # as extreme, with probability P(Binomial(100, 1/2) <= 50) = 0.540): p = 0.25 + 0.25 * 0.540 = 0.385.
    assert paired_bootstrap_p(a, b) == 0.0
    assert paired_bootstrap_p(a, b, clusters=seeds) == pytest.approx(0.385, abs=0.02)  # Monte Carlo sd 0.005
    # Seeds that agree keep the difference significant.
    assert paired_bootstrap_p(a[:50] * 2, b[:50] * 2, clusters=seeds) == 0.0
    # One seed is the flat bootstrap, resample for resample.
    mostly = [True] * 60 + [False] * 40
    other = mostly[5:] + mostly[:5]
    assert paired_bootstrap_p(mostly, other, clusters=[7] * 100) == paired_bootstrap_p(mostly, other)
    with pytest.raises(ValueError, match="clusters must label every item"):
        paired_bootstrap_p(a, b, clusters=seeds[:-1])


def test_weighted_bootstrap_compares_per_token_losses():
    # Summed item losses over token counts: run a is 0.1 nats/token worse on every item, whatever the item's length.
    tokens = [5, 40, 12, 7, 30] * 10
    b = [2.0 * t for t in tokens]
    a = [(2.0 + 0.1) * t for t in tokens]
    assert paired_bootstrap_p(a, b, weights=tokens) == 0.0
    assert paired_bootstrap_p(b, b, weights=tokens) == 1.0
    with pytest.raises(ValueError, match="equally long"):
        paired_bootstrap_p(a, b, weights=tokens[:-1])


def test_statement_refuses_to_rank_inseparable_rows():
    best = Row("s2ft", [])
    assert significance_statement(best, {"lora": 0.4, "full": None}).startswith("Not separable")
    assert significance_statement(best, {"none": 0.01, "full": 0.3}) == (
        "Best mean: `s2ft`; separable from it: `none` (p=0.010 *); not separable from it: `full` (p=0.300) "
        "(p < 0.05 marked *)."
    )


def test_rows_tied_at_the_best_mean_are_all_named_and_bolded(tmp_path):
    """Full FT and LoRA at seed 0 of the commonsense rerun score 41.64% each: before, `full` (first by label) alone
    was bold and "the best mean", which ranked two rows the numbers do not rank."""
    runs = ROOT / "results" / "commonsense_smollm" / "rerun" / "runs"
    for name in ("seed0_full", "seed0_lora", "seed0_s2ft"):
        shutil.copytree(runs / name, tmp_path / "runs" / name)
    report = main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")]).read_text()
    bold = [line.split(" | ")[0] for line in report.splitlines() if line.startswith("| **")]
    assert bold == ["| **full**", "| **lora**"]
    assert "no row differs from the best mean (`full`, tied with `lora`) at the 5% level" in report
    best, lora = Row("s2ft", []), Row("lora", [])
    assert significance_statement(best, {"lora": 1.0, "none": 0.01}, [lora]).startswith(
        "Best mean: `s2ft`, tied with `lora`; separable from it: `none`"
    )
    assert heldout_statement("x", best, {"lora": 1.0}, tops=[lora]) == (
        "- Held-out loss x: lowest `s2ft`, tied with `lora`; separable from it: no row; not separable from it: "
        "`lora` (p=1.000)."
    )


def test_heldout_statement_names_which_pairs_are_separable():
    # The commonsense report's case: only the untrained row differs from the lowest loss; the trained rows do not.
    best = Row("s2ft", [])
    pvalues = {"lora": 0.403, "none": 0.0, "spft": 0.111, "dora": None}
    assert heldout_statement("commonsense_test", best, pvalues) == (
        "- Held-out loss commonsense_test: lowest `s2ft`; separable from it: `none` (p<0.001 *); "
        "not separable from it: `lora` (p=0.403), `spft` (p=0.111); untested: `dora`."
    )
    assert heldout_statement("x", best, {"dora": None}) is None
    assert heldout_statement("x", best, {"lora": 0.2}) == (
        "- Held-out loss x: lowest `s2ft`; separable from it: no row; not separable from it: `lora` (p=0.200)."
    )
    assert pairs_verdict({"lora": 0.049, "full": None}) == "separable from it: `lora` (p=0.049 *); untested: `full`"
    assert pairs_verdict({"a": 0.0, "b": 0.01}) == "separable from it: `a` (p<0.001 *), `b` (p=0.010 *)"


def test_records_regenerate_the_report_byte_for_byte(sweep, tmp_path):
    runs = find_runs([sweep])
    from_runs = write_report(runs, tmp_path / "from_runs")
    from_records = main([str(sweep), "--export-records", str(tmp_path / "records"), "--out", str(tmp_path / "rec")])
    assert sorted(p.name for p in (tmp_path / "records").iterdir()) == [str(i) for i in range(len(RUNS))]
    assert from_records.read_bytes() == from_runs.read_bytes()
    figures = sorted(p.name for p in (tmp_path / "from_runs" / "figures").iterdir())
    assert figures and figures == sorted(p.name for p in (tmp_path / "rec" / "figures").iterdir())
    for name in figures:
        assert (tmp_path / "rec/figures" / name).read_bytes() == (tmp_path / "from_runs/figures" / name).read_bytes()
    # Straight from the committed records (a clone has no outputs/): the same report again.
    again = main([str(tmp_path / "records"), "--out", str(tmp_path / "again")])
    assert again.read_bytes() == from_runs.read_bytes()

    records = {run.path.name: run for run in find_runs([tmp_path / "records"])}
    for run in runs:
        record = records[run.path.name]
        assert (record.path / "summary.json").read_bytes() == (run.path / "summary.json").read_bytes()
        assert (record.path / "config.yaml").read_bytes() == (run.path / "config.yaml").read_bytes()
        for task in ("boolq", "arc_easy"):
            assert record.item_correct(task) == run.item_correct(task) and len(run.item_correct(task)) == 3
        for name in ("commonsense_test", "gsm8k_test"):
            assert record.item_losses(name) == run.item_losses(name) and run.item_losses(name)
        # Ids and numbers only: no prompt, output or gold answer is kept.
        files = sorted((record.path / "predictions").iterdir())
        assert [f.name for f in files] == sorted(f.name + ".gz" for f in (run.path / "predictions").glob("*.jsonl"))
        for file in files:
            rows = [json.loads(line) for line in gzip.decompress(file.read_bytes()).decode().splitlines()]
            keys = ["id", "nll", "tokens"] if file.name.startswith("heldout_") else ["id", "correct"]
            assert rows and all(list(row) == keys for row in rows)

    # Exporting again (from the runs or from the records) writes the same bytes; other records in the folder stay.
    snapshot = {p: p.read_bytes() for p in (tmp_path / "records").rglob("*") if p.is_file()}
    export_records([find_runs([sweep / "2"])[0]], tmp_path / "records")
    export_records(find_runs([tmp_path / "records"]), tmp_path / "records")
    assert {p: p.read_bytes() for p in (tmp_path / "records").rglob("*") if p.is_file()} == snapshot
    copied = export_records(find_runs([tmp_path / "records"]), tmp_path / "copy")
    assert [p.name for p in copied] == [str(i) for i in range(len(RUNS))]
    assert all((tmp_path / "copy" / p.relative_to(tmp_path / "records")).read_bytes() == b for p, b in snapshot.items())

    with pytest.raises(ValueError, match="share a record name"):
        export_records([runs[0], copy.copy(runs[0])], tmp_path / "clash")
    with pytest.raises(SystemExit):
        main(["--wandb", "team/s2ft", "--export-records", str(tmp_path / "w")])


class FakeWandbRun:
    """What `wandb.Api().runs()` yields for a run the runner logged: its config, final metrics and history."""

    def __init__(self, run_dir: Path, index: int):
        summary = json.loads((run_dir / "summary.json").read_text())
        self.id = f"run{index}"
        self.config = yaml.safe_load((run_dir / "config.yaml").read_text())
        self.summary = {
            "trainable_params": summary["trainable_params"],
            "trainable_pct": summary["trainable_pct"],
            "train/peak_mem_mb": summary["train"]["peak_mem_mb"],
            "_runtime": summary["train"]["wall_s"] + 100,  # the whole W&B run, evaluation included
            **flat_metrics(summary),
        }
        # W&B's _step counts log calls; rows without a loss (validation, lr) are interleaved as Lightning logs them.
        self.rows = [
            {"_step": 2 * i, "train/loss": loss, "trainer/global_step": step}
            for i, (step, loss) in enumerate(summary["train"]["loss_curve"])
        ]
        self.rows.insert(1, {"_step": 1, "trainer/global_step": 1})

    def history(self, keys, pandas):
        assert not pandas and "train/loss" in keys and "trainer/global_step" in keys
        return [{k: v for k, v in row.items() if k in keys or k == "_step"} for row in self.rows]


def test_report_from_wandb_matches_the_local_report(sweep, tmp_path, monkeypatch):
    remote = [FakeWandbRun(sweep / str(i), i) for i in range(len(RUNS))]
    other = type("Other", (), {"config": {"lr": 1}, "summary": {}, "id": "x"})()  # not an s2ft run: skipped
    projects = []
    monkeypatch.setattr(
        wandb, "Api", lambda: type("Api", (), {"runs": lambda self, p: projects.append(p) or [*remote, other]})()
    )

    runs = wandb_runs("team/s2ft")
    assert projects == ["team/s2ft"] and len(runs) == len(RUNS)
    local = find_runs([sweep])
    for got, want in zip(runs, local, strict=True):
        s, w = got.summary, want.summary
        assert (s["experiment"], s["method"], s["model"], s["seed"]) == (
            w["experiment"],
            w["method"],
            w["model"],
            w["seed"],
        )
        assert s["avg_accuracy"] == w["avg_accuracy"]
        assert {t: r["accuracy"] for t, r in s["eval"].items()} == {t: r["accuracy"] for t, r in w["eval"].items()}
        assert {n: h["after"] for n, h in s["heldout"].items()} == {n: h["after"] for n, h in w["heldout"].items()}
        assert s["train"]["loss_curve"] == w["train"]["loss_curve"]  # global steps, not W&B's _step
        assert s["train"]["wall_s"] == w["train"]["wall_s"]  # training time, not the W&B run's _runtime
        assert s["train"]["median_tokens_per_s"] == w["train"]["median_tokens_per_s"] > 0
        assert got.settings() == want.settings()

    # W&B holds no per-item predictions: rows with two or more seeds each are compared by Welch's t-test over seeds.
    best, pvalues, _ = compare_to_best(build_rows(runs), ["boolq", "arc_easy"])
    rest = next(row for row in build_rows(runs) if row.label != best.label)
    assert pvalues == {rest.label: welch_p(rest.values(avg_accuracy), best.values(avg_accuracy))}

    from_wandb = main(["--wandb", "team/s2ft", "--out", str(tmp_path / "wandb")]).read_text()
    from_disk = write_report(local, tmp_path / "disk").read_text()
    assert _column(from_wandb, "Avg") == _column(from_disk, "Avg") and len(_column(from_disk, "Avg")) == 2

    monkeypatch.setattr(wandb, "Api", lambda: type("Api", (), {"runs": lambda self, p: [other]})())
    with pytest.raises(ValueError, match="has no s2ft runs"):
        wandb_runs("team/empty")


def test_heldout_backfill_reproduces_a_finished_runs_item_losses(sweep, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(sweep / "0", run)
    files = sorted((run / "predictions").glob("heldout_*.jsonl"))
    assert [f.name for f in files] == ["heldout_commonsense_test.jsonl", "heldout_gsm8k_test.jsonl"]
    written = {f.name: [json.loads(line) for line in f.read_text().splitlines()] for f in files}
    for f in files:
        f.unlink()
    losses = backfill_heldout.backfill(run)
    summary = json.loads((run / "summary.json").read_text())
    assert losses == pytest.approx({n: h["after"] for n, h in summary["heldout"].items()}, rel=1e-9)
    for f in files:
        again = [json.loads(line) for line in f.read_text().splitlines()]
        assert [(r["id"], r["tokens"]) for r in again] == [(r["id"], r["tokens"]) for r in written[f.name]]
        assert [r["nll"] for r in again] == pytest.approx([r["nll"] for r in written[f.name]], rel=1e-9)
    assert backfill_heldout.backfill(run) == {}  # already there: nothing recomputed

    summary["heldout"]["gsm8k_test"]["after"] += 0.5  # a summary the run's model does not reproduce
    (run / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(backfill_heldout.BackfillError, match="differ from summary.json"):
        backfill_heldout.backfill(run, force=True)
    assert not list((run / "predictions").glob("heldout_*.jsonl"))
    with pytest.raises(SystemExit, match=r"^error: .*summary.json does not exist: pass a finished training run"):
        backfill_heldout.main([str(tmp_path)])


# Each committed study with records (its folder under results/), and the report arguments its README names.
COMMITTED = {
    "arith_smollm/rerun": [],
    "commonsense_smollm/rerun": [],
    "components_smollm": ["--reference", ""],
    "generalization_smollm": [],
    "selection_smollm": ["--reference", "s2ft order=large strategy=random"],
}


def test_every_committed_study_with_records_is_checked_below():
    results = ROOT / "results"
    studies = {
        p.parent.relative_to(results).as_posix() for p in results.glob("**/runs") if (p.parent / "report.md").is_file()
    }
    assert studies == set(COMMITTED)


@pytest.mark.parametrize("study", sorted(COMMITTED))
def test_a_committed_report_is_its_records_report_byte_for_byte(study, tmp_path):
    """What a clone has: the records under results/<study>/runs give the committed report.md again. (The figures are
    compared in the sweep test above; committed PNGs would tie this test to one matplotlib and FreeType build.)"""
    committed = ROOT / "results" / study
    rebuilt = main([str(committed / "runs"), *COMMITTED[study], "--out", str(tmp_path)])
    assert rebuilt.read_text() == (committed / "report.md").read_text()


# The review's cases, on copies of committed records (real runs, no training needed).
SELECTION = ROOT / "results" / "selection_smollm" / "runs"
RANDOM = "s2ft order=large strategy=random"


def _parent(config: dict, path: str) -> tuple[dict, str]:
    """The mapping that holds a dotted config key, and the key's last part."""
    *sections, name = path.split(".")
    for section in sections:
        config = config[section]
    return config, name


def _selection_records(tmp_path: Path, leave_out: tuple[str, ...] = ()) -> Path:
    """A copy of the committed selection records at seeds 0 and 1, the set these review cases count their expectations
    on (seeds and rows); the committed-report test covers every seed."""
    return shutil.copytree(SELECTION, tmp_path / "runs", ignore=shutil.ignore_patterns("seed[!01]_*", *leave_out))


def test_a_summary_that_names_no_experiment_model_and_method_is_refused_before_anything_is_written(tmp_path):
    """Was a TypeError or KeyError traceback from Run.group, after --out had been created."""
    runs = _selection_records(tmp_path)
    summary = runs / "seed0_random_large" / "summary.json"
    fields = json.loads(summary.read_text())
    for bad in ([], {k: v for k, v in fields.items() if k != "experiment"}, {**fields, "method": None}):
        summary.write_text(json.dumps(bad))
        with pytest.raises(SystemExit, match=rf"^error: {re.escape(str(summary))} is not a run's summary \(it needs"):
            main([str(runs), "--out", str(tmp_path / "out")])
        assert not (tmp_path / "out").exists()


def test_a_second_run_of_one_seed_in_a_row_is_refused(tmp_path):
    """Was counted as another seed: the random row read "3 seeds", its 95% CI narrowed from ± 1.8 to ± 0.4 and its
    mean moved, while the item-paired tests kept only one of the two runs."""
    runs = _selection_records(tmp_path)
    again = shutil.copytree(runs / "seed0_random_large", runs / "seed0_random_large_again")
    with pytest.raises(
        SystemExit,
        match=rf"^error: row '{RANDOM}' has 2 runs of seed 0 \(.*seed0_random_large, .*seed0_random_large_again; "
        r"a rerun of one config\): pass only the run directories to report",
    ):
        main([str(runs), "--reference", RANDOM, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    config = yaml.safe_load((again / "config.yaml").read_text())
    config["eval"]["batch_size"] = 4
    (again / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit, match=r"; their configs differ in eval.batch_size\): pass only"):
        main([str(runs), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()  # was created, empty, without --reference
    # With --export-records too, before any record is written (14 records were, then the report refused).
    with pytest.raises(SystemExit, match=rf"^error: row '{RANDOM}' has 2 runs of seed 0"):
        main([str(runs), "--export-records", str(tmp_path / "records"), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "records").exists() and not (tmp_path / "out").exists()
    # A run of a seed that a record already in the folder holds under another name: refused, the records unchanged.
    shutil.rmtree(again)
    records = tmp_path / "records"
    export_records(find_runs([runs]), records)
    snapshot = {p: p.read_bytes() for p in records.rglob("*") if p.is_file()}
    shutil.copytree(runs / "seed0_random_large", tmp_path / "new" / "copy")
    with pytest.raises(SystemExit, match=rf"^error: row '{RANDOM}' has 2 runs of seed 0 \(.*/new/copy, "):
        main([str(tmp_path / "new"), "--export-records", str(records), "--out", str(tmp_path / "out")])
    assert {p: p.read_bytes() for p in records.rglob("*") if p.is_file()} == snapshot
    assert not (tmp_path / "out").exists()


def test_runs_measured_on_files_of_other_content_under_one_name_are_refused(tmp_path):
    """Summaries record each evaluation file's SHA-256 (eval_data): a task file edited under its name between runs
    gave rows of other items, which the item-paired tests paired by id."""
    runs = _selection_records(tmp_path)

    def measured(run: str, boolq: str, heldout: tuple[str, ...] = ("c1", "c2")) -> None:
        summary = runs / run / "summary.json"
        entries = [{"name": "boolq", "role": "task", "file": "b.json", "sha256": boolq}]
        entries += [{"name": "commonsense_test", "role": "heldout", "file": "f", "sha256": d} for d in heldout]
        summary.write_text(json.dumps({**json.loads(summary.read_text()), "eval_data": entries}))

    measured("seed0_random_large", "a" * 64)
    measured("seed1_random_large", "a" * 64)  # the other runs predate eval_data: not checked
    main([str(runs), "--out", str(tmp_path / "same")])
    measured("seed0_gradient_large", "b" * 64, ("c1", "c3"))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as refused:
        main([str(runs), "--out", str(out)])
    message, gradient, random = str(refused.value), runs / "seed0_gradient_large", runs / "seed{}_random_large"
    assert message == (
        f"error: heldout 'commonsense_test' was measured on files of other content (sha256 c1, c3 in {gradient}; "
        f"sha256 c1, c2 in {str(random).format(0)}, {str(random).format(1)}); task 'boolq' was measured on files of "
        f"other content (sha256 bbbbbbbbbbbb in {gradient}; sha256 aaaaaaaaaaaa in {str(random).format(0)}, "
        f"{str(random).format(1)}): report runs measured on one file, or give the changed file's task another name"
    )
    assert not out.exists()
    summary = runs / "seed0_gradient_large" / "summary.json"
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "eval_data": {"boolq": "b"}}))
    with pytest.raises(SystemExit, match=r"eval_data is not a list of \{name, role, file, sha256\} entries"):
        main([str(runs), "--out", str(out)])


def test_the_prompt_template_is_a_setting_of_a_row():
    """The template study's two runs (seed 0 each, alpaca and chat) were one row "s2ft" of "2 seeds" (± 31.8 CI)."""
    rows = build_rows(find_runs([ROOT / "results" / "template_smollm" / "runs"]))
    assert [(row.label, len(row.runs)) for row in rows] == [
        ("s2ft data.template=alpaca", 1),
        ("s2ft data.template=chat", 1),
    ]
    assert [row.estimate(avg_accuracy).mean for row in rows] == [0.3125, 0.2625]


def _set_loss(run: Path, item: int, nll: float) -> None:
    """Give one held-out item of a record (and so its summary's per-token loss) the summed NLL ``nll``."""
    pred = run / "predictions" / "heldout_commonsense_test.jsonl.gz"
    rows = [json.loads(line) for line in gzip.decompress(pred.read_bytes()).decode().splitlines()]
    rows[item]["nll"] = nll
    pred.write_bytes(gzip.compress("".join(json.dumps(row) + "\n" for row in rows).encode()))
    summary = json.loads((run / "summary.json").read_text())
    loss = sum(row["nll"] for row in rows) / sum(row["tokens"] for row in rows)
    summary["heldout"]["commonsense_test"]["after"] = loss
    (run / "summary.json").write_text(json.dumps(summary))


@pytest.mark.parametrize("diverged", ["seed0_activation_small", "seed1_gradient_large"])
def test_a_nan_loss_is_untested_never_separable_nor_the_lowest(diverged, tmp_path):
    """Was p = 0 ("separable, p=0.000 *": NaN is never as extreme as NaN) and, for the row that sorts first, the
    lowest loss (min() keeps a NaN it starts from)."""
    runs = _selection_records(tmp_path)
    _set_loss(runs / diverged, 3, float("nan"))
    rows = build_rows(find_runs([runs]))
    lowest, pvalues, _ = compare_heldout(rows, "commonsense_test")
    nan_row = next(row for row in rows if any(run.path.name == diverged for run in row.runs))
    finite = {row.label: statistics.mean(row.values(heldout_after("commonsense_test"))) for row in rows}
    del finite[nan_row.label]
    assert lowest.label == min(finite, key=finite.get)
    assert pvalues[nan_row.label] is None
    assert all(p is not None for label, p in pvalues.items() if label != nan_row.label)
    reference = compare_heldout(rows, "commonsense_test", reference=nan_row.label)
    assert reference.best is nan_row and set(reference.pvalues.values()) == {None}
    report = main([str(runs), "--reference", RANDOM, "--out", str(tmp_path / "out")]).read_text()
    assert f"`{nan_row.label}` +nan (untested)" in report and "nan (p=" not in report
    (heldout_line,) = [line for line in report.splitlines() if line.startswith("- Held-out loss")]
    assert heldout_line.endswith(f"; untested: `{nan_row.label}`.")  # was left out of the line


def test_the_seed_level_p_is_a_t_test_over_the_per_seed_differences():
    """Two seeds that agree in sign give the hierarchical bootstrap p near 0 whatever their spread; the seed-level
    test charges the spread (values by hand: one degree of freedom is a Cauchy tail, p = 1 - 2 atan(|t|) / pi)."""
    assert seed_level_p([1.0, 3.0]) == pytest.approx(1 - 2 * math.atan(2.0) / math.pi, abs=1e-12)  # t = 2 / 1
    # Three seeds, t = 2 / (1 / sqrt 3) with 2 degrees of freedom: p = 1 - t / sqrt(2 + t^2).
    t_stat = 2 * math.sqrt(3)
    assert seed_level_p([1.0, 2.0, 3.0]) == pytest.approx(1 - t_stat / math.sqrt(2 + t_stat**2), abs=1e-12)
    assert seed_level_p([0.5]) is None
    assert (seed_level_p([0.2, 0.2]), seed_level_p([0.0, 0.0])) == (0.0, 1.0)


def test_a_reference_difference_is_over_the_seeds_its_test_compared(tmp_path):
    """With seed 1 of the activation row gone, its difference from the random row was of the means over seed 0
    against seeds 0 and 1 (+0.0022, worse), while its p-value compared seed 0's items, where it is lower (-0.0021)."""
    runs = _selection_records(tmp_path, leave_out=("seed1_activation_small",))
    loss = {
        p.name: json.loads((p / "summary.json").read_text())["heldout"]["commonsense_test"]["after"]
        for p in runs.iterdir()
    }
    acc = {p.name: json.loads((p / "summary.json").read_text())["avg_accuracy"] for p in runs.iterdir()}
    rows = build_rows(find_runs([runs]))
    against = compare_heldout(rows, "commonsense_test", reference=RANDOM)
    activation = "s2ft order=small strategy=activation"
    assert against.seeds == {activation: [0], "s2ft order=large strategy=gradient": [0, 1]}
    report = main([str(runs), "--reference", RANDOM, "--out", str(tmp_path / "out")]).read_text()
    diff = loss["seed0_activation_small"] - loss["seed0_random_large"]
    assert (
        diff
        < 0
        < statistics.mean([loss["seed0_activation_small"]])
        - statistics.mean([loss["seed0_random_large"], loss["seed1_random_large"]])
    )
    p = against.pvalues[activation]
    assert f"`{activation}` {diff:+.4f} over seed 0 (p={p:.3f})." in report
    gradient = statistics.mean([loss["seed0_gradient_large"], loss["seed1_gradient_large"]]) - statistics.mean(
        [loss["seed0_random_large"], loss["seed1_random_large"]]
    )
    # Same seeds: the difference as before, and the t-test over its two per-seed differences (one degree of
    # freedom: a Cauchy tail, p = 1 - 2 atan(|t|) / pi).
    diffs = [loss[f"seed{s}_gradient_large"] - loss[f"seed{s}_random_large"] for s in (0, 1)]
    t_stat = statistics.mean(diffs) / (statistics.stdev(diffs) / math.sqrt(2))
    over_seeds = 1 - 2 * math.atan(abs(t_stat)) / math.pi
    assert f"`s2ft order=large strategy=gradient` {gradient:+.4f} (p<0.001 *; over seeds p={over_seeds:.3f})" in report
    assert f"over seed 0 (p={p:.3f})." in report  # one shared seed: no seed-level test
    accuracy = 100 * (acc["seed0_activation_small"] - acc["seed0_random_large"])
    assert f"`{activation}` {accuracy:+.1f} over seed 0 (p=" in report


def test_statements_say_untested_where_nothing_was_tested():
    """One seed each without item predictions (the template study) read "Not separable: no row differs ..."."""
    best = Row("s2ft", [])
    assert significance_statement(best, {"lora": None, "full": None}).startswith(
        "Untested: no row could be compared with the best mean (`s2ft`)"
    )
    assert "Welch over seeds); untested: `full`; do not rank" in significance_statement(
        best, {"lora": 0.4, "full": None}
    )


def test_a_p_value_just_below_the_level_is_not_printed_as_the_level():
    """p = 0.0497 printed "0.050 *": starred, yet reading as not below 0.05."""
    assert pairs_verdict({"a": 0.0497, "b": 0.0504, "c": 0.0449}) == (
        "separable from it: `a` (p=0.0497 *), `c` (p=0.045 *); not separable from it: `b` (p=0.050)"
    )
    # A t-test's p is not a multiple of 1/10,000: four digits rounded 0.04996 up to "0.0500 *" as well.
    assert pairs_verdict({"a": 0.04996, "b": 0.0499996}) == "separable from it: `a` (p=0.04996 *), `b` (p=0.0499996 *)"


def test_accuracy_is_compared_on_the_mean_over_tasks_that_avg_is(tmp_path):
    """Was the pooled item accuracy: here +10 items of 100 on one task and -1 of 10 on another, +8.2 points pooled
    (p about 0.01, "separable") while Avg, the unweighted mean over the tasks, is equal."""

    def run(name: str, wins: dict[str, tuple[int, int]]) -> Run:
        path = tmp_path / name / "predictions"
        path.mkdir(parents=True)
        accuracy = {}
        for task, (right, total) in wins.items():
            rows = [{"id": f"{task}-{i}", "correct": i < right} for i in range(total)]
            (path / f"{task}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
            accuracy[task] = right / total
        summary = {"experiment": "e", "model": "m", "method": name, "seed": 0}
        summary |= {
            "eval": {t: {"accuracy": a} for t, a in accuracy.items()},
            "avg_accuracy": sum(accuracy.values()) / 2,
        }
        return Run(summary, None, path.parent)

    s2ft, lora = run("s2ft", {"big": (60, 100), "small": (5, 10)}), run("lora", {"big": (50, 100), "small": (6, 10)})
    assert s2ft.summary["avg_accuracy"] == pytest.approx(lora.summary["avg_accuracy"], abs=1e-15)
    rows = build_rows([lora, s2ft])
    assert (
        paired_bootstrap_p(
            [i < 60 for i in range(100)] + [i < 5 for i in range(10)],
            [i < 50 for i in range(100)] + [i < 6 for i in range(10)],
        )
        < ALPHA
    )  # pooled
    assert compare_to_best(rows, ["big", "small"], reference="s2ft").pvalues == {"lora": 1.0}
    # Unequal tasks that do differ on average keep the test's power: +10 and +1 of 10.
    better = run("dora", {"big": (60, 100), "small": (7, 10)})
    assert compare_to_best(build_rows([lora, better]), ["big", "small"], reference="lora").pvalues["dora"] < ALPHA


def test_settings_that_shorten_alike_keep_rows_apart():
    """Two fusion runs excluding adapters whose paths end alike were two rows of one label, "s2ft
    exclude=seed0/adapter": their p-values overwrote each other and --reference named whichever came first."""

    def run(exclude: str) -> Run:
        options = {"strategy": "random", "exclude": exclude}
        summary = {"experiment": "fusion_smollm", "model": "smollm2_135m", "method": "s2ft", "seed": 0}
        return Run(summary, {"method": {"name": "s2ft", "lr": 1e-3, "options": options}, "seed": 0})

    near, far = run("/work/a/seed0/adapter"), run("/work/b/seed0/adapter")
    assert [row.label for row in build_rows([near, far])] == [
        's2ft exclude="/work/a/seed0/adapter"',
        's2ft exclude="/work/b/seed0/adapter"',
    ]
    other = run("/work/c/seed1/adapter")
    assert [row.label for row in build_rows([near, other])] == [
        "s2ft exclude=seed0/adapter",
        "s2ft exclude=seed1/adapter",
    ]


@pytest.mark.parametrize(
    ("file", "damage", "message"),
    [
        ("predictions/boolq.jsonl.gz", b"\x1f\x8b\x08\x00", "is not readable predictions"),  # a truncated gzip
        ("predictions/boolq.jsonl.gz", gzip.compress(b'{"id": "x"}\n'), "line 1 lacks one of id, correct"),
        ("predictions/heldout_commonsense_test.jsonl.gz", gzip.compress(b'{"id": "x", "nll'), "not readable"),
        ("config.yaml", b"method: [lr: 1\n", "is not readable YAML"),
    ],
    ids=["truncated gzip", "row without a field", "not JSON", "not YAML"],
)
def test_a_damaged_record_file_is_named_before_anything_is_written(file, damage, message, tmp_path):
    """Was a gzip, JSON, KeyError or YAML traceback, some of them after --out and earlier figures were written."""
    runs = _selection_records(tmp_path)
    (runs / "seed1_random_large" / file).write_bytes(damage)
    with pytest.raises(SystemExit, match=rf"^error: .*seed1_random_large.*{re.escape(message)}"):
        main([str(runs), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_wrongly_typed_summary_fields_are_named_at_once_before_anything_is_written(tmp_path):
    """A hand-edited summary (accuracy as a string, a task as a number, a curve of scalars) was a TypeError or
    AttributeError from inside the table or a figure."""
    runs = _selection_records(tmp_path)
    file = runs / "seed1_random_large" / "summary.json"
    summary = json.loads(file.read_text())
    summary["avg_accuracy"] = "41.2"
    summary["seed"] = "1"
    summary["eval"]["boolq"] = 0.6
    summary["heldout"]["commonsense_test"]["after"] = [0.15]
    summary["groups"] = ["commonsense"]
    summary["train"]["loss_curve"] = [0.5, 0.4]
    summary["mtbench"] = {"score": "7"}
    file.write_text(json.dumps(summary))
    with pytest.raises(SystemExit) as raised:
        main([str(runs), "--out", str(tmp_path / "out")])
    message = str(raised.value)
    assert message.startswith(f"error: {file} has fields of the wrong type: ")
    for problem in (
        "avg_accuracy is '41.2', not a number",
        "seed is '1', not an integer",
        "eval.boolq is 0.6, not a mapping with numbers accuracy and n",
        "heldout.commonsense_test is {'before': None, 'after': [0.15]}, not a mapping with numbers before and after",
        "groups is list, not a mapping",
        "train.loss_curve is not a list of [step, loss] pairs",
        "mtbench is not a mapping with a number score",
    ):
        assert problem in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("path", "value", "old", "new"),
    [
        ("trainer.max_steps", 300, "150", "300"),
        ("data.limit", 4000, "2000", "4000"),
        ("method.weight_decay", 0.01, "0.0", "0.01"),
        # Were repetition keys (options.calibration_size, like a seed) or not read at all: averaged as seeds.
        ("method.options.calibration_size", 64, "0.01", "64"),
        ("trainer.warmup_steps", 0, "15", "0"),
        ("trainer.accumulate_grad_batches", 4, "1", "4"),
        ("trainer.select_best", "val_loss", "null", "val_loss"),
        ("data.max_length", 512, "256", "512"),
        ("data.batch_size", 16, "8", "16"),
        ("model.dtype", "bfloat16", "float32", "bfloat16"),
        ("eval.mode", "generate", "loglik", "generate"),
        # Were not read: a seed scored on other tasks, or on other items, was averaged into the row's Avg.
        ("eval.tasks", ["boolq"], '["commonsense"]', '["boolq"]'),
        ("eval.limit", 100, "200", "100"),
        ("eval.heldout_limit", 64, "128", "64"),
        ("eval.backend", "lm_eval", "s2ft", "lm_eval"),
        ("eval.groups", {"mine": ["boolq"]}, "null", '{"mine": ["boolq"]}'),
        ("method.betas", [0.9, 0.95], "null", "[0.9, 0.95]"),  # absent from conf/method: the code's AdamW betas
    ],
)
def test_runs_that_trained_or_were_measured_differently_are_different_rows(path, value, old, new, tmp_path):
    """Seed 1 of the random row trained 300 steps instead of 150 (or on 4000 items, with weight decay, scored on 64
    calibration items, ...): it was averaged with seed 0 as one row."""
    runs = _selection_records(tmp_path)
    config_file = runs / "seed1_random_large" / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    node, name = _parent(config, path)
    node[name] = value
    config_file.write_text(yaml.safe_dump(config))
    labels = {row.label: len(row.runs) for row in build_rows(find_runs([runs]))}
    key = path.removeprefix("method.") if path.startswith("method.options.") else path  # as Run.settings names it

    def label(order_strategy: str, setting: str) -> str:  # the varying key takes its sorted place
        parts = sorted([f"options.{o}" for o in order_strategy.split()] + [f"{key}={setting}"])
        return " ".join(["s2ft", *(part.removeprefix("options.") for part in parts)])

    assert labels == {
        label("order=large strategy=gradient", old): 2,
        label("order=large strategy=random", old): 1,
        label("order=large strategy=random", new): 1,
        label("order=small strategy=activation", old): 2,
    }


@pytest.mark.parametrize("backend", ["lm_eval", "s2ft"])
def test_the_harness_settings_separate_rows_only_where_the_harness_ran(backend, tmp_path):
    """Seed 1 of the random row scored 50 harness items a task where seed 0 scored all: with backend=lm_eval that is
    another measurement (it was averaged as a seed), with backend=s2ft the harness never ran (one row)."""
    runs = _selection_records(tmp_path)
    for seed, limit in ((0, None), (1, 50)):
        config_file = runs / f"seed{seed}_random_large" / "config.yaml"
        config = yaml.safe_load(config_file.read_text())
        config["eval"]["backend"] = backend
        config["eval"]["lm_eval"]["limit"] = limit
        config_file.write_text(yaml.safe_dump(config))
    random = sorted(
        (row.label, len(row.runs)) for row in build_rows(find_runs([runs])) if "strategy=random" in row.label
    )
    if backend == "s2ft":
        assert random == [("s2ft order=large strategy=random", 2)]
    else:
        assert random == [
            ("s2ft eval.backend=lm_eval eval.lm_eval.limit=50 order=large strategy=random", 1),
            ("s2ft eval.backend=lm_eval eval.lm_eval.limit=null order=large strategy=random", 1),
        ]


@pytest.mark.parametrize(("setting", "rows"), [("model", 2), ("timeout_s", 1)])
def test_runs_judged_by_another_judge_are_another_row(setting, rows, tmp_path):
    """MT-Bench scores of two judges are two measurements (they were averaged as seeds); a judge's timeout is how,
    not what."""
    runs = _selection_records(tmp_path)
    mtbench = yaml.safe_load((ROOT / "conf" / "eval" / "mtbench.yaml").read_text())["mtbench"]
    for seed in (0, 1):
        config_file = runs / f"seed{seed}_random_large" / "config.yaml"
        config = yaml.safe_load(config_file.read_text())
        config["eval"]["mtbench"] = json.loads(json.dumps(mtbench))
        if seed == 1:
            config["eval"]["mtbench"]["judge"]["local" if setting == "model" else "openai"][setting] = "other"
        config_file.write_text(yaml.safe_dump(config))
    random = sorted(
        (row.label, len(row.runs)) for row in build_rows(find_runs([runs])) if "strategy=random" in row.label
    )
    if rows == 1:
        assert random == [("s2ft order=large strategy=random", 2)]
    else:
        assert random == [
            ("s2ft eval.mtbench.judge_model=other order=large strategy=random", 1),
            ("s2ft eval.mtbench.judge_model=smollm2_135m order=large strategy=random", 1),
        ]


@pytest.mark.parametrize(("path", "shown"), [("method.options.layout", "layout"), ("trainer.select_best", None)])
def test_a_setting_older_runs_lack_keeps_their_row_apart_and_says_so(path, shown, tmp_path):
    """Seed 0 of the random row from code before an option (its config has no such key): it was a row of its own,
    "s2ft order=large strategy=random", beside "s2ft layout=gather order=large strategy=random", with nothing saying
    that they differ only in a key one of them lacks."""
    runs = _selection_records(tmp_path)
    config_file = runs / "seed0_random_large" / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    node, name = _parent(config, path)
    value = json.dumps(node.pop(name))
    config_file.write_text(yaml.safe_dump(config))
    key = shown or path

    def label(order_strategy: str, setting: str) -> str:
        parts = sorted([*order_strategy.split(), f"{key}={setting}"])
        return " ".join(["s2ft", *parts])

    rows = build_rows(find_runs([runs]))
    known = json.loads(value) if value != "null" else "null"
    assert {row.label: [run.path.name for run in row.runs] for row in rows} == {
        label("order=large strategy=gradient", known): ["seed0_gradient_large", "seed1_gradient_large"],
        label("order=large strategy=random", "?"): ["seed0_random_large"],
        label("order=large strategy=random", known): ["seed1_random_large"],
        label("order=small strategy=activation", known): ["seed0_activation_small", "seed1_activation_small"],
    }
    setting = f"options.{shown}" if shown else path
    assert [(a.label, b.label, keys) for a, b, keys in unknown_splits(rows)] == [
        (label("order=large strategy=random", "?"), label("order=large strategy=random", known), [setting])
    ]
    report = main([str(runs), "--out", str(tmp_path / "out")]).read_text()
    assert (
        "\n\nKept apart, differing only in settings marked `?`, which their runs' configs lack (code from before the "
        "option; whether those runs ran the other row's value the records cannot say): "
        f"`{label('order=large strategy=random', '?')}` and `{label('order=large strategy=random', known)}` "
        f"({setting}).\n\n|"
    ) in report


def test_a_component_a_dict_setting_lacks_is_no_unknown_setting():
    """A target_split without ``q`` names no q: its row is labelled by its own component, and no pair is flagged."""

    def run(split: dict | None, seed: int) -> Run:
        summary = {"experiment": "components_smollm", "model": "smollm2_135m", "method": "s2ft", "seed": seed}
        options = {"target_split": split, "strategy": "random"}
        return Run(summary, {"method": {"name": "s2ft", "lr": 1e-3, "options": options}, "seed": seed})

    rows = build_rows([run({"q": 1.0}, 0), run({"o": 1.0}, 0), run(None, 0)])
    assert sorted(row.label for row in rows) == [
        "s2ft target_split.o=1.0",
        "s2ft target_split.q=1.0",
        "s2ft target_split=null",
    ]
    assert unknown_splits(rows) == []


def _unfinished_runs(runs: Path) -> dict[str, Path]:
    """Beside the finished records: seed 3 of the random row interrupted after a checkpoint, seed 3 of the gradient
    row failed before its first, seed 3 of the activation row stopped before training (only Hydra's config), and a
    run of another study; and what is no run: W&B's files inside a finished run, a hidden folder."""
    config = yaml.safe_load((runs / "seed1_random_large" / "config.yaml").read_text())
    made = {}
    for name, where, study in (
        ("seed3_random_large", "config.yaml", "selection_smollm"),
        ("seed3_gradient_large", "config.yaml", "selection_smollm"),
        ("seed3_activation_small", ".hydra/config.yaml", "selection_smollm"),
        ("other/seed0", ".hydra/config.yaml", "arith_smollm"),
        ("seed1_random_large/wandb/run-1/files", "config.yaml", "selection_smollm"),
        (".overwritten/seed4", "config.yaml", "selection_smollm"),
    ):
        file = runs / name / where
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(yaml.safe_dump({**config, "seed": 3, "name": study}))
        made[name] = runs / name
    (runs / "seed3_random_large" / "checkpoints").mkdir()
    (runs / "seed3_random_large" / "checkpoints" / "last.ckpt").write_bytes(b"")
    return made


def test_runs_without_a_summary_are_named_in_their_study_and_on_the_command_line(tmp_path, capsys):
    """A crashed, killed or running run was dropped without a word; only a row's seed count hinted at it."""
    runs = shutil.copytree(SELECTION, tmp_path / "runs")
    made = _unfinished_runs(runs)
    report = main([str(runs), "--reference", RANDOM, "--out", str(tmp_path / "out")]).read_text()
    ckpt = "checkpoints/last.ckpt: resumable with ckpt_path=auto, unless still running"
    before = "no checkpoint: stopped or still running before its first"
    hydra = "only .hydra/config.yaml: stopped or still starting before training"
    elsewhere = (
        "Not in the table: 1 run directory of no study below without a summary.json (crashed, killed or still "
        f"running): `{made['other/seed0']}` ({hydra})."
    )
    here = (
        "Not in the table: 3 run directories of this study without a summary.json (crashed, killed or still running): "
        f"`{made['seed3_activation_small']}` ({hydra}), `{made['seed3_gradient_large']}` ({before}), "
        f"`{made['seed3_random_large']}` ({ckpt})."
    )
    committed = (ROOT / "results" / "selection_smollm" / "report.md").read_text()
    title, rest = committed.split("\n\n", 1)
    section, counts, table = rest.split("\n\n", 2)
    assert report == "\n\n".join([title, elsewhere, section, counts, here, table])
    out = capsys.readouterr().out
    assert out.endswith(
        "4 run directories without a summary.json (no row; the report names them):\n"
        f"  {made['other/seed0']} ({hydra})\n  {made['seed3_activation_small']} ({hydra})\n"
        f"  {made['seed3_gradient_large']} ({before})\n  {made['seed3_random_large']} ({ckpt})\n"
    )


def test_exported_records_are_of_finished_runs_and_the_command_line_says_which_were_left(tmp_path, capsys):
    runs = shutil.copytree(SELECTION, tmp_path / "runs")
    made = _unfinished_runs(runs)
    records = tmp_path / "records"
    report = main([str(runs), "--export-records", str(records), "--reference", RANDOM, "--out", str(tmp_path / "out")])
    assert report.read_text() == (ROOT / "results" / "selection_smollm" / "report.md").read_text()
    assert sorted(p.name for p in records.iterdir()) == sorted(p.name for p in SELECTION.iterdir())
    out = capsys.readouterr().out
    assert (
        f"4 run directories without a summary.json (not exported: no record, no row):\n  {made['other/seed0']} (" in out
    )


def test_a_folder_of_unfinished_runs_only_is_refused_naming_them(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match=rf"^error: no summary.json under \['{re.escape(str(empty))}'\]: have the "):
        main([str(empty), "--out", str(tmp_path / "out")])
    crashed = tmp_path / "crashed"
    (crashed / "0" / ".hydra").mkdir(parents=True)
    (crashed / "0" / ".hydra" / "config.yaml").write_text("name: selection_smollm\nmodel: {name: smollm2_135m}\n")
    with pytest.raises(
        SystemExit,
        match=rf"^error: no summary.json under \['{re.escape(str(crashed))}'\]: 1 run directory has none \(crashed, "
        rf"killed or still running\): {re.escape(str(crashed / '0'))} \(only .hydra/config.yaml: stopped",
    ):
        main([str(crashed), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_heldout_seeds_weigh_alike_as_in_the_mean_over_seeds(tmp_path):
    """The test was on the token-pooled loss: a seed whose items had 10x the tokens outweighed the other, here +0.082
    pooled (p about 0.25) where the mean over seeds the table shows differs by 0."""

    def run(method: str, seed: int, per_token: list[float], tokens: int) -> Run:
        path = tmp_path / f"{method}{seed}" / "predictions"
        path.mkdir(parents=True)
        rows = [{"id": f"q{i}", "nll": loss * tokens, "tokens": tokens} for i, loss in enumerate(per_token)]
        (path / "heldout_x.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        summary = {"experiment": "e", "model": "m", "method": method, "seed": seed}
        summary["heldout"] = {"x": {"after": sum(per_token) / len(per_token)}}
        return Run(summary, None, path.parent)

    base = [1.0 + 0.01 * (i % 7) for i in range(50)]
    up = [loss + (0.05 if i % 2 else 0.15) for i, loss in enumerate(base)]
    down = [loss - (0.05 if i % 2 else 0.15) for i, loss in enumerate(base)]
    runs = [run("lora", 0, base, 100), run("lora", 1, base, 10), run("s2ft", 0, up, 100), run("s2ft", 1, down, 10)]
    rows = build_rows(runs)
    lora, s2ft = rows
    assert statistics.mean(s2ft.values(heldout_after("x"))) == pytest.approx(
        statistics.mean(lora.values(heldout_after("x"))), abs=1e-12
    )
    assert compare_heldout(rows, "x", reference="lora").pvalues == {"s2ft": 1.0}


def test_a_run_from_before_eval_backend_scored_with_s2ft_and_is_no_row_of_its_own(tmp_path):
    runs = _selection_records(tmp_path)
    config_file = runs / "seed0_random_large" / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    del config["eval"]["backend"]
    config_file.write_text(yaml.safe_dump(config))
    assert {row.label: len(row.runs) for row in build_rows(find_runs([runs]))}[RANDOM] == 2


def test_exporting_another_sweeps_runs_is_refused_where_their_record_names_are_taken(tmp_path):
    """Two sweeps' jobs are both named 0, 1, ...: the second export replaced the first sweep's records unsaid, and the
    report over the records folder lost those runs (here seeds 0 and 1 of a row left one seed of another row)."""
    runs = _selection_records(tmp_path)
    records = tmp_path / "records"
    export_records(find_runs([runs]), records)
    snapshot = {p: p.read_bytes() for p in records.rglob("*") if p.is_file()}
    other = shutil.copytree(runs / "seed0_random_large", tmp_path / "other" / "seed0_random_large")
    config = yaml.safe_load((other / "config.yaml").read_text())
    config["seed"] = 7
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(
        SystemExit,
        match=rf"^error: records of other runs have these names already: "
        rf"{re.escape(str(records / 'seed0_random_large'))} \(from {re.escape(str(other))}\); export into another "
        r"folder \(or every sweep in one command: their records are named by sweep\), or remove those records first",
    ):
        main([str(tmp_path / "other"), "--export-records", str(records), "--out", str(tmp_path / "out")])
    assert {p: p.read_bytes() for p in records.rglob("*") if p.is_file()} == snapshot
    assert not (tmp_path / "out").exists()
    # The same run exported again (its config as the record's) replaces its record, as before.
    (other / "config.yaml").write_bytes((runs / "seed0_random_large" / "config.yaml").read_bytes())
    assert export_records(find_runs([other]), records) == [records / "seed0_random_large"]


def test_runs_linked_into_a_comparison_folder_are_found_and_a_run_named_twice_is_one(tmp_path):
    """Links to run directories were not followed: "no summary.json under ['cmp']", or beside real runs the linked
    ones were left out unsaid. A run given twice (its sweep and itself) was refused as "a rerun of one config"."""
    runs = _selection_records(tmp_path)
    compare = tmp_path / "cmp"
    (compare / "inner").mkdir(parents=True)
    (compare / "random").symlink_to(runs / "seed0_random_large")
    (compare / "inner" / "gradient").symlink_to(runs / "seed0_gradient_large")
    (compare / "inner" / "loop").symlink_to(compare)  # walked once
    shutil.copytree(runs / "seed1_random_large", compare / "seed1")
    assert [run.path for run in find_runs([compare])] == [
        compare / "inner" / "gradient",
        compare / "random",
        compare / "seed1",
    ]
    assert [run.path for run in find_runs([runs, runs / "seed0_random_large"])] == sorted(runs.iterdir())
    (runs / "seed3" / ".hydra").mkdir(parents=True)
    (runs / "seed3" / ".hydra" / "config.yaml").write_text("name: selection_smollm\nmodel: {name: smollm2_135m}\n")
    (compare / "unfinished").symlink_to(runs / "seed3")
    assert [run.path for run in find_unfinished([compare])] == [compare / "unfinished"]


def test_an_mtbench_run_is_reported_and_exported_without_its_answers(tmp_path):
    """predictions/mtbench.jsonl (answers and ratings, no id or correct) refused the run: "line 1 lacks one of id,
    correct; rerun the run's evaluation or leave its run out", so no MT-Bench study could be reported."""
    runs = shutil.copytree(SELECTION, tmp_path / "runs")
    answers = {"question_id": 81, "category": "writing", "answers": ["a", "b"], "ratings": [None, None]}
    (runs / "seed0_random_large" / "predictions" / "mtbench.jsonl").write_text(json.dumps(answers) + "\n")
    report = main(
        [
            str(runs),
            "--export-records",
            str(tmp_path / "records"),
            "--reference",
            RANDOM,
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert report.read_text() == (ROOT / "results" / "selection_smollm" / "report.md").read_text()
    assert not list((tmp_path / "records").rglob("mtbench*"))


@pytest.mark.parametrize("flag", ["--out", "--export-records"])
def test_an_output_folder_that_is_a_file_is_refused_before_anything_is_written(flag, tmp_path):
    """Was a FileExistsError or NotADirectoryError traceback from mkdir, an --export-records one after records were
    staged."""
    runs = _selection_records(tmp_path)
    (tmp_path / "taken").write_text("mine")
    args = [str(runs), "--out", str(tmp_path / "out"), flag, str(tmp_path / "taken")]
    with pytest.raises(SystemExit, match=rf"^error: {flag} {re.escape(str(tmp_path / 'taken'))} is a file; give a "):
        main(args)
    assert (tmp_path / "taken").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs", "taken"]


def test_wandb_that_cannot_be_read_is_one_error_naming_the_fix(monkeypatch):
    """Was wandb's UsageError traceback ("No API key configured") without a login, CommError without a network."""

    def refuse(project):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr("experiments.report.runs.wandb_summaries", refuse)
    with pytest.raises(
        SystemExit,
        match=r"^error: W&B project 'team/s2ft' cannot be read \(No API key configured. Use `wandb login` to log "
        r"in.\); log in \(`wandb login`\) on a machine with a network, or report the run directories instead",
    ):
        main(["--wandb", "team/s2ft"])


def _rewrite_rows(file: Path, change) -> None:
    rows = [json.loads(line) for line in gzip.decompress(file.read_bytes()).decode().splitlines()]
    file.write_bytes(gzip.compress("".join(json.dumps(row) + "\n" for row in change(rows)).encode()))


@pytest.mark.parametrize(
    ("stem", "change", "message"),
    [
        ("boolq", lambda rows: rows[:-1], "has 199 items where summary.json's eval.boolq.n is 200"),
        (
            "boolq",
            lambda rows: [{**rows[0], "correct": not rows[0]["correct"]}, *rows[1:]],
            "has 123 of 200 items correct where summary.json's eval.boolq.accuracy is 0.62",
        ),
        ("heldout_commonsense_test", lambda rows: rows[:-1], "gives a per-token loss of"),
        ("boolq", lambda rows: [], "has 0 items where summary.json's eval.boolq.n is 200"),
        ("heldout_commonsense_test", lambda rows: [], "gives a per-token loss of nan over 0 items where"),
    ],
    ids=["cut short", "another evaluation", "held-out cut short", "empty", "held-out empty"],
)
def test_predictions_that_do_not_give_the_summarys_numbers_are_refused(stem, change, message, tmp_path):
    """A prediction file cut short at a line (a killed backfill, a broken copy) or of another evaluation was read
    without a word: the paired tests compared fewer or other items than the table's means."""
    runs = _selection_records(tmp_path)
    file = runs / "seed0_random_large" / "predictions" / f"{stem}.jsonl.gz"
    _rewrite_rows(file, change)
    with pytest.raises(
        SystemExit,
        match=rf"^error: {re.escape(str(file.with_suffix('')))}\[\.gz\] {re.escape(message)}.* \(cut short, or of "
        r"another evaluation\); rerun the run's evaluation or leave its run out$",
    ):
        main([str(runs), "--export-records", str(tmp_path / "records"), "--out", str(tmp_path / "out")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_rows_scored_on_different_tasks_say_so_above_the_table(tmp_path):
    """lora's Avg over two tasks (50.0) stood beside s2ft's over one (80.0) as like for like, s2ft the best."""

    def run(method: str, accuracy: dict[str, float]) -> Run:
        summary = {"experiment": "e", "model": "m", "method": method, "seed": 0}
        summary |= {"eval": {t: {"accuracy": a} for t, a in accuracy.items()}}
        return Run(summary | {"avg_accuracy": statistics.mean(accuracy.values())}, None, tmp_path / method)

    runs = [run("lora", {"boolq": 0.8, "arc_easy": 0.2}), run("s2ft", {"boolq": 0.8})]
    report = write_report(runs, tmp_path / "out").read_text()
    assert (
        "\n\nScored on different tasks, so Avg is a mean over different tasks from row to row (a p-value compares only "
        "the items of tasks both rows scored; compare the task columns): `lora` (arc_easy, boolq); `s2ft` (boolq)."
        "\n\n|"
    ) in report
    assert "Scored on different tasks" not in write_report(runs[:1], tmp_path / "one").read_text()


def test_new_runs_are_added_beside_the_records_of_the_folder_they_are_exported_into(tmp_path):
    """Giving the records folder with a new sweep (to add its runs) named every run below their common folder: the
    records were written again as records/records/RUN, and the report over the folder was refused (2 runs of seed 0)."""
    records = _selection_records(tmp_path)
    new = tmp_path / "new"
    shutil.copytree(SELECTION / "seed2_random_large", new / "seed2_random_large")
    report = main([str(records), str(new), "--export-records", str(records), "--out", str(tmp_path / "out")])
    assert sorted(p.name for p in records.iterdir()) == sorted(
        [p.name for p in SELECTION.iterdir() if p.name[4] in "01"] + ["seed2_random_large"]
    )
    assert report.read_bytes() == main([str(records), "--out", str(tmp_path / "again")]).read_bytes()
    # Again, the new run beside its record: it updates the record (one run, not two of seed 2).
    again = main([str(records), str(new), "--export-records", str(records), "--out", str(tmp_path / "twice")])
    assert again.read_bytes() == report.read_bytes() and len(list(records.iterdir())) == 7
    # A new sweep whose jobs take the records' names: refused, naming both, nothing written.
    shutil.copytree(SELECTION / "seed2_gradient_large", new / "seed0_random_large")
    snapshot = {p: p.read_bytes() for p in records.rglob("*") if p.is_file()}
    with pytest.raises(
        SystemExit,
        match=rf"^error: two runs would share a record name under {re.escape(str(records))}: seed0_random_large "
        rf"\({re.escape(str(new / 'seed0_random_large'))}, {re.escape(str(records / 'seed0_random_large'))}\); "
        r"export into another folder, giving every sweep directory in one command",
    ):
        main([str(records), str(new), "--export-records", str(records), "--out", str(tmp_path / "out")])
    assert {p: p.read_bytes() for p in records.rglob("*") if p.is_file()} == snapshot


def test_mtbench_scores_are_a_column_and_compared_turn_by_turn(tmp_path):
    """An instruction study (paper Table 3) had no MT-Bench number in its report: rows were compared on accuracy
    alone. Gradient's runs rate every turn one point above random's on the same seed; activation's rate random's
    turns alike but leave one unrated (skipped in the pairing)."""
    runs = _selection_records(tmp_path)
    scores = {}
    for run_dir in sorted(runs.iterdir()):
        seed, strategy = run_dir.name.split("_")[0].removeprefix("seed"), run_dir.name.split("_")[1]
        ratings = {str(q): [float(1 + (q * 7 + int(seed) * 3 + t) % 8) for t in (0, 1)] for q in range(16)}
        if strategy == "gradient":
            ratings = {q: [r + 1 for r in turns] for q, turns in ratings.items()}
        if strategy == "activation":
            ratings["0"][1] = None
        rated = [r for turns in ratings.values() for r in turns if r is not None]
        scores.setdefault(strategy, []).append(sum(rated) / len(rated))
        file = run_dir / "summary.json"
        summary = json.loads(file.read_text())
        summary["mtbench"] = {"score": sum(rated) / len(rated), "ratings": ratings, "n_rated": len(rated)}
        file.write_text(json.dumps(summary))
    text = main([str(runs), "--reference", RANDOM, "--out", str(tmp_path / "out")]).read_text()
    column = _column(text, "MT-Bench (1-10)")
    for strategy in scores:
        mean, std = statistics.mean(scores[strategy]), statistics.stdev(scores[strategy])
        (cell,) = [cell for label, cell in column.items() if f"strategy={strategy}" in label]
        assert cell == f"{mean:.2f} ± {std:.2f}"
    gradient, activation = "s2ft order=large strategy=gradient", "s2ft order=small strategy=activation"
    assert (
        f"- MT-Bench-style score: highest `{gradient}`; separable from it: `{RANDOM}` (p<0.001 *; over seeds "
        f"p<0.001 *), `{activation}` (p<0.001 *; over seeds p<0.001 *)."
    ) in text  # +1 on every turn both rated, at each seed
    # Against random: the same ratings on every turn both rated (p = 1), though the means differ by the unrated turn.
    difference = statistics.mean(scores["activation"]) - statistics.mean(scores["random"])
    assert f"- MT-Bench-style score: `{gradient}` +1.00 (p<0.001 *; over seeds p<0.001 *), `{activation}` " in text
    # And over seeds: each seed's difference is over the turns both rated (0), as the bootstrap's, where it was the
    # difference of the scores, which the unrated turn sets apart by another amount at each seed (p = 0.626).
    assert f"`{activation}` {difference:+.2f} (p=1.000; over seeds p=1.000)." in text


def test_an_export_that_fails_on_one_run_replaces_no_record(tmp_path, monkeypatch):
    """Records were replaced one by one, so a failure at the third run (a full disk) left two updated and the rest
    old: a records folder of no one export."""
    runs = _selection_records(tmp_path)
    records = tmp_path / "records"
    export_records(find_runs([runs]), records)
    snapshot = {p: p.read_bytes() for p in records.rglob("*") if p.is_file()}
    for summary_file in runs.glob("*/summary.json"):  # an updated export of the same runs
        summary = json.loads(summary_file.read_text())
        summary["train"]["wall_s"] += 1
        summary_file.write_text(json.dumps(summary))
    written = []

    def write_then_fail(run_dir, out):
        if len(written) == 2:
            raise OSError(28, "No space left on device")
        write_record(run_dir, out)
        written.append(out)

    monkeypatch.setattr(records_module, "write_record", write_then_fail)
    with pytest.raises(OSError, match="No space left"):
        export_records(find_runs([runs]), records)
    assert len(written) == 2
    assert {p: p.read_bytes() for p in records.rglob("*") if p.is_file()} == snapshot  # no .partial left either
    monkeypatch.undo()
    export_records(find_runs([runs]), records)
    assert all(
        json.loads((records / run.name / "summary.json").read_text()) == json.loads((run / "summary.json").read_text())
        for run in runs.iterdir()
    )


def test_a_pair_is_separable_only_where_its_seed_level_p_is_below_the_level_too():
    """The commonsense rerun's GSM8K line read "separable from it: `lora` (p=0.000 *; over seeds p=0.053)", while the
    note under it says to read a pair as separable only where both p are below 0.05."""
    assert pairs_verdict({"lora": 0.0, "full": 0.0, "spft": 0.3}, {"lora": 0.053, "full": 0.047}) == (
        "separable from it: `full` (p<0.001 *; over seeds p=0.047 *); not separable from it: `lora` "
        "(p<0.001 *; over seeds p=0.053), `spft` (p=0.300)"
    )
    # One shared seed has no seed-level p: the bootstrap's decides.
    assert pairs_verdict({"lora": 0.01}, {}) == "separable from it: `lora` (p=0.010 *)"
    best = Row("s2ft", [])
    assert significance_statement(best, {"lora": 0.004, "full": 0.3}, over_seeds={"lora": 0.09, "full": 0.5}) == (
        "Not separable: no row differs from the best mean (`s2ft`) at the 5% level (paired bootstrap over the items "
        "of runs with the same seed, hierarchical over seeds, and the t-test over seeds where they share two or "
        "more; else Welch over seeds); separable by the item bootstrap alone: `lora` (p=0.004 *; over seeds "
        "p=0.090); do not rank these rows."
    )


def test_the_accuracy_statement_gives_the_seed_level_p_of_every_pair_over_two_or_more_seeds(tmp_path):
    """The components report read "separable from it: `s2ft target_split.down=1.0` (p=0.005 *), `s2ft
    target_split.gate=1.0` (p=0.033 *)" over three seeds, with no seed-level p, which is 0.055 and 0.130 there."""
    runs = ROOT / "results" / "components_smollm" / "runs"
    accuracy = {p.name: json.loads((p / "summary.json").read_text())["avg_accuracy"] for p in runs.iterdir()}
    report = main([str(runs), "--reference", "", "--out", str(tmp_path)]).read_text()
    (line,) = [line for line in report.splitlines() if line.startswith(("Best mean", "Not separable"))]
    over_seeds = {
        part: stats.ttest_rel(
            [accuracy[f"seed{s}_{part}"] for s in range(3)], [accuracy[f"seed{s}_up"] for s in range(3)]
        ).pvalue
        for part in ("down", "gate")
    }
    assert over_seeds["down"] > ALPHA and over_seeds["gate"] > ALPHA
    assert line.startswith("Not separable: no row differs from the best mean (`s2ft target_split.up=1.0`)")
    assert line.endswith(
        f"separable by the item bootstrap alone: `s2ft target_split.down=1.0` (p=0.005 *; over seeds "
        f"p={over_seeds['down']:.3f}), `s2ft target_split.gate=1.0` (p=0.033 *; over seeds "
        f"p={over_seeds['gate']:.3f}); do not rank these rows."
    )


def test_mtbench_turns_are_resampled_with_their_question():
    """The bootstrap resampled the rated turns one by one, as if a question's two turns (one conversation, rated by
    one judge) were independent: here every question's turns differ alike (+1 on 12 questions, -1 on 8), and p was
    0.26, that of 40 independent items, where the 20 questions give about 0.49."""

    def run(method: str, ratings: dict[str, list[float]]) -> Run:
        score = statistics.mean(r for turns in ratings.values() for r in turns)
        summary = {"experiment": "e", "model": "m", "method": method, "seed": 0}
        return Run(summary | {"mtbench": {"score": score, "ratings": ratings}})

    up = {str(q): [6.0, 6.0] if q < 12 else [5.0, 5.0] for q in range(20)}
    down = {str(q): [5.0, 5.0] if q < 12 else [6.0, 6.0] for q in range(20)}
    rows = build_rows([run("lora", down), run("s2ft", up)])
    p = compare_mtbench(rows, reference="lora").pvalues["s2ft"]
    questions = [1.0] * 12 + [-1.0] * 8
    assert p == pytest.approx(paired_bootstrap_p(questions, [0.0] * 20), abs=0.03)  # Monte Carlo sd 0.005
    assert paired_bootstrap_p(questions * 2, [0.0] * 40) < p - 0.1  # the turn-by-turn p


def test_the_seed_level_p_of_rows_scored_on_different_tasks_is_over_the_tasks_both_scored(tmp_path):
    """The bootstrap compares the items of the tasks both rows scored, while the seed-level t-test took each seed's Avg
    difference, here over one task against two: LoRA's second task, which S2FT never ran, swung its Avg from seed to
    seed and the t-test's p with it (0.50), though S2FT was ahead on the shared task at every seed (p = 0.013)."""

    def run(method: str, seed: int, wins: dict[str, tuple[int, int]]) -> Run:
        path = tmp_path / "runs" / f"{method}{seed}"
        (path / "predictions").mkdir(parents=True)
        accuracy = {}
        for task, (right, total) in wins.items():
            rows = [{"id": f"{task}-{i}", "correct": i < right} for i in range(total)]
            (path / "predictions" / f"{task}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
            accuracy[task] = right / total
        summary = {"experiment": "e", "model": "m", "method": method, "seed": seed}
        summary |= {"eval": {t: {"accuracy": a, "n": wins[t][1]} for t, a in accuracy.items()}}
        (path / "summary.json").write_text(json.dumps(summary | {"avg_accuracy": statistics.mean(accuracy.values())}))
        return path

    for seed, (right, other) in enumerate([(30, 9), (31, 1), (29, 5)]):
        run("s2ft", seed, {"t1": (right, 50)})
        run("lora", seed, {"t1": (25, 50), "t2": (other, 10)})
    report = main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")]).read_text()
    expected = stats.ttest_rel([0.6, 0.62, 0.58], [0.5, 0.5, 0.5]).pvalue
    assert 0.01 < expected < ALPHA
    p = compare_to_best(build_rows(find_runs([tmp_path / "runs"])), ["t1", "t2"]).pvalues["lora"]
    assert f"Best mean: `s2ft`; separable from it: `lora` (p={p:.3f} *; over seeds p={expected:.3f} *) (p < " in report
    assert f"- Avg accuracy: `lora` -10.0 (p={p:.3f} *; over seeds p={expected:.3f} *)." in report


def test_a_p_value_below_a_thousandth_is_printed_as_below_it_never_as_zero():
    """No resample of 10,000 as extreme printed "p=0.000 *": a p-value of zero, where the bootstrap can only say p is
    below a few in 10,000 (and a t-test's p of 2e-5 is no zero either)."""
    assert pairs_verdict({"a": 0.0, "b": 0.00002, "c": 0.0006}, {"a": 0.0}) == (
        "separable from it: `a` (p<0.001 *; over seeds p<0.001 *), `b` (p<0.001 *), `c` (p=0.001 *)"
    )


def test_the_seed_level_p_of_rows_scored_on_different_heldout_items_is_over_the_items_both_scored(tmp_path):
    """As for tasks: the bootstrap compares the held-out items both runs of a seed scored, while the seed-level t-test
    took the summaries' losses, here LoRA's over 100 items against S2FT's 50, whose other 50 swung LoRA's mean from
    seed to seed (p = 0.62) though S2FT was 0.10, 0.12, 0.08 lower on the shared items (p = 0.013)."""

    def run(method: str, seed: int, per_token: list[float]) -> None:
        path = tmp_path / "runs" / f"{method}{seed}"
        (path / "predictions").mkdir(parents=True)
        rows = [{"id": f"q{i}", "nll": 10 * loss, "tokens": 10} for i, loss in enumerate(per_token)]
        (path / "predictions" / "heldout_x.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        summary = {"experiment": "e", "model": "m", "method": method, "seed": seed}
        (path / "summary.json").write_text(
            json.dumps(summary | {"heldout": {"x": {"after": statistics.mean(per_token)}}})
        )

    for seed, (gain, other) in enumerate([(0.10, 2.0), (0.12, 0.2), (0.08, 1.1)]):
        run("lora", seed, [1.0] * 50 + [other] * 50)
        run("s2ft", seed, [1.0 - gain] * 50)
    report = main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")]).read_text()
    expected = stats.ttest_rel([0.9, 0.88, 0.92], [1.0, 1.0, 1.0]).pvalue
    assert 0.01 < expected < ALPHA
    assert (
        f"- Held-out loss x: lowest `s2ft`; separable from it: `lora` (p<0.001 *; over seeds p={expected:.3f} *)."
        in report
    )
    assert f"- held-out loss x: `lora` +0.1500 (p<0.001 *; over seeds p={expected:.3f} *)." in report


def test_the_p_column_stars_only_the_pairs_the_statement_calls_separable(tmp_path):
    """The column showed the item bootstrap's p with its star ("0.005 *") beside a statement calling the same pair
    not separable (its seed-level p 0.055): it shows both p now and stars only a separable pair."""
    runs = ROOT / "results" / "components_smollm" / "runs"
    report = main([str(runs), "--reference", "", "--out", str(tmp_path)]).read_text()
    lines = report.splitlines()
    header = next(line for line in lines if line.startswith("| method |")).split(" | ")
    column = header.index(P_HEADER)
    cells = {
        line.split(" | ")[0].removeprefix("| ").strip("*"): line.split(" | ")[column]
        for line in lines
        if line.startswith(("| s2ft", "| **s2ft"))
    }
    assert re.fullmatch(r"0\.005 / 0\.0\d\d", cells["s2ft target_split.down=1.0"])  # no star: not separable
    assert re.fullmatch(r"0\.033 / 0\.1\d\d", cells["s2ft target_split.gate=1.0"])
    assert cells["s2ft target_split.up=1.0"] == "best"
    assert not any(cell.endswith("*") for cell in cells.values())
    (statement,) = [line for line in lines if line.startswith(("Best mean", "Not separable"))]
    assert statement.startswith("Not separable")
    # A separable pair keeps its star; one seed shared (no seed-level p) is the bootstrap's alone.
    assert (_p_cell(0.0001, 0.01), _p_cell(0.01, None), _p_cell(0.01, 0.2)) == (
        "<0.001 / 0.010 *",
        "0.010 *",
        "0.010 / 0.200",
    )
