"""Every loss against a plain numpy reference written from its paper's definition.

Conventions checked here (see medseg.models.losses): ``y_pred`` is softmax probabilities, or
one sigmoid channel whose background is ``1 - p``; class 0 is the background; overlap ratios
carry a smoothing term ``s`` in numerator and denominator, so a class absent from both the
targets and the predictions scores 1 (no loss); class weights weight the mean over classes
of overlap terms and each voxel's cross-entropy / focal term by its true class.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from medseg.models.losses import (
    ClassWiseDiceLoss,
    ComboLoss,
    DiceCrossEntropyLoss,
    FocalLoss,
    FocalTverskyLoss,
    JaccardLoss,
    SoftDiceLoss,
    TverskyLoss,
    soft_dice,
)

S = 1e-5  # the losses' default smoothing
EPS = 1e-7  # the losses' default probability clipping


# -- inputs ------------------------------------------------------------------------------


def _batch(seed, spatial, channels, batch=3, absent_from_truth=(), absent_from_both=()):
    """One-hot targets and probabilities; ``channels == 1`` is a sigmoid output."""
    rng = np.random.default_rng(seed)
    if channels == 1:
        labels = rng.integers(0, 2, size=(batch, *spatial, 1))
        probabilities = 1 / (1 + np.exp(-rng.normal(scale=2.0, size=labels.shape)))
        return labels.astype(np.float32), probabilities.astype(np.float32)
    labels = rng.integers(0, channels, size=(batch, *spatial))
    for c in (*absent_from_truth, *absent_from_both):
        labels[labels == c] = 0
    y_true = np.eye(channels)[labels]
    logits = rng.normal(scale=2.0, size=(batch, *spatial, channels))
    probabilities = np.exp(logits)
    for c in absent_from_both:
        probabilities[..., c] = 0.0  # exactly absent from the prediction too
    probabilities /= probabilities.sum(-1, keepdims=True)
    return y_true.astype(np.float32), probabilities.astype(np.float32)


SETUPS = {
    # name: (spatial, channels, absent_from_truth, absent_from_both)
    "binary_sigmoid_2d": ((6, 5), 1, (), ()),
    "binary_sigmoid_3d": ((4, 5, 3), 1, (), ()),
    "binary_softmax_3d": ((4, 4, 3), 2, (), ()),
    "multiclass_2d": ((7, 6), 3, (), ()),
    "multiclass_3d_empty_classes": ((4, 5, 3), 4, (2,), (3,)),
}


def _setup(name, seed=0):
    spatial, channels, absent_truth, absent_both = SETUPS[name]
    y_true, y_pred = _batch(seed, spatial, channels, 3, absent_truth, absent_both)
    if absent_truth or absent_both:
        for c in (*absent_truth, *absent_both):
            assert y_true[..., c].sum() == 0
        for c in absent_both:
            assert y_pred[..., c].sum() == 0
    return y_true, y_pred


def _weights(channels, seed=1):
    return tuple(np.random.default_rng(seed).uniform(0.2, 3.0, size=max(channels, 2)).round(3))


# -- references (float64) ----------------------------------------------------------------


def _classes(y_true, y_pred):
    """A sigmoid output's two classes: background 1 - p, foreground p."""
    g, p = y_true.astype(np.float64), y_pred.astype(np.float64)
    if g.shape[-1] == 1:
        g, p = np.concatenate([1 - g, g], -1), np.concatenate([1 - p, p], -1)
    return g, p


def _counts(g, p, per_sample):
    """Soft TP, FP, FN per class, over the batch and space (or per sample)."""
    axes = tuple(range(1 if per_sample else 0, g.ndim - 1))
    tp = (p * g).sum(axes)
    fp = (p * (1 - g)).sum(axes)
    fn = ((1 - p) * g).sum(axes)
    return tp, fp, fn


