"""CVPO's E-step particle values at the released code's sizes: `QEnsemble.particles` (activations
in place) against the same layers composed out of place (the code before), in one run.

Batch 300 states x 32 particles, a 256 x 256 ensemble of 3 critics (2 reward, 1 cost), point
navigation's 28 + 2 inputs, one torch thread; median CPU time of `--repeats` interleaved calls
each; the two must agree bit for bit.

    .venv/bin/python benchmarks/bench_cvpo_particles.py [--repeats 40]
"""
from __future__ import annotations

import argparse
import time

import torch

from safemeta.adaptation.cvpo import QEnsemble


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    obs_dim, act_dim, hidden, batch, particles = 28, 2, 256, 300, 32
    critics = QEnsemble(obs_dim + act_dim, (hidden, hidden), 3, g)
    obs, actions = torch.randn(batch, obs_dim, generator=g), torch.randn(batch, particles, act_dim, generator=g)

    def composed() -> torch.Tensor:
        with torch.no_grad():
            h = critics._first(obs)[:, :, None] + critics._first(actions.reshape(batch * particles, -1),
                                                                 obs_dim).reshape(-1, batch, particles, hidden)
            return critics._head(h.reshape(-1, batch * particles, hidden)).reshape(-1, batch, particles)

    def in_place() -> torch.Tensor:
        return critics.particles(obs, actions)

    if not torch.equal(composed(), in_place()):
        raise SystemExit("the in-place particle values differ from the composed layers")
    times: dict[str, list[float]] = {"composed": [], "in_place": []}
    for _ in range(args.repeats):
        for name, f in (("composed", composed), ("in_place", in_place)):
            start = time.process_time()
            f()
            times[name].append(time.process_time() - start)
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(f"particle values [{batch} x {particles}], 3 x {hidden}x{hidden} critics: composed {median['composed'] * 1e3:.1f} ms, "
          f"in place {median['in_place'] * 1e3:.1f} ms (median CPU of {args.repeats}); composed / in place "
          f"{median['composed'] / median['in_place']:.2f}")


if __name__ == "__main__":
    main()
