"""Tables from metrics.json files: mean and std over seeds, one row a variant, Markdown, LaTeX and CSV."""

import json

import numpy as np
import pandas as pd
import pytest

from evpretrain.cli import main
from evpretrain.config import ConfigError
from evpretrain.pipeline.tables import (
    collect_robustness,
    collect_runs,
    summarise,
    write_robustness_tables,
    write_tables,
)

TOP1 = {"full": [0.9, 0.8, 0.85], "no_stage2": [0.5, 0.7, 0.6]}


def write_study(results, flow_aee=1.25):
    manifest = {}
    for variant, values in TOP1.items():
        evaluations = []
        for seed, top1 in enumerate(values):
            folder = f"classify-linear-demo-k{variant}/seed{seed}"
            path = results / "downstream" / folder
            path.mkdir(parents=True)
            (path / "metrics.json").write_text(
                json.dumps(
                    {
                        "top1_last": top1,
                        "top1_best": top1 + 0.01,
                        "top5_last": 1.0,
                        "eval_window": "40 events from the middle",
                    }
                )
            )
            evaluations.append(
                {
                    "label": "linear",
                    "task": "classify",
                    "mode": "linear",
                    "dataset": "demo",
                    "eval_split": "test",
                    "seed": seed,
                    "folder": folder,
                }
            )
        folder = f"flow-demo-k{variant}/seed0"
        (results / "downstream" / folder).mkdir(parents=True)
        (results / "downstream" / folder / "metrics.json").write_text(
            json.dumps(
                {
                    "aee_batch_mean_last": flow_aee + 0.5,
                    "outlier_pct_batch_mean_last": 4.0,
                    "aee_pixel_mean_last": flow_aee,
                    "outlier_pct_pixel_mean_last": 3.0,
                }
            )
        )
        evaluations.append(
            {
                "label": "flow",
                "task": "flow",
                "mode": None,
                "dataset": "demo",
                "eval_split": "test",
                "seed": 0,
                "folder": folder,
            }
        )
        manifest[variant] = {"stages": [1, 2, 3], "checkpoint": None, "evaluations": evaluations}
    (results / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def test_summary_is_the_mean_and_sample_std_over_seeds(tmp_path):
    summary = summarise(collect_runs(write_study(tmp_path), tmp_path))
    row = summary[(summary["variant"] == "no_stage2") & (summary["figure"] == "top-1")].iloc[0]
    assert row["mean"] == pytest.approx(100 * np.mean(TOP1["no_stage2"]))
    assert row["std"] == pytest.approx(100 * np.std(TOP1["no_stage2"], ddof=1)) and row["seeds"] == 3
    flow = summary[(summary["variant"] == "full") & (summary["figure"] == "AEE")].iloc[0]
    assert flow["mean"] == 1.25 and flow["std"] == 0.0 and flow["seeds"] == 1
    # The paper code's per-batch mean is its own column, beside the pixel mean.
    batch = summary[(summary["variant"] == "full") & (summary["figure"] == "AEE batch mean")].iloc[0]
    assert batch["mean"] == 1.75
    outliers = summary[(summary["variant"] == "full") & (summary["figure"] == "outliers % batch mean")].iloc[0]
    assert outliers["mean"] == 4.0
    assert list(dict.fromkeys(summary["variant"])) == ["full", "no_stage2"]  # the manifest's order


def test_tables_are_written_in_three_formats_from_the_cli(tmp_path):
    write_study(tmp_path / "results")
    assert (
        main(
            [
                "report",
                "--manifest",
                str(tmp_path / "results" / "manifest.json"),
                "--results",
                str(tmp_path / "results"),
                "--out",
                str(tmp_path / "tables"),
            ]
        )
        == 0
    )
    markdown = (tmp_path / "tables" / "ablation.md").read_text()
    assert "| full " in markdown and "85.00 ± 5.00" in markdown and "1.250" in markdown
    # The window each classification column scored follows the table; flow samples are windows already.
    assert markdown.endswith("\nlinear: evaluated on 40 events from the middle\n") and "flow: evaluated" not in markdown
    latex = (tmp_path / "tables" / "ablation.tex").read_text()
    assert r"no\_stage2" in latex and r"60.00 $\pm$ 10.00" in latex and r"\begin{tabular}" in latex
    csv = pd.read_csv(tmp_path / "tables" / "ablation.csv")
    # Two variants, each with 3 classification and 3 flow figures.
    assert set(csv.columns) >= {"variant", "evaluation", "figure", "mean", "std", "seeds"} and len(csv) == 2 * (3 + 3)


def test_a_missing_run_is_named(tmp_path):
    manifest = write_study(tmp_path)
    (tmp_path / "downstream" / manifest["full"]["evaluations"][1]["folder"] / "metrics.json").unlink()
    with pytest.raises(ConfigError, match=r"classify-linear-demo-kfull/seed1/metrics.json: missing"):
        collect_runs(manifest, tmp_path)


def test_write_tables_keeps_the_column_order(tmp_path):
    summary = summarise(collect_runs(write_study(tmp_path), tmp_path))
    paths = write_tables(summary, tmp_path / "t", name="main", figures=["top-1", "AEE"])
    header = paths["md"].read_text().splitlines()[0]
    assert header.index("linear top-1") < header.index("flow AEE") and "top-5" not in header


def test_robustness_tables_gather_the_marked_evaluations_one_row_a_variant(tmp_path):
    manifest = write_study(tmp_path / "results")
    for variant, clean in (("full", 0.8), ("no_stage2", 0.6)):
        evaluation = manifest[variant]["evaluations"][0]
        evaluation["robustness"] = True
        folder = tmp_path / "results" / "downstream" / evaluation["folder"] / "robustness"
        folder.mkdir()
        pd.DataFrame(
            {
                "corruption": ["shot_noise", "shot_noise", "drop", "drop"],
                "level": [0.0, 10.0, 0.0, 0.5],
                "top1": [clean, clean / 2, clean, clean / 4],
                "top5": 1.0,
            }
        ).to_csv(folder / "robustness.csv")
    robustness = collect_robustness(manifest, tmp_path / "results")
    assert len(robustness) == 8 and set(robustness["variant"]) == {"full", "no_stage2"}
    paths = write_robustness_tables(robustness, tmp_path / "tables")
    lines = paths["md"].read_text().splitlines()
    assert "clean" in lines[0] and "10 Hz shot noise" in lines[0] and "50% dropped" in lines[0]
    assert [cell.strip() for cell in lines[2].split("|")[1:-1]] == [
        "full / linear",
        "80.0",
        "40.0",
        "20.0",
    ]  # one clean
    manifest["full"]["evaluations"][-1]["robustness"] = True  # marked, but never run: named
    with pytest.raises(ConfigError, match="flow-demo-kfull/seed0 for robustness"):
        collect_robustness(manifest, tmp_path / "results")


def test_the_report_draws_loss_curves_and_copies_stage_figures(tmp_path):
    from evpretrain.pipeline.curves import stage_curves
    from evpretrain.pipeline.report import write_report

    results = tmp_path / "results"
    manifest = write_study(results)
    for variant, nodes in (("full", ["stage1-a", "stage3-b"]), ("no_stage2", ["stage1-a"])):
        manifest[variant]["nodes"] = nodes
    for node, losses in (("stage1-a", [1.0, 0.5]), ("stage3-b", [6.9, 6.0])):
        (results / "pretrain" / node).mkdir(parents=True)
        log = [{"step": 10 * (i + 1), "epoch": i + 1.0, "loss": loss} for i, loss in enumerate(losses)]
        (results / "pretrain" / node / "metrics.json").write_text(json.dumps({"loss": losses[-1], "log": log}))
    (results / "pretrain" / "stage1-a" / "reconstructions.png").write_bytes(b"\x89PNG")
    curves = stage_curves(manifest, results)
    assert curves["stage1-a"] == {
        "stage": "1",
        "variants": ["full", "no_stage2"],
        "steps": [10, 20],
        "loss": [1.0, 0.5],
    }
    paths = write_report(manifest, results, tmp_path / "tables", tmp_path / "figures")
    assert (tmp_path / "figures" / "stage1-a-reconstructions.png").read_bytes() == b"\x89PNG"
    assert paths["loss_curves"].stat().st_size > 10_000 and "robustness" not in paths
    (results / "pretrain" / "stage3-b" / "metrics.json").unlink()
    with pytest.raises(FileNotFoundError, match="stage3-b"):
        stage_curves(manifest, results)


def test_a_released_checkpoints_variant_gets_its_rows_like_a_trained_one(tmp_path):
    from evpretrain.pipeline.plan import plan_study

    evaluation = {"task": "classify", "mode": "linear", "dataset": "demo", "train": "train", "eval": "test"}
    study = {
        "pretrain": {"backbone": "vit_demo"},
        "downstream": {"classify": {"linear": {"train": {"epochs": 1}}}},
        "study": {"name": "s", "pretrain_dataset": "demo", "seeds": [0, 1], "evaluations": [evaluation]},
        "variants": {
            "scratch": {"stages": []},
            "released_vit_mm": {"checkpoint": "/weights/vit_mm.pth", "source": "eventpretrain_vit"},
        },
    }
    manifest = plan_study(study).manifest()
    top1 = {"scratch": [0.2, 0.4], "released_vit_mm": [0.7, 0.9]}
    for variant, entry in manifest.items():
        for run, value in zip(entry["evaluations"], top1[variant], strict=True):
            (tmp_path / "downstream" / run["folder"]).mkdir(parents=True)
            metrics = {"top1_last": value, "top1_best": value, "top5_last": 1.0}
            (tmp_path / "downstream" / run["folder"] / "metrics.json").write_text(json.dumps(metrics))

    wide = write_tables(summarise(collect_runs(manifest, tmp_path)), tmp_path / "t")["md"].read_text()

    rows = {line.split("|")[1].strip(): line for line in wide.splitlines()[2:]}
    assert list(rows) == ["scratch", "released_vit_mm"]
    assert "80.00 ± 14.14" in rows["released_vit_mm"] and "30.00 ± 14.14" in rows["scratch"]


def test_robustness_tables_name_the_authors_protocols_and_the_variant_stores(tmp_path):
    manifest = write_study(tmp_path / "results")
    evaluation = manifest["full"]["evaluations"][0]
    evaluation["robustness"] = True
    folder = tmp_path / "results" / "downstream" / evaluation["folder"] / "robustness"
    folder.mkdir()
    pd.DataFrame(
        {
            "split": ["val", "val", "mode_1", "brightness_4"],
            "corruption": ["shot_noise", "val_event_noise", "none", "none"],
            "level": [0.0, 0.01, 0.0, 0.0],
            "top1": [0.8, 0.7, 0.5, 0.4],
            "top5": 1.0,
        }
    ).to_csv(folder / "robustness.csv", index=False)
    robustness = collect_robustness(manifest, tmp_path / "results")
    assert list(robustness["split"]) == ["val", "val", "mode_1", "brightness_4"]
    lines = write_robustness_tables(robustness, tmp_path / "tables")["md"].read_text().splitlines()
    assert [cell.strip() for cell in lines[0].split("|")[2:-1]] == [
        "clean",
        "val_event_noise",
        "mode_1",
        "brightness_4",
    ]
    assert [cell.strip() for cell in lines[2].split("|")[2:-1]] == ["80.0", "70.0", "50.0", "40.0"]
