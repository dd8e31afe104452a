"""The study's plan: which pre-training stages and downstream evaluations each variant needs, keyed by content.

A variant (ablation) is a named list of stages plus overrides of the study config (dotted keys). Each stage it runs
is a node whose key hashes everything its weights depend on: its own config section, the settings every stage shares
(backbone, input, teacher for stages 2 and 3, kNN monitor), the identity of the training data, and the key of the
stage it starts from. Variants whose upstream configs coincide thus share nodes, and the plan trains no stage twice;
a change to a stage's settings changes its key and the keys of everything downstream of it, nothing else.

Evaluations are keyed the same way: the downstream task's config, the backbone settings, the dataset, the seed and
the checkpoint's node. Settings that only change how a job runs (``execution``: executor, partition, GPUs) are in no
key, so they never invalidate an output.

A variant may instead name a released checkpoint, ``{checkpoint: PATH, source: NAME}`` (an importer of
``evpretrain.downstream.importers``, e.g. the paper's ``eventpretrain_vit``): it runs no stage, and its evaluations
build the source's backbone (``backbone:`` to choose another preset), import the file, and are keyed by its path and
source, so that the same evaluations, tables and MLflow runs compare it with the trained variants.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from evpretrain.config import ConfigError, optional_section, section
from evpretrain.training.config import EXECUTION_FIELDS

__all__ = ["Evaluation", "StageNode", "StudyPlan", "Variant", "apply_overrides", "content_key", "plan_study"]

BACKBONE_KEYS = ("backbone", "backbone_overrides", "data")  # what builds the backbone and its input
SHARED_PRETRAIN_KEYS = (*BACKBONE_KEYS, "knn")
KEY_LENGTH = 10


def content_key(content: Any) -> str:
    """A short, stable hash of JSON-able ``content`` (sorted keys): 10 hex digits of its SHA-256."""
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_LENGTH]


def apply_overrides(study: Mapping[str, Any], overrides: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A deep copy of ``study`` with each dotted key of ``overrides`` set; the parent of each key must exist (a
    typo names itself instead of silently adding a setting nothing reads)."""
    result = copy.deepcopy(dict(study))
    for dotted, value in overrides.items():
        keys = dotted.split(".")
        node = result
        for depth, key in enumerate(keys[:-1]):
            if not isinstance(node.get(key), Mapping):
                raise ConfigError(
                    f"{where}: override {dotted!r}: the study has no section {'.'.join(keys[: depth + 1])!r}"
                )
            node = node[key]
        node[keys[-1]] = copy.deepcopy(value)
    return result


@dataclass(frozen=True)
class StageNode:
    """One pre-training stage run: ``name`` (its folder) = ``stage{N}-{key}``; ``init`` the upstream node's name;
    ``teacher`` the key of the cached teacher features it learns from (stages 2 and 3)."""

    stage: int
    key: str
    init: str | None
    config: dict[str, Any]  # the study config the stage's command reads: the shared settings and its own stage
    teacher: str | None = None

    @property
    def name(self) -> str:
        return f"stage{self.stage}-{self.key}"


@dataclass(frozen=True)
class Evaluation:
    """One downstream run: ``task`` (classify, segment, flow), ``mode`` (classification), ``dataset``, its train and
    eval splits, ``seed``, the ``checkpoint`` node name (None: random initialisation). ``name`` is its folder."""

    label: str
    task: str
    mode: str | None
    dataset: str
    train_split: str
    eval_split: str
    seed: int
    checkpoint: str | None
    key: str
    config: dict[str, Any]
    robustness: bool = False  # also stress the classifier with noise and dropped events (the first seed only)
    checkpoint_file: str | None = None  # a released checkpoint's path (then ``checkpoint`` is None)
    checkpoint_source: str | None = None  # and the importer that reads it
    also_eval: tuple[tuple[str, str], ...] = ()  # (dataset, split) stores the robustness evaluation scores clean

    @property
    def name(self) -> str:
        return f"{self.label}-{self.key}/seed{self.seed}"


@dataclass(frozen=True)
class Variant:
    """A variant's stage nodes and evaluations; ``source`` (the importer) when it evaluates a released checkpoint,
    ``released`` (its path)."""

    name: str
    stages: tuple[int, ...]
    nodes: tuple[str, ...]
    evaluations: tuple[str, ...]
    released: str | None = None
    source: str | None = None

    @property
    def checkpoint(self) -> str | None:
        """The last stage's node name, or the released checkpoint's path; None for a random initialisation."""
        return self.nodes[-1] if self.nodes else self.released


