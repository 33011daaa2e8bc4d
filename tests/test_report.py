"""The report on summaries of real smoke runs: grouping, seed statistics, significance, figures, CLI."""

import json
import shutil
import statistics
from pathlib import Path

import pytest
import yaml
from scipy import stats

from experiments.report import heldout_statement, main, significance_statement, write_report
from experiments.report_table import Row, avg_accuracy, build_rows, compare_heldout, compare_to_best, heldout_after
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


def _seed(row, seed):
    return next(run for run in row.runs if run.summary["seed"] == seed)


def test_comparison_uses_bootstrap_for_single_seed_rows(sweep):
    runs = find_runs([sweep])
    rows = build_rows(runs)
    best, pvalues = compare_to_best(rows, ["boolq", "arc_easy"])
    other = next(row for row in rows if row is not best)
    assert set(pvalues) == {other.label}
    # lora has one seed (0), so the comparison is the paired bootstrap over the 6 items that seed 0 of both rows
    # answered; S2FT's seed 1 drew other items and has no LoRA run to pair with.
    keys = [(t, i) for t in ("arc_easy", "boolq") for i in sorted(_seed(other, 0).item_correct(t))]
    assert len(keys) == 6
    mine = [_seed(other, 0).item_correct(t)[i] for t, i in keys]
    theirs = [_seed(best, 0).item_correct(t)[i] for t, i in keys]
    assert pvalues[other.label] == paired_bootstrap_p(mine, theirs)


def test_items_are_paired_only_within_a_seed(sweep):
    rows = build_rows(find_runs([sweep]))
    lora, s2ft = rows
    seed1 = Row("s2ft", [_seed(s2ft, 1)])
    assert not _seed(s2ft, 1).item_losses("gsm8k_test").keys() & lora.runs[0].item_losses("gsm8k_test").keys()
    best, pvalues = compare_heldout([lora, seed1], "gsm8k_test")
    assert list(pvalues.values()) == [None]  # seed 1's items are not seed 0's: nothing to pair, no test


def test_heldout_losses_are_compared_item_by_item_for_single_seed_rows(sweep):
    rows = build_rows(find_runs([sweep]))
    for name in ("commonsense_test", "gsm8k_test"):
        losses = {row.label: row.values(heldout_after(name)) for row in rows}
        best, pvalues = compare_heldout(rows, name)
        assert best.label == min(losses, key=lambda label: statistics.mean(losses[label]))
        other = next(row for row in rows if row is not best)
        mine, theirs = _seed(other, 0).item_losses(name), _seed(best, 0).item_losses(name)
        # Seed 0 of both rows scored the same held-out items (4 drawn; the smoke max_length may leave one without a
        # response token); their token-weighted means are the summaries' losses.
        assert mine.keys() == theirs.keys() and 3 <= len(mine) <= 4
        for run in (_seed(other, 0), _seed(best, 0)):
            items = run.item_losses(name).values()
            mean = sum(nll for nll, _ in items) / sum(tokens for _, tokens in items)
            assert mean == pytest.approx(heldout_after(name)(run.summary), rel=1e-12)
        ids = sorted(mine)
        expected = paired_bootstrap_p(
            [mine[i][0] for i in ids], [theirs[i][0] for i in ids], weights=[mine[i][1] for i in ids]
        )
        assert pvalues == {other.label: expected}
        line = heldout_statement(name, best, pvalues)
        assert line.startswith(f"- Held-out loss {name}: lowest {best.label};") and f"{other.label} p=" in line


