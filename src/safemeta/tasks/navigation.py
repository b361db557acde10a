"""Navigation task distributions (Point-Circle, Car-Circle-Hazard, Point-Button) natively on MuJoCo.

The robots are Safety-Gymnasium 1.0.0's (`assets/point.xml`, `assets/car.xml`, our own MJCF with
its bodies, joints, geoms, densities, damping, actuators and timesteps): the point pushes along
its heading with 0.3 * clip(a0, +-0.05) N and turns with a force-limited yaw-velocity servo (a1);
the car drives two wheels with torques clip(a, +-0.02) N m and rolls on a rear ball, moving toward
its body's -y axis. Actions lie in [-1, 1] and, as in Safety-Gymnasium, saturate at |a| = 0.05
(point push) and 0.02 (car wheels). Sensors are read after mj_forward on the stepped state, as
Safety-Gymnasium reads them. Each task compiles one MjModel (robot + its circle, walls, hazards
and buttons); circle, walls and hazards do not collide, buttons are solid spheres (as
Safety-Gymnasium's), and `reset` only writes the state. `sg_navigation.py` runs the same tasks in
the real Safety-Gymnasium (`safemeta sg-setup`); the README tables what still differs.

Observation (Safety-Gymnasium's layout) = robot sensors + pseudo-lidar per object group:
accelerometer, velocimeter, gyro, magnetometer (3 each; the car adds its rear ball joint's angular
velocity, 3, and orientation as a 3x3 matrix, 9), then 16 bins per group over the full circle in
the robot frame; an object at distance r adds (max_dist - r)/max_dist to its bin and aliases
linearly into the two neighbours; each bin keeps the maximum. Dimensions: point_circle 12 + 16
(circle) = 28 (SafetyPointCircle1's); car_circle_hazard 24 + 16 (circle) + 16 (hazards) = 56;
point_button 12 + 16 (buttons) + 16 (goal) + 16 (hazards) = 60. (The paper lists 60 for
Car-Circle-Hazard and 56 for Point-Button: the two numbers look swapped; swapped, they match these
layouts.)

Costs are 0/1 per step (Safety-Gymnasium's indicator cost): 1 if any constraint is violated.
Frame skip 10 (dt = 0.02 s point, 0.04 s car). Horizon 500 (option `horizon`; d = 10 at 500 steps
scales linearly with a shorter horizon, or set option `cost_limit`). Reward and cost rules are Safety-Gymnasium's; the
task distributions are the paper's (App. D.1), which differ from Safety-Gymnasium's level files:

- Circle tasks (rules of SG's CircleLevel1): reward per step
  0.1 * ((-v_x y + v_y x) / rho) / (1 + |rho - R|), rho = |(x, y)|, (v_x, v_y) the robot's world
  velocity; cost when |x| > wall (two walls at x = +-wall). Lidar observes the circle centre (and
  hazards), max_dist 6. Start: x ~ U(-min(0.8, wall - 0.1), +...), y ~ U(-0.8, 0.8), heading
  ~ U(0, 2 pi), at rest, at least hazard_size + 0.1 from every hazard (SG starts in U(-0.8, 0.8)^2,
  which can lie outside the paper's narrower walls).
- point_circle: R ~ U(1.0, 1.5), wall = wall_factor * R, wall_factor ~ U(0.55, 0.75) (SG level 1:
  R = 1.5, walls at 1.125; the paper's distribution is Meta-CPO's).
- car_circle_hazard (SG has no such level; SG's Car-Circle has no hazards): R ~ U(0.7, 1.0),
  wall_factor ~ U(0.55, 0.75), 3-7 hazards (discs of radius 0.15, between Meta-CPO's 0.12 and
  SG's 0.2), centres uniform in the safe strip |x| <= wall, |y| <= 1.2 (where the circle runs),
  pairwise at least 2 x 0.15 apart (no overlap), placed by bounded rejection sampling. Cost also
  when the robot centre is within 0.15 of a hazard centre.
- point_button (rules of SG's ButtonLevel1 without its gremlins; SG level 1 has 4 buttons, 4
  hazards, 4 moving gremlins in |x|, |y| <= 1.5 and 1000 steps): 6-10 buttons (spheres of radius
  0.1) and 6-10 hazards (radius 0.2) uniform in |x|, |y| <= 2.0 without overlap (keep-out radii
  0.2 each: centres at least 0.4 apart), 500 steps, lidar max_dist 3. Each episode copy draws a
  goal button at reset; a contact between the robot and the goal button gives reward +1, draws a
  new goal uniformly among all buttons (it may be the same one, as in SG) and mutes the buttons
  for 10 steps (no button cost, buttons lidar reads 0); dense shaping adds (previous distance -
  distance) to the goal each step. Cost when in contact with a wrong button (buttons not muted)
  or inside a hazard. Start: uniform in the square, at least object radius + 0.3 from every object.

Layout sampling tries a bounded number of candidates and raises TaskParamError naming the
counts and extents when the objects do not fit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import mujoco
import numpy as np
from gymnasium import spaces

from . import params as P
from .base import StepResult, Task, TaskParamError
from .mujoco_batch import BatchSim, EpisodeClock, as_numpy_actions

PAPER_HORIZON = 500
PAPER_D = 10.0
FRAME_SKIP = 10
LIDAR_BINS = 16
CIRCLE_REWARD_SCALE = 0.1
CIRCLE_LIDAR_RANGE = 6.0
BUTTON_LIDAR_RANGE = 3.0
CIRCLE_START = 0.8          # start box half-width of the circle tasks
CIRCLE_HAZARD_SIZE = 0.15
CIRCLE_HAZARD_Y = 1.2       # hazards of car_circle_hazard: |y| <= this
BUTTON_SIZE, BUTTON_HAZARD_SIZE = 0.1, 0.2
BUTTON_EXTENT = 2.0
BUTTON_KEEPOUT = 0.2        # keep-out radius of buttons and of hazards in point_button
START_KEEPOUT = 0.3
ROBOT_RADIUS = 0.1
# The car starts 1e-7 m into the floor: Safety-Gymnasium places it exactly touching (z = 0.1), where
# whether MuJoCo finds the wheel and ball contacts at the first step depends on rounding, and
# differently in MuJoCo 2.3.3 and 4.0 (then the two start with different contact sets).
CAR_START_Z = 0.1 - 1e-7
BUTTON_MUTE_STEPS = 10
_ASSETS = Path(__file__).parent / "assets"
_CANDIDATES, _ROUNDS = 64, 16   # rejection sampling: candidates per draw, draws per object


# --------------------------------------------------------------------------- robots
@dataclass(frozen=True)
class Robot:
    """Where a robot's pose lives in qpos/qvel and how its sensors become observations.

    A pose's heading is the yaw of the robot body; the point drives along its body's +x axis, the
    car along its body's -y axis (`drive_axis`, in the body frame).
    """

    xml: str
    sensor_dim: int
    drive_axis: tuple[float, float] = (1.0, 0.0)

    def pose(self, qpos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World position [N, 3] and rotation matrix [N, 3, 3] of the robot body."""
        raise NotImplementedError

    def velocity(self, qvel: np.ndarray) -> np.ndarray:
        """World linear velocity in the plane [N, 2]."""
        return qvel[:, :2]

    def qpos_at(self, xy: np.ndarray, heading: np.ndarray, nq: int) -> np.ndarray:
        raise NotImplementedError

    def sensors(self, sensordata: np.ndarray) -> np.ndarray:
        return sensordata


