# Helpers shared by the rules: paths, the study's plan and config lookups live here, so that rules stay thin.
import json
import os
import subprocess
from pathlib import Path

import yaml

from evpretrain.pipeline.plan import plan_study

RESULTS = Path(config.get("results", "results"))
DEMO_SPLITS = [split for split, n in config["data"].get("demo", {}).get("samples", {}).items() if n > 0]
PLAN = plan_study(config) if "study" in config else None


wildcard_constraints:
    node=r"stage[123]-[0-9a-f]+",
    teacher=r"[0-9a-f]+",
    evaluation=r"[A-Za-z0-9_.-]+-[0-9a-f]+/seed\d+",


def demo_stores():
    return expand(RESULTS / "data/demo/{split}.h5", split=DEMO_SPLITS)


def store(dataset, split):
    """A dataset's event store for one split: the demo's are built, the others converted (`data convert`)."""
    return RESULTS / f"data/{dataset}/{split}.h5"


def yaml_text(mapping):
    return yaml.safe_dump(mapping, sort_keys=True)


def config_section_yaml(dotted):
    """The config section at ``dotted`` (e.g. ``data.demo``), nested under its keys, as YAML text."""
    keys = dotted.split(".")
    node = config
    for key in keys:
        node = node[key]
    for key in reversed(keys):
        node = {key: node}
    return yaml_text(node)


def stage_inputs(wildcards):
    node = PLAN.nodes[wildcards.node]
    inputs = {
        # ancient: the folder is content-keyed, so a rewritten config differs in execution-only settings alone
        "config": ancient(RESULTS / f"pretrain/{node.name}/study.yaml"),
        "train": store(PLAN.pretrain_dataset, "train"),
        "val": store(PLAN.pretrain_dataset, "val"),
    }
    if node.teacher is not None:
        inputs["teacher"] = RESULTS / f"teacher/{node.teacher}.h5"
    if node.init is not None:
        inputs["init"] = RESULTS / f"pretrain/{node.init}/checkpoint.pt"
    return inputs


def evaluation_inputs(wildcards):
    evaluation = PLAN.evaluations[wildcards.evaluation]
    inputs = {
        "config": ancient(RESULTS / f"downstream/{evaluation.name}/study.yaml"),
        "train": store(evaluation.dataset, evaluation.train_split),
        "eval": store(evaluation.dataset, evaluation.eval_split),
    }
    if evaluation.checkpoint is not None:
        inputs["checkpoint"] = RESULTS / f"pretrain/{evaluation.checkpoint}/checkpoint.pt"
    return inputs


def option(flag, inputs, name):
    """``flag path`` when the rule has input ``name``, else nothing: optional paths of a command."""
    return f"{flag} {inputs[name]}" if name in inputs.keys() else ""


def all_evaluation_metrics():
    return [RESULTS / f"downstream/{name}/metrics.json" for name in PLAN.evaluations] if PLAN else []


def all_robustness_tables():
    if not PLAN:
        return []
    return [
        RESULTS / f"downstream/{name}/robustness/robustness.csv" for name, e in PLAN.evaluations.items() if e.robustness
    ]


def table_outputs():
    return expand(RESULTS / "tables/ablation.{ext}", ext=["md", "tex", "csv"]) if PLAN else []


def figure_outputs():
    return [RESULTS / "figures"] if PLAN else []


def tracking_uri():
    """config tracking.uri, else $MLFLOW_TRACKING_URI, else the study's sqlite store beside its results."""
    uri = config.get("tracking", {}).get("uri") or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{RESULTS.resolve() / 'mlflow.db'}"


def git_commit():
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=workflow.basedir, capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


def all_stage_metrics():
    return [RESULTS / f"pretrain/{name}/metrics.json" for name in PLAN.nodes] if PLAN else []


def tracking_outputs():
    return [RESULTS / "mlflow/logged.json"] if PLAN else []


# How heavy rules run evpretrain: here, or as checkpointable SLURM jobs through submitit (`executor: slurm`, which
# the slurm profile sets). A global rather than params: switching executor must not invalidate any output.
ON_SLURM = config.get("executor", "local") == "slurm"
# Torch threads of a local training job (execution.threads_per_job): on 2 cores, two 1-thread jobs side by side
# finish a demo stage 1.5x sooner than one 2-thread job after another. Under SLURM a rule only waits for its job.
HEAVY_THREADS = 1 if ON_SLURM else config.get("execution", {}).get("threads_per_job", 1)
# Data builders use every core: Snakemake scales a rule's threads down to --cores (and `snakemake --report`, which
# has no --cores, must not read workflow.cores).
ALL_CORES = 1024


def launcher(kind):
    if not ON_SLURM:
        return "evpretrain"
    resources = config.get("execution", {}).get("resources", {}).get(kind, {})
    flags = " ".join(f"--{key.replace('_', '-')} {value}" for key, value in resources.items() if value is not None)
    return f"evpretrain submit --folder {RESULTS / 'slurm'} --name {kind} {flags} --"


LAUNCH_TEACHER, LAUNCH_PRETRAIN, LAUNCH_FINETUNE = (launcher(kind) for kind in ("teacher", "pretrain", "finetune"))


def datasets_to_convert():
    """{dataset: [splits]} of the registry datasets the study reads (the demo and EF stores are built instead)."""
    if PLAN is None:
        return {}
    needed = {PLAN.pretrain_dataset: {"train", "val"}}
    for evaluation in PLAN.evaluations.values():
        needed.setdefault(evaluation.dataset, set()).update({evaluation.train_split, evaluation.eval_split})
    return {name: sorted(splits) for name, splits in needed.items() if name not in ("demo", "ef")}


def raw_root(dataset):
    """The local copy of a dataset (``data.roots``); a placeholder that names the missing key lets `-n` plan."""
    return config["data"].get("roots", {}).get(dataset) or f"MISSING-data.roots.{dataset}"
