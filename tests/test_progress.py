"""Progress display (medseg.progress): bars on a terminal, sparse lines or nothing otherwise."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest

from medseg import progress
from medseg.progress import choose_display, keras_verbose, start_bar


class _Terminal(io.StringIO):
    """A stream that says it is a terminal, as a console's does."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _not_quiet(monkeypatch):
    monkeypatch.delenv("MEDSEG_QUIET", raising=False)
    progress.set_quiet(False)
    yield
    progress.set_quiet(False)


def test_display_follows_the_stream_quiet_and_environment(monkeypatch):
    assert choose_display(_Terminal()) == "bar"
    assert choose_display(io.StringIO()) == "lines"
    progress.set_quiet()
    assert choose_display(_Terminal()) == "quiet"
    progress.set_quiet(False)
    monkeypatch.setenv("MEDSEG_QUIET", "1")
    assert choose_display(_Terminal()) == "quiet"
    monkeypatch.setenv("MEDSEG_QUIET", "0")
    assert choose_display(_Terminal()) == "bar"


def test_keras_verbose_is_a_bar_only_on_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stdout", _Terminal())
    assert keras_verbose() == 1
    monkeypatch.setenv("MEDSEG_QUIET", "true")
    assert keras_verbose() == 0
    monkeypatch.delenv("MEDSEG_QUIET")
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert keras_verbose() == 2


def test_papermill_bar_only_on_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert progress.papermill_progress() is True
    progress.set_quiet()
    assert progress.papermill_progress() is False
    progress.set_quiet(False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert progress.papermill_progress() is False


def test_terminal_gets_a_tqdm_bar():
    stream = _Terminal()
    with start_bar(3, "predict", unit="case", stream=stream) as bar:
        assert bar.active
        for _ in range(3):
            bar.update()
    text = stream.getvalue()
    assert "predict" in text and "%|" in text and "3/3" in text and "\r" in text


def test_plain_lines_are_sparse_and_without_carriage_returns():
    stream = io.StringIO()
    with start_bar(4, "evaluate", unit="case", stream=stream, interval=0.0) as bar:
        assert not bar.active
        bar.set_postfix_str("case_7")
        for _ in range(4):
            bar.update()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert lines[0].startswith("evaluate: 1/4 case case_7 (") and "ETA" in lines[0]
    assert len(lines) == 5 and "4/4" in lines[-1] and "done in" in lines[-1]
    # a loop shorter than the interval prints nothing
    quiet_stream = io.StringIO()
    with start_bar(4, "evaluate", stream=quiet_stream, interval=3600.0) as bar:
        for _ in range(4):
            bar.update()
    assert quiet_stream.getvalue() == ""


def test_nested_small_and_quiet_bars_display_nothing(capsys):
    terminal = _Terminal()
    # below min_total: no bar even on a terminal
    with start_bar(3, "windows", stream=terminal, leave=False, min_total=32) as bar:
        bar.update()
    assert terminal.getvalue() == ""
    # a nested bar prints no plain lines
    plain = io.StringIO()
    with start_bar(100, "windows", stream=plain, leave=False, interval=0.0) as bar:
        bar.update(100)
    assert plain.getvalue() == ""
    progress.set_quiet()
    with start_bar(3, "predict", stream=terminal, interval=0.0) as bar:
        bar.update(3)
        bar.write("case_a: written")  # the caller's own lines still print
    assert terminal.getvalue() == ""
    assert capsys.readouterr().out == "case_a: written\n"


def test_builder_counts_cases_as_they_are_consumed():
    from medseg.datasets.builder import _counted

    stream = io.StringIO()
    bar = start_bar(3, "build", unit="case", stream=stream, interval=0.0)

    class Case:
        def __init__(self, case_id):
            self.case_id = case_id

    seen = [case.case_id for case in _counted(iter([Case("a"), Case("b"), Case("c")]), bar)]
    assert seen == ["a", "b", "c"]
    lines = stream.getvalue().splitlines()
    # advanced after each case was consumed, closed at the end
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3", "3/3"]
    assert "c" in lines[-1] and "done in" in lines[-1]


def _tiny_training(steps: int):
    import keras
    import tensorflow as tf

    from medseg.training.loop import custom_fit

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    x = np.ones((2, 4), np.float32)
    data = tf.data.Dataset.from_tensors((x, np.zeros((2, 1), np.float32))).repeat()
    return lambda: custom_fit(model, data, None, epochs=1, steps_per_epoch=steps)


def test_custom_loop_shows_keras_bar_on_a_terminal_and_one_line_otherwise(monkeypatch):
    run = _tiny_training(steps=3)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    run()
    assert "3/3" in terminal.getvalue() and "\r" in terminal.getvalue()
    plain = io.StringIO()
    monkeypatch.setattr(sys, "stdout", plain)
    run()
    text = plain.getvalue()
    assert "\r" not in text and "3/3" in text and "loss" in text
    progress.set_quiet()
    silent = io.StringIO()
    monkeypatch.setattr(sys, "stdout", silent)
    run()
    assert silent.getvalue() == ""


# --- the command line in a pseudo-terminal and through pipes ---------------------------


def _env(**extra) -> dict:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("MEDSEG_QUIET", None)
    env.update(extra)
    return env


def _in_terminal(*args, cwd=None) -> tuple[int, str]:
    """Run ``medseg *args`` with a pseudo-terminal as stdout and stderr; its exit status and
    everything it wrote."""
    master, slave = pty.openpty()
    # a terminal of 120 columns: tqdm sizes its bar by it
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "medseg.cli", *map(str, args)],
        stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=_env(), cwd=cwd,
        close_fds=True,
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: every writer has closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return proc.wait(timeout=300), b"".join(chunks).decode(errors="replace")


