"""The training loop every stage shares: AdamW on a per-step cosine schedule, checkpoints a preempted run resumes
from exactly, a stop on a non-finite loss, DDP when launched with several processes, metrics.json, hooks.

Exact resume: the weights after a run that was killed and rerun equal, bit for bit, those of an uninterrupted run.
What each step sees is a function of the step alone: the data position is ``divmod(step, steps_per_epoch)``, the
sampler's order depends on (seed, epoch), each sample's augmentation on (seed, epoch, index) (not on the loader's
workers), and the checkpoint holds every rank's RNG states for what the step itself draws (dropout, masks).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from evpretrain.config import to_mapping
from evpretrain.errors import ResumeError
from evpretrain.files import AtomicPath, FolderLock
from evpretrain.training.checkpoint import (
    CHECKPOINT_NAME,
    METRICS_NAME,
    RESUME_NAME,
    load_checkpoint,
    save_checkpoint,
    write_json,
)
from evpretrain.training.config import EXECUTION_FIELDS, TrainConfig, uses_bf16
from evpretrain.training.distributed import (
    ProcessLayout,
    gather_objects,
    init_process_group,
    mean_across_ranks,
    process_layout,
    resolve_device,
    to_device,
)
from evpretrain.training.hooks import Hook, TrainState
from evpretrain.training.optim import build_optimizer, cosine_schedule, peak_lr
from evpretrain.training.rng import capture_rng_state, restore_rng_state, seed_all
from evpretrain.training.sampling import EpochBatchSampler, SeededSamples

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1

StepFn = Callable[[nn.Module, Any], tuple[torch.Tensor, Mapping[str, float | torch.Tensor]]]


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the run stopped before the step and left its last checkpoint untouched.

    ``step`` is the number (1-based, as in the log) of the step whose loss was not finite; ``checkpoint_step`` the
    step the kept checkpoint holds (None when none was written).
    """

    def __init__(
        self, step: int, loss: float, terms: Mapping[str, float], checkpoint: Path, checkpoint_step: int | None
    ):
        self.step = step
        self.loss = loss
        self.terms = dict(terms)
        self.checkpoint = checkpoint
        self.checkpoint_step = checkpoint_step
        kept = (
            f"the last good checkpoint {checkpoint} (step {checkpoint_step}) is kept"
            if checkpoint_step is not None
            else "no checkpoint had been written yet"
        )
        super().__init__(f"non-finite loss {loss} at step {step} (loss terms {self.terms}); {kept}")


