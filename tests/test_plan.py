"""The study plan: variants share stages with identical upstream settings; a change reaches exactly its dependants."""

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evpretrain.config import ConfigError, load_yaml
from evpretrain.data.registry import load_registry
from evpretrain.pipeline.plan import RELEASED_SOURCES, ReleasedSource, apply_overrides, content_key, plan_study
from evpretrain.pipeline.validate import validate_data, validate_plan

ROOT = Path(__file__).resolve().parents[1]

TRAIN = {"epochs": 1, "batch_size": 4, "base_lr": 1e-3}
STUDY = {
    "data": {"demo": {"seed": 0, "samples": {"train": 8}}},
    "pretrain": {
        "backbone": "vit_demo",
        "data": {"num_bins": 5},
        "knn": {"every_steps": 10},
        "teacher": {"name": "efficientnet_lite0"},
        "stage1": {"method": {"target": "difference", "masking": "random"}, "train": dict(TRAIN)},
        "stage2": {"method": {"queue_length": 16}, "train": dict(TRAIN)},
        "stage3": {"method": {"queue_length": 16, "focus": "density"}, "train": dict(TRAIN)},
    },
    "downstream": {"classify": {"linear": {"train": dict(TRAIN)}, "finetune": {"train": dict(TRAIN)}}},
    "study": {
        "name": "demo",
        "pretrain_dataset": "demo",
        "seeds": [0, 1],
        "evaluations": [{"task": "classify", "mode": "linear", "dataset": "demo", "train": "train", "eval": "test"}],
    },
    "variants": {
        "full": {"stages": [1, 2, 3]},
        "no_stage1": {"stages": [2, 3]},
        "no_stage2": {"stages": [1, 3]},
        "no_stage3": {"stages": [1, 2]},
        "stage1_only": {"stages": [1]},
        "scratch": {"stages": []},
        "voxel_target": {"stages": [1, 2, 3], "overrides": {"pretrain.stage1.method.target": "voxel"}},
        "no_focus": {"stages": [1, 2, 3], "overrides": {"pretrain.stage3.method.focus": "none"}},
    },
}


def changed(path, value):
    study = copy.deepcopy(STUDY)
    return apply_overrides(study, {path: value}, "test")


def test_variants_share_every_stage_whose_upstream_settings_coincide():
    plan = plan_study(STUDY)
    v = plan.variants
    assert v["full"].nodes[:2] == v["no_stage3"].nodes == (v["stage1_only"].nodes[0], v["full"].nodes[1])
    assert v["no_stage2"].nodes[0] == v["full"].nodes[0] and v["no_stage2"].nodes[1] != v["full"].nodes[2]
    assert v["no_focus"].nodes[:2] == v["full"].nodes[:2] and v["no_focus"].nodes[2] != v["full"].nodes[2]
    assert v["voxel_target"].nodes[0] != v["full"].nodes[0]  # a stage-1 change reaches every later stage
    assert set(v["voxel_target"].nodes).isdisjoint(v["full"].nodes)
    assert v["scratch"].checkpoint is None and v["no_stage1"].nodes[0].startswith("stage2-")
    # 3 stage-1 runs would be 8 variants' worth without sharing: here difference + voxel targets only.
    assert sorted(n.split("-")[0] for n in plan.nodes) == ["stage1"] * 2 + ["stage2"] * 3 + ["stage3"] * 5
    assert len(plan.evaluations) == 2 * len(set(x.checkpoint for x in v.values()))  # 2 seeds each


def test_a_stage3_change_replans_exactly_stage3_and_its_evaluations():
    before, after = plan_study(STUDY), plan_study(changed("pretrain.stage3.train.base_lr", 2e-3))
    new_nodes = set(after.nodes) - set(before.nodes)
    assert {n.split("-")[0] for n in new_nodes} == {"stage3"} and len(new_nodes) == 5
    new_evaluations = set(after.evaluations) - set(before.evaluations)
    assert {after.evaluations[e].checkpoint for e in new_evaluations} == new_nodes


def test_a_downstream_change_replans_only_evaluations():
    before, after = plan_study(STUDY), plan_study(changed("downstream.classify.linear.train.base_lr", 5e-3))
    assert set(after.nodes) == set(before.nodes)
    assert set(after.evaluations).isdisjoint(before.evaluations)


