"""Every job's settings checked while the DAG is planned, without torch, numba or scipy: a typo anywhere in the study
(the last key of a variant's override included) or a value a job would refuse (``batch_size: 0``) stops
``snakemake -n`` with a ConfigError naming the variant (or the data job) and the dotted key, instead of failing a job
that waited in the queue.

Each check loads the config a job will read, exactly as the job loads it: a stage node's and a teacher's with
``pretrain_config``, an evaluation's with ``backbone_spec`` and ``task_config`` (and ``robustness_config`` where it is
stressed), a data job's section into its settings class of ``evpretrain.data.config`` (``validate_data``). What
needs a model or data (a backbone's override keys, the teacher's token grid, an import's files) is still checked by
the job itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from evpretrain.config import ConfigError, from_mapping, load_section, optional_section
from evpretrain.data.config import CONVERT_CONFIGS, DemoConfig, EFConfig, ImportConfig
from evpretrain.data.registry import DatasetEntry
from evpretrain.downstream.config import robustness_config, task_config
from evpretrain.models.spec import backbone_spec
from evpretrain.pipeline.plan import Evaluation, StudyPlan, content_key
from evpretrain.pretrain.config import pretrain_config

__all__ = ["validate_data", "validate_plan"]


def validate_plan(plan: StudyPlan) -> None:
    """Load every stage node's, teacher's and evaluation's config of ``plan`` as its job will; raise ConfigError
    ``variant 'NAME', JOB: dotted.key: what was expected`` at the first that a job would refuse."""
    users = _users(plan)
    for name, node in plan.nodes.items():
        _check(pretrain_config, node.config, users[name], f"stage {node.stage} ({name})")
    for key, config in plan.teachers.items():
        _check(pretrain_config, config, users[key], f"teacher features ({key})")
    # Seeds and checkpoints share a config: load each distinct one once (paper.yaml: 408 evaluations, 20 configs),
    # naming every variant that reads it.
    distinct: dict[tuple, tuple[str, list[str]]] = {}
    for name, evaluation in plan.evaluations.items():
        job = (evaluation.task, evaluation.mode, evaluation.robustness, content_key(evaluation.config))
        first, variants = distinct.setdefault(job, (name, []))
        variants.extend(v for v in users[name] if v not in variants)
    for first, variants in distinct.values():
        _check(
            _evaluation_checks(plan.evaluations[first]), plan.evaluations[first].config, variants, f"evaluation {first}"
        )


def validate_data(study: Mapping[str, Any], datasets: Iterable[str], registry: Mapping[str, DatasetEntry]) -> None:
    """Load the section of every data job of ``study`` as the job will: the builder of each of ``datasets`` (the
    stores the study reads, ``StudyPlan.stores()``; ``data.demo``, ``data.ef`` or a sequence dataset's
    ``data.convert.<dataset>``; ``registry`` says which are converted by window) and every import of
    ``data.imports``. Raise ConfigError ``data JOB: dotted.key: what was expected`` at the first a job would refuse."""
    imports = optional_section(study, "data.imports") or {}
    checks = [(f"import {name}", ImportConfig, f"data.imports.{name}", True) for name in imports]  # a rule each
    for dataset in datasets:
        entry = registry.get(dataset)
        if dataset == "demo":
            checks.append(("build-demo", DemoConfig, "data.demo", True))
        elif dataset == "ef":
            checks.append(("build-ef", EFConfig, "data.ef", True))
        elif dataset not in imports and entry is not None and entry.layout.kind == "sequences":
            if dataset in CONVERT_CONFIGS:  # else the job stops: no converter is registered (data.registry)
                checks.append((f"convert {dataset}", CONVERT_CONFIGS[dataset], f"data.convert.{dataset}", False))
    for job, cls, dotted, required in checks:
        try:
            if required:  # the builders and imports read their section whole (cli.py)
                load_section(cls, study, dotted)
            else:  # a converter takes its defaults without one (data.registry.convert_dataset)
                from_mapping(cls, optional_section(study, dotted), dotted)
        except ConfigError as err:
            raise ConfigError(f"data {job}: {err}") from err


def _evaluation_checks(evaluation: Evaluation) -> Callable[[Mapping[str, Any]], None]:
    def check(config: Mapping[str, Any]) -> None:
        backbone_spec(config)
        task_config(config, evaluation.task, evaluation.mode)
        if evaluation.robustness:
            robustness_config(config)

    return check


def _check(load: Callable[[Mapping[str, Any]], Any], config: Mapping[str, Any], variants: list[str], job: str) -> None:
    try:
        load(config)
    except ConfigError as err:
        who = "variant" if len(variants) == 1 else "variants"
        raise ConfigError(f"{who} {', '.join(map(repr, variants))}, {job}: {err}") from err


def _users(plan: StudyPlan) -> dict[str, list[str]]:
    """Node names, teacher keys and evaluation names -> the variants that run them (a shared job has several)."""
    users: dict[str, list[str]] = {}
    for variant in plan.variants.values():
        teachers = [plan.nodes[node].teacher for node in variant.nodes if plan.nodes[node].teacher is not None]
        for job in dict.fromkeys([*variant.nodes, *teachers, *variant.evaluations]):
            users.setdefault(job, []).append(variant.name)
    return users