def _class_mean(values, weights, include_background):
    start = 0 if include_background else 1
    w = np.ones(values.shape[-1]) if weights is None else np.asarray(weights, float)
    return (values[..., start:] * w[start:]).sum(-1) / w[start:].sum()


def _overlap_loss(y_true, y_pred, include_background, weights, batch_dice, per_class):
    g, p = _classes(y_true, y_pred)
    tp, fp, fn = _counts(g, p, per_sample=not batch_dice)
    loss = _class_mean(per_class(tp, fp, fn), weights, include_background)
    return loss.mean()  # per-sample losses are averaged; a batch loss is already a scalar


def ref_dice(y_true, y_pred, ib, w, bd):
    # Dice = 2|P∩G| / (|P| + |G|) = 2TP / (2TP + FP + FN)
    return _overlap_loss(
        y_true, y_pred, ib, w, bd, lambda tp, fp, fn: 1 - (2 * tp + S) / (2 * tp + fp + fn + S)
    )


def ref_jaccard(y_true, y_pred, ib, w, bd):
    return _overlap_loss(
        y_true, y_pred, ib, w, bd, lambda tp, fp, fn: 1 - (tp + S) / (tp + fp + fn + S)
    )


def _tversky_index(tp, fp, fn, a, b):
    # Salehi et al. 2017: |P∩G| / (|P∩G| + α|P∖G| + β|G∖P|)
    return (tp + S) / (tp + a * fp + b * fn + S)


def ref_tversky(a, b):
    def ref(y_true, y_pred, ib, w, bd):
        return _overlap_loss(y_true, y_pred, ib, w, bd, lambda *c: 1 - _tversky_index(*c, a, b))

    return ref


def ref_focal_tversky(a, b, gamma):
    # Abraham & Khan 2019: (1 - TI_c)^(1/γ), here averaged over classes
    def ref(y_true, y_pred, ib, w, bd):
        return _overlap_loss(
            y_true, y_pred, ib, w, bd, lambda *c: (1 - _tversky_index(*c, a, b)) ** (1 / gamma)
        )

    return ref


def _true_class(g, values, weights):
    """Per voxel: the value at the true class, and that class's weight."""
    label = g.argmax(-1)
    picked = np.take_along_axis(values, label[..., None], -1)[..., 0]
    w = np.ones(g.shape[-1]) if weights is None else np.asarray(weights, float)
    return picked, w[label]


def ref_focal(gamma):
    # Lin et al. 2017: FL(p_t) = -α_t (1 - p_t)^γ log(p_t), mean over voxels
    def ref(y_true, y_pred, ib, w, bd):
        g, p = _classes(y_true, y_pred)
        p_t, alpha_t = _true_class(g, np.clip(p, EPS, 1 - EPS), w)
        return (-alpha_t * (1 - p_t) ** gamma * np.log(p_t)).mean()

    return ref


def _cross_entropy(g, p, weights):
    p_t, w_t = _true_class(g, np.clip(p, EPS, 1 - EPS), weights)
    return (-w_t * np.log(p_t)).mean()


def ref_dice_ce(dice_weight, ce_weight):
    def ref(y_true, y_pred, ib, w, bd):
        dice = ref_dice(y_true, y_pred, ib, w, bd)
        return dice_weight * dice + ce_weight * _cross_entropy(*_classes(y_true, y_pred), w)

    return ref


def ref_combo(alpha, beta):
    # Taghanaki et al. 2019: α·L_mCE + (1-α)·(1 - Dice), L_mCE an element-wise weighted BCE
    def ref(y_true, y_pred, ib, w, bd):
        g, p = _classes(y_true, y_pred)
        q = np.clip(p, EPS, 1 - EPS)
        bce = -(beta * g * np.log(q) + (1 - beta) * (1 - g) * np.log(1 - q))
        m_ce = _class_mean(bce, w, ib).mean()
        return alpha * m_ce + (1 - alpha) * ref_dice(y_true, y_pred, ib, w, bd)

    return ref


