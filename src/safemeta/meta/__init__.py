"""Meta-learners by name (the `algorithm` of a `methods.NAME` block of the config).

Each name maps to its implementation classes ("module:Class", modules relative to this package),
one per scenario kind; see `base.py` for the protocol and README "Adding a method".
"""
from ..registry import Registry

META_LEARNERS = Registry(__name__, "meta-learning algorithm", {
    "safemeta": ("safe_meta_exact:ExactSafeMeta", "safe_meta:SampledSafeMeta"),   # the paper (Alg. 2 / Alg. 4)
    "maml_penalty": ("maml_penalty:ExactMAMLPenalty", "maml_penalty:SampledMAMLPenalty"),   # baseline (a)
    "meta_crpo": ("meta_crpo:ExactMetaCRPO", "meta_crpo:SampledMetaCRPO"),   # baseline (c)
    "meta_cpo": ("meta_cpo:ExactMetaCPO", "meta_cpo:SampledMetaCPO"),   # baseline (b): Meta-CPO (Cho & Sun 2024)
})
