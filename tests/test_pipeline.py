"""End to end: the Snakemake workflow on a small demo study, and its rerun semantics."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evpretrain.data.store import EventStore

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")


def snakemake(*args, cwd=ROOT):
    env_path = f"{Path(sys.executable).parent}:/usr/bin:/bin"
    result = subprocess.run(
        [str(SNAKEMAKE), "all", "--cores", "2", "--snakefile", str(ROOT / "Snakefile"), *args],
        cwd=cwd, capture_output=True, text=True, env={"PATH": env_path, "HOME": str(cwd)},
    )
    return result


def small_study(tmp_path, **demo):
    config = {"results": str(tmp_path / "results"), "data": {"demo": {"samples": {"train": 4, "val": 2, "test": 2}, **demo}}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_demo_pipeline_builds_stores_and_reruns_only_what_changed(tmp_path):
    study = small_study(tmp_path)
    run = snakemake("--configfile", str(study), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    for split, n in {"train": 4, "val": 2, "test": 2}.items():
        with EventStore(tmp_path / "results" / "data" / "demo" / f"{split}.h5") as store:
            assert len(store) == n
            store.verify()

    plan = snakemake("--configfile", str(study), "-n", cwd=tmp_path)
    assert "Nothing to be done" in plan.stdout + plan.stderr

    changed = small_study(tmp_path, seed=7)
    plan = snakemake("--configfile", str(changed), "-n", cwd=tmp_path)
    assert plan.returncode == 0
    assert "build_demo" in plan.stdout


def test_a_wrong_config_key_stops_before_any_job(tmp_path):
    study = small_study(tmp_path, image_sise=32)
    run = snakemake("--configfile", str(study), "-n", cwd=tmp_path)
    assert run.returncode != 0
    output = run.stdout + run.stderr
    assert "image_sise" in output and "Additional properties are not allowed" in output