@dataclass
class StudyPlan:
    """Every node, evaluation and variant of a study, by name."""

    nodes: dict[str, StageNode] = field(default_factory=dict)
    evaluations: dict[str, Evaluation] = field(default_factory=dict)
    variants: dict[str, Variant] = field(default_factory=dict)
    teachers: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> the config teacher-features reads
    released: dict[str, str] = field(default_factory=dict)  # key of a released checkpoint's path -> the path
    pretrain_dataset: str = "demo"

    def manifest(self) -> dict[str, Any]:
        """What the tables need: per variant, its stages and each evaluation's folder and description; a released
        checkpoint's variant has its file as ``checkpoint`` and its importer as ``source``."""
        return {
            name: {
                "stages": list(variant.stages),
                "nodes": list(variant.nodes),
                "checkpoint": variant.checkpoint,
                "evaluations": [
                    {
                        k: getattr(self.evaluations[e], k)
                        for k in ("label", "task", "mode", "dataset", "eval_split", "seed", "robustness")
                    }
                    | {"folder": e}
                    for e in variant.evaluations
                ],
            }
            | ({"source": variant.source} if variant.source else {})
            for name, variant in self.variants.items()
        }

    def stores(self) -> dict[str, list[str]]:
        """{dataset: sorted splits} of every event store the plan's stages and evaluations read, the stores a
        robustness evaluation also scores included: what the pipeline builds, converts or imports."""
        needed = {self.pretrain_dataset: {"train", "val"}}
        for evaluation in self.evaluations.values():
            needed.setdefault(evaluation.dataset, set()).update({evaluation.train_split, evaluation.eval_split})
            for dataset, split in evaluation.also_eval:
                needed.setdefault(dataset, set()).add(split)
        return {name: sorted(splits) for name, splits in needed.items()}


def _data_identity(study: Mapping[str, Any], dataset: str) -> Any:
    """What a dataset's stores are a function of: the builder's section for the demo and EF stores, else the
    dataset's name and its conversion settings."""
    if dataset in ("demo", "ef"):
        return {"dataset": dataset, "builder": optional_section(study, f"data.{dataset}")}
    if dataset in _imports(study):
        return {"dataset": dataset, "import": _imports(study)[dataset]}
    return {"dataset": dataset, "convert": optional_section(study, f"data.convert.{dataset}")}


def _imports(study: Mapping[str, Any]) -> Mapping[str, Any]:
    """``data.imports``: the user's imported recordings by name (``evpretrain.data.importer``)."""
    return optional_section(study, "data.imports") or {}


# Why an imported store cannot feed what needs intensity frames (evpretrain.data.importer: only frames:K windows
# keep them).
NO_FRAMES = (
    "an imported store (data.imports.{name}) holds events only, no intensity frames or difference maps, unless it is "
    "imported with window frames:K (AEDAT4 recordings with frames)"
)
# Why a store with frames cannot draw frame intervals: the importer stores no frame rate (evpretrain.data.importer).
IRREGULAR_FRAMES = (
    "the frames of an imported store (data.imports.{name}) come at irregular times and the store keeps no frame "
    "rate, which frame intervals are drawn by"
)


