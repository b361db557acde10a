"""Throughput of the task environments.

MuJoCo scenarios: env-steps/s of the sampling code itself (`rollout.collect_tasks`: a fresh
policy network's forward pass and draws every step, the BatchEnv, the Batch bookkeeping), for
one task with N copies and for several tasks in one batch (`make_envs`, "10x10": 10 tasks x 10
copies, a meta-iteration's batch at navigation sizes), against references measured in the same
run, interleaved, best of `--repeats`, at the same thread count:
- raw: a bare `mj_step(nstep=frame_skip)` loop on one MjData per thread (random controls,
  reset at the horizon or, humanoid, when unhealthy): physics with nothing else;
- rollout: `mujoco.rollout` (C++ loop over the copies, open-loop random controls, one MjData per
  thread), the simulator's own batched stepping;
- per-task (multi-task rows): the same tasks collected one after another, one env each (main's
  path before issue 15);
- gymnasium (locomotion): gymnasium's SyncVectorEnv of N v5 envs of the same model, random
  actions, no policy (the ecosystem's reference; Safety-Gymnasium's navigation has no Python
  3.11 release, see `--sg`).
Ratios: batched / raw (issue 15's goal: >= 0.85 at 10x10), / rollout, / per-task, / gymnasium.
One thread is timed in CPU seconds of this process (the shared machine's other load matters
less), more threads in wall seconds. Also the time of one `reset()` of all copies and of
`make_env(s)`. For the torch tasks: env-steps/s on CPU (and CUDA when present), with and
without autograd.

Safety-Gymnasium (`--sg`, needs `safemeta sg-setup`): per navigation scenario, the native env
(one physics thread) and its sg_* twin (one worker process, same task, same random actions) side
by side: env-steps/s, their ratio, reset and make_env times (make_env of the same task again:
the pooled worker keeps its envs), for both transports (shared memory, pipes), and the round
trip of one empty step (no copy active) through each transport.

    .venv/bin/python benchmarks/bench_envs.py                 # full table
    .venv/bin/python benchmarks/bench_envs.py --quick         # a few seconds
    .venv/bin/python benchmarks/bench_envs.py --scenarios point_circle --layouts 1x64 10x10 --threads 1 2
    .venv/bin/python benchmarks/bench_envs.py --sg --layouts 1x10            # native vs Safety-Gymnasium only
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
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
GYMNASIUM = {"half_cheetah_vel": "HalfCheetah-v5", "hopper_vel": "Hopper-v5", "swimmer_vel": "Swimmer-v5",
             "humanoid_dir": "Humanoid-v5"}


class Timer:
    """Seconds of the process's CPU (one thread) or of the wall (threaded physics)."""

    def __init__(self, threads: int) -> None:
        self.clock = time.process_time if threads == 1 else time.perf_counter


def batched_rate(env, policies, steps: int, timer: Timer) -> float:
    """Env-steps/s of `collect_tasks` on env (all its tasks), counting the steps of live copies."""
    from safemeta.rollout import collect_tasks

    counted, start = 0, timer.clock()
    while counted < steps:
        gens = [torch.Generator().manual_seed(k) for k in range(len(policies))]
        counted += sum(int(b.alive.sum()) for b in collect_tasks(env, policies, gens, 0.99))
    return counted / (timer.clock() - start)


def per_task_rate(envs, policy, steps: int, timer: Timer) -> float:
    """The same tasks collected one after another, one env each."""
    from safemeta.rollout import collect

    counted, start = 0, timer.clock()
    while counted < steps:
        for k, env in enumerate(envs):
            counted += int(collect(env, policy, torch.Generator().manual_seed(k), 0.99).alive.sum())
    return counted / (timer.clock() - start)


def raw_rate(model: mujoco.MjModel, frame_skip: int, controls: np.ndarray, horizon: int, healthy, threads: int,
             timer: Timer) -> float:
    """Env-steps/s of bare mj_step(nstep=frame_skip) on one MjData per thread (reset at the horizon
    or when unhealthy), `threads` loops at once."""
    def loop(d: mujoco.MjData) -> None:
        for t, c in enumerate(controls):
            d.ctrl[:] = c
            mujoco.mj_step(model, d, nstep=frame_skip)
            if (t + 1) % horizon == 0 or (healthy is not None and not healthy(d)):
                mujoco.mj_resetData(model, d)

    datas = [mujoco.MjData(model) for _ in range(threads)]
    start = timer.clock()
    if threads == 1:
        loop(datas[0])
    else:
        workers = [threading.Thread(target=loop, args=(d,)) for d in datas]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    return threads * len(controls) / (timer.clock() - start)


