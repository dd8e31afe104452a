"""Mirror a study's results into MLflow: one parent run per variant, nested runs for its stages and evaluations.

The metrics.json files stay the source of truth; MLflow is the view for comparing ablations in its UI. A stage
that several variants share appears under each of them. Logging is idempotent: every run carries the folder it
mirrors and the SHA-256 of that folder's metrics.json as tags, so a rerun skips what is already logged and replaces a
run whose metrics changed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from evpretrain.training.mlflow_hook import default_artifact_location, flatten

__all__ = ["log_study"]

TAG_FOLDER = "evpretrain.folder"
TAG_SHA = "evpretrain.metrics_sha256"
MAX_BATCH = 100  # MLflow's limit of params (and a safe size for metrics) per log_batch request


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class _Logger:
    def __init__(self, tracking_uri: str, experiment: str, tags: Mapping[str, str]):
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = (
            found.experiment_id
            if found
            else self.client.create_experiment(experiment, artifact_location=default_artifact_location(tracking_uri))
        )
        self.tags = dict(tags)
        self.counts = {"logged": 0, "skipped": 0, "replaced": 0}

    def existing(self, folder: str, parent: str | None) -> Any:
        query = f"tags.`{TAG_FOLDER}` = '{folder}'"
        if parent is not None:
            query += f" and tags.`mlflow.parentRunId` = '{parent}'"
        runs = self.client.search_runs([self.experiment_id], filter_string=query, max_results=1)
        return runs[0] if runs else None

    def run(
        self,
        folder: str,
        name: str,
        *,
        parent: str | None,
        params: Mapping[str, Any],
        metrics: Mapping[str, Any],
        curves: Mapping[str, list[Mapping[str, Any]]] | None = None,
        artifacts: list[Path] = (),
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """Log one run (or find it already logged with the same metrics); return its id."""
        from mlflow.entities import Metric, Param

        sha = hashlib.sha256(json.dumps(metrics, sort_keys=True, default=str).encode()).hexdigest()
        found = self.existing(folder, parent)
        if found is not None and found.data.tags.get(TAG_SHA) == sha:
            self.counts["skipped"] += 1
            return found.info.run_id
        if found is not None:  # metrics changed: replace the run, and the children of a replaced parent
            query = f"tags.`mlflow.parentRunId` = '{found.info.run_id}'"
            for child in self.client.search_runs([self.experiment_id], filter_string=query):
                self.client.delete_run(child.info.run_id)
            self.client.delete_run(found.info.run_id)
            self.counts["replaced"] += 1
        run_tags = {**self.tags, **(tags or {}), TAG_FOLDER: folder, TAG_SHA: sha}
        if parent is not None:
            run_tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(self.experiment_id, run_name=name, tags=run_tags)
        run_id = run.info.run_id
        entries = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for start in range(0, len(entries), MAX_BATCH):
            self.client.log_batch(run_id, params=entries[start : start + MAX_BATCH])
        points = [Metric(k, v, 0, int(metrics.get("step", 0) or 0)) for k, v in _scalars(metrics).items()]
        for prefix, rows in (curves or {}).items():  # e.g. train/loss per log step, eval/top1 per epoch
            for row in rows:
                step = int(row.get("step", 0))
                points += [Metric(f"{prefix}/{k}", v, 0, step) for k, v in _scalars(row).items() if k != "step"]
        for start in range(0, len(points), MAX_BATCH):
            self.client.log_batch(run_id, metrics=points[start : start + MAX_BATCH])
        for path in artifacts:
            self.client.log_artifact(run_id, str(path))
        self.client.set_terminated(run_id, "FINISHED")
        self.counts["logged"] += 1
        return run_id


def _folder_run(results: Path, kind: str, folder: str) -> tuple[dict, dict, list[Path]]:
    path = results / kind / folder
    metrics = json.loads((path / "metrics.json").read_text())
    config_path = path / "study.yaml"
    params = yaml.safe_load(config_path.read_text()) if config_path.exists() else {}
    artifacts = [path / "metrics.json", *sorted(path.glob("*.png")), *sorted(path.glob("*.md"))]
    return metrics, params, artifacts


def log_study(
    manifest: Mapping[str, Any],
    results: Path,
    tracking_uri: str,
    experiment: str,
    *,
    tags: Mapping[str, str] | None = None,
) -> dict[str, int]:
    """Log every variant of ``manifest`` (``StudyPlan.manifest()``) found under ``results``; return how many runs
    were logged, skipped (already logged) and replaced (metrics changed). ``tags`` go on every run (e.g. the git
    commit)."""
    logger = _Logger(tracking_uri, experiment, tags or {})
    results = Path(results)
    for variant, entry in manifest.items():
        summary: dict[str, list[float]] = {}
        children = []
        for node in entry.get("nodes", []):
            metrics, params, artifacts = _folder_run(results, "pretrain", node)
            curves = {"train": metrics.get("log", [])}
            scalars = {k: v for k, v in metrics.items() if k != "log"}
            children.append(
                (
                    "pretrain",
                    node,
                    node,
                    params,
                    scalars,
                    curves,
                    artifacts,
                    {
                        "variant": variant,
                        "stage": node.split("-")[0].removeprefix("stage"),
                        "slurm_job_id": str(metrics.get("slurm_job_id") or ""),
                    },
                )
            )
        for evaluation in entry["evaluations"]:
            metrics, params, artifacts = _folder_run(results, "downstream", evaluation["folder"])
            curves = {"train": metrics.get("train_log", []), "eval": metrics.get("history", [])}
            scalars = {k: v for k, v in metrics.items() if k not in ("history", "train_log")}
            children.append(
                (
                    "downstream",
                    evaluation["folder"],
                    f"{evaluation['label']} seed {evaluation['seed']}",
                    params,
                    scalars,
                    curves,
                    artifacts,
                    {
                        "variant": variant,
                        "stage": "eval",
                        "task": evaluation["task"],
                        "dataset": evaluation["dataset"],
                        "seed": str(evaluation["seed"]),
                        "slurm_job_id": str(metrics.get("slurm_job_id") or ""),
                    },
                )
            )
            for key in ("top1_last", "miou_last", "aee_batch_mean_last"):
                if key in metrics:
                    summary.setdefault(f"{evaluation['label']}/{key}", []).append(float(metrics[key]))
        means = {name: sum(values) / len(values) for name, values in summary.items()}
        parent = logger.run(
            f"variant/{variant}",
            variant,
            parent=None,
            # a released checkpoint's variant: its file and importer (no stages)
            params={"stages": entry["stages"], "checkpoint": entry["checkpoint"]}
            | ({"source": entry["source"]} if entry.get("source") else {}),
            metrics={f"mean/{k}": v for k, v in means.items()},
            tags={"variant": variant, "stage": "variant"},
        )
        for kind, folder, name, params, metrics, curves, artifacts, child_tags in children:
            logger.run(
                f"{kind}/{folder}",
                name,
                parent=parent,
                params=params,
                metrics=metrics,
                curves=curves,
                artifacts=artifacts,
                tags=child_tags,
            )
    return logger.counts
