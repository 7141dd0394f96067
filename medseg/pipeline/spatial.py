"""Resampling kernels shared by preprocessing and augmentation, as TensorFlow graph ops.

Two kinds of resampling:

- **Separable resizing** (:func:`resize_axis`, :func:`resize`): one 1D linear or nearest
  interpolation per axis, each a pair of ``tf.gather`` along that axis. Used to resample
  cases to a target spacing and for low-resolution simulation.
- **Warping** (:func:`warp`): sampling at an arbitrary coordinate field (an affine map plus
  a smooth displacement), linear for images and nearest for labels, with ``tf.gather`` on
  flattened indices. It is the costly part of spatial augmentation and is XLA-compiled
  (:func:`warp_jit`): on a 2-core CPU XLA fuses the coordinate arithmetic and the 2**n
  corner gathers, about 6x faster than the same graph without it, also inside
  ``tf.data.Dataset.map``.

Conventions: arrays are channels-last ``(*spatial, C)`` with 2 or 3 spatial axes; label maps
are ``(*spatial)``. Out-of-range coordinates are clamped to the edge, i.e.
``scipy.ndimage`` ``mode="nearest"``, so labels never leave their label set.
"""

from __future__ import annotations

import tensorflow as tf


def _axis_coordinates(size_in, size_out) -> tf.Tensor:
    """Half-pixel-centre source coordinates of ``size_out`` samples of ``size_in`` (float64).

    Output index ``o`` reads ``(o + 0.5) * in / out - 0.5``, clamped to ``[0, in - 1]``.
    """
    size_in = tf.cast(size_in, tf.float64)
    o = tf.range(tf.cast(size_out, tf.int32), dtype=tf.float64)
    c = (o + 0.5) * size_in / tf.cast(size_out, tf.float64) - 0.5
    return tf.clip_by_value(c, 0.0, size_in - 1.0)


def resize_axis(x: tf.Tensor, axis: int, size, nearest=False) -> tf.Tensor:
    """Resample ``x`` along one ``axis`` to ``size`` samples.

    Parameters
    ----------
    x : tf.Tensor
        Any-rank tensor; float for linear interpolation, any dtype for a static
        ``nearest=True``.
    axis : int
        The axis to resample (non-negative).
    size : int or scalar int tensor
        New length of ``axis``.
    nearest : bool or scalar bool tensor
        Nearest-neighbour (``floor((o + 0.5) * in / out)``) instead of linear
        interpolation. A tensor chooses at run time (for per-case anisotropy).
    """
    n = tf.shape(x)[axis]
    c = _axis_coordinates(n, size)
    lower = tf.floor(c)
    i0 = tf.cast(lower, tf.int32)
    frac = c - lower
    if isinstance(nearest, bool) and nearest:
        return tf.gather(x, tf.cast(tf.floor(c + 0.5), tf.int32), axis=axis)
    if isinstance(nearest, bool):
        weight = frac
    else:  # nearest is linear with the weight rounded: one code path for a run-time choice
        weight = tf.where(nearest, tf.cast(frac >= 0.5, tf.float64), frac)
    i1 = tf.minimum(i0 + 1, n - 1)
    a = tf.gather(x, i0, axis=axis)
    b = tf.gather(x, i1, axis=axis)
    shape = tf.concat(
        [tf.ones([axis], tf.int32), [-1], tf.ones([x.shape.rank - axis - 1], tf.int32)], 0
    )
    weight = tf.reshape(tf.cast(weight, x.dtype), shape)
    return a + (b - a) * weight


def resize(volume: tf.Tensor, new_shape, nearest=False) -> tf.Tensor:
    """Separable resampling of a ``(*spatial, C)`` tensor to spatial ``new_shape``.

    Parameters
    ----------
    volume : tf.Tensor
        ``(*spatial, C)``, 2 or 3 spatial axes.
    new_shape : sequence of ints or int tensor
        One size per spatial axis.
    nearest : bool, or a sequence / bool tensor with one entry per spatial axis
        Nearest-neighbour instead of linear interpolation, globally or per axis.
    """
    ndim = volume.shape.rank - 1
    new_shape = tf.cast(new_shape, tf.int32)
    if isinstance(nearest, bool):
        per_axis = [nearest] * ndim
    elif isinstance(nearest, tf.Tensor):
        per_axis = tf.unstack(nearest, num=ndim)
    else:
        per_axis = list(nearest)
    out = volume
    for axis in range(ndim):
        out = resize_axis(out, axis, new_shape[axis], per_axis[axis])
    return out


# -- warping -------------------------------------------------------------------------------


def _grid(shape) -> list[tf.Tensor]:
    """Index grids (float32) of a spatial ``shape``, one per axis."""
    return tf.meshgrid(*[tf.range(s, dtype=tf.float32) for s in shape], indexing="ij")


def _linear_weights(grid, size) -> tf.Tensor:
    """``(size, grid)`` weights of linear interpolation from ``grid`` corner-aligned points."""
    pos = tf.linspace(0.0, tf.cast(grid - 1, tf.float32), size)
    i0 = tf.clip_by_value(tf.cast(tf.floor(pos), tf.int32), 0, tf.maximum(grid - 2, 0))
    w = (pos - tf.cast(i0, tf.float32))[:, None]
    return tf.one_hot(i0, grid) * (1.0 - w) + tf.one_hot(tf.minimum(i0 + 1, grid - 1), grid) * w


