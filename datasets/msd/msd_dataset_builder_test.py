"""msd builder: TFDS's standard checks on tiny Decathlon-layout tasks, 4D images and errors.

``dummy_data/`` holds a Task04_Hippocampus-like 3D task and a Task01_BrainTumour-like 4D
(four modalities) task, written by :func:`make_msd_tree`; regenerate them with::

    python -c "from medseg_datasets.msd.msd_dataset_builder_test import \
make_msd_tree, DUMMY_DATA; make_msd_tree(DUMMY_DATA)"
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tensorflow_datasets as tfds
from medseg_datasets.msd import msd_dataset_builder

from medseg.datasets import get_builder, read_fingerprint
from medseg.io import MedsegIOError

DUMMY_DATA = Path(__file__).resolve().parent / "dummy_data"

# task -> (prefix of case files, training shapes, test shapes, spacing, channels)
DUMMY_TASKS = {
    "Task04_Hippocampus": (
        "hippocampus",
        [(9, 12, 8), (8, 11, 9), (10, 12, 7)],
        [(9, 10, 8)],
        (1.0, 1.0, 1.0),
        None,
    ),
    "Task01_BrainTumour": ("BRATS", [(10, 12, 6), (9, 11, 6)], [(10, 10, 5)], (1.0, 1.0, 1.0), 4),
}


def make_msd_tree(
    root, tasks=("Task04_Hippocampus", "Task01_BrainTumour"), macos_junk=True
) -> Path:
    """Write tiny Decathlon tasks under ``root`` as the MSD tarballs extract.

    Each task gets ``imagesTr/``, ``labelsTr/``, ``imagesTs/`` and a ``dataset.json``
    copying the official one's keys, labels and modalities. Images are float32 MR
    volumes (4D, channels last on disk, for BrainTumour), labels uint8, both with
    sform and qform set (codes 1) as the Decathlon's files.

    Parameters
    ----------
    root : path-like
        Folder that receives ``TaskXX_Name/`` folders.
    tasks : sequence of str
        Keys of :data:`DUMMY_TASKS`.
    macos_junk : bool
        Also write the ``._*`` AppleDouble files the real tarballs carry.

    Returns
    -------
    Path
        ``root``.
    """
    root = Path(root)
    configs = msd_dataset_builder.Builder.builder_configs
    for task in tasks:
        prefix, train_shapes, test_shapes, spacing, channels = DUMMY_TASKS[task]
        config = configs[task]
        task_dir = root / task
        for sub in ("imagesTr", "labelsTr", "imagesTs"):
            (task_dir / sub).mkdir(parents=True, exist_ok=True)
        affine = np.diag([*(-s for s in spacing[:2]), spacing[2], 1.0])
        affine[:3, 3] = (10.0, 12.0, -5.0)
        training, test = [], []
        number = 0
        for split, shapes in (("Tr", train_shapes), ("Ts", test_shapes)):
            for shape in shapes:
                number += 1
                name = f"{prefix}_{number:03d}.nii.gz"
                image, label = _case_arrays(shape, channels, len(config.labels), number)
                _save(image, affine, task_dir / f"images{split}" / name)
                if split == "Tr":
                    _save(label, affine, task_dir / "labelsTr" / name)
                    training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
                else:
                    test.append(f"./imagesTs/{name}")
                if macos_junk:
                    # AppleDouble files: Finder metadata, not NIfTI
                    for sub in (f"images{split}", "labelsTr") if split == "Tr" else ("imagesTs",):
                        (task_dir / sub / f"._{name}").write_bytes(b"\x00\x05\x16\x07" + bytes(28))
        meta = {
            "name": task.split("_", 1)[1],
            "description": f"tiny {task}-like test data for medseg",
            "reference": "medseg",
            "licence": "CC-BY-SA 4.0",
            "release": "1.0",
            "tensorImageSize": "4D" if channels else "3D",
            "modality": {str(i): m for i, m in enumerate(config.modalities)},
            "labels": {str(i): c for i, c in enumerate(config.labels)},
            "numTraining": len(training),
            "numTest": len(test),
            "training": training,
            "test": test,
        }
        (task_dir / "dataset.json").write_text(json.dumps(meta, indent=4) + "\n")
        if macos_junk:
            (root / f"._{task}").write_bytes(b"\x00\x05\x16\x07" + bytes(28))
    return root


def _case_arrays(shape, channels, num_classes, seed):
    """An ellipsoid of classes 1.. in noise; MR-like float32 intensities per channel."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij"))
    radius = np.sqrt((grid**2).sum(axis=0))
    label = np.zeros(shape, np.uint8)
    for value in range(1, num_classes):
        label[radius < 0.9 * (num_classes - value) / (num_classes - 1)] = value
    base = 100.0 + 50.0 * label
    n = channels or 1
    image = np.stack([base * (1 + 0.2 * c) for c in range(n)], axis=-1)
    image = np.round(image + rng.normal(0, 5, image.shape), 1).astype(np.float32)
    return (image if channels else image[..., 0]), label


