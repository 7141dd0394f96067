"""Deep supervision: extra outputs, their loss weights and their down-sampled targets."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from medseg.models import (
    build_model,
    deep_supervision_scales,
    deep_supervision_weights,
    downsample_targets,
    full_resolution_model,
)


def test_weights_follow_nnunet():
    assert deep_supervision_weights(1) == [1.0]
    np.testing.assert_allclose(deep_supervision_weights(2), [1.0, 0.0])
    np.testing.assert_allclose(deep_supervision_weights(3), [2 / 3, 1 / 3, 0.0])
    np.testing.assert_allclose(deep_supervision_weights(4), [4 / 7, 2 / 7, 1 / 7, 0.0])
    with pytest.raises(ValueError, match="n_outputs must be >= 1"):
        deep_supervision_weights(0)


@pytest.mark.parametrize("ndim, spatial", [(2, (16, 24)), (3, (8, 16, 8))])
@pytest.mark.parametrize("name", ["unet", "plain_unet", "attention_residual_unet"])
def test_outputs_at_decreasing_resolution_full_first(name, ndim, spatial):
    model = build_model(name, num_classes=3, ndim=ndim, depth=4, filters=2, deep_supervision=True)
    assert model.output_names == ["probabilities", "ds1_probabilities", "ds2_probabilities"]
    assert deep_supervision_scales(model) == (1, 2, 4)
    x = np.random.default_rng(0).normal(size=(1, *spatial, 1)).astype("float32")
    outputs = model(x)
    for output, scale in zip(outputs, (1, 2, 4), strict=True):
        assert output.shape == (1, *(s // scale for s in spatial), 3)
        assert output.dtype == "float32"
        np.testing.assert_allclose(output.numpy().sum(-1), 1.0, atol=1e-5)
    assert deep_supervision_scales(build_model(name, num_classes=2, ndim=2, depth=2)) == (1,)


def _reference_downsample(labels, scale, ndim):
    """Brute force: out[..., i, j(, k), :] = labels[..., scale·i, scale·j(, scale·k), :]."""
    spatial = labels.shape[-1 - ndim : -1]
    out_shape = labels.shape[: -1 - ndim] + tuple(-(-s // scale) for s in spatial)
    out = np.empty(out_shape + labels.shape[-1:], labels.dtype)
    for index in np.ndindex(*out_shape):
        lead, coords = index[: len(index) - ndim], index[len(index) - ndim :]
        out[index] = labels[lead + tuple(c * scale for c in coords)]
    return out


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("ndim", [2, 3])
def test_downsample_targets_against_brute_force(ndim, batched):
    rng = np.random.default_rng(ndim)
    spatial = (8, 12) if ndim == 2 else (4, 8, 12)
    lead = (2,) if batched else ()
    labels = np.eye(3, dtype="float32")[rng.integers(0, 3, size=lead + spatial)]
    targets = downsample_targets(labels, (1, 2, 4), ndim=ndim)
    assert len(targets) == 3 and targets[0] is labels
    for target, scale in zip(targets, (1, 2, 4), strict=True):
        np.testing.assert_array_equal(target, _reference_downsample(labels, scale, ndim))
    # the same in a tf.data map, on tensors
    dataset = tf.data.Dataset.from_tensors(labels).map(
        lambda y: downsample_targets(y, (1, 2, 4), ndim=ndim)
    )
    for target, expected in zip(next(iter(dataset)), targets, strict=True):
        np.testing.assert_array_equal(target.numpy(), expected)


def test_downsample_targets_errors():
    labels = np.zeros((2, 8, 8, 3), "float32")
    with pytest.raises(ValueError, match="give ndim with explicit scales"):
        downsample_targets(labels, (1, 2))
    with pytest.raises(ValueError, match=r"one_hot_labels of shape \(2, 8, 8, 3\): expected"):
        downsample_targets(labels, (1, 2), ndim=3 + 1)
    with pytest.raises(ValueError, match="scales must be >= 1"):
        downsample_targets(labels, (1, 0), ndim=2)


def test_fit_one_step_with_weighted_deep_supervision(tmp_path):
    rng = np.random.default_rng(3)
    model = build_model(
        "unet",
        num_classes=3,
        ndim=2,
        depth=4,
        filters=4,
        normalization="instance",
        deep_supervision=True,
    )
    weights = deep_supervision_weights(len(model.outputs))
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=["categorical_crossentropy"] * len(weights),
        loss_weights=weights,
    )
    x = rng.normal(size=(2, 16, 16, 1)).astype("float32")
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, size=(2, 16, 16))]
    train = tf.data.Dataset.from_tensors((x, y)).map(lambda x, y: (x, downsample_targets(y, model)))

    # the compiled loss is the weighted sum of each output's loss against its own target;
    # fit reports the loss of the forward pass before the update (instance norm, no dropout:
    # training and inference forward passes agree)
    predictions = [p.numpy() for p in model(x, training=False)]
    targets = downsample_targets(y, model)
    assert len(targets) == 3 and weights[1] > 0
    # Keras takes the log-softmax of the logits: no clipping to worry about in the reference
    assert min(p.min() for p in predictions) > 1e-6
    expected = sum(
        w * np.mean(-np.sum(t * np.log(p), axis=-1))
        for w, p, t in zip(weights, predictions, targets, strict=True)
    )

    before = [w.numpy().copy() for w in model.trainable_weights]
    history = model.fit(train, epochs=1, verbose=0, shuffle=False)
    assert history.history["loss"][0] == pytest.approx(expected, rel=1e-4)
    changed = [
        not np.array_equal(w, b) for w, b in zip(model.trainable_weights, before, strict=True)
    ]
    # the lowest-resolution head has loss weight 0: only its weights stay put
    frozen = {w.path for w, c in zip(model.trainable_weights, changed, strict=True) if not c}
    assert frozen == {"ds2_logits/kernel", "ds2_logits/bias"}

    # save and reload: every output identical
    model.save(tmp_path / "ds.keras")
    reloaded = keras.models.load_model(tmp_path / "ds.keras")
    after = model(x, training=False)
    for a, b in zip(reloaded(x, training=False), after, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)

    # inference keeps the full-resolution output, with the same weights
    single = full_resolution_model(model)
    assert len(single.outputs) == 1 and single.stride == model.stride
    np.testing.assert_allclose(single(x, training=False), after[0], atol=1e-6)
