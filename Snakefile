# safemeta pipeline: tasks -> meta-train -> meta-test (and single-task learners) -> summary.nc
# -> figures and report. Every stage calls the `safemeta` CLI; see README.md, section Pipeline.
from snakemake.utils import min_version

min_version("9.19")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/code.smk"
include: "workflow/rules/tasks.smk"
include: "workflow/rules/metatrain.smk"
include: "workflow/rules/metatest.smk"
include: "workflow/rules/single_task.smk"
include: "workflow/rules/summary.smk"


rule all:
    """Default target: summary.nc (every trace), the figures and the comparison of the methods."""
    default_target: True
    input:
        rules.aggregate.output,
        rules.plot.output,
        rules.compare.output,