LOSSES = {
    # name: (build(include_background, class_weights, batch_dice), reference, batch_dice options)
    "dice": (lambda ib, w, bd: SoftDiceLoss(ib, w, batch_dice=bd), ref_dice, (True, False)),
    "classwise_dice": (lambda ib, w, bd: ClassWiseDiceLoss(ib, w), ref_dice, (False,)),
    "jaccard": (lambda ib, w, bd: JaccardLoss(ib, w, batch_dice=bd), ref_jaccard, (True, False)),
    "tversky": (
        lambda ib, w, bd: TverskyLoss(0.3, 0.7, ib, w, batch_dice=bd),
        ref_tversky(0.3, 0.7),
        (True, False),
    ),
    "tversky_fp_heavy": (
        lambda ib, w, bd: TverskyLoss(0.8, 0.1, ib, w, batch_dice=bd),
        ref_tversky(0.8, 0.1),
        (True,),
    ),
    "focal_tversky": (
        lambda ib, w, bd: FocalTverskyLoss(0.3, 0.7, 4 / 3, ib, w, batch_dice=bd),
        ref_focal_tversky(0.3, 0.7, 4 / 3),
        (True, False),
    ),
    "focal": (lambda ib, w, bd: FocalLoss(2.0, class_weights=w), ref_focal(2.0), (True,)),
    "focal_gamma_half": (
        lambda ib, w, bd: FocalLoss(0.5, class_weights=w),
        ref_focal(0.5),
        (True,),
    ),
    "dice_ce": (
        lambda ib, w, bd: DiceCrossEntropyLoss(0.7, 1.3, ib, w, batch_dice=bd),
        ref_dice_ce(0.7, 1.3),
        (True, False),
    ),
    "combo": (
        lambda ib, w, bd: ComboLoss(0.4, 0.7, ib, w, batch_dice=bd),
        ref_combo(0.4, 0.7),
        (True, False),
    ),
}

CASES = [
    (loss, setup, ib, weighted, bd)
    for loss, (_, _, batch_options) in LOSSES.items()
    for setup in SETUPS
    for ib in (False, True)
    for weighted in (False, True)
    for bd in batch_options
]


@pytest.mark.parametrize("loss_name, setup, include_background, weighted, batch_dice", CASES)
def test_loss_matches_numpy_reference(loss_name, setup, include_background, weighted, batch_dice):
    build, reference, _ = LOSSES[loss_name]
    y_true, y_pred = _setup(setup, seed=len(loss_name))
    weights = _weights(y_true.shape[-1]) if weighted else None
    loss = build(include_background, weights, batch_dice)
    value = loss(y_true, y_pred)
    assert tuple(value.shape) == ()
    expected = reference(y_true, y_pred, include_background, weights, batch_dice)
    assert np.isfinite(expected)
    np.testing.assert_allclose(float(value), expected, rtol=2e-5, atol=1e-6)


def test_batch_and_per_sample_overlap_differ():
    y_true, y_pred = _setup("multiclass_2d")
    batch = float(SoftDiceLoss()(y_true, y_pred))
    per_sample = float(ClassWiseDiceLoss()(y_true, y_pred))
    assert abs(batch - per_sample) > 1e-3
    np.testing.assert_allclose(
        per_sample,
        np.mean(
            [ref_dice(y_true[i : i + 1], y_pred[i : i + 1], False, None, True) for i in range(3)]
        ),
        rtol=1e-5,
    )


# -- the paper's special cases -------------------------------------------------------------


def test_tversky_special_cases_are_dice_and_jaccard():
    y_true, y_pred = _setup("multiclass_3d_empty_classes")
    np.testing.assert_allclose(
        float(TverskyLoss(0.5, 0.5)(y_true, y_pred)),
        float(SoftDiceLoss()(y_true, y_pred)),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        float(TverskyLoss(1.0, 1.0)(y_true, y_pred)),
        float(JaccardLoss()(y_true, y_pred)),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        float(FocalTverskyLoss(0.3, 0.7, gamma=1.0)(y_true, y_pred)),
        float(TverskyLoss(0.3, 0.7)(y_true, y_pred)),
        rtol=1e-6,
    )