def train(
    model: nn.Module,
    step_fn: StepFn,
    dataset: Dataset,
    config: TrainConfig,
    out_dir: str | Path,
    *,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    param_groups: Sequence[Mapping[str, Any]] | None = None,
    hooks: Sequence[Hook] = (),
    device: str | torch.device | None = None,
    identity: Mapping[str, Any] | None = None,
    inference: Mapping[str, Any] | None = None,
    batch_transform: Callable[[Any], Any] | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place and return the final metrics (also written to ``out_dir/metrics.json``).

    ``step_fn(model, batch) -> (loss, {name: float})`` computes the scalar loss of one batch (already on the
    device, under the run's autocast) and its terms for logging. Under several processes ``model`` is the
    DistributedDataParallel wrapper: call its forward (``model(...)``), not a submodule, or gradients are not
    synchronised. The logged ``loss`` is averaged over ranks; the terms are rank 0's.

    ``param_groups`` (optional) are optimizer groups with ``lr_scale`` and ``weight_decay`` keys (see
    ``optim.param_groups`` and ``optim.layer_scales``); by default, MAE's decay / no-decay split of ``model``.
    ``device``: default ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU. A dataset with a
    ``set_epoch(epoch)`` method (as for ``DistributedSampler``) is told each epoch before its batches are loaded.

    ``out_dir/resume.pt`` is written every ``config.checkpoint_every_steps`` steps and at the end, when it becomes
    ``out_dir/checkpoint.pt`` too (a hard link); a rerun resumes from it (a finished run returns its metrics at
    once). Pipelines declare only checkpoint.pt, so the state of an interrupted run survives them. Launched with several
    processes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT`` set), the loop joins the process group
    (NCCL on GPUs, gloo on CPUs), shards the data, and rank 0 writes the files.

    ``identity`` names what the run trains on and from, beyond ``config``: e.g. the data's checksum, the method's
    settings, the initial weights' checksum (JSON-like values). It is saved in the checkpoint, and a checkpoint of
    another identity is not resumed. Rank 0 holds ``out_dir`` (``FolderLock``) while it runs: a second run on the
    same folder is refused, naming this one. ``inference`` (JSON-like) is saved as the checkpoint's ``inference`` entry:
    what ``evpretrain.inference`` needs to use the weights without the study config (not part of the identity).
    ``batch_transform(batch) -> batch`` runs on each batch once it is on the device, outside autocast, before
    ``step_fn``: the dense transforms a loader leaves to the device (``PretrainBatchViews``).
    Raises NonFiniteLossError on a NaN or infinite loss, ResumeError on a checkpoint of other settings or identity,
    FolderLockedError when another live run holds ``out_dir``.
    """
    layout = process_layout()
    device = resolve_device(device, layout)
    lock = FolderLock(out_dir).acquire() if layout.is_main else None
    joined = init_process_group(layout, device)
    if batch_transform is not None:
        step_fn = _transformed(step_fn, batch_transform, device)
    try:
        return _train(
            model,
            step_fn,
            dataset,
            config,
            Path(out_dir),
            collate_fn,
            param_groups,
            hooks,
            device,
            layout,
            to_mapping(dict(identity or {})),
            to_mapping(dict(inference or {})),
        )
    finally:
        if joined:
            dist.destroy_process_group()
        if lock is not None:
            lock.release()


def _train(
    model: nn.Module,
    step_fn: StepFn,
    dataset: Dataset,
    config: TrainConfig,
    out_dir: Path,
    collate_fn: Callable[[list[Any]], Any] | None,
    param_groups: Sequence[Mapping[str, Any]] | None,
    hooks: Sequence[Hook],
    device: torch.device,
    layout: ProcessLayout,
    identity: Mapping[str, Any],
    inference: Mapping[str, Any],
) -> dict[str, Any]:
    sampler = EpochBatchSampler(
        len(dataset), config.batch_size, seed=config.seed, rank=layout.rank, world_size=layout.world_size
    )
    schedule = _schedule(config, sampler.batches_per_epoch, layout.world_size)
    model.to(device)
    optimizer = build_optimizer(model if param_groups is None else param_groups, config, layout.world_size, device.type)
    state = _initial_state(model, config, out_dir, device, layout, sampler.batches_per_epoch, schedule)
    record = _Record(
        checkpoint=out_dir / CHECKPOINT_NAME, resume=out_dir / RESUME_NAME, identity=identity, inference=inference
    )
    if record.resume.exists() or record.checkpoint.exists():
        finished = _resume(model, optimizer, hooks, schedule, state, record, layout)
        if finished is not None:
            return finished
    else:
        # Seeds what the steps draw (dropout, masks); the caller seeds the model's initialisation.
        seed_all(config.seed + layout.rank)
    net = model
    if layout.distributed:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        net = torch.compile(net)  # a wrapper: ``model`` (saved, returned) stays the plain module
    loader = _loader(dataset, sampler, config, collate_fn, device)
    metrics = _run_steps(
        net,
        step_fn,
        loader,
        sampler,
        getattr(dataset, "set_epoch", None),
        optimizer,
        hooks,
        state,
        schedule,
        record,
        layout,
    )
    if layout.is_main:
        _publish(record)
        write_json(metrics, out_dir / METRICS_NAME)
    for hook in hooks:
        hook.on_train_end(state, metrics)
    return metrics


def _transformed(step_fn: StepFn, transform: Callable[[Any], Any], device: torch.device) -> StepFn:
    """``step_fn`` of ``transform(batch)``, the transform run in float32: it builds the inputs, not the model's math."""

    def step(net: nn.Module, batch: Any):
        with torch.autocast(device.type, enabled=False):
            batch = transform(batch)
        return step_fn(net, batch)

    return step


def _publish(record: _Record) -> None:
    """Make the finished run's state ``checkpoint.pt``: a hard link to ``resume.pt`` (no copy), so that when a
    pipeline deletes checkpoint.pt (a job failing after training), a rerun finds the finished state and
    publishes it again at once."""
    if record.checkpoint.exists() and os.path.samefile(record.checkpoint, record.resume):
        return
    target = AtomicPath(record.checkpoint)
    try:
        target.tmp.unlink()
        os.link(record.resume, target.tmp)
    except OSError:  # a file system without hard links
        shutil.copyfile(record.resume, target.tmp)
    os.replace(target.tmp, record.checkpoint)


def _schedule(config: TrainConfig, steps_per_epoch: int, world_size: int) -> dict[str, Any]:
    """The learning-rate schedule's settings (saved in the checkpoint: a resumed run must have the same)."""
    return {
        "peak_lr": peak_lr(config, world_size),
        "min_lr": config.min_lr,
        "warmup_steps": round(config.warmup_epochs * steps_per_epoch),
        "total_steps": config.epochs * steps_per_epoch,
    }


def _initial_state(
    model: nn.Module,
    config: TrainConfig,
    out_dir: Path,
    device: torch.device,
    layout: ProcessLayout,
    steps_per_epoch: int,
    schedule: Mapping[str, Any],
) -> TrainState:
    """The run before its first step; a resume moves ``step`` and ``start_step`` on."""
    total_steps = schedule["total_steps"]
    return TrainState(
        config=config,
        out_dir=out_dir,
        model=model,
        device=device,
        amp=uses_bf16(config, device.type),
        rank=layout.rank,
        world_size=layout.world_size,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        stop_step=total_steps if config.max_steps is None else min(config.max_steps, total_steps),
        start_step=0,
        peak_lr=schedule["peak_lr"],
    )


def _resume(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    hooks: Sequence[Hook],
    schedule: Mapping[str, Any],
    state: TrainState,
    record: _Record,
    layout: ProcessLayout,
) -> dict[str, Any] | None:
    """Continue from ``record.resume`` (a run in progress, or finished), else ``record.checkpoint`` (a finished
    run, continued past its ``max_steps``): load the model, optimizer, this rank's RNG states and the hooks, and
    bring ``state`` and ``record`` to its step. Returns its metrics when that run had already finished (publishing
    checkpoint.pt and writing metrics.json if they are missing), else None."""
    checkpoint_path = record.resume if record.resume.exists() else record.checkpoint
    checkpoint = load_checkpoint(checkpoint_path, required=("format", "model", "optimizer", "step"))
    _check_resumable(checkpoint, state.config, schedule, layout.world_size, checkpoint_path, record.identity)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    restore_rng_state(checkpoint["rng"][layout.rank])
    _load_hooks(hooks, checkpoint, checkpoint_path)
    record.window.load_state_dict(checkpoint["window"])
    record.logged = dict(checkpoint["logged"])
    record.rows = list(checkpoint["metrics"].get("log", []))  # the rows up to the checkpoint's step
    record.elapsed_before = checkpoint["elapsed_s"]
    state.step = state.start_step = record.checkpoint_step = checkpoint["step"]
    if state.step >= state.stop_step:
        if layout.is_main and checkpoint_path == record.resume:
            _publish(record)
        if layout.is_main and not (state.out_dir / METRICS_NAME).exists():
            write_json(checkpoint["metrics"], state.out_dir / METRICS_NAME)
        return dict(checkpoint["metrics"])
    if layout.is_main:
        logger.info("resuming %s at step %d of %d", checkpoint_path, state.step, state.stop_step)
    return None


def _loader(
    dataset: Dataset,
    sampler: EpochBatchSampler,
    config: TrainConfig,
    collate_fn: Callable[[list[Any]], Any] | None,
    device: torch.device,
) -> DataLoader:
    return DataLoader(
        SeededSamples(dataset, config.seed),
        batch_sampler=sampler,
        num_workers=config.num_workers,
        collate_fn=collate_fn,
        pin_memory=device.type == "cuda",
        persistent_workers=config.num_workers > 0,
        generator=torch.Generator(),  # else starting an iterator draws a worker seed from the global RNG
    )


def _run_steps(
    net: nn.Module,
    step_fn: StepFn,
    loader: DataLoader,
    sampler: EpochBatchSampler,
    set_epoch: Callable[[int], None] | None,
    optimizer: torch.optim.Optimizer,
    hooks: Sequence[Hook],
    state: TrainState,
    schedule: Mapping[str, Any],
    record: _Record,
    layout: ProcessLayout,
) -> dict[str, Any]:
    """Steps from ``state.step`` to ``state.stop_step``, logging and checkpointing on the way; returns the final
    metrics (those of the last checkpoint). ``net`` is the model or its DDP wrapper."""
    config = state.config
    params = [param for group in optimizer.param_groups for param in group["params"]]
    state.model.train()
    for hook in hooks:
        hook.on_train_start(state)
    # A bar on a terminal only: in a job's log file, _log's one line per log_every_steps says the same.
    progress = tqdm(
        total=state.stop_step,
        initial=state.step,
        unit="step",
        disable=not (layout.is_main and sys.stderr.isatty()),
        dynamic_ncols=True,
    )
    session_start = time.perf_counter()
    try:
        while state.step < state.stop_step:
            epoch, batch_in_epoch = divmod(state.step, state.steps_per_epoch)
            sampler.set_position(epoch, batch_in_epoch)
            if set_epoch is not None:
                set_epoch(epoch)
            for batch in loader:
                scalars = _optimisation_step(net, step_fn, batch, optimizer, params, state, schedule, record, layout)
                state.step += 1
                progress.update()
                for hook in hooks:
                    hook.on_step_end(state, scalars)
                record.window.add(scalars)
                if state.step % config.log_every_steps == 0 or state.step == state.stop_step:
                    _log(state, record, hooks, progress, layout)
                if state.step % config.checkpoint_every_steps == 0 or state.step == state.stop_step:
                    # At the stop step, the final metrics: saved and returned alike.
                    metrics = _summary(state, record, schedule, layout, session_start)
                    _save(optimizer, state, schedule, record, metrics, hooks, layout)
                    record.checkpoint_step = state.step
                if state.step >= state.stop_step:
                    break
    except BaseException as error:
        for hook in hooks:
            hook.on_train_failed(state, error)
        raise
    finally:
        progress.close()
    return metrics


def _optimisation_step(
    net: nn.Module,
    step_fn: StepFn,
    batch: Any,
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.Tensor],
    state: TrainState,
    schedule: Mapping[str, Any],
    record: _Record,
    layout: ProcessLayout,
) -> dict[str, float]:
    """Step ``state.step + 1`` at the schedule's learning rate: the loss under autocast, a stop before the update if
    it is not finite, then backward, clipping and the update. Returns the step's scalars: the step function's
    terms, ``loss`` (mean over ranks), ``lr`` and, when clipping, ``grad_norm`` (before clipping)."""
    lr = cosine_schedule(
        state.step, state.total_steps, schedule["warmup_steps"], schedule["peak_lr"], schedule["min_lr"]
    )
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    with state.autocast():
        loss, terms = step_fn(net, to_device(batch, state.device))
    loss_value = mean_across_ranks(loss.detach().float(), layout).item()
    terms = {name: float(value) for name, value in terms.items()}
    if not math.isfinite(loss_value):  # every rank sees the mean, so every rank stops here
        raise NonFiniteLossError(state.step + 1, loss_value, terms, record.resume, record.checkpoint_step)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    scalars = {**terms, "loss": loss_value, "lr": lr}
    if state.config.clip_grad is not None:
        scalars["grad_norm"] = float(nn.utils.clip_grad_norm_(params, state.config.clip_grad))
    optimizer.step()
    return scalars


