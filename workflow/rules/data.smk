# Data: resolve each stage's config section to a file, build the demo study's event stores, download, convert and
# import the datasets a study reads, and build EF-ImageNet.


rule resolve_config:
    """One config section as a file: it changes (and reruns its users) only when that section changes."""
    output:
        RESULTS / "config/{section}.yaml",
    params:
        text=lambda wildcards: config_section_yaml(wildcards.section),
    shell:
        WRITE_TEXT


rule build_demo:
    input:
        config=RESULTS / "config/data.demo.yaml",
    output:
        demo_stores(),
    log:
        RESULTS / "logs/build_demo.log",
    threads: ALL_CORES
    params:
        out=lambda wildcards, output: Path(output[0]).parent,
    shell:
        "evpretrain data build-demo --config {input.config:q} --out {params.out:q} --workers {threads} --quiet"
        " > {log:q} 2>&1"


for _dataset in datasets_to_download():

    rule:
        """A registry dataset's public files, fetched where the network is (never a cluster job)."""
        name:
            f"download_{_dataset.replace('-', '_')}"
        output:
            download_marker(_dataset),
        log:
            RESULTS / f"logs/download_{_dataset}.log",
        localrule: True
        params:
            dataset=_dataset,
            folder=DOWNLOADS / _dataset,
            registry=REGISTRY_OPTION,
            mirror=(
                ["--mirror", lookup(dpath=f"data/mirrors/{_dataset}", within=config)]
                if lookup(dpath=f"data/mirrors/{_dataset}", within=config, default=None)
                else []
            ),
        shell:
            "evpretrain data download --dataset {params.dataset:q} --root {params.folder:q} {params.mirror:q}"
            " {params.registry:q} --quiet > {log:q} 2>&1"


for _name, _file in weights_to_download().items():

    rule:
        """A teacher's published weights (the paper's CLIP ViT-B/16), fetched and checked against their sha256."""
        name:
            f"download_weights_{_name}"
        output:
            _file,
        log:
            RESULTS / f"logs/download_weights_{_name}.log",
        localrule: True
        params:
            name=_name,
            folder=_file.parent,
        shell:
            "evpretrain data download --weights {params.name:q} --root {params.folder:q} --quiet > {log:q} 2>&1"


for _dataset, _splits in datasets_to_convert().items():

    rule:
        name:
            f"convert_{_dataset.replace('-', '_')}"
        input:
            # the window settings, when the study gives some: a change re-converts
            config=(
                [RESULTS / "config/data.convert.yaml"]
                if lookup(dpath="data/convert", within=config, default=None)
                else []
            ),
            # the download, unless the study gives its own copy (data.roots.<dataset>)
            download=[] if user_root(_dataset) else [download_marker(_dataset)],
        output:
            [store(_dataset, split) for split in _splits],
        log:
            RESULTS / f"logs/convert_{_dataset}.log",
        threads: DATA_THREADS
        params:
            dataset=_dataset,
            root=dataset_root(_dataset),
            registry=REGISTRY_OPTION,
            out=RESULTS / f"data/{_dataset}",
            config=lambda wildcards, input: ["--config", *input.config] if input.config else [],
        shell:
            # verify here (it names what a copy lacks, in seconds), convert where the data jobs run
            "evpretrain data verify --dataset {params.dataset:q} --root {params.root:q} {params.registry:q}"
            " > {log:q} 2>&1 && {LAUNCH_DATA} data convert --dataset {params.dataset:q} --root {params.root:q}"
            " --out {params.out:q} {params.config:q} {params.registry:q}" + DATA_WORKERS + " --quiet >> {log:q} 2>&1"


EF_SHARDS = lookup(dpath="data/ef/shards", within=config, default=1)

if EF_SHARDS == 1:

    rule build_ef:
        """EF-ImageNet (the paper's pre-training data) from an ImageNet-style image folder per split."""
        input:
            config=RESULTS / "config/data.ef.yaml",
        output:
            RESULTS / "data/ef/{split}.h5",
        log:
            RESULTS / "logs/build_ef_{split}.log",
        threads: DATA_THREADS
        params:
            images=lambda wildcards: required_path(f"data.ef_images.{wildcards.split}"),
        shell:
            "{LAUNCH_DATA} data build-ef --config {input.config:q} --images {params.images:q} --out {output:q}"
            + DATA_WORKERS
            + " --quiet > {log:q} 2>&1"

else:

    rule build_ef_shard:
        """Part {shard} of data.ef.shards of the EF-ImageNet build of a split: one job each under SLURM."""
        input:
            config=RESULTS / "config/data.ef.yaml",
        output:
            temp(RESULTS / "data/ef/{split}.shard{shard}-of-{n}.h5"),
        log:
            RESULTS / "logs/build_ef_{split}.shard{shard}-of-{n}.log",
        wildcard_constraints:
            split=r"[A-Za-z0-9_-]+",
            shard=r"\d+",
            n=r"\d+",
        threads: DATA_THREADS
        params:
            images=lambda wildcards: required_path(f"data.ef_images.{wildcards.split}"),
        shell:
            "{LAUNCH_DATA} data build-ef --config {input.config:q} --images {params.images:q} --out {output:q}"
            " --shard {wildcards.shard} --num-shards {wildcards.n}" + DATA_WORKERS + " --quiet > {log:q} 2>&1"

    rule merge_ef:
        """The parts joined into the store one build writes (evpretrain.data.ef.merge_ef)."""
        input:
            config=RESULTS / "config/data.ef.yaml",
            parts=expand(RESULTS / "data/ef/{{split}}.shard{shard}-of-{n}.h5", shard=range(EF_SHARDS), n=EF_SHARDS),
        output:
            RESULTS / "data/ef/{split}.h5",
        log:
            RESULTS / "logs/merge_ef_{split}.log",
        wildcard_constraints:
            split=r"[A-Za-z0-9_-]+",
        shell:
            "{LAUNCH_DATA} data merge-ef --config {input.config:q} --out {output:q} {input.parts:q} > {log:q} 2>&1"


for _name in IMPORTS:

    rule:
        """A folder of the user's own recordings (data.imports.<name>) -> one event store a split."""
        name:
            f"import_{_name.replace('-', '_')}"
        input:
            config=RESULTS / f"config/data.imports.{_name}.yaml",  # a changed setting re-imports
        output:
            [store(_name, split) for split in import_splits(_name)],
        log:
            RESULTS / f"logs/import_{_name}.log",
        threads: DATA_THREADS
        params:
            name=_name,
            out=RESULTS / f"data/{_name}",
            recordings=recordings_listing(_name),  # not in the command: a changed folder re-imports
        shell:
            "{LAUNCH_DATA} data import --config {input.config:q} --name {params.name:q} --out {params.out:q}"
            + DATA_WORKERS
            + " --quiet > {log:q} 2>&1"
