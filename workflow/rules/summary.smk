rule aggregate:
    """Merge every meta-train, meta-test and single-task trace into results/summary.nc."""
    input:
        metatrain=metatrain_traces(),
        metatest=metatest_traces(),
        single=single_task_traces(),
    output:
        "results/summary.nc",
    params:
        code=stage_code_hash("aggregate"),
    log:
        "logs/aggregate.log",
    benchmark:
        "results/benchmarks/aggregate.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    localrule: True
    conda:
        SOFTWARE_ENV
    shell:
        "safemeta aggregate {input.metatrain} {input.metatest} {input.single} --out {output} --echo-fd 3 3>&2 > {log} 2>&1"


rule plot:
    """Draw the figures of summary.nc; they go into the report with their captions."""
    input:
        "results/summary.nc",
    output:
        metatrain=report(
            "results/figures/metatrain.png",
            caption="../report/metatrain.rst",
            category="Figures",
        ),
        metatest=report(
            "results/figures/metatest.png",
            caption="../report/metatest.rst",
            category="Figures",
        ),
        compute_time=report(
            "results/figures/compute_time.png",
            caption="../report/compute_time.rst",
            category="Figures",
        ),
        single_task=report(
            "results/figures/single_task.png",
            caption="../report/single_task.rst",
            category="Figures",
        ),
    params:
        code=stage_code_hash("plot"),
        out_dir=lambda wc, output: os.path.dirname(output.metatrain),
    log:
        "logs/plot.log",
    benchmark:
        "results/benchmarks/plot.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    localrule: True
    conda:
        SOFTWARE_ENV
    shell:
        "safemeta plot --summary {input} --out-dir {params.out_dir} --echo-fd 3 3>&2 > {log} 2>&1"


rule compare:
    """The side-by-side comparison of the methods: the paper's Fig. 1/4 layout and the table of its claims."""
    input:
        "results/summary.nc",
    output:
        figure=report(
            "results/figures/comparison.png",
            caption="../report/comparison.rst",
            category="Comparison",
        ),
        table=report(
            "results/comparison.html",
            caption="../report/comparison_table.rst",
            category="Comparison",
        ),
        csv="results/comparison.csv",
    params:
        code=stage_code_hash("compare"),
    log:
        "logs/compare.log",
    benchmark:
        "results/benchmarks/compare.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    localrule: True
    conda:
        SOFTWARE_ENV
    shell:
        "safemeta compare --summary {input} --figure {output.figure} --csv {output.csv} --html {output.table}"
        " --echo-fd 3 3>&2 > {log} 2>&1"