def _piped(*args, cwd=None) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "medseg.cli", *map(str, args)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, env=_env(), cwd=cwd,
        timeout=300,
    )
    return proc.returncode, proc.stdout + proc.stderr


def _has_bar(text: str, desc: str) -> bool:
    return any(desc in line and "%|" in line for line in text.replace("\r", "\n").splitlines())


@pytest.mark.slow
def test_build_shows_a_bar_in_a_terminal_and_none_when_quiet(tmp_path):
    status, text = _in_terminal(
        "build", "kits_phantom", "--config", "tiny", "--data-dir", tmp_path / "a", "--workers", "1"
    )
    assert status == 0, text
    assert _has_bar(text, "build kits_phantom") and "4/4" in text, text
    assert "cases: 4" in text  # the summary
    status, text = _in_terminal(
        "build", "kits_phantom", "--config", "tiny", "--data-dir", tmp_path / "b", "--workers",
        "1", "--quiet",
    )
    assert status == 0, text
    assert not _has_bar(text, "build") and "it/s" not in text and "case/s" not in text, text
    assert "case 1/4" not in text  # nor the per-case lines
    assert "cases: 4" in text


@pytest.fixture(scope="module")
def prediction_files(tmp_path_factory):
    """A tiny untrained U-Net (.keras), its plan.json and one CT-like NIfTI case."""
    import keras
    import nibabel as nib

    from medseg.inference import PredictionPlan
    from medseg.io import kits19_affine
    from medseg.models import build_unet
    from medseg.pipeline import PreprocessPlan

    root = tmp_path_factory.mktemp("progress_predict")
    keras.utils.set_random_seed(0)
    build_unet(3, 1, depth=2, filters=4, normalization="instance").save(root / "model.keras")
    PredictionPlan(
        PreprocessPlan(target_spacing=(3.0, 1.5, 1.5), clip=(-200.0, 300.0), mean=50.0, std=100.0),
        ("background", "kidney", "tumour"),
        patch_size=(8, 16, 16),
        stride=2,
    ).save(root / "plan.json")
    image = (np.random.default_rng(0).normal(0, 120, (10, 30, 28)) + 40).astype(np.int16)
    (root / "cases").mkdir()
    nib.save(nib.Nifti1Image(image, kits19_affine((2.5, 0.8, 0.8))), root / "cases" / "a.nii.gz")
    return root


def _predict_args(root: Path, output: Path) -> list:
    return ["predict", root / "cases", "--model", root / "model.keras", "--plan",
            root / "plan.json", "--output", output]


@pytest.mark.slow
def test_predict_bar_in_a_terminal_none_when_quiet_and_no_carriage_return_in_pipes(
    prediction_files, tmp_path
):
    root = prediction_files
    status, text = _in_terminal(*_predict_args(root, tmp_path / "tty"))
    assert status == 0, text
    assert _has_bar(text, "predict") and "1/1" in text, text
    assert "wrote 1 file(s)" in text and (tmp_path / "tty" / "a_seg.nii.gz").is_file()
    # --quiet before the command: no bar, the summary still
    status, text = _in_terminal("--quiet", *_predict_args(root, tmp_path / "quiet"))
    assert status == 0, text
    assert not _has_bar(text, "predict") and "case/s" not in text and "s/case" not in text, text
    assert "wrote 1 file(s)" in text
    # pipes (a CI log): no carriage return, the per-case line and the summary
    status, text = _piped(*_predict_args(root, tmp_path / "pipe"))
    assert status == 0, text
    assert "\r" not in text and not _has_bar(text, "predict"), text
    assert "a: " in text and "wrote 1 file(s)" in text
