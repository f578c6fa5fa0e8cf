"""A procedural driving world: a curved road, sidewalks, terrain, buildings, trees, poles,
barriers, cones, parked and moving cars, a truck and walking pedestrians.

The road is a circular arc (radius R, turning left or right). Road coordinates are (s, lat):
arc length along the centre line and lateral offset, positive to the left of the driving
direction. The ego drives in the right lane (lat = -2 m). Every object is a few primitives
with one semantic class (nuScenes general category), one instance id and a class-specific
colour and texture. Deterministic for a seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hilda.datasets.classes import GENERAL_INDEX
from hilda.datasets.synthetic.raycast import KIND_BOX, KIND_CYLINDER, KIND_SPHERE, Primitives
from hilda.geometry import make_transform, yaw_matrix

ROAD_HALF_WIDTH = 4.0
SIDEWALK_OUTER = 7.0
EGO_LANE = -2.0

# Texture ids (shading in render.py).
TEX_PLAIN, TEX_FACADE, TEX_FOLIAGE, TEX_BODY, TEX_STRIPES, TEX_METAL = range(6)

# class name -> (base RGB, texture, LiDAR reflectivity)
CLASS_STYLE: dict[str, tuple[tuple[float, float, float], int, float]] = {
    "flat.driveable_surface": ((0.24, 0.24, 0.26), TEX_PLAIN, 0.12),
    "flat.sidewalk": ((0.62, 0.58, 0.55), TEX_PLAIN, 0.25),
    "flat.terrain": ((0.36, 0.48, 0.20), TEX_PLAIN, 0.20),
    "static.manmade": ((0.72, 0.52, 0.38), TEX_FACADE, 0.35),
    "static.vegetation": ((0.12, 0.42, 0.12), TEX_FOLIAGE, 0.30),
    "vehicle.car": ((0.70, 0.10, 0.10), TEX_METAL, 0.55),
    "vehicle.truck": ((0.15, 0.30, 0.65), TEX_METAL, 0.50),
    "human.pedestrian.adult": ((0.85, 0.70, 0.20), TEX_BODY, 0.30),
    "movable_object.barrier": ((0.90, 0.90, 0.92), TEX_STRIPES, 0.70),
    "movable_object.trafficcone": ((1.00, 0.45, 0.00), TEX_STRIPES, 0.80),
}
POLE_COLOR = (0.45, 0.45, 0.50)


@dataclass(frozen=True)
class Road:
    center: np.ndarray  # (2,) centre of the arc, global
    radius: float
    turn: int  # +1 left, -1 right
    theta0: float  # polar angle of s = 0 around the centre

    def point(self, s: np.ndarray | float, lat: np.ndarray | float) -> np.ndarray:
        """Global (..., 2) position of road coordinates (s, lat)."""
        s, lat = np.asarray(s, dtype=np.float64), np.asarray(lat, dtype=np.float64)
        theta = self.theta0 + self.turn * s / self.radius
        r = self.radius - self.turn * lat
        return np.stack(
            [self.center[0] + r * np.cos(theta), self.center[1] + r * np.sin(theta)], -1
        )

    def heading(self, s: np.ndarray | float) -> np.ndarray:
        """Yaw of the driving direction at arc length s."""
        return self.theta0 + self.turn * np.asarray(s) / self.radius + self.turn * np.pi / 2

    def lateral(self, xy: np.ndarray) -> np.ndarray:
        """Lateral offset of global (..., 2) points."""
        d = np.linalg.norm(xy - self.center, axis=-1)
        return self.turn * (self.radius - d)

    def along(self, xy: np.ndarray) -> np.ndarray:
        """Arc length s of global (..., 2) points."""
        ang = np.arctan2(xy[..., 1] - self.center[1], xy[..., 0] - self.center[0])
        dtheta = (ang - self.theta0 + np.pi) % (2 * np.pi) - np.pi
        return self.turn * dtheta * self.radius


@dataclass(frozen=True)
class Mover:
    """An object moving along the road at constant speed: its parts are relative boxes."""

    s0: float
    lat: float  # lateral offset of its path
    speed: float  # along +s (negative: against the ego's direction)
    parts: tuple[tuple[int, tuple[float, float, float], tuple[float, float, float]], ...]
    # each part: (kind, local centre (forward, left, up), size)
    label: int
    instance: int
    color: tuple[float, float, float]
    texture: int


@dataclass
class World:
    road: Road
    ego_speed: float
    start_us: int
    static: Primitives
    movers: list[Mover] = field(default_factory=list)

    def ego_to_global(self, t_us: int) -> np.ndarray:
        """(4, 4) ego pose at time t (microseconds): on the ego lane, heading along the road."""
        lane_radius = self.road.radius - self.road.turn * EGO_LANE
        # ego_speed is the speed along the ego lane; s is measured on the centre line.
        s = self.ego_speed * (t_us - self.start_us) * 1e-6 * self.road.radius / lane_radius
        xy = self.road.point(s, EGO_LANE)
        return make_transform(yaw_matrix(float(self.road.heading(s))), np.array([*xy, 0.0]))

    def primitives_at(self, t_us: int) -> Primitives:
        """Static primitives plus the movers at their positions at time t."""
        dt = (t_us - self.start_us) * 1e-6
        rows: list[tuple] = []
        for m in self.movers:
            s = m.s0 + m.speed * dt
            yaw = float(self.road.heading(s)) + (np.pi if m.speed < 0 else 0.0)
            xy = self.road.point(s, m.lat)
            rot = yaw_matrix(yaw)
            for kind, local, size in m.parts:
                c = np.array([*xy, 0.0]) + rot @ np.asarray(local)
                rows.append((kind, c, size, yaw, m.label, m.instance, m.color, m.texture))
        return concat(self.static, _pack(rows))


def _pack(rows: list[tuple]) -> Primitives:
    if not rows:
        return Primitives(
            kind=np.zeros(0, np.int64),
            center=np.zeros((0, 3)),
            size=np.zeros((0, 3)),
            yaw=np.zeros(0),
            label=np.zeros(0, np.uint8),
            instance=np.zeros(0, np.int32),
            color=np.zeros((0, 3)),
            texture=np.zeros(0, np.int64),
        )
    kind, center, size, yaw, label, inst, color, tex = zip(*rows, strict=True)
    return Primitives(
        kind=np.array(kind, np.int64),
        center=np.array(center, np.float64),
        size=np.array(size, np.float64),
        yaw=np.array(yaw, np.float64),
        label=np.array(label, np.uint8),
        instance=np.array(inst, np.int32),
        color=np.array(color, np.float64),
        texture=np.array(tex, np.int64),
    )


def concat(a: Primitives, b: Primitives) -> Primitives:
    return Primitives(
        **{k: np.concatenate([getattr(a, k), getattr(b, k)]) for k in a.__dataclass_fields__}
    )


def ground_label(road: Road, xy: np.ndarray) -> np.ndarray:
    """General-category label of ground points at global (..., 2) positions."""
    lat = np.abs(road.lateral(xy))
    out = np.full(lat.shape, GENERAL_INDEX["flat.terrain"], dtype=np.uint8)
    out[lat <= SIDEWALK_OUTER] = GENERAL_INDEX["flat.sidewalk"]
    out[lat <= ROAD_HALF_WIDTH] = GENERAL_INDEX["flat.driveable_surface"]
    return out


def _jitter(rng: np.random.Generator, rgb: tuple[float, float, float], amount: float = 0.08):
    return tuple(np.clip(np.asarray(rgb) + rng.uniform(-amount, amount, 3), 0, 1))


def car_parts(length: float, width: float, height: float):
    """Body and cabin boxes of a car, in the car frame (forward, left, up)."""
    body_h = 0.55 * height
    return (
        (KIND_BOX, (0.0, 0.0, 0.25 + body_h / 2), (length / 2, width / 2, body_h / 2)),
        (
            KIND_BOX,
            (-0.1 * length, 0.0, 0.25 + body_h + (height - 0.25 - body_h) / 2),
            (0.28 * length, 0.45 * width, (height - 0.25 - body_h) / 2),
        ),
        (KIND_BOX, (0.0, 0.0, 0.125), (length / 2 - 0.3, width / 2 - 0.1, 0.125)),
    )


def make_world(seed: int, scene_index: int, duration_s: float, start_us: int) -> World:
    """Build scene ``scene_index`` of the world of ``seed`` (covering ``duration_s`` of driving)."""
    rng = np.random.default_rng([seed, scene_index])
    road = _road(rng)
    ego_speed = float(rng.uniform(4.0, 8.0))
    scene = _SceneBuilder(rng, road, -50.0, ego_speed * duration_s + 70.0)
    # The order of the draws is the world: a seed gives the same scene only in this order.
    for side in (-1, 1):
        scene.buildings(side)
        scene.trees(side)
        scene.poles(side)
        scene.parked_cars(side)
        if side == 1:
            s_truck = float(rng.uniform(scene.s_lo + 20, scene.s_hi - 20))
            scene.place(KIND_BOX, s_truck, 3.8, 1.8, (4.5, 1.2, 1.5), 0.0, "vehicle.truck")
        scene.barriers_and_cones(side)
    movers = scene.traffic(ego_speed) + scene.pedestrians()
    return World(
        road=road, ego_speed=ego_speed, start_us=start_us, static=_pack(scene.rows), movers=movers
    )


def scene_road(seed: int, scene_index: int) -> Road:
    """The road of scene ``scene_index`` (the first draws of ``make_world``), without the
    objects: what a map of all scenes needs."""
    return _road(np.random.default_rng([seed, scene_index]))


def _road(rng: np.random.Generator) -> Road:
    radius = float(rng.uniform(90.0, 220.0))
    turn = int(rng.choice([-1, 1]))
    origin = rng.uniform([150.0, 150.0], [350.0, 350.0])  # global map coordinates, metres
    theta0 = float(rng.uniform(-np.pi, np.pi))
    center = origin - radius * np.array([np.cos(theta0), np.sin(theta0)])
    return Road(center=center, radius=radius, turn=turn, theta0=theta0)


def _style(name: str) -> tuple[int, tuple[float, float, float], int]:
    """(general label, colour, texture) of a class."""
    rgb, tex, _ = CLASS_STYLE[name]
    return GENERAL_INDEX[name], rgb, tex


class _SceneBuilder:
    """Places one scene's objects along the road between arc lengths ``s_lo`` and ``s_hi``:
    static rows (kind, centre, size, yaw, label, instance, colour, texture) and movers."""

    def __init__(self, rng: np.random.Generator, road: Road, s_lo: float, s_hi: float) -> None:
        self.rng, self.road, self.s_lo, self.s_hi = rng, road, s_lo, s_hi
        self.rows: list[tuple] = []
        self._instances = iter(range(1, 1_000_000))

    def instance(self) -> int:
        return next(self._instances)

    def row(self, kind, center, size, yaw, label, inst, color, tex) -> None:
        self.rows.append((kind, center, size, yaw, label, inst, color, tex))

    def place(self, kind, s, lat, z, size, yaw_off, name, color=None, inst=None) -> None:
        """One object at arc length ``s``, lateral offset ``lat``, facing along the road."""
        label, rgb, tex = _style(name)
        xy = self.road.point(s, lat)
        yaw = float(self.road.heading(s)) + yaw_off
        inst = inst if inst is not None else self.instance()
        color = color if color is not None else _jitter(self.rng, rgb)
        self.row(kind, np.array([*xy, z]), size, yaw, label, inst, color, tex)

    def buildings(self, side: int) -> None:
        """A row of boxes behind the sidewalk, facing the road."""
        rng, s = self.rng, self.s_lo + self.rng.uniform(0, 6)
        while s < self.s_hi:
            length = rng.uniform(6.0, 16.0)
            depth = rng.uniform(6.0, 12.0)
            height = rng.uniform(5.0, 18.0)
            setback = rng.uniform(10.0, 14.0)
            lat, size = side * (setback + depth / 2), (length / 2, depth / 2, height / 2)
            self.place(KIND_BOX, s + length / 2, lat, height / 2, size, 0.0, "static.manmade")
            s += length + rng.uniform(1.0, 6.0)

    def trees(self, side: int) -> None:
        """Trunk and crown between the sidewalk and the buildings."""
        rng, s = self.rng, self.s_lo + self.rng.uniform(0, 8)
        while s < self.s_hi:
            label, rgb, tex = _style("static.vegetation")
            inst = self.instance()
            lat = side * rng.uniform(7.8, 9.2)
            trunk_h = rng.uniform(1.8, 3.0)
            crown = rng.uniform(1.2, 2.2)
            xy = self.road.point(s, lat)
            bark = _jitter(rng, (0.35, 0.25, 0.15), 0.04)
            self.row(
                KIND_CYLINDER,
                np.array([*xy, 0.0]),
                (0.18, trunk_h, 0.0),
                0.0,
                label,
                inst,
                bark,
                tex,
            )
            leaves = _jitter(rng, rgb)
            top = np.array([*xy, trunk_h + 0.7 * crown])
            self.row(KIND_SPHERE, top, (crown, 0.0, 0.0), 0.0, label, inst, leaves, tex)
            s += rng.uniform(7.0, 16.0)

    def poles(self, side: int) -> None:
        """Poles on the sidewalk."""
        rng, s = self.rng, self.s_lo + self.rng.uniform(0, 10)
        while s < self.s_hi:
            label, _, _ = _style("static.manmade")
            xy = self.road.point(s, side * 6.3)
            size = (0.12, rng.uniform(5.0, 8.0), 0.0)
            inst = self.instance()
            self.row(
                KIND_CYLINDER, np.array([*xy, 0.0]), size, 0.0, label, inst, POLE_COLOR, TEX_METAL
            )
            s += rng.uniform(14.0, 24.0)

    def parked_cars(self, side: int) -> None:
        """Cars along the kerb, some gaps."""
        rng, road, s = self.rng, self.road, self.s_lo + self.rng.uniform(0, 10)
        while s < self.s_hi:
            if rng.random() < 0.55:
                length, width, height = (
                    rng.uniform(3.9, 4.9),
                    rng.uniform(1.7, 2.0),
                    rng.uniform(1.4, 1.7),
                )
                label, rgb, tex = _style("vehicle.car")
                inst, color = self.instance(), _jitter(rng, rgb, 0.12)
                for kind, local, size in car_parts(length, width, height):
                    c = np.array([*road.point(s + local[0], side * 3.75 + local[1]), local[2]])
                    self.row(kind, c, size, float(road.heading(s)), label, inst, color, tex)
            s += rng.uniform(6.0, 11.0)

    def barriers_and_cones(self, side: int) -> None:
        """Barriers and traffic cones at the road edge."""
        rng = self.rng
        for _ in range(int(rng.integers(1, 4))):
            s = rng.uniform(self.s_lo, self.s_hi)
            self.place(KIND_BOX, s, side * 4.4, 0.5, (1.0, 0.2, 0.5), 0.0, "movable_object.barrier")
        for _ in range(int(rng.integers(2, 6))):
            label, rgb, tex = _style("movable_object.trafficcone")
            xy = self.road.point(rng.uniform(self.s_lo, self.s_hi), side * rng.uniform(3.6, 4.2))
            inst = self.instance()
            color = _jitter(rng, rgb, 0.05)
            self.row(
                KIND_CYLINDER, np.array([*xy, 0.0]), (0.18, 0.7, 0.0), 0.0, label, inst, color, tex
            )

    def traffic(self, ego_speed: float) -> list[Mover]:
        """Oncoming cars, and a car ahead in the ego lane pulling away."""
        rng, movers = self.rng, []
        label, rgb, tex = _style("vehicle.car")
        for _ in range(int(rng.integers(2, 5))):
            dims = (rng.uniform(3.9, 4.9), rng.uniform(1.7, 2.0), rng.uniform(1.4, 1.7))
            s0 = float(rng.uniform(self.s_lo + 30, self.s_hi + 60))
            speed = -float(rng.uniform(5, 11))
            inst = self.instance()
            color = _jitter(rng, rgb, 0.12)
            movers.append(Mover(s0, 1.8, speed, car_parts(*dims), label, inst, color, tex))
        lead = ego_speed + float(rng.uniform(0.5, 2.5))
        s0 = float(rng.uniform(14, 25))
        inst = self.instance()
        color = _jitter(rng, rgb, 0.12)
        movers.append(
            Mover(s0, EGO_LANE, lead, car_parts(4.4, 1.85, 1.55), label, inst, color, tex)
        )
        return movers

    def pedestrians(self) -> list[Mover]:
        """People walking along the sidewalks."""
        rng, movers = self.rng, []
        label, rgb, tex = _style("human.pedestrian.adult")
        parts = (
            (KIND_CYLINDER, (0.0, 0.0, 0.0), (0.22, 1.45, 0.0)),
            (KIND_SPHERE, (0.0, 0.0, 1.6), (0.14, 0.0, 0.0)),
        )
        for _ in range(int(rng.integers(3, 8))):
            side = rng.choice([-1.0, 1.0])
            walk = float(rng.uniform(0.8, 1.5) * rng.choice([-1.0, 1.0]))
            s0 = float(rng.uniform(self.s_lo, self.s_hi))
            lat = side * rng.uniform(4.6, 6.0)
            inst = self.instance()
            color = _jitter(rng, rgb, 0.1)
            movers.append(Mover(s0, lat, walk, parts, label, inst, color, tex))
        return movers
