"""A variant study in MLflow: the study run, one nested cross-validation run per variant,
and under each the fold runs.

The study run holds the base config as params (``compare.key``, ``compare.values``,
``compare.baseline`` besides), the comparison under ``comparison/`` (``table.csv``,
``table.json``, ``table.md``, ``tests.json``, the Dice box plots and the mean-rank plot)
and, as metrics, each variant's Holm-adjusted p-value per structure and its mean rank.
Each variant run is a complete :func:`~medseg.tracking.evaluation.run_evaluation` parent
(pooled ``cv_*`` metrics, ``evaluation/cases.tsv``) with ``compare_parameters`` and
``compare_train_s``.

``run_comparison(config, spec, resume_run_id=study)`` continues an interrupted study: the
variants whose runs finished are read back from ``evaluation/cases.tsv``, the others are
run again (in a new variant run).
"""

from __future__ import annotations

import csv
import json
import re
import tempfile
from collections.abc import Sequence
from typing import Any

import mlflow
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from medseg.config import Config, redact
from medseg.tracking.observer import MlflowObserver, config_params
from medseg.tracking.store import configure
from medseg.training import is_chief
from medseg.workflows.compare import (
    Comparison,
    StudyObserver,
    Variant,
    VariantResult,
    run_study,
    write_comparison,
)
from medseg.workflows.observer import Observer

__all__ = ["VARIANT_TAG", "MlflowStudy", "finished_variants", "run_comparison"]

VARIANT_TAG = "medseg.variant"
KEY_TAG = "medseg.compare_key"


def _metric_name(text: str) -> str:
    return re.sub(r"[^\w.\- /]", "_", text)  # the characters MLflow allows in keys


class MlflowStudy(StudyObserver):
    """Record a variant study to MLflow.

    Parameters
    ----------
    run_id : str, optional
        An existing run to be the study run (a notebook's); with ``resume`` an interrupted
        study to continue.
    resume : bool, optional
        Continue the study ``run_id``: its compared key, values and params must equal these,
        and the variants whose runs finished are not run again.
    """

    def __init__(self, run_id: str | None = None, resume: bool = False) -> None:
        if resume and not run_id:
            raise ValueError("resume needs the run_id of the study run to continue")
        self.run_id, self.resume = run_id, resume
        self.client: MlflowClient | None = None
        self._experiment_id: str | None = None
        self._key: str | None = None
        self._finished: dict[str, Any] = {}

    def study_started(self, config: Config, key: str, variants: list[Variant],
                      baseline: str) -> None:
        self._experiment_id = configure(config)
        self.client = client = MlflowClient(mlflow.get_tracking_uri())
        self._key = key
        labels = [v.label for v in variants]
        params = {**config_params(config), "compare.key": key,
                  "compare.values": json.dumps(labels), "compare.baseline": baseline}
        if self.resume:
            run = client.get_run(self.run_id)
            logged = run.data.params
            if run.data.tags.get(KEY_TAG) is None:
                raise ValueError(
                    f"cannot resume MLflow run {self.run_id}: it is not a variant study "
                    "(no medseg.compare_key tag); give the run id medseg compare printed"
                )
            changed = sorted(k for k in params if logged.get(k) != params[k])
            if changed:
                raise ValueError(
                    f"cannot resume MLflow study run {self.run_id}: it differs in "
                    + ", ".join(f"{k} ({logged.get(k)!r} -> {params[k]!r})" for k in changed)
                )
            self._experiment_id = run.info.experiment_id
            client.update_run(self.run_id, RunStatus.to_string(RunStatus.RUNNING))
            self._finished = finished_variants(client, self.run_id)
            return
        if self.run_id is None:
            run = client.create_run(self._experiment_id, run_name=f"compare {key}")
            self.run_id = run.info.run_id
        else:
            self._experiment_id = client.get_run(self.run_id).info.experiment_id
        for name, value in params.items():
            client.log_param(self.run_id, name, value)
        client.set_tag(self.run_id, KEY_TAG, key)
        client.set_tag(self.run_id, "medseg.compare_baseline", baseline)

    def finished_variant(self, variant: Variant) -> VariantResult | None:
        run = self._finished.get(variant.label)
        return None if run is None else read_variant(self.client, run)

    def variant_started(self, variant: Variant, index: int) -> Observer:
        run = self.client.create_run(
            self._experiment_id,
            run_name=f"{self._key}={variant.label}",
            tags={"mlflow.parentRunId": self.run_id, VARIANT_TAG: variant.label,
                  KEY_TAG: self._key, "medseg.variant_index": str(index)},
        )
        # the variant run is an evaluation's parent: its folds nest under it
        return MlflowObserver(run_id=run.info.run_id, cross_validation=True)

    def variant_finished(self, variant: Variant, result: VariantResult,
                         observer: Observer) -> VariantResult:
        result.run_id = observer.run_id
        metrics = {"compare_parameters": result.parameters, "compare_train_s": result.train_s}
        for name, value in metrics.items():
            if value is not None:
                self.client.log_metric(result.run_id, name, float(value))
        return result

    def study_finished(self, comparison: Comparison) -> None:
        client = self.client
        with tempfile.TemporaryDirectory() as tmp:
            write_comparison(comparison, tmp)
            client.log_artifacts(self.run_id, tmp, "comparison")
        for test in comparison.tests:
            if test["p_holm"] == test["p_holm"]:  # NaN: no test was made
                name = f"compare_p_holm_dice_{test['structure']}_{test['variant']}"
                client.log_metric(self.run_id, _metric_name(name), test["p_holm"])
        for label, rank in comparison.ranks.items():
            if rank == rank:
                client.log_metric(self.run_id, _metric_name(f"compare_mean_rank_{label}"), rank)
        variant_ids = [r.run_id for r in comparison.variants.values() if r.run_id]
        client.set_tag(self.run_id, "medseg.variant_runs", json.dumps(variant_ids))
        client.set_terminated(self.run_id, RunStatus.to_string(RunStatus.FINISHED))

    def study_failed(self, error: BaseException) -> None:
        if self.client is None or self.run_id is None:
            return  # failed before the run was opened (a bad config)
        interrupted = isinstance(error, KeyboardInterrupt)
        if not interrupted:
            message = redact(f"{type(error).__name__}: {error}")
            self.client.set_tag(self.run_id, "medseg.error", message[:4000])
        status = RunStatus.KILLED if interrupted else RunStatus.FAILED
        self.client.set_terminated(self.run_id, RunStatus.to_string(status))


