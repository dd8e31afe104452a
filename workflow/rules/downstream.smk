# Downstream: each evaluation of the plan (variant checkpoint x task x dataset x seed), then the tables.


rule evaluation_config:
    output:
        RESULTS / "downstream/{evaluation}/study.yaml",
    params:
        text=lambda wildcards: yaml_text(PLAN.evaluations[wildcards.evaluation].config),
    run:
        Path(output[0]).write_text(params.text)


rule finetune:
    input:
        unpack(evaluation_inputs),
    output:
        RESULTS / "downstream/{evaluation}/metrics.json",
    params:
        task=lambda wildcards: PLAN.evaluations[wildcards.evaluation].task,
        mode=lambda wildcards: (f"--mode {PLAN.evaluations[wildcards.evaluation].mode}"
                                if PLAN.evaluations[wildcards.evaluation].mode else ""),
        seed=lambda wildcards: PLAN.evaluations[wildcards.evaluation].seed,
        checkpoint=lambda wildcards, input: option("--checkpoint", input, "checkpoint"),
        out=lambda wildcards, output: Path(output[0]).parent,
    log:
        RESULTS / "logs/downstream/{evaluation}.log",
    threads: HEAVY_THREADS  # torch's threads: two jobs sharing cores run 10x slower, not 2x
    shell:
        "OMP_NUM_THREADS={threads} {LAUNCH_FINETUNE} finetune {params.task} {params.mode} --config {input.config} --train {input.train}"
        " --eval {input.eval} {params.checkpoint} --seed {params.seed} --out {params.out} > {log} 2>&1"


rule manifest:
    output:
        RESULTS / "manifest.json",
    params:
        text=lambda wildcards: json.dumps(PLAN.manifest(), indent=1, sort_keys=True),
    run:
        Path(output[0]).write_text(params.text)


rule tables:
    input:
        manifest=RESULTS / "manifest.json",
        metrics=all_evaluation_metrics(),
    output:
        table_outputs(),
    params:
        out=RESULTS / "tables",
    log:
        RESULTS / "logs/tables.log",
    shell:
        "evpretrain report --manifest {input.manifest} --results {RESULTS} --out {params.out} > {log} 2>&1"


rule track:
    """Mirror the study into MLflow (the metrics.json files stay the source of truth)."""
    input:
        manifest=RESULTS / "manifest.json",
        stages=all_stage_metrics(),
        metrics=all_evaluation_metrics(),
    output:
        RESULTS / "mlflow/logged.json",
    params:
        uri=tracking_uri(),
        experiment=config["study"]["name"] if PLAN else None,
        commit=git_commit(),
    log:
        RESULTS / "logs/track.log",
    shell:
        "evpretrain track --manifest {input.manifest} --results {RESULTS} --tracking-uri '{params.uri}'"
        " --experiment '{params.experiment}' --tag git_commit={params.commit} --out {output} > {log} 2>&1"
