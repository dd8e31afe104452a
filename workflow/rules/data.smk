# Data: resolve each stage's config section to a file, build the demo study's event stores.


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
        "evpretrain data build-demo --config {input.config} --out {params.out} --workers {threads} --quiet > {log} 2>&1"


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
        threads: ALL_CORES
        params:
            dataset=_dataset,
            root=dataset_root(_dataset),
            registry=REGISTRY_OPTION,
            out=RESULTS / f"data/{_dataset}",
            config=lambda wildcards, input: ["--config", *input.config] if input.config else [],
        shell:
            "evpretrain data verify --dataset {params.dataset:q} --root {params.root:q} {params.registry:q}"
            " > {log:q} 2>&1 && evpretrain data convert --dataset {params.dataset:q} --root {params.root:q}"
            " --out {params.out:q} {params.config:q} {params.registry:q} --workers {threads} --quiet >> {log:q} 2>&1"


rule build_ef:
    """EF-ImageNet (the paper's pre-training data) from an ImageNet-style image folder per split."""
    input:
        config=RESULTS / "config/data.ef.yaml",
    output:
        RESULTS / "data/ef/{split}.h5",
    log:
        RESULTS / "logs/build_ef_{split}.log",
    threads: ALL_CORES
    params:
        images=lambda wildcards: required_path(f"data.ef_images.{wildcards.split}"),
    shell:
        "evpretrain data build-ef --config {input.config} --images {params.images} --out {output}"
        " --workers {threads} --quiet > {log} 2>&1"


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
        threads: ALL_CORES
        params:
            name=_name,
            out=RESULTS / f"data/{_name}",
        shell:
            "evpretrain data import --config {input.config:q} --name {params.name:q} --out {params.out:q}"
            " --workers {threads} --quiet > {log:q} 2>&1"