def test_execution_settings_and_unused_sections_change_no_key():
    before = plan_study(STUDY)
    for path, value in [
        ("pretrain.stage1.train.num_workers", 4),
        ("pretrain.stage2.train.checkpoint_every_steps", 7),
        ("pretrain.data.transforms", "device"),  # where the dense work runs: the same tensors
        ("downstream.classify.linear.transforms", "device"),
        ("downstream.classify.finetune.train.base_lr", 1.0),
    ]:  # finetune: no evaluation uses it
        after = plan_study(changed(path, value))
        assert set(after.nodes) == set(before.nodes) and set(after.evaluations) == set(before.evaluations), path


def test_a_change_of_the_demo_data_replans_everything():
    before, after = plan_study(STUDY), plan_study(changed("data.demo.seed", 1))
    assert set(after.nodes).isdisjoint(before.nodes) and set(after.evaluations).isdisjoint(before.evaluations)


def test_a_stage_reads_only_its_own_section():
    plan = plan_study(STUDY)
    node = plan.nodes[plan.variants["full"].nodes[0]]
    assert set(node.config["pretrain"]) == {"backbone", "data", "knn", "stage1"}
    assert set(plan.nodes[plan.variants["full"].nodes[2]].config["pretrain"]) == {
        "backbone",
        "data",
        "knn",
        "teacher",
        "stage3",
    }


def test_overrides_and_stages_are_checked():
    with pytest.raises(
        ConfigError,
        match=r"variants.bad: override 'pretrain.stage9.x': the study has no section "
        r"'pretrain.stage9'",
    ):
        plan_study({**STUDY, "variants": {"bad": {"stages": [1], "overrides": {"pretrain.stage9.x": 1}}}})
    with pytest.raises(ConfigError, match=r"variants.bad.stages: expected increasing stage numbers"):
        plan_study({**STUDY, "variants": {"bad": {"stages": [3, 1]}}})


def test_robustness_is_planned_for_the_first_seed_of_a_classification_only():
    study = copy.deepcopy(STUDY)
    study["downstream"]["robustness"] = {"shot_noise_hz": [0.0, 10.0]}
    study["study"]["evaluations"][0]["robustness"] = True
    plan, reference = plan_study(study), plan_study(STUDY)
    stressed = sorted(name for name, e in plan.evaluations.items() if e.robustness)
    assert stressed and all(name.endswith("/seed0") for name in stressed) and len(stressed) == len(plan.variants)
    assert plan.evaluations.keys() == reference.evaluations.keys()  # the runs themselves are unchanged
    assert plan.evaluations[stressed[0]].config["downstream"]["robustness"] == {"shot_noise_hz": [0.0, 10.0]}
    assert all(e["robustness"] == e["folder"].endswith("/seed0") for e in plan.manifest()["full"]["evaluations"])
    study["study"]["evaluations"].append(
        {"task": "flow", "dataset": "demo", "train": "train", "eval": "test", "robustness": True}
    )
    study["downstream"]["flow"] = {"train": dict(TRAIN)}
    with pytest.raises(ConfigError, match=r"study.evaluations\[1\].robustness: only a classification"):
        plan_study(study)


def test_also_eval_stores_go_to_the_first_seeds_robustness_evaluation_only():
    study = copy.deepcopy(STUDY)
    study["downstream"]["robustness"] = {"val_event_noise": True}
    also = {"dataset": "n-imagenet-variant", "splits": ["mode_1", "brightness_4"]}
    study["study"]["evaluations"][0] |= {"robustness": True, "also_eval": also}
    plan, reference = plan_study(study), plan_study(STUDY)
    assert plan.evaluations.keys() == reference.evaluations.keys()  # scoring more stores retrains nothing
    for name, evaluation in plan.evaluations.items():
        expected = (("n-imagenet-variant", "mode_1"), ("n-imagenet-variant", "brightness_4"))
        assert evaluation.also_eval == (expected if name.endswith("/seed0") else ())
    # the stores the pipeline builds or converts: the scored ones too
    assert plan.stores() == {"demo": ["test", "train", "val"], "n-imagenet-variant": ["brightness_4", "mode_1"]}
    assert reference.stores() == {"demo": ["test", "train", "val"]}
    study["study"]["evaluations"][0]["robustness"] = False
    with pytest.raises(ConfigError, match=r"evaluations\[0\].also_eval: the robustness evaluation scores these"):
        plan_study(study)


