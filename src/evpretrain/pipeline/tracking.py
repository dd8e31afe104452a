"""Mirror a study's results into MLflow: one parent run per variant, one run per stage and per evaluation.

The metrics.json files stay the source of truth; MLflow is the view for comparing ablations in its UI. Every parent
carries the same params: each setting some variant overrides (dotted key, the variant's value or the study's), its
stages and their nodes, and its resolved config as an artifact; its metrics are the evaluations' headline figures
(last and best, mean over seeds). A stage or evaluation is one run however many variants use it: it is nested under
the first variant (manifest order) that uses it, and every parent lists the runs it uses in its description (links
in the UI) and in the tag ``evpretrain.runs`` (JSON, folder -> run id). Runs span the jobs' real times.

Logging is idempotent: every run carries the folder it mirrors and the SHA-256 of what was logged as tags, so a rerun
skips what is already logged and replaces a run whose content changed. A job that logged live (``tracking.live``:
``training.mlflow_hook``, named and tagged by ``run_identities``) left a run tagged ``evpretrain.live``: the mirror
adopts it (nests it, adds the params, tags, metric points and artifacts it lacks) rather than logging a second one.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from evpretrain.pipeline.plan import apply_overrides
from evpretrain.training.config import EXECUTION_FIELDS

# training.mlflow_hook (which imports torch) is imported where a run is logged: Snakemake imports this module to plan
# a study (study_record, run_identities), which must not import torch.

__all__ = ["job_times", "log_study", "run_identities", "study_record", "ui_path", "variant_settings", "view_state"]

TAG_FOLDER = "evpretrain.folder"
TAG_SHA = "evpretrain.content_sha256"
TAG_RUNS = "evpretrain.runs"
TAG_KIND = "evpretrain.kind"  # stage or evaluation
TAG_RESULT = "evpretrain.result_sha256"  # of the job's metrics alone: a live run adopted is kept while they stay
MAX_BATCH = 100  # MLflow's limit of params (and a safe size for metrics) per log_batch request
# MLflow 3 opens an experiment by its kind (tag mlflow.experimentKind; without it, on the GenAI overview of traces);
# 3.17 by its sidebar's switch instead, which ``ui_path`` sets.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
# Each task's headline figure (downstream.run.PRIMARY): the parent shows its mean over seeds, last and best.
HEADLINE = ("top1", "miou_batch_mean", "aee_batch_mean")
# A view of the runs table saved on the experiment (MLflow's "share view": the experiment tag
# mlflow.sharedViewState.KEY, opened by ?viewStateShareKey=KEY): the differing settings and headline metrics as columns.
VIEW = "ablations"
RUN_SECTIONS = ("results", "executor", "execution", "tracking")  # where and how jobs run: no result depends on them


def study_record(config: Mapping[str, Any]) -> dict[str, Any]:
    """What the mirror records of a study config: all but the sections and ``train`` fields that only change how
    jobs run (``RUN_SECTIONS``, ``EXECUTION_FIELDS``), so that changing those reruns no tracking either."""

    def strip(node: Any, key: str = "") -> Any:
        if not isinstance(node, Mapping):
            return node
        return {k: strip(v, k) for k, v in node.items() if not (key == "train" and k in EXECUTION_FIELDS)}

    return {k: strip(v, k) for k, v in config.items() if k not in RUN_SECTIONS}


def _dotted(config: Mapping[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def variant_settings(study: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per variant of ``study`` (its ``variants`` section): every dotted key that some variant overrides, with this
    variant's value, or the study's where it keeps it (None where the study has none). The same keys for all."""
    variants = study.get("variants") or {}
    keys = sorted({key for variant in variants.values() for key in (variant.get("overrides") or {})})
    return {
        name: {key: (variant.get("overrides") or {}).get(key, _dotted(study, key)) for key in keys}
        for name, variant in variants.items()
    }


