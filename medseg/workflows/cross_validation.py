"""Evaluation by protocol: one model per fold, scored on its held-out cases, then pooled.

The core of ``medseg evaluate``, free of tracking: the fold loop exists here only. An
:class:`~medseg.workflows.observer.Observer` records it (:class:`medseg.tracking.MlflowObserver`:
a parent run, one nested run per fold, finished folds read back on resume). The phases are
those of :mod:`medseg.workflows.experiment` (``prepare_data`` once, then ``train_model``
and ``score_model`` per fold); the pooled per-case scores give the summary and the
postprocessing decision.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras

from medseg.config import Config
from medseg.evaluation.metrics import summarize
from medseg.evaluation.protocols import (
    Fold,
    explicit_split,
    holdout_split,
    load_or_create_splits,
    percentage_split,
)
from medseg.inference.postprocess import decide_postprocessing
from medseg.pipeline import read_case_ids
from medseg.progress import is_quiet
from medseg.training import make_strategy
from medseg.workflows.experiment import (
    CaseResult,
    DataSetup,
    ExperimentResult,
    prepare_data,
    score_model,
    train_model,
)
from medseg.workflows.observer import Observer

__all__ = [
    "CrossValidationResult",
    "combine_folds",
    "make_folds",
    "run_cross_validation",
    "fold_setup",
    "run_fold",
    "splits_path",
]


@dataclass
class CrossValidationResult:
    """Every fold's result and their pooled evaluation."""

    config: Config
    data: DataSetup
    folds: list[Fold]
    results: list[ExperimentResult]
    # (fold name, case) for every tested case, in fold order
    cases: list[tuple[str, CaseResult]]
    summary: dict[str, dict[str, float]]
    postprocessing: dict[str, Any] | None = None
    splits_file: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def models(self) -> list[keras.Model]:
        """The fold models, for an ensemble prediction (``predict_case(models, ...)``)."""
        return [r.model for r in self.results]


def splits_path(config: Config, setup: DataSetup) -> Path:
    """Where the k-fold / LOO splits live: ``evaluation.splits_file``, or by default beside
    the dataset's records, one file per split, protocol, fold count and seed."""
    evaluation = config.evaluation
    if evaluation.splits_file:
        return Path(evaluation.splits_file)
    k = "n" if evaluation.protocol == "loo" else str(evaluation.folds)
    name = f"{config.data.split}_{evaluation.protocol}{k}_seed{config.seed}.json"
    return Path(str(setup.builder.data_dir)) / "splits" / name


def make_folds(config: Config, setup: DataSetup) -> tuple[list[Fold], Path | None]:
    """The folds of ``config.evaluation.protocol`` and, for k-fold/LOO, their splits file."""
    evaluation = config.evaluation
    protocol = evaluation.protocol  # one of config.Protocol (checked when the config is made)
    ids = setup.train_ids + setup.val_ids
    if protocol == "split":
        return percentage_split(ids, config.data.validation_fraction, config.seed), None
    if protocol in ("kfold", "loo"):
        path = splits_path(config, setup)
        return load_or_create_splits(path, ids, protocol, evaluation.folds, config.seed), path
    if protocol == "holdout":
        test_split = evaluation.test_split
        if test_split == config.data.split:
            raise ValueError(
                f"evaluation.test_split={test_split!r} is the training split (data.split)"
            )
        available = list(setup.builder.info.splits.keys())
        if test_split not in available:
            raise ValueError(
                f"evaluation.test_split={test_split!r}: dataset {setup.dataset_name} has splits "
                f"{available}"
            )
        test_ids = read_case_ids(setup.builder, test_split)
        return holdout_split(ids, test_ids, test_split), None
    return explicit_split(
        ids, evaluation.train_cases, evaluation.test_cases, config.data.split
    ), None


def run_fold(
    config: Config,
    setup: DataSetup,
    fold: Fold,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> ExperimentResult:
    """Train a model on the fold's training cases and score it on its test cases.

    The test cases double as the per-epoch validation cases when they come from the
    training split (as in nnU-Net's folds); a hold-out split is never looked at in training.
    """
    setup = fold_setup(setup, fold)
    t0 = time.perf_counter()
    model, history = train_model(config, setup, callbacks)
    timings = {"train_s": time.perf_counter() - t0}
    return score_model(model, history, config, setup, fold.test_ids, fold.test_split, timings)


def fold_setup(setup: DataSetup, fold: Fold) -> DataSetup:
    """The setup of one fold: its training cases, and its test cases as validation cases
    unless they are a hold-out split."""
    val_ids = list(fold.test_ids) if fold.test_split is None else []
    return dataclasses.replace(setup, train_ids=list(fold.train_ids), val_ids=val_ids)


def combine_folds(
    config: Config,
    setup: DataSetup,
    folds: Sequence[Fold],
    results: Sequence[ExperimentResult],
    splits_file: Path | None = None,
) -> CrossValidationResult:
    """Pool the folds' test cases: summary over all of them and the postprocessing decision."""
    cases = [(f.name, c) for f, r in zip(folds, results, strict=True) for c in r.cases]
    decision = None
    if config.evaluation.postprocess and cases:
        decision = decide_postprocessing(
            [c.postprocessing for _, c in cases if c.postprocessing], setup.class_names
        )
    return CrossValidationResult(
        config=config,
        data=setup,
        folds=list(folds),
        results=list(results),
        cases=cases,
        summary=summarize([c.scores for _, c in cases]) if cases else {},
        postprocessing=decision,
        splits_file=splits_file,
    )


def run_cross_validation(
    config: Config,
    observer: Observer | None = None,
    callbacks: Callable[[Fold], Sequence[keras.callbacks.Callback]] | None = None,
) -> CrossValidationResult:
    """Run every fold of the configured protocol and pool their evaluation.

    Parameters
    ----------
    config : Config
        ``config.evaluation`` chooses the protocol.
    observer : Observer, optional
        Told of the run and, through the observer ``fold_started`` returns, of each fold;
        a fold it has a finished result for is not trained again.
    callbacks : callable, optional
        ``callbacks(fold)`` gives further Keras callbacks of that fold's training.
    """
    observer = observer or Observer()
    make_strategy(config.train.strategy)  # before any TF op (multi-worker needs it)
    observer.run_started(config)
    try:
        t0 = time.perf_counter()
        setup = prepare_data(config)
        config = setup.config or config  # resolved against the plan
        folds, path = make_folds(config, setup)
        observer.planned(config, setup)
        results = []
        for index, fold in enumerate(folds):
            child = observer.fold_started(fold, index)
            result = child.finished_result(config, setup, fold)
            if not is_quiet():  # one line per fold, above its training's progress
                done = " (finished before: resumed)" if result is not None else ""
                print(f"fold {index + 1}/{len(folds)} {fold.name}{done}", flush=True)
            if result is None:
                result = _observed_fold(config, setup, fold, child, callbacks)
            results.append(result)
        cv = combine_folds(config, setup, folds, results, path)
        cv.timings["total_s"] = time.perf_counter() - t0
    except BaseException as err:
        observer.run_failed(err)
        raise
    observer.run_finished(cv)
    return cv


def _observed_fold(config, setup, fold, observer, callbacks) -> ExperimentResult:
    observer.run_started(config)
    try:
        observer.planned(config, fold_setup(setup, fold))
        extra = callbacks(fold) if callbacks else ()
        result = run_fold(config, setup, fold, [*observer.callbacks(), *extra])
    except BaseException as err:
        observer.run_failed(err)
        raise
    observer.run_finished(result)
    result.example = None  # recorded by now; the next fold need not hold its volumes
    return result