def test_the_demo_study_keeps_its_stage_and_evaluation_keys():
    # Pinned before the config lookups moved to evpretrain.config (issue 11): a refactor must leave every folder
    # name and every config a job reads as they were. A deliberate change of config.yaml updates these figures
    # (last: issue 16, the demo's train sections under amp: bf16; without it every key below was unchanged, and
    # pretrain.data.transforms changes none).
    plan = plan_study(load_yaml(Path(__file__).resolve().parents[1] / "config.yaml"))
    assert {name: variant["nodes"] for name, variant in plan.manifest().items()} == {
        "full": ["stage1-5bafa65a8a", "stage2-9db46f020a", "stage3-4aa81108aa"],
        "no_stage1": ["stage2-5127d5c99c", "stage3-0fb4f22653"],
        "no_stage2": ["stage1-5bafa65a8a", "stage3-6cda4cba3e"],
        "no_stage3": ["stage1-5bafa65a8a", "stage2-9db46f020a"],
        "stage1_only": ["stage1-5bafa65a8a"],
        "scratch": [],
        "voxel_target": ["stage1-0416431ea3", "stage2-f07f5289b2", "stage3-c288e04b54"],
        "density_masking": ["stage1-f35d7749ec", "stage2-2671eba721", "stage3-0533ed2841"],
        "no_focus": ["stage1-5bafa65a8a", "stage2-9db46f020a", "stage3-a9bd926011"],
    }
    assert sorted({name.split("/")[0] for name in plan.evaluations}) == [
        f"classify-linear-demo-{key}"
        for key in (
            "1ff58bbc0f",
            "81ce886da0",
            "9b8fb7d2e4",
            "a2f0eeb810",
            "b393ff5717",
            "b5e6eb25e9",
            "b87528ca90",
            "c92f4ea577",
            "d076a0b56d",
        )
    ]
    assert list(plan.teachers) == ["9763fd89d9"]
    # The configs the jobs read, byte for byte (content_key hashes their sorted JSON).
    assert content_key({name: node.config for name, node in plan.nodes.items()}) == "84fe88e42c"
    assert content_key({name: e.config for name, e in plan.evaluations.items()}) == "68f3c1b017"
    assert content_key(plan.teachers) == "436a5d3bca" and content_key(plan.manifest()) == "077f19fe3c"


def test_a_converted_dataset_is_keyed_by_its_conversion_settings():
    study = copy.deepcopy(STUDY)
    study["data"]["convert"] = {"mvsec": {"window_ms": 50}}
    study["downstream"]["flow"] = {"train": dict(TRAIN)}
    study["study"]["evaluations"].append({"task": "flow", "dataset": "mvsec", "train": "train", "eval": "test"})
    plan = plan_study(study)
    flow = sorted(name for name in plan.evaluations if name.startswith("flow-"))
    assert flow[:2] == ["flow-mvsec-22d317e006/seed0", "flow-mvsec-22d317e006/seed1"]  # pinned before issue 11
    del study["data"]["convert"]  # no settings (the converter's defaults): new flow keys, the rest unchanged
    without = plan_study(study)
    assert set(without.evaluations).isdisjoint(flow)
    assert set(without.evaluations) - set(plan.evaluations) == {n for n in without.evaluations if n.startswith("flow-")}


def test_an_evaluation_names_the_section_it_lacks():
    study = copy.deepcopy(STUDY)
    study["study"]["evaluations"].append({"task": "segment", "dataset": "demo", "train": "train", "eval": "test"})
    with pytest.raises(ConfigError, match=r"study.evaluations\[1\]: no section 'downstream.segment' for this"):
        plan_study(study)
    study = copy.deepcopy(STUDY)
    study["study"]["evaluations"][0]["robustness"] = True
    with pytest.raises(ConfigError, match=r"evaluations\[0\].robustness: the study has no section 'downstream.robus"):
        plan_study(study)


RELEASED = {"checkpoint": "/weights/convvit_mm.pth", "source": "eventpretrain_convvit"}


def with_variants(**variants):
    study = copy.deepcopy(STUDY)
    study["variants"] |= variants
    return study


