"""Evaluation protocols in MLflow: a parent run, one nested child run per fold.

Each child run is a complete training run (params, epoch metrics, per-case metrics TSV,
plots, the fold's model); the parent holds the pooled evaluation over all folds' test cases
(``cv_<metric>_<class>_{mean,median,std}``, the cases TSV with a fold column, boxplots), the
splits file, the postprocessing decision, the dataset-exploration view and ``ensemble.json``
listing the fold models, which :func:`load_fold_models` turns back into an ensemble for
``predict_case(models, ...)``.

An interrupted evaluation resumes: ``run_evaluation(config, resume_run_id=parent)`` reuses
the folds whose child runs finished (their per-case scores and model are read back from
MLflow) and runs the others.
"""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from medseg.config import Config
from medseg.evaluation.cross_validation import (
    CrossValidationResult,
    combine_folds,
    make_folds,
    run_fold,
)
from medseg.evaluation.metrics import summarize
from medseg.evaluation.protocols import PROTOCOLS, Fold
from medseg.evaluation.visuals import (
    intensity_histograms,
    plot_dataset_overview,
    plot_metric_boxplots,
)
from medseg.experiment import CaseResult, DataSetup, ExperimentResult, prepare_data
from medseg.inference.postprocess import save_postprocessing
from medseg.pipeline import read_cases
from medseg.tracking.run import (
    MlflowMetrics,
    _finite,
    _write_tsv,
    git_state,
    log_dataset,
    log_result,
    package_versions,
)
from medseg.tracking.store import configure
from medseg.training import describe_devices, make_strategy

__all__ = ["fold_model_uris", "load_fold_models", "log_dataset_overview", "run_evaluation"]

FOLD_TAG = "medseg.fold"


def _params(config: Config) -> dict[str, Any]:
    return {
        k: json.dumps(v) if isinstance(v, list | dict) else v
        for k, v in config.to_flat_dict().items()
    }


def log_dataset_overview(setup: DataSetup, split: str, max_cases: int = 20) -> None:
    """Log ``plots/dataset_overview.png``: class frequencies from the fingerprint and the
    intensity histogram of each class from the voxels of up to ``max_cases`` cases."""
    fp = setup.fingerprint
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
    with tempfile.TemporaryDirectory() as tmp:
        path = plot_dataset_overview(fp, Path(tmp) / "dataset_overview.png", histograms)
        mlflow.log_artifact(str(path), "plots")


def _log_pooled(cv: CrossValidationResult, child_ids: list[str]) -> None:
    metrics = {}
    for key, stats in cv.summary.items():
        for stat in ("mean", "median", "std"):
            if _finite(stats.get(stat)):
                metrics[f"cv_{key}_{stat}"] = float(stats[stat])
    mlflow.log_metrics(metrics)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        keys = sorted({k for _, c in cv.cases for k in c.scores})
        _write_tsv(
            tmp / "cases.tsv",
            ["fold", "case_id", *keys],
            [[f, c.case_id, *(c.scores.get(k, np.nan) for k in keys)] for f, c in cv.cases],
        )
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
        uris = [f"runs:/{run_id}/model" for run_id in child_ids]
        (tmp / "ensemble.json").write_text(
            json.dumps({"models": uris, "postprocessing": cv.postprocessing}, indent=2)
        )
        for name in ("cases.tsv", "summary.json"):
            mlflow.log_artifact(str(tmp / name), "evaluation")
        mlflow.log_artifact(str(tmp / "folds.json"))
        mlflow.log_artifact(str(tmp / "ensemble.json"))
        if cv.splits_file is not None:
            mlflow.log_artifact(str(cv.splits_file))
        if cv.postprocessing is not None:
            save_postprocessing(cv.postprocessing, tmp / "postprocessing.json")
            mlflow.log_artifact(str(tmp / "postprocessing.json"))
        if cv.cases:
            plot_metric_boxplots([c.scores for _, c in cv.cases], tmp / "metrics_boxplot.png")
            mlflow.log_artifact(str(tmp / "metrics_boxplot.png"), "plots")


def _log_case_postprocessing(result: ExperimentResult) -> None:
    scores = {c.case_id: {str(k): list(v) for k, v in c.postprocessing.items()}
              for c in result.cases}
    mlflow.log_dict(scores, "evaluation/case_postprocessing.json")


