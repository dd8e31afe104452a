"""End to end: the Snakemake workflow on a small demo study, and its rerun semantics."""

import hashlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from evpretrain.data.store import EventStore

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")


def snakemake_env(cwd):
    """A bare environment for Snakemake and its jobs; PYTHONPATH passes through, so that a checkout other than the
    installed one (a git worktree) runs its own code."""
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(cwd)}
    return env | ({"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {})


def snakemake_command(*args):
    return [str(SNAKEMAKE), "all", "--cores", "2", "--snakefile", str(ROOT / "Snakefile"), *args]


def snakemake(*args, cwd=ROOT):
    return subprocess.run(snakemake_command(*args), cwd=cwd, capture_output=True, text=True, env=snakemake_env(cwd))


def snakemake_in_background(*args, cwd):
    """Snakemake running, in a process group of its own (as a terminal's foreground job: ``os.killpg`` signals it
    and its jobs, as Ctrl-C does); stdout and stderr together, as text."""
    return subprocess.Popen(
        snakemake_command(*args),
        cwd=cwd,
        env=snakemake_env(cwd),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def small_study(tmp_path, **demo):
    config = {
        "results": str(tmp_path / "results"),
        "data": {"demo": {"samples": {"train": 4, "val": 2, "test": 2}, **demo}},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_demo_pipeline_builds_stores_and_reruns_only_what_changed(tmp_path):
    study = small_study(tmp_path)
    run = snakemake("--configfile", str(study), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    for split, n in {"train": 4, "val": 2, "test": 2}.items():
        with EventStore(tmp_path / "results" / "data" / "demo" / f"{split}.h5") as store:
            assert len(store) == n
            store.verify()

    plan = snakemake("--configfile", str(study), "-n", cwd=tmp_path)
    assert "Nothing to be done" in plan.stdout + plan.stderr

    changed = small_study(tmp_path, seed=7)
    plan = snakemake("--configfile", str(changed), "-n", cwd=tmp_path)
    assert plan.returncode == 0
    assert "build_demo" in plan.stdout


def test_a_wrong_config_key_stops_before_any_job(tmp_path):
    study = small_study(tmp_path, image_sise=32)
    run = snakemake("--configfile", str(study), "-n", cwd=tmp_path)
    assert run.returncode != 0
    output = run.stdout + run.stderr
    assert "image_sise" in output and "Additional properties are not allowed" in output


def test_snakemake_gives_a_job_its_threads_as_omp_num_threads(tmp_path):
    # The heavy rules rely on it (workflow/rules/common.smk): torch's threads are the job's, scaled down to --cores.
    (tmp_path / "Snakefile").write_text(
        'rule all:\n    output: "threads.txt"\n    threads: 3\n    shell: "echo $OMP_NUM_THREADS > {output}"\n'
    )
    run = subprocess.run(
        [str(SNAKEMAKE), "all", "--cores", "2", "--quiet"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "7"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "threads.txt").read_text().split() == ["2"]


TRAIN = {"epochs": 1, "batch_size": 4, "base_lr": 1e-3}
# A path part that runs three commands in any shell command that does not quote it.
HOSTILE = "r s;touch PWNED;'q\"$(touch PWNED2)`touch PWNED3`"


def tiny_study(tmp_path, results="results", **changes):
    """A whole study in miniature: 3 variants, 2 seeds, a 32 x 32 ViT of depth 2, one epoch a stage; its results in
    ``tmp_path / results``."""
    config = {
        "results": str(tmp_path / results),
        "data": {
            "demo": {
                "samples": {"train": 8, "val": 4, "test": 4},
                "image_size": 32,
                "digit_size": 12,
                "num_frames": 3,
                "pan_speed_px_per_frame": [0.5, 1.0],
                "digit_drift_px_per_frame": 0.3,
            }
        },
        "pretrain": {
            "backbone": "vit_demo",
            "backbone_overrides": {"img_size": [32, 32], "depth": 2},
            "knn": {"every_steps": 2, "memory": 8, "queries": 4, "k": 3},
            "stage1": {"method": {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}, "train": dict(TRAIN)},
            "stage2": {"method": {"hidden_dim": 32, "queue_length": 8}, "train": dict(TRAIN)},
            "stage3": {"method": {"hidden_dim": 32, "queue_length": 8, "focus": "density"}, "train": dict(TRAIN)},
        },
        "downstream": {
            "classify": {"linear": {"train": {**TRAIN, "epochs": 2}}},
            "robustness": {"shot_noise_hz": [0.0, 30.0], "drop": [0.5]},
        },
        "study": {
            "name": "tiny",
            "pretrain_dataset": "demo",
            "seeds": [0, 1],
            "evaluations": [
                {
                    "task": "classify",
                    "mode": "linear",
                    "dataset": "demo",
                    "train": "train",
                    "eval": "test",
                    "robustness": True,
                }
            ],
        },
        "variants": {"full": {"stages": [1, 2, 3]}, "stage1_only": {"stages": [1]}, "scratch": {"stages": []}},
    }
    for dotted, value in changes.items():
        node = config
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[key]
        node[last] = value
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def planned_jobs(output):
    """{rule: count} from a dry run's job table."""
    lines = output.split("Job stats:")[-1].splitlines()
    jobs = {}
    for line in lines[3:]:
        parts = line.split()
        if parts[:1] == ["total"]:
            break
        if len(parts) == 2:
            jobs[parts[0]] = int(parts[1])
    return jobs


@pytest.mark.slow
def test_the_study_runs_to_its_tables_and_replans_only_what_a_change_invalidates(tmp_path):
    # A results folder named to break an unquoted shell command: every rule must pass it as one word.
    results = tmp_path / HOSTILE
    study = tiny_study(tmp_path, HOSTILE)
    run = snakemake("--configfile", str(study), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    tables = results / "tables"
    markdown = (tables / "ablation.md").read_text()
    assert all(f"| {variant}" in markdown for variant in ("full", "stage1_only", "scratch"))
    pretrained = sorted(p.parent.name for p in (results / "pretrain").glob("*/checkpoint.pt"))
    assert [name.split("-")[0] for name in pretrained] == ["stage1", "stage2", "stage3"]  # stage 1 trained once
    robustness = (tables / "robustness.md").read_text()  # each variant's seed-0 classifier under corruption
    assert all(f"| {variant} / classify-linear-demo" in robustness for variant in ("full", "stage1_only", "scratch"))
    figures = {p.name for p in (results / "figures").iterdir()}
    assert {"loss_curves.png", "robustness.png", f"{pretrained[0]}-reconstructions.png"} <= figures
    report = snakemake("--configfile", str(study), "--report", str(tmp_path / "report.html"), cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-3000:]
    html = (tmp_path / "report.html").read_text()
    assert "ablation.csv" in html and "loss_curves.png" in html and "robustness.png" in html
    logged = json.loads((results / "mlflow" / "logged.json").read_text())
    assert logged["experiment"] == "tiny" and logged["logged"] == 3 + 3 + 3 * 2  # parents, stages (once), evaluations
    assert logged["tracking_uri"] == f"sqlite:///{results / 'mlflow.db'}"
    # Every heavy job forked from the warm-start server (execution.warm_start), none started cold.
    forked = (results / "logs" / "warm_start.log").read_text()
    assert forked.count(" pretrain --stage ") == 3 and forked.count(" finetune classify ") == 3 * 2

    assert not list(tmp_path.rglob("PWNED*")), "a config string ran as a command"
    nothing = snakemake("--configfile", str(study), "-n", cwd=tmp_path)
    assert "Nothing to be done" in nothing.stdout + nothing.stderr

    stage3 = snakemake(
        "--configfile",
        str(tiny_study(tmp_path, HOSTILE, **{"pretrain.stage3.train.base_lr": 2e-3})),
        "-n",
        cwd=tmp_path,
    )
    assert planned_jobs(stage3.stdout) == {
        "study_config": 1,  # the MLflow parents' settings
        "stage_config": 1,
        "pretrain_stage": 1,
        "evaluation_config": 2,
        "finetune": 2,
        "robustness": 1,
        "manifest": 1,
        "tables": 1,
        "track": 1,
        "all": 1,
    }

    downstream = snakemake(
        "--configfile",
        str(tiny_study(tmp_path, HOSTILE, **{"downstream.classify.linear.train": {**TRAIN, "epochs": 3}})),
        "-n",
        cwd=tmp_path,
    )
    assert planned_jobs(downstream.stdout) == {
        "study_config": 1,
        "evaluation_config": 6,
        "finetune": 6,
        "robustness": 3,
        "manifest": 1,
        "tables": 1,
        "track": 1,
        "all": 1,
    }

    # Other corruption levels: the seed-0 configs are rewritten and only the robustness scores rerun.
    levels = snakemake(
        "--configfile", str(tiny_study(tmp_path, HOSTILE, **{"downstream.robustness.drop": [0.25]})), "-n", cwd=tmp_path
    )
    assert planned_jobs(levels.stdout) == {
        "study_config": 1,
        "evaluation_config": 3,
        "robustness": 3,
        "tables": 1,
        "track": 1,  # the parents' resolved configs
        "all": 1,
    }

    # Execution-only settings rewrite the stage's config file but retrain nothing.
    execution = snakemake(
        "--configfile",
        str(
            tiny_study(
                tmp_path, HOSTILE, **{"pretrain.stage1.train": {**TRAIN, "num_workers": 0, "checkpoint_every_steps": 5}}
            )
        ),
        "-n",
        cwd=tmp_path,
    )
    assert planned_jobs(execution.stdout) == {"stage_config": 1}


def test_the_paper_preset_plans_without_any_data(tmp_path):
    plan = snakemake("-n", "-p", "--configfile", str(ROOT / "workflow/presets/paper.yaml"), cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr[-3000:]
    jobs = planned_jobs(plan.stdout)
    assert jobs["pretrain_stage"] == 15 and jobs["teacher_features"] == 1
    assert jobs["build_ef_shard"] == 2 * 64 and jobs["merge_ef"] == 2 and "build_ef" not in jobs  # data.ef.shards
    assert jobs["finetune"] == (11 + 6) * 8 * 3  # (trained + released variants) x evaluations x seeds
    assert jobs["released_checkpoint"] == 6  # the authors' six checkpoints, linked in; no file needed to plan
    # the datasets with public files and no data.roots entry start at their download
    assert {name for name in jobs if name.startswith("download_")} == {
        "download_n_caltech101",
        "download_cifar10_dvs",
        "download_weights_clip_vit_b16",  # the teacher's, as their clip.load fetches it: the features job reads it
    }
    weights = "--weights results/paper/downloads/weights/clip_vit_b16/ViT-B-16.pt"
    assert "teacher-features --config results/paper/teacher/" in plan.stdout and weights in plan.stdout
    assert {name for name in jobs if name.startswith("convert_")} == {
        "convert_n_caltech101",
        "convert_n_cars",
        "convert_n_imagenet",
        "convert_n_imagenet_variant",  # its mode/brightness splits, scored by the N-ImageNet robustness job
        "convert_cifar10_dvs",
        "convert_dsec_semantic",
        "convert_ddd17",
        "convert_mvsec",
    }
    assert "build_demo" not in jobs
    on_slurm = snakemake(
        "-n",
        "--profile",
        str(ROOT / "workflow/profiles/slurm"),
        "--configfile",
        str(ROOT / "workflow/presets/paper.yaml"),
        cwd=tmp_path,
    )
    assert on_slurm.returncode == 0, on_slurm.stderr[-3000:]
    # The same plan, with the heavy jobs submitted under the preset's resources.
    assert planned_jobs(on_slurm.stdout) == jobs
    submission = "exec evpretrain submit --folder results/paper/slurm --name pretrain --gpus 8 --cpus 8 --mem-gb 480"
    assert submission in on_slurm.stdout
    # Conversion and EF building are data jobs, whose commands take the job's CPUs (no --workers of this host's).
    data = (
        "exec evpretrain submit --folder results/paper/slurm --name data --gpus 0 --cpus 32 --mem-gb 64 --time-min 720"
    )
    assert on_slurm.stdout.count(f"{data} -- data build-ef") == 128
    assert (
        on_slurm.stdout.count(f"{data} -- data merge-ef") == 2 and on_slurm.stdout.count(f"{data} -- data convert") == 8
    )
    assert "--shard 63 --num-shards 64 --quiet" in on_slurm.stdout and "--workers" not in on_slurm.stdout
    assert plan.stdout.count("--workers") == 128 + 8  # here, every core of this host


def test_a_dataset_without_public_files_or_root_stops_the_plan_with_its_steps(tmp_path):
    config = yaml.safe_load((ROOT / "workflow/presets/paper.yaml").read_text())
    del config["data"]["roots"]["n-cars"]
    config["results"] = str(tmp_path / "results")
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(config))
    plan = snakemake("-n", "--configfile", str(tmp_path / "study.yaml"), cwd=tmp_path)
    assert plan.returncode != 0
    output = plan.stdout + plan.stderr
    assert "data.roots.n-cars is not set" in output and "https://www.prophesee.ai/2018/03/13/dataset-n-cars/" in output
    assert f"Put the copy in {tmp_path / 'results' / 'downloads' / 'n-cars'}" in output


def cifar10_dvs_archive(per_class):
    """CIFAR10-DVS as its public archive: one zip holding a zip a class, each <class>/<k>.aedat (AEDAT 2.0 events
    of a DVS128 here; the public copy's AEDAT4 reads through the same `auto` format)."""
    from test_download import zip_bytes
    from test_readers_aedat_legacy import dvs128_address, encode_aedat2

    rng = np.random.default_rng(0)
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    inner = {}
    for label, name in enumerate(classes):
        samples = {}
        for k in range(per_class):
            n = 200
            x, y = rng.integers(0, 128, n), (rng.integers(0, 128, n) // 12 + label * 12) % 128  # a class band
            samples[f"{name}/cifar10_{name}_{k}.aedat"] = encode_aedat2(
                dvs128_address(x, y, rng.integers(0, 2, n)), np.sort(rng.integers(0, 100_000, n))
            )
        inner[f"{name}.zip"] = zip_bytes(samples)
    return zip_bytes(inner)


@pytest.mark.slow
def test_a_study_downloads_converts_and_evaluates_a_dataset_from_a_mirror(tmp_path):
    from test_download import Loopback

    server = Loopback()
    try:
        data = cifar10_dvs_archive(per_class=10)
        server.files["CIFAR10DVS.zip"] = data
        study = tiny_study(
            tmp_path,
            **{
                "pretrain.data": {"input_size": [32, 32]},
                "study.seeds": [0],
                "study.evaluations": [
                    {"task": "classify", "mode": "linear", "dataset": "cifar10-dvs", "train": "train", "eval": "test"}
                ],
                "variants": {"scratch": {"stages": []}},
            },
        )
        # The registry's md5 is the public archive's: a registry file of the study's own gives the fixture's.
        entry = yaml.safe_load((ROOT / "src/evpretrain/data/registry.yaml").read_text())["cifar10-dvs"]
        entry["files"][0]["md5"] = hashlib.md5(data).hexdigest()
        (tmp_path / "registry.yaml").write_text(yaml.safe_dump({"cifar10-dvs": entry}))
        config = yaml.safe_load(study.read_text())
        config["data"] |= {"mirrors": {"cifar10-dvs": server.url}, "registry": str(tmp_path / "registry.yaml")}
        study.write_text(yaml.safe_dump(config))

        run = snakemake("--configfile", str(study), cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-4000:]
        assert server.requests == [("/CIFAR10DVS.zip", None)]
        downloads = tmp_path / "results/downloads/cifar10-dvs"
        assert len(list((downloads / "CIFAR10-DVS").glob("*/*.aedat"))) == 100
        assert not list((downloads / "CIFAR10-DVS").glob("*.zip"))  # the class archives, unpacked and removed
        with EventStore(tmp_path / "results/data/cifar10-dvs/train.h5") as train:
            assert len(train) == 90 and train.sensor_size == (128, 128)  # 9 of each class's 10: the 0.9/0.1 cut
        metrics = json.loads(next((tmp_path / "results/downstream").glob("*/seed0/metrics.json")).read_text())
        assert 0.0 <= metrics["top1_last"] <= 1.0 and metrics["top1_best"] >= metrics["top1_last"]
        assert "| scratch" in (tmp_path / "results/tables/ablation.md").read_text()
        nothing = snakemake("--configfile", str(study), "-n", cwd=tmp_path)
        assert "Nothing to be done" in nothing.stdout + nothing.stderr
    finally:
        server.server.shutdown()
        server.server.server_close()


def stage1_checkpoints(results):
    return sorted((results / "pretrain").glob("stage1-*/checkpoint.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("interruption", ["ctrl-c", "job killed"])
def test_a_stage_interrupted_under_snakemake_resumes_to_the_uninterrupted_weights(tmp_path, interruption):
    import signal
    import time

    import torch

    long_stage1 = {**TRAIN, "epochs": 400, "checkpoint_every_steps": 20, "log_every_steps": 20}
    changes = {"variants": {"s1": {"stages": [1]}}, "pretrain.stage1.train": long_stage1}
    until = ("--until", "pretrain_stage")
    (tmp_path / "reference").mkdir()
    reference = tiny_study(tmp_path / "reference", **changes)
    run = snakemake("--configfile", str(reference), *until, cwd=tmp_path / "reference")
    assert run.returncode == 0, run.stderr[-3000:]

    study = tiny_study(tmp_path, **changes)
    snake = snakemake_in_background("--configfile", str(study), *until, cwd=tmp_path)
    deadline = time.monotonic() + 300
    resume = []
    while not resume and time.monotonic() < deadline and snake.poll() is None:
        time.sleep(0.2)
        resume = list((tmp_path / "results" / "pretrain").glob("stage1-*/resume.pt"))
    assert resume, "the stage wrote no resume.pt before the end"
    if interruption == "ctrl-c":  # a terminal sends SIGINT to the whole foreground group: Snakemake and its job
        os.killpg(snake.pid, signal.SIGINT)
    else:  # the job dies (OOM killer, a node failure): Snakemake sees it fail
        # the training process itself, not the shell that started it (whose command line names it too)
        pattern = "python[^ ]* [^ ]*evpretrain pretrain"
        job = subprocess.run(["pgrep", "-s", str(snake.pid), "-f", pattern], capture_output=True, text=True)
        os.kill(int(job.stdout.split()[0]), signal.SIGKILL)
    output = snake.communicate(timeout=120)[0]
    # Snakemake deletes the outputs of the job it saw fail or stopped; resume.pt is none of them.
    assert snake.returncode != 0 and not stage1_checkpoints(tmp_path / "results"), output[-3000:]
    step = torch.load(resume[0], weights_only=True)["step"]
    assert 0 < step < 800

    rerun = snakemake("--configfile", str(study), *until, "--rerun-incomplete", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = next((tmp_path / "results" / "logs" / "pretrain").glob("stage1-*.log")).read_text()
    assert f"resuming {resume[0]} at step {step} of 800" in log
    (ours,), (theirs,) = stage1_checkpoints(tmp_path / "results"), stage1_checkpoints(tmp_path / "reference/results")
    ours, theirs = (torch.load(path, weights_only=True)["model"] for path in (ours, theirs))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)


def shell_words(command):
    """A shell command's words and operators (; && > ...), as bash splits them when it runs the command."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def test_config_strings_reach_every_command_as_one_word(tmp_path):
    hostile = tmp_path / HOSTILE
    study = tiny_study(
        tmp_path,
        HOSTILE,
        **{
            "data.roots": {"n-caltech101": str(hostile / "caltech")},
            "study.evaluations": [
                {"task": "classify", "mode": "linear", "dataset": "demo", "train": "train", "eval": "test"},
                {"task": "classify", "mode": "linear", "dataset": "n-caltech101", "train": "train", "eval": "test"},
            ],
            "tracking": {"uri": f"sqlite:///{hostile / 'runs.db'}", "live": True},
        },
    )
    plan = snakemake("--configfile", str(study), "-n", "-p", cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr[-3000:]
    # Each job's block ends at a blank line; its command (a config's text may span lines) follows "Shell command: ".
    blocks = plan.stdout.split("\n\n")
    commands = [block.split("Shell command: ", 1)[1] for block in blocks if "Shell command: " in block]
    commands = [command for command in commands if not command.startswith("None")]  # rule all
    assert len(commands) > 20
    for command in commands:  # the hostile path is one word of each command: no `touch` of its becomes a command
        words = shell_words(command)
        assert "touch" not in words and any(str(hostile) in word for word in words), command
    assert not list(tmp_path.rglob("PWNED*"))


@pytest.mark.parametrize(
    ("key", "value"),
    [("study.name", "demo'$(id)'"), ("variants", {"a'b": {"stages": []}}), ("study.pretrain_dataset", "../x")],
)
def test_names_that_become_paths_or_run_names_are_refused_by_the_schema(tmp_path, key, value):
    plan = snakemake("--configfile", str(tiny_study(tmp_path, **{key: value})), "-n", cwd=tmp_path)
    assert plan.returncode != 0
    assert "does not match" in plan.stdout + plan.stderr
