"""The job that ``evpretrain submit`` sends, run here through submitit's local executor (tests/test_cluster.py runs it
under SLURM)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import submitit

from evpretrain.pipeline.submit import CommandJob, console_script, log_tail, submit_prefix

ROOT = Path(__file__).resolve().parents[1]


def test_submit_does_not_import_the_command_line_that_imports_it():
    code = "import sys, evpretrain.pipeline.submit; print('evpretrain.cli' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    from evpretrain.cli import main

    assert console_script() is main


def test_a_command_job_runs_the_command_and_fails_on_its_exit_status(tmp_path):
    executor = submitit.LocalExecutor(folder=tmp_path / "%j")
    executor.update_parameters(timeout_min=5)
    assert executor.submit(CommandJob(["data", "formats"])).result() == 0
    failed = executor.submit(CommandJob(["data", "verify", "--dataset", "n-nothing", "--root", str(tmp_path)]))
    with pytest.raises(submitit.core.utils.FailedJobError, match="exited with status 2"):
        failed.result()


def test_the_launcher_prefix_gives_each_value_to_the_command_as_one_word(tmp_path):
    # A stand-in `evpretrain` that prints the words it was given.
    fake = tmp_path / "bin" / "evpretrain"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    fake.chmod(0o755)
    folder = tmp_path / "a b; touch PWNED1"
    resources = {"partition": "x; touch PWNED2", "qos": "$(touch PWNED3)", "account": None, "mem_gb": 4.0, "cpus": 2}
    prefix = submit_prefix("data", resources, folder)
    run = subprocess.run(
        ["bash", "-c", prefix + " data formats"],
        cwd=tmp_path,
        env={"PATH": f"{fake.parent}:/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == [
        "submit", "--folder", str(folder), "--name", "data",
        "--partition", "x; touch PWNED2", "--qos", "$(touch PWNED3)", "--mem-gb", "4.0", "--cpus", "2",
        "--", "data", "formats",
    ]  # fmt: skip
    assert not list(tmp_path.rglob("PWNED*"))


def test_the_schema_refuses_shell_characters_in_the_slurm_names():
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    schema = str(ROOT / "workflow/schemas/config.schema.yaml")
    for key, value in (("partition", "x; touch PWNED"), ("account", "a b"), ("qos", "$(id)"), ("partition", "a,")):
        with pytest.raises(WorkflowError, match="does not match"):
            validate({"data": {}, "execution": {"resources": {"data": {key: value}}}}, schema)
    validate({"data": {}, "execution": {"resources": {"data": {"partition": "cpu,cpu-long", "qos": "normal"}}}}, schema)


def test_log_tail_gives_the_last_lines_under_the_files_name(tmp_path):
    log = tmp_path / "1_0_log.err"
    log.write_text("".join(f"line {i}\n" for i in range(50)))
    assert log_tail(log, 3) == f"last 3 lines of {log}:\nline 47\nline 48\nline 49"
    assert log_tail(tmp_path / "none") == ""