def test_a_released_checkpoint_is_evaluated_on_its_sources_backbone_and_keyed_by_its_path():
    plan = plan_study(with_variants(released=RELEASED))
    variant = plan.variants["released"]
    assert (variant.stages, variant.nodes, variant.checkpoint, variant.source) == (
        (),
        (),
        "/weights/convvit_mm.pth",
        "eventpretrain_convvit",
    )
    evaluations = [plan.evaluations[name] for name in variant.evaluations]
    assert [(e.task, e.mode, e.seed) for e in evaluations] == [("classify", "linear", 0), ("classify", "linear", 1)]
    for e in evaluations:
        assert (e.checkpoint, e.checkpoint_file, e.checkpoint_source) == (None, *RELEASED.values())
        # The paper's ConvViT-S on 5-bin voxel grids, whatever the study pre-trains (here vit_demo).
        assert e.config["pretrain"] == {"backbone": "convvit_small", "data": {"num_bins": 5}}
    assert plan.released == {content_key("/weights/convvit_mm.pth"): "/weights/convvit_mm.pth"}
    manifest = plan.manifest()["released"]
    assert (manifest["checkpoint"], manifest["source"], manifest["nodes"]) == (*RELEASED.values(), [])
    assert "source" not in plan.manifest()["full"]
    # The trained variants keep their plan; the released one shares no evaluation with the random initialisation.
    trained = plan_study(STUDY)
    assert set(trained.evaluations) | set(variant.evaluations) == set(plan.evaluations)
    assert set(variant.evaluations).isdisjoint(plan.variants["scratch"].evaluations)
    # Another path or another preset is another evaluation.
    moved = plan_study(with_variants(released=RELEASED | {"checkpoint": "/elsewhere/convvit_mm.pth"}))
    assert set(moved.variants["released"].evaluations).isdisjoint(variant.evaluations)
    base = plan_study(with_variants(released=RELEASED | {"backbone": "convvit_base"}))
    assert plan.evaluations[variant.evaluations[0]].config["pretrain"]["backbone"] == "convvit_small"
    assert base.evaluations[base.variants["released"].evaluations[0]].config["pretrain"]["backbone"] == "convvit_base"
    assert set(base.variants["released"].evaluations).isdisjoint(variant.evaluations)


@pytest.mark.parametrize(
    "variant, message",
    [
        (RELEASED | {"source": "mae_vit"}, r"variants\.bad\.source: unknown source 'mae_vit'; known sources: ecdp_vit"),
        (RELEASED | {"source": "ecdp_vit"}, r"variants\.bad\.source: a study cannot evaluate 'ecdp_vit' checkpoints"),
        (RELEASED | {"stages": [1]}, r"variants\.bad: a variant either trains stages or evaluates a checkpoint"),
        ({"source": "eventpretrain_vit"}, r"variants\.bad\.checkpoint: expected the path of a released checkpoint"),
    ],
)
def test_a_released_checkpoint_variant_is_checked(variant, message):
    with pytest.raises(ConfigError, match=message):
        plan_study(with_variants(bad=variant))


def merged(base: dict, extra: dict) -> dict:
    """``extra`` merged onto ``base`` as Snakemake merges a --configfile onto the Snakefile's configfile."""
    result = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


@pytest.mark.parametrize("preset", ["paper.yaml", "demo-diagnosis.yaml"])
def test_every_job_of_a_preset_reads_a_valid_typed_config(preset):
    from evpretrain.downstream.config import task_config
    from evpretrain.pretrain.config import pretrain_config

    study = merged(load_yaml(ROOT / "config.yaml"), load_yaml(ROOT / "workflow" / "presets" / preset))
    plan = plan_study(study)
    validate_plan(plan)  # what `snakemake -n` runs: every stage's, teacher's and evaluation's config loads
    validate_data(study, plan.stores(), load_registry())  # and every data job's

    stages = {node.stage: pretrain_config(node.config) for node in plan.nodes.values()}
    evaluations = [task_config(e.config, e.task, e.mode) for e in plan.evaluations.values()]

    assert stages and evaluations
    if preset == "paper.yaml":  # the authors' recipe reached the typed configs (sources in the preset's comments)
        full = pretrain_config(plan.nodes[plan.variants["full"].nodes[-1]].config)
        assert (full.stage3.method.focus, full.stage3.method.teacher_projection) == ("none", "trained")
        assert full.stage3.layer_lr.rule == "none" and full.stage3.train.clip_grad is None
        assert (full.data.window, full.data.resize, full.teacher.input) == ("interval", "nearest", "rgb")
        assert full.teacher.grid == "conv"
        contrast = [
            getattr(pretrain_config(n.config), f"stage{n.stage}").method for n in plan.nodes.values() if n.stage > 1
        ]
        assert {(m.queue_exclude_same_sample, m.queue_enqueue) for m in contrast} == {(False, "local")}
        stage1 = pretrain_config(plan.nodes[plan.variants["full"].nodes[0]].config).stage1.method
        assert (stage1.mask_token_init, stage1.density_score) == ("zeros", "abs_sum")
        teachers = [pretrain_config(config).teacher for config in plan.teachers.values()]
        assert {t.grid for t in teachers} == {"conv"}  # the teacher job caches on the grid the stages read
        trains = [getattr(pretrain_config(n.config), f"stage{n.stage}").train for n in plan.nodes.values()]
        assert {(t.base_lr, t.warmup_epochs, t.clip_grad) for t in trains} == {(1e-3, 20, None)}
        tasks = {(e.task, e.mode): task_config(e.config, e.task, e.mode) for e in plan.evaluations.values()}
        assert tasks["classify", "linear"].head == "linear" and tasks["classify", "linear"].train.base_lr == 2.5e-4
        assert tasks["flow", None].max_flow == 400 and tasks["segment", None].neck == "none"


