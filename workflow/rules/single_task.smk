rule single_task:
    """Train a single-task learner from scratch on a scenario's test tasks (`learners:` in the
    config): its adaptation operator repeated from a fresh policy, recorded as a meta-test is."""
    input:
        tasks="results/tasks/{scenario}/seed{seed}.json",
    output:
        trace="results/single/{scenario}/{learner}/seed{seed}/trace.nc",
    params:
        **stage_params("single_task"),
        code=lambda wc: stage_code_hash("single_task", wc),
    log:
        "logs/single_task/{scenario}/{learner}/seed{seed}.log",
    benchmark:
        "results/benchmarks/single_task/{scenario}/{learner}/seed{seed}.tsv"
    threads: 1
    resources:
        gpu=1,
        mem_mb=4000,
        runtime=120,
    conda:
        SOFTWARE_ENV
    shell:
        "safemeta single-task --config {params.config} --scenario {wildcards.scenario}"
        " --learner {wildcards.learner} --seed {wildcards.seed} --tasks {input.tasks}"
        " --out {output.trace} --threads {threads} --echo-fd 3 3>&2 > {log} 2>&1"
