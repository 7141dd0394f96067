"""Sliding-window prediction against brute-force numpy references."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from medseg.inference import (
    SlidingWindow,
    WeightedMerger,
    gaussian_importance,
    mirror_flips,
    predict_sliding_window,
    window_starts,
)

# -- window_starts -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "patch", "overlap"),
    [(10, 4, 0.5), (11, 4, 0.5), (13, 6, 0.5), (7, 3, 0.0), (9, 4, 0.9), (64, 32, 0.25)],
)
def test_window_starts_cover_every_index_and_end_flush(size, patch, overlap):
    starts = window_starts(size, patch, overlap)
    covered = np.zeros(size, dtype=int)
    for s in starts:
        covered[s : s + patch] += 1
    assert covered.min() >= 1
    assert starts[0] == 0
    assert starts[-1] == size - patch
    assert starts == sorted(set(starts))
    step = max(1, int(patch * (1 - overlap) + 1e-9))
    assert all(b - a == step for a, b in itertools.pairwise(starts[:-1]))


def test_window_starts_examples():
    assert window_starts(10, 4, 0.5) == [0, 2, 4, 6]
    assert window_starts(11, 4, 0.5) == [0, 2, 4, 6, 7]
    assert window_starts(5, 5, 0.5) == [0]
    assert window_starts(5, 5, 0.0) == [0]
    # overlap 0 tiles without overlap, then one window flush with the end
    assert window_starts(12, 4, 0.0) == [0, 4, 8]
    assert window_starts(13, 4, 0.0) == [0, 4, 8, 9]
    # float error in patch * (1 - overlap) must not shrink the step
    assert window_starts(12, 10, 0.9) == [0, 1, 2]


def test_window_starts_rejects_bad_arguments():
    with pytest.raises(ValueError, match="pad"):
        window_starts(3, 4, 0.5)
    with pytest.raises(ValueError, match="overlap"):
        window_starts(8, 4, 1.0)


# -- gaussian_importance -------------------------------------------------------------------


def test_gaussian_importance_is_the_normalised_gaussian():
    patch = (8, 12, 16)
    weights = gaussian_importance(patch)
    assert weights.shape == patch
    assert weights.dtype == np.float32
    # sigma = patch / 8 keeps the whole patch inside scipy's 4-sigma truncation radius, so
    # the filtered delta is exactly the sampled Gaussian up to normalisation
    grids = np.meshgrid(*(np.arange(p) for p in patch), indexing="ij")
    exponent = sum(
        (g - p // 2) ** 2 / (2 * (p / 8) ** 2) for g, p in zip(grids, patch, strict=True)
    )
    np.testing.assert_allclose(weights, np.exp(-exponent), rtol=1e-5, atol=1e-7)
    assert weights.max() == 1.0
    assert weights[4, 6, 8] == 1.0


def test_gaussian_importance_replaces_zeros():
    weights = gaussian_importance((32,), sigma_scale=1 / 32)  # sigma 1: truncated at 4 voxels
    assert weights.min() > 0
    nonzero_tail = weights[16 + 4]
    np.testing.assert_array_equal(weights[: 16 - 4], nonzero_tail)
    np.testing.assert_array_equal(weights[16 + 5 :], nonzero_tail)


# -- merging against a brute-force reference ----------------------------------------------

NUM_CLASSES = 3


def coordinate_image(shape, rng):
    """Channels: one coordinate per spatial axis, then random noise."""
    coords = np.stack(np.meshgrid(*(np.arange(s) for s in shape), indexing="ij"), axis=-1)
    noise = rng.normal(size=(*shape, 2))
    return np.concatenate([coords, noise], axis=-1).astype(np.float32)


def make_predict_fn(ndim, channels, seed=0):
    """Softmax of a fixed linear map plus a term that depends on the patch's origin.

    The origin is read from the coordinate channels of the patch's first voxel, so the
    function depends on its input batch only, yet gives one voxel a different prediction in
    every patch containing it.
    """
    rng = np.random.default_rng(seed)
    linear = rng.normal(size=(channels, NUM_CLASSES))
    origin_map = rng.normal(size=(ndim, NUM_CLASSES))
    calls = []

    def predict_fn(batch):
        assert batch.dtype == np.float32
        calls.append(len(batch))
        origins = batch[(slice(None),) + (0,) * ndim + (slice(0, ndim),)]  # (B, ndim)
        logits = batch.astype(np.float64) @ linear
        logits += np.sin(origins @ origin_map).reshape((-1,) + (1,) * ndim + (NUM_CLASSES,))
        logits -= logits.max(axis=-1, keepdims=True)
        probs = np.exp(logits)
        return probs / probs.sum(axis=-1, keepdims=True)

    predict_fn.calls = calls
    return predict_fn


def brute_force_merge(image, predict_fn, patch, origins, weights):
    """Per voxel: sum of w * p over the windows containing it, divided by the sum of w."""
    patch_probs = [
        predict_fn(image[tuple(slice(o, o + p) for o, p in zip(org, patch, strict=True))][None])[0]
        for org in origins
    ]
    spatial = image.shape[:-1]
    out = np.zeros((*spatial, NUM_CLASSES))
    coverage = np.zeros(spatial, dtype=int)
    for voxel in itertools.product(*(range(s) for s in spatial)):
        num = np.zeros(NUM_CLASSES)
        den = 0.0
        for org, probs in zip(origins, patch_probs, strict=True):
            local = tuple(v - o for v, o in zip(voxel, org, strict=True))
            if all(0 <= x < p for x, p in zip(local, patch, strict=True)):
                num += weights[local] * probs[local]
                den += weights[local]
                coverage[voxel] += 1
        out[voxel] = num / den
    return out, coverage


@pytest.mark.parametrize("weighting", ["mean", "gaussian"])
def test_merge_matches_brute_force_3d(weighting):
    rng = np.random.default_rng(1)
    shape, patch = (6, 7, 5), (4, 4, 4)
    image = coordinate_image(shape, rng)
    predict_fn = make_predict_fn(3, image.shape[-1])
    # starts per axis: [0, 2], [0, 2, 3], [0, 1]
    origins = list(itertools.product([0, 2], [0, 2, 3], [0, 1]))
    weights = gaussian_importance(patch) if weighting == "gaussian" else np.ones(patch)

    expected, coverage = brute_force_merge(image, predict_fn, patch, origins, weights)
    predict_fn.calls.clear()
    result = predict_sliding_window(
        image, predict_fn, patch, NUM_CLASSES, overlap=0.5, batch_size=5, weighting=weighting
    )

    assert {1, 2, 4, 8} <= set(np.unique(coverage))  # voxels covered by 1, 2, 4 and 8 patches
    assert predict_fn.calls == [5, 5, 2]  # 12 windows in batches of 5
    assert result.shape == (*shape, NUM_CLASSES)
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.sum(axis=-1), 1.0, atol=1e-5)
    # merging really matters here: a single patch's prediction differs from the merge
    first_patch = predict_fn(image[None, :4, :4, :4])[0]
    assert not np.allclose(first_patch[2:4, 2:4, 1:4], result[2:4, 2:4, 1:4], atol=1e-3)


@pytest.mark.parametrize("weighting", ["mean", "gaussian"])
def test_merge_matches_brute_force_2d_with_padding(weighting):
    rng = np.random.default_rng(2)
    shape, patch = (3, 9), (6, 4)  # axis 0 is padded to 6, axis 1 has starts [0, 2, 4, 5]
    image = coordinate_image(shape, rng)
    predict_fn = make_predict_fn(2, image.shape[-1])
    padded = np.pad(image, [(1, 2), (0, 0), (0, 0)], constant_values=-7.5)
    origins = list(itertools.product([0], [0, 2, 4, 5]))
    weights = gaussian_importance(patch) if weighting == "gaussian" else np.ones(patch)

    expected, _ = brute_force_merge(padded, predict_fn, patch, origins, weights)
    result = predict_sliding_window(
        image, predict_fn, patch, NUM_CLASSES, overlap=0.5, weighting=weighting, pad_value=-7.5
    )
    assert result.shape == (*shape, NUM_CLASSES)
    np.testing.assert_allclose(result, expected[1:4], rtol=1e-5, atol=1e-6)


# -- identity on one-hot input ------------------------------------------------------------


def one_hot_image(shape, num_classes, rng):
    labels = rng.integers(0, num_classes, size=shape)
    return np.eye(num_classes, dtype=np.float32)[labels]


@pytest.mark.parametrize("weighting", ["mean", "gaussian"])
@pytest.mark.parametrize(
    ("shape", "patch", "overlap"),
    [
        ((11, 13), (4, 5), 0.5),  # non-divisible
        ((3, 10), (8, 4), 0.25),  # padded along axis 0
        ((9, 2, 7), (4, 4, 4), 0.5),  # 3D, padded along axis 1
        ((2, 3, 1), (4, 4, 4), 0.5),  # smaller than the patch everywhere
        ((10, 11, 12), (4, 5, 6), 0.0),
    ],
)
def test_identity_reproduces_one_hot_input(shape, patch, overlap, weighting):
    image = one_hot_image(shape, 3, np.random.default_rng(3))
    result = predict_sliding_window(
        image, lambda batch: batch.copy(), patch, 3, overlap=overlap, weighting=weighting
    )
    assert result.shape == image.shape
    np.testing.assert_array_equal(result, image)


def test_output_shape_is_checked():
    image = np.zeros((8, 8, 1), dtype=np.float32)
    with pytest.raises(ValueError, match="expected"):
        predict_sliding_window(image, lambda b: np.zeros((len(b), 4, 4, 3)), (4, 4), 2)
    with pytest.raises(ValueError, match="spatial"):
        predict_sliding_window(image, lambda b: b, (4, 4, 4), 1)
    with pytest.raises(ValueError, match="weighting"):
        predict_sliding_window(image, lambda b: b, (4, 4), 1, weighting="median")


# -- a real Keras model -------------------------------------------------------------------


@pytest.mark.parametrize("weighting", ["mean", "gaussian"])
def test_keras_model_passed_directly_equals_whole_image(weighting):
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    channels, classes = 2, 3
    inputs = keras.Input(shape=(None, None, None, channels))
    outputs = keras.layers.Conv3D(classes, 1, activation="softmax")(inputs)
    model = keras.Model(inputs, outputs)

    image = np.random.default_rng(4).normal(size=(7, 9, 3, channels)).astype(np.float32)
    result = predict_sliding_window(
        image, model, (4, 4, 4), classes, overlap=0.5, batch_size=4, weighting=weighting
    )
    whole = np.asarray(model.predict_on_batch(image[None]))[0]
    assert result.shape == whole.shape
    np.testing.assert_allclose(result, whole, rtol=1e-5, atol=1e-6)


# -- exact merging under 1, 2, 4 and 8 patches, with mirroring and ensembles -------------


def flip_mean_reference(predict_fns, mirror_axes):
    """Per patch: the mean over models and over every subset of ``mirror_axes`` of
    flip(model(flip(patch))), written out with numpy."""

    def reference(patch):
        predictions = []
        for predict_fn in predict_fns:
            for size in range(len(mirror_axes) + 1):
                for axes in itertools.combinations(mirror_axes, size):
                    flipped = np.flip(patch, axes) if axes else patch
                    probs = predict_fn(np.ascontiguousarray(flipped)[None])[0]
                    predictions.append(np.flip(probs, axes) if axes else probs)
        return np.mean(predictions, axis=0)

    return reference


def brute_force_reference(image, reference, patch, origins, weights):
    """Loop over windows and accumulate w * p and w per voxel; divide at the end."""
    spatial = image.shape[:-1]
    summed = np.zeros((*spatial, NUM_CLASSES))
    weight_sum = np.zeros(spatial)
    coverage = np.zeros(spatial, dtype=int)
    for origin in origins:
        window = tuple(slice(o, o + p) for o, p in zip(origin, patch, strict=True))
        probs = reference(image[window])
        summed[window] += weights[..., None] * probs
        weight_sum[window] += weights
        coverage[window] += 1
    return summed / weight_sum[..., None], coverage


@pytest.mark.parametrize("weighting", ["mean", "gaussian"])
@pytest.mark.parametrize("mirror_axes", [(), (0, 2)])
@pytest.mark.parametrize("models", [1, 2])
def test_merge_is_exact_under_1_2_4_and_8_patches(weighting, mirror_axes, models):
    rng = np.random.default_rng(5)
    # per axis: 6 voxels, windows of 4 at [0, 2], so indices 0,1,4,5 lie in one window and
    # 2,3 in two; in 3D every voxel lies in 1, 2, 4 or 8 windows
    shape, patch = (6, 6, 6), (4, 4, 4)
    image = coordinate_image(shape, rng)
    predict_fns = [make_predict_fn(3, image.shape[-1], seed=s) for s in range(models)]
    origins = list(itertools.product([0, 2], repeat=3))
    weights = gaussian_importance(patch) if weighting == "gaussian" else np.ones(patch)

    expected, coverage = brute_force_reference(
        image, flip_mean_reference(predict_fns, mirror_axes), patch, origins, weights
    )
    values, counts = np.unique(coverage, return_counts=True)
    assert dict(zip(values.tolist(), counts.tolist(), strict=True)) == {1: 64, 2: 96, 4: 48, 8: 8}

    for predict_fn in predict_fns:
        predict_fn.calls.clear()
    model = predict_fns if models > 1 else predict_fns[0]
    result = predict_sliding_window(
        image, model, patch, NUM_CLASSES, overlap=0.5, batch_size=3, weighting=weighting,
        mirror_axes=mirror_axes,
    )
    # 8 windows in batches of 3, each batch once per model and flip
    flips = 2 ** len(mirror_axes)
    for predict_fn in predict_fns:
        assert predict_fn.calls == [3] * flips + [3] * flips + [2] * flips
    for count in (1, 2, 4, 8):
        covered = coverage == count
        np.testing.assert_allclose(result[covered], expected[covered], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.sum(axis=-1), 1.0, atol=1e-5)
    # the merge matters: a pairwise running average ((a + b) / 2 + c) / 2 ... differs
    # from the exact mean where more than two patches overlap
    if weighting == "mean":
        running = np.zeros_like(expected)
        seen = np.zeros(shape, dtype=bool)
        reference = flip_mean_reference(predict_fns, mirror_axes)
        for origin in origins:
            window = tuple(slice(o, o + 4) for o in origin)
            probs = reference(image[window])
            running[window] = np.where(seen[window][..., None], (running[window] + probs) / 2, probs)
            seen[window] = True
        assert not np.allclose(running[coverage == 8], result[coverage == 8], atol=1e-4)


def test_mirroring_and_ensembles_call_every_model_on_every_flip():
    seen = []

    def model_a(batch):
        seen.append(("a", batch.copy()))
        return batch

    def model_b(batch):
        seen.append(("b", batch.copy()))
        return batch

    image = one_hot_image((4, 4, 4), 3, np.random.default_rng(6))
    result = predict_sliding_window(image, [model_a, model_b], (4, 4, 4), 3, mirror_axes=(1, 2))
    np.testing.assert_array_equal(result, image)
    assert [name for name, _ in seen] == ["a"] * 4 + ["b"] * 4
    flipped = [batch[0] for name, batch in seen if name == "a"]
    for got, axes in zip(flipped, [(), (1,), (2,), (1, 2)], strict=True):
        np.testing.assert_array_equal(got, np.flip(image, axes) if axes else image)


def test_mirror_flips():
    assert mirror_flips([], 3) == [()]
    assert mirror_flips([0, 2], 3) == [(), (1,), (3,), (1, 3)]
    assert len(mirror_flips([0, 1, 2], 3)) == 8
    with pytest.raises(ValueError, match="mirror_axes"):
        mirror_flips([3], 3)
    with pytest.raises(ValueError, match="mirror_axes"):
        mirror_flips([1, 1], 3)


@pytest.mark.parametrize("mirror", [False, True])
@pytest.mark.parametrize(
    ("shape", "patch", "overlap"),
    [((11, 13), (4, 5), 0.5), ((9, 2, 7), (4, 4, 4), 0.5), ((10, 11, 12), (4, 5, 6), 0.25)],
)
def test_identity_reproduces_one_hot_input_with_mirroring(shape, patch, overlap, mirror):
    image = one_hot_image(shape, 3, np.random.default_rng(7))
    axes = tuple(range(len(shape))) if mirror else ()
    result = predict_sliding_window(
        image, lambda batch: batch.copy(), patch, 3, overlap=overlap, mirror_axes=axes
    )
    np.testing.assert_array_equal(result, image)


@pytest.mark.parametrize("mirror", [False, True])
def test_identity_keras_model_reproduces_one_hot_input(mirror):
    keras = pytest.importorskip("keras")
    inputs = keras.Input(shape=(None, None, None, 3))
    model = keras.Model(inputs, keras.layers.Activation("linear")(inputs))
    image = one_hot_image((9, 10, 7), 3, np.random.default_rng(8))
    result = predict_sliding_window(
        image, model, (4, 4, 4), 3, overlap=0.5, batch_size=3,
        mirror_axes=(0, 1, 2) if mirror else (),
    )
    np.testing.assert_array_equal(result, image)


# -- full-image mode ------------------------------------------------------------------------


def test_small_image_is_predicted_whole_padded_to_the_stride():
    shapes = []

    def identity(batch):
        shapes.append(batch.shape)
        return batch

    image = one_hot_image((5, 6, 3), 3, np.random.default_rng(9))
    result = predict_sliding_window(image, identity, (8, 8, 8), 3, stride=4)
    assert shapes == [(1, 8, 8, 4, 3)]  # one pass, each axis padded up to a multiple of 4
    np.testing.assert_array_equal(result, image)
    # without the stride it is padded to the whole patch
    shapes.clear()
    predict_sliding_window(image, identity, (8, 8, 8), 3)
    assert shapes == [(1, 8, 8, 8, 3)]
    # an image larger than the patch along one axis takes the sliding window
    shapes.clear()
    big = one_hot_image((9, 6, 3), 3, np.random.default_rng(9))
    np.testing.assert_array_equal(predict_sliding_window(big, identity, (8, 8, 8), 3, stride=4), big)
    assert shapes == [(2, 8, 8, 8, 3)]


def test_multi_output_model_uses_its_first_output():
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(1)
    inputs = keras.Input(shape=(None, None, None, 2))
    full = keras.layers.Conv3D(3, 1, activation="softmax")(inputs)
    low = keras.layers.AveragePooling3D(2)(full)  # a deep-supervision head at half size
    deep = keras.Model(inputs, [full, low])
    single = keras.Model(inputs, full)
    image = np.random.default_rng(10).normal(size=(9, 8, 10, 2)).astype(np.float32)
    result = predict_sliding_window(image, deep, (4, 4, 4), 3, overlap=0.5)
    expected = predict_sliding_window(image, single, (4, 4, 4), 3, overlap=0.5)
    np.testing.assert_array_equal(result, expected)
    np.testing.assert_allclose(result, single.predict_on_batch(image[None])[0], atol=1e-6)


# -- the inferer configured once, and its merger -------------------------------------------


def test_weighted_merger_is_the_weighted_mean_of_what_it_is_given():
    rng = np.random.default_rng(4)
    weights = rng.uniform(0.1, 1.0, size=(3, 4))
    merger = WeightedMerger((5, 6), weights)
    windows = [(slice(0, 3), slice(0, 4)), (slice(2, 5), slice(1, 5)), (slice(1, 4), slice(2, 6))]
    patches = [rng.uniform(size=(3, 4, 2)) for _ in windows]
    for window, probs in zip(windows, patches, strict=True):
        merger.add(window, probs)
    num, den = np.zeros((5, 6, 2)), np.zeros((5, 6))
    for window, probs in zip(windows, patches, strict=True):
        num[window] += weights[..., None] * probs
        den[window] += weights
    covered = den > 0
    with np.errstate(invalid="ignore"):  # voxels no patch covers are 0 / 0
        merged, expected = merger.result(), num / den[..., None]
    np.testing.assert_allclose(merged[covered], expected[covered], rtol=1e-6)
    crop = (slice(1, 4), slice(2, 4))
    np.testing.assert_allclose(merger.result(crop), expected[crop], rtol=1e-6)
    with pytest.raises(ValueError, match="no patch was added"):
        WeightedMerger((2, 2), np.ones((1, 1))).result()


def test_sliding_window_from_a_plan_is_configured_once_and_called_per_image():
    from medseg.config import InferenceConfig
    from medseg.inference import PredictionPlan
    from medseg.pipeline import PreprocessPlan

    plan = PredictionPlan(
        PreprocessPlan(target_spacing=None, clip=None, mean=0.0, std=1.0),
        ("background", "a", "b"), patch_size=(4, 4, 4), stride=(1, 2, 2),
    )
    inference = InferenceConfig(overlap=0.25, batch_size=3, weighting="mean", mirror_axes=(0, 2))
    window = SlidingWindow.from_plan(plan, inference)
    assert window == SlidingWindow((4, 4, 4), 0.25, 3, "mean", (0, 2), (1, 2, 2))
    rng = np.random.default_rng(5)
    for shape in [(6, 7, 5), (9, 4, 8)]:  # the same inferer, two images
        image = coordinate_image(shape, rng)
        predict_fn = make_predict_fn(3, image.shape[-1])
        expected = predict_sliding_window(
            image, predict_fn, (4, 4, 4), NUM_CLASSES, 0.25, 3, "mean",
            mirror_axes=(0, 2), stride=(1, 2, 2),
        )
        np.testing.assert_array_equal(window(image, predict_fn, NUM_CLASSES).numpy(), expected)
    # a slab model's window is in-plane: its slices are channels
    slab = dataclasses.replace(plan, patch_size=(3, 8, 8), slab=3)
    assert SlidingWindow.from_plan(slab, inference) == SlidingWindow(
        (8, 8), 0.25, 3, "mean", (1,), (2, 2)
    )
    with pytest.raises(ValueError, match=r"overlap must be in \[0, 1\)"):
        SlidingWindow((4, 4), overlap=1.0)


# -- window positions, generated lazily -----------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "patch", "overlap"),
    [((10, 11), (4, 4), 0.5), ((9, 7, 12), (4, 3, 5), 0.25), ((8, 8, 8), (8, 8, 8), 0.9)],
)
def test_window_positions_are_the_product_of_the_axis_starts_in_order(shape, patch, overlap):
    from medseg.inference.sliding_window import window_count, window_positions

    positions = window_positions(shape, patch, overlap)
    assert iter(positions) is positions  # an iterator, not a list
    expected = [
        tuple(slice(o, o + p) for o, p in zip(origin, patch, strict=True))
        for origin in itertools.product(
            *(window_starts(s, p, overlap) for s, p in zip(shape, patch, strict=True))
        )
    ]
    assert list(positions) == expected
    assert window_count(shape, patch, overlap) == len(expected)


def test_window_positions_hold_no_list_of_windows():
    import tracemalloc

    from medseg.inference.sliding_window import window_count, window_positions

    # a million windows: listed, about 200 MB of tuples and slices
    shape, patch = (100, 100, 100), (1, 1, 1)
    assert window_count(shape, patch, 0.0) == 10**6
    tracemalloc.start()
    try:
        positions = window_positions(shape, patch, 0.0)
        first = [next(positions) for _ in range(3)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert first[2] == (slice(0, 1), slice(0, 1), slice(2, 3))
    assert peak < 1_000_000


def test_overlap_from_095_is_refused_with_the_windows_it_would_need():
    # patch (8, 16, 16): at 0.99 a step of 1 per axis, 8 * 16 * 16 = 2048 windows over each
    # voxel, against 2 * 2 * 2 = 8 at 0.5; at 0.95 steps of 1, 1 and 1 (16 * 0.05 = 0.8)
    with pytest.raises(ValueError, match=r"overlap 0\.99 .* must be below 0\.95: with patch "
                       r"\(8, 16, 16\) every voxel would be predicted in about 2,048 windows "
                       r"\(256 times as many as at overlap 0\.5"):
        SlidingWindow((8, 16, 16), overlap=0.99)
    with pytest.raises(ValueError, match="must be below 0.95"):
        SlidingWindow((8, 16, 16), overlap=0.95)
    # 0.9 still predicts, with the same result as listing every window
    image = coordinate_image((9, 10, 11), np.random.default_rng(3))
    predict_fn = make_predict_fn(3, image.shape[-1])
    window = SlidingWindow((8, 8, 8), overlap=0.9, batch_size=5, weighting="mean")
    merged = window(image, predict_fn, NUM_CLASSES).numpy()
    # 2 * 3 * 4 windows (step 1 at 0.9), in whole batches of 5 and the rest
    assert predict_fn.calls == [5, 5, 5, 5, 4]
    num = np.zeros((*image.shape[:-1], NUM_CLASSES))
    den = np.zeros(image.shape[:-1])
    for origin in itertools.product(*(window_starts(s, 8, 0.9) for s in image.shape[:-1])):
        box = tuple(slice(o, o + 8) for o in origin)
        num[box] += predict_fn(image[box][None])[0]
        den[box] += 1
    np.testing.assert_allclose(merged, num / den[..., None], rtol=1e-5)