def rollout_rate(env, horizon: int, threads: int, timer: Timer) -> float:
    """Env-steps/s of mujoco.rollout over the env's copies from their reset states, one horizon of
    open-loop random controls held for frame_skip substeps."""
    from mujoco import rollout

    sim = env.sim
    spec = mujoco.mjtState.mjSTATE_FULLPHYSICS
    env.reset()
    models = sim.models
    state = np.stack([_state(m, sim.data(i), spec) for i, m in enumerate(models)])
    low, high = env.action_space.low.astype(np.float64), env.action_space.high.astype(np.float64)
    rng = np.random.default_rng(0)
    control = np.repeat(rng.uniform(low, high, (sim.num_envs, horizon, low.shape[0])), sim.frame_skip, axis=1)
    datas = [mujoco.MjData(models[0]) for _ in range(threads)]
    start = timer.clock()
    try:
        rollout.rollout(models, datas if threads > 1 else datas[0], state, control)
    except mujoco.FatalError as exc:   # random open-loop controls can reach a degenerate contact
        print(f"# {env.__class__.__name__}: mujoco.rollout failed ({exc}); its column is nan", file=sys.stderr)
        return float("nan")
    return sim.num_envs * horizon / (timer.clock() - start)


def _state(model: mujoco.MjModel, data: mujoco.MjData, spec) -> np.ndarray:
    out = np.empty(mujoco.mj_stateSize(model, spec))
    mujoco.mj_getState(model, data, out, spec)
    return out


