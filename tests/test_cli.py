"""The command line: explicit paths, clear errors, exit codes."""

import argparse
import json
import subprocess
import sys

import pytest
from event_testing import REAL, needs_real

from evpretrain.cli import build_parser, main
from evpretrain.data.store import EventStoreWriter
from evpretrain.events.contract import make_events


def test_help_starts_without_heavy_imports():
    code = (
        "import sys; from evpretrain.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'numba', 'h5py', 'mlflow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_commands_help_formats():
    def parsers(parser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from parsers(sub)

    helps = [parser.format_help() for parser in parsers(build_parser())]  # a stray % in a help text raises here
    assert len(helps) == 26 and "outlier %" in "".join(helps)


def test_data_commands_take_a_slurm_jobs_cpus_as_their_workers(monkeypatch):
    from evpretrain.cli import _workers

    for command in (
        ["build-demo", "--config", "c", "--out", "o"],
        ["convert", "--dataset", "d", "--root", "r", "--out", "o"],
    ):
        args = build_parser().parse_args(["data", *command])
        monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
        assert _workers(args) is None  # every core this process may use
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", "32")
        assert _workers(args) == 32
        args.workers = 4
        assert _workers(args) == 4


def test_build_ef_refuses_a_shard_outside_its_parts(capsys):
    argv = [
        "data",
        "build-ef",
        "--config",
        "c.yaml",
        "--images",
        "i",
        "--out",
        "o.h5",
        "--shard",
        "2",
        "--num-shards",
        "2",
    ]
    assert main(argv) == 2
    assert "--shard must be in [0, --num-shards = 2), got 2" in capsys.readouterr().err


def test_info_describes_a_store(tmp_path, capsys):
    path = tmp_path / "s.h5"
    with EventStoreWriter(path, sensor_size=(10, 20), source="test") as writer:
        writer.add_sample(make_events([0, 500, 1000], [1, 2, 3], [4, 5, 6], [1, 0, 1]), label=3)
        writer.add_sample(make_events([7], [0], [0], [0]), label=1)
    assert main(["data", "info", str(path), "--json", "--verify"]) == 0
    info = json.loads(capsys.readouterr().out)[str(path)]
    assert info["samples"] == 2 and info["events"] == 4 and info["sensor_size"] == [10, 20]
    assert info["label_counts"] == {"1": 1, "3": 1} and info["checksum"] == "verified"
    assert info["on_fraction"] == pytest.approx(0.5)


@needs_real
def test_info_describes_a_real_recording(capsys):
    assert main(["data", "info", str(REAL / "gen4.dat"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)[str(REAL / "gen4.dat")]
    assert info["events"] == 1_218_618 and info["sensor_size"] == [720, 1280]
    assert info["on_fraction"] == pytest.approx(0.454, abs=1e-3)
    assert info["span_s"] == pytest.approx(10.768, abs=1e-3)


def test_config_errors_exit_2_and_name_the_key(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  demo:\n    samples: {train: 2}\n    image_sise: 32\n")
    assert main(["data", "build-demo", "--config", str(config), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "data.demo: unknown key(s) ['image_sise']" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["data", "build-demo", "--config", "{yaml}", "--out", "{tmp}/o", "--workers", "0"],
            "argument --workers: expected an integer >= 1, got '0'",
        ),
        (
            ["data", "build-demo", "--config", "{yaml}", "--out", "{tmp}/o", "--workers", "-3"],
            "argument --workers: expected an integer >= 1, got '-3'",
        ),
        (
            ["data", "convert", "--dataset", "n-mnist", "--root", "{tmp}", "--out", "{tmp}/o", "--workers", "x"],
            "argument --workers: expected an integer >= 1, got 'x'",
        ),
        (
            ["data", "build-demo", "--config", "{broken}", "--out", "{tmp}/o"],
            "{broken}: cannot read YAML: while parsing a flow sequence",
        ),
        (
            ["report", "--manifest", "{text}", "--results", "{tmp}", "--out", "{tmp}/o"],
            "--manifest {text}: not a JSON file (Expecting value",
        ),
        (
            ["report", "--manifest", "{list}", "--results", "{tmp}", "--out", "{tmp}/o"],
            "--manifest {list}: expected a JSON object, got list",
        ),
        (
            [
                "track",
                "--manifest",
                "{list}",
                "--results",
                "{tmp}",
                "--tracking-uri",
                "sqlite:///{tmp}/m.db",
                "--experiment",
                "e",
                "--tag",
                "novalue",
            ],
            "--tag: expected KEY=VALUE, got 'novalue'",
        ),
        (
            [
                "track",
                "--manifest",
                "{text}",
                "--results",
                "{tmp}",
                "--tracking-uri",
                "sqlite:///{tmp}/m.db",
                "--experiment",
                "e",
            ],
            "--manifest {text}: not a JSON file",
        ),
    ],
)
def test_bad_options_and_files_exit_2_with_one_line_naming_them(tmp_path, capsys, argv, message):
    paths = {"tmp": tmp_path, "yaml": tmp_path / "c.yaml", "broken": tmp_path / "broken.yaml"}
    paths |= {"text": tmp_path / "m.txt", "list": tmp_path / "m.json"}
    paths["yaml"].write_text("data:\n  demo:\n    samples: {train: 2}\n")
    paths["broken"].write_text("data: [unclosed\n")
    paths["text"].write_text("not json")
    paths["list"].write_text("[]")
    try:
        code, usage = main([arg.format(**paths) for arg in argv]), False
    except SystemExit as exit:  # argparse's refusal of an option: usage, then the error line
        code, usage = exit.code, True
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert message.format(**paths) in lines[-1] and lines[-1].startswith("evpretrain")
    assert usage or len(lines) == 1
    assert not (tmp_path / "o").exists()


def test_unreadable_file_exits_2_naming_it(tmp_path, capsys):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(40))
    assert main(["data", "info", str(bad)]) == 2
    assert "bad.h5" in capsys.readouterr().err


def test_verify_lists_what_is_missing(tmp_path, capsys):
    (tmp_path / "Train" / "0").mkdir(parents=True)
    assert main(["data", "verify", "--dataset", "n-mnist", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "Train/*/*.bin: 0 found, at least 60000 expected" in out
    assert "split 'test': folder" in out and "how to obtain it" in out
    assert main(["data", "verify", "--dataset", "n-nothing", "--root", str(tmp_path)]) == 2
    assert "unknown dataset 'n-nothing'" in capsys.readouterr().err


def test_datasets_lists_the_registry(capsys):
    assert main(["data", "datasets"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert {
        "n-caltech101",
        "n-cars",
        "n-imagenet",
        "cifar10-dvs",
        "es-imagenet",
        "dsec-semantic",
        "ddd17",
        "mvsec",
    } <= set(names)


@pytest.mark.parametrize(
    "pretrain, message",
    [
        (
            {"backbone": "vit_demo", "teacher": {"name": "efficientnet_lite"}},
            "unknown teacher 'efficientnet_lite'; known teachers: clip_vit_b16, efficientnet_lite0",
        ),
        ({"backbone": "vit_dmo"}, "unknown backbone 'vit_dmo'; known backbones: convvit_base, convvit_demo,"),
    ],
)
def test_a_misspelt_name_is_a_one_line_error_listing_the_known_names(tmp_path, pretrain, message):
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"pretrain": pretrain}))  # JSON is YAML
    command = ["teacher-features", "--config", str(config), "--data", str(tmp_path / "s.h5"), "--out", "x.h5"]
    done = subprocess.run([sys.executable, "-m", "evpretrain.cli", *command], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith("evpretrain: error: ") and message in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_a_missing_section_or_format_name_exits_2_naming_it(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("downstream: {}\n")
    assert main(["pretrain", "--stage", "1", "--config", str(config), "--data", "s.h5", "--out", "o"]) == 2
    assert "config has no section 'pretrain'" in capsys.readouterr().err
    recording = tmp_path / "r.bin"
    recording.write_bytes(bytes(5))
    assert main(["data", "info", str(recording), "--format", "evt4"]) == 2
    assert "unknown format 'evt4'; supported: bin, dat," in capsys.readouterr().err


def test_download_of_a_dataset_behind_a_form_exits_2_with_its_steps_and_folder(tmp_path, capsys):
    assert main(["data", "download", "--dataset", "n-imagenet", "--root", str(tmp_path / "n")]) == 2
    err = capsys.readouterr().err
    assert "n-imagenet has no direct download" in err and "https://github.com/82magnolia/n_imagenet" in err
    assert str((tmp_path / "n").resolve()) in err
    with pytest.raises(SystemExit):  # one of --dataset and --weights
        main(["data", "download", "--dataset", "n-mnist", "--weights", "clip_vit_b16", "--root", str(tmp_path)])
