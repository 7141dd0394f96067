"""A build killed half-way leaves nothing that reads as complete, and re-running builds it."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import nibabel as nib
import numpy as np
import tensorflow_datasets as tfds

from medseg.datasets import get_builder

SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import medseg.io
    marker = Path(sys.argv[3])
    real = medseg.io.read_nifti_case

    def slow(case_id, *args, **kwargs):
        if case_id == "c2":  # cases c0 and c1 are read; hang on the third until killed
            marker.write_text("started")
            time.sleep(600)
        return real(case_id, *args, **kwargs)

    medseg.io.read_nifti_case = slow  # the builder looks it up when it reads a case
    from medseg.datasets import prepare
    prepare("nifti_folder", sys.argv[1], sys.argv[2])
    """
)


def _write_folder(root):
    (root / "data" / "imagesTr").mkdir(parents=True)
    (root / "data" / "labelsTr").mkdir()
    for i in range(4):
        label = np.zeros((4, 6, 6), np.uint8)
        label[1:3, 2:4, 2:5] = 1
        nib.save(nib.Nifti1Image((label * 50 + i).astype(np.int16), np.eye(4)), root / f"data/imagesTr/c{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), root / f"data/labelsTr/c{i}.nii.gz")
    config = root / "cfg.json"
    config.write_text(
        '{"name": "killed", "root": "data", "images": "imagesTr/*.nii.gz",'
        ' "label_template": "labelsTr/{case}.nii.gz", "class_names": ["background", "x"]}'
    )
    return str(config)


def test_killed_build_is_not_read_as_complete_and_rebuilds(tmp_path):
    config = _write_folder(tmp_path)
    data_dir = str(tmp_path / "tfds")
    marker = tmp_path / "marker"
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, config, data_dir, str(marker)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert proc.poll() is None, "the build process ended before it was killed"
            assert time.time() < deadline, "the build never reached its third case"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()

    builder = get_builder("nifti_folder", config, data_dir)
    assert not builder.is_prepared()
    final = tmp_path / "tfds" / "nifti_folder" / "killed" / "1.1.0"
    assert not (final / "dataset_info.json").exists()

    # re-running builds the whole dataset cleanly
    from medseg.datasets import prepare

    builder = prepare("nifti_folder", config, data_dir)
    assert builder.is_prepared()
    ids = sorted(ex["case_id"].decode() for ex in tfds.as_numpy(builder.as_dataset(split="train")))
    assert ids == ["c0", "c1", "c2", "c3"]