def gym_rate(env_id: str, num_envs: int, steps: int, timer: Timer) -> float:
    import gymnasium

    vec = gymnasium.vector.SyncVectorEnv([lambda: gymnasium.make(env_id) for _ in range(num_envs)])
    vec.reset(seed=0)
    rng = np.random.default_rng(0)
    space = vec.single_action_space
    actions = rng.uniform(space.low, space.high, (max(steps // num_envs, 1), num_envs, space.shape[0]))
    start = timer.clock()
    for a in actions:
        vec.step(a)
    rate = len(actions) * num_envs / (timer.clock() - start)
    vec.close()
    return rate


def bench_mujoco(name: str, tasks: int, copies: int, threads: int, steps: int, repeats: int, gym: bool) -> dict:
    from safemeta.config import check_block
    from safemeta.policies import policy_for

    dist = get_distribution(name, sim_threads=threads)
    task_list = dist.sample(tasks, seed=0)
    t0 = time.perf_counter()
    env = dist.make_envs(task_list, copies, list(range(tasks))) if tasks > 1 else dist.make_env(task_list[0], copies, 0)
    make_ms = (time.perf_counter() - t0) * 1e3
    options = check_block({}, "scenario", "")["policy"]
    torch.manual_seed(0)
    policy = policy_for(env.observation_space, env.action_space, tuple(options["hidden"]), options["init_log_std"])
    singles = [dist.make_env(t, copies, k) for k, t in enumerate(task_list)] if tasks > 1 else None
    low, high = env.action_space.low, env.action_space.high
    controls = np.random.default_rng(0).uniform(low, high, (max(steps // 4, 2000), low.shape[0]))
    healthy = (lambda d: 1.0 < d.qpos[2] < 2.0) if name == "humanoid_dir" else None
    timer = Timer(threads)
    out: dict[str, list[float]] = {"batched": [], "raw": [], "rollout": [], "per_task": [], "gym": []}
    for _ in range(repeats):
        out["batched"].append(batched_rate(env, [policy] * tasks, steps, timer))
        out["raw"].append(raw_rate(env.model, env.sim.frame_skip, controls, env.horizon, healthy, threads, timer))
        out["rollout"].append(rollout_rate(env, min(env.horizon, max(steps // env.num_envs, 20)), threads, timer))
        if singles:
            out["per_task"].append(per_task_rate(singles, policy, steps, timer))
        if gym and name in GYMNASIUM:
            out["gym"].append(gym_rate(GYMNASIUM[name], tasks * copies, steps, timer))
    resets = []
    for _ in range(max(3, repeats)):
        t0 = time.perf_counter()
        env.reset()
        resets.append(time.perf_counter() - t0)
    env.close()
    best = {k: max((x for x in v if x == x), default=float("nan")) for k, v in out.items()}   # best non-nan
    return {**best, "reset_ms": 1e3 * min(resets), "make_ms": make_ms, "threads": env.sim.threads}


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


def action_rate(env, actions: torch.Tensor) -> float:
    """Env-steps/s of the BatchEnv under fixed actions; only copies still running count; a fully
    terminated batch is reset."""
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
        out[f"{label}_rate"] = max(action_rate(env, actions) for _ in range(repeats))
        out[f"{label}_reset_ms"] = 1e3 * timed(env.reset, max(3, repeats))
        if label != "native":
            out[f"{label}_rtt_us"] = 1e6 * empty_round_trip(env)
        env.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", nargs="+", default=MUJOCO + TORCH, help="scenarios to measure")
    parser.add_argument("--layouts", nargs="+", default=["1x10", "1x40", "1x64", "1x400", "10x10"],
                        help="MuJoCo batches, TASKSxCOPIES")
    parser.add_argument("--threads", nargs="+", default=["1", "auto"], help="physics threads per env ('auto' = usable CPUs, <= 4)")
    parser.add_argument("--steps", type=int, default=20000, help="env-steps per timed MuJoCo run (at least one horizon)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions (best is reported)")
    parser.add_argument("--no-gym", action="store_true", help="leave out gymnasium's vector env")
    parser.add_argument("--torch-envs", type=int, default=4096, help="batch size of the torch tasks")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch CPU threads for the torch tasks")
    parser.add_argument("--quick", action="store_true", help="short runs: 4000 steps, 1 repeat, 1024 torch envs")
    parser.add_argument("--sg", action="store_true", help="only the native vs Safety-Gymnasium worker table")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats, args.torch_envs = 4000, 1, 1024
    threads = sorted({default_threads() if t == "auto" else int(t) for t in args.threads})
    layouts = [tuple(int(x) for x in lay.split("x")) for lay in args.layouts]
    torch.set_num_threads(1)

    print(f"MuJoCo {mujoco.__version__}, torch {torch.__version__} (1 thread), usable CPUs {default_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}; >= {args.steps} env-steps per run, best of {args.repeats}")
    if args.sg:
        print_sg_table(args)
        return
    print("env-steps/s (1 thread: per CPU second; more: per wall second); batched = collect_tasks incl. the policy")
    print(f"{'scenario':<18} {'tasks x N':>9} {'thr':>4} {'batched/s':>10} {'raw/s':>9} {'rollout/s':>10} "
          f"{'per-task/s':>10} {'gym/s':>8} {'/raw':>5} {'/rollout':>8} {'/per-task':>9} {'/gym':>5} "
          f"{'reset ms':>9} {'make ms':>8}")
    for name in [s for s in args.scenarios if s in MUJOCO]:
        for tasks, copies in layouts:
            for th in threads:
                r = bench_mujoco(name, tasks, copies, th, args.steps, args.repeats, not args.no_gym)
                b = r["batched"]
                print(f"{name:<18} {f'{tasks}x{copies}':>9} {r['threads']:>4} {b:>10.0f} {r['raw']:>9.0f} "
                      f"{r['rollout']:>10.0f} {r['per_task']:>10.0f} {r['gym']:>8.0f} {b / r['raw']:>5.2f} "
                      f"{b / r['rollout']:>8.2f} {b / r['per_task']:>9.2f} {b / r['gym']:>5.2f} "
                      f"{r['reset_ms']:>9.2f} {r['make_ms']:>8.1f}", flush=True)

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
        for n in sorted({int(lay.split("x")[1]) for lay in args.layouts if lay.startswith("1x")}):
            r = bench_sg(name, n, max(args.steps // n, 50), args.repeats)
            print(f"{name:<18} {n:>5} {r['native_rate']:>9.0f} {r['shm_rate']:>9.0f} {r['pipe_rate']:>10.0f} "
                  f"{r['shm_rate'] / r['native_rate']:>9.3f} {r['native_reset_ms']:>10.2f} / {r['shm_reset_ms']:>8.1f} "
                  f"{r['native_make_ms']:>12.1f} / {r['shm_make_ms']:>9.1f} "
                  f"{r['shm_rtt_us']:>14.0f} / {r['pipe_rtt_us']:>7.0f}", flush=True)


if __name__ == "__main__":
    main()