def _save(array, affine, path):
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, path)


class MsdHippocampusTest(tfds.testing.DatasetBuilderTestCase):
    """Builds Task04_Hippocampus from dummy_data/ (the manual dir) and reads it back."""

    DATASET_CLASS = msd_dataset_builder.Builder
    BUILDER_CONFIG_NAMES_TO_TEST = ["Task04_Hippocampus"]
    SPLITS = {"train": 3, "test": 1}


class MsdBrainTumourTest(tfds.testing.DatasetBuilderTestCase):
    """The 4D, four-modality task."""

    DATASET_CLASS = msd_dataset_builder.Builder
    BUILDER_CONFIG_NAMES_TO_TEST = ["Task01_BrainTumour"]
    SPLITS = {"train": 2, "test": 1}


def build(data_dir, manual_dir=DUMMY_DATA, config="Task04_Hippocampus"):
    builder = msd_dataset_builder.Builder(config=config, data_dir=str(data_dir))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
    )
    return builder


def read_split(builder, split):
    ds = builder.as_dataset(split=split, shuffle_files=False)
    return {ex["case_id"].decode(): ex for ex in tfds.as_numpy(ds)}


def edit_dataset_json(task_dir: Path, edit) -> None:
    path = task_dir / "dataset.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def brain(tmp_path_factory):
    return build(tmp_path_factory.mktemp("msd_brain"), config="Task01_BrainTumour")


@pytest.fixture(scope="module")
def hippocampus(tmp_path_factory):
    return build(tmp_path_factory.mktemp("msd_hippo"))


def test_dummy_data_is_what_make_msd_tree_writes(tmp_path):
    fresh = make_msd_tree(tmp_path)
    committed = sorted(p.relative_to(DUMMY_DATA) for p in DUMMY_DATA.rglob("*") if p.is_file())
    assert committed == sorted(p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file())
    for rel in committed:
        if rel.name.endswith(".nii.gz") and not rel.name.startswith("._"):
            a, b = nib.load(DUMMY_DATA / rel), nib.load(fresh / rel)
            np.testing.assert_array_equal(a.dataobj, b.dataobj, err_msg=str(rel))
            np.testing.assert_array_equal(a.affine, b.affine, err_msg=str(rel))
        elif rel.name == "dataset.json":
            assert json.loads((DUMMY_DATA / rel).read_text()) == json.loads(
                (fresh / rel).read_text()
            )


