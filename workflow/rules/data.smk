# Data: resolve each stage's config section to a file, build the demo study's event stores.


rule resolve_config:
    """One config section as a file: it changes (and reruns its users) only when that section changes."""
    output:
        RESULTS / "config/{section}.yaml",
    params:
        text=lambda wildcards: config_section_yaml(wildcards.section),
    run:
        Path(output[0]).write_text(params.text)


rule build_demo:
    input:
        config=RESULTS / "config/data.demo.yaml",
    output:
        demo_stores(),
    params:
        out=lambda wildcards, output: Path(output[0]).parent,
    log:
        RESULTS / "logs/build_demo.log",
    threads: workflow.cores
    shell:
        "evpretrain data build-demo --config {input.config} --out {params.out} --workers {threads} --quiet > {log} 2>&1"
