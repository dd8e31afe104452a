"""The job that ``evpretrain submit`` sends, run here through submitit's local executor (tests/test_cluster.py runs it
under SLURM)."""

import subprocess
import sys

import pytest
import submitit

from evpretrain.pipeline.submit import CommandJob, console_script


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
