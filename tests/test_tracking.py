"""MLflow mirror of a study: a parent run per variant, nested stage and evaluation runs, logged once."""

import json

import pytest
import yaml

from evpretrain.cli import main

mlflow = pytest.importorskip("mlflow")


def write_study(results, top1=0.8):
    """Two variants sharing stage 1; one evaluation each (a seed), with figures."""
    for node, loss in (("stage1-aaa", 0.9), ("stage3-bbb", 4.2)):
        folder = results / "pretrain" / node
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.json").write_text(
            json.dumps(
                {
                    "loss": loss,
                    "step": 10,
                    "slurm_job_id": "4242",
                    "log": [{"step": 5, "epoch": 0.5, "loss": 2 * loss}, {"step": 10, "epoch": 1.0, "loss": loss}],
                }
            )
        )
        (folder / "study.yaml").write_text(
            yaml.safe_dump({"pretrain": {"backbone": "vit_demo", "stage1": {"train": {"base_lr": 0.01}}}})
        )
    manifest = {}
    for variant, nodes in (("full", ["stage1-aaa", "stage3-bbb"]), ("stage1_only", ["stage1-aaa"])):
        folder = f"classify-linear-demo-k{variant}/seed0"
        path = results / "downstream" / folder
        path.mkdir(parents=True, exist_ok=True)
        (path / "metrics.json").write_text(
            json.dumps(
                {
                    "top1_last": top1,
                    "step": 20,
                    "history": [{"step": 10, "epoch": 1.0, "top1": 0.5}, {"step": 20, "epoch": 2.0, "top1": top1}],
                }
            )
        )
        (path / "confusion.png").write_bytes(b"\x89PNG fake")
        manifest[variant] = {
            "stages": [1, 3][: len(nodes)],
            "nodes": nodes,
            "checkpoint": nodes[-1],
            "evaluations": [
                {
                    "label": "linear",
                    "task": "classify",
                    "mode": "linear",
                    "dataset": "demo",
                    "eval_split": "test",
                    "seed": 0,
                    "folder": folder,
                }
            ],
        }
    (results / "manifest.json").write_text(json.dumps(manifest))


def track(tmp_path, uri):
    args = [
        "track",
        "--manifest",
        str(tmp_path / "results" / "manifest.json"),
        "--results",
        str(tmp_path / "results"),
        "--tracking-uri",
        uri,
        "--experiment",
        "demo",
        "--tag",
        "git_commit=abc123",
        "--out",
        str(tmp_path / "logged.json"),
    ]
    assert main(args) == 0
    logged = json.loads((tmp_path / "logged.json").read_text())
    assert logged.pop("tracking_uri") == uri and logged.pop("experiment") == "demo"
    return logged


def test_a_study_is_mirrored_once_with_parents_children_tags_and_artifacts(tmp_path):
    write_study(tmp_path / "results")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert track(tmp_path, uri) == {"logged": 2 + 5, "skipped": 0, "replaced": 0}  # 2 parents, 3 + 2 children
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("demo").experiment_id
    parents = client.search_runs([experiment], filter_string="tags.stage = 'variant'")
    assert sorted(run.info.run_name for run in parents) == ["full", "stage1_only"]
    full = next(run for run in parents if run.info.run_name == "full")
    assert full.data.metrics["mean/linear/top1_last"] == pytest.approx(0.8)
    children = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{full.info.run_id}'")
    assert sorted(run.data.tags["stage"] for run in children) == ["1", "3", "eval"]
    stage1 = next(run for run in children if run.data.tags["stage"] == "1")
    assert stage1.data.params["pretrain.stage1.train.base_lr"] == "0.01"
    assert stage1.data.tags["git_commit"] == "abc123" and stage1.data.tags["slurm_job_id"] == "4242"
    curve = client.get_metric_history(stage1.info.run_id, "train/loss")  # the loss curve, per logged step
    assert [(m.step, m.value) for m in curve] == [(5, pytest.approx(1.8)), (10, pytest.approx(0.9))]
    assert "log" not in stage1.data.metrics and stage1.data.metrics["loss"] == pytest.approx(0.9)
    evaluation = next(run for run in children if run.data.tags["stage"] == "eval")
    assert [m.value for m in client.get_metric_history(evaluation.info.run_id, "eval/top1")] == [0.5, 0.8]
    assert {a.path for a in client.list_artifacts(evaluation.info.run_id)} == {"metrics.json", "confusion.png"}
    assert (tmp_path / "mlartifacts").is_dir()  # beside the database, not ./mlruns wherever the command ran

    assert track(tmp_path, uri) == {"logged": 0, "skipped": 7, "replaced": 0}  # nothing new: nothing logged
    write_study(tmp_path / "results", top1=0.9)  # new evaluation results: those runs and their parents replaced
    counts = track(tmp_path, uri)
    assert counts["replaced"] == 2 and counts["logged"] == 2 + 5
    parents = client.search_runs([experiment], filter_string="tags.stage = 'variant'")
    assert len(parents) == 2 and all(run.data.metrics["mean/linear/top1_last"] == pytest.approx(0.9) for run in parents)


@pytest.mark.slow
def test_a_study_is_mirrored_into_a_real_mlflow_server(tmp_path):
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "server-artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.fail("the MLflow server did not answer /health")
                time.sleep(0.5)
        write_study(tmp_path / "results")
        assert track(tmp_path, uri) == {"logged": 7, "skipped": 0, "replaced": 0}
        runs = mlflow.MlflowClient(tracking_uri=uri).search_runs(
            [mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name("demo").experiment_id],
            filter_string="tags.stage = 'eval'",
        )
        assert len(runs) == 2 and all(run.data.metrics["top1_last"] == 0.8 for run in runs)
        assert (tmp_path / "server-artifacts").is_dir()  # artifacts went through the server
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
