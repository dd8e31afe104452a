# Pre-training: the teacher's tokens once per (teacher, backbone grid, data), then each stage node of the plan.


rule teacher_config:
    output:
        RESULTS / "teacher/{teacher}.yaml",
    priority: 10  # as teacher_features: a priority does not pass to the jobs a job waits for
    params:
        text=lambda wildcards: yaml_text(PLAN.teachers[wildcards.teacher]),
    shell:
        WRITE_TEXT


rule teacher_features:
    input:
        unpack(teacher_inputs),
    output:
        RESULTS / "teacher/{teacher}.h5",
    log:
        RESULTS / "logs/teacher/{teacher}.log",
    priority: 10  # every stage 2 and 3 waits for it: start it before the stage-1 runs that can wait
    threads: HEAVY_THREADS  # torch's threads: two jobs sharing cores run 10x slower, not 2x
    params:
        # the downloaded weights: a path, not a setting, so the features' key stays that of the config
        weights=lambda wildcards, input: option("--weights", input.get("weights")),
    shell:
        "{LAUNCH_TEACHER} teacher-features --config {input.config:q} --data {input.train:q} {params.weights}"
        " --out {output:q} > {log:q} 2>&1"


rule stage_config:
    output:
        RESULTS / "pretrain/{node}/study.yaml",
    params:
        text=lambda wildcards: yaml_text(node(wildcards).config),
    shell:
        WRITE_TEXT


rule pretrain_stage:
    input:
        unpack(stage_inputs),
    output:
        checkpoint=RESULTS / "pretrain/{node}/checkpoint.pt",
        metrics=RESULTS / "pretrain/{node}/metrics.json",
    log:
        RESULTS / "logs/pretrain/{node}.log",
    threads: HEAVY_THREADS  # torch's threads: two jobs sharing cores run 10x slower, not 2x
    params:
        stage=lambda wildcards: node(wildcards).stage,
        out=lambda wildcards, output: Path(output.checkpoint).parent,
        teacher=lambda wildcards, input: option("--teacher-features", input.get("teacher")),
        init=lambda wildcards, input: option("--init", input.get("init")),
        live=lambda wildcards, output: live_tracking(f"pretrain/{wildcards.node}"),  # output: not recorded, no rerun
    shell:
        "{LAUNCH_PRETRAIN} pretrain --stage {params.stage:q} --config {input.config:q} --data {input.train:q} --val {input.val:q}"
        " {params.teacher} {params.init} --out {params.out:q} {params.live} > {log:q} 2>&1"