@pytest.mark.parametrize("setup", ["binary_sigmoid_2d", "binary_sigmoid_3d"])
def test_binary_focal_with_alpha_is_lins_formula(setup):
    y, p = _setup(setup)
    y, p = y.astype(np.float64)[..., 0], np.clip(p.astype(np.float64)[..., 0], EPS, 1 - EPS)
    alpha, gamma = 0.25, 2.0
    p_t = np.where(y == 1, p, 1 - p)
    alpha_t = np.where(y == 1, alpha, 1 - alpha)
    expected = (-alpha_t * (1 - p_t) ** gamma * np.log(p_t)).mean()
    y_true, y_pred = _setup(setup)
    np.testing.assert_allclose(float(FocalLoss(gamma, alpha)(y_true, y_pred)), expected, rtol=1e-5)
    # the same weights given per class, and γ = 0: the (binary) cross-entropy
    np.testing.assert_allclose(
        float(FocalLoss(gamma, class_weights=(1 - alpha, alpha))(y_true, y_pred)),
        expected,
        rtol=1e-5,
    )
    bce = -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()
    np.testing.assert_allclose(float(FocalLoss(0.0)(y_true, y_pred)), bce, rtol=1e-5)


def test_multiclass_focal_with_alpha_weighs_foreground():
    y_true, y_pred = _setup("multiclass_2d")
    expected = ref_focal(2.0)(y_true, y_pred, False, (0.75, 0.25, 0.25), True)
    np.testing.assert_allclose(float(FocalLoss(2.0, 0.25)(y_true, y_pred)), expected, rtol=1e-5)


def test_binary_combo_is_the_papers_formula_on_the_foreground():
    y_true, y_pred = _setup("binary_sigmoid_3d")
    y, p = y_true.astype(np.float64), np.clip(y_pred.astype(np.float64), EPS, 1 - EPS)
    alpha, beta = 0.3, 0.8
    m_ce = (-(beta * y * np.log(p) + (1 - beta) * (1 - y) * np.log(1 - p))).mean()
    q = y_pred.astype(np.float64)
    dice = (2 * (q * y).sum() + S) / (q.sum() + y.sum() + S)
    expected = alpha * m_ce + (1 - alpha) * (1 - dice)
    np.testing.assert_allclose(float(ComboLoss(alpha, beta)(y_true, y_pred)), expected, rtol=1e-5)


# -- empty classes ---------------------------------------------------------------------------

ALL = {
    "dice": SoftDiceLoss,
    "classwise_dice": ClassWiseDiceLoss,
    "jaccard": JaccardLoss,
    "tversky": TverskyLoss,
    "focal_tversky": FocalTverskyLoss,
    "focal": FocalLoss,
    "dice_ce": DiceCrossEntropyLoss,
    "combo": ComboLoss,
}


@pytest.mark.parametrize("name", ALL)
def test_perfect_prediction_scores_zero_even_with_an_empty_class(name):
    y_true, _ = _setup("multiclass_3d_empty_classes")
    kwargs = {} if name == "focal" else {"include_background": True}
    value = float(ALL[name](**kwargs)(y_true, y_true))
    # smoothing: the empty classes score 1 → no loss; CE terms ≈ -log(1 - 1e-7)
    assert 0.0 <= value < 1e-4


def test_empty_class_convention():
    """Absent from truth and prediction: no loss; absent from truth but predicted: full loss."""
    y_true, _ = _setup("multiclass_3d_empty_classes")  # classes 2 and 3 absent from the truth
    dice = SoftDiceLoss(include_background=True, class_weights=(0, 0, 0, 1))  # class 3 only
    assert float(dice(y_true, y_true)) == pytest.approx(0.0, abs=1e-7)
    predicted = y_true.copy()
    predicted[0, 0, 0, 0] = [0.0, 0.0, 0.0, 1.0]  # one voxel of class 3
    np.testing.assert_allclose(float(dice(y_true, predicted)), 1 - S / (1 + S), rtol=1e-6)


