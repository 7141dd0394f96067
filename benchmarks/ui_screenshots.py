"""Screenshots of the MLflow UI showing what medseg logs, taken with headless Chromium.

Trains a tiny model on the tiny phantom (system metrics on, per-case table, registered with
an alias), runs a 2-trial Optuna study (its run logs ``plots/optimization_history.png``),
starts a real ``mlflow ui`` on the store (what ``medseg ui`` execs) and saves PNGs::

    python benchmarks/ui_screenshots.py [--output /tmp/medseg_screenshots]

``system_metrics.png``: the training run's System metrics tab (CPU, memory charts);
``optimization_history.png``: the study run's artifact view of its history plot;
``validation_cases_table.png``: the run's ``evaluation/validation_cases.json`` shown as a
table; ``experiment_runs.png``: the experiment's runs list (classic model-training view).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

TINY = {
    "data.config": "tiny",
    "preprocess.target_spacing": [4.0, 2.0, 2.0],
    "patch.patch_size": [8, 16, 16],
    "patch.validation_patches": 1,
    "model.filters": 4,
    "model.depth": 2,
    "train.epochs": 3,
    "train.steps_per_epoch": 4,
    "augment.jit": False,
    "plan.mode": "none",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, server: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow ui exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(2)
    raise TimeoutError(f"the MLflow UI did not answer {url} within {timeout} s")


def screenshot(browser: str, url: str, path: Path, profile: Path, budget_ms: int = 60000) -> None:
    """Save Chromium's rendering of ``url`` (after ``budget_ms`` of its virtual time)."""
    cmd = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}",
        # charts draw in animation frames: let the compositor run them before the capture
        "--run-all-compositor-stages-before-draw",
        f"--virtual-time-budget={budget_ms}", "--window-size=1600,1000",
        f"--screenshot={path}", url,
    ]
    subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    print(f"{path}  <-  {url}")


def log_runs(store: Path, data_dir: str) -> dict[str, str]:
    """A tiny training run and a 2-trial study in ``store``; their ids."""
    from medseg import datasets
    from medseg.config import Config
    from medseg.tracking import run_training
    from medseg.tuning.study import open_study, study_run, tune

    datasets.prepare("kits_phantom", "tiny", data_dir)
    uri = f"sqlite:///{store}/mlflow.db"
    base = {
        **TINY,
        "data.data_dir": data_dir,
        "tracking.tracking_uri": uri,
        "tracking.artifact_root": str(store),
        "tracking.experiment": "screenshots",
        "tracking.register_model": "screenshot_unet",
    }
    config = Config().with_overrides({**base, "tracking.run_name": "tiny-train"})
    _, run_id = run_training(config)
    tune_config = Config().with_overrides({
        **base,
        "tracking.register_model": None,
        "tracking.experiment": "screenshots-study",
        "train.epochs": 2,
        "train.steps_per_epoch": 2,
        "tune.n_trials": 2,
        "tune.storage": f"sqlite:///{store}/optuna.db",
        "tune.study_name": "screenshots",
        "tune.space": ["train.learning_rate=log:1e-4:1e-2"],
    })
    tune(tune_config, workers=1, quiet=True)  # its end logs the study's plots
    study_id = study_run(open_study(tune_config), tune_config)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    return {
        "uri": uri,
        "train_run": run_id,
        "train_experiment": client.get_run(run_id).info.experiment_id,
        "study_run": study_id,
        "study_experiment": client.get_run(study_id).info.experiment_id,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="/tmp/medseg_screenshots",
                        help="folder for the PNGs (created)")
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("headless Chromium is not installed (Debian: apt-get install chromium)")
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    from medseg.cli import ui_command

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ids = log_runs(tmp / "mlruns", str(tmp / "tfds"))
        port = free_port()
        log = (tmp / "ui.log").open("w")
        server = subprocess.Popen(
            ui_command(port, ids["uri"]) + ["--workers", "1"], cwd=tmp, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
        )
        try:
            base = f"http://127.0.0.1:{port}"
            wait_until_up(f"{base}/health", server)
            train = f"{base}/#/experiments/{ids['train_experiment']}/runs/{ids['train_run']}"
            study = f"{base}/#/experiments/{ids['study_experiment']}/runs/{ids['study_run']}"
            shots = {
                "system_metrics.png": f"{train}/system-metrics",
                "model_metrics.png": f"{train}/model-metrics",
                "optimization_history.png": f"{study}/artifacts/plots/optimization_history.png",
                "validation_cases_table.png": f"{train}/artifacts/evaluation/validation_cases.json",
                "experiment_runs.png": f"{base}/#/experiments/{ids['train_experiment']}",
            }
            for name, url in shots.items():
                # a fresh browser opens MLflow 3 in its GenAI navigation: ask for the
                # model-training one (the experiment's kind tag picks its default tabs)
                url += "?workflowType=machine_learning"
                screenshot(browser, url, output / name, tmp / f"profile-{name}")
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
            log.close()


if __name__ == "__main__":
    main()
