# Shared by every rule: config validation, the labels of the grid, the config part each stage
# reads (a rule's params, with the code hash of code.smk, so that only affected stages rerun),
# and the target lists.
import os
import sys
from pathlib import Path

from safemeta.config import ConfigError, canonical_json, stage_config, validate_config
from safemeta.plugins import grid

# Validate against workflow/schemas/config.schema.yaml (a link to the package's schema, the one
# schema of the project), fill defaults, reject unknown keys and names; one line on error.
try:
    config.update(validate_config(config))
except ConfigError as exc:
    sys.exit(f"safemeta: config error: {exc}")

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
def stage_json(stage, wildcards):
    """Canonical JSON of the config part `stage` reads: the rule's params and the CLI's --config."""
    label = getattr(wildcards, "method", None) or getattr(wildcards, "learner", None)
    return canonical_json(stage_config(config, stage, wildcards.scenario, label))


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
