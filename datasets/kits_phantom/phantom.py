"""A KiTS19-like abdominal CT phantom with kidney and tumour labels, in plain numpy.

Every case is a deterministic function of its seed. Anatomy is laid out relative to the
in-plane field of view (so any matrix size works) and varies per case in position, size
and a slight rotation:

* air (-1000 HU) outside an elliptic body of soft tissue (40 HU) with a subcutaneous
  fat ring (-100 HU);
* a vertebra (700 HU), posterior-centre, with its spinous process;
* two contrast-enhanced kidneys (150 HU), ellipsoids left and right of the spine and
  posterior, each wrapped in perirenal fat (-100 HU);
* in about 80 % of cases one or two tumours (90 HU plus a smooth blob texture of
  higher amplitude) inside a kidney, sometimes bulging out of it;
* Gaussian noise (sigma 15 HU) everywhere.

:class:`PhantomSpec` has knobs for a harder variant, all off by default: irregular
kidney outlines, renal sinus fat at each kidney's hilum (a C-shaped kidney in axial
slices), tumour intensity and texture (e.g. slightly darker than the kidney), tumour
size, a smooth multiplicative bias field, besides the tumour probability and the noise.
Their random draws come from their own ``SeedSequence`` children and happen only when a
knob is on, so the default cases are unchanged and each knob toggles independently.

Arrays are (slices, rows, cols) as in KiTS19: rows run anterior to posterior, slices
run along the body axis. Labels are 0 background, 1 kidney, 2 tumour (tumour overrides
kidney).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "CLASS_NAMES",
    "HU",
    "PhantomSpec",
    "make_case",
]

CLASS_NAMES = ("background", "kidney", "tumour")
BACKGROUND, KIDNEY, TUMOUR = 0, 1, 2

# nominal Hounsfield units of each tissue
HU = {
    "air": -1000.0,
    "fat": -100.0,
    "soft_tissue": 40.0,
    "bone": 700.0,
    "kidney": 150.0,
    "tumour": 90.0,
}
TUMOUR_TEXTURE_HU = 25.0  # std of the tumour's smooth blob texture

# in-plane tissue classes of the z-invariant body cross-section
_AIR, _FAT, _SOFT, _BONE = 0, 1, 2, 3
_SLAB = 32  # slices rendered at a time: bounds the float32 working memory


@dataclasses.dataclass(frozen=True)
class PhantomSpec:
    """Size and variability of phantom cases.

    Attributes
    ----------
    inplane : int
        Rows and columns of every slice.
    z_extent_mm : tuple of float
        Range of the scan length along the body axis; slices = extent / slice spacing.
    slice_spacing_mm : tuple of float
        Range of the slice spacing (uniform).
    inplane_spacing_mm : tuple of float
        Range of the in-plane pixel spacing (uniform; rows and cols share it).
    tumour_probability : float
        Probability that a case has tumours (one, or two with probability 0.3).
    noise_sigma : float
        Standard deviation of the Gaussian noise in HU.
    tumour_hu : float
        Mean tumour intensity in HU (the kidney is ``HU["kidney"]``, 150 HU).
    tumour_texture_hu : float
        Standard deviation of the tumour's smooth blob texture in HU.
    tumour_size : tuple of float
        Range of a tumour's in-plane radius as a fraction of its kidney's smaller
        in-plane semi-axis.
    kidney_shape_noise : float
        Amplitude of the kidney's irregular outline: the surface moves in and out by this
        fraction of the normalised radius times a smooth unit-std random field (blobs
        about a third of the semi-axes); 0 keeps kidneys ellipsoids.
    renal_sinus_size : tuple of float
        Range of the renal sinus' semi-axes as fractions of its kidney's in-plane
        semi-axes (along the body axis: the upper end plus 0.1). The sinus is an
        ellipsoid of fat (-100 HU, label background) in each kidney that reaches out of
        its medial surface towards the spine, so the kidney is a C-shape in axial
        slices. ``(0, 0)`` paints no sinus.
    bias_field : float
        RMS of a smooth multiplicative intensity field: intensities become
        ``(HU + 1000) * (1 + bias_field * field) - 1000`` before the noise, so air stays
        -1000 HU and soft tissue varies by about ``1040 * bias_field`` HU RMS. The field
        is a sum of six random plane waves of 1.5-4 fields of view wavelength, different
        per case; 0 turns it off.
    """

    inplane: int = 128
    z_extent_mm: tuple[float, float] = (115.0, 125.0)
    slice_spacing_mm: tuple[float, float] = (2.5, 5.0)
    inplane_spacing_mm: tuple[float, float] = (0.6, 0.9)
    tumour_probability: float = 0.8
    noise_sigma: float = 15.0
    tumour_hu: float = HU["tumour"]
    tumour_texture_hu: float = TUMOUR_TEXTURE_HU
    tumour_size: tuple[float, float] = (0.5, 0.95)
    kidney_shape_noise: float = 0.0
    renal_sinus_size: tuple[float, float] = (0.0, 0.0)
    bias_field: float = 0.0

    def __post_init__(self):
        if self.inplane < 8:
            raise ValueError(f"inplane must be at least 8, got {self.inplane}")
        for name in ("z_extent_mm", "slice_spacing_mm", "inplane_spacing_mm"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"{name} must be a range 0 < low <= high, got {(low, high)}")
        if not 0.0 <= self.tumour_probability <= 1.0:
            raise ValueError(f"tumour_probability must be in [0, 1], got {self.tumour_probability}")
        low, high = self.tumour_size
        if not 0 < low <= high:
            raise ValueError(f"tumour_size must be a range 0 < low <= high, got {(low, high)}")
        low, high = self.renal_sinus_size
        if not (low == high == 0 or 0 < low <= high < 1):
            raise ValueError(
                f"renal_sinus_size must be (0, 0) or a range 0 < low <= high < 1, got {(low, high)}"
            )
        for name in ("noise_sigma", "tumour_texture_hu", "kidney_shape_noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.bias_field < 0.5:
            raise ValueError(f"bias_field must be in [0, 0.5), got {self.bias_field}")


@dataclasses.dataclass(frozen=True)
class _Ellipsoid:
    """Ellipsoid in mm: centre (z, y, x), semi-axes (z, u, v), in-plane angle of u from y."""

    centre: tuple[float, float, float]
    semi_axes: tuple[float, float, float]
    angle: float


def make_case(
    seed: int | Sequence[int], spec: PhantomSpec | None = None
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Generate one phantom CT case.

    Parameters
    ----------
    seed : int or sequence of int
        Entropy for ``np.random.SeedSequence``; e.g. ``(dataset_seed, case_index)``.
    spec : PhantomSpec, optional
        Matrix size and ranges of spacing and scan length; default ``PhantomSpec()``.

    Returns
    -------
    image : np.ndarray
        ``(slices, inplane, inplane)`` int16 Hounsfield units.
    label : np.ndarray
        Same shape, uint8: 0 background, 1 kidney, 2 tumour.
    spacing : tuple of float
        ``(slice, row, col)`` spacing in mm, rounded to 4 decimals.
    """
    spec = PhantomSpec() if spec is None else spec
    # children 0 and 1 are the original streams; the hard knobs' draws come from child 2
    # (one grandchild per knob), and only when the knob is on
    anatomy_seq, noise_seq, knob_seq = np.random.SeedSequence(seed).spawn(3)
    shape_seq, sinus_seq, bias_seq = knob_seq.spawn(3)
    rng = np.random.default_rng(anatomy_seq)

    n = spec.inplane
    pixel = round(float(rng.uniform(*spec.inplane_spacing_mm)), 4)
    slice_mm = round(float(rng.uniform(*spec.slice_spacing_mm)), 4)
    extent = float(rng.uniform(*spec.z_extent_mm))
    num_slices = max(1, int(round(extent / slice_mm)))
    extent = num_slices * slice_mm
    half_fov = n * pixel / 2.0  # anatomy sizes are fractions of this

    # voxel-centre coordinates in mm: z from the first slice, y/x from the grid centre
    axis = (np.arange(n, dtype=np.float32) + 0.5 - n / 2) * np.float32(pixel)
    y2, x2 = axis[:, None], axis[None, :]

    # body frame: centre offset and a slight rotation of the whole cross-section
    theta = np.deg2rad(rng.uniform(-6.0, 6.0))
    cy, cx = rng.uniform(-0.04, 0.04, size=2) * half_fov
    body_a = rng.uniform(0.60, 0.70) * half_fov  # anterior-posterior semi-axis
    body_b = rng.uniform(0.82, 0.92) * half_fov  # left-right semi-axis
    fat = rng.uniform(0.05, 0.09) * half_fov

    def to_world(u, v):
        """Body-frame (u posterior, v lateral) mm to world (y, x) mm."""
        c, s = np.cos(theta), np.sin(theta)
        return cy + c * u - s * v, cx + s * u + c * v

    tissue = np.full((n, n), _AIR, dtype=np.uint8)
    tissue[_ellipse(y2, x2, (cy, cx), (body_a, body_b), theta) <= 1] = _FAT
    tissue[_ellipse(y2, x2, (cy, cx), (body_a - fat, body_b - fat), theta) <= 1] = _SOFT
    spine_r = rng.uniform(0.09, 0.12) * half_fov
    spine_u = 0.6 * body_a
    spine = to_world(spine_u, 0.0)
    tissue[_ellipse(y2, x2, spine, (spine_r, spine_r), theta) <= 1] = _BONE
    process = to_world(spine_u + spine_r + 0.06 * half_fov, 0.0)
    tissue[_ellipse(y2, x2, process, (0.07 * half_fov, 0.025 * half_fov), theta) <= 1] = _BONE
    base = np.array([HU["air"], HU["fat"], HU["soft_tissue"], HU["bone"]], np.float32)[tissue]

    kidneys = []
    for side in (-1.0, 1.0):
        u = rng.uniform(0.18, 0.28) * half_fov
        v = side * rng.uniform(0.38, 0.46) * half_fov
        semi = (
            rng.uniform(0.45, 0.60) * half_fov,  # along the body axis
            rng.uniform(0.20, 0.26) * half_fov,  # roughly anterior-posterior
            rng.uniform(0.15, 0.20) * half_fov,  # roughly left-right
        )
        # kidneys lie obliquely: the in-plane long axis is tilted, mirrored per side
        tilt = side * np.deg2rad(rng.uniform(15.0, 35.0))
        centre = (rng.uniform(0.35, 0.65) * extent, *to_world(u, v))
        kidneys.append(_Ellipsoid(centre, semi, theta + tilt))

    tumours = []
    if rng.random() < spec.tumour_probability:
        for _ in range(1 if rng.random() < 0.7 else 2):
            tumours.append(_sample_tumour(rng, kidneys[int(rng.integers(2))], spec.tumour_size))

    spacing = (slice_mm, pixel, pixel)
    shape = (num_slices, n, n)
    # paint order: perirenal fat, kidneys, tumours; each only where the tissue allows
    painters = []
    for kidney in kidneys:
        margin = rng.uniform(0.03, 0.05) * half_fov
        wrap = _Ellipsoid(
            kidney.centre,
            (kidney.semi_axes[0] + 1.5 * margin, *(s + margin for s in kidney.semi_axes[1:])),
            kidney.angle,
        )
        painters.append(_paint(wrap, shape, spacing, tissue == _SOFT, HU["fat"], None))
    inside = (tissue == _SOFT) | (tissue == _FAT)
    if spec.kidney_shape_noise > 0:
        shape_rng = np.random.default_rng(shape_seq)
        for kidney in kidneys:
            painters.append(
                _paint_irregular(kidney, shape_rng, spec.kidney_shape_noise, shape, spacing, inside)
            )
    else:
        for kidney in kidneys:
            painters.append(_paint(kidney, shape, spacing, inside, HU["kidney"], KIDNEY))
    if spec.renal_sinus_size[1] > 0:
        sinus_rng = np.random.default_rng(sinus_seq)
        for kidney in kidneys:
            sinus = _sample_sinus(sinus_rng, kidney, spine, spec.renal_sinus_size)
            painters.append(_paint(sinus, shape, spacing, inside, HU["fat"], BACKGROUND))
    for ellipsoid, texture_seed in tumours:
        painters.append(
            _paint_tumour(
                ellipsoid,
                texture_seed,
                shape,
                spacing,
                inside,
                spec.tumour_hu,
                spec.tumour_texture_hu,
            )
        )
    bias = None
    if spec.bias_field > 0:
        bias = _sample_bias(np.random.default_rng(bias_seq), 2.0 * half_fov, spec.bias_field)

    image = np.empty(shape, dtype=np.int16)
    label = np.zeros(shape, dtype=np.uint8)
    noise_rng = np.random.default_rng(noise_seq)
    for z0 in range(0, num_slices, _SLAB):
        z1 = min(z0 + _SLAB, num_slices)
        slab = np.repeat(base[None], z1 - z0, axis=0)
        for box, mask, values, value_label in painters:
            lo, hi = max(z0, box[0].start), min(z1, box[0].stop)
            if lo >= hi:
                continue
            part = (slice(lo - z0, hi - z0), box[1], box[2])
            m = mask[lo - box[0].start : hi - box[0].start]
            v = values if np.isscalar(values) else values[lo - box[0].start : hi - box[0].start][m]
            slab[part][m] = v
            if value_label is not None:
                label[(slice(lo, hi), box[1], box[2])][m] = value_label
        if bias is not None:
            z = (np.arange(z0, z1, dtype=np.float32) + 0.5) * np.float32(slice_mm)
            slab += np.float32(-HU["air"])
            slab *= _bias_gain(bias, z, axis)
            slab += np.float32(HU["air"])
        slab += noise_rng.standard_normal(slab.shape, dtype=np.float32) * np.float32(
            spec.noise_sigma
        )
        np.rint(slab, out=slab)
        np.clip(slab, -32768, 32767, out=slab)
        image[z0:z1] = slab
    return image, label, spacing


