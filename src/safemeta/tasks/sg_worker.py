"""Safety-Gymnasium worker: batched reset/step of real Safety-Gymnasium 1.0.0 envs for safemeta.

safety-gymnasium 1.0.0 imports only on Python <= 3.10, so it runs in a separate process under the
worker environment's interpreter (built by `safemeta sg-setup`):

    <worker env>/bin/python sg_worker.py            # serve on stdin/stdout (started by sg_navigation)
    <worker env>/bin/python sg_worker.py --check    # build each task once; print versions (JSON)

This file runs under Python 3.10 and imports only the standard library and numpy at module level:
safemeta's own process imports it too, for the protocol below (`buffer_layout`, commands).

Protocol. Requests on stdin and replies on stdout are frames: 1 command or status byte, a 4-byte
little-endian length, that many payload bytes. The worker's stdout is kept for frames (anything
that prints, such as gymnasium-robotics on import, goes to stderr).
- INIT (JSON payload): task, copies, their seeds and the transport; builds the envs (task
  objects set before their first reset), replies OK with JSON (versions, observation size).
- RESET: start poses and goal buttons from the inputs; resets every copy; writes the outputs.
- POSE: puts every copy's robot at the input pose and planar velocity (and goal button, if >= 0)
  without rebuilding, as the native env's set_pose (hand-built states for the cross-check).
- STEP: actions and the active mask from the inputs; steps the active copies; writes the outputs.
- CLOSE: the worker exits (it also exits when stdin closes).
Replies: OK, or ERROR with a one-line message (the worker keeps serving; the client gives up).
Arrays (float64) live in one buffer laid out by `buffer_layout`: with transport "shm" it is a
shared-memory block the client creates, and frames carry no arrays; with "pipe" the request
payload is the input part of the buffer and the reply payload its output part.

What the worker changes in Safety-Gymnasium, at load time and never in its files: the skybox
texture (six PNGs, about 95% of a reset) is replaced by a built-in gradient; per task, the
circle radius, wall position, hazards (count, size, fixed locations), buttons (count, fixed
locations), placement extents, start pose (fixed location and rotation) and episode length are
set on the task objects before reset, with keep-out radii small enough that Safety-Gymnasium's
layout sampler always accepts the given layout on its first draw; after each reset the robot is put
exactly at its start (SG's placement of a fixed location jitters it by up to 1e-9 m) and the car
1e-7 m into the floor (`start_z`, as the native car: SG's exact touching start leaves MuJoCo's
first contacts to rounding).
"""
from __future__ import annotations

import json
import os
import struct
import sys
import time
from typing import Any

import numpy as np

INIT, RESET, POSE, STEP, CLOSE = b"I", b"R", b"P", b"S", b"C"
OK, ERROR = b"K", b"E"
_HEADER = struct.Struct("<cI")
INPUTS = ("action", "active", "start", "velocity", "goal_in")
OUTPUTS = ("obs", "reward", "cost", "terminated", "goal", "xy")
KEEPOUT = 1e-6          # keep-out of fixed objects: SG accepts the given layout at once
SG_ENV_IDS = {("circle", "point"): "SafetyPointCircle1-v0", ("circle", "car"): "SafetyCarCircle1-v0",
              ("button", "point"): "SafetyPointButton0-v0"}


def buffer_layout(num_envs: int, obs_dim: int, act_dim: int) -> tuple[dict[str, tuple[int, tuple[int, ...]]], int, int]:
    """name -> (offset in float64 items, shape); the number of input items (a prefix); the total."""
    shapes = {"action": (num_envs, act_dim), "active": (num_envs,), "start": (num_envs, 3), "velocity": (num_envs, 2), "goal_in": (num_envs,),
              "obs": (num_envs, obs_dim), "reward": (num_envs,), "cost": (num_envs,), "terminated": (num_envs,),
              "goal": (num_envs,), "xy": (num_envs, 2)}
    layout, offset, n_inputs = {}, 0, 0
    for name in INPUTS + OUTPUTS:
        layout[name] = (offset, shapes[name])
        offset += int(np.prod(shapes[name]))
        if name == INPUTS[-1]:
            n_inputs = offset
    return layout, n_inputs, offset