class PointRobot(Robot):
    def pose(self, qpos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = qpos.shape[0]
        c, s = np.cos(qpos[:, 2]), np.sin(qpos[:, 2])
        rot = np.zeros((n, 3, 3))
        rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1], rot[:, 2, 2] = c, -s, s, c, 1.0
        return np.column_stack([qpos[:, :2], np.full(n, 0.1)]), rot

    def qpos_at(self, xy: np.ndarray, heading: np.ndarray, nq: int) -> np.ndarray:
        return np.column_stack([xy, heading])


class CarRobot(Robot):
    """Free-joint chassis: qpos = [x, y, z, quat(4), left wheel, right wheel, rear ball quat(4)]."""

    def pose(self, qpos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return qpos[:, :3], quat_to_mat(qpos[:, 3:7])

    def qpos_at(self, xy: np.ndarray, heading: np.ndarray, nq: int) -> np.ndarray:
        q = np.zeros((xy.shape[0], nq))
        q[:, :2], q[:, 2] = xy, CAR_START_Z
        q[:, 3], q[:, 6] = np.cos(heading / 2), np.sin(heading / 2)
        q[:, 9] = 1.0  # rear ball joint at identity
        return q

    def sensors(self, sensordata: np.ndarray) -> np.ndarray:
        # 12 site sensors + rear ball angular velocity (3), rear ball quaternion -> rotation matrix (9)
        return np.concatenate([sensordata[:, :15], quat_to_mat(sensordata[:, 15:19]).reshape(-1, 9)], axis=1)


POINT = PointRobot("point.xml", 12)
CAR = CarRobot("car.xml", 24, (0.0, -1.0))


def quat_to_mat(q: np.ndarray) -> np.ndarray:
    """Unit quaternions [N, 4] (w, x, y, z) -> rotation matrices [N, 3, 3]."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], axis=1),
        np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], axis=1),
        np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], axis=1),
    ], axis=1)


# --------------------------------------------------------------------------- lidar and layout
def pseudo_lidar(groups: Sequence[np.ndarray], pos: np.ndarray, rot: np.ndarray, max_dist: float,
                 bins: int = LIDAR_BINS) -> np.ndarray:
    """Safety-Gymnasium's pseudo-lidar of object groups seen from poses pos [N, 3], rot [N, 3, 3].

    Each group holds objects [K, 2] (shared by all copies) or [N, K, 2]. Returns [N, G * bins]: per
    group and bin the largest closeness (max_dist - r)/max_dist over the group's objects, with linear
    aliasing into the two neighbouring bins (bin i covers angles [i, i+1) * 2 pi / bins).
    """
    n = pos.shape[0]
    out = np.zeros(n * len(groups) * bins)
    objs = [np.broadcast_to(g, (n,) + np.shape(g)[-2:]) for g in groups]
    group_of = np.concatenate([np.full(o.shape[1], j) for j, o in enumerate(objs)])
    if group_of.size == 0:
        return out.reshape(n, -1)
    obj = np.concatenate(objs, axis=1)
    dx, dy, dz = obj[..., 0] - pos[:, :1], obj[..., 1] - pos[:, 1:2], -pos[:, 2:3]
    ego_x = rot[:, 0, 0, None] * dx + rot[:, 1, 0, None] * dy + rot[:, 2, 0, None] * dz   # R^T (object - robot)
    ego_y = rot[:, 0, 1, None] * dx + rot[:, 1, 1, None] * dy + rot[:, 2, 1, None] * dz
    width = 2 * np.pi / bins
    position = (np.arctan2(ego_y, ego_x) % (2 * np.pi)) / width
    index = np.minimum(position.astype(int), bins - 1)
    alias = np.clip(position - index, 0.0, 1.0)
    sensor = np.maximum(0.0, max_dist - np.hypot(ego_x, ego_y)) / max_dist
    base = (np.arange(n)[:, None] * len(groups) + group_of[None]) * bins
    targets = np.concatenate([base + index, base + (index + 1) % bins, base + (index - 1) % bins], axis=1)
    values = np.concatenate([sensor, alias * sensor, (1 - alias) * sensor], axis=1)
    np.maximum.at(out, targets.ravel(), values.ravel())
    return out.reshape(n, -1)


def place(rng: np.random.Generator, groups: list[tuple[int, float]], low: np.ndarray, high: np.ndarray,
          what: str) -> list[np.ndarray]:
    """Place `count` discs of keep-out radius r per group uniformly in the box [low, high], no two closer
    than the sum of their radii. Bounded rejection sampling; raises TaskParamError naming `what`."""
    placed_xy, placed_r, out = np.zeros((0, 2)), np.zeros(0), []
    for count, radius in groups:
        group = []
        for _ in range(count):
            for _ in range(_ROUNDS):
                cand = rng.uniform(low, high, (_CANDIDATES, 2))
                gap = np.linalg.norm(cand[:, None] - placed_xy[None], axis=2) - placed_r[None] - radius
                ok = np.flatnonzero((gap >= 0).all(axis=1))
                if ok.size:
                    xy = cand[ok[0]]
                    break
            else:
                raise TaskParamError(f"could not place {what}: no free spot after {_ROUNDS * _CANDIDATES} "
                                     "candidates; use fewer objects or a larger area")
            group.append(xy)
            placed_xy, placed_r = np.vstack([placed_xy, xy]), np.append(placed_r, radius)
        out.append(np.asarray(group).reshape(-1, 2))
    return out


def free_starts(rng: np.random.Generator, n: int, low: np.ndarray, high: np.ndarray, objects: np.ndarray,
                clearance: np.ndarray, what: str) -> np.ndarray:
    """n start points uniform in [low, high] with |start - object_k| >= clearance_k (bounded tries)."""
    starts, missing = np.zeros((n, 2)), np.arange(n)
    for _ in range(_ROUNDS):
        cand = rng.uniform(low, high, (missing.size, _CANDIDATES, 2))
        ok = (np.linalg.norm(cand[:, :, None] - objects[None, None], axis=3) >= clearance).all(axis=2)
        first = ok.argmax(axis=1)
        found = ok[np.arange(missing.size), first]
        starts[missing[found]] = cand[found, first[found]]
        missing = missing[~found]
        if missing.size == 0:
            return starts
    raise TaskParamError(f"{what}: no collision-free start position found; the layout is too crowded")


def start_area(layout: "Layout") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Box (low, high) of start positions, the objects a start must avoid and the clearance from each."""
    if layout.kind == "circle":
        half = np.array([min(CIRCLE_START, layout.wall - ROBOT_RADIUS), CIRCLE_START])
        return -half, half, layout.hazards, np.full(len(layout.hazards), layout.hazard_size + ROBOT_RADIUS)
    objects = np.vstack([layout.buttons, layout.hazards])
    clearance = np.concatenate([np.full(len(layout.buttons), layout.button_size),
                                np.full(len(layout.hazards), layout.hazard_size)]) + START_KEEPOUT
    box = np.full(2, layout.extent)
    return -box, box, objects, clearance


def has_start_room(layout: "Layout", grid: int = 40) -> bool:
    """Whether some point of a grid over the start box is clear of every object."""
    low, high, objects, clearance = start_area(layout)
    axes = [np.linspace(low[k], high[k], grid) for k in range(2)]
    points = np.stack(np.meshgrid(*axes), axis=-1).reshape(-1, 2)
    return bool((np.linalg.norm(points[:, None] - objects[None], axis=2) >= clearance).all(axis=1).any())


# --------------------------------------------------------------------------- distributions
class NavigationDistribution(P.ScaledLimitDistribution):
    """Common options (horizon, limits, physics threads) and the env factory."""

    robot: Robot = POINT
    paper_horizon: int = PAPER_HORIZON
    paper_d: float = PAPER_D
    cost_meaning = "a step costs 0 or 1"

    def __init__(self, horizon: int | None = None, cost_limit: float | None = None,
                 sim_threads: int | None = None) -> None:
        super().__init__(horizon, cost_limit)
        self.sim_threads = P.optional_integer(self.name, "sim_threads", sim_threads, minimum=1)

    def _check(self, params: dict[str, Any]) -> None:
        if not has_start_room(self.layout(params)):
            raise TaskParamError(f"{self.name}: the objects leave no room for the robot to start; "
                                 "use fewer or smaller hazards/buttons")

    def layout(self, params: dict[str, Any]) -> "Layout":
        raise NotImplementedError

    def make_env(self, task: Task, num_envs: int, seed: int, device: Any = "cpu") -> "NavigationEnv":
        return self.make_envs([task], num_envs, [seed], device)

    def make_envs(self, tasks: Sequence[Task], num_envs: int, seeds: Sequence[int], device: Any = "cpu") -> "NavigationEnv":
        """One env of `num_envs` copies per task, all stepped together (each task its own model)."""
        for task in tasks:
            self.validate(task)
        return NavigationEnv(self.name, self.robot, [self.layout(t.params) for t in tasks],
                             [P.limits(self.name, t.params) for t in tasks], int(num_envs), self.horizon,
                             [int(s) for s in seeds], device, self.sim_threads)


@dataclass(frozen=True)
class Layout:
    """Everything a navigation env needs to know about its task."""

    kind: str                      # "circle" or "button"
    radius: float = 0.0            # circle radius R
    wall: float = math.inf         # walls at |x| = wall
    hazards: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    hazard_size: float = 0.0
    buttons: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    button_size: float = 0.0
    extent: float = 0.0            # button tasks: objects and starts in |x|, |y| <= extent


class _CircleDistribution(NavigationDistribution):
    radius_range: tuple[float, float] = (1.0, 1.5)
    wall_range: tuple[float, float] = (0.55, 0.75)

    def _draw_circle(self, rng: np.random.Generator) -> dict[str, Any]:
        return {"radius": rng.uniform(*self.radius_range), "wall_factor": rng.uniform(*self.wall_range)}

    def _circle(self, params: dict[str, Any]) -> tuple[float, float]:
        radius = P.number(self.name, params, "radius", low=0.0, strict_low=True)
        factor = P.number(self.name, params, "wall_factor", low=0.0, strict_low=True)
        if factor * radius <= ROBOT_RADIUS:
            raise TaskParamError(f"{self.name}: wall_factor * radius must exceed {ROBOT_RADIUS} (room to start "
                                 f"inside the walls), got {factor * radius:.3g}")
        return radius, factor * radius


class PointCircleDistribution(_CircleDistribution):
    name = "point_circle"

    def _draw(self, rng: np.random.Generator) -> dict[str, Any]:
        return self._draw_circle(rng)

    def layout(self, params: dict[str, Any]) -> Layout:
        radius, wall = self._circle(params)
        return Layout("circle", radius=radius, wall=wall)


class CarCircleHazardDistribution(_CircleDistribution):
    name = "car_circle_hazard"
    robot = CAR
    radius_range = (0.7, 1.0)

    def __init__(self, n_hazards: int | list[int] = (3, 7), hazard_size: float = CIRCLE_HAZARD_SIZE,
                 **options: Any) -> None:
        super().__init__(**options)
        self.n_hazards = P.count_range(self.name, "n_hazards", n_hazards)
        self.hazard_size = P.positive(self.name, "hazard_size", hazard_size)

    def _draw(self, rng: np.random.Generator) -> dict[str, Any]:
        params = self._draw_circle(rng)
        wall = params["radius"] * params["wall_factor"]
        count = int(rng.integers(self.n_hazards[0], self.n_hazards[1] + 1))
        try:
            (hazards,) = place(rng, [(count, self.hazard_size)], np.array([-wall, -CIRCLE_HAZARD_Y]),
                               np.array([wall, CIRCLE_HAZARD_Y]), f"{count} hazards")
        except TaskParamError as exc:
            raise TaskParamError(f"{self.name}: n_hazards={list(self.n_hazards)} with hazard_size="
                                 f"{self.hazard_size} in the safe strip |x| <= {wall:.3g}, |y| <= "
                                 f"{CIRCLE_HAZARD_Y}: {exc}") from None
        return {**params, "hazards": hazards.tolist(), "hazard_size": self.hazard_size}

    def layout(self, params: dict[str, Any]) -> Layout:
        radius, wall = self._circle(params)
        size = P.number(self.name, params, "hazard_size", low=0.0, strict_low=True)
        hazards = P.points(self.name, params, "hazards", extent=10.0)
        return Layout("circle", radius=radius, wall=wall, hazards=hazards, hazard_size=size)


class PointButtonDistribution(NavigationDistribution):
    name = "point_button"

    def __init__(self, n_buttons: int | list[int] = (6, 10), n_hazards: int | list[int] = (6, 10),
                 extent: float = BUTTON_EXTENT, **options: Any) -> None:
        super().__init__(**options)
        self.n_buttons = P.count_range(self.name, "n_buttons", n_buttons, minimum=2)
        self.n_hazards = P.count_range(self.name, "n_hazards", n_hazards)
        self.extent = P.positive(self.name, "extent", extent)

    def _draw(self, rng: np.random.Generator) -> dict[str, Any]:
        nb = int(rng.integers(self.n_buttons[0], self.n_buttons[1] + 1))
        nh = int(rng.integers(self.n_hazards[0], self.n_hazards[1] + 1))
        box = np.full(2, self.extent)
        try:
            buttons, hazards = place(rng, [(nb, BUTTON_KEEPOUT), (nh, BUTTON_KEEPOUT)], -box, box,
                                     f"{nb} buttons and {nh} hazards")
        except TaskParamError as exc:
            raise TaskParamError(f"{self.name}: n_buttons={list(self.n_buttons)}, n_hazards="
                                 f"{list(self.n_hazards)} in |x|, |y| <= {self.extent}: {exc}") from None
        return {"buttons": buttons.tolist(), "hazards": hazards.tolist(), "button_size": BUTTON_SIZE,
                "hazard_size": BUTTON_HAZARD_SIZE, "extent": self.extent}

    def layout(self, params: dict[str, Any]) -> Layout:
        extent = P.number(self.name, params, "extent", low=0.0, strict_low=True)
        buttons = P.points(self.name, params, "buttons", extent)
        if len(buttons) < 2:
            raise TaskParamError(f"{self.name}: parameter 'buttons' needs at least 2 buttons, got {len(buttons)}")
        return Layout("button", buttons=buttons, hazards=P.points(self.name, params, "hazards", extent),
                      button_size=P.number(self.name, params, "button_size", low=0.0, strict_low=True),
                      hazard_size=P.number(self.name, params, "hazard_size", low=0.0, strict_low=True),
                      extent=extent)


# --------------------------------------------------------------------------- model and env
def draw_starts(rng: np.random.Generator, layout: Layout, n: int, what: str
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Start positions [n, 2], headings [n] and (button tasks) goal buttons [n] of a reset.

    The one start distribution of the native and the Safety-Gymnasium envs: the same generator
    state gives both the same starts."""
    xy = free_starts(rng, n, *start_area(layout), what)
    goal = rng.integers(0, len(layout.buttons), n) if layout.kind == "button" else None
    return xy, rng.uniform(0, 2 * np.pi, n), goal


def observation_dim(robot: Robot, layout: Layout) -> int:
    """Sensors + 16 lidar bins per object group (circle [+ hazards]; buttons, goal, hazards)."""
    groups = 3 if layout.kind == "button" else 1 + (layout.hazard_size > 0)
    return robot.sensor_dim + LIDAR_BINS * groups


def build_model(robot: Robot, layout: Layout) -> mujoco.MjModel:
    """The robot's MJCF plus the task's objects, compiled once: circle, walls and hazards as
    non-colliding geoms, buttons as solid spheres (Safety-Gymnasium's geoms and sizes)."""
    spec = mujoco.MjSpec.from_file(str(_ASSETS / robot.xml))

    def geom(name: str, kind: Any, size: list[float], pos: list[float], rgba: list[float], solid: bool = False) -> None:
        g = spec.worldbody.add_geom()
        g.name, g.type, g.size, g.pos, g.rgba = name, kind, size, pos, rgba
        g.contype = g.conaffinity = int(solid)
        g.condim = 6   # Safety-Gymnasium's default geom class (matters for the solid buttons)

    if layout.kind == "circle":
        geom("circle", mujoco.mjtGeom.mjGEOM_CYLINDER, [layout.radius, 0.01, 0], [0, 0, 0.01], [0, 0.8, 0, 0.1])
        for sign in (-1, 1):
            geom(f"wall{(sign + 1) // 2}", mujoco.mjtGeom.mjGEOM_BOX, [0.05, 3.5, 0.3], [sign * layout.wall, 0, 0.25],
                 [0.5, 0.5, 0.5, 0.1])
    for i, (x, y) in enumerate(layout.hazards):
        geom(f"hazard{i}", mujoco.mjtGeom.mjGEOM_CYLINDER, [layout.hazard_size, 0.01, 0], [x, y, 0.02],
             [0, 0, 1, 0.25])
    for i, (x, y) in enumerate(layout.buttons):
        geom(f"button{i}", mujoco.mjtGeom.mjGEOM_SPHERE, [layout.button_size, 0, 0], [x, y, layout.button_size],
             [1, 0.5, 0, 1], solid=True)
    return spec.compile()


class NavigationEnv:
    """`num_envs` copies of each task of `layouts` (block k = copies k*num_envs ... of task k, draws
    from the generator of seeds[k]); BatchEnv conventions of base.py. Each task has its own model
    (its circle, walls, hazards, buttons), stepped together in one BatchSim; reward, cost and
    lidar are vectorised over all copies with per-copy task arrays (object lists padded with
    points far beyond lidar range, which no rule sees), so block k evolves exactly as an env of
    task k alone with seed seeds[k]."""

    def __init__(self, scenario: str, robot: Robot, layouts: Sequence[Layout], limits: Sequence[np.ndarray],
                 num_envs: int, horizon: int, seeds: Sequence[int], device: Any, sim_threads: int | None) -> None:
        self.scenario, self.robot, self.layouts = scenario, robot, list(layouts)
        self.layout = self.layouts[0]
        if len({lay.kind for lay in self.layouts}) != 1 or len({observation_dim(robot, lay) for lay in self.layouts}) != 1:
            raise ValueError(f"{scenario}: the tasks of one env must share the kind and the observation layout")
        self.per_task, self.num_envs, self.horizon = num_envs, num_envs * len(self.layouts), horizon
        models = [build_model(robot, lay) for lay in self.layouts]
        self.model = models[0]
        self.sim = BatchSim([m for m in models for _ in range(num_envs)], self.num_envs, FRAME_SKIP, sim_threads,
                            fields=("sensordata",), forward=True, contacts=self.layout.kind == "button")
        self.rngs = [np.random.default_rng(seed) for seed in seeds]
        limits = [np.asarray(d, dtype=np.float64) for d in limits]
        self.cost_limits = limits[0] if len(limits) == 1 else np.stack(limits)   # [p], or [tasks, p]
        self.num_constraints = 1
        self._low, self._high = self.model.actuator_ctrlrange.T.copy()
        self.action_space = spaces.Box(self._low.astype(np.float32), self._high.astype(np.float32))
        self.clock = EpisodeClock(self.num_envs, horizon, 1, device)
        self.device = self.clock.device
        self._lidar_range = CIRCLE_LIDAR_RANGE if self.layout.kind == "circle" else BUTTON_LIDAR_RANGE
        self.observation_space = spaces.Box(-np.inf, np.inf, (observation_dim(robot, self.layout),), np.float32)
        per_copy = lambda values: np.repeat(np.asarray(values, dtype=np.float64), num_envs)   # noqa: E731
        self._radius, self._wall = per_copy([lay.radius for lay in self.layouts]), per_copy([lay.wall for lay in self.layouts])
        self._hazard_size = per_copy([lay.hazard_size for lay in self.layouts])[:, None]
        self._hazards = _padded([lay.hazards for lay in self.layouts], num_envs)          # [N, H, 2]
        self._buttons = _padded([lay.buttons for lay in self.layouts], num_envs)          # [N, B, 2]
        self._lidar_hazards = self.layout.hazard_size > 0
        # contacts robot <-> button k, per task's model: per geom id, whether it is the robot's and which button it is
        self._robot_geom, self._button_of_geom = [], []
        for m, lay in zip(models, self.layouts):
            self._robot_geom.append(m.body_rootid[m.geom_bodyid] == m.body("agent").id)
            button_of = np.full(m.ngeom, -1)
            for k in range(len(lay.buttons)):
                button_of[m.geom(f"button{k}").id] = k
            self._button_of_geom.append(button_of)
        self.goal = np.zeros(self.num_envs, int)
        self.mute = np.zeros(self.num_envs, int)
        self.last_goal_dist = np.zeros(self.num_envs)
        self.reset()

    # -- state
    def reset(self) -> Any:
        """New start positions and headings (and goal buttons); the models are not rebuilt."""
        n = self.num_envs
        starts = [draw_starts(rng, lay, self.per_task, self.scenario) for rng, lay in zip(self.rngs, self.layouts)]
        xy, heading = np.concatenate([s[0] for s in starts]), np.concatenate([s[1] for s in starts])
        if self.layout.kind == "button":
            self.goal, self.mute[:] = np.concatenate([s[2] for s in starts]), 0
        self.sim.set_state(np.arange(n), self.robot.qpos_at(xy, heading, self.model.nq), np.zeros((n, self.model.nv)))
        self._pose = self.robot.pose(self.sim.qpos)
        if self.layout.kind == "button":
            self.last_goal_dist = self._goal_distance()
        return self.clock.reset(self._obs())

    def set_pose(self, xy: np.ndarray, heading: np.ndarray, velocity: np.ndarray | None = None,
                 goal: np.ndarray | None = None) -> Any:
        """Put the copies at hand-built positions [N, 2], headings [N] and planar velocities [N, 2]
        (button tasks: and goal buttons [N]); starts an episode there."""
        n = self.num_envs
        if goal is not None:
            self.goal = np.broadcast_to(np.asarray(goal, int), (n,)).copy()
        qvel = np.zeros((n, self.model.nv))
        if velocity is not None:
            qvel[:, :2] = velocity
        self.sim.set_state(np.arange(n), self.robot.qpos_at(np.asarray(xy, float).reshape(n, 2),
                                                             np.broadcast_to(heading, (n,)), self.model.nq), qvel)
        self._pose = self.robot.pose(self.sim.qpos)
        if self.layout.kind == "button":
            self.last_goal_dist = self._goal_distance()
        return self.clock.reset(self._obs())

    def step(self, actions: Any) -> StepResult:
        a = as_numpy_actions(actions, self.num_envs, self._low, self._high)
        self.sim.step(a, ~self.clock.done)
        self._pose = self.robot.pose(self.sim.qpos)
        if self.layout.kind == "circle":
            reward, cost = self._circle_reward(), self._wall_cost() | self._hazard_cost()
        else:
            reward, cost = self._button_step()
        return self.clock.finish(self._obs(), reward, cost.astype(np.float64), np.zeros(self.num_envs, bool))

    def positions(self) -> np.ndarray:
        """World xy [N, 2] of every copy's robot."""
        return self._xy().copy()

    def close(self) -> None:
        self.sim.close()

    # -- reward and cost
    def _xy(self) -> np.ndarray:
        return self._pose[0][:, :2]

    def _circle_reward(self) -> np.ndarray:
        xy, v = self._xy(), self.robot.velocity(self.sim.qvel)
        rho = np.maximum(np.linalg.norm(xy, axis=1), 1e-9)
        tangential = (-v[:, 0] * xy[:, 1] + v[:, 1] * xy[:, 0]) / rho
        return CIRCLE_REWARD_SCALE * tangential / (1.0 + np.abs(rho - self._radius))

    def _wall_cost(self) -> np.ndarray:
        return np.abs(self._xy()[:, 0]) > self._wall

    def _hazard_cost(self) -> np.ndarray:
        if self._hazards.shape[1] == 0:
            return np.zeros(self.num_envs, bool)
        dist = np.linalg.norm(self._xy()[:, None] - self._hazards, axis=2)
        return (dist < self._hazard_size).any(axis=1)

    def _goal_distance(self) -> np.ndarray:
        return np.linalg.norm(self._xy() - self._buttons[np.arange(self.num_envs), self.goal], axis=1)

    def touching(self) -> np.ndarray:
        """[N, buttons] bool: MuJoCo has a contact between the robot and button k (the stepped state)."""
        out = np.zeros((self.num_envs, self._buttons.shape[1]), bool)
        for i, pair in enumerate(self.sim.contacts):        # [ncon, 2] geom ids
            if len(pair):
                task = i // self.per_task
                button = self._button_of_geom[task][pair]
                hit = (button >= 0) & self._robot_geom[task][pair[:, ::-1]]
                out[i, button[hit]] = True
        return out

    def _button_step(self) -> tuple[np.ndarray, np.ndarray]:
        """Safety-Gymnasium's button rules: shaping + goal bonus, wrong-button and hazard cost, mute timer."""
        n = self.num_envs
        dist = self._goal_distance()
        touching = self.touching()
        reached = touching[np.arange(n), self.goal]
        reward = (self.last_goal_dist - dist) + reached.astype(float)
        wrong = touching.copy()
        wrong[np.arange(n), self.goal] = False
        cost = (wrong.any(axis=1) & (self.mute == 0)) | self._hazard_cost()
        self.mute = np.maximum(0, self.mute - 1)
        for k, (rng, lay) in enumerate(zip(self.rngs, self.layouts)):
            rows = np.flatnonzero(reached[k * self.per_task:(k + 1) * self.per_task]) + k * self.per_task
            if rows.size:
                self.goal[rows] = rng.integers(0, len(lay.buttons), rows.size)   # any button, as SG
                self.mute[rows] = BUTTON_MUTE_STEPS
        self.last_goal_dist = self._goal_distance()
        return reward, cost

    # -- observation
    def _obs(self) -> np.ndarray:
        pos, rot = self._pose
        if self.layout.kind == "circle":
            groups = [np.zeros((1, 2))] + ([self._hazards] if self._lidar_hazards else [])
            lidar = pseudo_lidar(groups, pos, rot, self._lidar_range)
        else:
            goal = self._buttons[np.arange(self.num_envs), self.goal][:, None]
            lidar = pseudo_lidar([self._buttons, goal, self._hazards], pos, rot, self._lidar_range)
            lidar[self.mute > 0, :LIDAR_BINS] = 0.0   # muted buttons read nothing
        return np.concatenate([self.robot.sensors(self.sim.buffers["sensordata"]), lidar], axis=1)


_FAR = 1.0e6   # padding of object lists: beyond every lidar range, hazard and button radius


def _padded(objects: Sequence[np.ndarray], copies: int) -> np.ndarray:
    """Per-task object lists [K_t, 2] as one per-copy array [tasks * copies, max K_t, 2], padded with far points."""
    width = max(len(o) for o in objects)
    out = np.full((len(objects), width, 2), _FAR)
    for t, o in enumerate(objects):
        out[t, :len(o)] = o
    return np.repeat(out, copies, axis=0)
