rule meta_test:
    """Anytime-safety meta-test: adaptation steps from the meta-policy on every test task."""
    input:
        tasks="results/tasks/{scenario}/seed{seed}.json",
        policy="results/metatrain/{scenario}/{method}/seed{seed}/policy.pt",
    output:
        "results/metatest/{scenario}/{method}/seed{seed}/trace.nc",
    params:
        **stage_params("meta_test"),
        code=lambda wc: stage_code_hash("meta_test", wc),
        seed=seed_param,
        software=SOFTWARE,
    log:
        "logs/meta_test/{scenario}/{method}/seed{seed}.log",
    cache: "omit-software"
    threads: 1
    resources:
        gpu=1,
        mem_mb=4000,
        runtime=60,
    conda:
        SOFTWARE_ENV
    shell:
        "safemeta meta-test --config {params.config} --scenario {wildcards.scenario}"
        " --method {wildcards.method} --seed {params.seed} --tasks {input.tasks}"
        " --policy {input.policy} --out {output} --threads {threads} --echo-fd 3 3>&2 > {log} 2>&1"
