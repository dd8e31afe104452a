"""The ``evpretrain`` command line: thin wrappers that read the config, call the package, write to explicit paths.

Heavy modules (torch, numba, h5py) are imported inside each command so that ``evpretrain --help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path

WORKERS_HELP = "processes (default: a SLURM job's CPUs, $SLURM_CPUS_PER_TASK; else the cores this process may use)"


def _workers(args: argparse.Namespace) -> int | None:
    """--workers, else the CPUs SLURM gave this job's task, else None (the builders then use every core this process
    may run on). Under SLURM without CPU binding the process may run on every core of the node."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    return args.workers or (int(cpus) if cpus else None)


def _cmd_build_demo(args: argparse.Namespace) -> int:
    from evpretrain.config import load_section, load_yaml
    from evpretrain.data.config import DemoConfig
    from evpretrain.data.demo import build_demo

    config = load_section(DemoConfig, load_yaml(args.config), "data.demo")
    written = build_demo(config, args.out, workers=_workers(args), progress=not args.quiet)
    for split, path in written.items():
        print(f"{split}: {path}")
    return 0


def _cmd_build_ef(args: argparse.Namespace) -> int:
    from evpretrain.config import load_section, load_yaml
    from evpretrain.data.config import EFConfig
    from evpretrain.data.ef import build_ef

    if not 0 <= args.shard < args.num_shards:
        print(
            f"evpretrain: error: --shard must be in [0, --num-shards = {args.num_shards}), got {args.shard}",
            file=sys.stderr,
        )
        return 2
    config = load_section(EFConfig, load_yaml(args.config), "data.ef")
    path = build_ef(
        config,
        args.images,
        args.out,
        shard=args.shard,
        num_shards=args.num_shards,
        workers=_workers(args),
        progress=not args.quiet,
    )
    print(path)
    return 0


def _cmd_merge_ef(args: argparse.Namespace) -> int:
    from evpretrain.config import load_section, load_yaml
    from evpretrain.data.config import EFConfig
    from evpretrain.data.ef import merge_ef

    print(merge_ef(load_section(EFConfig, load_yaml(args.config), "data.ef"), args.parts, args.out))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from evpretrain.data.info import describe_events, describe_store, format_description, is_store

    for path in args.files:
        if is_store(path):
            from evpretrain.data.store import EventStore

            with EventStore(path) as store:
                description = describe_store(store)
                if args.verify:
                    store.verify()
                    description["checksum"] = "verified"
        else:
            from evpretrain.events.readers import read_recording

            recording = read_recording(path, format=args.format)
            description = describe_events(recording.events, recording.sensor_size)
            description["metadata"] = recording.metadata
        print(json.dumps({str(path): description}, default=str) if args.json else format_description(path, description))
    return 0


def _cmd_formats(args: argparse.Namespace) -> int:
    from evpretrain.events.readers import supported_formats

    for name, text in supported_formats().items():
        print(f"{name:14s} {text}")
    return 0