def test_variants_that_differ_only_in_the_sample_share_their_teacher_features():
    study = apply_overrides(
        STUDY,
        {
            "variants.seeded": {
                "stages": [2, 3],
                "overrides": {"pretrain.data.seed": 1, "pretrain.data.window": "interval"},
            }
        },
        "test",
    )
    plan = plan_study(study)

    teachers = {node.teacher for node in plan.nodes.values() if node.teacher is not None}
    assert len(teachers) == 1 and len(plan.teachers) == 1
    assert plan.variants["seeded"].nodes[0] != plan.variants["no_stage1"].nodes[0]  # the stage itself differs
    other_teacher = plan_study(changed("pretrain.teacher.batch_size", 7)).teachers
    assert list(other_teacher) != list(plan.teachers)


def test_the_plan_check_names_the_variant_and_the_key_a_job_would_refuse():
    typo = changed("variants.voxel_target.overrides", {"pretrain.stage1.method.mask_ratoi": 0.3})
    with pytest.raises(ConfigError) as err:
        validate_plan(plan_study(typo))
    assert str(err.value).startswith("variant 'voxel_target', stage 1 (stage1-")
    assert "pretrain.stage1.method: unknown key(s) ['mask_ratoi']" in str(err.value)

    shared = plan_study(changed("pretrain.stage2.train.batch_size", 0))  # full's stage 2 is no_stage3's and no_focus's
    with pytest.raises(ConfigError, match=r"variants 'full', 'no_stage3', .*: pretrain.stage2.train: batch_size must"):
        validate_plan(shared)
    refused = {
        "downstream.classify.linear.train.batch_size": (0, "downstream.classify.linear.train: batch_size must be >= 1"),
        "pretrain.teacher.name": (
            "clip",
            "pretrain.teacher: unknown teacher 'clip'; known teachers: clip_vit_b16, efficientnet_lite0",
        ),
        "pretrain.backbone": ("vit_dmeo", "pretrain: unknown backbone 'vit_dmeo'; known backbones:"),
        "pretrain.knn.k": (0, "pretrain.knn: k must be >= 1, got 0"),
    }
    for dotted, (value, message) in refused.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            validate_plan(plan_study(changed(dotted, value)))
    validate_plan(plan_study(STUDY))


