"""Log a training run to MLflow while it trains, named and shaped as ``evpretrain track`` mirrors it afterwards.

The run's parameters at the start; every log, the window's means as the curve ``train/<name>`` (with ``train/step``
and ``train/epoch``); other curves through ``log_row`` (an evaluation's scores per epoch, ``eval/<name>``); the
final scalars (no prefix) and metrics.json at the end. The mirror (``pipeline.tracking``) recognises such a run by
its tags and adds to it rather than logging the job a second time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evpretrain.training.checkpoint import METRICS_NAME
from evpretrain.training.hooks import Hook, TrainState

MAX_PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch request
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param's value
TAG_LIVE = "evpretrain.live"  # on a run a job logged while it trained (the mirror adopts it)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LiveTracking:
    """Where and as what a job logs while it trains (the commands' ``--tracking-uri``, ``--experiment``,
    ``--run-name``, ``--run-tag``): never part of the job's config, so switching it reruns nothing. ``params``: the
    study config the job read (what the mirror logs as the run's params)."""

    tracking_uri: str
    experiment: str = "evpretrain"
    run_name: str = "run"
    tags: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)

    def hook(self, *, finish_at_end: bool = True) -> MlflowHook:
        return MlflowHook(
            self.tracking_uri,
            self.experiment,
            self.run_name,
            self.params,
            tags={**self.tags, TAG_LIVE: "true"},
            finish_at_end=finish_at_end,
        )