def _check_imported_pretraining(
    pretrain: Mapping[str, Any], stages: tuple[int, ...], settings: Mapping[str, Any], name: str, where: str
) -> None:
    """Refuse, when the study is planned, the pre-training that an imported store cannot feed: without frames
    (any window but ``frames:K``), stage 1's difference or frame target and stages 2 and 3 (their teacher sees the
    frames); with them, a teacher that sees the colour image (``rgb``, which no recording has); always, frame-interval
    windows and the kNN monitor on unlabelled recordings."""
    frames = str(settings.get("window") or "").startswith("frames:")
    why = NO_FRAMES.format(name=name)
    knn = pretrain.get("knn") or {}
    if stages and settings.get("layout") == "recordings" and knn.get("memory", 1) > 0 and knn.get("queries", 1) > 0:
        raise ConfigError(
            f"{where}: pretrain.knn: the kNN monitor scores class labels, but study.pretrain_dataset {name!r} is "
            "imported with layout recordings, which has none: set pretrain.knn.memory: 0 (or import class_folders)"
        )
    target = ((pretrain.get("stage1") or {}).get("method") or {}).get("target", "difference")
    if 1 in stages and target != "voxel" and not frames:
        raise ConfigError(
            f"{where}: pretrain.stage1.method.target: {target} needs the frames of study.pretrain_dataset {name!r}, "
            f"but {why}: use target: voxel"
        )
    if any(stage > 1 for stage in stages) and not frames:
        raise ConfigError(
            f"{where}: stages {[s for s in stages if s > 1]} learn from an image teacher that sees the frames of "
            f"study.pretrain_dataset {name!r}, but {why}: run stage 1 only (stages: [1])"
        )
    teacher_input = (pretrain.get("teacher") or {}).get("input", "last_frame")
    if any(stage > 1 for stage in stages) and teacher_input != "last_frame":
        raise ConfigError(
            f"{where}: pretrain.teacher.input: {teacher_input} needs the colour source image, but "
            f"study.pretrain_dataset {name!r} is imported from recordings, which keep grey frames only: set "
            "pretrain.teacher.input: last_frame"
        )
    window = (pretrain.get("data") or {}).get("window", "clip")
    if stages and window != "clip":
        reason = IRREGULAR_FRAMES.format(name=name) if frames else why
        raise ConfigError(
            f"{where}: pretrain.data.window: {window} draws frame intervals, but {reason}: use window: clip"
        )


def _check_imported_evaluation(study: Mapping[str, Any], entry: Mapping[str, Any], where: str) -> None:
    """An evaluation on an imported store needs its labels: a class_folders import, a classification."""
    settings = _imports(study).get(entry["dataset"])
    if settings is None:
        return
    layout = settings.get("layout")
    if entry["task"] != "classify":
        raise ConfigError(
            f"{where}: task {entry['task']} needs masks or flow, but dataset {entry['dataset']!r} is imported "
            "(data.imports), and an imported store holds events and, at most, class labels"
        )
    if layout != "class_folders":
        raise ConfigError(
            f"{where}: a classification needs labels, but dataset {entry['dataset']!r} is imported with layout "
            f"{layout}, which has none: import it with layout class_folders"
        )


def _weights_content(section: Any) -> Any:
    """A stage's or task's section without the settings that only change how it runs: ``train``'s
    ``EXECUTION_FIELDS``, and ``transforms`` (where the dense work runs, workers or the device: the same tensors)."""
    if not isinstance(section, Mapping):
        return section  # None, or a wrong value that the section's own check names
    section = {k: v for k, v in section.items() if k != "transforms"}
    if isinstance(section.get("train"), Mapping):
        section["train"] = {k: v for k, v in section["train"].items() if k not in EXECUTION_FIELDS}
    return section


def _pretrain_content(pretrain: Mapping[str, Any]) -> dict[str, Any]:
    """The ``pretrain`` keys a run reads, with its ``data`` section as ``_weights_content`` leaves it."""
    pretrain = dict(pretrain)
    if "data" in pretrain:
        pretrain["data"] = _weights_content(pretrain["data"])
    return pretrain


