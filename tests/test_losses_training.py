"""Losses under MirroredStrategy, compiled into models, and built from the config."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from medseg.config import Config, ConfigError, LossConfig
from medseg.models import (
    LOSSES,
    ClassWiseDiceLoss,
    ComboLoss,
    DiceCrossEntropyLoss,
    FocalLoss,
    FocalTverskyLoss,
    JaccardLoss,
    SoftDiceLoss,
    TverskyLoss,
    loss_from_config,
)
from medseg.training import make_strategy


@pytest.fixture(scope="module")
def mirrored():
    if len(tf.config.list_logical_devices("CPU")) < 2:
        pytest.skip("needs the two logical CPUs configured in conftest")
    strategy = make_strategy("mirrored")
    assert strategy.num_replicas_in_sync == 2
    return strategy


def _data(seed, channels, batch=4, spatial=(6, 5, 4)):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, *spatial, max(channels, 2))).astype(np.float32)
    labels = rng.integers(0, max(channels, 2), size=(batch, *spatial))
    if channels > 2:
        labels[:2][labels[:2] == channels - 1] = 0  # last class only in the last samples
        y = np.eye(channels, dtype=np.float32)[labels]
    else:
        y = (labels[..., None] == 1).astype(np.float32)
        if channels == 2:
            y = np.concatenate([1 - y, y], -1)
    return x, y


def _probabilities(x, w, channels):
    logits = x[..., :channels] * w
    return tf.sigmoid(logits) if channels == 1 else tf.nn.softmax(logits)


DISTRIBUTED = {
    "dice": lambda: SoftDiceLoss(class_weights=(1.0, 2.0, 0.5)),
    "dice_with_background": lambda: SoftDiceLoss(include_background=True),
    "classwise_dice": lambda: ClassWiseDiceLoss(),
    "jaccard_per_sample": lambda: JaccardLoss(batch_dice=False, class_weights=(1.0, 1.0, 3.0)),
    "tversky": lambda: TverskyLoss(0.3, 0.7),
    "focal_tversky": lambda: FocalTverskyLoss(include_background=True),
    "focal": lambda: FocalLoss(2.0, class_weights=(0.2, 1.0, 2.0)),
    "dice_ce": lambda: DiceCrossEntropyLoss(class_weights=(0.5, 1.0, 2.0)),
    "dice_ce_per_sample": lambda: DiceCrossEntropyLoss(batch_dice=False),
    "combo": lambda: ComboLoss(0.4, 0.7, class_weights=(1.0, 1.0, 2.0)),
}


@pytest.mark.parametrize("split", [(2, 2), (3, 1)], ids=["even", "uneven"])
@pytest.mark.parametrize("name", DISTRIBUTED)
def test_mirrored_loss_and_gradient_equal_one_device(mirrored, name, split):
    """The replicas' shares add up to the whole batch's loss and gradient on one device.

    The uneven split (3 + 1 samples) would break a loss that averages per replica and
    divides by the number of replicas.
    """
    channels = 3
    x, y = _data(len(name), channels)
    loss = DISTRIBUTED[name]()
    start = np.random.default_rng(1).uniform(0.5, 2.0, size=channels).astype(np.float32)

    w = tf.Variable(start)
    with tf.GradientTape() as tape:
        single = loss(y, _probabilities(x, w, channels))
    single_gradient = tape.gradient(single, w)

    with mirrored.scope():
        w_mirrored = tf.Variable(start)
    bounds = np.cumsum((0, *split))

    def piece(array):
        return mirrored.experimental_distribute_values_from_function(
            lambda ctx: array[
                bounds[ctx.replica_id_in_sync_group] : bounds[ctx.replica_id_in_sync_group + 1]
            ]
        )

    def step(x, y):
        with tf.GradientTape() as tape:
            value = loss(y, _probabilities(x, w_mirrored, channels))
        return value, tape.gradient(value, w_mirrored)

    values, gradients = mirrored.run(step, args=(piece(x), piece(y)))
    total = mirrored.reduce(tf.distribute.ReduceOp.SUM, values, axis=None)
    gradient = mirrored.reduce(tf.distribute.ReduceOp.SUM, gradients, axis=None)
    np.testing.assert_allclose(float(total), float(single), rtol=1e-5)
    np.testing.assert_allclose(gradient.numpy(), single_gradient.numpy(), rtol=1e-4, atol=1e-7)


def _tiny_model(channels, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 6, 2))
    logits = keras.layers.Conv2D(max(channels, 1), 1)(inputs)
    activation = "sigmoid" if channels == 1 else "softmax"
    return keras.Model(inputs, keras.layers.Activation(activation, dtype="float32")(logits))


def _learnable(seed, channels, batch=8):
    """Labels that a 1×1 convolution of the input can learn."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, 6, 6, 2)).astype(np.float32)
    score = np.stack([np.zeros_like(x[..., 0]), x[..., 0] - 0.5, x[..., 1] + x[..., 0] - 1], -1)
    labels = score[..., : max(channels, 2)].argmax(-1)
    if channels == 1:
        return x, (labels[..., None] == 1).astype(np.float32)
    return x, np.eye(channels, dtype=np.float32)[labels]


