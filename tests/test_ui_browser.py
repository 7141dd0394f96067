"""The MLflow UI as users see it: `medseg ui` serving a run, opened in headless Chromium.

The UI is a JavaScript app, so plain HTTP checks prove little; Chromium renders the run
page (``--dump-dom`` prints the DOM after the scripts ran) and the test looks for the run's
metric and for the GIF artifact rendered as an image.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

METRIC, VALUE = "val_case_dice_kidney_mean", 0.8765
GIF = "overlay_case_00007.gif"
TABLE, CASE = "evaluation/validation_cases.json", "case_00007"


def chromium() -> str:
    """Path of headless Chromium; skipped with a reason outside CI, a failure in CI."""
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    if os.environ.get("CI"):
        pytest.fail("CI must provide chromium (.ci/run installs Debian's chromium)")
    pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_demo_run(store: Path) -> tuple[str, str, bytes]:
    """A tiny run: one param, one metric, an overlay GIF under plots/, a per-case table."""
    import mlflow

    from medseg.config import TrackingConfig
    from medseg.evaluation.visuals import write_overlay_gif
    from medseg.tracking.store import configure

    tracking = TrackingConfig(
        tracking_uri=f"sqlite:///{store}/mlflow.db", artifact_root=str(store), experiment="ui"
    )
    experiment_id = configure(tracking)
    image = np.random.default_rng(0).normal(size=(4, 24, 24)).astype(np.float32)
    labels = (image > 0.8).astype(np.int32) + (image > 1.6)
    gif = write_overlay_gif(store / GIF, image, labels, labels)
    with mlflow.start_run(experiment_id=experiment_id, run_name="browser-demo") as run:
        mlflow.log_param("model.filters", 4)
        mlflow.log_metric(METRIC, VALUE)
        mlflow.log_artifact(str(gif), "plots")
        # as medseg.tracking.artifacts logs per-case scores
        mlflow.log_table({"case_id": [CASE], "dice_kidney": [VALUE]}, TABLE)
    return experiment_id, run.info.run_id, gif.read_bytes()


def wait_until_up(url: str, server: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"medseg ui exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(2)
    raise TimeoutError(f"the MLflow UI did not answer {url} within {timeout} s")


def dump_dom(browser: str, url: str, profile: Path, budget_ms: int = 15000) -> str:
    """The page's DOM after its scripts ran (Chromium's --dump-dom), in a fresh profile."""
    cmd = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
        "--dump-dom", url,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    return done.stdout


def dump_until(browser: str, url: str, profile: Path, pattern: str, attempts: int = 3) -> str:
    """Dump the page until ``pattern`` shows (a loaded machine may need more time)."""
    dom = ""
    for attempt in range(attempts):
        dom = dump_dom(browser, url, profile / str(attempt), 15000 * (attempt + 1))
        if re.search(pattern, dom):
            break
    return dom


def test_ui_run_page_shows_metrics_and_gif_artifact(tmp_path):
    browser = chromium()
    from medseg.cli import ui_command

    experiment_id, run_id, gif_bytes = log_demo_run(tmp_path)
    port = free_port()
    # exactly what `medseg ui` execs, with one web worker: quicker to start on 2 cores
    cmd = ui_command(port, f"sqlite:///{tmp_path}/mlflow.db") + ["--workers", "1"]
    log = (tmp_path / "ui.log").open("w")
    server = subprocess.Popen(
        cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_up(f"{base}/health", server)
        # the server hands out the GIF's bytes unchanged
        artifact = f"{base}/get-artifact?path=plots/{GIF}&run_uuid={run_id}"
        with urllib.request.urlopen(artifact, timeout=30) as response:
            assert response.read() == gif_bytes

        run_page = f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
        dom = dump_until(browser, run_page, tmp_path / "profile-run", re.escape(METRIC))
        assert "browser-demo" in dom
        assert METRIC in dom
        assert str(VALUE) in dom

        # the artifact view renders the GIF as an <img> of the fetched bytes
        artifact_page = f"{run_page}/artifacts/plots/{GIF}"
        pattern = rf'<img[^>]*alt="plots/{re.escape(GIF)}"[^>]*src="blob:'
        dom = dump_until(browser, artifact_page, tmp_path / "profile-gif", pattern)
        assert GIF in dom
        assert re.search(pattern, dom), "the GIF artifact is not shown as an image"

        # MLflow's table JSON is shown as a table: a dice_kidney header, then a row whose
        # cells hold the case and its score
        table_page = f"{run_page}/artifacts/{TABLE}"
        pattern = (
            r'data-component-type="table_header"[^>]*>[\s\S]*?title="dice_kidney"[\s\S]*?'
            rf'role="row"[\s\S]*?role="cell"[\s\S]*?>{CASE}<[\s\S]*?role="cell"'
            rf"[\s\S]*?>{re.escape(str(VALUE))}<"
        )
        dom = dump_until(browser, table_page, tmp_path / "profile-table", pattern)
        assert re.search(pattern, dom), "the per-case table is not rendered as a table"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