# -- gradients -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("setup", ["binary_sigmoid_3d", "multiclass_3d_empty_classes"])
@pytest.mark.parametrize("scale", [1.0, 200.0, "perfect"])
def test_gradients_are_finite(name, setup, scale):
    """Also with saturated probabilities (exact 0 and 1 in float32) and perfect ones."""
    y_true, _ = _setup(setup)
    channels = y_true.shape[-1]
    if scale == "perfect":
        logits = tf.Variable(60.0 * (2 * y_true - 1))
    else:
        rng = np.random.default_rng(3)
        logits = tf.Variable(scale * rng.normal(size=y_true.shape).astype(np.float32))
    loss = ALL[name]() if name in ("focal", "classwise_dice") else ALL[name](batch_dice=False)
    with tf.GradientTape() as tape:
        probabilities = tf.sigmoid(logits) if channels == 1 else tf.nn.softmax(logits)
        value = loss(y_true, probabilities)
    gradient = tape.gradient(value, logits).numpy()
    assert np.isfinite(float(value))
    assert np.all(np.isfinite(gradient))
    if scale == 1.0:
        assert np.abs(gradient).max() > 0


# -- configuration and serialization ---------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_config_round_trip(name):
    kwargs = {"class_weights": (0.5, 1.0, 2.0), "name": f"my_{name}"}
    loss = ALL[name](**kwargs)
    config = loss.get_config()
    assert config["class_weights"] == [0.5, 1.0, 2.0] and config["name"] == f"my_{name}"
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert type(restored) is ALL[name]
    assert restored.get_config() == config and restored.reduction == "none"
    y_true, y_pred = _setup("multiclass_2d")
    assert float(restored(y_true, y_pred)) == float(loss(y_true, y_pred))


def test_invalid_parameters_are_refused():
    with pytest.raises(ValueError, match="alpha and beta must be >= 0"):
        TverskyLoss(-0.1, 0.5)
    with pytest.raises(ValueError, match="gamma must be a positive number"):
        FocalTverskyLoss(gamma=0.0)
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):
        ComboLoss(alpha=1.5)
    with pytest.raises(ValueError, match="give alpha or class_weights, not both"):
        FocalLoss(alpha=0.25, class_weights=(1, 1))
    with pytest.raises(ValueError, match="class_weights must be finite and >= 0"):
        SoftDiceLoss(class_weights=(1, -1))
    y_true, y_pred = _setup("multiclass_2d")
    with pytest.raises(ValueError, match="2 class_weights for 3 classes"):
        SoftDiceLoss(class_weights=(1, 1))(y_true, y_pred)
    with pytest.raises(ValueError, match="are all 0"):
        SoftDiceLoss(class_weights=(1, 0, 0))(y_true, y_pred)
    with pytest.raises(ValueError, match="targets have 3 channels but predictions 1"):
        JaccardLoss()(y_true, y_pred[..., :1])
    with pytest.raises(ValueError, match="takes no sample_weight"):
        FocalLoss()(y_true, y_pred, sample_weight=np.ones(3))


def test_soft_dice_of_a_sigmoid_output_is_the_foreground_dice():
    y_true, y_pred = _setup("binary_sigmoid_2d")
    g, p = y_true.astype(np.float64), y_pred.astype(np.float64)
    foreground = (2 * (g * p).sum() + S) / (g.sum() + p.sum() + S)
    background = (2 * ((1 - g) * (1 - p)).sum() + S) / ((1 - g).sum() + (1 - p).sum() + S)
    np.testing.assert_allclose(float(soft_dice(y_true, y_pred)), foreground, rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(soft_dice(y_true, y_pred, include_background=True, per_class=True)),
        [background, foreground],
        rtol=1e-5,
    )
