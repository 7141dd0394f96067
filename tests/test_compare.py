"""The variant study (``medseg compare``): variants parsed and checked, Holm and ranks from
their definitions, and a 2-variant, 2-fold study logged as nested MLflow runs, resumed."""

from __future__ import annotations

import csv
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from medseg.config import Config, ConfigError
from medseg.workflows.compare import (
    VariantResult,
    compare_variants,
    critical_difference,
    holm,
    mean_ranks,
    parse_variants,
)


def test_holm_matches_its_definition_on_a_hand_worked_example():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted: 0.005, 0.01, 0.03, 0.04 with m = 4: multipliers 4, 3, 2, 1
    stepped = [4 * 0.005, 3 * 0.01, 2 * 0.03, 1 * 0.04]  # 0.02, 0.03, 0.06, 0.04
    monotone = np.maximum.accumulate(np.minimum(1, stepped))  # 0.02, 0.03, 0.06, 0.06
    expected = np.empty(4)
    expected[np.argsort(p)] = monotone
    np.testing.assert_allclose(holm(p), expected)
    np.testing.assert_allclose(holm(p), [0.03, 0.06, 0.06, 0.02])
    # NaN (no test) is left out of m; values are capped at 1
    np.testing.assert_allclose(holm([0.6, np.nan, 0.2]), [0.6, np.nan, 0.4])
    np.testing.assert_allclose(holm([0.7, 0.9]), [1.0, 1.0])


def test_mean_ranks_and_critical_difference():
    scores = np.array([[0.9, 0.8, 0.7], [0.5, 0.6, 0.6], [0.2, 0.1, np.nan]])
    # case 0: ranks 1, 2, 3; case 1: 3, 1.5, 1.5; case 2 has a NaN and is left out
    np.testing.assert_allclose(mean_ranks(scores), [2.0, 1.75, 2.25])
    assert critical_difference(3, 10) == pytest.approx(2.343 * math.sqrt(3 * 4 / 60))
    assert critical_difference(12, 10) is None


def test_compare_variants_pairs_cases_and_tests_against_the_baseline():
    rng = np.random.default_rng(0)
    cases = [f"c{i}" for i in range(8)]
    base = {c: {"dice_kidney": float(d), "hd95_kidney": float(h)}
            for c, d, h in zip(cases, rng.uniform(0.5, 0.9, 8), rng.uniform(1, 9, 8), strict=True)}
    better = {c: {"dice_kidney": s["dice_kidney"] + 0.05 * (i + 1), "hd95_kidney": 1.0}
              for i, (c, s) in enumerate(base.items())}
    worse = {c: {"dice_kidney": s["dice_kidney"] - 0.01 * (i % 3 + 1) * (-1) ** i,
                 "hd95_kidney": 2.0} for i, (c, s) in enumerate(base.items())}
    results = [VariantResult("unet", base, 10, 1.0), VariantResult("res", better, 20, 2.0),
               VariantResult("att", worse, 30, 3.0)]
    comparison = compare_variants("model.name", results, "unet")
    dice = {lab: np.array([r.cases[c]["dice_kidney"] for c in cases]) for lab, r in
            zip(["unet", "res", "att"], results, strict=True)}
    raw = [stats.wilcoxon(dice["res"], dice["unet"]).pvalue,
           stats.wilcoxon(dice["att"], dice["unet"]).pvalue]
    tests = {t["variant"]: t for t in comparison.tests}
    assert [tests["res"]["p_wilcoxon"], tests["att"]["p_wilcoxon"]] == pytest.approx(raw)
    assert [tests["res"]["p_holm"], tests["att"]["p_holm"]] == pytest.approx(holm(raw))
    row = next(r for r in comparison.rows if r["variant"] == "res")
    assert row["dice_mean"] == pytest.approx(dice["res"].mean())
    assert row["dice_std"] == pytest.approx(dice["res"].std())
    assert row["parameters"] == 20 and row["hd95_mean"] == 1.0
    assert comparison.ranks["res"] == 1.0  # best on every case
    assert "| res | kidney |" in comparison.markdown()
    results[2].cases.pop("c0")
    with pytest.raises(ValueError, match="variant 'att' scored other cases than the baseline"):
        compare_variants("model.name", results, "unet")


@pytest.mark.parametrize(
    ("spec", "baseline", "fragment"),
    [
        ("model.nme=unet,residual_unet", None, "unknown config key 'model.nme'; did you mean 'model.name'"),
        ("model.name=unet", None, "config key 'model.name' has 1 value(s) (unet); give two or more"),
        ("model.name=unet,", None, "config key 'model.name' has 1 value(s)"),
        ("model.name=unet,unet", None, "config key 'model.name' lists 'unet' more than once"),
        ("model.name=unet,unet3", None, "value 'unet3' of 'model.name'"),
        ("seed=1,2", None, "config key 'seed' cannot be compared"),
        ("evaluation.folds=2,3", None, "config key 'evaluation.folds' cannot be compared"),
        ("model.name", None, "is not of the form section.key=value1,value2"),
        ("model.name=unet,residual_unet", "plain_unet", "baseline 'plain_unet' is not one of"),
    ],
)
def test_bad_variant_lists_name_the_key(spec, baseline, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        parse_variants(Config(), spec, baseline)


def test_variants_share_everything_but_the_key():
    key, variants, baseline = parse_variants(
        Config(), "patch.patch_size=[8,16,16],[16,16,16]", "[16,16,16]"
    )
    assert key == "patch.patch_size" and baseline == "[16,16,16]"
    assert [v.config.patch.patch_size for v in variants] == [(8, 16, 16), (16, 16, 16)]
    a, b = (v.config.to_flat_dict() for v in variants)
    assert {k for k in a if a[k] != b[k]} == {"patch.patch_size"}


def test_compare_command_names_the_bad_key_before_any_store(tmp_path, capsys, monkeypatch):
    from medseg.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["compare", "model.name=unet"]) == 2
    assert "config key 'model.name' has 1 value(s)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no MLflow store was created


