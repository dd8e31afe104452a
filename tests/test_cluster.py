"""The pipeline on a real SLURM cluster (workflow/scripts/slurm-local.sh starts one): jobs go through submitit, show
in sacct, give the local profile's results, a job pre-empted with SIGUSR2 requeues and resumes to the same end, two
tasks of one job train as one torch.distributed run, and an interrupted submitter or Snakemake cancels its jobs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from test_pipeline import ROOT, TRAIN, snakemake, snakemake_in_background, tiny_study

pytestmark = pytest.mark.cluster


def _cluster_up() -> str | None:
    if shutil.which("sinfo") is None:
        return "SLURM is not installed (workflow/scripts/slurm-local.sh install)"
    state = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, timeout=30)
    if state.returncode != 0 or not any(s in state.stdout for s in ("idle", "mix", "alloc")):
        return "no SLURM node answers (workflow/scripts/slurm-local.sh start)"
    return None


@pytest.fixture(scope="module", autouse=True)
def cluster():
    reason = _cluster_up()
    if reason:
        pytest.skip(reason)


TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}


def sacct(job_ids, timeout_s=60):
    """[(id, name, state)] of the jobs once accounting has them all finished (it lags the jobs by seconds)."""
    deadline = time.monotonic() + timeout_s
    while True:
        out = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-o", "JobID,JobName,State", "-j", ",".join(job_ids)],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        rows = [line.split("|") for line in out.splitlines()]
        rows = [(job, name, state.split()[0] if state else state) for job, name, state in rows]  # "CANCELLED by 0"
        # A requeued job passes through REQUEUED and PREEMPTED (and accounting may still say so just after it ends).
        finished = len(rows) == len(job_ids) and all(state in TERMINAL_STATES for _, _, state in rows)
        if finished or time.monotonic() > deadline:
            return rows
        time.sleep(1)


def evaluation_metrics(results):
    return {
        p.parent.parent.name + "/" + p.parent.name: json.loads(p.read_text())["top1_last"]
        for p in sorted((results / "downstream").glob("*/seed*/metrics.json"))
    }


def test_the_slurm_profile_gives_the_local_profiles_results_through_sacct_visible_jobs(tmp_path):
    local, slurm = tmp_path / "local", tmp_path / "slurm"
    local.mkdir(), slurm.mkdir()
    run = snakemake("--configfile", str(tiny_study(local)), cwd=local)
    assert run.returncode == 0, run.stderr[-3000:]
    run = snakemake(
        "--configfile", str(tiny_study(slurm)), "--profile", str(ROOT / "workflow/profiles/slurm"), cwd=slurm
    )
    assert run.returncode == 0, run.stderr[-3000:]
    job_ids = sorted(p.name for p in (slurm / "results" / "slurm").iterdir() if p.name.isdigit())
    assert len(job_ids) == 1 + 3 + 6 + 3  # teacher, stages, evaluations, robustness (each variant's seed 0)
    states = sacct(job_ids)
    assert len(states) == len(job_ids) and all(state == "COMPLETED" for _, _, state in states), states
    assert {name for _, name, _ in states} == {"teacher", "pretrain", "finetune"}
    assert evaluation_metrics(slurm / "results") == evaluation_metrics(local / "results")
    tables = [(root / "results" / "tables" / "robustness.csv").read_text() for root in (local, slurm)]
    assert tables[0] == tables[1]


def test_a_job_preempted_with_usr2_requeues_and_resumes_to_the_same_end(tmp_path):
    from evpretrain.data.config import DemoConfig
    from evpretrain.data.demo import build_demo

    stores = build_demo(
        DemoConfig(
            samples={"train": 48, "val": 8},
            image_size=32,
            digit_size=12,
            num_frames=3,
            pan_speed_px_per_frame=(0.5, 1.0),
            digit_drift_px_per_frame=0.3,
        ),
        tmp_path / "data",
        workers=1,
        progress=False,
    )
    # Long enough (288 steps) that the signal lands mid-run, not after the last step, on a busy machine too.
    study = tiny_study(
        tmp_path,
        **{"pretrain.stage1.train": {"epochs": 24, "batch_size": 4, "base_lr": 1e-3, "checkpoint_every_steps": 4}},
    )
    stage = [
        "pretrain",
        "--stage",
        "1",
        "--config",
        str(study),
        "--data",
        str(stores["train"]),
        "--val",
        str(stores["val"]),
    ]
    reference = subprocess.run(
        [sys.executable, "-m", "evpretrain.cli", *stage, "--out", str(tmp_path / "local")],
        capture_output=True,
        text=True,
    )
    assert reference.returncode == 0, reference.stderr[-2000:]

    submit = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "evpretrain.cli",
            "submit",
            "--folder",
            str(tmp_path / "jobs"),
            "--cpus",
            "2",
            "--mem-gb",
            "4",
            "--time-min",
            "10",
            "--",
            *stage,
            "--out",
            str(tmp_path / "slurm"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    job_id = submit.stdout.readline().split()[3].rstrip(":")
    checkpoint = tmp_path / "slurm" / "resume.pt"  # the state of the run in progress
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and time.monotonic() < deadline:  # pre-empt once the run has a checkpoint
        time.sleep(0.5)
    assert checkpoint.exists(), "the job wrote no checkpoint"
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    time.sleep(5)
    # submitit requeues under the same id; SLURM would hold it about 2 minutes (BeginTime): start it now.
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True)
    assert submit.wait(timeout=600) == 0
    log = "".join(p.read_text() for p in (tmp_path / "jobs").glob(f"{job_id}/*_log.*"))
    assert log.count("Starting with JobEnvironment") == 2  # the job ran, was requeued, and ran again
    final = json.loads((tmp_path / "slurm" / "metrics.json").read_text())
    expected = json.loads((tmp_path / "local" / "metrics.json").read_text())
    assert final["step"] == expected["step"] and final["loss"] == expected["loss"]
    assert sacct([job_id])[0][2] == "COMPLETED"


def test_two_cpu_tasks_train_as_one_ddp_job_that_matches_one_process_with_their_global_batch(tmp_path):
    from evpretrain.data.config import DemoConfig
    from evpretrain.data.demo import build_demo
    from evpretrain.training.checkpoint import load_checkpoint

    stores = build_demo(
        DemoConfig(
            samples={"train": 32, "val": 8},
            image_size=32,
            digit_size=12,
            num_frames=3,
            pan_speed_px_per_frame=(0.5, 1.0),
            digit_drift_px_per_frame=0.3,
        ),
        tmp_path / "data",
        workers=1,
        progress=False,
    )
    # Densest-patch masking: the masks follow the events and draw only to break ties (on each rank's own stream),
    # so the two runs see nearly the same steps; tests/test_training.py checks exact DDP equivalence.
    method = {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2, "masking": "densest"}
    runs = {}
    for name, batch_size in (("single", 4), ("ddp", 2)):
        (tmp_path / name).mkdir()
        study = tiny_study(
            tmp_path / name,
            **{
                "pretrain.stage1": {
                    "method": method,
                    "train": {"epochs": 3, "batch_size": batch_size, "base_lr": 1e-3, "checkpoint_every_steps": 100},
                }
            },
        )
        runs[name] = [
            "pretrain",
            "--stage",
            "1",
            "--config",
            str(study),
            "--data",
            str(stores["train"]),
            "--val",
            str(stores["val"]),
            "--out",
            str(tmp_path / name / "out"),
        ]
    single = subprocess.run([sys.executable, "-m", "evpretrain.cli", *runs["single"]], capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    submit = subprocess.run(
        [
            sys.executable,
            "-m",
            "evpretrain.cli",
            "submit",
            "--folder",
            str(tmp_path / "jobs"),
            "--tasks",
            "2",
            "--cpus",
            "1",
            "--mem-gb",
            "4",
            "--time-min",
            "10",
            "--",
            *runs["ddp"],
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert submit.returncode == 0, submit.stderr[-3000:]
    job_id = submit.stdout.split()[3].rstrip(":")
    assert sacct([job_id])[0][2] == "COMPLETED"
    ddp = json.loads((tmp_path / "ddp" / "out" / "metrics.json").read_text())
    reference = json.loads((tmp_path / "single" / "out" / "metrics.json").read_text())
    assert ddp["world_size"] == 2 and ddp["global_batch_size"] == reference["global_batch_size"] == 4
    assert ddp["step"] == reference["step"] and ddp["loss"] == pytest.approx(reference["loss"], rel=1e-3)
    task_logs = sorted((tmp_path / "jobs" / job_id).glob("*_log.out"))  # one process a task, joined into one run
    assert len(task_logs) == 2 and all("Starting with JobEnvironment" in p.read_text() for p in task_logs)
    checkpoint = load_checkpoint(tmp_path / "ddp" / "out" / "checkpoint.pt")
    assert checkpoint["world_size"] == 2
    for name, tensor in load_checkpoint(tmp_path / "single" / "out" / "checkpoint.pt")["model"].items():
        torch.testing.assert_close(checkpoint["model"][name], tensor, rtol=0, atol=1e-4, msg=name)


ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING"}


def squeue_state(job_id):
    """The job's state in squeue, "" once SLURM no longer lists it."""
    run = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    return run.stdout.strip()


