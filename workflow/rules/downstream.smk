# Downstream: each evaluation of the plan (variant checkpoint x task x dataset x seed), then the tables.


rule evaluation_config:
    output:
        RESULTS / "downstream/{evaluation}/study.yaml",
    params:
        text=lambda wildcards: yaml_text(evaluation(wildcards).config),
    shell:
        WRITE_TEXT


rule released_checkpoint:
    """A released checkpoint that a variant names (variants.<name>.checkpoint), linked into the results by the key of
    its path: the plan needs no file, a run stops here naming a missing one, and a new path reruns its evaluations."""
    output:
        RESULTS / "released/{released}.pth",
    params:
        file=lambda wildcards: PLAN.released[wildcards.released],
    shell:
        "test -f {params.file:q} || {{ echo released checkpoint {params.file:q} not found >&2; exit 1; }};"
        ' ln -sf "$(realpath {params.file:q})" {output:q}'


rule finetune:
    input:
        unpack(evaluation_inputs),
    output:
        RESULTS / "downstream/{evaluation}/metrics.json",
    log:
        RESULTS / "logs/downstream/{evaluation}.log",
    threads: HEAVY_THREADS  # torch's threads: two jobs sharing cores run 10x slower, not 2x
    params:
        task=lambda wildcards: evaluation(wildcards).task,
        mode=lambda wildcards: option("--mode", evaluation(wildcards).mode),
        seed=lambda wildcards: evaluation(wildcards).seed,
        checkpoint=lambda wildcards, input: option("--checkpoint", input.get("checkpoint")),
        source=lambda wildcards: option("--checkpoint-source", evaluation(wildcards).checkpoint_source),
        out=lambda wildcards, output: Path(output[0]).parent,
        live=lambda wildcards, output: live_tracking(f"downstream/{wildcards.evaluation}"),  # output: no rerun
    shell:
        "{LAUNCH_FINETUNE} finetune {params.task:q} {params.mode} --config {input.config:q} --train {input.train:q}"
        " --eval {input.eval:q} {params.checkpoint} {params.source} --seed {params.seed:q} --out {params.out:q}"
        " {params.live} > {log:q} 2>&1"


rule robustness:
    """The classifier of an evaluation under shot noise, dropped events and the authors' val_event_noise
    (downstream.robustness), and clean on the evaluation's also_eval stores (N-ImageNet's variants)."""
    input:
        config=RESULTS / "downstream/{evaluation}/study.yaml",
        run=RESULTS / "downstream/{evaluation}/metrics.json",
        eval=lambda wildcards: evaluation_inputs(wildcards)["eval"],
        variants=lambda wildcards: [store(*pair) for pair in evaluation(wildcards).also_eval],
    output:
        RESULTS / "downstream/{evaluation}/robustness/robustness.csv",
    log:
        RESULTS / "logs/robustness/{evaluation}.log",
    threads: HEAVY_THREADS
    params:
        seed=lambda wildcards: evaluation(wildcards).seed,
        run=lambda wildcards, input: Path(input.run).parent,
        out=lambda wildcards, output: Path(output[0]).parent,
    shell:
        "{LAUNCH_FINETUNE} evaluate-robustness --config {input.config:q} --run {params.run:q}"
        " --eval {input.eval:q} --variants {input.variants:q} --seed {params.seed:q} --out {params.out:q} > {log:q} 2>&1"


rule manifest:
    output:
        RESULTS / "manifest.json",
    params:
        text=lambda wildcards: json.dumps(PLAN.manifest(), indent=1),  # variants in the config's order: the tables' rows
    shell:
        WRITE_TEXT


rule tables:
    input:
        manifest=RESULTS / "manifest.json",
        stages=all_stage_metrics(),
        metrics=all_evaluation_metrics(),
        robustness=all_robustness_tables(),
    output:
        RESULTS / "tables/ablation.md",
        RESULTS / "tables/ablation.tex",
        report(RESULTS / "tables/ablation.csv", caption="../report/ablation.rst", category="Tables"),
        figures=report(
            directory(RESULTS / "figures"),
            patterns=["{name}.png"],
            caption="../report/figures.rst",
            category="Figures",
        ),
    log:
        RESULTS / "logs/tables.log",
    params:
        out=RESULTS / "tables",
    shell:
        "evpretrain report --manifest {input.manifest:q} --results {RESULTS:q} --out {params.out:q}"
        " --figures {output.figures:q} > {log:q} 2>&1"


rule study_config:
    """The study config (with its variants, without how jobs run): the MLflow parents' settings and configs."""
    output:
        RESULTS / "config/study.json",
    params:
        text=lambda wildcards: json.dumps(study_record(config), indent=1, sort_keys=True, default=str),
    shell:
        WRITE_TEXT


rule track:
    """Mirror the study into MLflow (the metrics.json files stay the source of truth)."""
    input:
        manifest=RESULTS / "manifest.json",
        study=RESULTS / "config/study.json",
        stages=all_stage_metrics(),
        metrics=all_evaluation_metrics(),
    output:
        RESULTS / "mlflow/logged.json",
    log:
        RESULTS / "logs/track.log",
    params:
        uri=tracking_uri(),
        experiment=lookup(dpath="study/name", within=config) if PLAN else None,
        commit=git_commit(),
    shell:
        "evpretrain track --manifest {input.manifest:q} --study {input.study:q} --results {RESULTS:q}"
        " --tracking-uri {params.uri:q}"
        " --experiment {params.experiment:q} --tag git_commit={params.commit:q} --out {output:q} > {log:q} 2>&1"