def finished_variants(client: MlflowClient, study_id: str) -> dict[str, Any]:
    """The study's variant runs that finished with their pooled metrics, by label (a
    variant re-run later wins)."""
    study = client.get_run(study_id)
    children = client.search_runs(
        [study.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{study_id}'"
    )
    children.sort(key=lambda r: r.info.start_time)
    return {
        r.data.tags[VARIANT_TAG]: r
        for r in children
        if VARIANT_TAG in r.data.tags and r.info.status == "FINISHED"
        and any(k.startswith("cv_dice_") for k in r.data.metrics)
    }


def read_variant(client: MlflowClient, run) -> VariantResult:
    """A finished variant run's per-case scores (its pooled ``evaluation/cases.tsv``),
    parameter count and training time."""
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run.info.run_id, "evaluation/cases.tsv", tmp)
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    cases = {}
    for row in rows:
        row.pop("fold", None)
        case_id = row.pop("case_id")
        cases[case_id] = {k: float(v) for k, v in row.items()}  # "nan" reads back as NaN
    metrics = run.data.metrics
    parameters = metrics.get("compare_parameters")
    return VariantResult(
        label=run.data.tags[VARIANT_TAG],
        cases=cases,
        parameters=int(parameters) if parameters is not None else None,
        train_s=metrics.get("compare_train_s"),
        run_id=run.info.run_id,
    )


def run_comparison(
    config: Config,
    spec: str | tuple[str, Sequence[Any]],
    baseline: str | None = None,
    resume_run_id: str | None = None,
    run_id: str | None = None,
) -> tuple[Comparison, str | None]:
    """Cross-validate each variant of ``spec`` in a nested MLflow run and compare them.

    Parameters
    ----------
    config : Config
    spec : str or (str, sequence)
        ``"model.name=unet,residual_unet"``, as :func:`medseg.workflows.compare.parse_variants`.
    baseline : str, optional
        The variant the others are tested against; default the first value.
    resume_run_id : str, optional
        An interrupted study run: its finished variants are read back, not run again.
    run_id : str, optional
        An existing run to be the study run (a notebook's); default a new one.

    Returns
    -------
    comparison : Comparison
    run_id : str or None
        The study run (None on workers other than the chief).
    """
    if resume_run_id and run_id and resume_run_id != run_id:
        raise ValueError(f"resume_run_id {resume_run_id} and run_id {run_id} name two runs")
    if not is_chief():
        return run_study(config, spec, baseline)[0], None
    study = MlflowStudy(resume_run_id or run_id, resume=resume_run_id is not None)
    comparison, _ = run_study(config, spec, baseline, study)
    return comparison, study.run_id
