"""Mutation check, run by hand (pytest does not collect this file):

    .venv/bin/python tests/mutations.py [--only NAME ...] [--whole-files] [--list]

Each mutation below changes one line's meaning in a temporary copy of the package (src/safemeta);
the tests that guard that line then run against the copy (PYTHONPATH), and the script prints
whether they killed it (a test failed), or whether it SURVIVED. First the guarding tests run on an
unmutated copy and must pass. A mutation whose original text no longer occurs exactly once in its
module is reported STALE (the code changed: update the mutation). `--whole-files` runs every test
of the guarding tests' files instead of the guarding tests only. Exit status 0 when every
mutation is killed.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    module: str                            # path under src/safemeta
    edits: tuple[tuple[str, str], ...]     # (original text, mutated text), each original unique
    tests: tuple[str, ...]                 # pytest node ids that guard it
    what: str


MUTATIONS = [
    # The seven survivors of issue 9 (the argmin one in both switches).
    Mutation("eq6_without_u_grad_Qc", "meta/safe_meta_exact.py",
             (("log_pu = adapted_logits(log_pi, ev.A, ev.Ac, u,",
               "log_pu = adapted_logits(log_pi, ev.A, ev.Ac.detach() if kind == 'eq6' else ev.Ac, u,"),),
             ("tests/test_meta_gradient.py::test_eq6_is_the_derivative_at_fixed_multipliers",),
             "eq. (6) without the -u grad Q_c part of grad Qbar"),
    Mutation("exact_switch_ignores_delta", "meta/safe_meta_exact.py",
             (('violation = ev.Jc - cmdp.d - as_vector(adaptation.delta, cmdp.num_constraints, "delta")',
               "violation = ev.Jc - cmdp.d"),),
             ("tests/test_meta_train_exact.py::test_switch_allows_the_violation_delta",),
             "Alg. 2 line 4 compares J_c with d instead of d + delta"),
    Mutation("sampled_switch_ignores_delta", "meta/safe_meta.py",
             (('''- on_task.limits
                         - as_vector(adapt.settings.delta, len(J_c), "delta"))''', "- on_task.limits)"),),
             ("tests/test_safe_meta_sampled.py::test_sampled_switch_allows_the_violation_delta",),
             "Alg. 4 line 4 compares J_c with d instead of d + delta"),
    Mutation("exact_switch_argmin", "meta/safe_meta_exact.py",
             (("i = int(np.argmax(violation))", "i = int(np.argmin(violation))"),),
             ("tests/test_meta_train_exact.py::test_switch_descends_the_violated_constraint",),
             "Alg. 2 line 10 descends the least violated constraint"),
    Mutation("sampled_switch_argmin", "meta/safe_meta.py",
             (("int(np.argmax(violation))", "int(np.argmin(violation))"),),
             ("tests/test_safe_meta_sampled.py::test_sampled_switch_descends_the_violated_constraint",),
             "Alg. 4 line 10 descends the least violated constraint"),
    Mutation("h_c_with_gamma", "adaptation/dual_pgd_sampled.py",
             (("con = (batch.cost_to_go - time_baseline(batch.cost_to_go, alive))[alive]",
               "con = (batch.q_cost - time_baseline(batch.q_cost, alive))[alive]"),
              ("con_w = batch.constraint_discount[alive] / batch.num_rollouts",
               "con_w = batch.discount[alive] / batch.num_rollouts")),
             ("tests/test_sampled_adaptation.py::test_sampled_adaptation_keeps_the_realised_cost_within_the_limit",),
             "the sampled A^s's cost gradient h_c built with gamma, not constraint_gamma"),
    Mutation("collect_drops_terminal_transition", "rollout.py",
             (('("cost", step.cost), ("alive", alive.clone())',
               '("cost", step.cost), ("alive", alive & ~step.terminated)'),),
             ("tests/test_policies_rollout.py::test_collect_keeps_the_terminal_transitions_reward_and_cost",),
             "collect masks the terminating transition's reward and cost"),
    Mutation("trpo_quarter_kl_radius", "optim.py",
             (("full_step = (2.0 * max_kl / quad) ** 0.5 * x", "full_step = (0.5 * max_kl / quad) ** 0.5 * x"),),
             ("tests/test_optim.py::test_trpo_step_uses_its_whole_kl_radius",),
             "the TRPO step scaled to a quarter of its KL radius"),
    # Added: the lam_c KL term of problem (1)'s constraint, which the moderate-lam safety test guards
    # (the bound's test sees it too, but only by a realised excess of ~1e-12 on its 1e-12 tolerance).
    Mutation("eq5_without_lam_c_kl", "adaptation/dual_pgd.py",
             (("per_state = exp_adv_c + (1.0 - gamma) * lam_c.reshape(-1, *[1] * kl.ndim) * kl",
               "per_state = exp_adv_c + 0.0 * kl"),),
             ("tests/test_anytime_safety.py::test_one_step_is_safe_at_moderate_lam_where_the_constraint_binds",),
             "the exact dual gradient (eq. 5), i.e. problem (1)'s constraint, without its lam_c KL term"),
    # Added: a too-conservative exact A^s, which the contrast test (lam_c = 0 can be unsafe) sees.
    Mutation("exact_limit_lowered", "adaptation/dual_pgd.py",
             (("d_prime = (1.0 - gamma) * (torch.from_numpy(cmdp.d + delta_v) - ev.Jc)",
               "d_prime = (1.0 - gamma) * (torch.from_numpy(cmdp.d + delta_v) - ev.Jc - 1e-3)"),),
             ("tests/test_anytime_safety.py::test_without_the_kl_term_of_the_constraint_one_step_can_be_unsafe",),
             "the exact A^s aims 1e-3 below d + delta (d' of eq. 4 lowered)"),
    # CPO and Meta-CPO (adaptation/cpo.py, meta/meta_cpo.py).
    Mutation("cpo_omnisafe_r_sign", "adaptation/cpo.py",
             (("lam_b * cf + rf <= 0.0", "lam_b * cf - rf <= 0.0"),),
             ("tests/test_cpo.py::test_cpo_step_matches_scipy_in_every_case",),
             "the nu* = 0 test with the appendix's sign of r (OmniSafe's mix of conventions)"),
    Mutation("cpo_recovery_sign", "adaptation/cpo.py",
             (("return Direction(-torch.sqrt(two_delta / s) * x_b, RECOVERY", "return Direction(torch.sqrt(two_delta / s) * x_b, RECOVERY"),),
             ("tests/test_cpo.py::test_cpo_step_matches_scipy_in_every_case",),
             "the recovery step increases the linearised cost"),
    Mutation("cpo_constrained_without_plane_term", "adaptation/cpo.py",
             (("x = torch.sqrt(B / A) * (x_g - (r / s) * x_b) - (c / s) * x_b", "x = torch.sqrt(B / A) * (x_g - (r / s) * x_b)"),),
             ("tests/test_cpo.py::test_cpo_step_matches_scipy_in_every_case",),
             "the nu* > 0 step without its -(c/s) F^-1 b term"),
    Mutation("cpo_accepts_indefinite_F", "adaptation/cpo.py",
             (("        L = np.linalg.cholesky(F)\n", "        L = np.linalg.cholesky(np.abs(F))\n"),),
             ("tests/test_cpo.py::test_cpo_step_rejects_a_matrix_that_is_not_symmetric_positive_definite",),
             "cpo_step accepts a matrix that is not positive definite"),
    Mutation("cpo_tabular_natural_gradient_scale", "adaptation/cpo.py",
             (("adv.reshape(-1) / (1.0 - cmdp.gamma)", "adv.reshape(-1) * (1.0 - cmdp.gamma)"),),
             ("tests/test_cpo.py::test_exact_step_is_the_closed_form_of_the_exact_linearisation",),
             "the tabular natural gradient F^+ g scaled by (1 - gamma)^2"),
    Mutation("cpo_line_search_ignores_kl", "adaptation/cpo.py",
             (("if kl <= max_kl and predicted", "if predicted"),),
             ("tests/test_cpo.py::test_exact_step_is_the_closed_form_of_the_exact_linearisation",),
             "the CPO line search does not check the KL"),
    Mutation("cpo_cost_surrogate_with_gamma", "adaptation/cpo.py",
             (("return self.J_c + (self.cost_w * self._ratio(theta) * self.cost_adv).sum()",
               "return self.J_c + (self.reward_w * self._ratio(theta) * self.cost_adv).sum()"),),
             ("tests/test_cpo.py::test_sampled_step_is_the_closed_form_with_the_dense_fisher",),
             "the sampled cost surrogate weighted by gamma^t, not constraint_gamma^t"),
    Mutation("meta_cpo_exact_natural_gradient_detached", "adaptation/cpo.py",
             (("    elif not graph:\n        x_g, x_b = x_g.detach(), x_b.detach()", "    else:\n        x_g, x_b = x_g.detach(), x_b.detach()"),),
             ("tests/test_cpo.py::test_exact_meta_gradient_matches_finite_differences",),
             "the exact meta-gradient without the derivative of F^+ g, F^+ b"),
    Mutation("meta_cpo_without_fisher_derivative", "adaptation/cpo.py",
             (("Fx = surrogates.fisher_product(th, x_star) if fisher_derivative else 0.0", "Fx = 0.0"),),
             ("tests/test_cpo.py::test_sampled_step_derivative_matches_finite_differences",),
             "the sampled step's derivative without the Fisher's (fisher_derivative ignored)"),
    Mutation("meta_cpo_backward_without_solve", "adaptation/cpo.py",
             (("return ctx.solve(grad.detach()).detach(), None", "return grad.detach(), None"),),
             ("tests/test_cpo.py::test_sampled_step_derivative_matches_finite_differences",),
             "the implicit solve's backward pass without F^-1"),
    Mutation("meta_cpo_outer_descends", "meta/meta_cpo.py",
             (("g = torch.from_numpy(np.mean([t.grad for t in tasks], axis=0).reshape(-1))",
               "g = -torch.from_numpy(np.mean([t.grad for t in tasks], axis=0).reshape(-1))"),),
             ("tests/test_cpo.py::test_exact_meta_cpo_learns_on_a_tabular_family",),
             "the exact Meta-CPO outer step descends the meta-objective"),
]


def copy_package(dest: Path) -> Path:
    src = dest / "src"
    shutil.copytree(ROOT / "src" / "safemeta", src / "safemeta", ignore=shutil.ignore_patterns("__pycache__"))
    return src


def apply(mutation: Mutation, src: Path) -> str | None:
    """Apply the edits to the copy; the reason it cannot be applied, or None."""
    path = src / "safemeta" / mutation.module
    text = path.read_text()
    for original, mutated in mutation.edits:
        count = text.count(original)
        if count != 1:
            return f"{original!r} occurs {count} times in {mutation.module}"
        text = text.replace(original, mutated)
    try:
        compile(text, str(path), "exec")
    except SyntaxError as exc:
        return f"the mutated module does not compile: {exc}"
    path.write_text(text)
    return None


def run_tests(src: Path, tests: list[str]) -> tuple[int, str, float]:
    env = {**os.environ, "PYTHONPATH": str(src), "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, flags=re.M)
    return proc.returncode, failed[0] if failed else proc.stdout.strip().splitlines()[-1:][0], time.perf_counter() - start


def check_import(src: Path) -> None:
    """The subprocesses must import the copy, not an installed safemeta."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, "-c", "import safemeta; print(safemeta.__file__)"], env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    if not out.startswith(str(src)):
        sys.exit(f"PYTHONPATH={src} imports safemeta from {out}: the mutations would not be tested")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutations")
    parser.add_argument("--whole-files", action="store_true", help="run the guarding tests' whole files")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.only and len(chosen) != len(set(args.only)):
        unknown = sorted(set(args.only) - {m.name for m in MUTATIONS})
        parser.error(f"unknown mutation(s) {unknown}; --list names them")
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:36s} {m.module:28s} {m.what}")
        return 0

    def tests_of(m: Mutation) -> list[str]:
        return sorted({t.split("::")[0] for t in m.tests}) if args.whole_files else list(m.tests)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="safemeta-mutations-") as tmp:
        clean = copy_package(Path(tmp) / "clean")
        check_import(clean)
        baseline = sorted({t for m in chosen for t in tests_of(m)})
        rc, detail, seconds = run_tests(clean, baseline)
        print(f"baseline: {len(baseline)} test selections on the unmutated copy: "
              f"{'pass' if rc == 0 else 'FAIL'} ({seconds:.0f} s)")
        if rc != 0:
            print(f"  the unmutated code fails {detail}: fix that first")
            return 2
        results = []
        for m in chosen:
            src = copy_package(Path(tmp) / m.name)
            problem = apply(m, src)
            if problem is not None:
                verdict, detail, seconds = "STALE", problem, 0.0
            else:
                rc, detail, seconds = run_tests(src, tests_of(m))
                verdict = {0: "SURVIVED", 1: "killed"}.get(rc, f"ERROR (pytest exit {rc})")
            results.append((m, verdict))
            print(f"{verdict:10s} {m.name:36s} {seconds:5.0f} s  {m.what}\n{'':11s}-> {detail}", flush=True)
            shutil.rmtree(src.parent)
    killed = sum(v == "killed" for _, v in results)
    survivors = [m.name for m, v in results if v != "killed"]
    print(f"\n{killed} of {len(results)} mutations killed in {time.perf_counter() - start:.0f} s"
          + (f"; not killed: {', '.join(survivors)}" if survivors else ""))
    return 0 if not survivors else 1


if __name__ == "__main__":
    sys.exit(main())
