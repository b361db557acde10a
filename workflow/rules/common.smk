# Shared by every rule: config validation, the labels of the grid, the params and --config file
# of each job (the config part its stage reads; with the code hash of code.smk, so that only
# affected stages rerun), and the target lists.
import functools
import json
import os
import sys
from pathlib import Path

from safemeta.atomic import write_text
from safemeta.config import ConfigError, config_hash, read_yaml
from safemeta.job_params import JobParams
from safemeta.plugins import PARAM_GROUPS, check_grid, grid, part_params

PACKAGE = Path(workflow.basedir) / "src" / "safemeta"  # the source tree whose files code.smk hashes

# Validate against workflow/schemas/config.schema.yaml (a link to the package's schema, the one
# schema of the project), fill defaults, reject unknown keys, names and task options, repeated
# keys in the config files, and a config that runs nothing; one line on error. The
# validated config and every job's params are kept in .snakemake/safemeta/ per config and code
# (safemeta/job_params.py), so a run that changes neither imports no torch or MuJoCo here.
try:
    for _file in workflow.configfiles:
        read_yaml(_file)
    JOB_PARAMS = JobParams.load(config, root=PACKAGE, cache_dir=Path(".snakemake", "safemeta"))
    check_grid(JOB_PARAMS.config)
except ConfigError as exc:
    sys.exit(f"safemeta: config error: {exc}")
config.update(JOB_PARAMS.config)

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
    return json.loads(JOB_PARAMS.stage_json(stage, scenario, label))


def _part_file(stage, scenario, label):
    """The part as a file named by its content hash: the command's --config (short commands)."""
    part = _part(stage, scenario, label)
    path = PARTS / f"{config_hash(part)}.json"
    if not path.is_file():
        write_text(path, JOB_PARAMS.stage_json(stage, scenario, label))
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
