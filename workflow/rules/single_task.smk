rule single_task:
    """Train a single-task learner from scratch on a scenario's test tasks (`learners:` in the
    config): its adaptation operator repeated from a fresh policy, recorded as a meta-test is."""
    input:
        tasks="results/tasks/{scenario}/seed{seed}.json",
    output:
        "results/single/{scenario}/{learner}/seed{seed}/trace.nc",
    params:
        **stage_params("single_task"),
        code=lambda wc: stage_code_hash("single_task", wc),
        seed=seed_param,
        software=SOFTWARE,
    log:
        "logs/single_task/{scenario}/{learner}/seed{seed}.log",
    cache: "omit-software"
    threads: 1
    resources:
        gpu=1,
        mem_mb=4000,
        runtime=120,
    conda:
        SOFTWARE_ENV
    shell:
        "safemeta single-task --config {params.config} --scenario {wildcards.scenario}"
        " --learner {wildcards.learner} --seed {params.seed} --tasks {input.tasks}"
        " --out {output} --threads {threads} --echo-fd 3 3>&2 > {log} 2>&1"