def _children(client, run_id):
    run = client.get_run(run_id)
    return client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'"
    )


def _fold_cases(client, fold_run) -> dict[str, dict[str, float]]:
    """A fold run's own per-case scores, from its scores.tsv."""
    from medseg.evaluation.metrics import wide_scores
    from medseg.tracking import artifacts

    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(fold_run.info.run_id, artifacts.SCORES, tmp)
        return wide_scores(artifacts.read_scores(path))


@pytest.mark.slow
def test_two_variant_study_nests_runs_tests_pairs_and_resumes(tiny_config, tmp_path):
    from mlflow.entities import RunStatus
    from mlflow.tracking import MlflowClient

    from medseg.tracking.compare import run_comparison

    config = tiny_config(**{
        "evaluation.protocol": "kfold", "evaluation.folds": 2,
        "evaluation.splits_file": str(tmp_path / "splits.json"),
        "train.epochs": 1, "train.steps_per_epoch": 1, "tracking.log_model": False,
        "tracking.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
        "tracking.artifact_root": str(tmp_path), "tracking.experiment": "compare",
    })
    spec = "model.name=unet,residual_unet"
    comparison, study_id = run_comparison(config, spec)
    client = MlflowClient(config.tracking.tracking_uri)
    study = client.get_run(study_id)
    assert study.info.status == "FINISHED"
    assert study.data.params["compare.key"] == "model.name"
    variants = {r.data.tags["medseg.variant"]: r for r in _children(client, study_id)}
    assert sorted(variants) == ["residual_unet", "unet"]
    splits = json.loads((tmp_path / "splits.json").read_text())
    folds_of = {}
    for label, run in variants.items():
        assert run.info.status == "FINISHED" and run.data.params["model.name"] == label
        assert run.data.metrics["compare_parameters"] > 0
        folds = _children(client, run.info.run_id)
        assert sorted(f.data.tags["medseg.fold"] for f in folds) == ["fold_0", "fold_1"]
        folds_of[label] = folds
        # the same saved folds for every variant
        tested = sorted(tuple(sorted(_fold_cases(client, f))) for f in folds)
        assert tested == sorted(tuple(sorted(f["test"])) for f in splits["folds"])
    assert (variants["unet"].data.metrics["compare_parameters"]
            != variants["residual_unet"].data.metrics["compare_parameters"])

    # the table's numbers are those of the folds' own per-case scores
    with tempfile.TemporaryDirectory() as tmp:
        table = client.download_artifacts(study_id, "comparison/table.csv", tmp)
        with open(table, newline="") as f:
            rows = list(csv.DictReader(f))
        logged = client.list_artifacts(study_id, "comparison")
    names = {Path(a.path).name for a in logged}
    assert {"table.json", "table.md", "tests.json", "dice_boxplot.png", "mean_ranks.png"} <= names
    per_case = {label: {c: s for f in folds for c, s in _fold_cases(client, f).items()}
                for label, folds in folds_of.items()}
    cases = sorted(per_case["unet"])
    assert len(cases) == 4
    for row in rows:
        scores = per_case[row["variant"]]
        for metric in ("dice", "hd95"):
            values = np.array([scores[c].get(f"{metric}_{row['structure']}", np.nan)
                               for c in cases])
            if np.any(np.isfinite(values)):
                assert float(row[f"{metric}_mean"]) == pytest.approx(np.nanmean(values))
                assert float(row[f"{metric}_std"]) == pytest.approx(np.nanstd(values))
    # p-values: scipy's Wilcoxon on the paired per-case Dice
    for test in comparison.tests:
        s = test["structure"]
        a = np.array([per_case["residual_unet"][c][f"dice_{s}"] for c in cases])
        b = np.array([per_case["unet"][c][f"dice_{s}"] for c in cases])
        keep = np.isfinite(a) & np.isfinite(b)
        if np.all(a[keep] == b[keep]):
            assert math.isnan(test["p_wilcoxon"])
        else:
            assert test["p_wilcoxon"] == pytest.approx(stats.wilcoxon(a[keep], b[keep]).pvalue)
            assert test["p_holm"] == pytest.approx(test["p_wilcoxon"])  # one comparison

    # an interrupted study: the second variant's run did not finish
    client.set_terminated(variants["residual_unet"].info.run_id,
                          RunStatus.to_string(RunStatus.FAILED))
    client.set_terminated(study_id, RunStatus.to_string(RunStatus.FAILED))
    resumed, resumed_id = run_comparison(config, spec, resume_run_id=study_id)
    assert resumed_id == study_id and client.get_run(study_id).info.status == "FINISHED"
    after = _children(client, study_id)
    assert sorted(r.data.tags["medseg.variant"] for r in after) == [
        "residual_unet", "residual_unet", "unet"]
    unet = client.get_run(variants["unet"].info.run_id)
    assert unet.info.end_time == variants["unet"].info.end_time  # not run again
    assert len(_children(client, unet.info.run_id)) == 2
    def unet_dice(rows):
        return {r["structure"]: r["dice_mean"] for r in rows if r["variant"] == "unet"}

    assert unet_dice(resumed.rows) == pytest.approx(unet_dice(comparison.rows), nan_ok=True)
    with pytest.raises(ValueError, match="differs in compare.values"):
        run_comparison(config, "model.name=unet,plain_unet", resume_run_id=study_id)
