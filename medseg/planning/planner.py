"""Planning an experiment: from a dataset fingerprint and this machine to an
:class:`~medseg.planning.ExperimentPlan`.

nnU-Net's phases decide spacing, patch, topology and batch from the fingerprint and a GPU
memory target (:mod:`medseg.planning.rules`, :mod:`medseg.planning.memory`). On a CPU,
or with a time budget, what decides whether a plan is usable is time: the planner times
this machine's convolutions, predicts each candidate network's step time, shrinks the
candidate (filters, then patch, then filters again) until the budget buys enough steps,
then times the chosen network's real training step and sets the step count from it.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.config import ConfigError
from medseg.config import parse_duration as config_duration
from medseg.datasets.fingerprint import Fingerprint, format_numbers
from medseg.planning import memory, rules
from medseg.planning.record import PLAN_VERSION, Decision, ExperimentPlan, PlanError

__all__ = [
    "PlanOptions",
    "explain",
    "parse_duration",
    "plan_experiment",
]

PRESETS = {"default": "plain_unet", "resenc_m": "resenc_unet", "resenc_l": "resenc_unet"}
DEVICES = ("auto", "cpu", "gpu")
GPU_SCHEDULE = (1000, 250)  # nnU-Net's epochs × iterations
MIN_PATCH_EDGE = 8  # voxels: below this a U-Net has no room for even one pooling
MIN_STEPS = 200  # a time-budgeted plan needs at least this many steps to learn anything
TARGET_STEPS = 600  # below this, the network shrinks before the step count does
FILTER_LEVELS = (32, 24, 16, 12, 8)
FILTER_FLOOR_BEFORE_PATCH = 16  # shrink filters to here first, then the patch
MIN_PATCH_VOXELS = 24 * 48 * 48  # the patch stops shrinking here (context)
# non-convolution work (normalisation, activations, concatenation, optimizer) per stored
# feature-map element, in convolution FLOPs: measured on the default U-Net step
MEMORY_FLOP_EQUIVALENT = 1000.0
# the training loop's cost beyond the step: the tf.data pipeline sharing the CPU,
# per-epoch validation patches, callbacks; calibrated on planned runs
LOOP_OVERHEAD = 1.18
CPU_RAM_SHARE = 0.5  # of the available RAM, for one training process
# part of the cache key: bump whenever a rule or constant changes what a plan would be
PLANNER_REVISION = 8
LOWRES_COVERAGE = 0.25  # nnU-Net: a low-resolution configuration below this patch coverage


@dataclass(frozen=True)
class PlanOptions:
    """What the user asks of a plan (the ``plan.*`` config keys, ``medseg plan`` flags)."""

    device: str = "auto"
    gpu_memory: float | None = None  # GB; None: the preset's own
    time_budget_s: float | None = None
    preset: str = "default"
    validation_fraction: float = 0.25
    validation_patches: int = 8
    # conv3d GFLOP/s (forward + backward) to assume instead of measuring it here: a plan
    # for another machine, and tests whose outcome must not depend on this CPU
    conv_gflops: float | None = None

    def check(self) -> None:
        if self.device not in DEVICES:
            raise PlanError(f"plan.device={self.device!r}: use one of {', '.join(DEVICES)}")
        if self.preset not in PRESETS:
            raise PlanError(f"plan.preset={self.preset!r}: use one of {', '.join(PRESETS)}")
        if self.gpu_memory is not None and not self.gpu_memory > 0:
            raise PlanError(f"plan.gpu_memory={self.gpu_memory}: must be a positive number of GB")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise PlanError(f"plan.time_budget={self.time_budget_s} s: must be positive")
        if self.conv_gflops is not None and not self.conv_gflops > 0:
            raise PlanError(f"conv_gflops={self.conv_gflops}: must be a positive GFLOP/s")


def parse_duration(text: str | float | int | None) -> float | None:
    """``"10m"``, ``"90s"``, ``"1h30m"``, ``"2.5m"`` or a number of seconds → seconds
    (:func:`medseg.config.parse_duration`, failing as a :class:`PlanError`)."""
    try:
        return config_duration(text)
    except ConfigError as err:
        raise PlanError(str(err)) from None


# -- candidates ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Candidate:
    patch: tuple[int, ...]
    topology: rules.Topology
    widths: tuple[int, ...]
    batch: int
    layers: tuple[memory.ConvLayer, ...]

    @property
    def elements(self) -> float:
        return memory.feature_map_elements(self.layers)

    @property
    def flops(self) -> float:
        return memory.training_flops(self.layers, self.batch)

    @property
    def parameters(self) -> int:
        return memory.parameter_count(self.layers)

    def describe(self) -> str:
        return (
            f"patch {'×'.join(map(str, self.patch))}, {self.topology.num_stages} stages, "
            f"filters {self.widths[0]}, batch {self.batch}"
        )


def network_parts(model: str):
    """(encoder blocks per stage or None, decoder convs) of an architecture, for the
    memory model: ResEnc's residual blocks and single decoder conv, else plain stages."""
    if model != "resenc_unet":
        return None, 2
    from medseg.models.unet_variants import RESENC_BLOCKS

    return RESENC_BLOCKS, 1