def _log(state: TrainState, record: _Record, hooks: Sequence[Hook], progress: tqdm, layout: ProcessLayout) -> None:
    """Close the window of scalars since the last log: its means become ``record.logged`` and a row of
    ``record.rows``, shown on rank 0 and passed to the hooks."""
    record.logged = record.window.means()
    record.window.reset()
    record.rows.append({"step": state.step, "epoch": state.epoch, **record.logged})
    if layout.is_main:
        progress.set_postfix(loss=f"{record.logged['loss']:.4g}", lr=f"{record.logged['lr']:.3g}")
        logger.info("step %d/%d %s", state.step, state.stop_step, _format(record.logged))
    for hook in hooks:
        hook.on_log(state, record.logged)


def _summary(
    state: TrainState, record: _Record, schedule: Mapping[str, Any], layout: ProcessLayout, session_start: float
) -> dict[str, Any]:
    """The metrics at ``state.step``: the last log's means, progress, throughput of this session (``session_start``
    from ``time.perf_counter``), wall time of all sessions (seconds), the log rows."""
    session_s = time.perf_counter() - session_start
    global_batch = state.config.batch_size * layout.world_size
    return {
        **record.logged,
        "step": state.step,
        "epoch": state.epoch,
        "samples": state.step * global_batch,
        "samples_per_s": (state.step - state.start_step) * global_batch / max(session_s, 1e-9),
        "wall_time_s": record.elapsed_before + session_s,
        "peak_lr": schedule["peak_lr"],
        "global_batch_size": global_batch,
        "world_size": layout.world_size,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),  # the job that finished the run (None outside SLURM)
        "log": list(record.rows),  # the logged means, one row per log_every_steps: the loss curves
    }


