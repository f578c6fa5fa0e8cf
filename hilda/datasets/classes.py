"""nuScenes-lidarseg classes: the 32 general categories (label-file indices) and the 16-class
evaluation mapping.

The general list is the one in nuScenes-lidarseg's ``category.json`` (index order equals the
devkit colormap's key order). The 16-class mapping is taken from the devkit's
``LidarsegClassMapper`` when a reader has a ``NuScenes`` object; ``COARSE_CLASSES`` is the
same list for code that has none.
"""

from __future__ import annotations

import numpy as np

GENERAL_CATEGORIES: tuple[str, ...] = (
    "noise",
    "animal",
    "human.pedestrian.adult",
    "human.pedestrian.child",
    "human.pedestrian.construction_worker",
    "human.pedestrian.personal_mobility",
    "human.pedestrian.police_officer",
    "human.pedestrian.stroller",
    "human.pedestrian.wheelchair",
    "movable_object.barrier",
    "movable_object.debris",
    "movable_object.pushable_pullable",
    "movable_object.trafficcone",
    "static_object.bicycle_rack",
    "vehicle.bicycle",
    "vehicle.bus.bendy",
    "vehicle.bus.rigid",
    "vehicle.car",
    "vehicle.construction",
    "vehicle.emergency.ambulance",
    "vehicle.emergency.police",
    "vehicle.motorcycle",
    "vehicle.trailer",
    "vehicle.truck",
    "flat.driveable_surface",
    "flat.other",
    "flat.sidewalk",
    "flat.terrain",
    "static.manmade",
    "static.other",
    "static.vegetation",
    "vehicle.ego",
)
GENERAL_INDEX = {name: i for i, name in enumerate(GENERAL_CATEGORIES)}

# Index 0 is "ignore" (noise and the fine classes the benchmark leaves out).
COARSE_CLASSES: tuple[str, ...] = (
    "ignore",
    "barrier",
    "bicycle",
    "bus",
    "car",
    "construction_vehicle",
    "motorcycle",
    "pedestrian",
    "traffic_cone",
    "trailer",
    "truck",
    "driveable_surface",
    "other_flat",
    "sidewalk",
    "terrain",
    "manmade",
    "vegetation",
)


def coarse_lut_from_mapper(fine_to_coarse_index: dict[int, int]) -> np.ndarray:
    """(256,) uint8 lookup table from general label index to 16-class index (0 = ignore)."""
    lut = np.zeros(256, dtype=np.uint8)
    for fine, coarse in fine_to_coarse_index.items():
        lut[fine] = coarse
    return lut
