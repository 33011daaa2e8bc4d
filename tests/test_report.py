"""The report on summaries of real smoke runs: grouping, seed statistics, significance, figures, CLI."""

import json
import shutil
import statistics
from pathlib import Path

import pytest
from scipy import stats

from experiments.report import main, significance_statement, write_report
from experiments.report_table import avg_accuracy, build_rows, compare_to_best
from experiments.runs import find_runs
from experiments.stats import estimate, paired_bootstrap_p, welch_p

ROOT = Path(__file__).resolve().parents[1]
# (method variant, seed): two seeds of S2FT and one of LoRA, so both the t-test and the bootstrap path are used.
RUNS = [("smollm/s2ft", 0), ("smollm/s2ft", 1), ("smollm/lora", 0)]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A sweep directory of real smoke runs of commonsense_smollm (tiny model, 2 steps, 3 items per task)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from s2ft.lightning import run_experiment

    root = tmp_path_factory.mktemp("sweep")
    for i, (method, seed) in enumerate(RUNS):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(
                "config",
                overrides=["+experiment=commonsense_smollm", f"method={method}", f"seed={seed}", "logger=none"],
            )
        cfg = OmegaConf.to_container(OmegaConf.merge(cfg, OmegaConf.load(ROOT / "conf/debug/smoke.yaml")), resolve=True)
        cfg["paths"].update(root=str(ROOT), data_dir=str(ROOT / "data"))
        cfg["eval"].update(tasks=["boolq", "arc_easy"], limit=3, heldout_limit=4)
        cfg["trainer"]["max_steps"] = 2
        run_experiment(cfg, root / str(i))
    return root


def test_runs_are_found_and_grouped_into_rows(sweep):
    runs = find_runs([sweep])
    assert len(runs) == len(RUNS)
    rows = build_rows(runs)
    assert [(row.label, len(row.runs)) for row in rows] == [("lora", 1), ("s2ft", 2)]
    s2ft = rows[1]
    accuracies = [json.loads((sweep / str(i) / "summary.json").read_text())["avg_accuracy"] for i in (0, 1)]
    got = s2ft.estimate(avg_accuracy)
    assert got.mean == pytest.approx(statistics.mean(accuracies), abs=1e-12)
    assert got.std == pytest.approx(statistics.stdev(accuracies), abs=1e-12)


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


def test_comparison_uses_bootstrap_for_single_seed_rows(sweep):
    runs = find_runs([sweep])
    rows = build_rows(runs)
    best, pvalues = compare_to_best(rows, ["boolq", "arc_easy"])
    other = next(row for row in rows if row is not best)
    assert set(pvalues) == {other.label}
    # lora has one seed, so the comparison is the paired bootstrap over the 6 items both answered
    items = [
        (other.runs[0].item_correct(t)[i], best.runs[0].item_correct(t)[i])
        for t in ("boolq", "arc_easy")
        for i in sorted(other.runs[0].item_correct(t))
    ]
    assert len(items) == 6
    assert pvalues[other.label] == paired_bootstrap_p([a for a, _ in items], [b for _, b in items])


def test_cli_writes_the_report(sweep, tmp_path):
    path = main([str(sweep), "--out", str(tmp_path)])
    assert path == tmp_path / "report.md" and path.is_file()
    with pytest.raises(SystemExit):
        main([])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main([str(tmp_path / "missing"), "--out", str(tmp_path)])


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


def test_statement_refuses_to_rank_inseparable_rows():
    from experiments.report_table import Row

    best = Row("s2ft", [])
    assert significance_statement(best, {"lora": 0.4, "full": None}).startswith("Not separable")
    assert "lora" in significance_statement(best, {"lora": 0.01, "full": 0.3})
