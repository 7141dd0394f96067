"""The CaseBuilder base: lookahead loading, one-copy records and shards, order, spacing."""

from __future__ import annotations

import json
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core import dataset_metadata, example_serializer

from medseg.datasets import builder as base
from medseg.datasets import records
from medseg.datasets.builder import CaseBuilder, case_features
from medseg.datasets.fingerprint import FingerprintAccumulator
from medseg.io import CaseRecord, MedsegIOError

CLASSES = ["background", "a", "b"]
# generation order that is neither sorted nor the order of the ids' hashes
CASE_IDS = ["zeta", "alpha", "mid", "beta", "omega"]


class ToyCases(CaseBuilder, skip_registration=True):
    """A CaseBuilder over in-memory cases (``loaders`` given to the constructor)."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, loaders, **kwargs):
        self._loaders = loaders
        super().__init__(**kwargs)

    @classmethod
    def get_metadata(cls):  # no README/CITATIONS: this module is not a dataset package
        return dataset_metadata.DatasetMetadata(description="", citation="", tags=[])

    def class_names(self):
        return list(CLASSES)

    def _info(self):
        return self.dataset_info_from_configs(
            features=case_features(np.int16), metadata=tfds.core.MetadataDict()
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_cases(self._loaders)}


def make_case(index: int, case_id: str) -> CaseRecord:
    """A case whose volumes are Fortran-ordered, as NIfTI readers return them."""
    rng = np.random.default_rng(index)
    shape = (5 + index, 33, 20 + 3 * index)
    image = np.asfortranarray(rng.integers(-1024, 2000, shape).astype(np.int16))
    label = np.asfortranarray(rng.choice(3, size=shape, p=[0.7, 0.2, 0.1]).astype(np.uint8))
    # float64 spacings that float32 cannot hold exactly
    spacing = (0.1 + index, 0.7 + 0.01 * index, 2.3)
    affine = np.diag([*spacing[::-1], 1.0])
    return CaseRecord(case_id, image, spacing, affine, label, source=f"{case_id}.nii.gz")


CASES = [make_case(i, case_id) for i, case_id in enumerate(CASE_IDS)]


def loaders_of(cases):
    return [lambda case=case: case for case in cases]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The toy dataset, built once."""
    builder = ToyCases(loaders=loaders_of(CASES), data_dir=str(tmp_path_factory.mktemp("d")))
    builder.download_and_prepare()
    return builder


# --- lookahead loading --------------------------------------------------------------


def test_lookahead_yields_in_order_and_loads_the_next_case_meanwhile():
    started = []

    def loader(i):
        def load():
            started.append(i)
            return i

        return load

    got = []
    for value in base._lookahead([loader(i) for i in range(5)]):
        time.sleep(0.02)  # the next load starts while this case is held
        assert started[-1] == min(value + 1, 4)
        got.append(value)
    assert got == list(range(5))
    assert list(base._lookahead([])) == []


def test_lookahead_loads_in_a_background_thread():
    threads = []

    def load():
        threads.append(threading.current_thread())
        return 1

    list(base._lookahead([load, load]))
    assert threading.main_thread() not in threads


def test_loader_error_names_the_case_when_it_is_reached():
    def bad():
        raise MedsegIOError("/data/case_2.nii.gz: truncated or corrupt (EOFError)")

    loaders = loaders_of(CASES[:2]) + [bad] + loaders_of(CASES[3:])
    gen = ToyCases(loaders=[], data_dir="/nonexistent")._generate_cases(loaders)
    assert [next(gen)[1]["case_id"] for _ in range(2)] == CASE_IDS[:2]
    with pytest.raises(MedsegIOError, match=r"case_2\.nii\.gz: truncated"):
        next(gen)


def test_build_error_names_the_failing_case(tmp_path):
    def bad():
        raise MedsegIOError("/data/case_3.nii.gz: no such file")

    builder = ToyCases(loaders=loaders_of(CASES[:3]) + [bad], data_dir=str(tmp_path))
    with pytest.raises(Exception, match=r"case_3\.nii\.gz: no such file"):
        builder.download_and_prepare()


def test_at_most_two_cases_are_loaded_at_once(tmp_path, monkeypatch):
    live = {"now": 0, "peak": 0}
    serialize = records.CaseSerializer.serialize

    def slow_serialize(self, example):
        time.sleep(0.1)  # a slow write: the next case loads meanwhile (peak 2, never 3)
        return serialize(self, example)

    monkeypatch.setattr(records.CaseSerializer, "serialize", slow_serialize)
    lock = threading.Lock()

    def released():
        with lock:
            live["now"] -= 1

    def loader(index, case_id):
        def load():
            record = make_case(index, case_id)
            with lock:
                live["now"] += 1
                live["peak"] = max(live["peak"], live["now"])
            # the case is alive while its image is
            weakref.finalize(record.image, released)
            return record

        return load

    builder = ToyCases(
        loaders=[loader(i, c) for i, c in enumerate(CASE_IDS)], data_dir=str(tmp_path)
    )
    builder.download_and_prepare()
    assert live["peak"] == 2
    assert live["now"] == 0


