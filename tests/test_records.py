import numpy as np
import pytest

from hilda.data_schemas.records import Camera, Frame, RecordError


def _camera(**kw) -> Camera:
    args = dict(
        name="CAM_FRONT",
        image_file="/x.jpg",
        width=100,
        height=50,
        intrinsics=np.array([[50.0, 0, 50], [0, 50, 25], [0, 0, 1]]),
        cam_to_ego=np.eye(4),
        ego_to_global=np.eye(4),
        timestamp=1,
    )
    args.update(kw)
    return Camera(**args)


def test_valid_records() -> None:
    f = Frame("tok", "scene", 1, "/x.bin", np.eye(4), np.eye(4), (_camera(),), None, 1)
    assert f.camera_names == ("CAM_FRONT",)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_calibration_is_named(bad: float) -> None:
    k = np.array([[50.0, 0, 50], [0, bad, 25], [0, 0, 1]])
    with pytest.raises(RecordError, match=r"CAM_FRONT \(/x.jpg\).*intrinsics"):
        _camera(intrinsics=k)
    pose = np.eye(4)
    pose[0, 3] = bad
    with pytest.raises(RecordError, match=r"frame tok \(/x.bin\): ego_to_global has non-finite"):
        Frame("tok", "scene", 1, "/x.bin", np.eye(4), pose, (), None, None)


def test_non_rigid_transform_rejected() -> None:
    with pytest.raises(RecordError, match="not a rigid transform"):
        _camera(cam_to_ego=np.diag([2.0, 1, 1, 1]))
