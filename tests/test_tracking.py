"""MLflow mirror of a study: a parent run per variant, nested stage and evaluation runs, logged once."""

import json
import os
from pathlib import Path

import mlflow_testing
import pytest
import yaml

from evpretrain.cli import main
from evpretrain.pipeline.tracking import (
    TAG_FOLDER,
    TAG_KIND,
    TAG_RUNS,
    job_times,
    log_study,
    run_identities,
    study_record,
    variant_settings,
)
from evpretrain.training.mlflow_hook import TAG_LIVE

mlflow = pytest.importorskip("mlflow")


STUDY = {
    "pretrain": {"stage1": {"train": {"base_lr": 0.01}}, "stage3": {"method": {"focus": "entropy"}}},
    "variants": {
        "full": {"stages": [1, 3]},
        "no_focus": {"stages": [1, 3], "overrides": {"pretrain.stage3.method.focus": "none"}},
    },
}
END = 1_700_000_000.0  # the metrics.json files' modification time (s)


def write_study(results, top1=0.8):
    """Two variants sharing stage 1 (their stage 3 differs); one evaluation each (a seed), with figures. Every job
    ended at ``END`` (its file time): the stages after 80 s, the evaluations after 2 s."""
    for node, loss in (("stage1-aaa", 0.9), ("stage3-bbb", 4.2), ("stage3-ccc", 4.4)):
        folder = results / "pretrain" / node
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.json").write_text(
            json.dumps(
                {
                    "loss": loss,
                    "step": 10,
                    "wall_time_s": 80.0,
                    "slurm_job_id": "4242",
                    "log": [{"step": 5, "epoch": 0.5, "loss": 2 * loss}, {"step": 10, "epoch": 1.0, "loss": loss}],
                }
            )
        )
        os.utime(folder / "metrics.json", (END, END))
        (folder / "study.yaml").write_text(
            yaml.safe_dump({"pretrain": {"backbone": "vit_demo", "stage1": {"train": {"base_lr": 0.01}}}})
        )
    manifest = {}
    for variant, nodes in (("full", ["stage1-aaa", "stage3-bbb"]), ("no_focus", ["stage1-aaa", "stage3-ccc"])):
        folder = f"classify-linear-demo-k{variant}/seed0"
        path = results / "downstream" / folder
        path.mkdir(parents=True, exist_ok=True)
        (path / "metrics.json").write_text(
            json.dumps(
                {
                    "top1_last": top1,
                    "top1_best": 0.95,
                    "step": 20,
                    "train_wall_time_s": 2.0,
                    "history": [{"step": 10, "epoch": 1.0, "top1": 0.5}, {"step": 20, "epoch": 2.0, "top1": top1}],
                }
            )
        )
        os.utime(path / "metrics.json", (END, END))
        (path / "confusion.png").write_bytes(b"\x89PNG fake")
        manifest[variant] = {
            "stages": [1, 3],
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
    (results / "study.json").write_text(json.dumps(STUDY))


def track(tmp_path, uri):
    args = [
        "track",
        "--manifest",
        str(tmp_path / "results" / "manifest.json"),
        "--study",
        str(tmp_path / "results" / "study.json"),
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
    experiment = mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name("demo").experiment_id
    assert (
        logged.pop("ui")
        == f"/#/experiments/{experiment}/runs?workflowType=machine_learning&viewStateShareKey=ablations"
    )
    return logged


def test_every_variant_has_the_overridden_keys_with_its_value_or_the_studys():
    study = {
        "pretrain": {"stage1": {"mask_ratio": 0.5}, "stage3": {}},
        "variants": {
            "full": {"stages": [1]},
            "masked": {"stages": [1], "overrides": {"pretrain.stage1.mask_ratio": 0.75}},
            "focus": {"stages": [1], "overrides": {"pretrain.stage3.focus": "none"}},  # the study has no value
        },
    }
    assert variant_settings(study) == {
        "full": {"pretrain.stage1.mask_ratio": 0.5, "pretrain.stage3.focus": None},
        "masked": {"pretrain.stage1.mask_ratio": 0.75, "pretrain.stage3.focus": None},
        "focus": {"pretrain.stage1.mask_ratio": 0.5, "pretrain.stage3.focus": "none"},
    }
    assert variant_settings({"variants": {"full": {"stages": [1]}}}) == {"full": {}}


def test_the_record_of_a_study_leaves_out_how_its_jobs_run():
    config = {
        "results": "results",
        "executor": "slurm",
        "execution": {"threads_per_job": 1},
        "tracking": {"uri": None},
        "pretrain": {"stage1": {"train": {"base_lr": 0.01, "num_workers": 4, "max_steps": 5}, "mask_ratio": 0.5}},
        "variants": {"full": {"stages": [1]}},
    }
    assert study_record(config) == {
        "pretrain": {"stage1": {"train": {"base_lr": 0.01}, "mask_ratio": 0.5}},
        "variants": {"full": {"stages": [1]}},
    }


def test_a_job_spans_its_wall_time_up_to_its_file_or_its_recorded_times(tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    os.utime(tmp_path / "metrics.json", (END, END))
    assert job_times(tmp_path, {"wall_time_s": 80.5}) == (1_699_999_919_500, 1_700_000_000_000)
    assert job_times(tmp_path, {"train_wall_time_s": 2.0}) == (1_699_999_998_000, 1_700_000_000_000)
    assert job_times(tmp_path, {"start_time": 100.0, "end_time": 160.25, "wall_time_s": 1.0}) == (100_000, 160_250)


def test_a_study_is_mirrored_once_with_parents_shared_stages_settings_and_times(tmp_path):
    write_study(tmp_path / "results")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert track(tmp_path, uri) == {
        "logged": 2 + 3 + 2,
        "skipped": 0,
        "replaced": 0,
        "adopted": 0,
    }  # parents, stages, evaluations
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("demo")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on its runs
    view = json.loads(experiment.tags["mlflow.sharedViewState.ablations"])  # the runs table's columns
    assert view["selectedColumns"] == [
        "params.`pretrain.stage3.method.focus`",
        *(f"params.`{key}`" for key in ("stages", "stage1", "stage2", "stage3")),
        "metrics.`mean/linear/top1_last`",
        "metrics.`mean/linear/top1_best`",
    ]
    runs = {run.data.tags[TAG_FOLDER]: run for run in client.search_runs([experiment.experiment_id])}
    assert len(runs) == 7  # stage 1 is one run though both variants use it
    full, no_focus = runs["variant/full"], runs["variant/no_focus"]

    # The parents: the same params, the differing setting, the stages, the resolved config, last and best figures.
    assert set(full.data.params) == set(no_focus.data.params)
    assert full.data.params["pretrain.stage3.method.focus"] == "entropy"  # the study's, where the variant keeps it
    assert no_focus.data.params["pretrain.stage3.method.focus"] == "none"
    assert full.data.params["stages"] == "1,3" and full.data.params["stage2"] == "none"
    assert full.data.params["stage1"] == no_focus.data.params["stage1"] == "stage1-aaa"
    assert (full.data.params["stage3"], no_focus.data.params["stage3"]) == ("stage3-bbb", "stage3-ccc")
    resolved = yaml.safe_load(
        Path(client.download_artifacts(no_focus.info.run_id, "config.yaml", str(tmp_path))).read_text()
    )
    assert resolved == {"pretrain": {"stage1": {"train": {"base_lr": 0.01}}, "stage3": {"method": {"focus": "none"}}}}
    assert full.data.metrics["mean/linear/top1_last"] == pytest.approx(0.8)
    assert full.data.metrics["mean/linear/top1_best"] == pytest.approx(0.95)

    # A shared stage: one run, nested under the first variant, listed (and linked) by every parent using it.
    stage1 = runs["pretrain/stage1-aaa"]
    assert stage1.data.tags["mlflow.parentRunId"] == full.info.run_id and stage1.data.tags["variant"] == "full,no_focus"
    for parent in (full, no_focus):
        assert json.loads(parent.data.tags[TAG_RUNS])["stage1-aaa"] == stage1.info.run_id
        assert f"/runs/{stage1.info.run_id})" in parent.data.tags["mlflow.note.content"]
    assert runs["pretrain/stage3-ccc"].data.tags["mlflow.parentRunId"] == no_focus.info.run_id
    assert stage1.data.params["pretrain.stage1.train.base_lr"] == "0.01"
    assert stage1.data.tags["git_commit"] == "abc123" and stage1.data.tags["slurm_job_id"] == "4242"
    curve = client.get_metric_history(stage1.info.run_id, "train/loss")  # the loss curve, per logged step
    assert [(m.step, m.value) for m in curve] == [(5, pytest.approx(1.8)), (10, pytest.approx(0.9))]
    assert "log" not in stage1.data.metrics and stage1.data.metrics["loss"] == pytest.approx(0.9)

    # The evaluations carry their variant; the curves are per epoch.
    evaluation = runs["downstream/classify-linear-demo-kno_focus/seed0"]
    assert evaluation.info.run_name == "no_focus linear seed0" and evaluation.data.params["variant"] == "no_focus"
    assert evaluation.data.tags["mlflow.parentRunId"] == no_focus.info.run_id
    history = client.get_metric_history(evaluation.info.run_id, "eval/top1")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.8)]
    assert {a.path for a in client.list_artifacts(evaluation.info.run_id)} == {"metrics.json", "confusion.png"}
    assert (tmp_path / "mlartifacts").is_dir()  # beside the database, not ./mlruns wherever the command ran

    # The jobs' real times (ms): each ended at its file time after its wall time; a parent spans its jobs.
    end = int(END * 1000)
    assert (stage1.info.start_time, stage1.info.end_time) == (end - 80_000, end)
    assert (evaluation.info.start_time, evaluation.info.end_time) == (end - 2_000, end)
    assert (full.info.start_time, full.info.end_time) == (end - 80_000, end)

    assert track(tmp_path, uri) == {
        "logged": 0,
        "skipped": 7,
        "replaced": 0,
        "adopted": 0,
    }  # nothing new: nothing logged
    write_study(tmp_path / "results", top1=0.9)  # new evaluation results: those runs and their parents replaced
    assert track(tmp_path, uri) == {"logged": 4, "skipped": 3, "replaced": 4, "adopted": 0}
    runs = {run.data.tags[TAG_FOLDER]: run for run in client.search_runs([experiment.experiment_id])}
    assert len(runs) == 7 and runs["variant/full"].data.metrics["mean/linear/top1_last"] == pytest.approx(0.9)
    # the stages kept their runs, nested under the new parent and listed by it
    assert runs["pretrain/stage1-aaa"].info.run_id == stage1.info.run_id
    assert runs["pretrain/stage1-aaa"].data.tags["mlflow.parentRunId"] == runs["variant/full"].info.run_id
    assert json.loads(runs["variant/no_focus"].data.tags[TAG_RUNS]) == {
        folder.split("/", 1)[1]: run.info.run_id
        for folder, run in runs.items()
        if not folder.startswith("variant/") and "no_focus" in run.data.tags["variant"]
    }


def test_runs_an_older_mirror_logged_once_per_variant_become_one(tmp_path):
    write_study(tmp_path / "results")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("demo", artifact_location=(tmp_path / "mlartifacts").as_uri())
    old = [client.create_run(experiment, tags={TAG_FOLDER: "pretrain/stage1-aaa"}).info.run_id for _ in range(2)]
    assert track(tmp_path, uri) == {"logged": 7, "skipped": 0, "replaced": 1, "adopted": 0}
    stage1 = client.search_runs([experiment], filter_string=f"tags.`{TAG_FOLDER}` = 'pretrain/stage1-aaa'")
    assert len(stage1) == 1 and stage1[0].info.run_id not in old
    assert {client.get_run(run_id).info.lifecycle_stage for run_id in old} == {"deleted"}


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on a free port of 127.0.0.1 (a sqlite backend, artifacts under tmp_path): its URI."""
    with mlflow_testing.mlflow_server(tmp_path) as uri:
        yield uri


@pytest.mark.slow
def test_a_study_is_mirrored_into_a_real_mlflow_server(tmp_path, mlflow_server):
    uri = mlflow_server
    write_study(tmp_path / "results")
    counts = track(tmp_path, uri)
    assert counts == {"logged": 7, "skipped": 0, "replaced": 0, "adopted": 0}  # 2 parents, 3 stages, 2 evaluations
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("demo").experiment_id], filter_string="tags.stage = 'eval'"
    )
    assert len(runs) == 2 and all(run.data.metrics["top1_last"] == 0.8 for run in runs)
    assert (tmp_path / "server-artifacts").is_dir()  # artifacts went through the server


def test_a_run_logged_live_is_adopted_completed_and_replaced_once_its_job_reruns(tmp_path):
    write_study(tmp_path / "results")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("demo", artifact_location=(tmp_path / "mlartifacts").as_uri())
    # What a stage job logging live had logged: its param, the first row of its curve, then its end.
    tags = {TAG_LIVE: "true", TAG_FOLDER: "pretrain/stage1-aaa", TAG_KIND: "stage"}
    live = client.create_run(experiment, run_name="stage1-aaa", tags=tags).info.run_id
    client.log_param(live, "pretrain.backbone", "vit_demo")
    client.log_metric(live, "train/loss", 1.8, step=5)
    client.set_terminated(live, "FINISHED")

    assert track(tmp_path, uri) == {"logged": 6, "skipped": 0, "replaced": 0, "adopted": 1}
    runs = {run.data.tags[TAG_FOLDER]: run for run in client.search_runs([experiment])}
    stage1 = runs["pretrain/stage1-aaa"]
    assert len(runs) == 7 and stage1.info.run_id == live  # one run for the stage: the live one
    assert stage1.data.tags["mlflow.parentRunId"] == runs["variant/full"].info.run_id
    assert stage1.data.tags["variant"] == "full,no_focus" and stage1.data.tags["git_commit"] == "abc123"
    assert stage1.data.params["pretrain.stage1.train.base_lr"] == "0.01"  # the params it lacked
    curve = client.get_metric_history(live, "train/loss")  # the step it held once, the step it lacked added
    assert sorted((m.step, m.value) for m in curve) == [(5, 1.8), (10, 0.9)]
    assert stage1.data.metrics["loss"] == 0.9 and {a.path for a in client.list_artifacts(live)} == {"metrics.json"}
    assert track(tmp_path, uri) == {"logged": 0, "skipped": 7, "replaced": 0, "adopted": 0}

    # The job reran without live tracking (new metrics): the live run's figures are stale, so it is replaced.
    metrics = tmp_path / "results" / "pretrain" / "stage1-aaa" / "metrics.json"
    metrics.write_text(json.dumps(json.loads(metrics.read_text()) | {"loss": 0.7}))
    os.utime(metrics, (END, END))
    assert track(tmp_path, uri)["replaced"] == 1
    (stage1,) = client.search_runs([experiment], filter_string=f"tags.`{TAG_FOLDER}` = 'pretrain/stage1-aaa'")
    assert stage1.info.run_id != live and stage1.data.metrics["loss"] == 0.7
    assert client.get_run(live).info.lifecycle_stage == "deleted"


# The smallest stage 1 and linear probe (tests/test_pretrain_stages.py, tests/test_downstream.py), a row a step.
LIVE_STUDY = {
    "pretrain": {
        "backbone": "vit_demo",
        "backbone_overrides": {"img_size": [32, 32], "depth": 2},
        "data": {"input_size": [32, 32]},
        "knn": {"memory": 0},
        "stage1": {
            "method": {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2},
            "train": {"epochs": 1, "batch_size": 4, "base_lr": 1e-3, "log_every_steps": 1},
        },
    },
    "downstream": {
        "classify": {"linear": {"train": {"epochs": 2, "batch_size": 4, "base_lr": 1e-2, "log_every_steps": 1}}}
    },
}
LIVE_MANIFEST = {
    "full": {
        "stages": [1],
        "nodes": ["stage1-aaa"],
        "checkpoint": "stage1-aaa",
        "evaluations": [
            {
                "label": "linear",
                "task": "classify",
                "mode": "linear",
                "dataset": "demo",
                "eval_split": "val",
                "seed": 0,
                "folder": "linear-bbb/seed0",
            }
        ],
    }
}


@pytest.mark.parametrize("store", ["sqlite", pytest.param("server", marks=pytest.mark.slow)])
def test_jobs_logged_live_are_nested_by_the_mirror_with_their_history_and_never_logged_twice(tmp_path, store, request):
    from evpretrain.data.config import DemoConfig
    from evpretrain.data.demo import build_demo

    uri = request.getfixturevalue("mlflow_server") if store == "server" else f"sqlite:///{tmp_path / 'mlflow.db'}"
    stores = build_demo(
        DemoConfig(samples={"train": 8, "val": 4}, image_size=32, digit_size=12, num_frames=3),
        tmp_path / "data",
        workers=1,
        progress=False,
    )
    results = tmp_path / "results"
    identities = run_identities(LIVE_MANIFEST)

    def job(command, folder, *args):  # as rules pretrain_stage and finetune run them with tracking.live
        out = results / folder
        out.mkdir(parents=True)
        (out / "study.yaml").write_text(yaml.safe_dump(LIVE_STUDY))
        identity = identities[folder]
        live = ["--tracking-uri", uri, "--experiment", "demo", "--run-name", identity["name"]]
        live += [arg for key, value in identity["tags"].items() for arg in ("--run-tag", f"{key}={value}")]
        common = ["--config", str(out / "study.yaml"), "--out", str(out)]
        assert main([*command, *common, *args, *live]) == 0
        return json.loads((out / "metrics.json").read_text())

    stage = job(["pretrain", "--stage", "1"], "pretrain/stage1-aaa", "--data", str(stores["train"]))
    checkpoint = str(results / "pretrain" / "stage1-aaa" / "checkpoint.pt")
    evaluation = job(
        ["finetune", "classify", "--mode", "linear"],
        "downstream/linear-bbb/seed0",
        *("--train", str(stores["train"]), "--eval", str(stores["val"]), "--checkpoint", checkpoint, "--seed", "0"),
    )
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("demo").experiment_id

    def by_folder():
        return {run.data.tags[TAG_FOLDER]: run for run in client.search_runs([experiment])}

    live = by_folder()
    assert set(live) == {"pretrain/stage1-aaa", "downstream/linear-bbb/seed0"}  # logged while they trained
    stage_run, eval_run = live["pretrain/stage1-aaa"], live["downstream/linear-bbb/seed0"]
    assert {stage_run.info.status, eval_run.info.status} == {"FINISHED"}
    assert stage_run.info.run_name == "stage1-aaa" and eval_run.info.run_name == "full linear seed0"
    assert eval_run.data.tags[TAG_KIND] == "evaluation" and eval_run.data.tags["variant"] == "full"
    assert stage_run.data.params["pretrain.stage1.train.base_lr"] == "0.001"  # the study config the job read

    def curve(run, key):
        return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]

    stage_curve = curve(stage_run, "train/loss")
    assert stage_curve == [(row["step"], pytest.approx(row["loss"])) for row in stage["log"]] and len(stage_curve) == 2
    eval_curve = curve(eval_run, "eval/top1")  # every epoch's score, at its epoch
    assert eval_curve == [(int(row["epoch"]), pytest.approx(row["top1"])) for row in evaluation["history"]]
    assert [step for step, _ in eval_curve] == [1, 2]
    assert eval_run.data.metrics["top1_last"] == pytest.approx(evaluation["top1_last"])
    assert eval_run.data.metrics["top1_best"] == pytest.approx(evaluation["top1_best"])

    study = {"pretrain": LIVE_STUDY["pretrain"], "variants": {"full": {"stages": [1]}}}
    counts = log_study(LIVE_MANIFEST, results, uri, "demo", study=study)
    assert {k: counts[k] for k in ("logged", "skipped", "replaced", "adopted")} == {
        "logged": 1,  # the parent alone
        "skipped": 0,
        "replaced": 0,
        "adopted": 2,
    }
    runs = by_folder()
    assert len(runs) == 3 and runs["pretrain/stage1-aaa"].info.run_id == stage_run.info.run_id
    parent = runs["variant/full"].info.run_id
    for folder, run in ((f, runs[f]) for f in live):
        assert run.info.run_id == live[folder].info.run_id and run.data.tags["mlflow.parentRunId"] == parent
    assert curve(stage_run, "train/loss") == stage_curve and curve(eval_run, "eval/top1") == eval_curve  # intact
    assert runs["downstream/linear-bbb/seed0"].data.params["variant"] == "full"  # what the mirror adds
    assert "reconstructions.png" in {a.path for a in client.list_artifacts(stage_run.info.run_id)}

    counts = log_study(LIVE_MANIFEST, results, uri, "demo", study=study)
    assert (counts["skipped"], counts["logged"], counts["adopted"], len(by_folder())) == (3, 0, 0, 3)


def test_a_folder_with_quotes_and_backslashes_is_found_again_and_no_other(tmp_path):
    from evpretrain.pipeline.tracking import _Logger, tag_filter

    assert tag_filter("k", "a'b\"c\\d%") == "tags.`k` LIKE 'a_b_c_d%'"  # no quote reaches the filter
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    hostile = 'pretrain/it\'s "q" \\ 100%'
    decoy = "pretrain/itXs YqY X 100%"  # matches the hostile folder's LIKE pattern: only the exact tag may count
    times = (1_700_000_000_000, 1_700_000_060_000)

    def log(folder, loss):
        logger = _Logger(uri, "demo", {})
        run_id = logger.run(folder, folder, parent=None, params={"p": 1}, metrics={"loss": loss}, times=times)
        return run_id, logger.counts

    decoy_id, _ = log(decoy, 1.0)
    first, counts = log(hostile, 2.0)
    assert counts["logged"] == 1 and counts["replaced"] == 0
    again, counts = log(hostile, 2.0)  # the same content: found by its folder and skipped
    assert again == first and counts["skipped"] == 1 and counts["logged"] == 0
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert client.get_run(decoy_id).info.lifecycle_stage == "active"
    assert client.get_run(first).data.tags[TAG_FOLDER] == hostile