def test_repeated_case_id_is_an_error(tmp_path):
    builder = ToyCases(loaders=loaders_of([CASES[0], CASES[1], CASES[0]]), data_dir=str(tmp_path))
    with pytest.raises(Exception, match=r"case id 'zeta' of case 3 .* repeats case 1"):
        builder.download_and_prepare()


# --- records -------------------------------------------------------------------------


def _reference_example(features, example) -> tf.train.Example:
    """The example as TFDS's own encoder and serializer write it."""
    serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
    return tf.train.Example.FromString(
        serializer.serialize_example(features.encode_example(example))
    )


@pytest.mark.parametrize("channels", [None, 2])
def test_case_serializer_writes_what_tfds_writes(channels):
    features = case_features(np.int16, channels=channels)
    rng = np.random.default_rng(3)
    image_shape = (4, 300, 7) if channels is None else (4, 300, 7, channels)
    for layout in (np.ascontiguousarray, np.asfortranarray):
        example = {
            "image": layout(rng.integers(-1024, 3000, image_shape).astype(np.int16)),
            "label": layout(rng.integers(0, 3, (4, 300, 7)).astype(np.uint8)),
            "spacing": np.float32([2.5, 0.7, 0.7]),
            "affine": np.diag([0.7, 0.7, 2.5, 1.0]),
            "case_id": "case_00007",
        }
        ours = tf.train.Example.FromString(records.CaseSerializer(features).serialize(example))
        assert ours == _reference_example(features, example)


def test_case_serializer_writes_empty_volumes_and_refuses_big_endian():
    features = case_features(np.int16)
    example = {
        "image": np.arange(24, dtype=">i2").reshape(2, 3, 4).astype(np.int16),
        "label": np.zeros(base.NO_LABEL_SHAPE, np.uint8),  # an unlabelled case
        "spacing": np.float32([1, 1, 1]),
        "affine": np.eye(4),
        "case_id": "x",
    }
    example_be = {**example, "image": example["image"].astype(">i2")}
    serializer = records.CaseSerializer(features)
    reference = _reference_example(features, example)
    assert tf.train.Example.FromString(serializer.serialize(example)) == reference
    with pytest.raises(ValueError, match="feature 'image': dtype >i2 does not match int16"):
        serializer.serialize(example_be)


def test_case_serializer_checks_dtype_and_rank():
    serializer = records.CaseSerializer(case_features(np.int16))
    example = {
        "image": np.zeros((2, 2, 2), np.int16),
        "label": np.zeros((2, 2, 2), np.uint8),
        "spacing": np.float32([1, 1, 1]),
        "affine": np.eye(4),
        "case_id": "x",
    }
    with pytest.raises(ValueError, match="feature 'image': dtype float32 does not match int16"):
        serializer.serialize({**example, "image": np.zeros((2, 2, 2), np.float32)})
    with pytest.raises(ValueError, match=r"feature 'label': shape \(2, 2\) does not match"):
        serializer.serialize({**example, "label": np.zeros((2, 2), np.uint8)})


def test_c_order_bytes_are_exact_for_any_layout():
    rng = np.random.default_rng(0)
    for shape in [(3, 40, 7), (2, 5, 3, 4), (1, 1, 1), (4, 0, 3)]:
        array = rng.integers(-5, 5, shape).astype(np.int16)
        for source in (array, np.asfortranarray(array), array[:, ::2], array.swapaxes(0, 2)):
            raw = records._c_order_bytes(source, block=3)
            assert bytes(raw) == np.ascontiguousarray(source).tobytes()


def test_split_is_sharded_by_size_in_order(tmp_path):
    builder = ToyCases(loaders=loaders_of(CASES), data_dir=str(tmp_path))
    one_case = CASES[0].image.nbytes + CASES[0].label.nbytes
    # every record is bigger than one case's volumes: 2 cases per shard at most
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(records, "MAX_SHARD_BYTES", 3 * one_case)
        builder.download_and_prepare()
    split = builder.info.splits["train"]
    assert split.num_examples == len(CASES)
    assert len(split.shard_lengths) > 1 and sum(split.shard_lengths) == len(CASES)
    files = sorted(Path(builder.data_dir).glob("*.tfrecord*"))
    assert [f.name for f in files] == [
        f"toy_cases-train.tfrecord-{i:05d}-of-{len(files):05d}" for i in range(len(files))
    ]
    assert split.num_bytes == sum(f.stat().st_size for f in files) - 16 * len(CASES)
    assert not list(Path(builder.data_dir).glob(".*tmp"))
    ds = builder.as_dataset(split="train", shuffle_files=False)
    check_cases({**ex, "case_id": ex["case_id"].decode()} for ex in tfds.as_numpy(ds))


