"""Run an ``evpretrain`` command as a SLURM job through submitit, and wait for it (what the pipeline's heavy rules
do under the slurm profile).

The job is checkpointable: on pre-emption or time-out SLURM sends SIGUSR2, submitit requeues the job under the same
id, and the rerun command resumes from the checkpoint its run folder holds (the training loop resumes exactly, so
the final weights are those of an uninterrupted run). With several tasks (GPUs) the tasks form one
torch.distributed job (submitit exports RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT): NCCL on GPUs,
gloo on CPUs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

import submitit

__all__ = ["CommandJob", "JobResources", "submit_command"]


@dataclass(frozen=True)
class JobResources:
    """What one job asks SLURM for (config ``execution.resources.<kind>``): GPUs per node, tasks per node (default:
    one a GPU, or one without GPUs; several CPU tasks train with gloo), CPUs per task, memory per node in GB, time
    limit in minutes, and the accounting fields."""

    gpus: int = 0
    tasks: int | None = None
    cpus: int = 2
    mem_gb: float = 8.0
    time_min: int = 60
    nodes: int = 1
    partition: str | None = None
    account: str | None = None
    qos: str | None = None

    def executor_parameters(self, name: str) -> dict:
        parameters = dict(
            name=name,
            timeout_min=self.time_min,
            nodes=self.nodes,
            cpus_per_task=self.cpus,
            mem_gb=self.mem_gb,
            tasks_per_node=self.tasks or max(self.gpus, 1),
            slurm_signal_delay_s=120,
        )
        if self.gpus:
            parameters["gpus_per_node"] = self.gpus
        for key in ("partition", "account", "qos"):
            if getattr(self, key) is not None:
                parameters[f"slurm_{key}"] = getattr(self, key)
        return parameters


class CommandJob(submitit.helpers.Checkpointable):
    """``evpretrain <argv>`` inside the job. ``checkpoint`` (submitit's, on SIGUSR2) resubmits the same command:
    the command resumes from its own checkpoint.pt."""

    def __init__(self, argv: Sequence[str]):
        self.argv = list(argv)

    def __call__(self) -> int:
        # torch's threads: the CPUs SLURM gave this task, not what the submitting shell had (imported below).
        os.environ["OMP_NUM_THREADS"] = os.environ.get("SLURM_CPUS_PER_TASK", os.environ.get("OMP_NUM_THREADS", "1"))
        if submitit.JobEnvironment().num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        code = console_script()(self.argv)
        if code != 0:
            raise RuntimeError(f"evpretrain {' '.join(self.argv)} exited with status {code}")
        return code


def console_script() -> Callable[[list[str]], int]:
    """The function the ``evpretrain`` command runs (pyproject's ``[project.scripts]``). Found by its entry point
    rather than imported, since the command line imports this module to submit."""
    scripts = entry_points(group="console_scripts", name="evpretrain")
    if not scripts:
        raise RuntimeError("no `evpretrain` console script: install the package (pip install -e .)")
    return next(iter(scripts)).load()


def submit_command(
    argv: Sequence[str], resources: JobResources, folder: Path, *, name: str = "evpretrain", wait: bool = True
) -> submitit.Job:
    """Submit ``evpretrain <argv>`` with ``resources``; submitit's logs and pickles go to ``folder/%j``. With
    ``wait``, block until the job ends and raise if it failed (its log's tail is in the error)."""
    executor = submitit.AutoExecutor(folder=Path(folder) / "%j", cluster="slurm")
    executor.update_parameters(**resources.executor_parameters(name))
    job = executor.submit(CommandJob(argv))
    print(f"submitted SLURM job {job.job_id}: evpretrain {' '.join(argv)}", flush=True)
    if wait:
        job.results()  # every task's: result() refuses a job of several tasks
    return job
