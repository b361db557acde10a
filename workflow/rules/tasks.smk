rule sample_tasks:
    """Sample a scenario's train and test tasks for one seed (reads the scenario's task part)."""
    output:
        "results/tasks/{scenario}/seed{seed}.json",
    params:
        **stage_params("tasks"),
        code=lambda wc: stage_code_hash("tasks", wc),
        seed=seed_param,
        software=SOFTWARE,
    log:
        "logs/sample_tasks/{scenario}/seed{seed}.log",
    cache: "omit-software"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    conda:
        SOFTWARE_ENV
    shell:
        "safemeta tasks --config {params.config} --scenario {wildcards.scenario}"
        " --seed {params.seed} --out {output} --echo-fd 3 3>&2 > {log} 2>&1"
