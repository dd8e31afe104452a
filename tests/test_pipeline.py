"""End to end: the Snakemake workflow on a small demo study, and its rerun semantics."""

import json
import os
import subprocess
import sys
from pathlib import Path

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


def snakemake(*args, cwd=ROOT):
    result = subprocess.run(
        [str(SNAKEMAKE), "all", "--cores", "2", "--snakefile", str(ROOT / "Snakefile"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=snakemake_env(cwd),
    )
    return result


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


def tiny_study(tmp_path, **changes):
    """A whole study in miniature: 3 variants, 2 seeds, a 32 x 32 ViT of depth 2, one epoch a stage."""
    config = {
        "results": str(tmp_path / "results"),
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
    study = tiny_study(tmp_path)
    run = snakemake("--configfile", str(study), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    tables = tmp_path / "results" / "tables"
    markdown = (tables / "ablation.md").read_text()
    assert all(f"| {variant}" in markdown for variant in ("full", "stage1_only", "scratch"))
    pretrained = sorted(p.parent.name for p in (tmp_path / "results" / "pretrain").glob("*/checkpoint.pt"))
    assert [name.split("-")[0] for name in pretrained] == ["stage1", "stage2", "stage3"]  # stage 1 trained once
    robustness = (tables / "robustness.md").read_text()  # each variant's seed-0 classifier under corruption
    assert all(f"| {variant} / classify-linear-demo" in robustness for variant in ("full", "stage1_only", "scratch"))
    figures = {p.name for p in (tmp_path / "results" / "figures").iterdir()}
    assert {"loss_curves.png", "robustness.png", f"{pretrained[0]}-reconstructions.png"} <= figures
    report = snakemake("--configfile", str(study), "--report", str(tmp_path / "report.html"), cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-3000:]
    html = (tmp_path / "report.html").read_text()
    assert "ablation.csv" in html and "loss_curves.png" in html and "robustness.png" in html
    logged = json.loads((tmp_path / "results" / "mlflow" / "logged.json").read_text())
    assert logged["experiment"] == "tiny" and logged["logged"] == 3 + 3 + 3 * 2  # parents, stages (once), evaluations
    assert logged["tracking_uri"] == f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}"

    nothing = snakemake("--configfile", str(study), "-n", cwd=tmp_path)
    assert "Nothing to be done" in nothing.stdout + nothing.stderr

    stage3 = snakemake(
        "--configfile", str(tiny_study(tmp_path, **{"pretrain.stage3.train.base_lr": 2e-3})), "-n", cwd=tmp_path
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
        str(tiny_study(tmp_path, **{"downstream.classify.linear.train": {**TRAIN, "epochs": 3}})),
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
        "--configfile", str(tiny_study(tmp_path, **{"downstream.robustness.drop": [0.25]})), "-n", cwd=tmp_path
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
            tiny_study(tmp_path, **{"pretrain.stage1.train": {**TRAIN, "num_workers": 0, "checkpoint_every_steps": 5}})
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