def _cmd_datasets(args: argparse.Namespace) -> int:
    from evpretrain.data.registry import load_registry

    for name, entry in load_registry().items():
        print(f"{name:16s} {entry.task:15s} {entry.title}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from evpretrain.data.registry import get_dataset, load_registry, verify_dataset

    entry = get_dataset(args.dataset, load_registry(extra=args.registry))
    report = verify_dataset(entry, args.root, checksums=args.checksums)
    print(report.format())
    return 0 if report.ok else 1


def _cmd_download(args: argparse.Namespace) -> int:
    from evpretrain.data.download import download_dataset, download_weights
    from evpretrain.data.registry import get_dataset, load_registry

    progress = False if args.quiet else None  # None: a bar on a terminal, log lines in a log file
    if args.weights:
        print(download_weights(args.weights, args.root, mirror=args.mirror, progress=progress))
    else:
        entry = get_dataset(args.dataset, load_registry(extra=args.registry))
        print(download_dataset(entry, args.root, mirror=args.mirror, progress=progress))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from evpretrain.config import load_yaml, optional_section
    from evpretrain.data.registry import convert_dataset, get_dataset, load_registry

    entry = get_dataset(args.dataset, load_registry(extra=args.registry))
    settings = None  # no config, or no data.convert.<dataset> in it: the converter's defaults
    if args.config is not None:
        settings = optional_section(load_yaml(args.config), f"data.convert.{args.dataset}")
    for path in convert_dataset(
        entry, args.root, args.out, settings=settings, workers=_workers(args), progress=not args.quiet
    ):
        print(path)
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from evpretrain.config import ConfigError, from_mapping, load_section, load_yaml
    from evpretrain.data.config import ImportConfig
    from evpretrain.data.importer import import_recordings

    if args.config is not None:  # the pipeline's form: the settings of data.imports.<name>
        if args.name is None:
            raise ConfigError("data import --config needs --name, the import's key under data.imports")
        config = load_section(ImportConfig, load_yaml(args.config), f"data.imports.{args.name}")
    else:
        if args.root is None or args.layout is None:
            raise ConfigError("data import needs --root and --layout (or --config and --name)")
        values = {"root": str(args.root), "layout": args.layout, "window": args.window, "seed": args.seed}
        values |= {"format": args.format, "skip_bad": args.skip_bad}
        if args.split_map is not None:
            values["split_map"] = str(args.split_map)
        if args.split is not None:
            values["split"] = _split_fractions(args.split)
        if args.sensor_size is not None:
            values["sensor_size"] = _pair(args.sensor_size, "--sensor-size")
        config = from_mapping(ImportConfig, values, "data import")
    progress = False if args.quiet else None  # None: a bar on a terminal, log lines in a log file
    for split, path in import_recordings(config, args.out, workers=_workers(args), progress=progress).items():
        print(f"{split}: {path}")
    return 0


def _split_fractions(text: str) -> dict[str, float]:
    """``train=0.8,val=0.1,test=0.1`` -> {split: fraction}."""
    from evpretrain.config import ConfigError

    try:
        pairs = [item.split("=") for item in text.split(",")]
        return {name.strip(): float(value) for name, value in pairs}
    except ValueError:
        raise ConfigError(
            f"--split: expected NAME=FRACTION,... (e.g. train=0.8,val=0.1,test=0.1), got {text!r}"
        ) from None


def _pair(text: str, option: str) -> list[int]:
    from evpretrain.config import ConfigError

    try:
        height, width = (int(v) for v in text.lower().replace("x", ",").split(","))
    except ValueError:
        raise ConfigError(f"{option}: expected H,W (pixels, e.g. 480,640), got {text!r}") from None
    return [height, width]


def _tags(values: list[str], option: str) -> dict[str, str]:
    """``KEY=VALUE`` options as a mapping; ConfigError naming ``option`` for one without ``=``."""
    from evpretrain.config import ConfigError

    bad = [tag for tag in values if "=" not in tag]
    if bad:
        raise ConfigError(f"{option}: expected KEY=VALUE, got {bad[0]!r}")
    return dict(tag.split("=", 1) for tag in values)


def _read_json(path: Path, option: str) -> dict:
    """The JSON object in the file given as ``option``; ConfigError naming both when it is not one."""
    from evpretrain.config import ConfigError

    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{option} {path}: not a JSON file ({err})") from err
    if not isinstance(value, dict):
        raise ConfigError(f"{option} {path}: expected a JSON object, got {type(value).__name__}")
    return value


def _positive_int(text: str) -> int:
    """argparse type of a count of at least 1 (``--workers``)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _live_tracking(args: argparse.Namespace, study: dict):
    """The ``--tracking-uri`` ... options as a ``LiveTracking`` (the run's params: the study config read), or None."""
    if args.tracking_uri is None:
        return None
    from evpretrain.training.mlflow_hook import LiveTracking

    tags = _tags(args.run_tag, "--run-tag")
    return LiveTracking(args.tracking_uri, args.experiment, args.run_name or args.out.name, tags, study)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from evpretrain.config import load_yaml
    from evpretrain.pretrain.config import pretrain_config
    from evpretrain.pretrain.run import run_stage

    study = load_yaml(args.config)
    config = pretrain_config(study)
    metrics = run_stage(
        args.stage,
        config,
        train_store=args.data,
        val_store=args.val,
        teacher_features=args.teacher_features,
        init=args.init,
        out=args.out,
        live=_live_tracking(args, study),
    )
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}, default=str))
    return 0