def test_features_are_saved_as_plain_tensors(built):
    saved = built.info.features.to_json()["content"]["features"]
    for key in ("image", "label"):
        feature = saved[key]
        name = feature.get("pythonClassName") or feature.get("type")
        assert name == "tensorflow_datasets.core.features.tensor_feature.Tensor"
        assert json.dumps(feature).count('"bytes"') == 1  # the encoding


def check_cases(examples):
    examples = list(examples)
    assert [ex["case_id"] for ex in examples] == CASE_IDS
    for case, ex in zip(CASES, examples, strict=True):
        for key in ("image", "label"):
            expected = getattr(case, key)
            assert ex[key].dtype == expected.dtype and ex[key].shape == expected.shape
            assert np.array_equal(ex[key], expected)


def test_round_trip_is_bit_exact_through_as_dataset(built):
    ds = built.as_dataset(split="train", shuffle_files=False)
    check_cases({**ex, "case_id": ex["case_id"].decode()} for ex in tfds.as_numpy(ds))


def test_round_trip_is_bit_exact_when_decoded_in_a_tf_data_map(built):
    features = built.info.features
    skip = {k: tfds.decode.SkipDecoding() for k in ("image", "label")}
    ds = built.as_dataset(split="train", shuffle_files=False, decoders=skip)

    def decode(ex):  # as medseg.pipeline does, in graph mode
        ex = dict(ex)
        for key in ("image", "label"):
            ex[key] = features[key].decode_example(ex[key])
        return ex

    ds = ds.map(decode, num_parallel_calls=2, deterministic=True)
    check_cases({**ex, "case_id": ex["case_id"].decode()} for ex in ds.as_numpy_iterator())


def test_records_read_back_with_plain_tfds(built):
    """A reader without medseg's builder classes (features from features.json) decodes."""
    restored = tfds.builder_from_directory(built.data_dir)
    assert type(restored.info.features["image"]) is tfds.features.Tensor
    ds = restored.as_dataset(split="train", shuffle_files=False)
    check_cases({**ex, "case_id": ex["case_id"].decode()} for ex in tfds.as_numpy(ds))


# --- record order -------------------------------------------------------------------


def test_records_are_written_unshuffled_in_generation_order(built):
    assert built.info.disable_shuffling
    ids = [ex["case_id"].decode() for ex in tfds.as_numpy(built.as_dataset(split="train"))]
    assert ids == CASE_IDS


# --- fingerprint ---------------------------------------------------------------------


def test_fingerprint_sees_the_spacing_as_stored(built):
    stored = built.info.metadata["fingerprint"]
    expected = [[float(v) for v in np.asarray(c.spacing, np.float32)] for c in CASES]
    assert stored["spacings"] == expected
    # recomputed from the records, the fingerprint is the stored one
    acc = FingerprintAccumulator(CLASSES, seed=0)
    for ex in tfds.as_numpy(built.as_dataset(split="train", shuffle_files=False)):
        acc.add(ex["image"], ex["label"], ex["spacing"])
    assert acc.result() == stored
    assert built.info.metadata["fingerprint_hash"] == base.fingerprint_hash(stored)


# --- empty splits --------------------------------------------------------------------


class ToySplits(ToyCases, skip_registration=True):
    """ToyCases with a ``test`` split (unfingerprinted) beside ``train``."""

    def __init__(self, *, test_loaders, **kwargs):
        self._test_loaders = test_loaders
        super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
        return {
            "train": self._generate_cases(self._loaders),
            "test": self._generate_cases(self._test_loaders, fingerprint=False),
        }


def test_generate_cases_knows_its_case_count_before_loading_any():
    calls = []
    cases = ToyCases(loaders=[], data_dir="/nonexistent")._generate_cases(
        [lambda case=case: calls.append(case.case_id) or case for case in CASES[:3]]
    )
    assert len(cases) == 3 and calls == []
    assert [key for key, _ in cases] == [0, 1, 2]
    assert calls == CASE_IDS[:3]


def test_split_without_cases_is_left_out_and_the_rest_reads_back(tmp_path):
    builder = ToySplits(loaders=loaders_of(CASES), test_loaders=[], data_dir=str(tmp_path))
    builder.download_and_prepare()
    restored = tfds.builder_from_directory(builder.data_dir)
    assert list(restored.info.splits) == ["train"]
    assert restored.info.splits["train"].num_examples == len(CASES)
    ds = restored.as_dataset(split="train", shuffle_files=False)
    check_cases({**ex, "case_id": ex["case_id"].decode()} for ex in tfds.as_numpy(ds))
    assert restored.info.metadata["fingerprint"]["num_cases"] == len(CASES)


def test_training_split_without_cases_is_refused_before_anything_is_written(tmp_path):
    read = []

    def test_case():
        read.append("t")
        return CASES[0]

    builder = ToySplits(loaders=[], test_loaders=[test_case], data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"toy_splits/1\.0\.0: split 'train' has no cases"):
        builder.download_and_prepare()
    assert read == []  # the test split was not even read
    assert not builder.is_prepared()
    assert not list(Path(tmp_path).rglob("*.tfrecord*"))
