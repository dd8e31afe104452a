# Helpers shared by the rules: constants first, then paths, the study's plan and config lookups, so that rules stay
# thin. Config values are read with Snakemake's lookup(dpath="a/b", within=config).
import functools
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError

from evpretrain.data.download import MARKER, WEIGHTS, manual_steps
from evpretrain.data.registry import load_registry
from evpretrain.pipeline.plan import content_key, plan_study
from evpretrain.pipeline.submit import submit_prefix
from evpretrain.pipeline.tracking import run_identities, study_record
from evpretrain.pipeline.validate import validate_data, validate_plan
from evpretrain.warm_start import SOCKET_ENV

RESULTS = Path(lookup(dpath="results", within=config, default="results"))
PLAN = plan_study(config) if "study" in config else None
if PLAN is not None:
    validate_plan(PLAN)  # every job's settings, as the job loads them: a typo stops `-n`, not a queued job
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
    """The command prefix of a heavy job: ``exec evpretrain``, or under SLURM ``exec evpretrain submit`` with the
    resources of ``execution.resources.<kind>`` (``--gpus 8 --mem-gb 480 ...``, each value shell-quoted). The
    command ends the rule's shell command."""
    if not ON_SLURM:
        # exec: the job's process is the run itself, so a signal to the job reaches it (a shell killed instead would
        # leave the run going, holding its folder).
        return "exec evpretrain"
    resources = lookup(dpath=f"execution/resources/{kind}", within=config, default={})
    # exec: the job's shell becomes `evpretrain submit`, so Snakemake waits for it to cancel its SLURM job on an
    # interrupt (a shell that a SIGTERM ends first would let Snakemake exit while the job still runs).
    return "exec " + submit_prefix(kind, resources, RESULTS / "slurm")


