"""One experiment, phase by phase: fingerprint → plan → preprocess → train → predict → evaluate.

This is the core workflow, free of tracking: :mod:`medseg.tracking` wraps it and logs
what it returns. Each phase is a plain function call on the one :class:`~medseg.config.Config`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
import tensorflow_datasets as tfds

from medseg import datasets
from medseg.config import Config
from medseg.evaluation import dice_per_class, dice_region, summarize
from medseg.inference import predict_case
from medseg.models import check_input_shape
from medseg.pipeline import (
    PreprocessPlan,
    check_patch_fits,
    plan_preprocessing,
    preprocessed_cases,
    read_case_ids,
    read_cases,
    split_cases,
    training_dataset,
    validation_dataset,
)
from medseg.training import build_compiled_model, fit, make_strategy


@dataclass
class DataSetup:
    """A built dataset and everything decided from it before training."""

    builder: tfds.core.DatasetBuilder
    fingerprint: dict[str, Any]
    fingerprint_hash: str
    class_names: list[str]
    regions: dict[str, list[int]]
    plan: PreprocessPlan
    train_ids: list[str]
    val_ids: list[str]

    @property
    def dataset_name(self) -> str:
        return self.builder.info.full_name  # e.g. "kits_phantom/small/1.0.0"


@dataclass
class CaseResult:
    case_id: str
    scores: dict[str, float]


@dataclass
class ExperimentResult:
    config: Config
    data: DataSetup
    model: keras.Model
    history: dict[str, list[float]]
    cases: list[CaseResult]
    summary: dict[str, dict[str, float]]
    # one validation case kept whole for overlays: image, truth, prediction, spacing
    example: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)


def prepare_data(config: Config) -> DataSetup:
    """Build (if allowed) the dataset, read its fingerprint, plan preprocessing, split cases."""
    data = config.data
    if data.build_if_missing:
        builder = datasets.prepare(data.dataset, data.config, data.data_dir)
    else:
        builder = datasets.get_builder(data.dataset, data.config, data.data_dir)
    fingerprint = datasets.read_fingerprint(builder)
    metadata = builder.info.metadata or {}
    class_names = list(metadata.get("class_names") or fingerprint["class_names"])
    regions = {k: list(v) for k, v in (metadata.get("regions") or {}).items()}
    plan = plan_preprocessing(config.preprocess, fingerprint)
    check_patch_fits(fingerprint, plan, config.patch.patch_size, builder.info.full_name)
    check_input_shape(config.patch.patch_size, config.model.depth)
    ids = read_case_ids(builder, data.split)
    train_ids, val_ids = split_cases(ids, data.validation_fraction, config.seed)
    return DataSetup(
        builder=builder,
        fingerprint=fingerprint,
        fingerprint_hash=datasets.fingerprint_hash(fingerprint),
        class_names=class_names,
        regions=regions,
        plan=plan,
        train_ids=train_ids,
        val_ids=val_ids,
    )


def train_model(
    config: Config, setup: DataSetup, callbacks: Sequence[keras.callbacks.Callback] = ()
) -> tuple[keras.Model, dict[str, list[float]]]:
    """Build the pipelines and the model, and fit it under the configured strategy."""
    keras.utils.set_random_seed(config.seed)
    num_classes = len(setup.class_names)
    det = config.train.deterministic
    train_cases = preprocessed_cases(
        setup.builder, config.data.split, setup.train_ids, setup.plan, num_classes, config.seed, det
    )
    train = training_dataset(
        train_cases, len(setup.train_ids), config.patch, num_classes, config.seed, det
    )
    validation = None
    if setup.val_ids and config.patch.validation_patches > 0:
        val_cases = preprocessed_cases(
            setup.builder, config.data.split, setup.val_ids, setup.plan, num_classes, config.seed
        )
        validation = validation_dataset(
            val_cases, len(setup.val_ids), config.patch, num_classes, config.seed
        )
    in_channels = int(train.element_spec[0].shape[-1])
    strategy = make_strategy(config.train.strategy)
    model = build_compiled_model(
        config.model, config.train, setup.class_names, in_channels, strategy
    )
    history = fit(model, train, validation, config.train, callbacks)
    return model, history


def evaluate_cases(
    model: keras.Model, config: Config, setup: DataSetup, case_ids: Sequence[str]
) -> tuple[list[CaseResult], dict[str, Any] | None]:
    """Predict whole cases patch by patch on their original grid and score them.

    Scores per case: Dice of every foreground class (``dice_<class>``) and of every
    declared region (``dice_<region>``), NaN where the structure is absent from both
    prediction and truth.
    """
    classes = list(range(1, len(setup.class_names)))
    results, example = [], None
    for ex in read_cases(setup.builder, config.data.split, case_ids).as_numpy_iterator():
        case_id = ex["case_id"].decode()
        pred, _ = predict_case(
            model,
            ex["image"],
            ex["spacing"],
            setup.plan,
            config.patch.patch_size,
            len(setup.class_names),
            overlap=config.train.sliding_window_overlap,
            batch_size=config.patch.batch_size,
        )
        truth = ex["label"]
        scores = {
            f"dice_{setup.class_names[c]}": float(d)
            for c, d in dice_per_class(pred, truth, classes).items()
        }
        for region, labels in setup.regions.items():
            scores[f"dice_{region}"] = float(dice_region(pred, truth, labels))
        results.append(CaseResult(case_id, scores))
        # keep the case with the most foreground classes for the overlay
        n_present = len(np.unique(truth))
        if example is None or n_present > example["n_present"]:
            example = {
                "case_id": case_id,
                "image": ex["image"],
                "truth": truth,
                "pred": pred,
                "spacing": ex["spacing"],
                "n_present": n_present,
            }
    return results, example


def run_experiment(
    config: Config, callbacks: Sequence[keras.callbacks.Callback] = ()
) -> ExperimentResult:
    """Run every phase of one experiment and return what each produced."""
    timings = {}
    t0 = time.perf_counter()
    setup = prepare_data(config)
    timings["prepare_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    model, history = train_model(config, setup, callbacks)
    timings["train_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    cases, example = evaluate_cases(model, config, setup, setup.val_ids)
    timings["evaluate_s"] = time.perf_counter() - t0
    summary = summarize([c.scores for c in cases]) if cases else {}
    return ExperimentResult(
        config=config,
        data=setup,
        model=model,
        history=history,
        cases=cases,
        summary=summary,
        example=example,
        timings=timings,
    )
