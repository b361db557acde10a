rule single_task:
    """Train a single-task learner (CVPO, CGPO) from scratch on a scenario's test tasks.

    Jobs exist only for learners configured under `learners`; none is implemented yet, so the
    rule has no jobs until the learners' issue adds them (and the `safemeta single-task` command).
    """
    input:
        tasks="results/tasks/{scenario}/seed{seed}.json",
    output:
        trace="results/single/{scenario}/{learner}/seed{seed}/trace.nc",
    params:
        config=lambda wc: stage_json("single_task", wc),
        code=lambda wc: stage_code_hash("single_task", wc.scenario),
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
        "safemeta single-task --config {params.config:q} --scenario {wildcards.scenario}"
        " --learner {wildcards.learner} --seed {wildcards.seed} --tasks {input.tasks}"
        " --out {output.trace} > {log} 2>&1"