def test_4d_images_become_channels(brain):
    records = read_split(brain, "train")
    assert sorted(records) == ["BRATS_001", "BRATS_002"]
    for case_id, example in records.items():
        source = nib.load(DUMMY_DATA / "Task01_BrainTumour" / "imagesTr" / f"{case_id}.nii.gz")
        assert example["image"].dtype == np.float32
        assert example["image"].shape == source.shape and example["image"].shape[-1] == 4
        np.testing.assert_array_equal(example["image"], np.asarray(source.dataobj))
        assert example["label"].shape == source.shape[:3]
        np.testing.assert_array_equal(example["affine"], source.affine)
    assert brain.info.features["image"].shape == (None, None, None, 4)
    assert brain.info.metadata["class_names"] == [
        "background",
        "edema",
        "non-enhancing tumor",
        "enhancing tumour",
    ]
    assert brain.info.metadata["regions"]["tumour_core"] == [2, 3]


def test_hippocampus_records_and_fingerprint(hippocampus):
    records = read_split(hippocampus, "train")
    assert sorted(records) == ["hippocampus_001", "hippocampus_002", "hippocampus_003"]
    for case_id, example in records.items():
        label = nib.load(DUMMY_DATA / "Task04_Hippocampus" / "labelsTr" / f"{case_id}.nii.gz")
        np.testing.assert_array_equal(example["label"], np.asarray(label.dataobj))
        assert example["image"].dtype == np.float32 and example["image"].ndim == 3
        np.testing.assert_allclose(example["spacing"], [1.0, 1.0, 1.0])
    fingerprint = read_fingerprint(hippocampus)
    assert fingerprint["num_cases"] == 3  # the test split stays out
    assert fingerprint["class_names"] == ["background", "Anterior", "Posterior"]


def test_unlabelled_test_split_has_empty_labels(hippocampus, brain):
    for builder, case_id in ((hippocampus, "hippocampus_004"), (brain, "BRATS_003")):
        records = read_split(builder, "test")
        assert list(records) == [case_id]
        assert records[case_id]["label"].shape == (0, 0, 0)


def test_macos_dot_files_are_ignored(tmp_path):
    data = make_msd_tree(tmp_path / "msd", tasks=["Task04_Hippocampus"])
    assert (data / "Task04_Hippocampus" / "imagesTr" / "._hippocampus_001.nii.gz").exists()
    # a dataset.json listing an AppleDouble file: skipped, not read
    edit_dataset_json(
        data / "Task04_Hippocampus",
        lambda m: m["test"].append("./imagesTs/._hippocampus_004.nii.gz"),
    )
    builder = build(tmp_path / "tfds", manual_dir=data)
    assert builder.info.splits["train"].num_examples == 3
    assert builder.info.splits["test"].num_examples == 1


def test_task_folder_itself_as_manual_dir(tmp_path):
    data = make_msd_tree(tmp_path / "msd", tasks=["Task04_Hippocampus"], macos_junk=False)
    builder = build(tmp_path / "tfds", manual_dir=data / "Task04_Hippocampus")
    assert builder.info.splits["train"].num_examples == 3


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd", "./imagesTr/../../x.nii.gz"])
def test_dataset_json_path_outside_the_task_is_rejected(tmp_path, bad):
    data = make_msd_tree(tmp_path / "msd", tasks=["Task04_Hippocampus"], macos_junk=False)
    edit_dataset_json(data / "Task04_Hippocampus", lambda m: m["training"][0].update(image=bad))
    with pytest.raises(MedsegIOError, match="dataset.json") as err:
        build(tmp_path / "tfds", manual_dir=data)
    assert bad in str(err.value)


def test_dataset_json_of_another_task_is_rejected(tmp_path):
    data = make_msd_tree(tmp_path / "msd", tasks=["Task04_Hippocampus"], macos_junk=False)
    edit_dataset_json(data / "Task04_Hippocampus", lambda m: m["labels"].update({"2": "tail"}))
    with pytest.raises(MedsegIOError, match=r"dataset\.json.*labels"):
        build(tmp_path / "tfds", manual_dir=data)
    # the wrong task folder altogether: modality and labels differ
    shutil.move(data / "Task04_Hippocampus", data / "x")
    with pytest.raises(MedsegIOError, match="Task02_Heart"):
        build(tmp_path / "tfds2", manual_dir=data / "x", config="Task02_Heart")