def _ellipse(y, x, centre, semi_axes, angle):
    """Normalised squared distance of grid points to a rotated 2-D ellipse (<= 1 inside)."""
    dy, dx = y - np.float32(centre[0]), x - np.float32(centre[1])
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    u = c * dy + s * dx
    v = -s * dy + c * dx
    return (u / np.float32(semi_axes[0])) ** 2 + (v / np.float32(semi_axes[1])) ** 2


def _box(ellipsoid: _Ellipsoid, shape, spacing, pad: float = 1.0):
    """Voxel bounding box (slices) of an ellipsoid, clipped to the volume, or None."""
    cz, cy, cx = ellipsoid.centre
    a, b, c = ellipsoid.semi_axes
    cos, sin = abs(np.cos(ellipsoid.angle)), abs(np.sin(ellipsoid.angle))
    half = (a * pad, np.hypot(b * cos, c * sin) * pad, np.hypot(b * sin, c * cos) * pad)
    n = shape[1]
    offsets = (0.0, n / 2, n / 2)  # voxel index of coordinate 0 (z: first slice edge)
    box = []
    for centre, h, step, size, offset in zip(
        (cz, cy, cx), half, spacing, shape, offsets, strict=True
    ):
        lo = int(np.floor((centre - h) / step + offset)) - 1
        hi = int(np.ceil((centre + h) / step + offset)) + 1
        lo, hi = max(lo, 0), min(hi, size)
        if lo >= hi:
            return None
        box.append(slice(lo, hi))
    return tuple(box)