@pytest.mark.parametrize(
    ("dotted", "value", "message"),
    [
        (
            "pretrain.data",
            {"augment": {"time_flip_p": 2}},
            "pretrain.data.augment: augment.time_flip_p must lie in [0, 1], got 2",
        ),
        (
            "pretrain.data",
            {"augment": {"hflip_p": -0.5}},
            "pretrain.data.augment: augment.hflip_p must lie in [0, 1], got -0.5",
        ),
        (
            "pretrain.data.input_size",
            [60, 60],
            "pretrain.data.input_size: the input is [60, 60] but the backbone "
            "(vit_demo) takes [64, 64]; set input_size: [64, 64]",
        ),
        ("pretrain.data.seed", -1, "pretrain.data: seed must be >= 0, got -1"),
        ("pretrain.stage1.method.mask_ratio", 0, "pretrain.stage1.method: mask_ratio must lie in (0, 1), got 0.0"),
        ("pretrain.stage1.method.mask_ratio", 1, "pretrain.stage1.method: mask_ratio must lie in (0, 1), got 1.0"),
        (
            "pretrain.stage1.method.decoder_heads",
            3,
            "pretrain.stage1.method: decoder_heads 3 must divide decoder_dim 256",
        ),
        ("pretrain.stage1.method.decoder_heads", 0, "pretrain.stage1.method: decoder_heads must be >= 1, got 0"),
        ("pretrain.stage1.method.decoder_dim", 0, "pretrain.stage1.method: decoder_dim must be >= 1, got 0"),
        (
            "pretrain.stage1.train.base_lr",
            float("inf"),
            "pretrain.stage1.train.base_lr: expected a finite number, got inf",
        ),
        (
            "pretrain.stage1.train.base_lr",
            float("nan"),
            "pretrain.stage1.train.base_lr: expected a finite number, got nan",
        ),
        ("pretrain.stage1.train.clip_grad", float("nan"), "pretrain.stage1.train.clip_grad: expected a finite number"),
        ("pretrain.stage1", [], "config section 'pretrain.stage1' must be a mapping, got list"),
        ("pretrain.data", 3, "pretrain.data: expected a mapping, got 3"),
        ("variants", 3, "config section 'variants' must be a mapping, got int"),
        ("pretrain.stage2.method.temperature", 0, "pretrain.stage2.method: temperature must be > 0, got 0.0"),
        ("pretrain.stage3.method.hidden_dim", 0, "pretrain.stage3.method: hidden_dim must be >= 1, got 0"),
        ("pretrain.stage3.layer_lr", {"decay": 0}, "pretrain.stage3.layer_lr: decay must lie in (0, 1], got 0.0"),
        ("pretrain.knn.k", 601, "pretrain.knn: k 601 is above memory 600: a query has at most memory neighbours"),
        ("pretrain.knn.memory", 5, "pretrain.knn: k 20 is above memory 5"),
        ("pretrain.knn.temperature", float("inf"), "pretrain.knn.temperature: expected a finite number, got inf"),
        ("pretrain", 3, "config section 'pretrain' must be a mapping, got int"),
        ("downstream.classify.linear.num_classes", 1, "downstream.classify.linear: num_classes must be >= 2 or null"),
        ("downstream.classify.linear.augment", {"time_flip_p": 2}, "augment.time_flip_p must lie in [0, 1], got 2"),
        ("downstream.classify.linear.train.weight_decay", float("inf"), "linear.train.weight_decay: expected a finite"),
        ("downstream.classify.linear", [], "config section 'downstream.classify.linear' must be a mapping, got list"),
    ],
)
def test_the_plan_check_refuses_what_a_job_would_run_with_as_nonsense(dotted, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_plan(plan_study(changed(dotted, value)))


def test_planning_a_study_imports_no_torch_numba_or_scipy(tmp_path):
    """What Snakemake runs to plan a study (common.smk's imports, the plan, its checks, the tracking identities) on
    the demo study and the paper preset, in a fresh interpreter: none of the heavy modules is imported."""
    lines = (ROOT / "workflow" / "rules" / "common.smk").read_text().splitlines()
    imports = [line for line in lines if line.startswith(("import ", "from "))]
    assert any("validate_data" in line for line in imports) and any("run_identities" in line for line in imports)
    studies = []
    demo = load_yaml(ROOT / "config.yaml")
    for name, study in {
        "demo": demo,
        "paper": merged(demo, load_yaml(ROOT / "workflow" / "presets" / "paper.yaml")),
    }.items():
        studies.append(tmp_path / f"{name}.yaml")
        studies[-1].write_text(yaml.safe_dump(study))
    code = [
        *imports,
        "import sys",
        "from evpretrain.config import load_yaml",
        f"for path in {[str(path) for path in studies]!r}:",
        "    study = load_yaml(path)",
        "    plan = plan_study(study)",
        "    validate_plan(plan)",
        "    validate_data(study, plan.stores(), load_registry())",
        "    run_identities(plan.manifest()), study_record(study)",
        "    assert plan.evaluations",
        "print([name for name in ('torch', 'numba', 'scipy') if name in sys.modules])",
    ]
    result = subprocess.run([sys.executable, "-c", "\n".join(code)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_plans_table_of_released_sources_is_the_importers():
    from evpretrain.downstream.importers import KEY_MAPS

    assert RELEASED_SOURCES == {
        source: ReleasedSource(keymap.preset, keymap.in_chans, keymap.backbone) for source, keymap in KEY_MAPS.items()
    }


DEMO = {"samples": {"train": 8}}


@pytest.mark.parametrize(
    ("data", "datasets", "message"),
    [
        (
            {"demo": DEMO | {"num_frames": 3, "saccade_legs": 3}},
            ["demo"],
            "data build-demo: data.demo: saccade_legs must lie in [1, min(3, num_frames - 1)], got 3",
        ),
        (  # (1.5 + 0.6) px a frame over 7 frames: 24 + 2 * 14.7 + 2 > 32
            {"demo": DEMO | {"image_size": 32, "digit_size": 24}},
            ["demo"],
            "data build-demo: data.demo: the digit (24 px) travelling up to 14.7 px does not fit in 32 px",
        ),
        ({"demo": DEMO | {"simulator": {"pos_threshold": 0}}}, ["demo"], "pos_threshold must be a finite number > 0"),
        ({}, ["demo"], "data build-demo: config has no section 'data.demo'"),
        (
            {"ef": {"pan_speed_px_per_frame": [3.0, 1.0]}},
            ["ef"],
            "data build-ef: data.ef: pan_speed_px_per_frame must be [low, high] with 0 <= low <= high",
        ),
        ({"ef": {"compression": {"events": "zstd"}}}, ["ef"], "data.ef.compression.events: expected one of"),
        (
            {"convert": {"mvsec": {"train_share": {"outdoor_day1": 0.5}}}},
            ["mvsec"],
            "data convert mvsec: data.convert.mvsec: train_share.outdoor_day1: only a test sequence can lend windows",
        ),
        (
            {"convert": {"ddd17": {"splits": {"train": ["dir0"], "test": ["dir0"]}}}},
            ["ddd17"],
            "data convert ddd17: data.convert.ddd17: sequence folder(s) ['dir0'] appear more than once in splits",
        ),
        (
            {"convert": {"dsec-semantic": {"crop_height": 481}}},
            ["dsec-semantic"],
            "data convert dsec-semantic: data.convert.dsec-semantic: crop_height 481 must lie in [1, 480]",
        ),
        (
            {"imports": {"mine": {"root": "r", "layout": "recordings"}}},
            [],
            "data import mine: data.imports.mine: layout recordings cuts each recording into windows: set window",
        ),
        (
            {"imports": {"mine": {"root": "r", "layout": "class_folders", "split": {"train": 0.5, "test": 0.4}}}},
            ["mine"],
            "data import mine: data.imports.mine: split: expected positive fractions summing to 1",
        ),
    ],
)
def test_the_data_check_names_the_job_and_the_key_a_data_job_would_refuse(data, datasets, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_data({"data": data}, datasets, load_registry())


def test_the_data_check_reads_what_the_jobs_read_and_nothing_else():
    refused = {"num_frames": 3, "saccade_legs": 3}
    data = {
        "demo": DEMO | refused,
        "ef": {"pan_speed_px_per_frame": [3.0, 1.0]},
        "convert": {"mvsec": {"frame_skip": 0}},
    }
    validate_data({"data": data}, ["n-cars", "ddd17"], load_registry())  # no job reads these sections
    validate_data({"data": {}}, ["mvsec", "ddd17", "dsec-semantic"], load_registry())  # a converter's defaults
    with pytest.raises(ConfigError, match="data convert mvsec: data.convert.mvsec: frame_skip must be >= 1, got 0"):
        validate_data({"data": data}, ["n-cars", "mvsec"], load_registry())


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"variants": {"voxel_target": {"overrides": {"pretrain.stage1.method.mask_ratoi": 0.3}}}},
            "variant 'voxel_target', stage 1 (stage1-",
        ),
        (
            {"downstream": {"classify": {"linear": {"train": {"batch_size": 0}}}}},
            "downstream.classify.linear.train: batch_size must be >= 1, got 0",
        ),
        (  # values the schema lets through that the builder refuses together
            {"data": {"demo": {"num_frames": 3, "saccade_legs": 3}}},
            "data build-demo: data.demo: saccade_legs must lie in [1, min(3, num_frames - 1)], got 3",
        ),
        (
            {"data": {"ef": {"pan_speed_px_per_frame": [3.0, 1.0]}}, "study": {"pretrain_dataset": "ef"}},
            "data build-ef: data.ef: pan_speed_px_per_frame must be [low, high] with 0 <= low <= high",
        ),
        (
            {"data": {"imports": {"mine": {"root": "recordings", "layout": "recordings"}}}},
            "data import mine: data.imports.mine: layout recordings cuts each recording into windows",
        ),
    ],
)
def test_a_value_a_job_would_refuse_fails_the_dry_run(tmp_path, change, expected):
    study = merged(load_yaml(ROOT / "config.yaml"), {"results": str(tmp_path / "results"), **change})
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    snakemake = Path(sys.executable).with_name("snakemake")
    result = subprocess.run(
        [str(snakemake), "-n", "all", "--cores", "1", "--snakefile", str(ROOT / "Snakefile")]
        + ["--configfile", str(tmp_path / "study.yaml")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={  # PYTHONPATH: a worktree's sources rather than the editable install's
            "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
            "HOME": str(tmp_path),
            "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
        },
    )
    assert result.returncode != 0
    assert expected in result.stdout + result.stderr


def imported_study(**stage1_method):
    """STUDY pre-training on an imported folder (data.imports.mine) with its stage 1 target."""
    study = copy.deepcopy(STUDY)
    study["data"]["imports"] = {"mine": {"root": "recordings", "layout": "recordings", "window": "events:1000"}}
    study["study"]["pretrain_dataset"] = "mine"
    study["pretrain"]["stage1"]["method"].update(stage1_method)
    study["pretrain"]["knn"]["memory"] = 0  # unlabelled recordings: no kNN monitor
    study["variants"] = {"stage1_only": {"stages": [1]}, "scratch": {"stages": []}}
    return study


def test_an_imported_store_pretrains_with_the_voxel_target_and_is_keyed_by_its_import_settings():
    plan = plan_study(imported_study(target="voxel"))
    (node,) = plan.nodes
    study = imported_study(target="voxel")
    study["data"]["imports"]["mine"]["window"] = "events:2000"
    (other,) = plan_study(study).nodes
    assert node.startswith("stage1-") and other != node  # another window, other stores: another stage


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"target": "difference"}, r"variants.stage1_only: pretrain.stage1.method.target: difference needs the frames"),
        ({"target": "frame"}, r"target: frame needs the frames .* no intensity frames .*: use target: voxel"),
    ],
)
def test_a_frame_target_on_an_imported_store_is_refused_when_the_study_is_planned(change, expected):
    with pytest.raises(ConfigError, match=expected):
        plan_study(imported_study(**change))


