# Shared by every rule: config validation, the labels of the grid, the params and --config file
# of each job (the config part its stage reads; with the code hash of code.smk, so that only
# affected stages rerun), and the target lists.
import functools
import os
import sys
from pathlib import Path

from safemeta.atomic import write_text
from safemeta.config import ConfigError, canonical_json, config_hash, read_yaml, stage_config, validate_config
from safemeta.plugins import PARAM_GROUPS, check_grid, grid, part_params

# Validate against workflow/schemas/config.schema.yaml (a link to the package's schema, the one
# schema of the project), fill defaults, reject unknown keys, names and task options, repeated
# keys in the config files, and a config that runs nothing; one line on error.
try:
    for _file in workflow.configfiles:
        read_yaml(_file)
    config.update(validate_config(config))
    check_grid(config)
except ConfigError as exc:
    sys.exit(f"safemeta: config error: {exc}")

SEEDS = config["seeds"]
SOFTWARE_ENV = "../../environment.yml"  # for --sdm conda; relative to the rule files
PARTS = Path(".snakemake", "safemeta", "config")  # each job's config part, named by its hash

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


@functools.lru_cache(maxsize=None)
def _part(stage, scenario, label):
    return stage_config(config, stage, scenario, label)


def _part_file(stage, scenario, label):
    """The part as a file named by its content hash: the command's --config (short commands)."""
    part = _part(stage, scenario, label)
    path = PARTS / f"{config_hash(part)}.json"
    if not path.is_file():
        write_text(path, canonical_json(part))
    return str(path)


def stage_params(stage):
    """A rule's config params (`params: **stage_params(stage)`): one short "key=value" summary
    per group of the part (safemeta.plugins.part_params), so a changed key is named in the
    reason of `snakemake -n`, and `config`, the part's file. `config` takes the output as an
    argument, which makes it a derived param that Snakemake leaves out of its rerun check: the
    summaries carry the content, without the sections that change no result (`checks`)."""
    params = {name: lambda wc, name=name: part_params(_part(stage, wc.scenario, _label(wc)))[name]
              for name in PARAM_GROUPS}
    params["config"] = lambda wc, output: _part_file(stage, wc.scenario, _label(wc))
    return params


# Each rule's shell ends in `--echo-fd 3 3>&2 > {log} 2>&1`: the job's result lines, warnings
# and, for long jobs, a progress line at most every 30 s also go to the terminal (fd 3, a copy
# of Snakemake's stderr taken before the log redirection), the whole output to the log.


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