def _check_resumable(
    checkpoint: Mapping[str, Any],
    config: TrainConfig,
    schedule: Mapping[str, Any],
    world_size: int,
    path: Path,
    identity: Mapping[str, Any],
) -> None:
    """Raise ResumeError unless the checkpoint's run has the same trajectory-defining settings and identity (data,
    method, initial weights) as this one."""
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ResumeError(f"{path}: checkpoint format {checkpoint.get('format')!r}, expected {CHECKPOINT_FORMAT}")
    # A setting added since the checkpoint was written counts as its default, which the older code always used.
    defaults = {f.name: to_mapping(f.default) for f in fields(TrainConfig) if f.default is not MISSING}
    saved, current = {**defaults, **checkpoint["config"]}, to_mapping(config)
    differences = [
        f"{key}: {saved.get(key)!r} -> {current.get(key)!r}"
        for key in sorted(saved.keys() | current.keys())
        if key not in EXECUTION_FIELDS and saved.get(key) != current.get(key)
    ]
    saved_identity = _flat(checkpoint.get("identity", {}))
    current_identity = _flat(identity)
    differences += [
        f"{key}: {saved_identity.get(key)!r} -> {current_identity.get(key)!r}"
        for key in sorted(saved_identity.keys() | current_identity.keys())
        if saved_identity.get(key) != current_identity.get(key)
    ]
    if checkpoint["world_size"] != world_size:
        differences.append(f"world_size: {checkpoint['world_size']} -> {world_size}")
    if not differences and dict(checkpoint["schedule"]) != dict(schedule):
        differences.append(f"schedule (dataset size?): {dict(checkpoint['schedule'])} -> {dict(schedule)}")
    if differences:
        raise ResumeError(
            f"{path} was written by a run with other settings ({'; '.join(differences)}): resuming would not "
            "continue it; remove the checkpoint to start over, or write to another output folder"
        )