def wait_for(condition, timeout_s):
    """Whether ``condition()`` came true within ``timeout_s`` seconds; it is called once per try, never again after it
    held (it may act, as blocking_job's does)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@contextmanager
def blocking_job(tmp_path, **popen):
    """`evpretrain submit` of a command that waits without using a CPU: `data info` on a named pipe that this test
    holds open and never writes to. Yields (the submitting process, the job id) once the command reads the pipe."""
    fifo = tmp_path / "never-written"
    os.mkfifo(fifo)
    argv = ["submit", "--folder", str(tmp_path / "jobs"), "--cpus", "1", "--mem-gb", "1", "--time-min", "5"]
    submit = subprocess.Popen(
        [sys.executable, "-m", "evpretrain.cli", *argv, "--", "data", "info", str(fifo)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )
    job_id = submit.stdout.readline().split()[3].rstrip(":")
    writer = None

    def reading():  # a writer's open succeeds once a reader has the pipe open: the command runs
        nonlocal writer
        try:
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            return False
        return True

    try:
        assert wait_for(reading, 60), f"the job's command never opened the pipe (job {squeue_state(job_id)})"
        assert squeue_state(job_id) == "RUNNING"
        yield submit, job_id
    finally:
        if writer is not None:
            os.close(writer)
        if submit.poll() is None:
            submit.kill()
            subprocess.run(["scancel", job_id])


def assert_cancelled(job_id):
    assert wait_for(lambda: squeue_state(job_id) not in ACTIVE_STATES, 10), squeue_state(job_id)
    assert sacct([job_id], timeout_s=30)[0][2] == "CANCELLED"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_an_interrupted_submit_cancels_its_job_and_fails(tmp_path, signum):
    with blocking_job(tmp_path) as (submit, job_id):
        submit.send_signal(signum)
        assert submit.wait(timeout=30) == 128 + signum
        assert f"{signal.Signals(signum).name}: cancelled the SLURM job" in submit.stderr.read()
        assert_cancelled(job_id)


def test_a_killed_submit_has_its_job_cancelled_by_its_watcher(tmp_path):
    with blocking_job(tmp_path) as (submit, job_id):
        submit.kill()  # SIGKILL: no handler runs
        submit.wait(timeout=30)
        assert_cancelled(job_id)


def test_a_submit_that_ignores_sighup_keeps_its_job(tmp_path):
    # nohup: the user asked for the run to outlive the terminal.
    with blocking_job(tmp_path, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)) as (submit, job_id):
        submit.send_signal(signal.SIGHUP)
        time.sleep(3)
        assert submit.poll() is None and squeue_state(job_id) == "RUNNING"
        submit.send_signal(signal.SIGTERM)
        assert submit.wait(timeout=30) == 128 + signal.SIGTERM
        assert_cancelled(job_id)


def test_a_failed_jobs_error_is_in_the_submitters_error(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "evpretrain.cli", "submit", "--folder", str(tmp_path / "jobs"), "--cpus", "1"]
        + ["--mem-gb", "1", "--time-min", "5", "--", "data", "verify", "--dataset", "n-nothing", "--root", "/nowhere"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1
    job_id = run.stdout.split()[3].rstrip(":")
    assert "last " in run.stderr and f"{job_id}_0_log.err:" in run.stderr
    assert "evpretrain: error: unknown dataset 'n-nothing'" in run.stderr  # the command's own message


def test_a_partition_reaches_sbatch_as_one_word(tmp_path):
    from evpretrain.pipeline.submit import submit_prefix

    prefix = submit_prefix("data", {"partition": "x; touch PWNED", "cpus": 1, "mem_gb": 1}, tmp_path / "jobs")
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    run = subprocess.run(
        ["bash", "-c", f"{prefix} data formats"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode != 0 and "invalid partition" in run.stderr.lower(), run.stderr[-2000:]
    assert "x; touch PWNED" in run.stderr and not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupting_snakemake_cancels_the_jobs_it_submitted(tmp_path, signum):
    # One endless stage, the only SLURM job; the signal goes to Snakemake's process group, as a terminal's Ctrl-C
    # (SIGINT), and SLURM's or systemd's stop of a Snakemake run (SIGTERM) send it.
    study = tiny_study(
        tmp_path,
        variants={"stage1_only": {"stages": [1]}},
        **{"pretrain.stage1.train": {**TRAIN, "epochs": 100_000, "log_every_steps": 10}},
    )
    profile = str(ROOT / "workflow/profiles/slurm")
    run = snakemake_in_background(
        "--profile", profile, "--configfile", str(study), "--until", "pretrain_stage", cwd=tmp_path
    )
    jobs = tmp_path / "results" / "slurm"
    try:
        logs = lambda: "".join(p.read_text() for p in jobs.glob("*/*_log.err"))  # noqa: E731
        assert wait_for(lambda: " step 10/" in logs(), 120), "the stage never started training"
        (job_id,) = [p.name for p in jobs.iterdir() if p.name.isdigit()]
        assert squeue_state(job_id) == "RUNNING"
        os.killpg(run.pid, signum)
        output = run.communicate(timeout=60)[0]
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode != 0
    assert squeue_state(job_id) not in ACTIVE_STATES  # gone when Snakemake is: a rerun cannot race it
    assert_cancelled(job_id)
    (log,) = (tmp_path / "results" / "logs" / "pretrain").glob("*.log")
    assert f"{signal.Signals(signum).name}: cancelled the SLURM job" in log.read_text(), output[-3000:]
    assert not list((tmp_path / "results" / "pretrain").glob("*/checkpoint.pt"))


def test_a_failed_jobs_error_is_in_snakemakes_error_and_in_its_log(tmp_path):
    study = str(tiny_study(tmp_path, variants={"stage1_only": {"stages": [1]}}))
    profile = str(ROOT / "workflow/profiles/slurm")
    built = snakemake("--configfile", study, "--profile", profile, "--until", "build_demo", cwd=tmp_path)
    assert built.returncode == 0, built.stderr[-3000:]
    store = tmp_path / "results/data/demo/train.h5"  # cut short, with its time kept: the stage's job fails on it
    times = store.stat()
    store.write_bytes(store.read_bytes()[:5000])
    os.utime(store, ns=(times.st_atime_ns, times.st_mtime_ns))
    run = snakemake("--configfile", study, "--profile", profile, "--until", "pretrain_stage", cwd=tmp_path)
    assert run.returncode != 0
    error = f"evpretrain: error: {store}: cannot open as HDF5"  # the command's own message, inside the SLURM job
    assert error in run.stderr
    (log,) = (tmp_path / "results/logs/pretrain").glob("*.log")
    assert error in log.read_text() and "_0_log.err:" in log.read_text()


def stage_weights(results):
    (checkpoint,) = (results / "pretrain").glob("stage1-*/checkpoint.pt")
    return torch.load(checkpoint, weights_only=True)["model"]


def test_a_stage_whose_snakemake_is_interrupted_resumes_on_the_rerun_to_the_uninterrupted_weights(tmp_path):
    # One thread in the SLURM job as in the local reference: a reduction split over other threads rounds otherwise.
    changes = {
        "variants": {"stage1_only": {"stages": [1]}},
        "pretrain.stage1.train": {**TRAIN, "epochs": 300, "checkpoint_every_steps": 20, "log_every_steps": 20},
        "execution": {"resources": {"pretrain": {"cpus": 1, "mem_gb": 4, "time_min": 30}}},
    }
    until = ("--until", "pretrain_stage")
    reference = tmp_path / "reference"
    reference.mkdir()
    run = snakemake("--configfile", str(tiny_study(reference, **changes)), *until, cwd=reference)
    assert run.returncode == 0, run.stderr[-3000:]

    study, profile = tiny_study(tmp_path, **changes), ("--profile", str(ROOT / "workflow/profiles/slurm"))
    interrupted = snakemake_in_background(*profile, "--configfile", str(study), *until, cwd=tmp_path)
    try:
        resume = lambda: list((tmp_path / "results" / "pretrain").glob("stage1-*/resume.pt"))  # noqa: E731
        assert wait_for(lambda: bool(resume()), 300), "the stage wrote no resume.pt"
        os.killpg(interrupted.pid, signal.SIGINT)  # Ctrl-C: Snakemake has the job cancelled, deletes its outputs
        output = interrupted.communicate(timeout=120)[0]
    finally:
        if interrupted.poll() is None:
            os.killpg(interrupted.pid, signal.SIGKILL)
    assert interrupted.returncode != 0 and not list((tmp_path / "results" / "pretrain").glob("*/checkpoint.pt"))
    step = torch.load(resume()[0], weights_only=True)["step"]
    assert 0 < step < 600, output[-3000:]

    rerun = snakemake("--configfile", str(study), *profile, *until, "--rerun-incomplete", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    logs = "".join(p.read_text() for p in (tmp_path / "results" / "slurm").glob("*/*_log.err"))
    assert f"resuming {resume()[0]} at step {step} of 600" in logs
    ours, theirs = stage_weights(tmp_path / "results"), stage_weights(reference / "results")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)