def test_stages_2_and_3_interval_windows_and_knn_without_labels_on_an_imported_store_are_refused():
    study = imported_study(target="voxel")
    study["variants"]["full"] = {"stages": [1, 2, 3]}
    with pytest.raises(ConfigError, match=r"variants.full: stages \[2, 3\] learn from an image teacher"):
        plan_study(study)
    study = imported_study(target="voxel")
    study["pretrain"]["knn"]["memory"] = 8
    with pytest.raises(ConfigError, match=r"the kNN monitor scores class labels.*set pretrain.knn.memory: 0"):
        plan_study(study)
    study = imported_study(target="voxel")
    study["pretrain"]["data"]["window"] = "interval"
    with pytest.raises(ConfigError, match=r"pretrain.data.window: interval draws frame intervals.*use window: clip"):
        plan_study(study)


def test_an_evaluation_on_an_imported_store_needs_class_folders_and_a_classification():
    study = imported_study(target="voxel")
    study["study"]["evaluations"] = [
        {"task": "classify", "mode": "linear", "dataset": "mine", "train": "train", "eval": "test"}
    ]
    with pytest.raises(ConfigError, match=r"needs labels, .*'mine' is imported with layout recordings"):
        plan_study(study)
    study["data"]["imports"]["mine"]["layout"] = "class_folders"
    assert {e.dataset for e in plan_study(study).evaluations.values()} == {"mine"}
    study["downstream"]["segment"] = {"train": dict(TRAIN)}
    study["study"]["evaluations"] = [{"task": "segment", "dataset": "mine", "train": "train", "eval": "test"}]
    with pytest.raises(ConfigError, match=r"task segment needs masks or flow, but dataset 'mine' is imported"):
        plan_study(study)