def plan_study(study: Mapping[str, Any]) -> StudyPlan:
    """The plan of ``study`` (a validated study config with ``study`` and ``variants`` sections)."""
    if not study.get("study") or not study.get("variants"):
        raise ConfigError("config needs the sections 'study' and 'variants' to plan a study")
    spec, variants = section(study, "study"), section(study, "variants")  # each a mapping, or a ConfigError
    plan = StudyPlan(pretrain_dataset=spec["pretrain_dataset"])
    data_identity = _data_identity(study, plan.pretrain_dataset)
    for name, variant in variants.items():
        where = f"variants.{name}"
        if "checkpoint" in variant or "source" in variant:
            _plan_released(plan, study, spec, name, variant)
            continue
        stages = tuple(variant.get("stages", ()))
        if list(stages) != sorted(set(stages)) or not set(stages) <= {1, 2, 3}:
            raise ConfigError(f"{where}.stages: expected increasing stage numbers among 1, 2, 3, got {list(stages)}")
        resolved = apply_overrides(study, variant.get("overrides", {}), where)
        pretrain = optional_section(resolved, "pretrain") or {}
        if plan.pretrain_dataset in _imports(study):
            _check_imported_pretraining(
                pretrain, stages, _imports(study)[plan.pretrain_dataset], plan.pretrain_dataset, where
            )
        shared = {k: pretrain[k] for k in SHARED_PRETRAIN_KEYS if k in pretrain}
        teacher_section = optional_section(resolved, "pretrain.teacher") or {}
        upstream, names = None, []
        teacher = None
        if any(stage > 1 for stage in stages):
            # Only what the features depend on: the token grid (backbone, bins) and the teacher; the sample's window,
            # view and seed do not change them, so variants that differ there share one teacher job.
            teacher_config = {"pretrain": {k: pretrain[k] for k in ("backbone", "backbone_overrides") if k in pretrain}}
            if isinstance(pretrain.get("data"), Mapping) and "num_bins" in pretrain["data"]:  # else the check names it
                teacher_config["pretrain"]["data"] = {"num_bins": pretrain["data"]["num_bins"]}
            teacher_config["pretrain"]["teacher"] = teacher_section
            teacher = content_key({"config": teacher_config, "data": data_identity})
            plan.teachers.setdefault(teacher, teacher_config)
        for stage in stages:
            own = optional_section(resolved, f"pretrain.stage{stage}")
            if own is None:
                raise ConfigError(f"{where}: stage {stage} runs, but the study has no section 'pretrain.stage{stage}'")
            config = {"pretrain": {**shared, f"stage{stage}": own}}
            if stage > 1:
                config["pretrain"]["teacher"] = teacher_section
            content = {
                "stage": stage,
                "config": {**_pretrain_content(config["pretrain"]), f"stage{stage}": _weights_content(own)},
                "data": data_identity,
                "init": upstream,
            }
            node = StageNode(stage, content_key(content), upstream, config, teacher if stage > 1 else None)
            plan.nodes.setdefault(node.name, node)
            upstream = node.name
            names.append(node.name)
        evaluations = [
            _evaluation(resolved, spec, entry, seed, upstream, f"study.evaluations[{i}]")
            for i, entry in enumerate(spec.get("evaluations", []))
            for seed in spec.get("seeds", [0])
        ]
        for evaluation in evaluations:
            plan.evaluations.setdefault(evaluation.name, evaluation)
        plan.variants[name] = Variant(name, stages, tuple(names), tuple(e.name for e in evaluations))
    return plan


@dataclass(frozen=True)
class ReleasedSource:
    """What a study needs of a released checkpoint's importer (``evpretrain.downstream.importers.KeyMap``): the
    registered backbone that holds its checkpoints (None where the study's voxel-grid input does not fit the source),
    its input channels (voxel-grid bins), and how its backbone is built (for the message)."""

    preset: str | None
    in_chans: int
    backbone: str


# The importers' KEY_MAPS without torch, which they import and Snakemake must not while it plans the study;
# tests/test_plan.py checks that the two agree.
RELEASED_SOURCES = {
    "ecdp_vit": ReleasedSource(None, 5, "create_backbone('vit_small_patch16', in_chans=2, patch_norm=False)"),
    "eventpretrain_convvit": ReleasedSource(
        "convvit_small", 5, "create_backbone('convvit_small') or create_backbone('convvit_base')"
    ),
    "eventpretrain_swin": ReleasedSource("swin_tiny", 5, "create_backbone('swin_tiny')"),
    "eventpretrain_vit": ReleasedSource(
        "vit_small_patch16", 5, "create_backbone('vit_small_patch16') or create_backbone('vit_base_patch16')"
    ),
    "mem_vit": ReleasedSource(None, 5, "create_backbone('vit_base_patch16', in_chans=2, patch_norm=False)"),
}


