"""Packaging: every data folder of the builders is a listed package, and a build of the
wheel prints no setuptools warning (issue 15: ``pip install .`` printed ~100 of them)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_builder_folder_with_files_is_a_listed_package():
    setuptools = _pyproject()["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    assert setuptools["package-dir"]["medseg_datasets"] == "datasets"
    tracked = subprocess.run(
        ["git", "ls-files", "datasets"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    folders = {Path(f).parent for f in tracked}
    # setuptools installs a folder's files only through a package; an unlisted folder is
    # installed "as data" with a deprecation warning (and will stop being installed)
    expected = {"medseg_datasets" + "".join(f".{p}" for p in f.parts[1:]) for f in folders}
    missing = sorted(expected - listed)
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {missing}"


def test_the_license_file_matches_the_declared_license():
    project = _pyproject()["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text


@pytest.mark.slow
def test_building_the_wheel_prints_no_packaging_warning(tmp_path):
    # a clean copy of the tracked files, as a fresh clone would have them
    files = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    source = tmp_path / "src"
    for name in filter(None, files):
        if not (ROOT / name).is_file():
            continue  # deleted in the work tree
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((ROOT / name).read_bytes())
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(tmp_path / "w"),
         str(source)],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = out.stdout + out.stderr
    warnings = [
        line.strip() for line in log.splitlines()
        if re.search(r"SetuptoolsDeprecationWarning|_Warning:|_BetaConfiguration|"
                     r"absent from the `packages`|importable package", line)
    ]
    assert not warnings, "\n".join(warnings[:10])
    wheel = next((tmp_path / "w").glob("medseg-*.whl"))
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    # the builders' dummy data and the license travel with the wheel
    assert any(n.startswith("medseg_datasets/kits19/dummy_data/case_00000/") for n in names)
    assert any(n.endswith("/licenses/LICENSE") or n.endswith("/LICENSE") for n in names)