def _distance(ellipsoid: _Ellipsoid, box, shape, spacing):
    """Normalised squared distance to ``ellipsoid`` over the voxels of ``box``."""
    n = shape[1]
    z = (np.arange(box[0].start, box[0].stop, dtype=np.float32) + 0.5) * spacing[0]
    y = (np.arange(box[1].start, box[1].stop, dtype=np.float32) + 0.5 - n / 2) * spacing[1]
    x = (np.arange(box[2].start, box[2].stop, dtype=np.float32) + 0.5 - n / 2) * spacing[2]
    cz, cy, cx = (np.float32(c) for c in ellipsoid.centre)
    dz, dy, dx = (z - cz)[:, None, None], (y - cy)[None, :, None], (x - cx)[None, None, :]
    c, s = np.float32(np.cos(ellipsoid.angle)), np.float32(np.sin(ellipsoid.angle))
    a, b, w = (np.float32(v) for v in ellipsoid.semi_axes)
    u = c * dy + s * dx
    v = -s * dy + c * dx
    return (dz / a) ** 2 + (u / b) ** 2 + (v / w) ** 2


def _paint(ellipsoid, shape, spacing, allowed, value, value_label):
    """Painter (box, mask, value, label) of a uniform ellipsoid restricted to ``allowed``."""
    box = _box(ellipsoid, shape, spacing)
    if box is None:
        return _empty_painter()
    mask = _distance(ellipsoid, box, shape, spacing) <= 1.0
    mask &= allowed[box[1], box[2]][None]
    return box, mask, np.float32(value), value_label


