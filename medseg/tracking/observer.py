"""MLflow as an observer of medseg's workflows: one run per experiment, nested runs per fold.

:class:`MlflowObserver` records what :func:`~medseg.workflows.run_experiment` and
:func:`~medseg.workflows.run_cross_validation` report: the run opens before planning, the
resolved config is logged as params once the plan is known, epoch metrics come through a
Keras callback, results and the model at the end. A cross-validation's parent hands each
fold a child observer (a nested run), and on resume gives back the folds whose runs
finished. Only the chief worker of a multi-worker run records; the others observe nothing.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from medseg.config import Config, redact
from medseg.evaluation.metrics import summarize, wide_scores
from medseg.evaluation.protocols import Fold
from medseg.inference.postprocess import Components
from medseg.tracking import artifacts
from medseg.tracking.callbacks import MlflowMetrics
from medseg.tracking.lineage import (
    dataset_tags,
    lineage_tags,
    log_dataset,
    log_plan,
    source_tags,
)
from medseg.tracking.store import configure
from medseg.training import is_chief, make_strategy
from medseg.workflows.cross_validation import CrossValidationResult
from medseg.workflows.experiment import CaseResult, DataSetup, ExperimentResult
from medseg.workflows.observer import Observer

__all__ = ["FOLD_TAG", "MlflowObserver", "config_params", "finished_folds"]

FOLD_TAG = "medseg.fold"
# seconds between system-metric samples: MLflow's 10 s default leaves a short run with one
# point or none (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL, when set, wins)
SYSTEM_METRICS_INTERVAL = 2
MODEL_SUMMARY = "training/model_summary.txt"


def config_params(config: Config) -> dict[str, str]:
    """The config as MLflow params: every ``section.key``, lists and dicts as JSON, URL
    passwords redacted (``***``)."""
    return {
        k: json.dumps(v) if isinstance(v, list | dict) else str(v)
        for k, v in config.to_flat_dict(redacted=True).items()
    }


class MlflowObserver(Observer):
    """Record a workflow to MLflow.

    Parameters
    ----------
    run_id : str, optional
        Record into this existing run (a tuning trial's, a reproduction's) instead of a new
        one; with ``resume`` it is an interrupted cross-validation to continue.
    run_name : str, optional
        Name of a new run; default ``tracking.run_name`` (a cross-validation: the protocol
        and the dataset).
    extra_tags : dict, optional
        Set on the run besides the lineage tags.
    cross_validation : bool, optional
        The run is a cross-validation's parent: it also gets the protocol tag, the dataset
        overview, and a default name from the protocol and the dataset.
    resume : bool, optional
        Continue the cross-validation ``run_id``: its params must equal the config's, and
        the folds whose child runs finished are read back instead of trained again.
    """

    def __init__(
        self,
        run_id: str | None = None,
        run_name: str | None = None,
        extra_tags: dict[str, str] | None = None,
        cross_validation: bool = False,
        resume: bool = False,
        *,
        _parent: MlflowObserver | None = None,
        _fold: Fold | None = None,
        _index: int | None = None,
    ) -> None:
        if resume and not run_id:
            raise ValueError("resume needs the run_id of the run to continue")
        self.run_id = run_id
        self.run_name = run_name
        self.extra_tags = dict(extra_tags or {})
        self.cross_validation = cross_validation
        self.resume = resume
        self._parent, self._fold, self._index = _parent, _fold, _index
        self._active = False
        self.recorded = False  # whether this process opened the run (the chief)
        self._experiment_id: str | None = None
        self._finished: dict[str, Any] = {}  # a resumed parent: fold name -> finished run
        self.child_run_ids: list[str] = []  # a parent: one per fold, in fold order

    # -- the run -------------------------------------------------------------------------
    def run_started(self, config: Config) -> None:
        if not is_chief():
            return  # workers other than the chief train but never log
        self._experiment_id = configure(config)
        if self._parent is not None:
            # the parent's experiment: a parent run given by id may live in another one
            self._experiment_id = self._parent._experiment_id
            start = {
                "experiment_id": self._experiment_id,
                "run_name": self._fold.name,
                "nested": True,
            }
        elif self.run_id:
            start = {"run_id": self.run_id}
        else:
            start = {"experiment_id": self._experiment_id, "run_name": self._name(config)}
        if config.tracking.system_metrics:
            if "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL" not in os.environ:
                mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL)
            start["log_system_metrics"] = True
        run = mlflow.start_run(**start)
        self.run_id, self._experiment_id = run.info.run_id, run.info.experiment_id
        self._active = self.recorded = True
        if run.data.tags.get("mlflow.source.type") != "NOTEBOOK":
            # a notebook's runner named the notebook already; MLflow's own guess (the
            # python script, no commit under a console script) is replaced
            mlflow.set_tags(source_tags())
        if self.resume:
            self._finished = finished_folds(MlflowClient(mlflow.get_tracking_uri()), self.run_id)

    def _name(self, config: Config) -> str | None:
        if self.run_name or config.tracking.run_name:
            return self.run_name or config.tracking.run_name
        if self.cross_validation:
            return f"{config.evaluation.protocol} {config.data.dataset}/{config.data.config}"
        return None

    def planned(self, config: Config, setup: DataSetup) -> None:
        if not self._active:
            return
        # the values the run uses; MLflow params are immutable, so logged only now
        params = config_params(config)
        if self.resume:
            logged = MlflowClient(mlflow.get_tracking_uri()).get_run(self.run_id).data.params
            changed = sorted(k for k in params if logged.get(k) != params[k])
            if changed:
                raise ValueError(
                    f"cannot resume MLflow run {self.run_id}: config differs in "
                    + ", ".join(f"{k} ({logged.get(k)!r} -> {params[k]!r})" for k in changed)
                )
        else:
            mlflow.log_params(params)
            log_plan(setup)
            log_dataset(setup)
        tags = {**lineage_tags(config, make_strategy(config.train.strategy)), **dataset_tags(setup)}
        if self._fold is not None:
            tags.update({FOLD_TAG: self._fold.name, "medseg.fold_index": str(self._index)})
        if self.cross_validation:
            tags["medseg.protocol"] = config.evaluation.protocol
        mlflow.set_tags({**tags, **self.extra_tags})
        if self.cross_validation and not self.resume:
            artifacts.log_dataset_overview(setup, config.data.split)

    def callbacks(self):
        return [MlflowMetrics()] if self._active else []

    def run_finished(self, result: Any) -> None:
        if not self._active:
            return
        try:
            if isinstance(result, CrossValidationResult):
                mlflow.set_tag("medseg.folds", str(len(result.folds)))
                artifacts.log_pooled(result, self.child_run_ids)
                name = result.config.tracking.register_model
                if name and result.config.tracking.log_model:
                    # the folds as one registered model (their versions are not registered)
                    from medseg.tracking.model import log_ensemble
                    from medseg.tracking.registry import assign_alias, validation_score

                    info = log_ensemble(mlflow.active_run().info.run_id, name)
                    assign_alias(MlflowClient(mlflow.get_tracking_uri()), name,
                                 info.registered_model_version, validation_score(result.summary))
            else:
                if result.transforms:  # the user's own, as module:name (API ones included)
                    mlflow.log_param("augment.transforms", json.dumps(result.transforms))
                # the model first: what follows (plots of a whole case) must never lose it
                if result.config.tracking.log_model:
                    from medseg.tracking.model import log_model
                    from medseg.workflows.experiment import prediction_plan

                    # the plan travels inside the model: a registered or copied model
                    # keeps its preprocessing and postprocessing
                    plan = prediction_plan(result.config, result.data, result.postprocessing)
                    # a fold's model is registered only as part of its ensemble
                    register = None if self._fold is not None else result.config.tracking.register_model
                    info = log_model(result.model, register, plan=plan)
                    if info.registered_model_version is not None:
                        from medseg.tracking.registry import assign_alias, validation_score

                        assign_alias(
                            MlflowClient(mlflow.get_tracking_uri()),
                            result.config.tracking.register_model,
                            info.registered_model_version,
                            validation_score(result.summary),
                        )
                if result.model is not None:
                    log_model_size(result.model)
                artifacts.log_result(result)
                if self._fold is not None:
                    artifacts.log_case_postprocessing(result)
                    mlflow.log_dict(self._fold.to_dict(), artifacts.FOLD)
        except BaseException:
            self._end(RunStatus.FAILED)
            raise
        if self._parent is not None:
            self._parent.child_run_ids.append(self.run_id)
        self._end(RunStatus.FINISHED)

    def run_failed(self, error: BaseException) -> None:
        if self._active:
            interrupted = isinstance(error, KeyboardInterrupt)
            if not interrupted:  # why, on the run's page (MLflow keeps no traceback)
                message = redact(f"{type(error).__name__}: {error}")
                mlflow.set_tag("medseg.error", message[:4000])
            self._end(RunStatus.KILLED if interrupted else RunStatus.FAILED)

    def _end(self, status) -> None:
        mlflow.end_run(RunStatus.to_string(status))
        self._active = False

    # -- folds ---------------------------------------------------------------------------
    def fold_started(self, fold: Fold, index: int) -> Observer:
        if not self._active:
            return Observer()
        return MlflowObserver(_parent=self, _fold=fold, _index=index)

    def finished_result(
        self, config: Config, setup: DataSetup, fold: Fold
    ) -> ExperimentResult | None:
        parent = self._parent
        if parent is None or fold.name not in parent._finished:
            return None
        run = parent._finished[fold.name]
        parent.child_run_ids.append(run.info.run_id)
        return read_fold(run, config, setup, fold)


def log_model_size(model) -> None:
    """The model's parameter count (metric ``model_parameters``, trainable and not) and its
    Keras summary as the text artifact ``training/model_summary.txt``."""
    mlflow.log_metric("model_parameters", model.count_params())
    lines = io.StringIO()
    model.summary(print_fn=lambda line, *args, **kwargs: lines.write(line + "\n"))
    mlflow.log_text(lines.getvalue(), MODEL_SUMMARY)


def finished_folds(client: MlflowClient, parent_id: str) -> dict[str, Any]:
    """The finished child runs of an evaluation run, by fold name (a fold re-run later
    wins)."""
    parent = client.get_run(parent_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    children.sort(key=lambda r: r.info.start_time)
    return {
        r.data.tags[FOLD_TAG]: r
        for r in children
        if r.info.status == "FINISHED" and FOLD_TAG in r.data.tags
    }


def read_fold(run, config: Config, setup: DataSetup, fold: Fold) -> ExperimentResult:
    """A finished fold's result rebuilt from its run: per-case scores, component tables
    and model (no history, no overlay volumes)."""
    from medseg.tracking.model import load_model

    client = MlflowClient(mlflow.get_tracking_uri())
    run_id = run.info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        try:  # the long table; runs logged before it have only the wide one
            table = client.download_artifacts(run_id, artifacts.SCORES, tmp)
            per_case = wide_scores(artifacts.read_scores(table))
        except (OSError, MlflowException):
            table = client.download_artifacts(run_id, artifacts.VALIDATION_CASES, tmp)
            with open(table, newline="") as f:
                rows = list(csv.DictReader(f, delimiter="\t"))
            # float() reads "nan" back as NaN
            per_case = {r.pop("case_id"): {k: float(v) for k, v in r.items()} for r in rows}
        pp_path = client.download_artifacts(run_id, artifacts.CASE_POSTPROCESSING, tmp)
        pp = json.loads(Path(pp_path).read_text())
    cases = []
    for case_id, scores in per_case.items():
        # runs logged before the component tables held (before, after) pairs: no decision
        postprocessing = {
            int(k): Components.from_dict(v)
            for k, v in pp.get(case_id, {}).items()
            if isinstance(v, dict)
        }
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
