"""Throughput of the task environments.

For each MuJoCo scenario: batched env-steps/s under a fixed uniformly random policy, against raw
`mj_step` throughput (a Python loop over one MjData of the same compiled model, same frame skip,
same random controls) measured in the same run, interleaved, best of `--repeats`; the ratio is the
figure (target >= 0.8 for half_cheetah_vel and point_circle at 64 envs). Also the time of one
`reset()` of all copies and of `make_env`. For the torch tasks: env-steps/s on CPU (and CUDA when
present), with and without autograd.

Safety-Gymnasium (`--sg`, needs `safemeta sg-setup`): per navigation scenario, the native env
(one physics thread) and its sg_* twin (one worker process, same task, same random actions) side
by side: env-steps/s, their ratio, reset and make_env times (make_env of the same task again:
the pooled worker keeps its envs), for both transports (shared memory, pipes), and the round
trip of one empty step (no copy active) through each transport.

    .venv/bin/python benchmarks/bench_envs.py                 # full table
    .venv/bin/python benchmarks/bench_envs.py --quick         # a few seconds
    .venv/bin/python benchmarks/bench_envs.py --scenarios point_circle --envs 16 64 --threads 1 2
    .venv/bin/python benchmarks/bench_envs.py --sg --envs 10            # native vs Safety-Gymnasium only
"""
from __future__ import annotations

import argparse
import time

import mujoco
import numpy as np
import torch

from safemeta.tasks import get_distribution
from safemeta.tasks.mujoco_batch import default_threads

MUJOCO = ["half_cheetah_vel", "hopper_vel", "swimmer_vel", "humanoid_dir", "point_circle", "car_circle_hazard",
          "point_button"]
TORCH = ["function_env", "function_env_floor", "cartpole_pos", "point_circle_diff"]
SG_NATIVE = ["point_circle", "car_circle_hazard", "point_button"]   # scenarios with an sg_* twin


def batched_rate(env, actions: torch.Tensor) -> float:
    """Env-steps/s of the BatchEnv; only copies still running count; a fully terminated batch is reset."""
    env.reset()
    done = torch.zeros(env.num_envs, dtype=torch.bool)
    counted = 0
    start = time.perf_counter()
    for a in actions:
        counted += int((~done).sum())
        done = env.step(a).terminated
        if done.all():
            env.reset()
            done[:] = False
    return counted / (time.perf_counter() - start)


def raw_rate(model: mujoco.MjModel, frame_skip: int, controls: np.ndarray, horizon: int, healthy=None) -> float:
    """Env-steps/s of bare mj_step(nstep=frame_skip) on one MjData (reset at the horizon or when unhealthy)."""
    d = mujoco.MjData(model)
    start = time.perf_counter()
    for t, c in enumerate(controls):
        d.ctrl[:] = c
        mujoco.mj_step(model, d, nstep=frame_skip)
        if (t + 1) % horizon == 0 or (healthy is not None and not healthy(d)):
            mujoco.mj_resetData(model, d)
    return len(controls) / (time.perf_counter() - start)


