"""Every architecture of the U-Net family: build, train, save/reload, input checks, structure."""

import re

import keras
import numpy as np
import pytest

from medseg.config import Config, ModelConfig
from medseg.models import MODELS, SegmentationModel, build_model, model_from_config
from medseg.models.blocks import ACTIVATIONS

NAMES = sorted(MODELS)
# tiny, non-cubic patches (each size a multiple of the depth-2 stride, 2)
SPATIAL = {2: (16, 8), 3: (8, 16, 8)}


def _tiny(name, ndim, **kwargs):
    return build_model(
        name,
        **{"num_classes": 3, "in_channels": 2, "ndim": ndim, "depth": 2, "filters": 4, **kwargs},
    )


def test_registry_has_the_whole_family():
    assert NAMES == sorted(
        [
            "unet",
            "plain_unet",
            "residual_unet",
            "dense_unet",
            "multires_unet",
            "attention_unet",
            "attention_residual_unet",
            "compact_unet",
            "resenc_unet",
        ]
    )
    for name, builder in MODELS.items():
        assert re.search(r"[A-Z]\w+ .*(19|20)\d\d", builder.__doc__), name  # cites its paper


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("name", NAMES)
def test_builds_trains_saves_reloads_and_checks_input(name, ndim, tmp_path):
    rng = np.random.default_rng(0)
    spatial = SPATIAL[ndim]
    x = rng.normal(size=(2, *spatial, 2)).astype("float32")
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, size=(2, *spatial))]
    model = _tiny(name, ndim)
    assert isinstance(model, SegmentationModel) and model.stride == 2
    assert model.input_shape == (None,) + (None,) * ndim + (2,)

    # one training step: finite loss, and every trainable weight moves. Eagerly: tracing and
    # optimizing a train graph per model costs ~10x the step itself (graph-mode training is
    # covered by the deep-supervision fit test and the trainer's tests)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2), loss="categorical_crossentropy", run_eagerly=True
    )
    before = [w.numpy().copy() for w in model.trainable_weights]
    loss = model.train_on_batch(x, y)
    assert np.isfinite(loss) and loss > 0
    unchanged = [
        w.path for w, b in zip(model.trainable_weights, before, strict=True) if np.array_equal(w, b)
    ]
    assert not unchanged

    # eager calls: tracing a predict function per model would dominate the test's time
    probabilities = model(x, training=False).numpy()
    assert probabilities.shape == (2, *spatial, 3) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-5)

    path = tmp_path / f"{name}.keras"
    model.save(path)
    reloaded = keras.models.load_model(path)
    assert type(reloaded) is SegmentationModel and reloaded.stride == 2
    np.testing.assert_allclose(reloaded(x, training=False), probabilities, atol=1e-6)

    # both input channels reach the output
    silenced = x.copy()
    silenced[..., 1] = 0
    assert not np.allclose(reloaded(silenced, training=False), probabilities, atol=1e-4)

    odd_shape = tuple(s + 1 for s in spatial)
    odd = rng.normal(size=(1, *odd_shape, 2)).astype("float32")
    with pytest.raises(
        ValueError,
        match=f"model '{name}': input spatial size {re.escape(str(odd_shape))} "
        "must be divisible by the model's stride 2",
    ):
        reloaded(odd)


@pytest.mark.parametrize("name", NAMES)
def test_any_size_divisible_by_the_stride(name):
    model = build_model(name, num_classes=2, ndim=2, depth=3, filters=2)
    assert model.stride == 4
    for spatial in [(4, 12), (20, 8)]:
        x = np.zeros((1, *spatial, 1), "float32")
        assert model(x).shape == (1, *spatial, 2)
    with pytest.raises(
        ValueError, match=r"\(6, 12\) must be divisible .* stride 4.* use \(8, 12\)"
    ):
        model(np.zeros((1, 6, 12, 1), "float32"))


