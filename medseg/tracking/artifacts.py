"""What a run logs besides params and tags: results, tables and plots.

Their names live in :mod:`medseg.tracking.names` (re-exported here): the writers below and
the readers (``medseg predict``, ``medseg reproduce``, a resumed evaluation) share them.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

from medseg.evaluation.calibration import (
    TEMPERATURE_FILE,
    plot_reliability_diagram,
    write_temperature,
)
from medseg.evaluation.metrics import Score, long_scores
from medseg.evaluation.visuals import (
    intensity_histograms,
    plot_dataset_overview,
    plot_learning_curves,
    plot_metric_boxplots,
    write_overlay_gif,
    write_slice_montage,
)
from medseg.inference.ensemble import Ensemble
from medseg.inference.postprocess import save_postprocessing
from medseg.pipeline import read_cases
from medseg.tracking.callbacks import finite
from medseg.tracking.names import (
    CASE_POSTPROCESSING,
    CASES,
    CASES_TABLE,
    CONFIG,
    ENSEMBLE,
    EXPERIMENT_PLAN,
    FINGERPRINT,
    FOLD,
    HISTORY,
    PLAN,
    PLAN_OVERRIDES,
    POSTPROCESSING,
    SCORES,
    SPLIT,
    VALIDATION_CASES,
    VALIDATION_TABLE,
)
from medseg.workflows.cross_validation import CrossValidationResult
from medseg.workflows.experiment import DataSetup, ExperimentResult, prediction_plan

__all__ = [
    "CASES",
    "CASE_POSTPROCESSING",
    "CONFIG",
    "ENSEMBLE",
    "EXPERIMENT_PLAN",
    "FINGERPRINT",
    "FOLD",
    "HISTORY",
    "PLAN",
    "PLAN_OVERRIDES",
    "POSTPROCESSING",
    "SCORES",
    "SPLIT",
    "VALIDATION_CASES",
    "VALIDATION_TABLE",
    "CASES_TABLE",
    "PLOT_FAILED_TAG",
    "calibration_record",
    "display_window",
    "log_case_postprocessing",
    "log_case_table",
    "log_dataset_overview",
    "log_plot",
    "log_pooled",
    "log_result",
    "read_scores",
    "write_scores",
    "write_tsv",
]

log = logging.getLogger(__name__)

#: Tag prefix of a plot that could not be drawn: ``medseg.plot_failed.<file stem>`` holds
#: the error; the run goes on without the plot.
PLOT_FAILED_TAG = "medseg.plot_failed"


def log_plot(path: Path, draw: Callable[[Path], Any], artifact_dir: str = "plots") -> bool:
    """Draw a plot to ``path`` and log it to the active run under ``artifact_dir``.

    A plot is never worth a run: when ``draw`` raises (out of memory included), the error
    is logged as a warning and as the tag ``medseg.plot_failed.<name>`` and the run goes
    on without the plot.

    Returns
    -------
    bool
        Whether the plot was drawn and logged.
    """
    try:
        draw(path)
    except Exception as err:  # never BaseException: an interrupt still stops the run
        reason = f"{type(err).__name__}: {err}"
        log.warning("plot %s could not be drawn, the run goes on without it: %s",
                    path.name, reason)
        key = re.sub(r"[^\w.\- /]", "_", path.stem)  # the characters MLflow allows in keys
        mlflow.set_tag(f"{PLOT_FAILED_TAG}.{key}", reason[:4000])
        return False
    mlflow.log_artifact(str(path), artifact_dir)
    return True


def display_window(plan) -> tuple[float, float] | None:
    """Intensity window for overlays: the clip range widened, so the foreground's
    surroundings stay visible (for CT: fat dark, soft tissue grey, enhanced organs bright)."""
    if plan.clip is None:
        return None
    lo, hi = plan.clip
    width = hi - lo
    return (lo - width, hi + width / 2)


def write_tsv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def log_case_table(header: list[str], rows: list[list[Any]], artifact_file: str) -> None:
    """Log a per-case table with ``mlflow.log_table`` (MLflow's table JSON, NaN as null),
    so the run's artifact view shows it as a table and ``mlflow.load_table`` reads it."""
    columns = {name: [row[i] for row in rows] for i, name in enumerate(header)}
    mlflow.log_table(columns, artifact_file)


def write_scores(path: Path, rows, folds: dict[str, str] | None = None) -> None:
    """The long per-case table (:class:`~medseg.evaluation.Score` rows) as TSV; with
    ``folds`` (case id → fold) a leading fold column. NaN is written as ``nan``."""
    header = ["case_id", "structure", "metric", "value"]
    body = [[r.case_id, r.structure, r.metric, r.value] for r in rows]
    if folds is not None:
        header = ["fold", *header]
        body = [[folds[r[0]], *r] for r in body]
    write_tsv(Path(path), header, body)


def read_scores(path: str | Path) -> list[Score]:
    """Rows written by :func:`write_scores` (a fold column, if any, is dropped).

    Raises
    ------
    ValueError
        Naming the file and the line that is not a score row.
    """
    rows = []
    with open(path, newline="") as f:
        for number, row in enumerate(csv.DictReader(f, delimiter="\t"), start=2):
            try:
                rows.append(Score(row["case_id"], row["structure"], row["metric"],
                                  float(row["value"])))
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{path}, line {number}: not a score row ({err})") from err
    return rows


def log_result(result: ExperimentResult) -> None:
    """Log what an experiment produced to the active run: validation metrics and
    timings, config, plans, fingerprint, split, history, per-case scores and plots (the
    model: :func:`medseg.tracking.model.log_model`)."""
    setup = result.data
    history = result.history
    summary_metrics = {}
    for key, stats in result.summary.items():
        for stat in ("mean", "median"):
            if finite(stats.get(stat)):
                summary_metrics[f"val_case_{key}_{stat}"] = float(stats[stat])
    summary_metrics.update({f"time_{k}": v for k, v in result.timings.items()})
    calibration = calibration_record(result)
    if calibration is not None:
        summary_metrics.update(
            {f"val_ece_{k}": v for k, v in calibration["ece"].items() if finite(v)}
        )
        summary_metrics["val_ece_top_label"] = calibration["top_label_ece"]
        summary_metrics["val_temperature"] = calibration["temperature"]
    mlflow.log_metrics(summary_metrics)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / CONFIG).write_text(result.config.to_json(redacted=True))
        # everything prediction needs besides the model (medseg predict --model runs:/...)
        plan = prediction_plan(result.config, setup, result.postprocessing)
        (tmp / PLAN).write_text(json.dumps(plan.to_dict(), indent=2))
        if result.postprocessing is not None:
            save_postprocessing(result.postprocessing, tmp / POSTPROCESSING)
            mlflow.log_artifact(str(tmp / POSTPROCESSING), "evaluation")
        if setup.experiment_plan is not None:
            # the experiment plan as it ran: medseg reproduce trains from it, never re-plans
            setup.experiment_plan.save(tmp / EXPERIMENT_PLAN)
            (tmp / PLAN_OVERRIDES).write_text(json.dumps(setup.overrides, indent=2))
            mlflow.log_artifact(str(tmp / EXPERIMENT_PLAN))
            mlflow.log_artifact(str(tmp / PLAN_OVERRIDES))
        (tmp / FINGERPRINT).write_text(json.dumps(setup.fingerprint, indent=2))
        (tmp / SPLIT).write_text(
            json.dumps({"train": setup.train_ids, "validation": setup.val_ids}, indent=2)
        )
        epochs = max((len(v) for v in history.values()), default=0)
        keys = sorted(history)
        write_tsv(
            tmp / "history.tsv",
            ["epoch", *keys],
            [[e, *(history[k][e] for k in keys)] for e in range(epochs)],
        )
        score_keys = sorted({k for c in result.cases for k in c.scores})
        case_rows = [
            [c.case_id, *(float(c.scores.get(k, float("nan"))) for k in score_keys)]
            for c in result.cases
        ]
        write_tsv(tmp / "validation_cases.tsv", ["case_id", *score_keys], case_rows)
        if case_rows:
            log_case_table(["case_id", *score_keys], case_rows, VALIDATION_TABLE)
        write_scores(
            tmp / "scores.tsv",
            long_scores([(c.case_id, c.scores) for c in result.cases], setup.class_names,
                        setup.regions),
        )
        mlflow.log_artifact(str(tmp / "scores.tsv"), "evaluation")
        (tmp / "validation_summary.json").write_text(json.dumps(result.summary, indent=2))
        for name in (CONFIG, PLAN, FINGERPRINT, SPLIT):
            mlflow.log_artifact(str(tmp / name))
        mlflow.log_artifact(str(tmp / "history.tsv"), "training")
        mlflow.log_artifact(str(tmp / "validation_cases.tsv"), "evaluation")
        mlflow.log_artifact(str(tmp / "validation_summary.json"), "evaluation")
        if calibration is not None:
            # beside the model and plan.json: what predict applies to the probabilities
            write_temperature(tmp / TEMPERATURE_FILE, calibration["temperature"],
                              fitted_on="validation", voxels=calibration["temperature_voxels"])
            mlflow.log_artifact(str(tmp / TEMPERATURE_FILE))
            (tmp / "calibration.json").write_text(json.dumps(calibration, indent=2))
            mlflow.log_artifact(str(tmp / "calibration.json"), "evaluation")
        # plots last, each on its own: a failing one is recorded and skipped
        if result.cases:
            log_plot(tmp / "metrics_boxplot.png",
                     lambda p: plot_metric_boxplots([c.scores for c in result.cases], p))
        if epochs:
            log_plot(tmp / "learning_curve.png", lambda p: plot_learning_curves(history, p))
        if calibration is not None:
            accumulator = result.example["calibration"]
            log_plot(tmp / "reliability.png",
                     lambda p: plot_reliability_diagram(accumulator, p, setup.class_names))
        if result.example is not None:
            ex = result.example
            # cropped to the labels, frames capped and downscaled (visuals' defaults): a
            # whole CT case costs megabytes here
            view = {
                "axis": result.config.evaluation.overlay_axis,
                "spacing": ex["spacing"],
                "window": display_window(setup.plan),
            }
            case = (ex["image"], ex["truth"], ex["pred"])
            log_plot(tmp / f"overlay_{ex['case_id']}.gif",
                     lambda p: write_overlay_gif(p, *case, **view))
            log_plot(tmp / f"montage_{ex['case_id']}.png",
                     lambda p: write_slice_montage(p, *case, **view))
            if ex.get("entropy") is not None:  # inference.uncertainty: where it is unsure
                from medseg.evaluation.visuals import write_uncertainty_gif

                image = ex["image"] if ex["image"].ndim == 3 else ex["image"][..., 0]
                log_plot(tmp / f"uncertainty_{ex['case_id']}.gif",
                         lambda p: write_uncertainty_gif(
                             p, image, ex["pred"], ex["entropy"],
                             vmax=float(np.log(len(setup.class_names)))))