def start_warm_server():
    """Start ``evpretrain warm-start`` (execution.warm_start, local runs only) and point the jobs at it through the
    environment they inherit; None when off. Its socket sits in a new private folder (mode 0700): a Unix socket's
    path must be short, and only this user may send it commands. It ends with this process (PR_SET_PDEATHSIG)."""
    command = shutil.which("evpretrain")
    if ON_SLURM or command is None or not lookup(dpath="execution/warm_start", within=config, default=True):
        return None
    folder = Path(tempfile.mkdtemp(prefix="evpretrain-warm-"))
    log = RESULTS / "logs/warm_start.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:  # appended: each run of the workflow adds its commands
        server = subprocess.Popen(
            [command, "warm-start", "--socket", str(folder / "socket")],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    os.environ[SOCKET_ENV] = str(folder / "socket")
    return server, folder


def stop_warm_server(started):
    """End the server ``start_warm_server`` started (it ends any command still running) and remove its folder."""
    if started is None:
        return
    server, folder = started
    os.environ.pop(SOCKET_ENV, None)
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
    shutil.rmtree(folder, ignore_errors=True)


LAUNCH_TEACHER, LAUNCH_PRETRAIN, LAUNCH_FINETUNE, LAUNCH_DATA = (
    launcher(kind) for kind in ("teacher", "pretrain", "finetune", "data")
)
# Conversion and EF building use every core here; as a SLURM job, a rule only waits and the job's command uses the
# job's CPUs (no --workers: the data commands default to SLURM_CPUS_PER_TASK).
DATA_THREADS = 1 if ON_SLURM else ALL_CORES
DATA_WORKERS = "" if ON_SLURM else " --workers {threads}"

# The shell command of the rules that write their params.text to their output (configs, the manifest). Shell, not
# run: Snakemake runs a run: block in a new process that parses the workflow again (~4 s a job).
WRITE_TEXT = "printf '%s' {params.text:q} > {output:q}"


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


# data.registry: entries of the user's own, over the packaged registry (`--registry` of the data commands)
REGISTRY_FILE = lookup(dpath="data/registry", within=config, default=None)
REGISTRY = load_registry(extra=REGISTRY_FILE)
REGISTRY_OPTION = ["--registry", REGISTRY_FILE] if REGISTRY_FILE else []
# One sub-folder a downloaded dataset (`evpretrain data download`), where the study gives no data.roots entry.
DOWNLOADS = Path(lookup(dpath="data/downloads", within=config, default=None) or RESULTS / "downloads")
# Every data job's settings, as the job loads them: the builders of the stores the study reads (the demo's alone
# without a study: rule all builds them), and every import, which has a rule each.
validate_data(config, PLAN.stores() if PLAN else ["demo"] if DEMO_SPLITS else [], REGISTRY)


def user_root(dataset):
    """data.roots.<dataset>: the user's own copy, which is used as it is (nothing is fetched)."""
    return lookup(dpath=f"data/roots/{dataset}", within=config, default=None)


def download_marker(dataset):
    """The file `evpretrain data download` writes last into a dataset's download folder: the download rule's output."""
    return DOWNLOADS / dataset / MARKER


def dataset_root(dataset):
    """The copy that `convert` reads: data.roots.<dataset>, else the root inside its download folder. A dataset
    without a public download and without a root stops the plan with the registry's steps and the folder to use."""
    if user_root(dataset):
        return user_root(dataset)
    entry = REGISTRY[dataset]
    if not entry.files:
        raise WorkflowError(
            f"data.roots.{dataset} is not set and {manual_steps(entry, DOWNLOADS / dataset)} "
            f"Then set data.roots.{dataset} to that folder."
        )
    return DOWNLOADS / dataset / entry.download_root


def teacher_weights(teacher):
    """The weights file a teacher job downloads (rule download_weights), when its config names none: the paper's CLIP,
    as their clip.load does; else None (a teacher of its own, or pretrain.teacher.weights set)."""
    section = PLAN.teachers[teacher]["pretrain"].get("teacher") or {}
    name = section.get("name")
    if name not in WEIGHTS or section.get("weights"):
        return None
    return DOWNLOADS / "weights" / name / WEIGHTS[name].name


def teacher_inputs(wildcards):
    inputs = {"config": RESULTS / f"teacher/{wildcards.teacher}.yaml", "train": store(PLAN.pretrain_dataset, "train")}
    weights = teacher_weights(wildcards.teacher)
    return inputs | ({"weights": weights} if weights else {})


def weights_to_download():
    """{name: file} of the teacher weights the study's teacher jobs download."""
    files = (teacher_weights(teacher) for teacher in (PLAN.teachers if PLAN else {}))
    return {path.parent.name: path for path in files if path is not None}


def datasets_to_download():
    """The datasets the study reads that have public files and no data.roots entry."""
    return [name for name in datasets_to_convert() if not user_root(name) and REGISTRY[name].files]


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
    """``flag value`` when there is a value, else nothing: an optional argument of a command (the value quoted)."""
    return f"{flag} {shlex.quote(str(value))}" if value else ""


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


@functools.cache
def run_identities_of_plan():
    return run_identities(PLAN.manifest()) if PLAN else {}


def live_tracking(folder):
    """The options that make the job of ``folder`` (``pretrain/<node>``, ``downstream/<evaluation>``) log to MLflow
    while it trains (tracking.live), under the name and tags `evpretrain track` gives its run; nothing when off.
    Rules pass them in a param that takes ``output``: Snakemake records no such (derived) param among those whose
    change reruns a job, so switching tracking on or off, or its URI, reruns nothing."""
    if not lookup(dpath="tracking/live", within=config, default=False):
        return ""
    identity = run_identities_of_plan()[folder]
    options = [
        ("--tracking-uri", tracking_uri()),
        ("--experiment", lookup(dpath="study/name", within=config)),
        ("--run-name", identity["name"]),
        *(("--run-tag", f"{key}={value}") for key, value in identity["tags"].items()),
    ]
    return " ".join(f"{flag} {shlex.quote(str(value))}" for flag, value in options)


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
    return {name: splits for name, splits in PLAN.stores().items() if name not in ("demo", "ef", *IMPORTS)}


# data.imports: folders of the user's own recordings, imported by rule import_<name> (`evpretrain data import`)
IMPORTS = lookup(dpath="data/imports", within=config, default=None) or {}


def import_splits(name):
    """The split stores an import writes: its split's names, or the splits its split_map names. A study that reads
    a split the import does not write stops the plan, naming both."""
    settings = IMPORTS[name]
    if name in REGISTRY or name in ("demo", "ef"):
        raise WorkflowError(f"data.imports.{name}: {name!r} names a built or registry dataset; choose another name")
    if settings.get("split_map"):
        try:
            splits = sorted(set(yaml.safe_load(Path(settings["split_map"]).read_text()).values()))
        except (OSError, AttributeError, yaml.YAMLError) as error:
            raise WorkflowError(f"data.imports.{name}.split_map: cannot read {settings['split_map']}: {error}")
    else:
        splits = list(settings.get("split") or {"train": 0.8, "val": 0.1, "test": 0.1})
    missing = sorted(set(splits_read(name)) - set(splits))
    if missing:
        raise WorkflowError(f"the study reads split(s) {missing} of data.imports.{name}, which writes only {splits}")
    return splits


def recordings_listing(name):
    """A digest of the files under data.imports.<name>.root (relative path, size, mtime in ns): a params value, so a
    recording added, removed or rewritten re-imports the folder (Snakemake sees a folder's own mtime only)."""
    root = Path(IMPORTS[name]["root"])
    if not root.is_dir():
        return "missing"  # the import job says what is wrong with the folder
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def splits_read(dataset):
    """The splits of ``dataset`` that the study's stages and evaluations read."""
    if PLAN is None:
        return []
    needed = {"train", "val"} if PLAN.pretrain_dataset == dataset else set()
    for planned in PLAN.evaluations.values():
        if planned.dataset == dataset:
            needed |= {planned.train_split, planned.eval_split}
    return sorted(needed)