def _paint_irregular(kidney, rng, amplitude, shape, spacing, allowed):
    """Painter of a kidney whose surface moves in and out with a smooth random field."""
    box = _box(kidney, shape, spacing, pad=1.0 + 2.0 * amplitude)
    if box is None:
        return _empty_painter()
    size = tuple(b.stop - b.start for b in box)
    sigma = [
        max(semi / step / 3.0, 0.5) for semi, step in zip(kidney.semi_axes, spacing, strict=True)
    ]
    field = _smooth_noise(rng, size, sigma)
    mask = np.sqrt(_distance(kidney, box, shape, spacing)) + np.float32(amplitude) * field <= 1.0
    mask &= allowed[box[1], box[2]][None]
    return box, mask, np.float32(HU["kidney"]), KIDNEY


def _sample_sinus(rng, kidney: _Ellipsoid, spine, size):
    """The renal sinus of ``kidney``: a fat ellipsoid at its medial side, towards ``spine``.

    Its in-plane semi-axes are fractions in ``size`` of the kidney's; it is centred on the
    ray from the kidney's centre towards the spine (``spine`` is its world (y, x) in mm),
    half of its extent along that ray inside the kidney, so it opens out of the medial
    surface (the hilum). Along the body axis it spans a fraction of the kidney's length.
    """
    kz, ku, kv = kidney.semi_axes
    su, sv = ku * rng.uniform(*size), kv * rng.uniform(*size)
    sz = kz * rng.uniform(size[0] + 0.1, size[1] + 0.1)
    dz = kz * rng.uniform(-0.1, 0.1)
    c, s = np.cos(kidney.angle), np.sin(kidney.angle)
    dy, dx = spine[0] - kidney.centre[1], spine[1] - kidney.centre[2]
    mu, mv = c * dy + s * dx, -s * dy + c * dx  # the medial direction in the kidney frame
    norm = np.hypot(mu, mv)
    mu, mv = mu / norm, mv / norm
    surface = 1.0 / np.hypot(mu / ku, mv / kv)  # kidney centre to its surface along it
    extent = 1.0 / np.hypot(mu / su, mv / sv)  # sinus centre to its surface along it
    reach = surface - 0.5 * extent
    offset_u, offset_v = reach * mu, reach * mv
    centre = (
        kidney.centre[0] + dz,
        kidney.centre[1] + c * offset_u - s * offset_v,
        kidney.centre[2] + s * offset_u + c * offset_v,
    )
    return _Ellipsoid(centre, (sz, su, sv), kidney.angle)