def test_missing_listed_file_is_an_error_naming_it(tmp_path):
    data = make_msd_tree(tmp_path / "msd", tasks=["Task04_Hippocampus"], macos_junk=False)
    (data / "Task04_Hippocampus" / "labelsTr" / "hippocampus_002.nii.gz").unlink()
    with pytest.raises(MedsegIOError, match=r"labelsTr.hippocampus_002\.nii\.gz"):
        build(tmp_path / "tfds", manual_dir=data)


def test_missing_task_lists_what_manual_dir_holds(tmp_path):
    data = make_msd_tree(tmp_path / "msd", tasks=["Task04_Hippocampus"])
    with pytest.raises(MedsegIOError, match=r"Task09_Spleen.*found: Task04_Hippocampus$"):
        build(tmp_path / "tfds", manual_dir=data, config="Task09_Spleen")


@pytest.mark.parametrize("edit", ["empty", "absent"])
def test_task_without_test_cases_builds_the_train_split_alone(tmp_path, edit):
    data = make_msd_tree(tmp_path / "msd", tasks=["Task04_Hippocampus"], macos_junk=False)
    task = data / "Task04_Hippocampus"
    if edit == "empty":
        edit_dataset_json(task, lambda m: m.update(test=[], numTest=0))
    else:
        edit_dataset_json(task, lambda m: m.pop("test"))
    build(tmp_path / "tfds", manual_dir=data)
    reloaded = msd_dataset_builder.Builder(
        config="Task04_Hippocampus", data_dir=str(tmp_path / "tfds")
    )
    assert reloaded.is_prepared()
    assert list(reloaded.info.splits) == ["train"]
    records = read_split(reloaded, "train")
    assert sorted(records) == ["hippocampus_001", "hippocampus_002", "hippocampus_003"]
    image = nib.load(task / "imagesTr" / "hippocampus_002.nii.gz")
    np.testing.assert_array_equal(
        records["hippocampus_002"]["image"], np.asarray(image.dataobj, np.float32)
    )
    assert read_fingerprint(reloaded)["num_cases"] == 3


def test_task_without_training_cases_is_refused_before_writing(tmp_path):
    data = make_msd_tree(tmp_path / "msd", tasks=["Task04_Hippocampus"], macos_junk=False)
    edit_dataset_json(data / "Task04_Hippocampus", lambda m: m.update(training=[]))
    with pytest.raises(MedsegIOError, match=r"dataset\.json: 'training' lists no case"):
        build(tmp_path / "tfds", manual_dir=data)
    assert not list((tmp_path / "tfds").rglob("*.tfrecord*"))


def test_configs_hold_every_task():
    configs = msd_dataset_builder.Builder.builder_configs
    assert sorted(configs) == [
        "Task01_BrainTumour",
        "Task02_Heart",
        "Task03_Liver",
        "Task04_Hippocampus",
        "Task05_Prostate",
        "Task06_Lung",
        "Task07_Pancreas",
        "Task08_HepaticVessel",
        "Task09_Spleen",
        "Task10_Colon",
    ]
    assert configs["Task05_Prostate"].modalities == ("T2", "ADC")
    assert configs["Task05_Prostate"].channels == 2
    assert configs["Task01_BrainTumour"].channels == 4
    for name, config in configs.items():
        assert config.labels[0] == "background", name
        ct = config.modalities == ("CT",)
        assert config.image_dtype == ("int16" if ct else "float32"), name
        if len(config.modalities) == 1:
            assert config.channels is None, name
    builder = get_builder("msd", "Task05_Prostate")
    assert builder.info.features["image"].shape == (None, None, None, 2)
    assert get_builder("msd", "Task09_Spleen").info.features["image"].dtype == np.int16


if __name__ == "__main__":
    tfds.testing.test_main()
