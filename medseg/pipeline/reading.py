"""Reading a built TFDS dataset: its case ids, the training/validation split, whole cases."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from medseg.datasets.fingerprint import Fingerprint
from medseg.pipeline.preprocess import PreprocessPlan

AUTOTUNE = tf.data.AUTOTUNE


def graph_only(fn):
    """Skip AutoGraph's source conversion (of this and everything it calls): the sampling and
    augmentation code is written with explicit ``tf.cond``/``tf.while_loop``, and converting
    it would only add seconds of tracing to every pipeline's start."""
    return tf.autograph.experimental.do_not_convert(fn)


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
    fingerprint: dict,
    plan: PreprocessPlan,
    patch_size: Sequence[int],
    dataset: str = "dataset",
    mode: str = "patch",
) -> None:
    """Raise a clear error if ``patch_size`` exceeds any case's preprocessed shape.

    Uses the fingerprint's shapes and spacings, so no record is read. In ``"full"`` mode
    cases are padded up to the patch size, so any size fits.
    """
    if mode == "full":
        return
    fingerprint = Fingerprint.of(fingerprint, f"fingerprint of {dataset}")
    shapes, spacings = fingerprint.shapes[:, :3], fingerprint.spacings
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