def upsample_field(coarse: tf.Tensor, shape) -> tf.Tensor:
    """Linearly interpolate a coarse ``(*grid, k)`` field onto a ``(k, *shape)`` grid.

    Control points span the volume corner to corner (``align_corners``; the reference is
    ``scipy.ndimage.zoom(order=1, grid_mode=False)``). One small matrix product per axis,
    last axis first, so only the final product is full-size. The component axis comes
    first in the result so that each component is contiguous.
    """
    n = coarse.shape.rank - 1
    grid = tf.unstack(tf.shape(coarse)[:-1], num=n)
    out = tf.transpose(coarse, [n, *range(n)])  # (k, *grid)
    letters = "abc"[:n]
    for axis in range(n - 1, -1, -1):
        weights = _linear_weights(grid[axis], shape[axis])  # (size, g)
        dims = letters.replace(letters[axis], "g")
        out = tf.einsum(f"{letters[axis]}g,k{dims}->k{letters}", weights, out)
    return out


def warp_coordinates(shape, matrix, offset, displacement=None) -> list[tf.Tensor]:
    """Source coordinates ``matrix @ o + offset (+ displacement(o))`` of every output voxel.

    ``matrix`` is ``(n, n)``, ``offset`` ``(n,)`` (scipy ``affine_transform``'s convention);
    ``displacement`` is a coarse ``(*grid, n)`` field (see :func:`upsample_field`) or None.
    """
    grid = _grid(shape)
    n = len(shape)
    matrix = tf.cast(matrix, tf.float32)
    offset = tf.cast(offset, tf.float32)
    field = None if displacement is None else upsample_field(displacement, shape)
    coords = []
    for i in range(n):
        c = offset[i] + sum(matrix[i, j] * grid[j] for j in range(n))
        if field is not None:
            c = c + field[i]
        coords.append(c)
    return coords


def gather_linear(flat, coords, shape, strides, base=0):
    """Rows of ``flat`` (voxels × channels) interpolated linearly at ``coords``.

    ``coords`` are per-axis voxel coordinates (clamped to the grid: nearest-edge
    extension), ``shape`` and ``strides`` the grid's size and row strides per axis, and
    ``base`` the row of each sample's first voxel (a batch stacked in ``flat``).
    """
    n = len(coords)
    # corners: floor index and weight of the upper neighbour, per axis
    lower, upper, weight = [], [], []
    for i in range(n):
        c = tf.clip_by_value(coords[i], 0.0, tf.cast(shape[i] - 1, tf.float32))
        f = tf.floor(c)
        i0 = tf.cast(f, tf.int32)
        lower.append(i0 * strides[i])
        upper.append(tf.minimum(i0 + 1, shape[i] - 1) * strides[i])
        weight.append((c - f)[..., None])

    def interpolate(axis, index):
        # linear interpolation along ``axis`` and, recursively, every later axis
        if axis == n:
            return tf.gather(flat, index)
        a = interpolate(axis + 1, index + lower[axis])
        b = interpolate(axis + 1, index + upper[axis])
        return a + (b - a) * weight[axis]

    return interpolate(0, base + tf.zeros_like(lower[0]))


def nearest_index(coords, shape, strides, base=0):
    """The row of the voxel nearest to ``coords`` (rounding half up; see
    :func:`gather_linear` for the arguments)."""
    nearest = base
    for i in range(len(coords)):
        c = tf.clip_by_value(coords[i], 0.0, tf.cast(shape[i] - 1, tf.float32))
        nearest = nearest + tf.cast(tf.floor(c + 0.5), tf.int32) * strides[i]
    return nearest


def warp(image, label, matrix, offset, displacement=None):
    """Sample ``image`` (linear) and ``label`` (nearest) at :func:`warp_coordinates`.

    Parameters
    ----------
    image : tf.Tensor
        ``(*spatial, C)`` float32 (under XLA, compiled once per shape).
    label : tf.Tensor or None
        ``(*spatial)`` integer label map.
    matrix, offset, displacement
        See :func:`warp_coordinates`.

    Returns
    -------
    image, label : tf.Tensor
        Same shapes and dtypes; label None if it was None.
    """
    image = tf.convert_to_tensor(image, tf.float32)
    if displacement is not None:
        displacement = tf.convert_to_tensor(displacement, tf.float32)
    n = image.shape.rank - 1
    shape = tf.unstack(tf.shape(image)[:-1], num=n)
    coords = warp_coordinates(shape, matrix, offset, displacement)
    strides = [tf.constant(1)] * n
    for i in range(n - 2, -1, -1):
        strides[i] = strides[i + 1] * shape[i + 1]

    flat = tf.reshape(image, [-1, tf.shape(image)[-1]])
    out_image = tf.reshape(gather_linear(flat, coords, shape, strides), tf.shape(image))
    if label is None:
        return out_image, None
    nearest = nearest_index(coords, shape, strides)
    label = tf.convert_to_tensor(label)
    out_label = tf.reshape(tf.gather(tf.reshape(label, [-1]), nearest), tf.shape(label))
    return out_image, out_label


_warp_xla = tf.function(warp, jit_compile=True, autograph=False)
_warp_graph = tf.function(warp, autograph=False)


def warp_jit(image, label, matrix, offset, displacement=None, jit: bool = True):
    """:func:`warp`, XLA-compiled if ``jit`` (compiled once per shape and dtype)."""
    fn = _warp_xla if jit else _warp_graph
    return fn(image, label, matrix, offset, displacement)
