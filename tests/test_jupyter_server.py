"""A notebook run the way JupyterLab runs it: a real Jupyter server, its REST API and a
kernel's websocket channel, the notebook's own kernelspec, its MLflow run in the store."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).parents[1]
SERVER_START_TIMEOUT = 90  # s; a cold start on a loaded 2-core machine
CELL_TIMEOUT = 600  # s; the training cell at tiny size takes well under a minute


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _jupyter_server_or_skip() -> None:
    """Skip, saying what to install, without jupyter_server (the [notebook] extra)."""
    try:
        import jupyter_server  # noqa: F401
    except ImportError:
        pytest.skip("jupyter_server is not installed: pip install -e '.[notebook]'")


def _tiny_notebook_params() -> dict:
    """noxfile.py's TINY_NOTEBOOK_PARAMS, read without importing nox; values as the CLI's
    ``-p NAME VALUE`` reads them (YAML), e.g. ``"[8, 16, 16]"`` becomes a list."""
    tree = ast.parse((ROOT / "noxfile.py").read_text())
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        if any(getattr(t, "id", None) == "TINY_NOTEBOOK_PARAMS" for t in targets):
            values = ast.literal_eval(node.value)
            return {k: yaml.safe_load(str(v)) for k, v in values.items()}
    raise AssertionError("noxfile.py defines no TINY_NOTEBOOK_PARAMS")


def _request(base: str, token: str, method: str, path: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        base + path, data=data, method=method,
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as response:
        text = response.read()
    return json.loads(text) if text else None


def _wait_until_up(server: subprocess.Popen, base: str, token: str, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"jupyter server exited ({server.returncode}):\n{log.read_text()}")
        try:
            _request(base, token, "GET", "/api/status")
            return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.5)
    raise AssertionError(f"jupyter server not up in {SERVER_START_TIMEOUT} s:\n{log.read_text()}")


def _stop(server: subprocess.Popen, base: str, token: str) -> None:
    """The server shuts its kernels down (they run in sessions of their own, outside its
    process group); then its process group goes, by force if it lingers."""
    try:
        _request(base, token, "POST", "/api/shutdown")
        server.wait(30)
    except (urllib.error.URLError, ConnectionError, subprocess.TimeoutExpired):
        pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if server.poll() is not None:
            break
        try:
            os.killpg(server.pid, sig)
            server.wait(15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass


async def _execute(ws, session: str, code: str) -> tuple[dict, str]:
    """Run ``code`` over the kernel's channels websocket (Jupyter messaging protocol 5.3):
    its ``execute_reply`` content and the text it streamed, once the kernel is idle again."""
    msg_id = uuid.uuid4().hex
    await ws.write_message(json.dumps({
        "header": {
            "msg_id": msg_id, "msg_type": "execute_request", "session": session,
            "username": "test", "version": "5.3", "date": "",
        },
        "parent_header": {}, "metadata": {}, "buffers": [], "channel": "shell",
        "content": {
            "code": code, "silent": False, "store_history": True,
            "user_expressions": {}, "allow_stdin": False, "stop_on_error": True,
        },
    }))
    reply, idle, text = None, False, []
    while reply is None or not idle:
        raw = await asyncio.wait_for(ws.read_message(), CELL_TIMEOUT)
        assert raw is not None, "the kernel's websocket closed mid-cell"
        msg = json.loads(raw)
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "execute_reply":
            reply = content
        elif kind == "status" and content["execution_state"] == "idle":
            idle = True
        elif kind == "stream":
            text.append(content["text"])
        elif kind == "error":
            text.append("\n".join(content["traceback"]))
    return reply, "".join(text)


async def _run_cells(url: str, token: str, cells: list[str]) -> tuple[int, str]:
    """Each cell in turn on one kernel, stopping at the first error: the kernel's pid and
    all the text the cells streamed."""
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    ws = await websocket_connect(HTTPRequest(url, headers={"Authorization": f"token {token}"}))
    session = uuid.uuid4().hex
    try:
        reply, pid = await _execute(ws, session, "import os; print(os.getpid())")
        assert reply["status"] == "ok", pid
        out = []
        for source in cells:
            reply, text = await _execute(ws, session, source)
            out.append(text)
            assert reply["status"] == "ok", f"cell failed:\n{source}\n---\n{''.join(out)}"
        return int(pid), "".join(out)
    finally:
        ws.close()


@pytest.mark.slow
def test_train_notebook_runs_in_a_jupyter_server_kernel_and_logs_its_run(
    tiny_data_dir, tmp_path
):
    _jupyter_server_or_skip()

    root = tmp_path / "notebooks"
    shutil.copytree(ROOT / "notebooks", root)
    port, token = _free_port(), secrets.token_hex(16)
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        # the server's own state (runtime files, config) stays in the test's directory
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter-runtime"),
        "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter-config"),
    }
    log_path = tmp_path / "jupyter.log"
    log = log_path.open("w")
    server = subprocess.Popen(
        [
            sys.executable, "-m", "jupyter_server", "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
            "--ServerApp.open_browser=False",
            *(["--ServerApp.allow_root=True"] if os.geteuid() == 0 else []),  # CI runs as root
        ],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
        start_new_session=True,  # its own process group, killed as one at the end
    )
    kernel_pid = None
    try:
        _wait_until_up(server, base, token, log_path)
        # the token is required: without it the API refuses
        with pytest.raises(urllib.error.HTTPError, match="403"):
            urllib.request.urlopen(base + "/api/contents/train.ipynb", timeout=30)

        model = _request(base, token, "GET", "/api/contents/train.ipynb?content=1")
        assert model["type"] == "notebook"
        notebook = model["content"]
        kernel_name = notebook["metadata"]["kernelspec"]["name"]
        specs = _request(base, token, "GET", "/api/kernelspecs")["kernelspecs"]
        assert kernel_name in specs  # the notebook opens in Lab on its own kernel, unchanged

        kernel = _request(
            base, token, "POST", "/api/kernels", {"name": kernel_name, "path": "train.ipynb"}
        )
        uri = f"sqlite:///{tmp_path}/mlflow.db"
        params = {
            **_tiny_notebook_params(),
            "data_dir": tiny_data_dir,
            "tracking_uri": uri,
            "run_id": None,
            # the machine's probe and XLA compilation cost minutes here; planning is
            # tested in test_planning.py
            "plan": "none",
            "overrides": {
                "preprocess.target_spacing": [4.0, 2.0, 2.0],
                "augment.jit": False,
                "tracking.experiment": "lab",
                "tracking.artifact_root": str(tmp_path),
            },
        }
        # the parameters cell replaced, as papermill's injected cell would override it
        cells = []
        for cell in notebook["cells"]:
            if cell["cell_type"] != "code":
                continue
            source = "".join(cell["source"])
            if "parameters" in cell["metadata"].get("tags", []):
                source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
            cells.append(source)
        channels = (
            f"ws://127.0.0.1:{port}/api/kernels/{kernel['id']}/channels?session_id={uuid.uuid4().hex}"
        )
        kernel_pid, text = asyncio.run(_run_cells(channels, token, cells))
        assert psutil.Process(kernel_pid).cwd() == str(root)  # the notebook's folder, as in Lab

        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("lab").experiment_id])
        assert len(runs) == 1
        run = runs[0]
        assert run.info.status == "FINISHED"
        assert f"MLflow run: {run.info.run_id}" in text
        assert run.data.params["data.config"] == "tiny"
        assert json.loads(run.data.params["patch.patch_size"]) == [8, 16, 16]
        assert run.data.params["train.epochs"] == "1"
        assert "val_case_dice_kidney_mean" in run.data.metrics
        assert "dice_kidney" in text
    finally:
        _stop(server, base, token)
        log.close()
    assert server.returncode is not None
    if kernel_pid is not None:
        # the kernel ran in its own session: the server's shutdown must have ended it
        deadline = time.monotonic() + 15
        while psutil.pid_exists(kernel_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not psutil.pid_exists(kernel_pid) or (
            psutil.Process(kernel_pid).status() == psutil.STATUS_ZOMBIE
        )