def view_state(settings: list[str], metrics: list[str]) -> dict[str, Any]:
    """The runs table's state (MLflow UI 3) showing the ``settings`` params, the stages and the ``metrics``."""
    params = [*settings, "stages", "stage1", "stage2", "stage3"]
    return {
        "searchFilter": "",
        "orderByKey": "attributes.start_time",
        "orderByAsc": True,
        "selectedColumns": [f"params.`{key}`" for key in params] + [f"metrics.`{key}`" for key in metrics],
    }


def ui_path(experiment_id: str) -> str:
    """The MLflow UI's path (after the host) of a study's runs table, in the saved view, with the sidebar on model
    training (MLflow 3.17 picks the experiment's page from that switch, not from ``mlflow.experimentKind``)."""
    return f"/#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={VIEW}"


def job_times(folder: Path, metrics: Mapping[str, Any]) -> tuple[int, int]:
    """A job's (start, end) in ms since the epoch: ``start_time``/``end_time`` (s) where the job recorded them, else
    its metrics.json's modification time as the end and that minus ``wall_time_s`` (``train_wall_time_s``) as the
    start."""
    if isinstance(metrics.get("start_time"), (int, float)) and isinstance(metrics.get("end_time"), (int, float)):
        return int(metrics["start_time"] * 1000), int(metrics["end_time"] * 1000)
    end = (folder / "metrics.json").stat().st_mtime
    wall = metrics.get("wall_time_s", metrics.get("train_wall_time_s")) or 0.0
    return int((end - float(wall)) * 1000), int(end * 1000)


def tag_filter(key: str, value: str) -> str:
    """An MLflow filter string matching the runs whose tag ``key`` is ``value``, and maybe a few more: MLflow's
    filter grammar has no escape for a quote inside a string, so every quote and backslash of ``value`` becomes
    LIKE's one-character wildcard ``_`` instead of reaching the filter. Keep the runs whose tag equals ``value``."""
    pattern = "".join("_" if char in "'\"\\" else char for char in value)
    return f"tags.`{key}` LIKE '{pattern}'"