def _cmd_knn(args: argparse.Namespace) -> int:
    from evpretrain.config import load_yaml
    from evpretrain.pretrain.config import pretrain_config
    from evpretrain.pretrain.run import knn_of_checkpoint

    config = pretrain_config(load_yaml(args.config))
    accuracy = knn_of_checkpoint(config, args.checkpoint, args.data, args.val, seed=args.seed)
    print(json.dumps({"checkpoint": str(args.checkpoint) if args.checkpoint else "random init", "knn_top1": accuracy}))
    return 0


def _cmd_teacher_features(args: argparse.Namespace) -> int:
    from evpretrain.config import load_yaml
    from evpretrain.pretrain.config import pretrain_config
    from evpretrain.pretrain.run import teacher_features_for

    config = pretrain_config(load_yaml(args.config))
    if args.weights is not None:
        config = replace(config, teacher=replace(config.teacher, weights=str(args.weights)))
    print(teacher_features_for(config, args.data, args.out, device=args.device))
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from evpretrain.config import load_yaml
    from evpretrain.downstream.run import run_downstream

    study = load_yaml(args.config)
    metrics = run_downstream(
        args.task,
        study,
        train_store=args.train,
        eval_store=args.eval,
        out=args.out,
        checkpoint=args.checkpoint,
        mode=getattr(args, "mode", None),
        seed=args.seed,
        device=args.device,
        checkpoint_source=args.checkpoint_source,
        allow_partial=args.allow_partial,
        live=_live_tracking(args, study),
    )
    if "init_report" in metrics:
        print(metrics["init_report"], file=sys.stderr)
    print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and k != "init_report"}))
    return 0


def _cmd_robustness(args: argparse.Namespace) -> int:
    from evpretrain.config import load_yaml
    from evpretrain.downstream.robustness import evaluate_robustness

    rows = evaluate_robustness(
        load_yaml(args.config),
        args.run,
        args.eval,
        args.out,
        seed=args.seed,
        device=args.device,
        variants=args.variants,
    )
    for row in rows:
        print(json.dumps(row))
    return 0


def _inference_inputs(args: argparse.Namespace, window):
    from evpretrain.inference.outputs import RecordingInput

    return [
        RecordingInput(path, window, time_origin=args.time_origin, format=args.format, sensor_size=args.sensor_size)
        for path in args.input
    ]


def _window(text: str | None):
    from evpretrain.events.windows import WindowSpec

    return None if text is None else WindowSpec.parse(text)


