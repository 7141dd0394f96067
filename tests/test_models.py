"""The U-Net builder and the model registry."""

import keras
import numpy as np
import pytest

from medseg.models import (
    MODELS,
    DiceCrossEntropyLoss,
    build_model,
    build_unet,
    check_input_shape,
    class_dice_metrics,
)


@pytest.mark.parametrize(
    "ndim, spatial, in_channels, num_classes",
    [(2, (16, 8), 1, 2), (3, (16, 8, 16), 2, 3)],
)
def test_output_shape_and_softmax(ndim, spatial, in_channels, num_classes):
    model = build_unet(num_classes, in_channels=in_channels, ndim=ndim, depth=3, filters=4)
    assert model.input_shape == (None,) + (None,) * ndim + (in_channels,)
    x = np.random.default_rng(0).normal(size=(2, *spatial, in_channels)).astype("float32")
    y = model.predict(x, verbose=0)
    assert y.shape == (2, *spatial, num_classes)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y.sum(-1), 1.0, atol=1e-5)
    assert (y >= 0).all()


def test_architecture():
    model = build_unet(2, ndim=2, depth=3, filters=200, normalization="instance", dropout=0.1)
    widths = [model.get_layer(f"enc{level}_conv1").filters for level in range(3)]
    assert widths == [200, 320, 320]  # doubling, capped as in nnU-Net
    norm = model.get_layer("enc1_norm2")
    assert isinstance(norm, keras.layers.GroupNormalization) and norm.groups == 320
    assert isinstance(model.get_layer("dec0_up"), keras.layers.Conv2DTranspose)
    assert model.get_layer("dec0_dropout").rate == 0.1
    assert not model.get_layer("enc0_conv1").use_bias  # bias is cancelled by the norm

    plain = build_unet(2, ndim=3, depth=2, filters=4, normalization="none")
    assert not any("norm" in layer.name for layer in plain.layers)
    assert plain.get_layer("enc0_conv1").use_bias
    assert isinstance(
        build_unet(2, ndim=3, depth=2, filters=4).get_layer("enc0_norm1"),
        keras.layers.BatchNormalization,
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"normalization": "layer"}, "normalization='layer'"),
        ({"ndim": 4}, "ndim"),
        ({"depth": 0}, "depth"),
        ({"num_classes": 1}, "num_classes"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_unet(**{"num_classes": 2, **kwargs})


def test_float32_head_under_mixed_precision():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = build_unet(2, ndim=2, depth=2, filters=4)
    finally:
        keras.config.set_dtype_policy(previous)
    assert model.get_layer("enc0_conv1").compute_dtype == "float16"
    assert model.get_layer("probabilities").compute_dtype == "float32"
    assert model.outputs[0].dtype == "float32"


def test_trains_saves_and_reloads(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 16, 16, 16, 1)).astype("float32")
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, size=(2, 16, 16, 16))]
    model = build_model("unet", num_classes=3, depth=3, filters=4)
    model.compile(
        optimizer="adam",
        loss=DiceCrossEntropyLoss(),
        metrics=class_dice_metrics(["background", "kidney", "tumor"]),
    )
    logs = model.train_on_batch(x, y, return_dict=True)
    assert set(logs) == {"loss", "dice_kidney", "dice_tumor"}
    assert np.isfinite(logs["loss"]) and logs["loss"] > 0

    path = tmp_path / "unet.keras"
    model.save(path)
    reloaded = keras.models.load_model(path)
    np.testing.assert_allclose(
        reloaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )
    assert isinstance(reloaded.loss, DiceCrossEntropyLoss)
    assert np.isfinite(reloaded.train_on_batch(x, y, return_dict=True)["loss"])


def test_check_input_shape():
    check_input_shape((64, 128, 128), depth=5)
    check_input_shape([8, 16, 16], depth=4)
    check_input_shape((7, 9), depth=1)  # no pooling: anything goes
    with pytest.raises(
        ValueError,
        match=r"patch size \(12, 16, 16\) must be divisible by "
        r"2\*\*\(depth-1\)=8",
    ):
        check_input_shape((12, 16, 16), depth=4)
    with pytest.raises(ValueError, match="must be divisible"):
        check_input_shape((0, 16), depth=2)


def test_registry():
    assert MODELS["unet"] is build_unet
    model = build_model("unet", num_classes=2, ndim=2, depth=2, filters=4, name="tiny")
    assert model.name == "tiny"
    with pytest.raises(
        ValueError, match="unknown model 'vnet': known models are attention_residual_unet, "
    ):
        build_model("vnet", num_classes=2)
