"""nnU-Net's planning rules as plain functions over numbers.

Each function takes what a dataset fingerprint says (spacings, shapes, voxel counts) and
returns one decision: the target spacing, the network topology for a patch, the initial
patch, the batch size, the normalisation. They know nothing about TensorFlow or the
machine; :mod:`medseg.planning.planner` chains them and adds the time budget.

Axes are in array order (for CT: slices first). Facts checked against nnU-Net v2's
``default_experiment_planner.py`` and ``network_topology.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ANISOTROPY_RATIO",
    "MIN_FEATURE_MAP",
    "Topology",
    "batch_size",
    "bias_field_pedestal",
    "bias_field_probability",
    "initial_patch",
    "mirror_axes",
    "normalization_scheme",
    "resampled_shape",
    "shrink_axis",
    "stage_widths",
    "target_spacing",
    "topology",
]

ANISOTROPY_RATIO = 3.0  # coarse axis > 3 × the others: nnU-Net's anisotropy
MIN_FEATURE_MAP = 4  # an axis is pooled only while its feature map stays ≥ this
MAX_FEATURES = {2: 512, 3: 320}
BASE_FEATURES = 32


def target_spacing(
    spacings: np.ndarray, shapes: np.ndarray, ratio: float = ANISOTROPY_RATIO
) -> tuple[tuple[float, ...], str]:
    """The spacing every case is resampled to, and why.

    The per-axis median of the cases' spacings. Where the coarsest axis's median is more
    than ``ratio`` × the largest of the others and its median size × ``ratio`` is below
    the smallest other median size (a few thick slices of a fine in-plane grid), that axis
    takes its 10th percentile instead, never finer than the largest other spacing
    (nnU-Net's rule: fewer interpolated slices, less blur).

    Parameters
    ----------
    spacings : np.ndarray
        ``(cases, ndim)`` voxel spacings in mm.
    shapes : np.ndarray
        ``(cases, ndim)`` voxel counts.
    ratio : float
        The anisotropy threshold.

    Returns
    -------
    spacing : tuple of float
    rule : str
        "median", or "anisotropic: axis k at its 10th percentile".
    """
    spacings = np.asarray(spacings, np.float64)
    shapes = np.asarray(shapes, np.float64)
    median = np.median(spacings, axis=0)
    median_shape = np.median(shapes, axis=0)
    worst = int(np.argmax(median))
    others = [a for a in range(len(median)) if a != worst]
    if not others:
        return tuple(float(s) for s in median), "median"
    coarse = median[worst] > ratio * max(median[others])
    few = median_shape[worst] * ratio < min(median_shape[others])
    if coarse and few:
        spacing = median.copy()
        spacing[worst] = max(np.percentile(spacings[:, worst], 10), max(median[others]))
        return (
            tuple(float(s) for s in spacing),
            f"anisotropic: axis {worst} at its 10th percentile (median {median[worst]:.3g} mm "
            f"> {ratio:g} × {max(median[others]):.3g} mm, {median_shape[worst]:.0f} voxels)",
        )
    return tuple(float(s) for s in median), "median of the cases' spacings"


def resampled_shape(shapes: np.ndarray, spacings: np.ndarray, spacing: Sequence[float]):
    """Per-case shapes after resampling to ``spacing`` (nnU-Net's rounding, ≥ 1)."""
    shapes = np.asarray(shapes, np.float64)
    spacings = np.asarray(spacings, np.float64)
    return np.maximum(np.round(shapes * spacings / np.asarray(spacing, np.float64)), 1)


@dataclass(frozen=True)
class Topology:
    """Per-stage pooling and kernels of a U-Net for one patch.

    Attributes
    ----------
    strides : tuple of tuple of int
        One per stage; stage 0's is all ones (no pooling before the first stage), stage
        ``s > 0`` down-samples by ``strides[s]`` per axis on entry.
    kernels : tuple of tuple of int
        Convolution kernel per stage and axis (1 along an axis still much coarser).
    """

    strides: tuple[tuple[int, ...], ...]
    kernels: tuple[tuple[int, ...], ...]

    @property
    def num_stages(self) -> int:
        return len(self.strides)

    @property
    def divisor(self) -> tuple[int, ...]:
        """Per-axis total stride: every patch size must be a multiple of it."""
        return tuple(int(np.prod([s[a] for s in self.strides])) for a in range(self.ndim))

    @property
    def ndim(self) -> int:
        return len(self.strides[0])

    def to_dict(self) -> dict:
        return {"strides": [list(s) for s in self.strides], "kernels": [list(k) for k in self.kernels]}


def topology(
    spacing: Sequence[float],
    patch: Sequence[int],
    max_stages: int | None = None,
    min_feature_map: int = MIN_FEATURE_MAP,
) -> tuple[Topology, tuple[int, ...]]:
    """Pooling and kernels per stage for ``patch`` at ``spacing``; the patch made divisible.

    Stage by stage an axis is pooled (×2) while its feature map stays ≥ ``min_feature_map``
    after pooling and its current spacing is below 2 × the finest current spacing of the
    poolable axes; a lone poolable axis needs ≥ 3 × ``min_feature_map``. A kernel becomes
    3 along an axis once its spacing is within 2 × the finest, and stays 3; the
    bottleneck has 3 everywhere. Pooled axes double their spacing and halve their size.

    Parameters
    ----------
    spacing : sequence of float
        Target spacing in mm, array order.
    patch : sequence of int
        Candidate patch size.
    max_stages : int, optional
        Stop pooling after this many stages (e.g. a config's ``model.depth``).
    min_feature_map : int

    Returns
    -------
    Topology
    patch : tuple of int
        ``patch`` rounded up to a multiple of the topology's total stride per axis.
    """
    ndim = len(spacing)
    current_spacing = [float(s) for s in spacing]
    size = [float(p) for p in patch]
    strides = [(1,) * ndim]
    kernels: list[tuple[int, ...]] = []
    kernel = [1] * ndim
    while max_stages is None or len(strides) < max_stages:
        valid = [a for a in range(ndim) if size[a] >= 2 * min_feature_map]
        if not valid:
            break
        finest = min(current_spacing[a] for a in valid)
        valid = [a for a in valid if current_spacing[a] / finest < 2]
        if len(valid) == 1 and size[valid[0]] < 3 * min_feature_map:
            break
        if not valid:
            break
        smallest = min(current_spacing)
        for a in range(ndim):
            if kernel[a] != 3 and current_spacing[a] / smallest < 2:
                kernel[a] = 3
        kernels.append(tuple(kernel))
        stride = [1] * ndim
        for a in valid:
            stride[a] = 2
            current_spacing[a] *= 2
            size[a] = np.ceil(size[a] / 2)
        strides.append(tuple(stride))
    kernels.append((3,) * ndim)  # the bottleneck
    topo = Topology(tuple(strides), tuple(kernels))
    divisor = topo.divisor
    padded = tuple(int(-(-int(p) // d) * d) for p, d in zip(patch, divisor, strict=True))
    return topo, padded


def stage_widths(num_stages: int, ndim: int = 3, base: int = BASE_FEATURES) -> tuple[int, ...]:
    """Filters per stage: ``base`` doubling per stage, capped at 320 (3D) / 512 (2D)."""
    cap = MAX_FEATURES[ndim]
    return tuple(min(base * 2**s, cap) for s in range(num_stages))


def initial_patch(spacing: Sequence[float], median_shape: Sequence[float], ndim: int = 3):
    """nnU-Net's starting patch: aspect ratio 1/spacing, the volume of 256³ (2D: 2048²),
    clipped to the median shape after resampling."""
    inverse = 1.0 / np.asarray(spacing, np.float64)
    volume = 256.0**3 if ndim == 3 else 2048.0**2
    patch = inverse * (volume / np.prod(inverse)) ** (1.0 / ndim)
    patch = np.minimum(np.round(patch), np.asarray(median_shape, np.float64))
    return tuple(max(int(p), 1) for p in patch)


def shrink_axis(patch: Sequence[int], median_shape: Sequence[float]) -> int:
    """The axis to shrink next: the patch's largest relative to the median shape."""
    ratios = np.asarray(patch, np.float64) / np.maximum(np.asarray(median_shape, np.float64), 1)
    return int(np.argmax(ratios))


def batch_size(
    reference: float,
    estimate: float,
    patch: Sequence[int],
    dataset_voxels: float,
    reference_batch: int = 2,
    max_share: float | None = 0.05,
    minimum: int = 2,
) -> tuple[int, str]:
    """nnU-Net's batch: the reference batch scaled by reference / estimate memory, capped
    so one batch covers ≤ ``max_share`` of the dataset's voxels, never below ``minimum``.

    Rounded down (nnU-Net rounds to nearest), so the estimate stays within the budget."""
    batch = int(reference_batch * reference / max(estimate, 1.0))
    rule = f"{reference_batch} × memory reference / estimate = {batch}"
    if max_share is not None:
        cap = int(round(dataset_voxels * max_share / float(np.prod(patch))))
        if cap < batch:
            batch = cap
            rule += f", capped at {max_share:.0%} of the dataset's voxels ({cap})"
    if batch < minimum:
        rule += f", raised to the minimum {minimum}"
    return max(batch, minimum), rule


# half the MR patches: a model trained on one scanner meets every other scanner's field
# (Colin27 lobes to an altered copy, min lobe Dice: 0.73 at 0.3, 0.75 at 0.5)
MR_BIAS_FIELD_PROBABILITY = 0.5


def _non_ct(modalities) -> list[str]:
    """The channels that are not CT (MR: arbitrary units, a coil bias field)."""
    return [m for m in modalities if m.strip().upper() != "CT"]


def bias_field_probability(modalities) -> tuple[float, str]:
    """``(augment.bias_field_probability, why)`` from the channels' modalities.

    CT has no coil bias (HU are physical): 0. Any other channel (MR) varies by a smooth
    multiplicative field between scanners, coils and sessions that per-image z-scoring
    cannot undo; training under random fields (TorchIO's RandomBiasField) lets a model
    trained on one scanner's images read another's.
    """
    mr = _non_ct(modalities)
    if not mr:
        return 0.0, "CT: no coil bias field (HU are physical)"
    return (
        MR_BIAS_FIELD_PROBABILITY,
        f"{mr[0] or 'non-CT'}: smooth coil-bias fields differ between scanners; train "
        "under random ones (TorchIO's RandomBiasField)",
    )


def normalization_scheme(modality: str, nonzero_share: float | None = None) -> tuple[str, bool, str]:
    """``(preprocess.normalize, crop_to_nonzero, why)`` for one channel's modality.

    CT: intensities are physical (HU), so the dataset's foreground statistics
    ("ct": clip to its 0.5/99.5 % percentiles, z-score with its mean/std). Other
    modalities have arbitrary scanner units: z-score per image, cropped to the non-zero
    region (skull-stripped MR keeps 0 outside the brain).
    """
    if modality.strip().upper() == "CT":
        return "ct", False, "CT: clip to the foreground's 0.5/99.5 %, z-score with its mean/std"
    return (
        "image",
        True,
        f"{modality or 'non-CT'}: per-image z-score (arbitrary scanner units), crop to non-zero",
    )


# classes whose centres lie, on average, this many foreground standard deviations from the
# foreground's centre along an axis are laid out along it (class_layout)
LAYOUT_LIMIT = 0.5
# the bias field's pivot, as a share of the patch's range below its darkest value, for MR:
# a scanner's offset may be as large as its signal or larger (Colin27's altered copy: ~1),
# so the draw reaches twice the signal's range, not only its edge
MR_BIAS_PEDESTAL = (0.0, 2.0)


def mirror_axes(median, ndim: int) -> tuple[tuple[int, ...], str]:
    """``(augment.flip_axes, why)`` from the median over cases of the fingerprint's class
    layouts (one value per axis).

    nnU-Net mirrors every axis. Where the classes are laid out along an axis (the median
    case's :func:`~medseg.datasets.fingerprint.class_layout` ≥ :data:`LAYOUT_LIMIT`:
    brain lobes front to back), a mirrored patch shows an anatomy no scan has (the
    occipital lobe in front), and learning both orientations costs a short schedule much
    of its steps (Colin27 lobes, 627 steps: training loss 0.62 mirrored on all axes, 0.39
    mirrored left-right only). Bilateral and single-structure labels (kidneys, tumours)
    keep every axis. ``median`` None (an older fingerprint): every axis.
    """
    every = tuple(range(ndim))
    if median is None:
        return every, "every axis (nnU-Net; the fingerprint has no class layout: rebuild)"
    axes = tuple(a for a in every if median[a] < LAYOUT_LIMIT)
    shown = [round(float(v), 2) for v in median]
    if axes == every:
        return every, (
            f"every axis (nnU-Net): the classes are laid out along none (median class "
            f"layout {shown} < {LAYOUT_LIMIT})"
        )
    dropped = [a for a in every if a not in axes]
    return axes, (
        f"not axis {', '.join(map(str, dropped))}: the classes are laid out along it (median "
        f"class layout {shown}, ≥ {LAYOUT_LIMIT}): mirrored, a patch shows no real anatomy"
    )


def bias_field_pedestal(modalities) -> tuple[tuple[float, float], str]:
    """``(augment.bias_field_pedestal, why)``: MR draws the field's pivot up to two signal
    ranges below the darkest value (a scanner's pedestal under the signal, scaled by the
    coil field with it); CT has no field."""
    if not _non_ct(modalities):
        return (0.0, 0.0), "CT: no bias field"
    return MR_BIAS_PEDESTAL, (
        "MR: a signal pedestal (offset) is scaled by the coil field too; per-image z-scoring "
        "hides the pedestal, not its scaled share: pivot up to two signal ranges below the "
        "darkest value"
    )
