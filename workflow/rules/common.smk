# Helpers shared by the rules: constants first, then paths, the study's plan and config lookups, so that rules stay
# thin. Config values are read with Snakemake's lookup(dpath="a/b", within=config).
import json
import os
import subprocess
from pathlib import Path

import yaml

from evpretrain.pipeline.plan import content_key, plan_study
from evpretrain.pipeline.submit import submit_prefix
from evpretrain.pipeline.tracking import study_record

RESULTS = Path(lookup(dpath="results", within=config, default="results"))
PLAN = plan_study(config) if "study" in config else None
DEMO_SPLITS = [split for split, n in lookup(dpath="data/demo/samples", within=config, default={}).items() if n > 0]

# How heavy rules run evpretrain: here, or as checkpointable SLURM jobs through submitit (`executor: slurm`, which
# the slurm profile sets). A global rather than params: switching executor must not invalidate any output.
ON_SLURM = lookup(dpath="executor", within=config, default="local") == "slurm"
# Torch threads of a local training job (execution.threads_per_job): on 2 cores, two 1-thread jobs side by side
# finish a demo stage 1.5x sooner than one 2-thread job after another. Under SLURM a rule only waits for its job.
# Snakemake itself sets OMP_NUM_THREADS (and MKL's, OpenBLAS's) to a job's threads, scaled down to --cores
# (snakemake/shell.py; tests/test_pipeline.py checks it), so no command sets it; a SLURM job sets its own from
# SLURM_CPUS_PER_TASK (pipeline/submit.py, CommandJob).
HEAVY_THREADS = 1 if ON_SLURM else lookup(dpath="execution/threads_per_job", within=config, default=1)
# Data builders use every core: Snakemake scales a rule's threads down to --cores (and `snakemake --report`, which
# has no --cores, must not read workflow.cores).
ALL_CORES = 1024


def launcher(kind):
    """The command prefix of a heavy job: ``evpretrain``, or under SLURM ``exec evpretrain submit`` with the resources
    of ``execution.resources.<kind>`` (``--gpus 8 --mem-gb 480 ...``, each value shell-quoted)."""
    if not ON_SLURM:
        return "evpretrain"
    resources = lookup(dpath=f"execution/resources/{kind}", within=config, default={})
    # exec: the job's shell becomes `evpretrain submit`, so Snakemake waits for it to cancel its SLURM job on an
    # interrupt (a shell that a SIGTERM ends first would let Snakemake exit while the job still runs).
    return "exec " + submit_prefix(kind, resources, RESULTS / "slurm")


LAUNCH_TEACHER, LAUNCH_PRETRAIN, LAUNCH_FINETUNE, LAUNCH_DATA = (
    launcher(kind) for kind in ("teacher", "pretrain", "finetune", "data")
)
# Conversion and EF building use every core here; as a SLURM job, a rule only waits and the job's command uses the
# job's CPUs (no --workers: the data commands default to SLURM_CPUS_PER_TASK).
DATA_THREADS = 1 if ON_SLURM else ALL_CORES
DATA_WORKERS = "" if ON_SLURM else " --workers {threads}"

# The shell command of the rules that write their params.text to their output (configs, the manifest). Shell, not
# run: Snakemake runs a run: block in a new process that parses the workflow again (~4 s a job).
WRITE_TEXT = "printf '%s' {params.text:q} > {output}"


wildcard_constraints:
    node=r"stage[123]-[0-9a-f]+",
    teacher=r"[0-9a-f]+",
    evaluation=r"[A-Za-z0-9_.-]+-[0-9a-f]+/seed\d+",
    released=r"[0-9a-f]+",


def node(wildcards):
    """The plan's stage node of a job (wildcard ``node``)."""
    return PLAN.nodes[wildcards.node]


def evaluation(wildcards):
    """The plan's evaluation of a job (wildcard ``evaluation``)."""
    return PLAN.evaluations[wildcards.evaluation]


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
    section = lookup(dpath="/".join(keys), within=config)
    for key in reversed(keys):
        section = {key: section}
    return yaml_text(section)


def required_path(dotted):
    """The local path that config key ``dotted`` gives; a placeholder that names the missing key lets `-n` plan."""
    path = lookup(dpath=dotted.replace(".", "/"), within=config, default=None)
    return path or f"MISSING-{dotted}"


def stage_inputs(wildcards):
    planned = node(wildcards)
    inputs = {
        # ancient: the folder is content-keyed, so a rewritten config differs in execution-only settings alone
        "config": ancient(RESULTS / f"pretrain/{planned.name}/study.yaml"),
        "train": store(PLAN.pretrain_dataset, "train"),
        "val": store(PLAN.pretrain_dataset, "val"),
    }
    if planned.teacher is not None:
        inputs["teacher"] = RESULTS / f"teacher/{planned.teacher}.h5"
    if planned.init is not None:
        inputs["init"] = RESULTS / f"pretrain/{planned.init}/checkpoint.pt"
    return inputs


def evaluation_inputs(wildcards):
    planned = evaluation(wildcards)
    inputs = {
        "config": ancient(RESULTS / f"downstream/{planned.name}/study.yaml"),
        "train": store(planned.dataset, planned.train_split),
        "eval": store(planned.dataset, planned.eval_split),
    }
    if planned.checkpoint is not None:
        inputs["checkpoint"] = RESULTS / f"pretrain/{planned.checkpoint}/checkpoint.pt"
    if planned.checkpoint_file is not None:  # a released checkpoint, through its link (rule released_checkpoint)
        inputs["checkpoint"] = RESULTS / f"released/{content_key(planned.checkpoint_file)}.pth"
    return inputs


def option(flag, value):
    """``flag value`` when there is a value, else nothing: an optional argument of a command."""
    return f"{flag} {value}" if value else ""


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
    uri = lookup(dpath="tracking/uri", within=config, default=None) or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{RESULTS.resolve() / 'mlflow.db'}"


def git_commit():
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=workflow.basedir, capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


def all_stage_metrics():
    return [RESULTS / f"pretrain/{name}/metrics.json" for name in PLAN.nodes] if PLAN else []


def tracking_outputs():
    return [RESULTS / "mlflow/logged.json"] if PLAN else []


def datasets_to_convert():
    """{dataset: [splits]} of the registry datasets the study reads (the demo and EF stores are built instead)."""
    if PLAN is None:
        return {}
    needed = {PLAN.pretrain_dataset: {"train", "val"}}
    for planned in PLAN.evaluations.values():
        needed.setdefault(planned.dataset, set()).update({planned.train_split, planned.eval_split})
        for dataset, split in planned.also_eval:
            needed.setdefault(dataset, set()).add(split)
    return {name: sorted(splits) for name, splits in needed.items() if name not in ("demo", "ef")}