def test_reference_row_is_compared_with_every_other_row(sweep, tmp_path):
    runs = find_runs([sweep])
    rows = build_rows(runs)
    lora, s2ft = rows
    anchor, pvalues = compare_heldout(rows, "gsm8k_test", reference="s2ft")
    assert anchor is s2ft and set(pvalues) == {"lora"}
    mine, theirs = _seed(lora, 0).item_losses("gsm8k_test"), _seed(s2ft, 0).item_losses("gsm8k_test")
    ids = sorted(mine)
    expected = paired_bootstrap_p([mine[i][0] for i in ids], [theirs[i][0] for i in ids], [mine[i][1] for i in ids])
    assert pvalues["lora"] == expected
    assert compare_to_best(rows, ["boolq"], reference="dora") == (None, {})

    report = write_report(runs, tmp_path / "ref").read_text()
    diff = statistics.mean(lora.values(heldout_after("gsm8k_test"))) - statistics.mean(
        s2ft.values(heldout_after("gsm8k_test"))
    )
    assert "s2ft against each other row" in report
    assert f"- held-out loss gsm8k_test: lora {diff:+.4f} (p={expected:.3f}" in report
    assert "against each other row" not in write_report(runs, tmp_path / "none", reference=None).read_text()


def test_heldout_statement_needs_something_tested():
    assert heldout_statement("x", None, {}) is None
    rows = build_rows([])
    assert rows == [] and compare_heldout(rows, "x") == (None, {})


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
    from experiments.report_table import Row

    best = Row("s2ft", [])
    assert significance_statement(best, {"lora": 0.4, "full": None}).startswith("Not separable")
    assert "lora" in significance_statement(best, {"lora": 0.01, "full": 0.3})


class FakeWandbRun:
    """What `wandb.Api().runs()` yields for a run the runner logged: its config, final metrics and history."""

    def __init__(self, run_dir: Path, index: int):
        from s2ft.lightning.runner import flat_metrics

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
    import wandb

    from experiments.runs import wandb_runs

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
        assert got.settings() == want.settings()

    def avg_cells(report: str) -> dict[str, str]:
        rows = [line.split(" | ") for line in report.splitlines() if line.startswith("| ") and "---" not in line]
        avg = rows[0].index("Avg")
        return {row[0].strip("| *"): row[avg] for row in rows[1:]}

    from_wandb = main(["--wandb", "team/s2ft", "--out", str(tmp_path / "wandb")]).read_text()
    from_disk = write_report(local, tmp_path / "disk").read_text()
    assert avg_cells(from_wandb) == avg_cells(from_disk) and len(avg_cells(from_disk)) == 2

    monkeypatch.setattr(wandb, "Api", lambda: type("Api", (), {"runs": lambda self, p: [other]})())
    with pytest.raises(ValueError, match="has no s2ft runs"):
        wandb_runs("team/empty")


def test_heldout_backfill_reproduces_a_finished_runs_item_losses(sweep, tmp_path):
    from experiments.heldout_items import backfill, main

    run = tmp_path / "run"
    shutil.copytree(sweep / "0", run)
    files = sorted((run / "predictions").glob("heldout_*.jsonl"))
    assert [f.name for f in files] == ["heldout_commonsense_test.jsonl", "heldout_gsm8k_test.jsonl"]
    written = {f.name: [json.loads(line) for line in f.read_text().splitlines()] for f in files}
    for f in files:
        f.unlink()
    losses = backfill(run)
    summary = json.loads((run / "summary.json").read_text())
    assert losses == pytest.approx({n: h["after"] for n, h in summary["heldout"].items()}, rel=1e-9)
    for f in files:
        again = [json.loads(line) for line in f.read_text().splitlines()]
        assert [(r["id"], r["tokens"]) for r in again] == [(r["id"], r["tokens"]) for r in written[f.name]]
        assert [r["nll"] for r in again] == pytest.approx([r["nll"] for r in written[f.name]], rel=1e-9)
    assert backfill(run) == {}  # already there: nothing recomputed

    summary["heldout"]["gsm8k_test"]["after"] += 0.5  # a summary the run's model does not reproduce
    (run / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ValueError, match="differ from summary.json"):
        backfill(run, force=True)
    assert not list((run / "predictions").glob("heldout_*.jsonl"))
    with pytest.raises(FileNotFoundError, match="finished training run"):
        main([str(tmp_path)])
