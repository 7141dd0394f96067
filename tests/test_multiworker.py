"""Two worker processes on 127.0.0.1 train under MultiWorkerMirroredStrategy."""

import json
import socket
import subprocess

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from test_resume import finish, launch, saved_weights

from medseg.workflows.experiment import prepare_data, train_model


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_two_workers_end_with_identical_weights_and_one_mlflow_run(tiny_config, tmp_path):
    store = tmp_path / "mlruns"
    config = tiny_config(
        **{
            "train.strategy": "multiworker",
            "augment.enabled": False,
            "tracking.tracking_uri": f"sqlite:///{store}/mlflow.db",
            "tracking.artifact_root": str(store),
            "tracking.experiment": "multiworker",
            "tracking.register_model": "tiny_unet",
        }
    )
    cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(2)]}
    workers = [
        launch(
            config,
            tmp_path / f"worker{i}.npz",
            "--track",
            env={"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})},
        )
        for i in range(2)
    ]
    try:
        # meanwhile, the same run in this process on 2 logical CPUs (MirroredStrategy)
        mirrored = config.with_overrides({"train.strategy": "mirrored"})
        reference, _ = train_model(mirrored, prepare_data(mirrored))
    finally:
        for worker in workers:
            finish(worker)

    first, second = saved_weights(tmp_path / "worker0.npz"), saved_weights(tmp_path / "worker1.npz")
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    # each worker took its replica's half of every global batch: the same steps as 2 local
    # replicas (all-reduce order may differ in the last bits)
    for a, r in zip(first, reference.get_weights(), strict=True):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-6)

    client = MlflowClient(config.tracking.tracking_uri)
    experiment = client.get_experiment_by_name("multiworker")
    (run,) = client.search_runs([experiment.experiment_id])  # only rank 0 logged
    tags = run.data.tags
    assert run.info.status == "FINISHED"
    assert tags["medseg.strategy"] == "MultiWorkerMirroredStrategy"
    assert (tags["medseg.replicas"], tags["medseg.workers"], tags["medseg.rank"]) == ("2", "2", "0")
    assert tags["medseg.seed"] == str(config.seed) and tags["medseg.precision"] == "float32"
    assert tags["dataset.name"] == "kits_phantom/tiny/" + tags["dataset.version"]
    assert "git.commit" in tags and "version.tensorflow" in tags
    assert "/job:worker/replica:0/task:1" in tags["medseg.devices"]  # the cluster's devices
    history = json.loads((tmp_path / "worker0.json").read_text())
    logged = client.get_metric_history(run.info.run_id, "loss")
    np.testing.assert_allclose([m.value for m in logged], history["loss"], rtol=1e-6)
    # the model, registered, from this run
    (version,) = client.search_model_versions("name='tiny_unet'")
    assert version.run_id == run.info.run_id
    mlflow.set_tracking_uri(config.tracking.tracking_uri)
    model = mlflow.keras.load_model("models:/tiny_unet/1")
    x = np.random.default_rng(0).normal(size=(1, 8, 16, 16, 1)).astype(np.float32)
    np.testing.assert_allclose(
        model.predict(x, verbose=0), reference(x, training=False), rtol=1e-3, atol=1e-4
    )


@pytest.mark.slow
def test_two_workers_log_one_run_to_an_mlflow_server(mlflow_server, tiny_config, tmp_path):
    """A team's cluster: MLFLOW_TRACKING_URI in every worker's environment names the
    server; the chief logs the run (artifacts through the server's proxy), the other none."""
    from medseg.tracking.names import SCORES

    config = tiny_config(
        **{
            "train.strategy": "multiworker",
            "augment.enabled": False,
            "tracking.experiment": "multiworker-server",
            "tracking.artifact_root": str(tmp_path / "client"),
            "tracking.register_model": "tiny_unet_server",
        }
    )
    cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(2)]}
    workers = [
        launch(
            config,
            tmp_path / f"worker{i}.npz",
            "--track",
            env={
                "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}),
                "MLFLOW_TRACKING_URI": mlflow_server,
            },
        )
        for i in range(2)
    ]
    for worker in workers:  # a busy CI machine: training, then the model over HTTP
        try:
            _, err = worker.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            worker.kill()
            pytest.fail(f"training process {worker.args} did not finish in 600 s: "
                        f"{worker.communicate()[1][-3000:]}")
        assert worker.returncode == 0, err[-3000:]

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("multiworker-server")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # the server's root
    assert not (tmp_path / "client").exists()  # no worker wrote a client-side store
    (run,) = client.search_runs([experiment.experiment_id])  # worker 1 logged nothing
    assert run.info.status == "FINISHED"
    assert (run.data.tags["medseg.workers"], run.data.tags["medseg.rank"]) == ("2", "0")
    assert run.data.params["train.strategy"] == "multiworker"
    history = json.loads((tmp_path / "worker0.json").read_text())
    logged = client.get_metric_history(run.info.run_id, "loss")
    np.testing.assert_allclose([m.value for m in logged], history["loss"], rtol=1e-6)
    # artifacts come back from the server: the scores table and the registered model
    mlflow.set_tracking_uri(mlflow_server)
    scores = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path=SCORES, dst_path=str(tmp_path / "download")
    )
    assert open(scores).readline().strip()
    (version,) = client.search_model_versions("name='tiny_unet_server'")
    assert version.run_id == run.info.run_id
    model = mlflow.keras.load_model("models:/tiny_unet_server/1")
    weights = saved_weights(tmp_path / "worker0.npz")
    for a, b in zip(model.get_weights(), weights, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
