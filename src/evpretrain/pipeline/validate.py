"""Every job's settings checked while the DAG is planned, without torch: a typo anywhere in the study (the last key of
a variant's override included) or a value a job would refuse (``batch_size: 0``) stops ``snakemake -n`` with a
ConfigError naming the variant and the dotted key, instead of failing a job that waited in the queue.

Each check loads the config a job will read, exactly as the job loads it: a stage node's and a teacher's with
``pretrain_config``, an evaluation's with ``backbone_spec`` and ``task_config`` (and ``robustness_config`` where it is
stressed). What needs a model or data (a backbone's override keys, the teacher's token grid) is still checked by the
job itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from evpretrain.config import ConfigError
from evpretrain.downstream.config import robustness_config, task_config
from evpretrain.models.spec import backbone_spec
from evpretrain.pipeline.plan import Evaluation, StudyPlan, content_key
from evpretrain.pretrain.config import pretrain_config

__all__ = ["validate_plan"]


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
