# Content hashes of the package code each stage runs: a rule's `code` param (see
# safemeta/stages.py). Files are read from the source tree next to the Snakefile (PACKAGE), so
# editing a module reruns exactly the rules that run it and `touch` reruns nothing; the modules
# of algorithms come from the registries, so adding one needs no edit here. The cached rules also
# carry SOFTWARE, the installed versions of the package's dependencies (pyproject.toml), since
# they change results too and the between-workflow cache sees only params, inputs and commands.
from safemeta.stages import dependency_versions

try:
    SOFTWARE = dependency_versions(Path(workflow.basedir) / "pyproject.toml")
except ValueError as exc:
    sys.exit(f"safemeta: {exc}")


def stage_code_hash(stage, wildcards=None):
    scenario = getattr(wildcards, "scenario", None)
    return JOB_PARAMS.code_hash(stage, scenario, _label(wildcards) if wildcards is not None else None)
