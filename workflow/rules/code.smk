# Content hashes of the package code each stage runs: a rule's `code` param (see
# safemeta/stages.py). Files are read from the source tree next to the Snakefile
# (workflow.basedir), so editing a module reruns exactly the rules that run it and `touch`
# reruns nothing; the modules of algorithms come from the registries, so adding one needs no edit here.
from safemeta.stages import stage_code_hash as _stage_code_hash

PACKAGE = Path(workflow.basedir) / "src" / "safemeta"


def stage_code_hash(stage, wildcards=None):
    scenario = getattr(wildcards, "scenario", None)
    label = getattr(wildcards, "method", None) or getattr(wildcards, "learner", None)
    return _stage_code_hash(config, stage, scenario, label, root=PACKAGE)
