# Shared by every rule: config validation, the labels of the grid, the config part each stage
# reads (a rule's params, with the code hash of code.smk, so that only affected stages rerun),
# and the target lists.
import os
import sys
from pathlib import Path

from safemeta.config import ConfigError
from safemeta.job_params import JobParams
from safemeta.plugins import grid

PACKAGE = Path(workflow.basedir) / "src" / "safemeta"  # the source tree whose files code.smk hashes

# Validate against workflow/schemas/config.schema.yaml (a link to the package's schema, the one
# schema of the project), fill defaults, reject unknown keys and names; one line on error. The
# validated config and every job's params are kept in .snakemake/safemeta/ per config and code
# (safemeta/job_params.py), so a run that changes neither imports no torch or MuJoCo here.
try:
    JOB_PARAMS = JobParams.load(config, root=PACKAGE, cache_dir=Path(".snakemake", "safemeta"))
except ConfigError as exc:
    sys.exit(f"safemeta: config error: {exc}")
config.update(JOB_PARAMS.config)

SEEDS = config["seeds"]
SOFTWARE_ENV = "../../environment.yml"  # for --sdm conda; relative to the rule files

# Jobs call the `safemeta` CLI of the Python environment that runs Snakemake, even when that
# environment is not activated (`.venv/bin/snakemake ...`).
os.environ.update(PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


wildcard_constraints:
    scenario=r"[A-Za-z0-9_]+",
    method=r"[A-Za-z0-9_]+",
    learner=r"[A-Za-z0-9_]+",
    seed=r"\d+",


# ----------------------------------------------------------------------------- config params
def _label(wildcards):
    return getattr(wildcards, "method", None) or getattr(wildcards, "learner", None)


def stage_json(stage, wildcards):
    """Canonical JSON of the config part `stage` reads: the rule's params and the CLI's --config."""
    return JOB_PARAMS.stage_json(stage, wildcards.scenario, _label(wildcards))


def seed_param(wildcards):
    """The seed as a param: the between-workflow cache hashes params, not wildcards."""
    return int(wildcards.seed)


# ----------------------------------------------------------------------------- targets
# A method or learner runs on every scenario, or on those its `scenarios` list names.
def _traces(stage, section):
    return [f"results/{stage}/{scenario}/{label}/seed{seed}/trace.nc" for scenario, label in grid(config, section)
            for seed in SEEDS]


def metatrain_traces():
    return _traces("metatrain", "methods")


def metatest_traces():
    return _traces("metatest", "methods")


def single_task_traces():
    return _traces("single", "learners")