def _finished_folds(client: MlflowClient, parent_id: str) -> dict[str, Any]:
    parent = client.get_run(parent_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    children.sort(key=lambda r: r.info.start_time)  # a fold re-run later wins
    return {
        r.data.tags[FOLD_TAG]: r
        for r in children
        if r.info.status == "FINISHED" and FOLD_TAG in r.data.tags
    }


def _read_fold(
    client: MlflowClient, run, config: Config, setup: DataSetup, fold: Fold
) -> ExperimentResult:
    """A finished fold's result rebuilt from its run: per-case scores, postprocessing scores
    and model (no history, no overlay volumes)."""
    from medseg.tracking.model import load_model

    run_id = run.info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        table = client.download_artifacts(run_id, "evaluation/validation_cases.tsv", tmp)
        with open(table, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        pp_path = client.download_artifacts(run_id, "evaluation/case_postprocessing.json", tmp)
        pp = json.loads(Path(pp_path).read_text())
    cases = []
    for row in rows:
        case_id = row.pop("case_id")
        scores = {k: float(v) for k, v in row.items()}  # float() reads "nan" back as NaN
        postprocessing = {int(k): tuple(v) for k, v in pp.get(case_id, {}).items()}
        cases.append(CaseResult(case_id, scores, postprocessing))
    if sorted(c.case_id for c in cases) != sorted(fold.test_ids):
        raise ValueError(
            f"fold run {run_id} ({fold.name}) scored other cases than the fold's test cases; "
            "resume with the same evaluation config and splits file"
        )
    # without logged models (tracking.log_model=false) the fold is scored but not reloadable
    model = (
        load_model(f"runs:/{run_id}/model", config.tracking.tracking_uri)
        if config.tracking.log_model
        else None
    )
    return ExperimentResult(
        config=config,
        data=setup,
        model=model,
        history={},
        cases=cases,
        summary=summarize([c.scores for c in cases]),
    )


def run_evaluation(
    config: Config, resume_run_id: str | None = None
) -> tuple[CrossValidationResult, str]:
    """Run ``config.evaluation.protocol`` with a nested MLflow run per fold.

    Parameters
    ----------
    config : Config
    resume_run_id : str, optional
        An interrupted evaluation's parent run: folds with a finished child run are read
        back instead of trained again. Its params must equal ``config``'s.

    Returns
    -------
    result : CrossValidationResult
    run_id : str
        The parent run's id. Fold models are logged to their child runs when
        ``tracking.log_model`` is set (the default; resuming needs them).
    """
    protocol = config.evaluation.protocol
    if protocol not in PROTOCOLS:  # before any run is created
        raise ValueError(f"evaluation.protocol={protocol!r} is not one of {', '.join(PROTOCOLS)}")
    make_strategy(config.train.strategy)  # before any TF op (multi-worker needs it)
    experiment_id = configure(config.tracking)
    tags = {
        "medseg.devices": ", ".join(describe_devices()),
        "medseg.seed": str(config.seed),
        "medseg.protocol": protocol,
        **git_state(),
        **{f"version.{k}": v for k, v in package_versions().items()},
    }
    name = config.tracking.run_name or f"{protocol} {config.data.dataset}/{config.data.config}"
    client = MlflowClient(mlflow.get_tracking_uri())
    finished: dict[str, Any] = {}
    params = {k: str(v) for k, v in _params(config).items()}
    if resume_run_id:
        logged = client.get_run(resume_run_id).data.params
        changed = sorted(k for k in params if logged.get(k) != params[k])
        if changed:
            raise ValueError(
                f"cannot resume MLflow run {resume_run_id}: config differs in "
                + ", ".join(f"{k} ({logged.get(k)!r} -> {params[k]!r})" for k in changed)
            )
        finished = _finished_folds(client, resume_run_id)
        start = {"run_id": resume_run_id}
    else:
        start = {"experiment_id": experiment_id, "run_name": name}
    with mlflow.start_run(**start) as parent:
        if not resume_run_id:
            mlflow.log_params(params)
        mlflow.set_tags(tags)
        setup = prepare_data(config)
        config = setup.config or config  # resolved against the plan
        folds, splits_file = make_folds(config, setup)
        dataset_tags = {
            "dataset.name": setup.dataset_name,
            "dataset.version": str(setup.builder.info.version),
            "dataset.fingerprint_hash": setup.fingerprint_hash,
        }
        mlflow.set_tags({**dataset_tags, "medseg.folds": str(len(folds))})
        if not resume_run_id:
            log_dataset(setup)
            log_dataset_overview(setup, config.data.split)
        results, child_ids = [], []
        for index, fold in enumerate(folds):
            if fold.name in finished:
                run = finished[fold.name]
                results.append(_read_fold(client, run, config, setup, fold))
                child_ids.append(run.info.run_id)
                continue
            with mlflow.start_run(
                experiment_id=experiment_id, run_name=fold.name, nested=True
            ) as child:
                mlflow.log_params(_params(config))
                mlflow.set_tags({**tags, **dataset_tags, FOLD_TAG: fold.name,
                                 "medseg.fold_index": str(index)})
                result = run_fold(config, setup, fold, callbacks=[MlflowMetrics()])
                log_result(result, log_model=config.tracking.log_model)
                _log_case_postprocessing(result)
                mlflow.log_dict(fold.to_dict(), "fold.json")
                result.example = None  # the volumes are logged; free them for the next fold
                results.append(result)
                child_ids.append(child.info.run_id)
        cv = combine_folds(config, setup, folds, results, splits_file)
        _log_pooled(cv, child_ids)
        return cv, parent.info.run_id


def fold_model_uris(parent_run_id: str, tracking_uri: str | None = None) -> list[str]:
    """``runs:/<child>/model`` of each finished fold of an evaluation run, in fold order."""
    children = list(_finished_folds(MlflowClient(tracking_uri), parent_run_id).values())
    if not children:
        raise ValueError(
            f"MLflow run {parent_run_id} has no finished fold runs (is it an evaluation run?)"
        )
    children.sort(key=lambda r: int(r.data.tags.get("medseg.fold_index", 0)))
    return [f"runs:/{r.info.run_id}/model" for r in children]


def load_fold_models(parent_run_id: str, tracking_uri: str | None = None) -> list:
    """The fold models of an evaluation run, for ``predict_case(models, ...)``."""
    from medseg.tracking.model import load_model

    return [load_model(uri, tracking_uri) for uri in fold_model_uris(parent_run_id, tracking_uri)]
