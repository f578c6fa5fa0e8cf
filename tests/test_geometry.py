import numpy as np
import pytest

from hilda.geometry import (
    apply,
    invert,
    is_rigid,
    make_transform,
    matrix_to_quat,
    pose_to_transform,
    yaw_matrix,
)


@pytest.mark.parametrize("yaw", [-3.0, -0.4, 0.0, 1.2, 3.1])
def test_quaternion_round_trip(yaw: float) -> None:
    rot = yaw_matrix(yaw) @ np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], float)
    q = matrix_to_quat(rot)
    assert q[0] >= 0 and np.isclose(np.linalg.norm(q), 1)
    np.testing.assert_allclose(pose_to_transform(q, [1, 2, 3])[:3, :3], rot, atol=1e-12)


def test_invert_and_apply() -> None:
    t = make_transform(yaw_matrix(0.7), np.array([3.0, -1.0, 2.0]))
    pts = np.random.default_rng(0).normal(size=(10, 3))
    np.testing.assert_allclose(apply(invert(t), apply(t, pts)), pts, atol=1e-12)
    assert is_rigid(t) and not is_rigid(t * 2) and not is_rigid(np.full((4, 4), np.nan))
