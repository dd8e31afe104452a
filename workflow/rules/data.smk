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


for _dataset, _splits in datasets_to_convert().items():

    rule:
        name:
            f"convert_{_dataset.replace('-', '_')}"
        input:
            # the window settings, when the study gives some: a change re-converts
            [RESULTS / "config/data.convert.yaml"] if lookup(dpath="data/convert", within=config, default=None) else [],
        output:
            [store(_dataset, split) for split in _splits],
        log:
            RESULTS / f"logs/convert_{_dataset}.log",
        threads: ALL_CORES
        params:
            dataset=_dataset,
            root=required_path(f"data.roots.{_dataset}"),
            out=RESULTS / f"data/{_dataset}",
            config=lambda wildcards, input: f"--config {input[0]}" if len(input) else "",
        shell:
            "evpretrain data verify --dataset {params.dataset} --root {params.root} > {log} 2>&1 && "
            "evpretrain data convert --dataset {params.dataset} --root {params.root} --out {params.out}"
            " {params.config} --workers {threads} --quiet >> {log} 2>&1"


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