def test_size_checked_when_unknown_at_trace_time():
    import tensorflow as tf

    model = build_model("unet", num_classes=2, ndim=2, depth=3, filters=2)
    run = tf.function(model, input_signature=[tf.TensorSpec((None, None, None, 1))])
    assert run(tf.zeros((1, 8, 4, 1))).shape == (1, 8, 4, 2)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"input spatial size\] \[8 6\]"):
        run(tf.zeros((1, 8, 6, 1)))


@pytest.mark.parametrize("name", NAMES)
def test_float32_outputs_under_mixed_precision(name):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = build_model(name, num_classes=2, ndim=3, depth=3, filters=2, deep_supervision=True)
    finally:
        keras.config.set_dtype_policy(previous)
    assert model.get_layer("enc0_conv1").compute_dtype == "float16"
    assert len(model.outputs) == 2
    assert all(output.dtype == "float32" for output in model.outputs)


def _layers_of(model, kind):
    return [layer for layer in model.layers if isinstance(layer, kind)]


@pytest.mark.parametrize("name", NAMES)
def test_normalization_activation_and_dropout_options(name):
    none = build_model(
        name, num_classes=2, ndim=2, depth=3, filters=4, normalization="none", activation="elu"
    )
    assert not _layers_of(none, keras.layers.BatchNormalization | keras.layers.GroupNormalization)
    assert none.get_layer("enc0_conv1").use_bias  # no norm to cancel the bias
    activations = [
        layer for layer in none.layers if "_act" in layer.name and "_gate" not in layer.name
    ]
    assert activations and all(
        isinstance(layer, keras.layers.Activation) and layer.activation.__name__ == "elu"
        for layer in activations
    )

    instance = build_model(
        name,
        num_classes=2,
        ndim=3,
        depth=3,
        filters=4,
        normalization="instance",
        activation="leaky_relu",
        dropout=0.25,
    )
    norms = _layers_of(instance, keras.layers.GroupNormalization)
    assert norms and not _layers_of(instance, keras.layers.BatchNormalization)
    # instance norm: one group per channel
    assert all(layer.groups == layer.input.shape[-1] for layer in norms)
    assert not instance.get_layer("enc0_conv1").use_bias
    leaky = _layers_of(instance, keras.layers.LeakyReLU)
    assert leaky and all(layer.negative_slope == pytest.approx(0.01) for layer in leaky)
    dropouts = _layers_of(instance, keras.layers.Dropout)
    assert sorted(d.name for d in dropouts) == [
        "dec0_dropout",
        "dec1_dropout",
        "enc0_dropout",
        "enc1_dropout",
        "enc2_dropout",
    ]
    assert all(d.rate == 0.25 for d in dropouts)

    batch = build_model(name, num_classes=2, ndim=3, depth=2, filters=4, normalization="batch")
    assert _layers_of(batch, keras.layers.BatchNormalization)
    assert not _layers_of(batch, keras.layers.GroupNormalization)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"normalization": "layer"}, "normalization='layer': use one of batch, instance, none"),
        ({"activation": "tanh"}, "activation='tanh': use one of " + ", ".join(ACTIVATIONS)),
        ({"ndim": 1}, "ndim must be 2 or 3, got 1"),
        ({"depth": 0}, "depth must be >= 1, got 0"),
        ({"num_classes": 1}, "num_classes must be >= 2"),
        ({"in_channels": 0}, "in_channels and filters must be >= 1"),
        ({"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
        ({"deep_supervision": True, "depth": 2}, "deep_supervision needs depth >= 3"),
    ],
)
@pytest.mark.parametrize("name", ["plain_unet", "multires_unet"])
def test_invalid_arguments(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_model(name, **{"num_classes": 2, "filters": 2, **kwargs})


# -- what makes each architecture itself ----------------------------------------------


def _level_sizes(model, ndim, spatial):
    """Spatial sizes of the named layers' outputs for one input of ``spatial``."""
    names = [layer.name for layer in model.layers if layer.name.endswith(("_conv1", "_up"))]
    probe = keras.Model(model.input, [model.get_layer(n).output for n in names])
    outputs = probe(np.zeros((1, *spatial, 1), "float32"))
    return {n: tuple(o.shape[1 : 1 + ndim]) for n, o in zip(names, outputs, strict=True)}


def test_plain_unet_downsamples_by_strided_convolutions():
    model = build_model("plain_unet", num_classes=2, ndim=3, depth=3, filters=4)
    assert not _layers_of(model, keras.layers.MaxPooling3D)
    assert model.get_layer("enc0_conv1").strides == (1, 1, 1)
    assert model.get_layer("enc1_conv1").strides == (2, 2, 2)
    assert model.get_layer("enc1_conv2").strides == (1, 1, 1)
    assert isinstance(model.get_layer("enc1_norm1"), keras.layers.GroupNormalization)
    assert model.get_layer("enc1_act1").negative_slope == pytest.approx(0.01)
    sizes = _level_sizes(model, 3, (8, 16, 8))
    assert sizes["enc1_conv1"] == (4, 8, 4) and sizes["enc2_conv1"] == (2, 4, 2)


def test_residual_unet_adds_shortcuts():
    model = build_model("residual_unet", num_classes=2, ndim=2, depth=3, filters=4)
    # every block (3 encoder, 2 decoder) ends in an addition of its shortcut
    adds = sorted(layer.name for layer in _layers_of(model, keras.layers.Add))
    assert adds == ["dec0_add", "dec1_add", "enc0_add", "enc1_add", "enc2_add"]
    # widths change at every block here, so every shortcut is a 1×1 projection
    assert model.get_layer("enc1_shortcut").kernel_size == (1, 1)


def test_residual_block_identity_shortcut_adds_the_input():
    from medseg.models.blocks import LayerFactory, residual_block

    inputs = keras.Input((None, None, 4))
    outputs = residual_block(inputs, 4, LayerFactory(2, "none", "relu"), "block")
    block = keras.Model(inputs, outputs)
    assert "block_shortcut" not in [layer.name for layer in block.layers]
    x = np.random.default_rng(0).normal(size=(1, 6, 6, 4)).astype("float32")
    inner = keras.Model(inputs, block.get_layer("block_conv2").output)(x).numpy()
    np.testing.assert_allclose(block(x).numpy(), np.maximum(inner + x, 0), atol=1e-5)


def test_dense_block_concatenates_every_earlier_output():
    model = build_model("dense_unet", num_classes=2, ndim=2, depth=2, filters=4, in_channels=3)
    # second convolution sees input + first conv; the transition sees input + both convs
    assert model.get_layer("enc0_conv2").input.shape[-1] == 3 + 4
    assert model.get_layer("enc0_conv_transition").input.shape[-1] == 3 + 4 + 4
    assert model.get_layer("enc0_conv_transition").kernel_size == (1, 1)
    assert model.get_layer("enc0_act_transition").output.shape[-1] == 4


def test_compact_unet_passes_block_inputs_on():
    model = build_model("compact_unet", num_classes=2, ndim=2, depth=2, filters=4, in_channels=3)
    assert model.get_layer("enc0_concat_input").output.shape[-1] == 3 + 4
    assert model.get_layer("enc1_concat_input").output.shape[-1] == (3 + 4) + 8
    # decoder: up-sampled (4) + skip (7) channels, plus the block's 4
    assert model.get_layer("dec0_concat_input").output.shape[-1] == 4 + 7 + 4


def test_multires_unet_blocks_and_res_paths():
    model = build_model("multires_unet", num_classes=2, ndim=3, depth=4, filters=6)
    # W = 1.67 · 6 = 10.02 split W/6, W/3, W/2 as in the paper
    assert [model.get_layer(f"enc0_conv{i}").filters for i in (1, 2, 3)] == [1, 3, 5]
    assert model.get_layer("enc0_shortcut").filters == 9
    # res path lengths shrink towards the bottleneck: depth-1-level convolutions
    names = [layer.name for layer in model.layers]
    for level, length in [(0, 3), (1, 2), (2, 1)]:
        convs = [n for n in names if n.startswith(f"dec{level}_respath") and n.endswith("_conv")]
        assert len(convs) == length


@pytest.mark.parametrize("name", ["attention_unet", "attention_residual_unet"])
def test_attention_gate_scales_the_skip_by_its_upsampled_map(name):
    model = build_model(name, num_classes=2, ndim=2, depth=3, filters=4)
    assert {"dec0_gate_multiply", "dec1_gate_multiply"} <= {layer.name for layer in model.layers}
    gate = "dec0_gate"
    skip_layer = "enc0_act2"
    probe = keras.Model(
        model.input,
        [
            model.get_layer(skip_layer).output,
            model.get_layer(f"{gate}_sigmoid").output,
            model.get_layer(f"{gate}_multiply").output,
        ],
    )
    x = np.random.default_rng(2).normal(size=(1, 8, 12, 1)).astype("float32")
    skip, alpha, gated = (t.numpy() for t in probe(x))
    assert alpha.shape == (1, 4, 6, 1)  # the gating resolution
    assert ((alpha > 0) & (alpha < 1)).all()
    nearest = alpha.repeat(2, axis=1).repeat(2, axis=2)
    np.testing.assert_allclose(gated, skip * nearest, rtol=1e-6)


# -- ModelConfig ----------------------------------------------------------------------


def test_model_from_config_passes_every_field():
    config = ModelConfig(
        name="residual_unet",
        depth=3,
        filters=4,
        normalization="none",
        dropout=0.1,
        activation="elu",
        deep_supervision=True,
    )
    model = model_from_config(config, num_classes=4, in_channels=3, ndim=2)
    assert model.name == "residual_unet" and model.stride == 4
    assert model.input_shape == (None, None, None, 3)
    assert [o.shape[-1] for o in model.outputs] == [4, 4]  # deep supervision: 2 outputs
    assert model.get_layer("enc0_conv1").filters == 4
    assert model.get_layer("enc0_conv1").use_bias  # normalization "none"
    assert model.get_layer("enc0_dropout").rate == 0.1
    assert model.get_layer("enc0_act1").activation.__name__ == "elu"
    assert model.get_layer("enc2_conv1").filters == 16
    # every field of ModelConfig is used
    assert {f for f in vars(config)} == {
        "name",
        "depth",
        "filters",
        "normalization",
        "dropout",
        "activation",
        "deep_supervision",
    }

    # activation None: the architecture's own (nnU-Net's LeakyReLU for the plain U-Net)
    plain = model_from_config(ModelConfig(name="plain_unet", depth=2, filters=2), 2, 1, 3)
    assert isinstance(plain.get_layer("enc0_act1"), keras.layers.LeakyReLU)
    assert len(plain.outputs) == 1
    with pytest.raises(ValueError, match="'model.name': 'vnet' is not one of 'unet'"):
        ModelConfig(name="vnet")  # refused when the config is made


def test_model_config_overrides_from_strings():
    config = Config().with_overrides(
        ["model.activation=leaky_relu", "model.deep_supervision=true", "model.name=dense_unet"]
    )
    assert config.model.activation == "leaky_relu" and config.model.deep_supervision is True
    assert Config().with_overrides(["model.activation=none"]).model.activation is None
    flat = Config().to_flat_dict()
    assert flat["model.activation"] is None and flat["model.deep_supervision"] is False


def test_plain_functional_export_needs_no_medseg(tmp_path):
    """The inference graph MLflow logs (``keras.Model(inputs, outputs)``) uses built-in
    layers only; the size check is the only medseg class, and it stays behind."""
    import json
    import zipfile

    model = build_model("attention_residual_unet", num_classes=2, ndim=2, depth=3, filters=2)
    keras.Model(model.input, model.output, name=model.name).save(tmp_path / "plain.keras")
    with zipfile.ZipFile(tmp_path / "plain.keras") as archive:
        config = json.loads(archive.read("config.json"))
    assert config["class_name"] == "Functional"
    assert "medseg" not in json.dumps(config)
    model.save(tmp_path / "checked.keras")
    with zipfile.ZipFile(tmp_path / "checked.keras") as archive:
        config = json.loads(archive.read("config.json"))
    assert config["registered_name"] == "medseg>SegmentationModel"
    assert config["config"]["stride"] == 4