class MlflowHook(Hook):
    """One MLflow run per training run, continued (not duplicated) when the training run resumes: rows at steps the
    run already holds are not logged again.

    ``params`` may nest (a study config); keys are flattened with dots (``pretrain.stage1.train.base_lr``).
    ``artifact_location`` is used when the experiment is created; for a ``sqlite:///`` store it defaults to
    ``mlartifacts/`` beside the database file (MLflow's own default is ``./mlruns`` under the current folder).
    ``finish_at_end``: end the run FINISHED when training ends; False where the caller logs more afterwards (an
    evaluation's final scores) and then calls ``finish``. Only rank 0 logs; mlflow is imported when the run starts.
    A store that fails (a tracking server down, after MLflow's own retries: ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``) is
    reported once as a warning and the job trains on without it.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        params: Mapping[str, Any] | None = None,
        *,
        tags: Mapping[str, str] | None = None,
        artifact_location: str | None = None,
        finish_at_end: bool = True,
    ):
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.params = dict(params or {})
        self.tags = dict(tags or {})
        self.artifact_location = artifact_location or default_artifact_location(tracking_uri)
        self.finish_at_end = finish_at_end
        self.run_id: str | None = None
        self._client = None
        self._failed = False
        self._last_step: dict[str, float] = {}  # curve prefix -> the last training step it holds

    def on_train_start(self, state: TrainState) -> None:
        if state.is_main:
            self._guard(self._start)

    def on_log(self, state: TrainState, metrics: dict[str, float]) -> None:
        self.log_row("train", {"step": state.step, "epoch": state.epoch, **metrics}, state.step)

    def log_row(self, prefix: str, row: Mapping[str, Any], step: int) -> None:
        """Log ``row``'s scalars as ``prefix/<name>`` at ``step``, unless the run already holds the row of its
        training step ``row["step"]`` (logged before a resume)."""
        if self._client is None or row["step"] <= self._last_step.get(prefix, -1):
            return
        self._guard(lambda: self._log_metrics({f"{prefix}/{k}": v for k, v in row.items()}, step))
        self._last_step[prefix] = row["step"]

    def on_train_end(self, state: TrainState, metrics: dict[str, Any]) -> None:
        if self.finish_at_end:
            self.finish(metrics, state.step, artifacts=[state.out_dir / METRICS_NAME], is_main=state.is_main)

    def finish(
        self,
        metrics: Mapping[str, Any] | None = None,
        step: int = 0,
        *,
        artifacts: Sequence[Path] = (),
        is_main: bool = True,
    ) -> None:
        """Log ``metrics``' scalars at ``step`` and the ``artifacts``, and end the run FINISHED. On rank 0
        (``is_main``) of a job whose training had already finished when it started (a rerun after a crash past the
        last step), the run its checkpoint names is reopened first."""
        if self._client is None and is_main and self.run_id is not None:
            self._guard(self._start)
        if self._client is None:
            return
        self._guard(lambda: self._log_metrics(metrics or {}, step))
        for path in artifacts:
            self._guard(lambda path=path: self._client.log_artifact(self.run_id, str(path)))
        self._guard(lambda: self._client.set_terminated(self.run_id, "FINISHED"))

    def on_train_failed(self, state: TrainState, error: BaseException) -> None:
        self.fail(error)

    def fail(self, error: BaseException) -> None:
        """End the run FAILED (KILLED on a KeyboardInterrupt)."""
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        if self._client is not None:
            self._guard(lambda: self._client.set_terminated(self.run_id, status))

    def state_dict(self) -> dict[str, Any]:
        return {} if self.run_id is None else {"run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("run_id")

    def _start(self) -> None:
        """Connect; continue the run of ``run_id`` (from the last rows it holds) or create one with the params."""
        from mlflow import MlflowClient
        from mlflow.entities import Param

        client = MlflowClient(tracking_uri=self.tracking_uri)
        if self.run_id is not None:
            held = client.get_run(self.run_id).data.metrics
            self._last_step = {k.split("/")[0]: v for k, v in held.items() if k.endswith("/step") and k.count("/") == 1}
            client.update_run(self.run_id, status="RUNNING")
            self._client = client
            return
        run = client.create_run(self._experiment_id(client), run_name=self.run_name, tags=self.tags)
        self.run_id, self._client = run.info.run_id, client
        params = [Param(key, param_text(value)) for key, value in flatten(self.params).items()]
        for start in range(0, len(params), MAX_PARAMS_PER_BATCH):
            client.log_batch(self.run_id, params=params[start : start + MAX_PARAMS_PER_BATCH])

    def _guard(self, action: Callable[[], None]) -> None:
        """Run an MLflow call; on an error, warn (once: later calls are skipped) and let the job go on."""
        if self._failed:
            return
        try:
            action()
        except Exception as error:  # noqa: BLE001 - whatever the store raises, training goes on
            self._failed, self._client = True, None
            logger.warning(
                "MLflow at %s failed (%s: %s): the job trains on without live tracking; `evpretrain track` logs "
                "it when the study ends",
                self.tracking_uri,
                type(error).__name__,
                str(error).splitlines()[0] if str(error) else "",
            )

    def _experiment_id(self, client) -> str:
        from mlflow.exceptions import MlflowException

        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return client.create_experiment(self.experiment, artifact_location=self.artifact_location)
        except MlflowException:  # another process created it in the meantime
            experiment = client.get_experiment_by_name(self.experiment)
            if experiment is None:
                raise
            return experiment.experiment_id

    def _log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        entries = [Metric(key, value, timestamp, step) for key, value in scalars(metrics).items()]
        for start in range(0, len(entries), MAX_PARAMS_PER_BATCH):  # log_batch takes 1000 metrics; keep it small
            self._client.log_batch(self.run_id, metrics=entries[start : start + MAX_PARAMS_PER_BATCH])


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of ``metrics`` (not booleans, lists or mappings) as floats: what MLflow logs as metrics."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def param_text(value: Any) -> str:
    """A param's value as MLflow stores it: its text, cut at MLflow's limit."""
    return str(value)[:MAX_PARAM_CHARS]


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level, keys joined with dots: ``{"a": {"b": 1}} -> {"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = value
    return flat


def default_artifact_location(tracking_uri: str) -> str | None:
    """``mlartifacts/`` beside a ``sqlite:///`` store's database (MLflow would use ``./mlruns`` under the current
    folder); None (the server's choice) for any other store."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    return (Path(tracking_uri[len(prefix) :]).resolve().parent / "mlartifacts").as_uri()
