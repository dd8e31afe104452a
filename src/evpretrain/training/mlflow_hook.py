"""Log a training run to MLflow: its parameters, the logged scalars while it trains, and metrics.json at the end."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from evpretrain.training.checkpoint import METRICS_NAME
from evpretrain.training.hooks import Hook, TrainState

MAX_PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch request


class MlflowHook(Hook):
    """One MLflow run per training run, continued (not duplicated) when the training run resumes.

    ``params`` may nest (a study config section); keys are flattened with dots (``train.base_lr``).
    ``artifact_location`` is used when the experiment is created; for a ``sqlite:///`` store it defaults to
    ``mlartifacts/`` beside the database file (MLflow's own default is ``./mlruns`` under the current folder).
    Only rank 0 logs; mlflow is imported when the run starts (it takes seconds to import).
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
    ):
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.params = dict(params or {})
        self.tags = dict(tags or {})
        self.artifact_location = artifact_location or default_artifact_location(tracking_uri)
        self.run_id: str | None = None
        self._client = None
        self._logged_keys: set[str] = set()

    def on_train_start(self, state: TrainState) -> None:
        if not state.is_main:
            return
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self._client = MlflowClient(tracking_uri=self.tracking_uri)
        if self.run_id is not None:
            self._client.update_run(self.run_id, status="RUNNING")
            return
        run = self._client.create_run(self._experiment_id(), run_name=self.run_name, tags=self.tags)
        self.run_id = run.info.run_id
        params = [Param(key, str(value)) for key, value in flatten(self.params).items()]
        for start in range(0, len(params), MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=params[start : start + MAX_PARAMS_PER_BATCH])

    def on_log(self, state: TrainState, metrics: dict[str, float]) -> None:
        if self._client is not None:
            self._log_metrics(metrics, state.step)
            self._logged_keys = set(metrics)

    def on_train_end(self, state: TrainState, metrics: dict[str, Any]) -> None:
        if self._client is None:
            return
        # The last on_log already holds the final window at this step; add the run's facts (throughput, time).
        self._log_metrics({key: value for key, value in metrics.items() if key not in self._logged_keys}, state.step)
        self._client.log_artifact(self.run_id, str(state.out_dir / METRICS_NAME))
        self._client.set_terminated(self.run_id, "FINISHED")

    def on_train_failed(self, state: TrainState, error: BaseException) -> None:
        if self._client is not None:
            self._client.set_terminated(self.run_id, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")

    def state_dict(self) -> dict[str, Any]:
        return {} if self.run_id is None else {"run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("run_id")

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self._client.get_experiment_by_name(self.experiment)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self._client.create_experiment(self.experiment, artifact_location=self.artifact_location)
        except MlflowException:  # another process created it in the meantime
            experiment = self._client.get_experiment_by_name(self.experiment)
            if experiment is None:
                raise
            return experiment.experiment_id

    def _log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        entries = [
            Metric(key, float(value), timestamp, step)
            for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        ]
        if entries:
            self._client.log_batch(self.run_id, metrics=entries)


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