class _Logger:
    def __init__(self, tracking_uri: str, experiment: str, tags: Mapping[str, str]):
        from mlflow import MlflowClient

        from evpretrain.training.mlflow_hook import default_artifact_location

        self.client = MlflowClient(tracking_uri=tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = (
            found.experiment_id
            if found
            else self.client.create_experiment(experiment, artifact_location=default_artifact_location(tracking_uri))
        )
        for key, value in EXPERIMENT_TAGS.items():
            self.client.set_experiment_tag(self.experiment_id, key, value)
        self.tags = dict(tags)
        self.counts = {"logged": 0, "skipped": 0, "replaced": 0, "adopted": 0}
        self.ids: dict[str, str] = {}  # folder -> run id, of this call

    def run(
        self,
        folder: str,
        name: str,
        *,
        parent: str | None,
        params: Mapping[str, Any],
        metrics: Mapping[str, Any],
        times: tuple[int, int],
        curves: Mapping[str, tuple[str, list[Mapping[str, Any]]]] | None = None,
        artifacts: list[Path] = (),
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """Log the run of ``folder`` (or find it logged with the same content, and nest it under ``parent``); return
        its id. ``curves``: metric prefix -> (the row key that is the step, rows), e.g. ``eval`` per epoch."""
        from mlflow.entities import Metric

        from evpretrain.training.mlflow_hook import flatten, param_text, scalars

        if folder in self.ids:
            return self.ids[folder]
        flat = {k: param_text(v) for k, v in flatten(params).items()}
        run_tags = {**self.tags, **(tags or {}), TAG_FOLDER: folder}
        content = [flat, metrics, curves, run_tags, times, [p.name for p in artifacts]]
        sha = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()
        result = hashlib.sha256(json.dumps([metrics, curves], sort_keys=True, default=str).encode()).hexdigest()
        found = self.client.search_runs([self.experiment_id], filter_string=tag_filter(TAG_FOLDER, folder))
        found = [run for run in found if run.data.tags.get(TAG_FOLDER) == folder]  # the filter may match more
        same = [run for run in found if run.data.tags.get(TAG_SHA) == sha][:1]
        live = [run for run in found if _logged_live(run, result)]
        keep = same[0] if same else max(live, key=lambda run: run.info.start_time) if live else None
        for run in found:  # content changed (or an older mirror logged a shared run once per variant): replace
            if keep is None or run.info.run_id != keep.info.run_id:
                self.client.delete_run(run.info.run_id)  # its nested runs move under the new one as they're seen
        self.counts["replaced"] += bool(found) and keep is None
        if same:
            run_id = keep.info.run_id
            if parent is not None and keep.data.tags.get("mlflow.parentRunId") != parent:  # its parent replaced
                self.client.set_tag(run_id, "mlflow.parentRunId", parent)
            self.counts["skipped"] += 1
            self.ids[folder] = run_id
            return run_id
        run_tags |= {TAG_SHA: sha, TAG_RESULT: result} | ({"mlflow.parentRunId": parent} if parent else {})
        step = int(metrics.get("step", metrics.get("train_step", 0)) or 0)
        points = [Metric(k, v, times[1], step) for k, v in scalars(metrics).items()]
        for prefix, (step_key, rows) in (curves or {}).items():
            for row in rows:
                step = int(row.get(step_key, 0))
                points += [Metric(f"{prefix}/{k}", v, times[1], step) for k, v in scalars(row).items()]
        if keep is not None:
            run_id = keep.info.run_id
            self._adopt(keep, name, run_tags, flat, points)
            self.counts["adopted"] += 1
        else:
            run_id = self.client.create_run(
                self.experiment_id, start_time=times[0], run_name=name, tags=run_tags
            ).info.run_id
            self._log_batches(run_id, flat, points)
            self.counts["logged"] += 1
        for path in artifacts:
            self.client.log_artifact(run_id, str(path))
        if keep is None or keep.info.status != "FINISHED":
            self.client.set_terminated(run_id, "FINISHED", end_time=times[1])
        self.ids[folder] = run_id
        return run_id

    def _adopt(self, run, name: str, tags: Mapping[str, str], params: Mapping[str, str], points: list) -> None:
        """Complete a run a job logged live: its name and tags as the mirror gives them, the params and the metric
        points (key, step) it lacks; what it holds stays as logged."""
        run_id = run.info.run_id
        if run.info.run_name != name:
            self.client.set_tag(run_id, "mlflow.runName", name)
        for key, value in tags.items():
            if run.data.tags.get(key) != value:
                self.client.set_tag(run_id, key, value)
        held = {key: {m.step for m in self.client.get_metric_history(run_id, key)} for key in run.data.metrics}
        points = [point for point in points if point.step not in held.get(point.key, ())]
        self._log_batches(run_id, {k: v for k, v in params.items() if k not in run.data.params}, points)

    def _log_batches(self, run_id: str, params: Mapping[str, str], points: list) -> None:
        from mlflow.entities import Param

        entries = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(entries), MAX_BATCH):
            self.client.log_batch(run_id, params=entries[start : start + MAX_BATCH])
        for start in range(0, len(points), MAX_BATCH):
            self.client.log_batch(run_id, metrics=points[start : start + MAX_BATCH])

    def link(self, parent: str, runs: Mapping[str, str]) -> None:
        """List ``runs`` (folder -> run id) on ``parent``: a tag, and its description with a link to each."""
        lines = [f"- [{folder}](#/experiments/{self.experiment_id}/runs/{run_id})" for folder, run_id in runs.items()]
        tags = {TAG_RUNS: json.dumps(runs), "mlflow.note.content": "Runs of this variant:\n\n" + "\n".join(lines)}
        current = self.client.get_run(parent).data.tags
        for key, value in tags.items():
            if current.get(key) != value:
                self.client.set_tag(parent, key, value)


def _logged_live(run, result: str) -> bool:
    """Whether ``run`` is one a job logged live of the result whose hash is ``result``: a finished live run not yet
    mirrored (a job's newest), or one adopted before from the same result (its tags or parent may have changed)."""
    from evpretrain.training.mlflow_hook import TAG_LIVE

    tags = run.data.tags
    if tags.get(TAG_LIVE) != "true":
        return False
    return tags.get(TAG_RESULT) == result if TAG_SHA in tags else run.info.status == "FINISHED"


def run_identities(manifest: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The name and tags of every stage and evaluation run of ``manifest`` (``StudyPlan.manifest()``), by folder
    (``pretrain/<node>``, ``downstream/<evaluation>``): what the mirror gives them, and what a job that logs live
    is given (rule ``pretrain_stage``, ``finetune``). ``variant``: the variants that use it, in manifest order."""
    users: dict[str, list[str]] = {}
    described: dict[str, dict[str, Any]] = {}
    for variant, entry in manifest.items():
        for node in entry.get("nodes", []):
            users.setdefault(node, []).append(variant)
        for evaluation in entry["evaluations"]:
            users.setdefault(evaluation["folder"], []).append(variant)
            described[evaluation["folder"]] = evaluation
    identities = {}
    for folder, variants in users.items():
        variant = ",".join(variants)
        if folder not in described:
            tags = {"variant": variant, "stage": folder.split("-")[0].removeprefix("stage"), TAG_KIND: "stage"}
            identities[f"pretrain/{folder}"] = {"name": folder, "tags": {**tags, TAG_FOLDER: f"pretrain/{folder}"}}
            continue
        evaluation = described[folder]
        tags = {
            "variant": variant,
            "stage": "eval",
            "task": evaluation["task"],
            "dataset": evaluation["dataset"],
            "seed": str(evaluation["seed"]),
            TAG_KIND: "evaluation",
            TAG_FOLDER: f"downstream/{folder}",
        }
        name = f"{variant} {evaluation['label']} seed{evaluation['seed']}"
        identities[f"downstream/{folder}"] = {"name": name, "tags": tags}
    return identities


def _folder(results: Path, kind: str, folder: str) -> tuple[dict, dict, list[Path], tuple[int, int]]:
    path = results / kind / folder
    metrics = json.loads((path / "metrics.json").read_text())
    config_path = path / "study.yaml"
    params = yaml.safe_load(config_path.read_text()) if config_path.exists() else {}
    artifacts = [path / "metrics.json", *sorted(path.glob("*.png")), *sorted(path.glob("*.md"))]
    return metrics, params, artifacts, job_times(path, metrics)


def _headline(metrics: Mapping[str, Any], label: str) -> dict[str, float]:
    names = [f"{name}_{which}" for name in HEADLINE for which in ("last", "best")]
    return {f"{label}/{key}": float(metrics[key]) for key in names if key in metrics}


def log_study(
    manifest: Mapping[str, Any],
    results: Path,
    tracking_uri: str,
    experiment: str,
    *,
    study: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
) -> dict[str, int]:
    """Log every variant of ``manifest`` (``StudyPlan.manifest()``) found under ``results``; return how many runs
    were logged, skipped (already logged) and replaced (content changed), and ``ui``, the UI's path of the comparison.
    ``study``: the study config (with its ``variants``), for the parents' settings and resolved configs. ``tags`` go
    on every run (e.g. the git commit)."""
    logger = _Logger(tracking_uri, experiment, tags or {})
    results = Path(results)
    study = dict(study or {})
    settings = variant_settings(study)
    identities = run_identities(manifest)
    users: dict[str, list[str]] = {}  # folder -> the variants that use it, in manifest order
    for variant, entry in manifest.items():
        for folder in [*entry.get("nodes", []), *(e["folder"] for e in entry["evaluations"])]:
            users.setdefault(folder, []).append(variant)
    parents: dict[str, str] = {}
    headline: dict[str, None] = {}  # the parents' metric names, in order
    with tempfile.TemporaryDirectory() as scratch:
        for variant, entry in manifest.items():
            nodes, evaluations = entry.get("nodes", []), entry["evaluations"]
            loaded = {n: _folder(results, "pretrain", n) for n in nodes}
            loaded |= {e["folder"]: _folder(results, "downstream", e["folder"]) for e in evaluations}
            summary: dict[str, list[float]] = {}
            for evaluation in evaluations:
                for key, value in _headline(loaded[evaluation["folder"]][0], evaluation["label"]).items():
                    summary.setdefault(key, []).append(value)
            spans = [times for *_, times in loaded.values()]
            span = (min(t[0] for t in spans), max(t[1] for t in spans)) if spans else (0, 0)
            stage_nodes = {f"stage{stage}": "none" for stage in (1, 2, 3)}
            stage_nodes |= {f"stage{n.split('-')[0].removeprefix('stage')}": n for n in nodes}
            artifacts = []
            if variant in (study.get("variants") or {}):  # the study config this variant's jobs read
                resolved = apply_overrides(
                    {k: v for k, v in study.items() if k != "variants"},
                    study["variants"][variant].get("overrides") or {},
                    f"variants.{variant}",
                )
                path = Path(scratch) / variant / "config.yaml"
                path.parent.mkdir()
                path.write_text(yaml.safe_dump(resolved, sort_keys=False))
                artifacts.append(path)
            params = (
                dict(settings.get(variant, {}))
                | {"stages": ",".join(map(str, entry["stages"])) or "none", **stage_nodes}
                | {"checkpoint": entry["checkpoint"] or "none", "source": entry.get("source") or "none"}
            )
            means = {f"mean/{k}": sum(v) / len(v) for k, v in summary.items()}
            headline |= dict.fromkeys(means)
            parents[variant] = logger.run(
                f"variant/{variant}",
                variant,
                parent=None,
                params=params,
                metrics=means,
                times=span,
                artifacts=artifacts,
                tags={"variant": variant, "stage": "variant"},
            )
            runs = {}
            for node in nodes:
                metrics, config, files, times = loaded[node]
                identity = identities[f"pretrain/{node}"]
                runs[node] = logger.run(
                    f"pretrain/{node}",
                    identity["name"],
                    parent=parents[users[node][0]],
                    params=config,
                    metrics={k: v for k, v in metrics.items() if k != "log"},
                    times=times,
                    curves={"train": ("step", metrics.get("log", []))},
                    artifacts=files,
                    tags=identity["tags"] | {"slurm_job_id": str(metrics.get("slurm_job_id") or "")},
                )
            for evaluation in evaluations:
                folder = evaluation["folder"]
                metrics, config, files, times = loaded[folder]
                identity = identities[f"downstream/{folder}"]
                runs[folder] = logger.run(
                    f"downstream/{folder}",
                    identity["name"],
                    parent=parents[users[folder][0]],
                    params={"variant": ",".join(users[folder]), **config},
                    metrics={k: v for k, v in metrics.items() if k not in ("history", "train_log")},
                    times=times,
                    # per epoch: the scores of each evaluation; per optimizer step: the training log
                    curves={
                        "eval": ("epoch", metrics.get("history", [])),
                        "train": ("step", metrics.get("train_log", [])),
                    },
                    artifacts=files,
                    tags=identity["tags"] | {"slurm_job_id": str(metrics.get("slurm_job_id") or "")},
                )
            logger.link(parents[variant], runs)
    keys = sorted({key for values in settings.values() for key in values})
    state = json.dumps(view_state(keys, list(headline)))
    logger.client.set_experiment_tag(logger.experiment_id, f"mlflow.sharedViewState.{VIEW}", state)
    return logger.counts | {"ui": ui_path(logger.experiment_id)}