def calibration_record(result: ExperimentResult) -> dict[str, Any] | None:
    """The validation calibration (``evaluation.calibration``) as JSON-ready values:
    ECE per foreground structure, top-label ECE, the fitted temperature and the bin sums;
    None when the evaluation computed none."""
    ex = result.example
    if ex is None or ex.get("calibration") is None:
        return None
    accumulator = ex["calibration"]
    per_class, top = accumulator.ece()
    names = result.data.class_names
    return {
        "n_bins": accumulator.n_bins,
        "voxels": accumulator.total,
        "ece": {names[c]: float(per_class[c]) for c in range(1, len(names))},
        "top_label_ece": top,
        "temperature": float(ex["temperature"]),
        "temperature_voxels": int(ex["temperature_voxels"]),
        "bins": accumulator.to_dict(),
    }


def log_case_postprocessing(result: ExperimentResult) -> None:
    """Log each case's component tables, from which a resumed cross-validation decides."""
    scores = {c.case_id: {str(k): v.to_dict() for k, v in c.postprocessing.items()}
              for c in result.cases}
    mlflow.log_dict(scores, CASE_POSTPROCESSING)


def log_dataset_overview(setup: DataSetup, split: str, max_cases: int = 20) -> None:
    """Log ``plots/dataset_overview.png``: class frequencies from the fingerprint and the
    intensity histogram of each class from the voxels of up to ``max_cases`` cases."""
    fp = setup.fingerprint

    def draw(path: Path) -> None:  # the cases are read inside: a read error skips the plot
        stats = fp.get("foreground_intensity") or {}
        lo, hi = stats.get("percentile_00_5"), stats.get("percentile_99_5")
        histograms = None
        if lo is not None and hi is not None and hi > lo:
            width = hi - lo  # widened so the background's intensities show too
            cases = (
                (ex["image"], ex["label"])
                for ex in read_cases(setup.builder, split).take(max_cases).as_numpy_iterator()
            )
            histograms = intensity_histograms(
                cases, len(setup.class_names), (lo - width, hi + width / 2), bins=80
            )
        plot_dataset_overview(fp, path, histograms)

    with tempfile.TemporaryDirectory() as tmp:
        log_plot(Path(tmp) / "dataset_overview.png", draw)


