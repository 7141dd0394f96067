"""read → TFDS → predict-shaped array → write keeps affine and orientation.

The path a prediction takes back to disk: a NIfTI file is built into a TFDS dataset,
read back as a record, a label map of the record's shape is "predicted" on it, and it is
written next to its source. The written file must overlay the source in world space.
"""

import nibabel as nib
import numpy as np
import pytest
import tensorflow_datasets as tfds
from medseg_datasets.nifti_folder import Builder, NiftiFolderConfig

from medseg.io import kits19_affine, write_like, write_nifti

AFFINES = {
    "ras": np.diag([0.8, 0.8, 2.5, 1.0]) + np.array([[0, 0, 0, -40.0], [0, 0, 0, 12.0], [0, 0, 0, 7.0], [0, 0, 0, 0]]),
    "lps": np.diag([-0.7, -0.7, 3.0, 1.0]) + np.array([[0, 0, 0, 90.0], [0, 0, 0, 80.0], [0, 0, 0, -30.0], [0, 0, 0, 0]]),
    "kits19": kits19_affine((3.0, 0.78, 0.78)),
}


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_prediction_written_from_a_tfds_record_overlays_its_source(tmp_path, name):
    affine = AFFINES[name]
    rng = np.random.default_rng(0)
    shape = (6, 9, 7)
    image = rng.integers(-200, 300, size=shape).astype(np.int16)
    label = np.zeros(shape, np.uint8)
    label[2:4, 3:6, 1:3] = 1
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    source = tmp_path / "imagesTr" / "case_a.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), source)
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "labelsTr" / "case_a.nii.gz")

    config = NiftiFolderConfig(
        name=f"roundtrip_{name}",
        root=str(tmp_path),
        images="imagesTr/*.nii.gz",
        label_template="labelsTr/{case}.nii.gz",
        class_names=("background", "organ"),
    )
    builder = Builder(config=config, data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare()
    (record,) = tfds.as_numpy(builder.as_dataset(split="train"))

    # a "prediction" on the record's grid: the stored label itself
    prediction = record["label"].copy()
    from_record = write_nifti(tmp_path / "pred_record.nii.gz", prediction, record["affine"])
    like_source = write_like(tmp_path / "pred_like.nii.gz", prediction, source)

    source_img = nib.load(source)
    for path in (from_record, like_source):
        out = nib.load(path)
        np.testing.assert_allclose(out.affine, source_img.affine, atol=1e-5)
        assert nib.aff2axcodes(out.affine) == nib.aff2axcodes(source_img.affine)
        np.testing.assert_array_equal(np.asanyarray(out.dataobj), label)
        # the labelled voxel with the smallest index sits at the same world point
        index = np.argwhere(np.asanyarray(out.dataobj) == 1)[0]
        world = out.affine @ np.append(index, 1.0)
        np.testing.assert_allclose(world, source_img.affine @ np.append(index, 1.0), atol=1e-5)
    assert nib.aff2axcodes(affine) == {"ras": ("R", "A", "S"), "lps": ("L", "P", "S"), "kits19": ("I", "P", "L")}[name]


def test_users_own_folder_builds_from_a_json_config_through_the_cli(tmp_path, capsys):
    import json

    from medseg.cli import main
    from medseg.datasets import get_builder, read_fingerprint

    (tmp_path / "data" / "imagesTr").mkdir(parents=True)
    (tmp_path / "data" / "labelsTr").mkdir()
    for i in range(2):
        label = np.zeros((4, 5, 6), np.uint8)
        label[1:3, 1:4, 2:5] = 1
        image = (label * 100 + i).astype(np.int16)
        nib.save(nib.Nifti1Image(image, AFFINES["ras"]), tmp_path / f"data/imagesTr/c{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, AFFINES["ras"]), tmp_path / f"data/labelsTr/c{i}.nii.gz")
    config = tmp_path / "mine.json"
    config.write_text(
        json.dumps(
            {
                "name": "mine",
                "root": "data",
                "images": "imagesTr/*.nii.gz",
                "label_template": "labelsTr/{case}.nii.gz",
                "class_names": ["background", "organ"],
            }
        )
    )
    data_dir = str(tmp_path / "tfds")
    assert main(["build", "nifti_folder", "--config", str(config), "--data-dir", data_dir]) == 0
    assert "nifti_folder/mine/1.1.0" in capsys.readouterr().out
    fingerprint = read_fingerprint(get_builder("nifti_folder", str(config), data_dir))
    assert fingerprint["num_cases"] == 2
    assert fingerprint["class_voxel_counts"][1] == 2 * 2 * 3 * 3