def resolve_device(device: str) -> str:
    """``"auto"`` → ``"gpu"`` where TensorFlow sees one, else ``"cpu"``."""
    if device != "auto":
        return device
    return "gpu" if _gpu_names() else "cpu"


def _candidate(spacing, patch, base, batch, in_channels, num_classes, preset) -> _Candidate:
    topo, patch = rules.topology(spacing, patch)
    widths = rules.stage_widths(topo.num_stages, len(spacing), base)
    blocks, decoder = network_parts(PRESETS[preset])
    layers = memory.conv_layers(
        topo, widths, patch, in_channels, num_classes, encoder_blocks=blocks,
        decoder_convs=decoder,
    )
    return _Candidate(tuple(patch), topo, widths, batch, tuple(layers))


def _fit_bound(patch, bound, spacing) -> tuple[int, ...]:
    """``patch`` clipped to ``bound`` and rounded down to its topology's divisor."""
    patch = tuple(int(min(p, b)) for p, b in zip(patch, bound, strict=True))
    for _ in range(8):
        topo, _ = rules.topology(spacing, patch)
        divisor = topo.divisor
        fitted = tuple(max(d, (p // d) * d) for p, d in zip(patch, divisor, strict=True))
        if fitted == patch:
            return patch
        patch = fitted
    return patch


def _shrunk(patch, median_shape, spacing) -> tuple[int, ...] | None:
    """One nnU-Net shrink step: the axis largest relative to the median shape loses one
    multiple of its divisor; None when no axis can shrink further."""
    patch = list(patch)
    order = np.argsort(np.asarray(patch) / np.maximum(np.asarray(median_shape), 1))[::-1]
    for axis in order:
        topo, _ = rules.topology(spacing, patch)
        step = topo.divisor[axis]
        if patch[axis] - step >= MIN_PATCH_EDGE:
            patch[axis] -= step
            return _fit_bound(patch, patch, spacing)
    return None


# -- the machine ---------------------------------------------------------------------------


def _gpu_names() -> list[str]:
    import tensorflow as tf

    return [d.name for d in tf.config.list_physical_devices("GPU")]


def machine_id(device: str) -> str:
    """What a cached plan's timings depend on: CPU model, cores, and the GPUs."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import os

    gpus = ",".join(_gpu_names()) if device == "gpu" else ""
    # oneDNN's instruction-set cap changes conv speed several-fold on one CPU
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "")
    return f"{cpu}|{os.cpu_count()} cores|{device}|{gpus}" + (f"|isa {isa}" if isa else "")


def _ram_budget() -> float:
    import psutil

    return psutil.virtual_memory().available * CPU_RAM_SHARE


# -- planning ------------------------------------------------------------------------------


def plan_experiment(
    fingerprint: dict[str, Any],
    *,
    dataset: str,
    fingerprint_hash: str,
    modalities: list[str] | tuple[str, ...],
    options: PlanOptions = PlanOptions(),
    probe: bool = True,
    _spacing: tuple[tuple[float, ...], str] | None = None,
) -> ExperimentPlan:
    """Plan spacing, normalisation, patch, network, batch and training length.

    Parameters
    ----------
    fingerprint : dict
        The dataset fingerprint (:func:`medseg.datasets.read_fingerprint`).
    dataset, fingerprint_hash : str
        Recorded in the plan (and checked when a run reuses it).
    modalities : sequence of str
        One per image channel, e.g. ``("CT",)`` or ``("FLAIR", "T1w", "t1gd", "T2w")``.
    options : PlanOptions
    probe : bool
        Time the planned network on this machine where the plan needs it (CPU, or a time
        budget). Without, the step time is predicted from the convolution throughput alone
        (a quick measurement; no network is built).

    Raises
    ------
    PlanError
        When no sensible plan fits: cases smaller than the minimum patch, a GPU memory
        below the smallest network, a time budget too small for the minimum of steps.
    """
    options.check()
    decisions: list[Decision] = []

    def decide(key, value, rule, **inputs):
        decisions.append(Decision(key, value, rule, inputs))
        return value

    fingerprint = Fingerprint.of(fingerprint, f"fingerprint of {dataset}")
    spacings, shapes = fingerprint.spacings, fingerprint.shapes
    ndim = spacings.shape[1]
    num_classes = fingerprint.num_classes
    in_channels = len(fingerprint.intensity_channels)
    modalities = tuple(modalities) or ("unknown",) * in_channels
    if len(modalities) != in_channels:
        modalities = (modalities[0],) * in_channels

    # spacing and shapes
    spacing, why = _spacing or rules.target_spacing(spacings, shapes)
    decide(
        "preprocess.target_spacing", [round(s, 4) for s in spacing], why,
        spacing_median=[float(v) for v in np.median(spacings, 0)],
        spacing_percentile_10=[float(v) for v in np.percentile(spacings, 10, 0)],
    )
    resampled = rules.resampled_shape(shapes, spacings, spacing)
    median_shape = tuple(float(v) for v in np.median(resampled, 0))
    smallest = tuple(int(v) for v in resampled.min(0))
    dataset_voxels = float(np.prod(resampled, axis=1).sum())
    if min(smallest) < MIN_PATCH_EDGE:
        axis = int(np.argmin(smallest))
        raise PlanError(
            f"{dataset}: the smallest case is {smallest} voxels at the target spacing "
            f"{[round(s, 3) for s in spacing]} mm, {smallest[axis]} along axis {axis}: below "
            f"the minimum patch of {MIN_PATCH_EDGE} voxels per axis; resample finer "
            "(preprocess.target_spacing) or drop the case"
        )

    # normalisation
    normalize, crop, why = rules.normalization_scheme(modalities[0])
    decide("preprocess.normalize", normalize, why, modalities=list(modalities))
    clip = "fingerprint" if normalize == "ct" else "none"
    decide("preprocess.clip", clip, "CT: the foreground's 0.5/99.5 %" if clip != "none" else
           "per-image z-score: no dataset-wide clip")
    decide("preprocess.crop_to_nonzero", crop, "MR: background is 0 outside the anatomy"
           if crop else "CT: air is not 0; the whole field of view is kept")
    bias_probability, why_bias = rules.bias_field_probability(modalities)
    decide("augment.bias_field_probability", bias_probability, why_bias)
    pedestal, why_pedestal = rules.bias_field_pedestal(modalities)
    decide("augment.bias_field_pedestal", list(pedestal), why_pedestal)
    layouts = fingerprint.class_layouts
    median = None if layouts is None else np.median(layouts, axis=0)
    flip_axes, why_flip = rules.mirror_axes(median, ndim)
    decide("augment.flip_axes", list(flip_axes), why_flip, class_layout_median=None
           if median is None else [round(float(v), 3) for v in median])

    # device and memory budget
    device = resolve_device(options.device)
    reference = memory.REFERENCES[options.preset]
    if device == "gpu":
        gigabytes = options.gpu_memory or reference.gigabytes
        budget_elements = reference.budget_elements(gigabytes)
        memory_budget = gigabytes * 1e9
        why_memory = f"GPU {gigabytes:g} GB: nnU-Net's reference {reference.elements:.3g} elements at {reference.gigabytes:g} GB"
    else:
        memory_budget = _ram_budget()
        # float32 on CPU: twice the bytes per element of the mixed-precision reference
        budget_elements = reference.budget_elements(memory_budget / 1e9 / 2)
        why_memory = f"CPU: {CPU_RAM_SHARE:.0%} of the available RAM, float32"

    # patch: nnU-Net's start, clipped to the median and smallest case, shrunk to the memory
    bound = tuple(min(m, s) for m, s in zip(median_shape, smallest, strict=True))
    start = rules.initial_patch(spacing, median_shape, ndim)
    patch = _fit_bound(start, bound, spacing)
    base = rules.BASE_FEATURES
    cand = _candidate(spacing, patch, base, 2, in_channels, num_classes, options.preset)
    float32 = device == "cpu"

    def over_budget(c):
        return c.elements > budget_elements or memory.memory_bytes(
            c.elements, reference.batch, c.parameters, float32) > memory_budget

    while over_budget(cand):
        smaller = _shrunk(cand.patch, median_shape, spacing)
        if smaller is None:
            need = memory.memory_bytes(cand.elements, 2, cand.parameters, device == "cpu")
            raise PlanError(
                f"{'GPU memory ' + format(options.gpu_memory or reference.gigabytes, 'g') + ' GB' if device == 'gpu' else 'RAM budget'}"
                f" is below the smallest network's estimate of {need / 1e9:.2f} GB "
                f"({cand.describe()}): give more memory (--gpu-memory) or use the CPU"
            )
        cand = _candidate(spacing, smaller, base, 2, in_channels, num_classes, options.preset)
    memory_patch = cand.patch

    # batch
    batch, why_batch = rules.batch_size(
        budget_elements, cand.elements, cand.patch, dataset_voxels,
        reference_batch=reference.batch, max_share=reference.max_dataset_share,
    )
    if device == "cpu":
        batch, why_batch = 2, "CPU: the minimum 2 (time, not memory, is what binds)"
    cand = _candidate(spacing, cand.patch, base, batch, in_channels, num_classes, options.preset)

    # training length
    probe_record = None
    time_budget = options.time_budget_s
    if device == "gpu" and time_budget is None:
        epochs, steps = GPU_SCHEDULE
        why_steps = "GPU: nnU-Net's fixed schedule"
        predicted = None
    else:
        if time_budget is None:
            time_budget = 600.0
        cand, epochs, steps, predicted, probe_record, why_steps = _fit_time(
            cand, spacing, median_shape, time_budget, options, in_channels, num_classes,
            fingerprint.num_cases, probe,
        )
    if _spacing is None and tuple(cand.patch) != tuple(memory_patch):
        coarser = lowres_spacing(fingerprint, spacing, median_shape, cand.patch)
        if coarser is not None:
            return plan_experiment(
                fingerprint, dataset=dataset, fingerprint_hash=fingerprint_hash,
                modalities=modalities, options=options, probe=probe, _spacing=coarser,
            )
    decide("patch.patch_size", list(cand.patch),
           f"nnU-Net's start {list(start)} (aspect 1/spacing, 256³), ≤ median {list(map(round, median_shape))} "
           f"and smallest case {list(smallest)}, memory fit {list(memory_patch)}"
           + ("" if tuple(cand.patch) == tuple(memory_patch) else ", then shrunk to the time budget"),
           memory_budget_elements=budget_elements)
    decide("model.depth", cand.topology.num_stages,
           "pool an axis while its map stays ≥ 4 and its spacing ≤ 2 × the finest",
           strides=[list(s) for s in cand.topology.strides],
           kernels=[list(k) for k in cand.topology.kernels])
    decide("model.filters", cand.widths[0],
           "32 doubling to 320" + ("" if cand.widths[0] == 32 else ", shrunk to the time budget"),
           widths=list(cand.widths))
    deep = cand.topology.num_stages >= 4
    decide("model.deep_supervision", deep, "on from 4 stages (nnU-Net)")
    decide("model.name", PRESETS[options.preset], f"preset {options.preset}")
    decide("patch.batch_size", cand.batch, why_batch)
    decide("patch.foreground_share", 0.33, "nnU-Net's foreground oversampling")
    decide("train.epochs", epochs, why_steps)
    decide("train.steps_per_epoch", steps, why_steps)
    mem = memory.memory_bytes(cand.elements, cand.batch, cand.parameters, device == "cpu")
    decide("memory", f"{mem / 1e9:.2f} GB", why_memory, budget_gb=memory_budget / 1e9)

    return ExperimentPlan(
        dataset=dataset,
        fingerprint_hash=fingerprint_hash,
        device=device,
        preset=options.preset,
        modalities=modalities,
        target_spacing=tuple(float(s) for s in spacing),
        median_shape=median_shape,
        normalize=normalize,
        clip=clip,
        crop_to_nonzero=crop,
        model=PRESETS[options.preset],
        patch_size=tuple(cand.patch),
        strides=cand.topology.strides,
        kernels=cand.topology.kernels,
        widths=cand.widths,
        deep_supervision=deep,
        batch_size=cand.batch,
        foreground_share=0.33,
        epochs=epochs,
        steps_per_epoch=steps,
        memory_bytes=mem,
        memory_budget_bytes=memory_budget,
        feature_map_elements=cand.elements,
        parameters=cand.parameters,
        flops_per_step=cand.flops,
        time_budget_s=options.time_budget_s if device == "gpu" else time_budget,
        predicted_train_s=predicted,
        probe=probe_record,
        bias_field_probability=bias_probability,
        bias_field_pedestal=tuple(pedestal),
        flip_axes=flip_axes,
        decisions=tuple(decisions),
    )


def lowres_spacing(fingerprint, spacing, median_shape, patch):
    """A coarser spacing where a time-budgeted patch cannot hold the dataset's structures.

    nnU-Net adds a low-resolution configuration when the patch covers < 25 % of the median
    case. A time budget shrinks the patch far below what memory would allow, so here the
    spacing is coarsened (nnU-Net's increments: × 1.03, the finer axes first while any is
    > 2 × finer than the coarsest) until the patch covers 25 % of the median case, where the
    patch also cannot hold the typical structure with room around it: the largest class's
    mean per-case volume is above half the patch. Phantom kidneys (~10⁴ voxels in a 10⁵-voxel
    patch) keep their resolution; brain lobes (~10⁵ each) get the context they are defined by. Returns ``(spacing, why)``
    or None; never more than 3 × the full-resolution spacing.
    """
    fingerprint = Fingerprint.of(fingerprint)
    if not fingerprint.get("class_voxel_counts") or not fingerprint.get("class_case_counts"):
        return None  # an older fingerprint: no per-class volumes to judge by
    counts = fingerprint.class_voxel_counts[1:]
    cases = np.maximum(fingerprint.class_case_counts[1:], 1)
    original = np.median(fingerprint.spacings, 0)
    # mean per-case volume of each class, in voxels at ``spacing``
    structure = float((counts / cases).max()) * np.prod(original) / np.prod(spacing)
    patch_voxels = float(np.prod(patch))
    median_voxels = float(np.prod(median_shape))
    full = np.asarray(spacing, np.float64)
    current = full.copy()

    def covered(s):
        return patch_voxels / (median_voxels * np.prod(full) / np.prod(s)) >= LOWRES_COVERAGE

    if covered(current) or structure <= 0.5 * patch_voxels:
        return None
    # once needed, nnU-Net's loop: coarsen until the patch covers 25 % of the median case
    while not covered(current) and (current / full).max() < 3.0:
        ratio = current.max() / current
        current = np.where(ratio > 2, current * 1.03, current) if (ratio > 2).any() else current * 1.03
    why = (
        f"low resolution for the time budget: the patch {list(patch)} covered "
        f"{patch_voxels / median_voxels:.1%} of the median case (< {LOWRES_COVERAGE:.0%}) and "
        f"the largest structure (~{structure:.3g} voxels per case) exceeded half of it "
        f"(nnU-Net's 3d_lowres increments from {[round(s, 3) for s in spacing]} mm)"
    )
    return tuple(float(s) for s in current), why


def _ladder(cand, spacing, median_shape, in_channels, num_classes, preset):
    """The next smaller candidate: filters down to 16, then the patch down to its floor,
    then filters down to 8; None at the end of the ladder."""
    base = cand.widths[0]
    make = lambda patch, b: _candidate(  # noqa: E731
        spacing, patch, b, cand.batch, in_channels, num_classes, preset
    )
    smaller_filters = [f for f in FILTER_LEVELS if f < base]
    if smaller_filters and smaller_filters[0] >= FILTER_FLOOR_BEFORE_PATCH:
        return make(cand.patch, smaller_filters[0])
    if math.prod(cand.patch) > MIN_PATCH_VOXELS:
        patch = _shrunk(cand.patch, median_shape, spacing)
        if patch is not None and math.prod(patch) >= MIN_PATCH_VOXELS * 0.5:
            return make(patch, base)
    if smaller_filters:
        return make(cand.patch, smaller_filters[0])
    return None


def _fit_time(cand, spacing, median_shape, budget, options, in_channels, num_classes,
              num_cases, probe):
    """Shrink ``cand`` until ``budget`` seconds buy ≥ TARGET_STEPS steps (predicted from
    the conv throughput, then confirmed by timing the real step); set epochs × steps."""
    from medseg.planning.probe import measure_conv_throughput

    if options.conv_gflops:
        throughput = {"gflops": options.conv_gflops, "seconds_per_step": None, "assumed": True}
    else:
        throughput = measure_conv_throughput(repeats=5, warmup=1)
    gflops = throughput["gflops"]
    scale = 1.0  # measured / predicted step time, from the probes

    def predict(c):
        work = c.flops + MEMORY_FLOP_EQUIVALENT * c.elements * c.batch
        return scale * work / (gflops * 1e9)

    n_val = round(num_cases * options.validation_fraction)  # 0: no per-epoch validation

    def validation_s(seconds_per_step):
        # per-epoch validation patches: one forward (≈ 1/3 of a step) per patch
        return seconds_per_step / 3 / cand.batch * n_val * options.validation_patches

    def steps_for(seconds_per_step, epochs_guess=20):
        available = budget - startup[0] - validation_s(seconds_per_step) * epochs_guess
        return int(available / (seconds_per_step * LOOP_OVERHEAD))

    probes = []
    startup = [0.0]  # the first epoch's tracing, paid once: from the last probe's warm-up
    for _ in range(4):
        while steps_for(predict(cand)) < TARGET_STEPS:
            smaller = _ladder(cand, spacing, median_shape, in_channels, num_classes, options.preset)
            if smaller is None:
                break
            cand = smaller
        if not probe:
            break
        warm: list[float] = []
        measured = _probe_step(cand, in_channels, num_classes, options.preset, warm)
        startup = warm or [0.0]
        probes.append({"network": cand.describe(), "seconds_per_step": measured,
                       "predicted_s": predict(cand), "tracing_s": startup[0]})
        scale *= measured / predict(cand)
        if steps_for(predict(cand)) >= TARGET_STEPS or _ladder(
            cand, spacing, median_shape, in_channels, num_classes, options.preset
        ) is None:
            break
    seconds = predict(cand)
    total = steps_for(seconds)
    if total < MIN_STEPS:
        raise PlanError(
            f"time budget {budget:g} s is too small: the smallest network ({cand.describe()}) "
            f"takes {seconds:.3g} s per step on this machine (conv3d {gflops:.0f} GFLOP/s), so "
            f"{MIN_STEPS} steps, the minimum, need ≥ {MIN_STEPS * seconds * LOOP_OVERHEAD:.0f} s "
            f"of training, plus {startup[0]:.0f} s of tracing and "
            f"{validation_s(seconds) * 20:.0f} s of per-epoch validation the budget also pays; "
            "give --time-budget more"
        )
    steps_per_epoch = max(10, min(250, math.ceil(total / 20)))
    epochs = max(1, total // steps_per_epoch)
    # the validation share with the epochs actually planned
    val_per_epoch = validation_s(seconds)
    total = int((budget - startup[0] - val_per_epoch * epochs) / (seconds * LOOP_OVERHEAD))
    epochs = max(1, total // steps_per_epoch)

    def predicted_s(n):
        return startup[0] + n * (steps_per_epoch * seconds * LOOP_OVERHEAD + val_per_epoch)

    while epochs > 1 and predicted_s(epochs) > budget:
        epochs -= 1
    predicted = predicted_s(epochs)
    record = {
        "conv_gflops": gflops,
        "conv_seconds_per_step": throughput["seconds_per_step"],
        "seconds_per_step": seconds,
        "measured": bool(probes),
        "probes": probes,
        "loop_overhead": LOOP_OVERHEAD,
        "validation_s_per_epoch": val_per_epoch,
        "tracing_s": startup[0],
    }
    why = (
        f"time budget {budget:g} s / {seconds:.3g} s per step "
        f"({'timed' if probes else 'predicted'} here, conv3d {gflops:.0f} GFLOP/s) "
        f"× overhead {LOOP_OVERHEAD}, less validation"
    )
    return cand, epochs, steps_per_epoch, predicted, record, why


def _probe_step(cand, in_channels, num_classes, preset, warmup_seconds=None) -> float:
    """Seconds of the candidate's real training step (built, compiled, warmed up)."""
    import keras

    from medseg.config import ModelConfig, TrainConfig
    from medseg.planning.probe import time_training_step
    from medseg.training import build_compiled_model, make_strategy

    model_config = ModelConfig(
        name=PRESETS[preset], depth=cand.topology.num_stages, filters=cand.widths[0],
        deep_supervision=cand.topology.num_stages >= 4,
    )
    names = ["background"] + [f"class{i}" for i in range(1, num_classes)]
    keras.backend.clear_session()
    model = build_compiled_model(
        model_config, TrainConfig(), names, in_channels, make_strategy("default"),
        topology=cand.topology, widths=cand.widths,
    )
    seconds = time_training_step(model, cand.patch, cand.batch, steps=3, warmup=2,
                                 max_seconds=20.0, warmup_seconds=warmup_seconds)
    del model
    keras.backend.clear_session()
    return seconds


# -- caching and explaining ----------------------------------------------------------------


def cache_path(directory: str | Path, dataset: str, fingerprint_hash: str, options: PlanOptions,
               device: str) -> Path:
    """Where the plan of these inputs on this machine is cached beside the dataset."""
    key = json.dumps(
        {"dataset": dataset, "fingerprint": fingerprint_hash, "options": options.__dict__,
         "machine": machine_id(device), "version": PLAN_VERSION,
         "planner": PLANNER_REVISION},
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(directory) / "plans" / f"plan-{digest}.json"


def explain(plan: ExperimentPlan) -> str:
    """The plan as a table: key, value, the rule that set it and the numbers it used."""
    rows = [(d.key, _short(d.value), d.rule, _short(d.inputs) if d.inputs else "") for d in plan.decisions]
    width = max(len(r[0]) for r in rows)
    vwidth = min(max(len(r[1]) for r in rows), 28)
    lines = [f"plan of {plan.dataset} ({plan.device}, preset {plan.preset})"]
    lines.append(f"{'key':{width}s}  {'value':{vwidth}s}  rule")
    for key, value, rule, inputs in rows:
        lines.append(f"{key:{width}s}  {value:{vwidth}s}  {rule}")
        if inputs:
            lines.append(f"{'':{width}s}  {'':{vwidth}s}    from {inputs}")
    lines.append(
        f"network: strides {[list(s) for s in plan.strides]}, kernels "
        f"{[list(k) for k in plan.kernels]}, widths {list(plan.widths)}, "
        f"{plan.parameters / 1e6:.2f} M parameters, {plan.flops_per_step / 1e9:.1f} GFLOP per step"
    )
    if plan.probe and plan.predicted_train_s is not None:
        p = plan.probe
        lines.append(
            f"probe: conv3d {p['conv_gflops']:.1f} GFLOP/s, {p['seconds_per_step']:.3f} s per "
            f"step ({'timed' if p['measured'] else 'predicted'}); {plan.total_steps} steps, "
            f"predicted training {plan.predicted_train_s:.0f} s of {plan.time_budget_s:.0f} s"
        )
    return "\n".join(lines)


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_short(v)}" for k, v in value.items())
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return str(value)


def format_plan(plan) -> str:
    """The plan's main numbers in a few lines (``--explain`` prints every rule)."""
    lines = [
        f"plan of {plan.dataset} ({plan.device}, preset {plan.preset}, {plan.model})",
        f"  spacing {format_numbers(plan.target_spacing)} mm, median shape "
        f"{format_numbers(plan.median_shape, '{:.0f}')}, normalize {plan.normalize}",
        f"  patch {format_numbers(plan.patch_size, '{:d}')}, batch {plan.batch_size}, "
        f"{plan.num_stages} stages, widths {list(plan.widths)}",
        f"  strides {[list(s) for s in plan.strides]}",
        f"  kernels {[list(k) for k in plan.kernels]}",
        f"  {plan.epochs} epochs × {plan.steps_per_epoch} steps; memory "
        f"{plan.memory_bytes / 1e9:.2f} GB of {plan.memory_budget_bytes / 1e9:.1f} GB",
    ]
    if plan.probe:
        line = (
            f"  {plan.probe['seconds_per_step']:.3f} s/step on this machine (conv3d "
            f"{plan.probe['conv_gflops']:.1f} GFLOP/s)"
        )
        if plan.predicted_train_s is not None and plan.time_budget_s is not None:
            line += f": training {plan.predicted_train_s:.0f} s of a {plan.time_budget_s:.0f} s budget"
        lines.append(line)
    return "\n".join(lines)
