"""Deep supervision: loss weights and targets for a model's lower-resolution outputs.

A model built with ``deep_supervision=True`` returns its full-resolution softmax first and
then one softmax per decoder level below it, each at half the previous resolution. Training
compares every output to the one-hot target down-sampled to its size and weights the
losses as nnU-Net does (:func:`deep_supervision_weights`)::

    weights = deep_supervision_weights(len(model.outputs))
    model.compile(loss=[loss] * len(weights), loss_weights=weights, ...)
    train = train.map(lambda x, y: (x, downsample_targets(y, model)))

For inference keep the full-resolution output only (:func:`full_resolution_model`).
"""

from __future__ import annotations

from collections.abc import Sequence

import keras


def deep_supervision_weights(n_outputs: int) -> list[float]:
    """nnU-Net's loss weights of ``n_outputs`` outputs, full resolution first.

    Output ``i`` gets ``1 / 2**i``, except the lowest resolution one which gets 0 (its
    target is too coarse to help); the weights are normalized to sum to 1. A single
    output gets weight 1.

    Examples
    --------
    >>> deep_supervision_weights(3)
    [0.6666666666666666, 0.3333333333333333, 0.0]
    """
    if n_outputs < 1:
        raise ValueError(f"n_outputs must be >= 1, got {n_outputs}")
    if n_outputs == 1:
        return [1.0]
    weights = [1 / 2**i for i in range(n_outputs)]
    weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


def deep_supervision_scales(model: keras.Model) -> tuple:
    """Down-sampling factor of each of ``model``'s outputs relative to its input.

    Found by running the model's graph symbolically on a probe size (no computation), so
    it holds for any functional model. An output down-sampled alike along every axis has
    one int; one of a plan that pools some axes less often (anisotropic data) has a tuple,
    one factor per axis.
    """
    ndim = len(model.inputs[0].shape) - 2
    n = len(model.outputs)
    stride = getattr(model, "stride", 1)
    stride = (stride,) * ndim if isinstance(stride, int) else tuple(stride)
    probe = tuple(max(s, 2 ** (n - 1)) * 2 for s in stride)
    spec = model.compute_output_spec(
        keras.KerasTensor((1,) + probe + (model.inputs[0].shape[-1],))
    )
    specs = spec if isinstance(spec, list | tuple) else [spec]
    scales = []
    for out in specs:
        spatial = tuple(int(s) for s in out.shape[1:-1])
        if any(p % s for p, s in zip(probe, spatial, strict=True)):
            raise ValueError(
                f"model {model.name!r}: output of spatial size {spatial} for an input of "
                f"{probe} is not a whole down-sampling"
            )
        factors = tuple(p // s for p, s in zip(probe, spatial, strict=True))
        scales.append(factors[0] if len(set(factors)) == 1 else factors)
    return tuple(scales)


def downsample_targets(
    one_hot_labels, model: keras.Model | Sequence[int], ndim: int | None = None
) -> tuple:
    """One target per output of a deep-supervised model, full resolution first.

    The target of an output at scale ``s`` keeps every ``s``-th voxel along each spatial
    axis, starting at the first: the label at the corner of the ``s × s [× s]`` block that
    2× max-pooling (or a stride-2 convolution) ``log2(s)`` times summarizes into that
    output voxel (nearest-neighbour down-sampling, as nnU-Net). Works on numpy arrays and
    on tensors inside ``tf.data`` maps, batched or not.

    Parameters
    ----------
    one_hot_labels : array or tensor
        ``(*spatial, classes)`` or ``(batch, *spatial, classes)``.
    model : keras.Model or sequence of int
        The deep-supervised model (its scales are read with
        :func:`deep_supervision_scales`), or the scales themselves, e.g. ``(1, 2, 4)``.
    ndim : int, optional
        Number of spatial axes; taken from ``model`` when it is a model, required with
        explicit scales.

    Returns
    -------
    tuple
        ``(labels, labels[..., ::2, ::2, :], labels[..., ::4, ::4, :], ...)``.
    """
    if isinstance(model, keras.Model):
        scales = deep_supervision_scales(model)
        ndim = len(model.inputs[0].shape) - 2
    else:
        scales = tuple(s if isinstance(s, int) else tuple(int(v) for v in s) for s in model)
        if ndim is None:
            raise ValueError("downsample_targets: give ndim with explicit scales")
    per_axis = [(s,) * ndim if isinstance(s, int) else tuple(s) for s in scales]
    if any(v < 1 for s in per_axis for v in s):
        raise ValueError(f"scales must be >= 1, got {scales}")
    rank = len(one_hot_labels.shape)
    if rank not in (ndim + 1, ndim + 2):
        raise ValueError(
            f"one_hot_labels of shape {tuple(one_hot_labels.shape)}: expected "
            f"(batch,) + {ndim} spatial axes + (classes,), batch optional"
        )
    targets = []
    for s in per_axis:
        index = (Ellipsis,) + tuple(slice(None, None, v) for v in s) + (slice(None),)
        targets.append(one_hot_labels[index] if max(s) > 1 else one_hot_labels)
    return tuple(targets)


def full_resolution_model(model: keras.Model) -> keras.Model:
    """The model without its deep-supervision outputs (for inference and export).

    Shares ``model``'s layers and weights; a model with one output is returned as is.
    """
    if len(model.outputs) == 1:
        return model
    cls = type(model) if hasattr(model, "stride") else keras.Model
    kwargs = {"stride": model.stride} if hasattr(model, "stride") else {}
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    return cls(inputs, model.outputs[0], name=model.name, **kwargs)


__all__ = [
    "deep_supervision_scales",
    "deep_supervision_weights",
    "downsample_targets",
    "full_resolution_model",
]
