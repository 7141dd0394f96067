"""One experiment, phase by phase: fingerprint → plan → preprocess → train → predict → evaluate.

The core workflow, free of tracking: an :class:`~medseg.workflows.observer.Observer`
(:class:`medseg.tracking.MlflowObserver`) records it. Each phase is a plain function call on
the one :class:`~medseg.config.Config`.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow_datasets as tfds

from medseg import datasets
from medseg.config import Config
from medseg.evaluation import score_case, summarize
from medseg.evaluation.calibration import CalibrationAccumulator, fit_temperature
from medseg.inference import PredictionPlan, SlidingWindow, predict_case
from medseg.inference.postprocess import Components, component_tables, decide_postprocessing
from medseg.models import check_input_shape, downsample_targets
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
from medseg.pipeline.transforms import transform_name
from medseg.planning import ExperimentPlan
from medseg.planning.resolve import apply_plan, resolve_plan
from medseg.progress import start_bar
from medseg.training import (
    build_compiled_model,
    fit,
    make_strategy,
    resume_step,
    seed_everything,
)
from medseg.workflows.observer import Observer


@dataclass
class DataSetup:
    """A built dataset and everything decided from it before training."""

    builder: tfds.core.DatasetBuilder
    fingerprint: datasets.Fingerprint
    fingerprint_hash: str
    class_names: list[str]
    regions: dict[str, list[int]]
    plan: PreprocessPlan
    train_ids: list[str]
    val_ids: list[str]
    # the experiment plan as it runs, the config resolved against it, and the explicit
    # config keys that overrode a planned value ({key: {"planned": .., "used": ..}})
    experiment_plan: ExperimentPlan | None = None
    config: Config | None = None
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def dataset_name(self) -> str:
        return self.builder.info.full_name  # e.g. "kits_phantom/small/1.1.0"


@dataclass
class CaseResult:
    case_id: str
    scores: dict[str, float]
    # per foreground label: its predicted components against the truth (for the
    # postprocessing decision)
    postprocessing: dict[int, Components] = field(default_factory=dict)


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
    # decided from the validation cases (evaluation.postprocess), saved in the plan.json
    postprocessing: dict[str, Any] | None = None
    # the user's patch transforms (augment.extra, then those passed in), as module:name
    transforms: list[str] = field(default_factory=list)


def prepare_data(config: Config) -> DataSetup:
    """Build (if allowed) the dataset, read its fingerprint, plan, split cases.

    The experiment plan (:func:`medseg.planning.resolve.resolve_plan`) fills every key the
    config leaves unset; ``setup.config`` is the config resolved against it, which the
    later phases take.
    """
    data = config.data
    if data.build_if_missing:
        builder = datasets.prepare(data.dataset, data.config, data.data_dir)
    else:
        builder = datasets.get_builder(data.dataset, data.config, data.data_dir)
    fingerprint = datasets.read_fingerprint(builder)
    metadata = builder.info.metadata or {}
    class_names = list(metadata.get("class_names") or fingerprint.class_names)
    regions = {k: list(v) for k, v in (metadata.get("regions") or {}).items()}
    fp_hash = fingerprint.hash
    experiment_plan = resolve_plan(
        config,
        fingerprint,
        dataset=builder.info.full_name,
        fingerprint_hash=fp_hash,
        modalities=datasets.modalities(builder),
        cache_dir=builder.data_dir,
    )
    config, experiment_plan, overrides = apply_plan(config, experiment_plan, fingerprint)
    plan = plan_preprocessing(config.preprocess, fingerprint)
    check_patch_fits(
        fingerprint, plan, config.patch.patch_size, builder.info.full_name, config.patch.mode
    )
    if config.plan.mode == "none":
        # a slab model's network sees the in-plane size only (the slices are channels)
        window = config.patch.patch_size[1:] if config.patch.mode == "slice" else None
        check_input_shape(window or config.patch.patch_size, config.model.depth)
    ids = read_case_ids(builder, data.split)
    train_ids, val_ids = split_cases(ids, data.validation_fraction, config.seed)
    return DataSetup(
        builder=builder,
        fingerprint=fingerprint,
        fingerprint_hash=fp_hash,
        class_names=class_names,
        regions=regions,
        plan=plan,
        train_ids=train_ids,
        val_ids=val_ids,
        experiment_plan=experiment_plan,
        config=config,
        overrides=overrides,
    )


def checkpoint_directory(config: Config, train_ids: Sequence[str]) -> str | None:
    """This training's checkpoint folder: ``train.checkpoint_dir/<key>``, or None.

    The key hashes everything that shapes training (the config less its tracking,
    inference, evaluation and tuning sections, plus the training cases), so a rerun of
    an interrupted training resumes, while cross-validation folds that share
    ``train.checkpoint_dir`` never resume from one another. Tuning gives each trial its
    own ``checkpoint_dir`` first: two trials drawing the same values hash alike.
    """
    if not config.train.checkpoint_dir:
        return None
    values = config.to_dict()
    for section in ("tracking", "inference", "evaluation", "tune"):
        values.pop(section, None)
    values["train_cases"] = sorted(train_ids)
    key = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]
    return str(Path(config.train.checkpoint_dir) / key)


def train_model(
    config: Config,
    setup: DataSetup,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    transforms: Sequence = (),
) -> tuple[keras.Model, dict[str, list[float]]]:
    """Build the pipelines and the model, and fit it under the configured strategy.

    ``transforms`` are the user's patch transforms applied after the configured
    augmentation (and after those ``augment.extra`` names; :mod:`medseg.pipeline.transforms`).

    With a checkpoint in :func:`checkpoint_directory`, training resumes from it: the
    training stream starts at the checkpoint's step, weights and optimizer state are
    restored, and the returned history covers every epoch.
    """
    strategy = make_strategy(config.train.strategy)  # first: multi-worker needs a fresh TF
    seed_everything(config.seed, config.train.deterministic)
    checkpoints = checkpoint_directory(config, setup.train_ids)
    start_step = resume_step(config.train, checkpoints)
    num_classes = len(setup.class_names)
    det = config.train.deterministic
    cache_dir = config.preprocess.cache_dir
    from medseg.pipeline import check_patch_config, describe_stream_memory, sharded_cases

    check_patch_config(config.patch)  # before any case is preprocessed or written
    # bounded memory: the cases as shards on disk, streamed through a resident window
    cases_of = preprocessed_cases if config.patch.cases_in_memory is None else sharded_cases
    train_cases = cases_of(
        setup.builder,
        config.data.split,
        setup.train_ids,
        setup.plan,
        num_classes,
        config.seed,
        det,
        cache_dir=cache_dir,
    )
    stream_augment, batch_augment = _augment_placement(config, transforms)
    train = training_dataset(
        train_cases,
        len(setup.train_ids),
        config.patch,
        num_classes,
        config.seed,
        det,
        augment=stream_augment,
        start_step=start_step,
        transforms=transforms,
    )
    print(describe_stream_memory(train_cases, len(setup.train_ids), config.patch), flush=True)
    validation = None
    if setup.val_ids and config.patch.validation_patches > 0:
        # from shards the validation set is read one case at a time (only its patches kept)
        val_cases = cases_of(
            setup.builder,
            config.data.split,
            setup.val_ids,
            setup.plan,
            num_classes,
            config.seed,
            cache_dir=cache_dir,
        )
        validation = validation_dataset(
            val_cases, len(setup.val_ids), config.patch, num_classes, config.seed
        )
    image_spec = train.element_spec[0]
    ndim = len(image_spec.shape) - 2
    in_channels = int(image_spec.shape[-1])
    topology = widths = None
    if setup.experiment_plan is not None and ndim == len(setup.experiment_plan.patch_size):
        topology, widths = setup.experiment_plan.topology, setup.experiment_plan.widths
    model = build_compiled_model(
        config.model,
        config.train,
        setup.class_names,
        in_channels,
        strategy,
        loss_config=config.loss,
        regions=setup.regions,
        ndim=ndim,
        topology=topology,
        widths=widths,
    )
    if len(model.outputs) > 1:  # deep supervision: one target per output, full size first
        train = train.map(lambda x, y: (x, downsample_targets(y, model)))
        if validation is not None:
            validation = validation.map(lambda x, y: (x, downsample_targets(y, model)))
    history = fit(
        model,
        train,
        validation,
        config.train,
        callbacks,
        train_start_step=start_step,
        checkpoint_dir=checkpoints,
        augment=batch_augment,
    )
    return model, history


def _augment_placement(config: Config, transforms: Sequence = ()):
    """``(augment config for tf.data, batch augmentation for the step or None)``.

    ``augment.device="accelerator"``: tf.data only reads, crops and batches; the built-in
    augmentation runs in the compiled step with the same per-patch seeds
    (:mod:`medseg.pipeline.batched`).
    """
    import dataclasses

    from medseg.pipeline.batched import BatchAugmentation

    augment = config.augment
    if augment.device != "accelerator" or not augment.enabled:
        return augment, None
    if augment.extra or transforms:
        raise ValueError(
            "augment.device='accelerator' augments in the training step, after tf.data: the "
            f"user transforms ({', '.join(augment.extra) or 'transforms='}) would then run "
            "before it instead of after; set augment.device='cpu' to use them"
        )
    if config.model.deep_supervision:
        raise ValueError(
            "augment.device='accelerator' does not support model.deep_supervision=true yet "
            "(the downsampled targets are made in tf.data, before the step augments): set "
            "augment.device='cpu' or model.deep_supervision=false"
        )
    if config.patch.mode == "full":
        raise ValueError(
            "augment.device='accelerator' needs fixed patch shapes: patch.mode='full' "
            "batches whole cases; use patch.mode='patch' or augment.device='cpu'"
        )
    if config.train.loop != "custom":
        raise ValueError(
            f"augment.device='accelerator' augments inside medseg's training step, which "
            f"train.loop={config.train.loop!r} does not run: set train.loop='custom' or "
            "augment.device='cpu'"
        )
    batch = BatchAugmentation(augment, config.seed, config.patch.batch_size)
    return dataclasses.replace(augment, enabled=False), batch


def evaluate_cases(
    model: keras.Model,
    config: Config,
    setup: DataSetup,
    case_ids: Sequence[str],
    split: str | None = None,
) -> tuple[list[CaseResult], dict[str, Any] | None]:
    """Predict whole cases patch by patch on their original grid and score them.

    Scores per case (:func:`medseg.evaluation.score_case`, in mm with the case's spacing):
    ``<metric>_<class>`` for Dice, IoU, HD95, ASD, surface Dice and volume difference of
    every foreground class, and ``dice_<region>``; NaN where the structure is absent from
    both prediction and truth. ``split`` defaults to ``config.data.split``.

    With ``evaluation.calibration`` the example also holds ``"calibration"``: the
    :class:`~medseg.evaluation.calibration.CalibrationAccumulator` of every scored voxel
    (exact whole-split ECE), ``"temperature"``, fitted on the log-probabilities of a
    seeded sample of ``evaluation.temperature_samples`` voxels per case, and
    ``"temperature_voxels"``, the sample's size.
    """
    classes = list(range(1, len(setup.class_names)))
    evaluation = config.evaluation
    calibration = None
    if evaluation.calibration:  # checked before any case is predicted
        for key in ("calibration_bins", "temperature_samples"):
            value = getattr(evaluation, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"config key 'evaluation.{key}': {value!r} is not a whole number >= 1; "
                    "give e.g. 15 bins / 20000 voxels, or set evaluation.calibration=false"
                )
        calibration = CalibrationAccumulator(len(setup.class_names), evaluation.calibration_bins)
        rng = np.random.default_rng(config.seed)
        samples, sample_labels = [], []
    plan = prediction_plan(config, setup)
    window = SlidingWindow.from_plan(plan, config.inference)  # configured once, every case
    sampling = None
    if config.inference.uncertainty != "none":  # checked before any case is predicted
        from medseg.inference.uncertainty import sample_sets

        seed = config.inference.uncertainty_seed
        sampling = sample_sets(
            [model], window, config.inference.uncertainty, config.inference.uncertainty_samples,
            config.seed if seed is None else seed, names=["the trained model"],
        )
    results, example = [], None
    split = split or config.data.split
    # one step per whole case (medseg.progress); an error leaves it to tqdm's finaliser
    bar = start_bar(None if case_ids is None else len(case_ids), "evaluate", unit="case")
    for ex in read_cases(setup.builder, split, case_ids).as_numpy_iterator():
        case_id = ex["case_id"].decode()
        bar.set_postfix_str(case_id)
        pred, probs = predict_case(
            model,
            ex["image"],
            ex["spacing"],
            setup.plan,
            config.patch.patch_size,
            len(setup.class_names),
            probabilities=calibration is not None,
            slab=plan.slab,
            window=window,
        )
        truth = ex["label"]
        if calibration is not None:
            calibration.update(probs, truth)
            flat = probs.reshape(-1, probs.shape[-1])
            pick = rng.choice(len(flat), min(len(flat), evaluation.temperature_samples),
                              replace=False)
            samples.append(flat[pick])
            sample_labels.append(truth.reshape(-1)[pick])
            del flat, probs  # a case's probabilities are K floats per voxel: not kept
        scores = score_case(
            pred,
            truth,
            ex["spacing"],
            setup.class_names,
            setup.regions,
            tolerance=evaluation.surface_tolerance_mm,
            percentile=evaluation.hd_percentile,
        )
        entropy = None
        if sampling is not None:
            uncertainty, entropy = _case_uncertainty(sampling, ex, setup, plan)
            scores.update(uncertainty)
        pp = (
            component_tables(pred, truth, classes, ex["spacing"]) if evaluation.postprocess else {}
        )
        results.append(CaseResult(case_id, scores, pp))
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
                "entropy": entropy,  # inference.uncertainty's map, for its overlay
            }
        bar.update()
    bar.close()
    if example is not None and calibration is not None:
        sample = np.concatenate(samples)
        example["calibration"] = calibration
        example["temperature"] = fit_temperature(sample, np.concatenate(sample_labels))
        example["temperature_voxels"] = len(sample)
    return results, example


def _case_uncertainty(sampling, ex, setup: DataSetup, plan) -> tuple[dict[str, float], Any]:
    """Per-structure uncertainty scores of one validation case (``inference.uncertainty``)
    and its entropy map: ``entropy_<class>`` (mean inside the consensus structure, nats),
    ``boundary_entropy_<class>`` (its one-voxel shell) and ``expected_dice_<class>`` (the
    samples' mean Dice against the consensus), NaN where a structure is absent."""
    from medseg.inference.predictor import predict_case_samples
    from medseg.inference.uncertainty import SampleStatistics, uncertainty_summary

    sets, reset = sampling
    reset()  # the same dropout masks for every case
    stats = SampleStatistics()
    for probs in predict_case_samples(
        sets, ex["image"], ex["spacing"], setup.plan, len(setup.class_names), slab=plan.slab,
        name=ex["case_id"].decode(),
    ):
        stats.add(probs)
    consensus = np.argmax(stats.mean(), axis=-1).astype(np.uint8)
    entropy = stats.entropy()
    summary = uncertainty_summary(consensus, entropy, stats.labels, setup.class_names)

    def number(value):
        return float("nan") if value is None else float(value)

    scores = {}
    for name, entry in summary["structures"].items():
        scores[f"entropy_{name}"] = number(entry["mean_entropy"])
        scores[f"boundary_entropy_{name}"] = number(entry["boundary_mean_entropy"])
        scores[f"expected_dice_{name}"] = number(entry["expected_dice"])
    return scores, entropy


def prediction_plan(
    config: Config, setup: DataSetup, postprocessing: dict[str, Any] | None = None
) -> PredictionPlan:
    """What prediction with this run's model needs: preprocessing, window, stride, classes
    (and the postprocessing decided on its validation cases)."""
    return PredictionPlan.from_config(
        config,
        setup.plan,
        setup.class_names,
        stride=network_stride(config, setup),
        postprocessing=postprocessing,
    )


def network_stride(config: Config, setup: DataSetup):
    """The network's per-axis total stride (an int where it is the same on every axis)."""
    if setup.experiment_plan is None:
        from medseg.models import stride

        return stride(config.model.depth)
    divisor = setup.experiment_plan.topology.divisor
    return divisor[0] if len(set(divisor)) == 1 else divisor


def run_experiment(
    config: Config,
    observer: Observer | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    setup: DataSetup | None = None,
    transforms: Sequence = (),
) -> ExperimentResult:
    """Run every phase of one experiment and return what each produced.

    Parameters
    ----------
    config : Config
    observer : Observer, optional
        Told of each phase (:mod:`medseg.workflows.observer`); its callbacks come before
        ``callbacks`` in training.
    callbacks : sequence of keras.callbacks.Callback, optional
    setup : DataSetup, optional
        From :func:`prepare_data`: skips the first phase.
    transforms : sequence of callables, optional
        The user's ``(image, label, seed) -> (image, label)`` patch transforms, after the
        configured augmentation (:mod:`medseg.pipeline.transforms`).

    Returns
    -------
    ExperimentResult
        Its config is the one resolved against the plan.
    """
    observer = observer or Observer()
    make_strategy(config.train.strategy)  # before any TF op: multi-worker needs it so
    observer.run_started(config)
    try:
        timings = {}
        t0 = time.perf_counter()
        if setup is None:
            setup = prepare_data(config)
        config = setup.config or config
        timings["prepare_s"] = time.perf_counter() - t0  # planning included
        observer.planned(config, setup)
        t0 = time.perf_counter()
        model, history = train_model(
            config, setup, [*observer.callbacks(), *callbacks], transforms
        )
        timings["train_s"] = time.perf_counter() - t0
        result = score_model(model, history, config, setup, setup.val_ids, timings=timings)
        result.transforms = [*config.augment.extra, *(transform_name(t) for t in transforms)]
    except BaseException as err:
        observer.run_failed(err)
        raise
    observer.run_finished(result)
    return result


def score_model(
    model: keras.Model,
    history: dict[str, list[float]],
    config: Config,
    setup: DataSetup,
    case_ids: Sequence[str],
    split: str | None = None,
    timings: dict[str, float] | None = None,
) -> ExperimentResult:
    """Evaluate a trained model on whole cases: per-case scores, their summary and the
    postprocessing decided from them (``evaluation.postprocess``)."""
    timings = dict(timings or {})
    t0 = time.perf_counter()
    cases, example = evaluate_cases(model, config, setup, case_ids, split)
    timings["evaluate_s"] = time.perf_counter() - t0
    postprocessing = None
    if config.evaluation.postprocess and cases:
        postprocessing = decide_postprocessing([c.postprocessing for c in cases], setup.class_names)
    return ExperimentResult(
        config=config,
        data=setup,
        model=model,
        history=history,
        cases=cases,
        summary=summarize([c.scores for c in cases]) if cases else {},
        example=example,
        timings=timings,
        postprocessing=postprocessing,
    )