def views(buffer: Any, layout: dict[str, tuple[int, tuple[int, ...]]]) -> dict[str, np.ndarray]:
    flat = np.frombuffer(buffer, dtype=np.float64)
    return {name: flat[off: off + int(np.prod(shape))].reshape(shape) for name, (off, shape) in layout.items()}


def write_frame(stream: Any, code: bytes, payload: bytes = b"") -> None:
    stream.write(_HEADER.pack(code, len(payload)) + payload)
    stream.flush()


def read_exact(stream: Any, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = stream.read(left)
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(stream: Any) -> tuple[bytes, bytes]:
    code, length = _HEADER.unpack(read_exact(stream, _HEADER.size))
    return code, read_exact(stream, length) if length else b""


# --------------------------------------------------------------------------- Safety-Gymnasium side
def import_safety_gymnasium() -> Any:
    """Import safety_gymnasium with its world builder reading a built-in skybox instead of the PNGs."""
    import farama_notifications

    farama_notifications.notifications.pop("gymnasium_robotics", None)   # a notice about Adroit envs, not ours
    import safety_gymnasium
    import safety_gymnasium.world as world

    yaml = world.yaml

    class SkyboxFreeYaml:
        FullLoader = yaml.FullLoader

        @staticmethod
        def load(stream: Any, Loader: Any) -> Any:  # noqa: N803 (yaml's keyword)
            config = yaml.load(stream, Loader=Loader)
            if "skybox" in config.get("textures", {}):
                config["textures"]["skybox"] = {"@type": "skybox", "@builtin": "gradient", "@rgb1": "0.4 0.6 0.8",
                                                "@rgb2": "0 0 0", "@width": "32", "@height": "32"}
            return config

    world.yaml = SkyboxFreeYaml
    return safety_gymnasium


class Copies:
    """The worker's Safety-Gymnasium envs (one per copy) of one task."""

    def __init__(self, sg: Any, spec: dict[str, Any]) -> None:
        from safety_gymnasium.assets.geoms import Hazards

        self.key = self._task_key(spec)
        self.kind, robot, task = spec["kind"], spec["robot"], spec["task"]
        self.start_z = float(spec.get("start_z", 0.1))
        self.envs = []
        for seed in spec["seeds"]:
            env = sg.make(SG_ENV_IDS[(self.kind, robot)]).unwrapped   # the Builder, without wrappers
            t = env.task
            t.num_steps = 10 ** 9                 # episodes end where safemeta's clock says
            t.agent.keepout = KEEPOUT
            if self.kind == "circle":
                t.circle.radius = float(task["radius"])
                t.sigwalls.locate_factor = float(task["wall"])
                t.sigwalls.__post_init__()        # recompute the wall locations from locate_factor
            else:
                e = float(task["extent"])
                t.placements_conf.extents = [-e, -e, e, e]
                t.buttons.num, t.buttons.locations = len(task["buttons"]), [tuple(b) for b in task["buttons"]]
                t.buttons.size, t.buttons.keepout = float(task["button_size"]), KEEPOUT
                t.buttons.is_constrained = True   # as ButtonLevel1
                t.goal.keepout = 0.0              # placed anywhere, then moved onto the goal button
            if task["hazards"]:
                t._add_geoms(Hazards(num=len(task["hazards"]), size=float(task["hazard_size"]), keepout=KEEPOUT,
                                     locations=[tuple(h) for h in task["hazards"]]))
            t.build_observation_space()
            self.envs.append(env)
        self.obs_dim = int(self.envs[0].observation_space.shape[0])
        self.reseed(spec["seeds"])

    @staticmethod
    def _task_key(spec: dict[str, Any]) -> str:
        return json.dumps([spec["kind"], spec["robot"], spec["task"], spec.get("start_z"), len(spec["seeds"])],
                          sort_keys=True)

    def same_task(self, spec: dict[str, Any]) -> bool:
        return self._task_key(spec) == self.key

    def reseed(self, seeds: list[int]) -> None:
        """Seed every copy's generator (layout draws, frame skip, goal choices): a reused env then
        behaves as a new one (every reset rebuilds the world from the task objects)."""
        for env, seed in zip(self.envs, seeds):
            env.set_seed(int(seed))
        self.done = np.zeros(len(self.envs), bool)

    def reset(self, io: dict[str, np.ndarray]) -> None:
        for i, env in enumerate(self.envs):
            t = env.task
            x, y, heading = io["start"][i]
            t.agent.locations, t.agent.rot = [(float(x), float(y))], float(heading)
            t.placements_conf.placements = None   # rebuilt from the new start location
            env.reset()
            self._place(t, x, y, heading, (0.0, 0.0))
            self._start_episode(io, i, env, int(io["goal_in"][i]))

    def pose(self, io: dict[str, np.ndarray]) -> None:
        import mujoco

        for i, env in enumerate(self.envs):
            x, y, heading = io["start"][i]
            mujoco.mj_resetData(env.task.model, env.task.data)
            self._place(env.task, x, y, heading, io["velocity"][i])
            self._start_episode(io, i, env, int(io["goal_in"][i]))

    def _start_episode(self, io: dict[str, np.ndarray], i: int, env: Any, goal: int) -> None:
        if self.kind == "button":
            if goal >= 0:
                self._set_goal(env.task, goal)
            else:
                env.task.last_dist_goal = env.task.dist_goal()
        env.terminated = env.truncated = False
        self.done[i] = False
        self._write(io, i, env, env.task.obs(), 0.0, 0.0)

    def _place(self, t: Any, x: float, y: float, heading: float, velocity: Any) -> None:
        """The robot exactly at (x, y, heading) with planar velocity `velocity`, the rest at rest."""
        import mujoco

        m, d = t.model, t.data
        joint = m.body("agent").jntadr[0]
        adr, vadr = m.jnt_qposadr[joint], m.jnt_dofadr[joint]
        if m.jnt_type[joint] == mujoco.mjtJoint.mjJNT_FREE:   # car: absolute free-joint position and quaternion
            d.qpos[adr: adr + 7] = (x, y, self.start_z, np.cos(heading / 2), 0.0, 0.0, np.sin(heading / 2))
            d.qvel[vadr: vadr + 2] = velocity
        else:                                                 # point: slides along the axes of the body frame
            body = m.body("agent")
            body.pos[:2], body.quat[:] = (x, y), (np.cos(heading / 2), 0.0, 0.0, np.sin(heading / 2))
            d.qpos[adr: adr + 3] = 0.0
            c, s = np.cos(heading), np.sin(heading)
            d.qvel[vadr: vadr + 2] = (c * velocity[0] + s * velocity[1], -s * velocity[0] + c * velocity[1])
        d.qacc_warmstart[:] = 0.0   # as a fresh MjData: a reused env's first build ran one mj_forward more
        mujoco.mj_forward(m, d)

    @staticmethod
    def _set_goal(t: Any, k: int) -> None:
        """Make button k the goal (SG's build_goal_button with a given choice)."""
        import mujoco

        t.buttons.goal_button = k
        pos = t.buttons.pos[k]
        t.world_info.world_config_dict["geoms"]["goal"]["pos"][:2] = pos[:2]
        t._set_goal(pos[:2])
        mujoco.mj_forward(t.model, t.data)
        t.last_dist_goal = t.dist_goal()

    def step(self, io: dict[str, np.ndarray]) -> None:
        for i, env in enumerate(self.envs):
            if io["active"][i] and not self.done[i]:
                obs, reward, cost, terminated, truncated, _ = env.step(io["action"][i])
                self.done[i] = terminated or truncated
                self._write(io, i, env, obs, reward, cost)
            else:
                io["reward"][i] = io["cost"][i] = 0.0

    def _write(self, io: dict[str, np.ndarray], i: int, env: Any, obs: np.ndarray, reward: float, cost: float) -> None:
        io["obs"][i], io["reward"][i], io["cost"][i] = obs, reward, cost
        io["terminated"][i] = self.done[i]
        io["goal"][i] = env.task.buttons.goal_button if self.kind == "button" else -1
        io["xy"][i] = env.task.agent.pos[:2]


def versions() -> dict[str, str]:
    import gymnasium
    import mujoco
    import safety_gymnasium

    return {"python": "%d.%d.%d" % sys.version_info[:3], "safety_gymnasium": safety_gymnasium.__version__,
            "mujoco": mujoco.__version__, "gymnasium": gymnasium.__version__, "numpy": np.__version__}


def serve(requests: Any, replies: Any) -> None:
    sg = import_safety_gymnasium()
    copies, shm, io, buffer, n_inputs = None, None, None, None, 0
    while True:
        try:
            code, payload = read_frame(requests)
        except EOFError:
            return
        try:
            if code == CLOSE:
                return
            if code == INIT:
                spec = json.loads(payload)
                io, buffer = None, None                 # drop the views before closing the old block
                if shm is not None:
                    shm.close()
                    shm = None
                if copies is not None and copies.same_task(spec):
                    copies.reseed(spec["seeds"])        # the same task again: keep its envs
                else:
                    copies = None
                    copies = Copies(sg, spec)
                if copies.obs_dim != spec["obs_dim"]:
                    raise ValueError(f"Safety-Gymnasium's observation has {copies.obs_dim} entries, "
                                     f"safemeta expects {spec['obs_dim']}")
                layout, n_inputs, total = buffer_layout(len(spec["seeds"]), spec["obs_dim"], spec["act_dim"])
                if spec["shm"]:
                    shm = attach_shared_memory(spec["shm"])
                    buffer = shm.buf
                else:
                    buffer = bytearray(8 * total)
                io = views(buffer, layout)
                write_frame(replies, OK, json.dumps({"versions": versions(), "pid": os.getpid()}).encode())
                continue
            if copies is None:
                raise RuntimeError("the worker got a command before INIT")
            if shm is None and payload:   # pipe transport: the inputs come with the request
                memoryview(buffer)[: 8 * n_inputs] = payload
            if code == RESET:
                copies.reset(io)
            elif code == POSE:
                copies.pose(io)
            elif code == STEP:
                copies.step(io)
            else:
                raise RuntimeError(f"unknown command {code!r}")
            write_frame(replies, OK, b"" if shm is not None else bytes(memoryview(buffer)[8 * n_inputs:]))
        except Exception as exc:  # noqa: BLE001 - reported to the client, which raises it
            write_frame(replies, ERROR, f"{type(exc).__name__}: {exc}".replace("\n", " ").encode())


def attach_shared_memory(name: str) -> Any:
    """Attach the client's block without registering it with this process's resource tracker
    (the client owns and unlinks it; Python 3.10 would unlink it again at exit)."""
    from multiprocessing import resource_tracker, shared_memory

    shm = shared_memory.SharedMemory(name=name)
    resource_tracker.unregister(shm._name, "shared_memory")  # noqa: SLF001
    return shm


def check() -> dict[str, Any]:
    """Build each task kind once (a small layout), reset and step it; versions and reset times."""
    sg = import_safety_gymnasium()
    tasks = {
        ("circle", "point"): {"radius": 1.2, "wall": 0.8, "hazards": [], "hazard_size": 0.0},
        ("circle", "car"): {"radius": 0.9, "wall": 0.6, "hazards": [[0.3, 0.5]], "hazard_size": 0.15},
        ("button", "point"): {"extent": 2.0, "buttons": [[1.0, 1.0], [-1.0, 1.0]], "button_size": 0.1,
                              "hazards": [[0.0, -1.0]], "hazard_size": 0.2},
    }
    out: dict[str, Any] = {"versions": versions(), "reset_s": {}}
    for (kind, robot), task in tasks.items():
        copies = Copies(sg, {"kind": kind, "robot": robot, "task": task, "seeds": [0]})
        layout, _, total = buffer_layout(1, copies.obs_dim, 2)
        io = views(bytearray(8 * total), layout)
        io["start"][0], io["active"][0] = (0.1, -0.2, 0.5), 1.0
        start = time.perf_counter()
        copies.reset(io)
        out["reset_s"][SG_ENV_IDS[(kind, robot)]] = round(time.perf_counter() - start, 3)
        copies.step(io)
        if not np.isfinite(io["obs"]).all():
            raise RuntimeError(f"{SG_ENV_IDS[(kind, robot)]}: non-finite observation")
    return out


def main() -> None:
    requests = sys.stdin.buffer
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())      # prints of imported packages go to stderr
    if sys.argv[1:] == ["--check"]:
        replies.write((json.dumps(check()) + "\n").encode())
        return
    serve(requests, replies)


if __name__ == "__main__":
    main()
