"""``tf.data`` pipelines from a built TFDS dataset to batches of training patches.

read → preprocess (once, cached) → sample patch (foreground oversampling) → one-hot →
batch → prefetch. Everything after reading is graph ops; randomness is stateless and
derived from one seed, so a deterministic pipeline gives the same batches every run.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from medseg.config import PatchConfig
from medseg.pipeline.patches import foreground_locations, sample_patch
from medseg.pipeline.preprocess import PreprocessPlan, preprocess_case

AUTOTUNE = tf.data.AUTOTUNE


def read_case_ids(builder: tfds.core.DatasetBuilder, split: str) -> list[str]:
    """The case ids of ``split``, in record order, without decoding any volume."""
    ds = builder.as_dataset(split=split, decoders=_skip_volumes(builder), shuffle_files=False)
    return [cid.decode() for cid in ds.map(lambda ex: ex["case_id"]).as_numpy_iterator()]


def split_cases(
    case_ids: Sequence[str], validation_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Seeded split of case ids into (training, validation), each sorted.

    At least one case goes to each side when there are two or more cases.
    """
    ids = sorted(case_ids)
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"data.validation_fraction={validation_fraction} must be in [0, 1)")
    n_val = int(round(len(ids) * validation_fraction))
    if validation_fraction > 0 and len(ids) >= 2:
        n_val = min(max(n_val, 1), len(ids) - 1)
    order = np.random.default_rng(seed).permutation(len(ids))
    val = sorted(ids[i] for i in order[:n_val])
    train = sorted(ids[i] for i in order[n_val:])
    return train, val


def read_cases(
    builder: tfds.core.DatasetBuilder, split: str, case_ids: Sequence[str] | None = None
) -> tf.data.Dataset:
    """Decoded examples of ``split``, restricted to ``case_ids`` if given.

    Volumes of cases that are filtered out are never decompressed.
    """
    features = builder.info.features
    ds = builder.as_dataset(split=split, decoders=_skip_volumes(builder), shuffle_files=False)
    if case_ids is not None:
        wanted = tf.constant(list(case_ids), tf.string)
        ds = ds.filter(lambda ex: tf.reduce_any(tf.equal(ex["case_id"], wanted)))

    def decode(ex):
        ex = dict(ex)
        for key in ("image", "label"):
            if key in ex:
                ex[key] = features[key].decode_example(ex[key])
        return ex

    return ds.map(decode, num_parallel_calls=AUTOTUNE)


def _skip_volumes(builder) -> dict:
    names = builder.info.features.keys()
    return {k: tfds.decode.SkipDecoding() for k in ("image", "label") if k in names}


def check_patch_fits(
    fingerprint: dict, plan: PreprocessPlan, patch_size: Sequence[int], dataset: str = "dataset"
) -> None:
    """Raise a clear error if ``patch_size`` exceeds any case's preprocessed shape.

    Uses the fingerprint's shapes and spacings, so no record is read.
    """
    shapes = np.asarray(fingerprint["shapes"], dtype=np.float64)[:, :3]
    spacings = np.asarray(fingerprint["spacings"], dtype=np.float64)
    if plan.target_spacing is not None:
        shapes = np.maximum(np.round(shapes * spacings / np.asarray(plan.target_spacing)), 1)
    too_small = np.any(shapes < np.asarray(patch_size), axis=1)
    if too_small.any():
        i = int(np.argmax(too_small))
        smallest = tuple(int(s) for s in shapes.min(axis=0))
        raise ValueError(
            f"patch size {tuple(patch_size)} is larger than the preprocessed volume of "
            f"{int(too_small.sum())} case(s) of {dataset} (case #{i} is "
            f"{tuple(int(s) for s in shapes[i])} at spacing {plan.target_spacing}; smallest "
            f"extent per axis {smallest}): choose patch.patch_size ≤ {smallest} or a finer "
            f"preprocess.target_spacing"
        )


def _case_seed(seed: int, case_id: tf.Tensor) -> tf.Tensor:
    bucket = tf.strings.to_hash_bucket_fast(case_id, 2**31 - 1)
    return tf.stack([tf.constant(seed, tf.int64), bucket])


def preprocessed_cases(
    builder: tfds.core.DatasetBuilder,
    split: str,
    case_ids: Sequence[str],
    plan: PreprocessPlan,
    num_classes: int,
    seed: int,
    deterministic: bool = True,
) -> tf.data.Dataset:
    """Preprocessed cases with their foreground locations, cached in memory after one pass."""

    def prepare(ex):
        image, label = preprocess_case(ex["image"], ex["label"], ex["spacing"], plan)
        coords, classes = foreground_locations(label, num_classes, _case_seed(seed, ex["case_id"]))
        return {
            "case_id": ex["case_id"],
            "image": image,
            "label": label,
            "coords": coords,
            "classes": classes,
        }

    ds = read_cases(builder, split, case_ids)
    ds = ds.map(prepare, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    return ds.cache()


def training_dataset(
    cases: tf.data.Dataset,
    num_cases: int,
    patch: PatchConfig,
    num_classes: int,
    seed: int,
    deterministic: bool = True,
) -> tf.data.Dataset:
    """Endless batches ``(image (B, *patch, C), one-hot label (B, *patch, K))``."""

    to_patch = _patch_sampler(patch, num_classes, seed + 1)
    ds = cases.repeat().shuffle(max(num_cases, 1), seed=seed, reshuffle_each_iteration=True)
    ds = ds.enumerate().map(to_patch, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    ds = ds.batch(patch.batch_size, drop_remainder=True).prefetch(AUTOTUNE)
    return ds.with_options(_options(deterministic))


def validation_dataset(
    cases: tf.data.Dataset, num_cases: int, patch: PatchConfig, num_classes: int, seed: int
) -> tf.data.Dataset:
    """A fixed set of ``patch.validation_patches`` patches per case, the same every epoch.

    The patch count is rounded up to whole batches (cycling through the patches again), so
    no batch is partial: a distribution strategy would hand some replica an empty share.
    """

    def repeat_case(case):
        return tf.data.Dataset.from_tensors(case).repeat(patch.validation_patches)

    to_patch = _patch_sampler(patch, num_classes, seed + 2)
    total = num_cases * patch.validation_patches
    padded = -(-total // patch.batch_size) * patch.batch_size
    ds = cases.flat_map(repeat_case).enumerate().map(to_patch).cache()
    ds = ds.repeat().take(padded).batch(patch.batch_size, drop_remainder=True)
    return ds.prefetch(AUTOTUNE).with_options(_options(True))


def _patch_sampler(patch: PatchConfig, num_classes: int, seed: int):
    """``(index, case) -> (image patch, one-hot label patch)``, seeded by ``(seed, index)``."""

    def to_patch(index, case):
        image, label = sample_patch(
            case["image"],
            case["label"],
            case["coords"],
            case["classes"],
            patch.patch_size,
            patch.foreground_share,
            tf.stack([tf.constant(seed, tf.int64), index]),
        )
        return image, tf.one_hot(label, num_classes, dtype=tf.float32)

    return to_patch


def _options(deterministic: bool) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = deterministic
    # Keras would otherwise shard by file, which breaks with a single-record-file split.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return options
