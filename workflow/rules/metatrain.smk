rule meta_train:
    """Meta-train one method on one scenario and seed; resumes from its checkpoint after a kill.

    The checkpoint lives outside the declared outputs (Snakemake deletes those before a rerun)
    and is removed by the CLI on success.
    """
    input:
        tasks="results/tasks/{scenario}/seed{seed}.json",
    output:
        multiext("results/metatrain/{scenario}/{method}/seed{seed}/", policy="policy.pt", trace="trace.nc"),
    params:
        **stage_params("meta_train"),
        code=lambda wc: stage_code_hash("meta_train", wc),
        seed=seed_param,
        software=SOFTWARE,
        checkpoint=lambda wc: f"results/checkpoints/{wc.scenario}/{wc.method}/seed{wc.seed}.pt",
        out_dir=lambda wc, output: os.path.dirname(output.policy),
    log:
        "logs/meta_train/{scenario}/{method}/seed{seed}.log",
    cache: "omit-software"
    threads: 1
    resources:
        gpu=1,
        mem_mb=4000,
        runtime=120,
    conda:
        SOFTWARE_ENV
    shell:
        "safemeta meta-train --config {params.config} --scenario {wildcards.scenario}"
        " --method {wildcards.method} --seed {params.seed} --tasks {input.tasks}"
        " --out-dir {params.out_dir} --checkpoint {params.checkpoint} --threads {threads} --echo-fd 3 3>&2 > {log} 2>&1"