def _sample_bias(rng, fov, amplitude, waves: int = 6):
    """Plane waves (wave vectors in rad/mm, phases, weights) of a smooth bias field.

    Wavelengths are 1.5-4 fields of view in random 3-D directions; the weights make the
    field's RMS ``amplitude`` (for independent phases).
    """
    direction = rng.normal(size=(waves, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    wavelength = rng.uniform(1.5, 4.0, size=(waves, 1)) * fov
    vectors = 2 * np.pi * direction / wavelength
    phases = rng.uniform(0.0, 2 * np.pi, size=waves)
    weights = rng.normal(size=waves)
    weights *= amplitude / np.sqrt(np.sum(weights**2) / 2)
    return vectors, phases, weights


def _bias_gain(bias, z, axis):
    """``1 + field`` over the slab of slice coordinates ``z`` (mm) and in-plane ``axis``."""
    vectors, phases, weights = bias
    gain = np.ones((z.size, axis.size, axis.size), dtype=np.float32)
    for (kz, ky, kx), phase, weight in zip(vectors, phases, weights, strict=True):
        arg = (np.float32(kz) * z + np.float32(phase))[:, None, None] + (
            (np.float32(ky) * axis)[:, None] + (np.float32(kx) * axis)[None, :]
        )[None]
        gain += np.float32(weight) * np.cos(arg)
    return gain


def _sample_tumour(rng: np.random.Generator, kidney: _Ellipsoid, size=(0.5, 0.95)):
    """A tumour ellipsoid in ``kidney`` and the seed of its texture.

    In-plane radii are a fraction in ``size`` (default 50-95 %) of the kidney's smaller
    in-plane semi-axis; along the body
    axis 30-50 % of the kidney's length, so a tumour spans several slices even at 5 mm
    (KiTS19's tumours are large: a median diameter near 4 cm beside an 11 cm kidney).
    The centre lies at 0-45 % of the way to the kidney's surface, so large, eccentric
    tumours bulge out of it.
    """
    fraction = rng.uniform(*size)
    kz, ku, kv = kidney.semi_axes
    radius = fraction * min(ku, kv)
    semi = (
        kz * rng.uniform(0.3, 0.5),
        radius * rng.uniform(0.85, 1.15),
        radius * rng.uniform(0.85, 1.15),
    )
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    offset = direction * rng.uniform(0.0, 0.45) * np.array(kidney.semi_axes)
    c, s = np.cos(kidney.angle), np.sin(kidney.angle)
    centre = (
        kidney.centre[0] + offset[0],
        kidney.centre[1] + c * offset[1] - s * offset[2],
        kidney.centre[2] + s * offset[1] + c * offset[2],
    )
    angle = kidney.angle + rng.uniform(-np.pi / 4, np.pi / 4)
    return _Ellipsoid(centre, semi, angle), int(rng.integers(2**31))


def _paint_tumour(
    ellipsoid,
    texture_seed,
    shape,
    spacing,
    allowed,
    mean=HU["tumour"],
    texture_hu=TUMOUR_TEXTURE_HU,
):
    """Painter of a tumour: a blob-shaped ellipsoid with a smooth texture."""
    box = _box(ellipsoid, shape, spacing, pad=1.2)
    if box is None:
        return _empty_painter()
    rng = np.random.default_rng(texture_seed)
    size = tuple(b.stop - b.start for b in box)
    # blob scale about a third of the tumour radius per axis, in voxels
    sigma = [
        max(semi / step / 3.0, 0.5) for semi, step in zip(ellipsoid.semi_axes, spacing, strict=True)
    ]
    shape_noise = _smooth_noise(rng, size, sigma)
    texture = _smooth_noise(rng, size, [s / 2 for s in sigma])
    # irregular outline: the surface moves in and out with a smooth field
    mask = np.sqrt(_distance(ellipsoid, box, shape, spacing)) + 0.15 * shape_noise <= 1.0
    mask &= allowed[box[1], box[2]][None]
    values = np.float32(mean) + np.float32(texture_hu) * texture
    return box, mask, values, TUMOUR


def _smooth_noise(rng, size, sigma):
    """Gaussian-smoothed white noise rescaled to zero mean and unit std (float32)."""
    field = ndimage.gaussian_filter(
        rng.standard_normal(size).astype(np.float32), sigma, mode="reflect"
    )
    std = float(field.std())
    field -= field.mean()
    return field / np.float32(std) if std > 0 else field


def _empty_painter():
    empty = (slice(0, 0), slice(0, 0), slice(0, 0))
    return empty, np.zeros((0, 0, 0), bool), np.float32(0), None