def _hard_dice(y, probabilities):
    """Mean Dice of the foreground classes of the hard prediction."""
    probabilities = np.asarray(probabilities)
    if y.shape[-1] == 1:
        truth, pred = y[..., 0] > 0.5, probabilities[..., 0] > 0.5
        return 2 * np.sum(truth & pred) / (truth.sum() + pred.sum())
    truth, pred = y.argmax(-1), probabilities.argmax(-1)
    scores = [
        2 * np.sum((truth == c) & (pred == c)) / (np.sum(truth == c) + np.sum(pred == c))
        for c in range(1, y.shape[-1])
    ]
    return np.mean(scores)


@pytest.mark.parametrize("channels", [1, 3], ids=["sigmoid", "softmax"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_compiled_loss_drives_training(name, channels):
    """The loss Keras optimizes is ours (evaluate = direct call) and training lowers it."""
    x, y = _learnable(3, channels)
    weights = (0.5, 1.0, 2.0)[: max(channels, 2)]
    config = LossConfig(name=name, class_weights=weights if name != "classwise_dice" else None)
    loss = loss_from_config(config, max(channels, 2))
    model = _tiny_model(channels)
    model.compile(optimizer=keras.optimizers.Adam(0.1), loss=loss)
    before = model.evaluate(x, y, batch_size=len(x), verbose=0)
    np.testing.assert_allclose(before, float(loss(y, model(x))), rtol=1e-5)
    dice_before = _hard_dice(y, model(x))
    model.fit(x, y, batch_size=len(x), epochs=20, verbose=0, shuffle=False)
    after = model.evaluate(x, y, batch_size=len(x), verbose=0)
    dice_after = _hard_dice(y, model(x))
    assert after < 0.75 * before, (before, after)
    # and what it optimizes is the segmentation: the labels are a 1×1 convolution away
    assert dice_after > dice_before + 0.15, (dice_before, dice_after)


def _one_step(strategy, loss, x, y):
    with strategy.scope():
        model = _tiny_model(3, seed=4)
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss=loss)
    logs = model.fit(x, y, batch_size=len(x), epochs=1, verbose=0, shuffle=False).history
    return model.get_weights(), logs["loss"][0]


@pytest.mark.parametrize("name", ["classwise_dice", "focal", "focal_tversky", "combo"])
def test_fit_under_mirrored_strategy_matches_one_device(mirrored, name):
    x, y = _learnable(5, 3)
    loss = loss_from_config(
        LossConfig(name=name, class_weights=(0.5, 1.0, 2.0) if name != "classwise_dice" else None),
        3,
    )
    single_weights, single_loss = _one_step(tf.distribute.get_strategy(), loss, x, y)
    mirrored_weights, mirrored_loss = _one_step(mirrored, loss, x, y)
    np.testing.assert_allclose(mirrored_loss, single_loss, rtol=1e-5)
    for single, distributed in zip(single_weights, mirrored_weights, strict=True):
        np.testing.assert_allclose(distributed, single, rtol=1e-5, atol=1e-6)


def test_saved_model_reloads_with_its_loss(tmp_path):
    x, y = _learnable(6, 3)
    model = _tiny_model(3)
    model.compile(optimizer="adam", loss=FocalTverskyLoss(0.4, 0.6, 1.5, class_weights=(1, 2, 3)))
    model.train_on_batch(x, y)  # builds the optimizer's variables, saved with the model
    model.save(tmp_path / "model.keras")
    reloaded = keras.models.load_model(tmp_path / "model.keras")
    assert isinstance(reloaded.loss, FocalTverskyLoss)
    assert reloaded.loss.get_config() == model.loss.get_config()
    np.testing.assert_allclose(
        reloaded.evaluate(x, y, verbose=0), model.evaluate(x, y, verbose=0), rtol=1e-6
    )


# -- loss_from_config -------------------------------------------------------------------------

EXPECTED = {
    "dice_ce": DiceCrossEntropyLoss,
    "dice": SoftDiceLoss,
    "classwise_dice": ClassWiseDiceLoss,
    "jaccard": JaccardLoss,
    "tversky": TverskyLoss,
    "focal_tversky": FocalTverskyLoss,
    "focal": FocalLoss,
    "combo": ComboLoss,
}


def test_every_configured_loss_is_known():
    assert set(LOSSES) == set(EXPECTED)


def test_default_loss_is_nnunets_dice_ce():
    loss = loss_from_config(Config().loss, 3)
    assert type(loss) is DiceCrossEntropyLoss
    assert loss.get_config() == DiceCrossEntropyLoss().get_config()


def test_config_values_reach_the_loss():
    config = Config().with_overrides(
        [
            "loss.include_background=true",
            "loss.class_weights=0.5,1,2",
            "loss.batch_dice=false",
            "loss.smooth=0.01",
            "loss.dice_weight=0.3",
            "loss.ce_weight=2",
            "loss.tversky_alpha=0.6",
            "loss.tversky_beta=0.2",
            "loss.focal_tversky_gamma=2",
            "loss.focal_gamma=1.5",
            "loss.combo_alpha=0.25",
            "loss.combo_beta=0.9",
        ]
    )
    assert config.loss.class_weights == (0.5, 1.0, 2.0)
    overlap = {"include_background": True, "class_weights": [0.5, 1.0, 2.0], "smooth": 0.01}
    expected = {
        "dice_ce": {**overlap, "batch_dice": False, "dice_weight": 0.3, "ce_weight": 2.0},
        "dice": {**overlap, "batch_dice": False},
        "classwise_dice": overlap,
        "jaccard": {**overlap, "batch_dice": False},
        "tversky": {**overlap, "batch_dice": False, "alpha": 0.6, "beta": 0.2},
        "focal_tversky": {**overlap, "batch_dice": False, "alpha": 0.6, "beta": 0.2, "gamma": 2.0},
        "focal": {"class_weights": [0.5, 1.0, 2.0], "gamma": 1.5, "alpha": None},
        "combo": {**overlap, "batch_dice": False, "alpha": 0.25, "beta": 0.9},
    }
    for name, values in expected.items():
        named = config.with_overrides({"loss.name": name})
        loss = loss_from_config(named.loss, 3)
        assert type(loss) is EXPECTED[name]
        loss_config = loss.get_config()
        assert {k: loss_config[k] for k in values} == values, name

    focal = loss_from_config(LossConfig(name="focal", focal_alpha=0.25), 2)
    assert focal.alpha == 0.25 and focal.class_weights is None


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="'loss.name': 'dcie' is not one of 'dice_ce', 'dice'"):
        LossConfig(name="dcie")  # refused when the config is made
    with pytest.raises(ConfigError, match="loss.class_weights has 2 values but the dataset has 3"):
        loss_from_config(LossConfig(class_weights=(1.0, 2.0)), 3)
    with pytest.raises(ConfigError, match="loss.focal_alpha and loss.class_weights"):
        loss_from_config(LossConfig(name="focal", focal_alpha=0.2, class_weights=(1.0, 1.0)), 2)
    with pytest.raises(ConfigError, match=r"loss.name='combo': .*alpha must lie in \[0, 1\]"):
        loss_from_config(LossConfig(name="combo", combo_alpha=2.0), 2)
    with pytest.raises(ConfigError, match="loss.class_weights"):
        Config().with_overrides(["loss.class_weights=a,b"])