def _cmd_embed(args: argparse.Namespace) -> int:
    from evpretrain.config import ConfigError, load_yaml
    from evpretrain.inference.model import load_model
    from evpretrain.inference.outputs import write_features

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.backbone is not None and args.checkpoint_source is None:
        raise ConfigError("--backbone chooses the backbone of a foreign checkpoint: it needs --checkpoint-source")
    model = load_model(
        args.checkpoint,
        args.checkpoint_source,
        args.device,
        policy=args.resize,
        batch_size=args.batch_size,
        study=load_yaml(args.config) if args.config else None,
        backbone=args.backbone,
        allow_partial=args.allow_partial,
    )
    window = _window(args.window)
    attrs = {
        "checkpoint": str(args.checkpoint),
        "checkpoint_source": args.checkpoint_source or "evpretrain",
        "spec": model.spec.to_dict(),
        "window": str(window) if window else "each store sample",
        "resize": args.resize,
        "time_origin": args.time_origin,
        "input_size": list(model.input_size),
    }
    summary = write_features(
        model, _inference_inputs(args, window), args.out, tokens=args.tokens, attrs=attrs, progress=not args.quiet
    )
    print(json.dumps({"out": str(args.out), "windows": summary["windows"], "embed_dim": summary["embed_dim"]}))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from evpretrain.config import ConfigError, load_yaml
    from evpretrain.inference.model import load_model
    from evpretrain.inference.outputs import write_predictions

    for name in ("top_k", "preview_frames", "batch_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    study = load_yaml(args.config) if args.config else None
    model = load_model(args.run, None, args.device, policy=args.resize, batch_size=args.batch_size, study=study)
    model.require_predictor()
    window = _window(args.window)
    if window is None and model.spec.window_events:
        window = _window(f"events:{model.spec.window_events}")  # the window the model was scored on
    inputs = _inference_inputs(args, window)
    if window is None and not all(source.is_store for source in inputs):
        raise ConfigError(f"{args.run}: its checkpoint names no window size: pass --window events:N or ms:T")
    attrs = {
        "run": str(args.run),
        "window": str(window) if window else "each store sample",
        "resize": args.resize,
        "time_origin": args.time_origin,
        "spec": model.spec.to_dict(),
    }
    manifest = write_predictions(
        model,
        inputs,
        args.out,
        top_k=args.top_k,
        preview_frames=args.preview_frames,
        attrs=attrs,
        progress=not args.quiet,
    )
    print(json.dumps({"out": str(args.out), "task": manifest["task"], "windows": manifest["windows"]}))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from evpretrain.pipeline.report import write_report

    paths = write_report(_read_json(args.manifest, "--manifest"), args.results, args.out, args.figures)
    print(paths["md"].read_text())
    return 0


def _cmd_track(args: argparse.Namespace) -> int:
    from evpretrain.config import load_yaml
    from evpretrain.pipeline.tracking import log_study

    tags = _tags(args.tag, "--tag")
    study = load_yaml(args.study) if args.study else None  # YAML reads JSON too
    manifest = _read_json(args.manifest, "--manifest")
    counts = log_study(manifest, args.results, args.tracking_uri, args.experiment, study=study, tags=tags)
    print(json.dumps(counts))
    if args.out is not None:
        from evpretrain.files import write_text_atomic

        write_text_atomic(
            args.out, json.dumps({"tracking_uri": args.tracking_uri, "experiment": args.experiment, **counts})
        )
    return 0


def _cmd_warm_start(args: argparse.Namespace) -> int:
    from evpretrain.warm_start import serve

    serve(args.socket, idle_timeout=args.idle_timeout)
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from submitit.core.utils import UncompletedJobError

    from evpretrain.pipeline.submit import Interrupted, JobResources, submit_command

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("evpretrain: error: submit needs a command after --, e.g. -- pretrain --stage 1 ...", file=sys.stderr)
        return 2
    resources = JobResources(
        gpus=args.gpus,
        tasks=args.tasks,
        cpus=args.cpus,
        mem_gb=args.mem_gb,
        time_min=args.time_min,
        nodes=args.nodes,
        partition=args.partition,
        account=args.account,
        qos=args.qos,
    )
    try:
        submit_command(command, resources, args.folder, name=args.name or f"evpretrain-{command[0]}")
    except Interrupted as err:
        print(f"evpretrain submit: {err}: cancelled the SLURM job", file=sys.stderr)
        return 128 + err.signum  # the shell's status of a process the signal ended
    except UncompletedJobError as err:  # failed, timed out, or cancelled by someone else; the logs' tail is in it
        print(f"evpretrain submit: {err}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evpretrain", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="group", required=True)
    _add_data_commands(commands)
    _add_pretrain_commands(commands)
    _add_downstream_commands(commands)
    _add_inference_commands(commands)
    _add_study_commands(commands)
    return parser


REGISTRY_HELP = "registry entries of your own (YAML, as registry.yaml) that add or replace datasets"


def _add_data_commands(commands: argparse._SubParsersAction) -> None:
    """``evpretrain data ...``: build, inspect, verify and convert stores."""
    data = commands.add_parser("data", help="build, inspect, verify and convert event datasets")
    sub = data.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build-demo", help="build the embedded demo study's stores (nothing downloaded)")
    p.add_argument("--config", required=True, type=Path, help="study config (YAML) with a data.demo section")
    p.add_argument("--out", required=True, type=Path, help="output folder: {train,val,test}.h5")
    p.add_argument("--workers", type=_positive_int, help=WORKERS_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_build_demo)

    p = sub.add_parser("build-ef", help="EF-ImageNet recipe: an ImageNet-style image folder -> moving videos -> events")
    p.add_argument("--config", required=True, type=Path, help="study config (YAML) with a data.ef section")
    p.add_argument("--images", required=True, type=Path, help="image folder, one sub-folder a class")
    p.add_argument("--out", required=True, type=Path, help="output store (.h5); shards are kept beside it until done")
    p.add_argument("--shard", type=int, default=0, help="build only this part (0-based) of the --num-shards parts")
    p.add_argument("--num-shards", type=int, default=1, help="parts the build is split into (merge-ef joins them)")
    p.add_argument("--workers", type=_positive_int, help=WORKERS_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_build_ef)

    p = sub.add_parser("merge-ef", help="join the parts of a split build-ef into the store one build writes")
    p.add_argument("--config", required=True, type=Path, help="study config (YAML) with the parts' data.ef section")
    p.add_argument("--out", required=True, type=Path, help="output store (.h5)")
    p.add_argument("parts", nargs="+", type=Path, help="the parts (build-ef --shard i --num-shards n), any order")
    p.set_defaults(func=_cmd_merge_ef)

    p = sub.add_parser("info", help="what an event store or any readable event file holds")
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--format", help="force a reader (see `evpretrain data formats`)")
    p.add_argument("--verify", action="store_true", help="recompute a store's content checksum")
    p.add_argument("--json", action="store_true", help="one JSON object per file")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("formats", help="list the event file formats that can be read")
    p.set_defaults(func=_cmd_formats)

    p = sub.add_parser("datasets", help="list the datasets of the registry")
    p.set_defaults(func=_cmd_datasets)

    p = sub.add_parser("verify", help="check a local copy of a registry dataset; say precisely what is missing")
    p.add_argument("--dataset", required=True, help="registry name (see `evpretrain data datasets`)")
    p.add_argument("--root", required=True, type=Path, help="the dataset's local folder")
    p.add_argument("--checksums", action="store_true", help="also hash the files that have a known checksum")
    p.add_argument("--registry", type=Path, help=REGISTRY_HELP)
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("download", help="fetch a registry dataset (or teacher weights): resumable, verified, unpacked")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--dataset", help="registry name; prints the copy's root (the --root of verify and convert)")
    what.add_argument("--weights", choices=["clip_vit_b16"], help="teacher weights; prints the file's path")
    p.add_argument("--root", required=True, type=Path, help="download folder; .evpretrain-download.json when complete")
    p.add_argument("--mirror", help="base URL serving the files under their names, instead of the publisher's")
    p.add_argument("--registry", type=Path, help=REGISTRY_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bar (a log line per 10%% still)")
    p.set_defaults(func=_cmd_download)

    p = sub.add_parser("convert", help="turn a verified local copy of a registry dataset into event stores")
    p.add_argument("--dataset", required=True, help="registry name")
    p.add_argument("--root", required=True, type=Path, help="the dataset's local folder")
    p.add_argument("--out", required=True, type=Path, help="output folder: one store per split")
    p.add_argument("--config", type=Path, help="study config whose data.convert.<dataset> section sets the windows")
    p.add_argument("--registry", type=Path, help=REGISTRY_HELP)
    p.add_argument("--workers", type=_positive_int, help=WORKERS_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser(
        "import",
        help="turn a folder of your own recordings (any readable format) into event stores, one a split",
        description="Import a folder of recordings into OUT/<split>.h5. Splits take whole recordings (no window of "
        "one recording in two splits); files are streamed, in parallel; a rerun resumes an interrupted import.",
    )
    p.add_argument("--root", type=Path, help="the folder of recordings")
    p.add_argument(
        "--layout",
        choices=("class_folders", "recordings"),
        help="class_folders: ROOT/<class>/<files>, labelled; recordings: ROOT/<files>, unlabelled, cut into windows",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder: one store per split, <split>.h5")
    p.add_argument(
        "--window",
        help="events:N (N events a window), ms:T (T milliseconds) or frames:K (K + 1 intensity frames of an AEDAT4 "
        "recording and the events between, frames kept); default: a sample a file",
    )
    p.add_argument("--split", help="fractions of the recordings per split (default train=0.8,val=0.1,test=0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random split (default 0)")
    p.add_argument("--split-map", type=Path, help="YAML/JSON {path relative to ROOT: split}, instead of --split")
    p.add_argument("--format", help="force a reader (see `evpretrain data formats`); default: detected per file")
    p.add_argument("--sensor-size", help="H,W for files whose header gives no sensor size")
    p.add_argument("--skip-bad", action="store_true", help="leave out unreadable or too short files (listed)")
    p.add_argument("--config", type=Path, help="study config: take the settings of data.imports.<--name> instead")
    p.add_argument("--name", help="with --config: the import's name under data.imports")
    p.add_argument("--workers", type=_positive_int, help=WORKERS_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_import)


def _add_pretrain_commands(commands: argparse._SubParsersAction) -> None:
    """``evpretrain pretrain``, ``knn`` and ``teacher-features``."""
    p = commands.add_parser("pretrain", help="run one pre-training stage (resumes from OUT/resume.pt)")
    p.add_argument("--stage", required=True, type=int, choices=(1, 2, 3))
    p.add_argument("--config", required=True, type=Path, help="study config (YAML) with a pretrain section")
    p.add_argument("--data", required=True, type=Path, help="training event store (.h5)")
    p.add_argument("--val", type=Path, help="labelled validation store for the kNN monitor")
    p.add_argument("--teacher-features", type=Path, help="cached teacher tokens of --data (stages 2 and 3)")
    p.add_argument("--init", type=Path, help="checkpoint.pt of the previous stage")
    p.add_argument("--out", required=True, type=Path, help="run folder: checkpoint.pt, metrics.json, figures")
    _add_live_options(p)
    p.set_defaults(func=_cmd_pretrain)

    p = commands.add_parser("knn", help="kNN top-1 of a checkpoint's backbone (or of a random init)")
    p.add_argument("--config", required=True, type=Path, help="study config with a pretrain section")
    p.add_argument("--data", required=True, type=Path, help="labelled training store: the kNN memory")
    p.add_argument("--val", required=True, type=Path, help="labelled validation store: the queries")
    p.add_argument("--checkpoint", type=Path, help="a stage's checkpoint.pt; without it, a random initialisation")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    p.set_defaults(func=_cmd_knn)

    p = commands.add_parser("teacher-features", help="cache the frozen image teacher's tokens of a store")
    p.add_argument("--config", required=True, type=Path, help="study config with pretrain.teacher and the backbone")
    p.add_argument("--data", required=True, type=Path, help="event store with frames (.h5)")
    p.add_argument("--out", required=True, type=Path, help="output features file (.h5)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--weights", type=Path, help="the teacher's weights file, instead of pretrain.teacher.weights")
    p.set_defaults(func=_cmd_teacher_features)


def _add_live_options(p: argparse.ArgumentParser) -> None:
    """Live MLflow tracking of a training command (the pipeline's ``tracking.live``): options, not config, so that
    switching it reruns nothing."""
    p.add_argument("--tracking-uri", help="log to this MLflow store while training (default: no live tracking)")
    p.add_argument("--experiment", default="evpretrain", help="MLflow experiment (default: evpretrain)")
    p.add_argument("--run-name", help="MLflow run name (default: the --out folder's name)")
    p.add_argument(
        "--run-tag", action="append", default=[], metavar="KEY=VALUE", help="a tag of the MLflow run (repeatable)"
    )


def _add_downstream_commands(commands: argparse._SubParsersAction) -> None:
    """``evpretrain finetune <task>`` and ``evaluate-robustness``."""
    finetune = commands.add_parser("finetune", help="fine-tune and evaluate a backbone on a downstream task")
    tasks = finetune.add_subparsers(dest="task", required=True)
    for task, text in (
        ("classify", "object recognition: linear probe or full fine-tuning"),
        ("segment", "semantic segmentation: UPerNet + FCN auxiliary head; mIoU, mAcc"),
        ("flow", "optical flow: UPerNet flow head + FCN auxiliary head; AEE, outlier %%"),
    ):
        p = tasks.add_parser(task, help=text)
        if task == "classify":
            p.add_argument(
                "--mode",
                required=True,
                choices=("linear", "finetune"),
                help="linear: frozen backbone + linear head; finetune: every parameter trains",
            )
        p.add_argument("--config", required=True, type=Path, help="study config with pretrain and downstream sections")
        p.add_argument("--train", required=True, type=Path, help="training event store (.h5)")
        p.add_argument("--eval", required=True, type=Path, help="evaluation event store (.h5), scored every epoch")
        p.add_argument("--checkpoint", type=Path, help="a pre-training checkpoint.pt; without it, random init")
        p.add_argument(
            "--checkpoint-source",
            help="the project a foreign --checkpoint comes from (eventpretrain_vit, "
            "eventpretrain_convvit, eventpretrain_swin, ecdp_vit, mem_vit)",
        )
        p.add_argument(
            "--allow-partial",
            action="store_true",
            help="load what fits of a foreign checkpoint that our backbone cannot hold in full",
        )
        p.add_argument("--seed", required=True, type=int, help="seed of the head, the data order, the augmentation")
        p.add_argument("--out", required=True, type=Path, help="run folder: metrics.json, checkpoint.pt, figure")
        p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
        _add_live_options(p)
        p.set_defaults(func=_cmd_finetune)

    p = commands.add_parser(
        "evaluate-robustness",
        help="accuracy of a fine-tuned classifier under shot noise, dropped events, val_event_noise and variant stores",
    )
    p.add_argument("--config", required=True, type=Path, help="study config (downstream.robustness sets the levels)")
    p.add_argument("--run", required=True, type=Path, help="an `evpretrain finetune classify` run folder")
    p.add_argument("--eval", required=True, type=Path, help="evaluation event store (.h5)")
    p.add_argument("--seed", required=True, type=int, help="seed of the corruptions")
    p.add_argument(
        "--variants",
        nargs="*",
        type=Path,
        default=[],
        help="more evaluation stores scored clean, one row each named by the file (N-ImageNet's mode_1.h5, ...)",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder: robustness.{csv,md,png}, metrics.json")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.set_defaults(func=_cmd_robustness)


def _add_inference_options(p: argparse.ArgumentParser) -> None:
    """What ``embed`` and ``predict`` share: the inputs, their windows, the sensor policy, batching."""
    p.add_argument(
        "--input",
        required=True,
        nargs="+",
        type=Path,
        help="recordings (any format of `evpretrain data formats`, streamed) or event stores (.h5)",
    )
    p.add_argument(
        "--resize",
        choices=("resize", "center_crop"),
        default="resize",
        help="a recording of another sensor than the checkpoint's: its whole view resized to the input (default), "
        "or centre-cropped to the training sensor's aspect ratio first",
    )
    p.add_argument(
        "--time-origin",
        choices=("file", "first_event"),
        default="file",
        help="t_start/t_end on the file's clock (default) or from the first event (exports of one recording agree)",
    )
    p.add_argument("--format", help="force a reader (see `evpretrain data formats`)")
    p.add_argument(
        "--sensor-size", nargs=2, type=int, metavar=("H", "W"), help="the recording's sensor, if not its own"
    )
    p.add_argument("--batch-size", type=int, default=16, help="windows per forward pass (default 16)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_inference_commands(commands: argparse._SubParsersAction) -> None:
    """``evpretrain embed`` and ``predict``: use any checkpoint on recordings, without the study config."""
    p = commands.add_parser("embed", help="per-window embeddings of a checkpoint on recordings or stores -> HDF5")
    p.add_argument("--checkpoint", required=True, type=Path, help="a checkpoint.pt (or its run folder), any stage/task")
    p.add_argument(
        "--checkpoint-source",
        help="the project a foreign checkpoint comes from (eventpretrain_vit, eventpretrain_convvit, "
        "eventpretrain_swin, ecdp_vit)",
    )
    p.add_argument("--backbone", help="a foreign checkpoint's backbone, if not the source's default (vit_base_patch16)")
    p.add_argument("--allow-partial", action="store_true", help="load what fits of a foreign checkpoint")
    p.add_argument("--config", type=Path, help="the study that trained a checkpoint written before they carried it")
    p.add_argument(
        "--window", help="events:N or ms:T (required for recordings; without it, each store sample is a window)"
    )
    p.add_argument("--tokens", action="store_true", help="also write each window's output tokens (N, L, D)")
    p.add_argument("--out", required=True, type=Path, help="features file (.h5), written whole")
    _add_inference_options(p)
    p.set_defaults(func=_cmd_embed)

    p = commands.add_parser("predict", help="a fine-tuned model's predictions on recordings: files and a GIF preview")
    p.add_argument("--run", required=True, type=Path, help="an `evpretrain finetune` run folder (or its checkpoint.pt)")
    p.add_argument(
        "--window", help="events:N or ms:T (default: events:N of the window the model was trained or scored on)"
    )
    p.add_argument("--config", type=Path, help="the study that trained a run written before checkpoints carried it")
    p.add_argument("--top-k", type=int, default=5, help="classes per window (classification; default 5)")
    p.add_argument("--preview-frames", type=int, default=100, help="windows in preview.gif (default 100)")
    p.add_argument("--out", required=True, type=Path, help="output folder, written whole (prediction.json lists it)")
    _add_inference_options(p)
    p.set_defaults(func=_cmd_predict)


def _add_study_commands(commands: argparse._SubParsersAction) -> None:
    """``evpretrain report``, ``track`` and ``submit``: a whole study's tables, tracking and SLURM jobs."""
    p = commands.add_parser("report", help="paper-style tables (md, tex, csv) from a study's metrics.json files")
    p.add_argument("--manifest", required=True, type=Path, help="the study's manifest.json (written by the pipeline)")
    p.add_argument("--results", required=True, type=Path, help="the study's results folder")
    p.add_argument("--out", required=True, type=Path, help="output folder for ablation.{md,tex,csv}")
    p.add_argument(
        "--figures",
        type=Path,
        help="output folder for loss_curves.png (the stages' logged losses) and each stage's figures",
    )
    p.set_defaults(func=_cmd_report)

    p = commands.add_parser("track", help="mirror a study's runs into MLflow: a parent run per variant, nested runs")
    p.add_argument("--manifest", required=True, type=Path, help="the study's manifest.json (written by the pipeline)")
    p.add_argument("--results", required=True, type=Path, help="the study's results folder")
    p.add_argument(
        "--study",
        type=Path,
        help="the study config (YAML or JSON, with its variants): each parent's settings and resolved config",
    )
    p.add_argument(
        "--tracking-uri", required=True, help="MLflow tracking URI (sqlite:///results/mlflow.db, http://...)"
    )
    p.add_argument("--experiment", required=True, help="MLflow experiment (one per study)")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="a tag for every run (repeatable)")
    p.add_argument("--out", type=Path, help="write what was logged here (a file the pipeline tracks)")
    p.set_defaults(func=_cmd_track)

    p = commands.add_parser("submit", help="run an evpretrain command as a checkpointable SLURM job and wait for it")
    p.add_argument("--folder", required=True, type=Path, help="submitit's folder (job logs, pickles)")
    p.add_argument("--gpus", type=int, default=0, help="GPUs per node, one task each (DDP across them)")
    p.add_argument("--tasks", type=int, help="tasks per node, DDP across them (default: one a GPU, else one)")
    p.add_argument("--cpus", type=int, default=2, help="CPUs per task")
    p.add_argument("--mem-gb", type=float, default=8.0, help="memory per node, GB")
    p.add_argument("--time-min", type=int, default=60, help="time limit, minutes (SIGUSR2 before it: requeue)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--name", help="job name (default evpretrain-<command>)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the evpretrain command and its arguments")
    p.set_defaults(func=_cmd_submit)

    p = commands.add_parser(
        "warm-start",
        help="serve evpretrain commands from one process that has imported torch and the rest once (local pipelines)",
    )
    p.add_argument("--socket", required=True, type=Path, help="Unix socket to listen on (in a folder only you can use)")
    p.add_argument("--idle-timeout", type=float, default=300.0, help="seconds without a command before it ends")
    p.set_defaults(func=_cmd_warm_start)


class _CurrentStderr(logging.Handler):
    """Writes to whatever ``sys.stderr`` is when a record comes (a test harness may swap it between calls)."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write(self.format(record) + "\n")


def _log_lines_unless_terminal() -> None:
    """In a log file (stderr not a terminal) training reports one line per ``log_every_steps`` (and resumes) in
    place of a progress bar; on a terminal the bar shows that. Once per process: main may run more than once."""
    package = logging.getLogger("evpretrain")
    if sys.stderr.isatty() or package.handlers:
        return
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    package.addHandler(handler)
    package.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    from evpretrain.warm_start import SOCKET_ENV, run_remote  # standard library only: cheap to import

    argv = sys.argv[1:] if argv is None else list(argv)
    warm = os.environ.get(SOCKET_ENV)  # set by a local pipeline that started a server
    if warm and argv[:1] not in (["warm-start"], ["submit"]):
        code = run_remote(warm, argv)
        if code is not None:
            return code
    args = build_parser().parse_args(argv)
    _log_lines_unless_terminal()
    from evpretrain.config import ConfigError
    from evpretrain.data.download import DownloadError
    from evpretrain.errors import CheckpointError, ResumeError
    from evpretrain.events.contract import EventFormatError
    from evpretrain.files import FolderLockedError

    try:
        return args.func(args)
    except (
        ConfigError,
        EventFormatError,
        DownloadError,
        CheckpointError,
        ResumeError,
        FolderLockedError,
        FileNotFoundError,
        NotADirectoryError,
        FileExistsError,
    ) as err:
        print(f"evpretrain: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
