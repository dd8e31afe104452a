# evpretrain: the experiment pipeline. `make demo` runs it on the embedded demo study (config.yaml);
# `snakemake --profile workflow/profiles/slurm all` runs it on a cluster.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"  # `snakemake --report report.html`: the tables and figures of the study


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/downstream.smk"


WARM_SERVER = []  # (process, folder) of the warm-start server while the workflow runs


onstart:
    WARM_SERVER.append(start_warm_server())


onsuccess:
    stop_warm_server(WARM_SERVER.pop() if WARM_SERVER else None)


onerror:
    stop_warm_server(WARM_SERVER.pop() if WARM_SERVER else None)


rule all:
    input:
        demo_stores() if PLAN is None else [],  # a study builds the stores it reads
        table_outputs(),
        figure_outputs(),
        tracking_outputs(),