def released_backbone(variant: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The ``pretrain`` backbone keys that build a released checkpoint's backbone: the source's preset (or the
    variant's ``backbone``) at the source's input bins. Raises ConfigError naming the variant for an unknown source."""
    source, path = variant.get("source"), variant.get("checkpoint")
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{where}.checkpoint: expected the path of a released checkpoint file, got {path!r}")
    if source not in RELEASED_SOURCES:
        raise ConfigError(
            f"{where}.source: unknown source {source!r}; known sources: {', '.join(sorted(RELEASED_SOURCES))}"
        )
    released = RELEASED_SOURCES[source]
    if released.preset is None:
        raise ConfigError(
            f"{where}.source: a study cannot evaluate {source!r} checkpoints: they take another input than the "
            f"study's voxel grid ({released.backbone}); use `evpretrain finetune --checkpoint-source {source}`"
        )
    return {"backbone": variant.get("backbone") or released.preset, "data": {"num_bins": released.in_chans}}


def _plan_released(
    plan: StudyPlan, study: Mapping[str, Any], spec: Mapping[str, Any], name: str, variant: Mapping[str, Any]
) -> None:
    """Plan the evaluations of a released-checkpoint variant: no stage, the source's backbone."""
    where = f"variants.{name}"
    if "stages" in variant:
        raise ConfigError(f"{where}: a variant either trains stages or evaluates a checkpoint, not both")
    backbone = released_backbone(variant, where)
    resolved = apply_overrides(study, variant.get("overrides", {}), where)
    resolved["pretrain"] = {**(optional_section(resolved, "pretrain") or {}), **backbone}
    resolved["pretrain"].pop("backbone_overrides", None)  # the study's overrides are for its own backbone
    released = (variant["checkpoint"], variant["source"])
    plan.released[content_key(variant["checkpoint"])] = variant["checkpoint"]
    evaluations = [
        _evaluation(resolved, spec, entry, seed, None, f"study.evaluations[{i}]", released)
        for i, entry in enumerate(spec.get("evaluations", []))
        for seed in spec.get("seeds", [0])
    ]
    for evaluation in evaluations:
        plan.evaluations.setdefault(evaluation.name, evaluation)
    plan.variants[name] = Variant(name, (), (), tuple(e.name for e in evaluations), *released)


def _evaluation(
    study: Mapping[str, Any],
    spec: Mapping[str, Any],
    entry: Mapping[str, Any],
    seed: int,
    checkpoint: str | None,
    where: str,
    released: tuple[str, str] | None = None,
) -> Evaluation:
    _check_imported_evaluation(study, entry, where)
    task, mode = entry["task"], entry.get("mode")
    dotted = f"downstream.{task}.{mode}" if task == "classify" and mode else f"downstream.{task}"
    section = optional_section(study, dotted) if task != "classify" or mode else None  # a probe needs its mode
    if section is None:
        raise ConfigError(f"{where}: no section '{dotted}' for this evaluation")
    pretrain = optional_section(study, "pretrain") or {}
    shared = {k: pretrain[k] for k in BACKBONE_KEYS if k in pretrain}
    task_section = {task: {mode: section}} if task == "classify" else {task: section}
    robustness = bool(entry.get("robustness", False)) and seed == spec.get("seeds", [0])[0]
    if entry.get("robustness"):
        if task != "classify":
            raise ConfigError(f"{where}.robustness: only a classification is stressed with noise, not {task}")
        levels = optional_section(study, "downstream.robustness")
        if levels is None:
            raise ConfigError(f"{where}.robustness: the study has no section 'downstream.robustness' (the levels)")
    if robustness:  # the levels live beside the run's config; they are no part of the run's key
        task_section["robustness"] = levels
    also = entry.get("also_eval")
    if also and not entry.get("robustness"):
        raise ConfigError(f"{where}.also_eval: the robustness evaluation scores these stores; set robustness: true")
    also_eval = tuple((also["dataset"], split) for split in also["splits"]) if also and robustness else ()
    config = {"pretrain": shared, "downstream": task_section}
    label = entry.get("name") or (f"{task}-{mode}" if mode else task) + f"-{entry['dataset']}"
    content = {
        "task": task,
        "mode": mode,
        "backbone": _pretrain_content(shared),
        "task_config": _weights_content(section),
        "data": _data_identity(study, entry["dataset"]),
        "splits": [entry["train"], entry["eval"]],
        "checkpoint": checkpoint,
    }
    if released is not None:  # the file's path and importer: a new path reruns the evaluation
        content["released"] = {"file": released[0], "source": released[1]}
    return Evaluation(
        label,
        task,
        mode,
        entry["dataset"],
        entry["train"],
        entry["eval"],
        int(seed),
        checkpoint,
        content_key(content),
        config,
        robustness,
        *(released or (None, None)),
        also_eval,
    )