def _flat(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: differences named by their dotted key."""
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _save(
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    schedule: Mapping[str, Any],
    record: _Record,
    metrics: Mapping[str, Any],
    hooks: Sequence[Hook],
    layout: ProcessLayout,
) -> None:
    rng = gather_objects(capture_rng_state(), layout)  # a collective: every rank takes part, rank 0 writes
    if not layout.is_main:
        return
    epoch, batch_in_epoch = divmod(state.step, state.steps_per_epoch)
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "model": state.model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": dict(schedule),
        "step": state.step,
        "epoch": epoch,
        "batch_in_epoch": batch_in_epoch,
        "world_size": layout.world_size,
        "rng": rng,
        "config": to_mapping(state.config),
        "identity": dict(record.identity),
        **({"inference": dict(record.inference)} if record.inference else {}),
        "window": record.window.state_dict(),
        "logged": dict(record.logged),
        "elapsed_s": metrics["wall_time_s"],
        "metrics": dict(metrics),
        "hooks": [hook.state_dict() for hook in hooks],
        "hook_names": [type(hook).__name__ for hook in hooks],
    }
    save_checkpoint(checkpoint, record.resume)


def _load_hooks(hooks: Sequence[Hook], checkpoint: Mapping[str, Any], path: Path) -> None:
    """Give each hook the state its kind saved (in order among hooks of the same kind), so that a resumed run with
    a hook more or less (live tracking switched on or off) keeps the others' states; a checkpoint without the
    hooks' names gives them by position when the counts agree."""
    states, names = checkpoint["hooks"], checkpoint.get("hook_names")
    if names is None:
        if len(states) != len(hooks):
            logger.warning(
                "%s holds the state of %d hooks, this run has %d: hooks start afresh", path, len(states), len(hooks)
            )
            return
        names = [type(hook).__name__ for hook in hooks]
    saved: dict[str, list[dict[str, Any]]] = {}
    for name, state in zip(names, states):
        saved.setdefault(name, []).append(state)
    for hook in hooks:
        if saved.get(type(hook).__name__):
            hook.load_state_dict(saved[type(hook).__name__].pop(0))


class _MeanWindow:
    """Running means of the step scalars since the last log (a key may be missing from some steps)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value)
            self.counts[name] = self.counts.get(name, 0) + 1

    def means(self) -> dict[str, float]:
        return {name: total / self.counts[name] for name, total in self.sums.items()}

    def reset(self) -> None:
        self.sums, self.counts = {}, {}

    def state_dict(self) -> dict[str, dict]:
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    def load_state_dict(self, state: Mapping[str, Mapping]) -> None:
        self.sums, self.counts = dict(state["sums"]), dict(state["counts"])


@dataclass
class _Record:
    """What a run carries from step to step and in its checkpoint besides the weights: the scalars since the last
    log (``window``), the last log's means (``logged``), one row per log (``rows``: the loss curves), the wall time
    of earlier sessions (``elapsed_before``, seconds), the paths of the final and in-progress checkpoints and the
    step the latter last held, the run's identity (what it trains on and from; see ``train``) and what inference
    needs (``inference``)."""

    checkpoint: Path
    resume: Path
    identity: Mapping[str, Any] = field(default_factory=dict)
    inference: Mapping[str, Any] = field(default_factory=dict)
    window: _MeanWindow = field(default_factory=_MeanWindow)
    logged: dict[str, float] = field(default_factory=dict)
    rows: list[dict[str, float]] = field(default_factory=list)
    elapsed_before: float = 0.0
    checkpoint_step: int | None = None


def _format(metrics: Mapping[str, float]) -> str:
    return " ".join(f"{name} {value:.4g}" for name, value in metrics.items())
