"""Run an ``evpretrain`` command as a SLURM job through submitit, and wait for it (what the pipeline's heavy rules
do under the slurm profile).

The job is checkpointable: on pre-emption or time-out SLURM sends SIGUSR2, submitit requeues the job under the same
id, and the rerun command resumes from the checkpoint its run folder holds (the training loop resumes exactly, so
the final weights are those of an uninterrupted run). With several tasks (GPUs) the tasks form one
torch.distributed job (submitit exports RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT): NCCL on GPUs,
gloo on CPUs.

The submitting process owns its job: an interrupt (SIGINT, SIGTERM, SIGHUP) cancels the job before the process
exits, and a watcher process cancels it when the submitting process dies any other way (SIGKILL), so an
interrupted pipeline leaves no job of its own running beside a rerun.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

import submitit

__all__ = ["CommandJob", "Interrupted", "JobResources", "cancel", "owned", "submit_command", "submit_prefix"]

INTERRUPTS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# The watcher: `done` on its stdin means the submitter is finished with the job; end of input without it means the
# submitter died, and the job is cancelled. In its own session, so the signal that kills the submitter's process
# group (Ctrl-C) does not kill it too.
WATCH = 'read -r line; [ "$line" = done ] || exec scancel "$1"'
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING"}
LOG_TAIL_LINES = 40


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


def submit_prefix(kind: str, resources: Mapping[str, object], folder: str | Path) -> str:
    """The shell words that run a command as a SLURM job of ``kind`` (the pipeline's launcher):
    ``evpretrain submit --folder F --name KIND --gpus 8 ... --``, one flag a set value of ``resources`` (config
    ``execution.resources.<kind>``). Every value is shell-quoted: a partition or folder reaches sbatch as one word."""
    flags = [
        word
        for key, value in resources.items()
        if value is not None
        for word in (f"--{key.replace('_', '-')}", str(value))
    ]
    return shlex.join(["evpretrain", "submit", "--folder", str(folder), "--name", kind, *flags, "--"])


class CommandJob(submitit.helpers.Checkpointable):
    """``evpretrain <argv>`` inside the job. ``checkpoint`` (submitit's, on SIGUSR2) resubmits the same command:
    the command resumes from its own checkpoint.pt."""

    def __init__(self, argv: Sequence[str]):
        self.argv = list(argv)

    def __call__(self) -> int:
        # submitit ignores SIGTERM, so on scancel SLURM would let the command run on for KillWait (30 s by default),
        # writing to its folder, before its SIGKILL. End it at once, unwinding (files being written are discarded);
        # a requeued job resumes from the command's own checkpoint either way.
        signal.signal(signal.SIGTERM, _exit_on_signal)
        # torch's threads: the CPUs SLURM gave this task, not what the submitting shell had (imported below).
        os.environ["OMP_NUM_THREADS"] = os.environ.get("SLURM_CPUS_PER_TASK", os.environ.get("OMP_NUM_THREADS", "1"))
        if submitit.JobEnvironment().num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        code = console_script()(self.argv)
        if code != 0:
            raise RuntimeError(f"evpretrain {' '.join(self.argv)} exited with status {code}")
        return code


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def console_script() -> Callable[[list[str]], int]:
    """The function the ``evpretrain`` command runs (pyproject's ``[project.scripts]``). Found by its entry point
    rather than imported, since the command line imports this module to submit."""
    scripts = entry_points(group="console_scripts", name="evpretrain")
    if not scripts:
        raise RuntimeError("no `evpretrain` console script: install the package (pip install -e .)")
    return next(iter(scripts)).load()


class Interrupted(BaseException):
    """The waiting process got ``signum``, and cancelled its job. A BaseException, as KeyboardInterrupt is: the
    polling inside submitit catches Exception."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


@contextmanager
def owned(job: submitit.Job) -> Iterator[submitit.Job]:
    """While the block runs, an interrupt (SIGINT, SIGTERM, SIGHUP) raises :class:`Interrupted` and cancels
    ``job``, as any other exception does but the job's own end (submitit's UncompletedJobError); a watcher process
    cancels it if this process dies otherwise. A signal that this process ignores (``nohup``'s SIGHUP, a background
    job's SIGINT) stays ignored. Signal handlers: the main thread only."""

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    previous = {s: signal.signal(s, interrupt) for s in INTERRUPTS if signal.getsignal(s) is not signal.SIG_IGN}
    watcher = subprocess.Popen(
        ["sh", "-c", WATCH, "sh", str(job.job_id)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield job
    except submitit.core.utils.UncompletedJobError:
        raise  # the job ended (failed, timed out, cancelled by someone else): nothing to cancel
    except BaseException:
        for s in previous:  # a second Ctrl-C must not cut the cancel short
            signal.signal(s, signal.SIG_IGN)
        cancel(str(job.job_id))
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        watcher.communicate(b"done\n")


def cancel(job_id: str, *, wait_s: float = 60.0) -> None:
    """Cancel the SLURM job ``job_id`` and wait up to ``wait_s`` seconds until SLURM no longer lists it as active: its
    processes are gone (a CommandJob ends on the cancel's SIGTERM), and a rerun cannot race them."""
    subprocess.run(["scancel", job_id], check=False)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout
        if state.strip() not in ACTIVE_STATES:
            return
        time.sleep(0.5)


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a job's log, under a header naming the file ("" when there is none)."""
    if not Path(path).is_file():
        return ""
    text = Path(path).read_text(errors="replace").splitlines()[-lines:]
    return "\n".join([f"last {len(text)} lines of {path}:", *text])


def submit_command(
    argv: Sequence[str], resources: JobResources, folder: Path, *, name: str = "evpretrain", wait: bool = True
) -> submitit.Job:
    """Submit ``evpretrain <argv>`` with ``resources``; submitit's logs and pickles go to ``folder/%j``. With
    ``wait``, block until the job ends (owning it: see :func:`owned`) and raise if it failed, with the tail of the
    job's error log in the message."""
    executor = submitit.AutoExecutor(folder=Path(folder) / "%j", cluster="slurm")
    executor.update_parameters(**resources.executor_parameters(name))
    if not wait:
        job = executor.submit(CommandJob(argv))
        print(f"submitted SLURM job {job.job_id}: evpretrain {' '.join(argv)}", flush=True)
        return job
    # Interrupts wait until the job has its owner: one that came between sbatch and the handlers would orphan it.
    held = signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPTS)
    try:
        job = executor.submit(CommandJob(argv))
        print(f"submitted SLURM job {job.job_id}: evpretrain {' '.join(argv)}", flush=True)
        with owned(job):
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
            try:
                job.results()  # every task's: result() refuses a job of several tasks
            except submitit.core.utils.FailedJobError as err:
                tails = "\n".join(filter(None, (log_tail(job.paths.stdout), log_tail(job.paths.stderr))))
                raise submitit.core.utils.FailedJobError(f"{err}\n{tails}") from None
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
    return job