def bench_mujoco(name: str, num_envs: int, threads: int, steps: int, repeats: int) -> dict[str, float]:
    dist = get_distribution(name, sim_threads=threads)
    task = dist.sample(1, seed=0)[0]
    t0 = time.perf_counter()
    env = dist.make_env(task, num_envs, seed=0)
    make_ms = (time.perf_counter() - t0) * 1e3
    low, high = env.action_space.low, env.action_space.high
    gen = torch.Generator().manual_seed(0)
    actions = torch.from_numpy(low) + torch.rand(steps, num_envs, low.shape[0], generator=gen) * torch.from_numpy(high - low)
    controls = actions.reshape(-1, low.shape[0]).double().numpy()[: max(steps * num_envs // 4, 2000)]
    healthy = (lambda d: 1.0 < d.qpos[2] < 2.0) if name == "humanoid_dir" else None
    batched, raw = [], []
    for _ in range(repeats):
        batched.append(batched_rate(env, actions))
        raw.append(raw_rate(env.model, env.sim.frame_skip, controls, env.horizon, healthy))
    resets = []
    for _ in range(max(3, repeats)):
        t0 = time.perf_counter()
        env.reset()
        resets.append(time.perf_counter() - t0)
    env.close()
    return {"batched": max(batched), "raw": max(raw), "reset_ms": 1e3 * min(resets), "make_ms": make_ms,
            "threads": env.sim.threads}


def bench_torch(name: str, num_envs: int, steps: int, device: str, grad: bool) -> float:
    dist = get_distribution(name)
    env = dist.make_env(dist.sample(1, seed=0)[0], num_envs, seed=0, device=device)
    act_dim = env.action_space.shape[0]
    a = torch.zeros(num_envs, act_dim, device=device, requires_grad=grad)
    best = 0.0
    for _ in range(3):
        env.reset()
        with torch.set_grad_enabled(grad):
            start = time.perf_counter()
            total = 0.0
            for _ in range(steps):
                total = total + env.step(a + 0.1).cost.sum()
            if grad:
                total.backward()
            if device != "cpu":
                torch.cuda.synchronize()
        best = max(best, num_envs * steps / (time.perf_counter() - start))
    return best


def timed(fn, repeats: int) -> float:
    """Best wall time of `repeats` calls, seconds."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def empty_round_trip(env, repeats: int = 200) -> float:
    """Seconds per STEP command that steps no copy: transport and protocol cost alone."""
    from safemeta.tasks import sg_navigation, sg_worker

    for part in env._parts:
        part.io["active"][:] = 0.0
    return timed(lambda: env._command(sg_worker.STEP, sg_navigation.STEP_SECONDS, "step"), repeats)


def bench_sg(name: str, num_envs: int, steps: int, repeats: int) -> dict[str, float]:
    """Native vs Safety-Gymnasium worker on the same task and actions (see the module docstring)."""
    from safemeta.tasks import Task

    native_dist = get_distribution(name, sim_threads=1)
    task = native_dist.sample(1, seed=0)[0]
    gen = torch.Generator().manual_seed(0)
    actions = torch.rand(steps, num_envs, 2, generator=gen) * 2 - 1
    out: dict[str, float] = {}
    for label, dist in [("native", native_dist), ("shm", get_distribution(f"sg_{name}", sim_threads=1)),
                        ("pipe", get_distribution(f"sg_{name}", sim_threads=1, transport="pipe"))]:
        t = Task(dist.name, task.params)
        dist.make_env(t, num_envs, seed=0).close()          # warm: worker started, envs of this task built
        start = time.perf_counter()
        env = dist.make_env(t, num_envs, seed=0)
        out[f"{label}_make_ms"] = 1e3 * (time.perf_counter() - start)
        out[f"{label}_rate"] = max(batched_rate(env, actions) for _ in range(repeats))
        out[f"{label}_reset_ms"] = 1e3 * timed(env.reset, max(3, repeats))
        if label != "native":
            out[f"{label}_rtt_us"] = 1e6 * empty_round_trip(env)
        env.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", nargs="+", default=MUJOCO + TORCH, help="scenarios to measure")
    parser.add_argument("--envs", nargs="+", type=int, default=[64], help="batch sizes (MuJoCo)")
    parser.add_argument("--threads", nargs="+", default=["1", "auto"], help="physics threads per env ('auto' = usable CPUs, <= 4)")
    parser.add_argument("--steps", type=int, default=200, help="env steps per timed MuJoCo run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions (best is reported)")
    parser.add_argument("--torch-envs", type=int, default=4096, help="batch size of the torch tasks")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch CPU threads for the torch tasks")
    parser.add_argument("--quick", action="store_true", help="short runs: 50 steps, 1 repeat, 1024 torch envs")
    parser.add_argument("--sg", action="store_true", help="only the native vs Safety-Gymnasium worker table")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats, args.torch_envs = 50, 1, 1024
    threads = sorted({default_threads() if t == "auto" else int(t) for t in args.threads})

    print(f"MuJoCo {mujoco.__version__}, torch {torch.__version__}, usable CPUs {default_threads()}, "
          f"steps {args.steps} x best of {args.repeats}")
    if args.sg:
        print_sg_table(args)
        return
    print(f"{'scenario':<18} {'envs':>5} {'thr':>4} {'batched/s':>11} {'raw mj_step/s':>14} {'ratio':>6} "
          f"{'reset ms':>9} {'make_env ms':>12}")
    for name in [s for s in args.scenarios if s in MUJOCO]:
        for n in args.envs:
            for th in threads:
                r = bench_mujoco(name, n, th, args.steps, args.repeats)
                print(f"{name:<18} {n:>5} {r['threads']:>4} {r['batched']:>11.0f} {r['raw']:>14.0f} "
                      f"{r['batched'] / r['raw']:>6.2f} {r['reset_ms']:>9.2f} {r['make_ms']:>12.1f}", flush=True)

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    names = [s for s in args.scenarios if s in TORCH]
    torch.set_num_threads(args.torch_threads)
    if names:
        print(f"\ntorch tasks, {args.torch_envs} envs x 200 steps, {args.torch_threads} CPU thread(s): env-steps/s")
        print(f"{'scenario':<20} " + " ".join(f"{d + (' +grad' if g else ''):>14}" for d in devices for g in (False, True)))
        for name in names:
            rates = [bench_torch(name, args.torch_envs, 200, d, g) for d in devices for g in (False, True)]
            print(f"{name:<20} " + " ".join(f"{r:>14.3g}" for r in rates), flush=True)
    print_sg_table(args)


def print_sg_table(args: argparse.Namespace) -> None:
    from safemeta.tasks.sg_setup import missing_message, worker_python

    if worker_python() is None:
        print(f"skipped the Safety-Gymnasium table: {missing_message()}")
        return
    print("\nnative (1 physics thread) vs Safety-Gymnasium 1.0.0 (1 worker process), same task and actions")
    print(f"{'scenario':<18} {'envs':>5} {'native/s':>9} {'SG shm/s':>9} {'SG pipe/s':>10} {'SG/native':>9} "
          f"{'reset ms native / SG':>21} {'make_env ms native / SG':>24} {'empty step us shm / pipe':>25}")
    for name in [s for s in args.scenarios if s in SG_NATIVE]:
        for n in args.envs:
            r = bench_sg(name, n, args.steps, args.repeats)
            print(f"{name:<18} {n:>5} {r['native_rate']:>9.0f} {r['shm_rate']:>9.0f} {r['pipe_rate']:>10.0f} "
                  f"{r['shm_rate'] / r['native_rate']:>9.3f} {r['native_reset_ms']:>10.2f} / {r['shm_reset_ms']:>8.1f} "
                  f"{r['native_make_ms']:>12.1f} / {r['shm_make_ms']:>9.1f} "
                  f"{r['shm_rtt_us']:>14.0f} / {r['pipe_rtt_us']:>7.0f}", flush=True)


if __name__ == "__main__":
    main()