def log_pooled(cv: CrossValidationResult, child_ids: list[str]) -> None:
    """Log a cross-validation's pooled metrics (``cv_<metric>_<class>_<stat>``), its cases
    table with a fold column, the folds, the splits file, the ensemble of the fold runs'
    models and the postprocessing decision to the active (parent) run."""
    metrics = {}
    for key, stats in cv.summary.items():
        for stat in ("mean", "median", "std"):
            if finite(stats.get(stat)):
                metrics[f"cv_{key}_{stat}"] = float(stats[stat])
    mlflow.log_metrics(metrics)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        keys = sorted({k for _, c in cv.cases for k in c.scores})
        case_rows = [
            [f, c.case_id, *(float(c.scores.get(k, np.nan)) for k in keys)] for f, c in cv.cases
        ]
        write_tsv(tmp / "cases.tsv", ["fold", "case_id", *keys], case_rows)
        if case_rows:
            log_case_table(["fold", "case_id", *keys], case_rows, CASES_TABLE)
        setup = cv.data
        folds = {c.case_id: f for f, c in cv.cases}
        rows = long_scores([(c.case_id, c.scores) for _, c in cv.cases], setup.class_names,
                           setup.regions)
        write_scores(tmp / "scores.tsv", rows, folds)
        (tmp / "summary.json").write_text(json.dumps(cv.summary, indent=2))
        (tmp / "folds.json").write_text(
            json.dumps(
                {
                    "protocol": cv.config.evaluation.protocol,
                    "splits_file": str(cv.splits_file) if cv.splits_file else None,
                    "folds": [f.to_dict() for f in cv.folds],
                },
                indent=2,
            )
        )
        if child_ids:
            uris = tuple(f"runs:/{run_id}/model" for run_id in child_ids)
            Ensemble(uris, cv.postprocessing).save(tmp / ENSEMBLE)
        for name in ("cases.tsv", "scores.tsv", "summary.json"):
            mlflow.log_artifact(str(tmp / name), "evaluation")
        mlflow.log_artifact(str(tmp / "folds.json"))
        if child_ids:
            mlflow.log_artifact(str(tmp / ENSEMBLE))
        if cv.splits_file is not None:
            mlflow.log_artifact(str(cv.splits_file))
        if cv.postprocessing is not None:
            save_postprocessing(cv.postprocessing, tmp / "postprocessing.json")
            mlflow.log_artifact(str(tmp / "postprocessing.json"))
        if cv.cases:
            log_plot(tmp / "metrics_boxplot.png",
                     lambda p: plot_metric_boxplots([c.scores for _, c in cv.cases], p))
