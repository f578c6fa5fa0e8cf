"""The YAML + override config loader: nesting, tuples, unions, errors naming the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hilda.engine.config_io import load_config, save_config, to_dict
from hilda.errors import ConfigError
from hilda.models.diffusion import DiffusionConfig
from hilda.models.student import StudentConfig


@dataclass(frozen=True)
class Example:
    student: StudentConfig = field(default_factory=StudentConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    lr: float = 1e-3
    name: str | None = None
    steps: int = 10


def test_yaml_overrides_and_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "a.yaml"
    path.write_text("student:\n  planes: [8, 8, 8, 8, 8, 8, 8, 8]\nlr: 0.01\n")
    cfg = load_config(Example, path, ["diffusion.mask=condition", "steps=3", "lr=1"])
    assert cfg.student.planes == (8,) * 8 and cfg.student.layers == (2, 3, 4, 6, 2, 2, 2, 2)
    assert cfg.diffusion.mask == "condition" and cfg.steps == 3 and cfg.lr == 1.0
    saved = save_config(cfg, tmp_path / "out" / "config.yaml")
    assert load_config(Example, saved) == cfg
    assert to_dict(cfg)["student"]["planes"] == [8] * 8
    # YAML 1.1 reads 3e-3 (no dot) as a string; float fields accept it.
    assert load_config(Example, None, ["lr=3e-3"]).lr == 0.003


@pytest.mark.parametrize(
    "override, message",
    [
        ("student.plane=[1]", "unknown config key.*student"),
        ("steps=many", "steps: expected int"),
        ("lr=fast", "lr: expected a number"),
        ("diffusion.mask=sometimes", "diffusion.*mask must be one of"),
        ("student.planes=[1, 2]", "8 planes"),
        ("lr", "not key.path=value"),
    ],
)
def test_errors_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(Example, None, [override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=nan", "optim.lr must be finite"),
        ("optim.betas=[0.9,1.5]", r"optim.betas must each be in \[0, 1\)"),
        ("data.num_workers=-1", "data.num_workers must be >= 0"),
        ("run.checkpoint_every=0", "run.checkpoint_every must be >= 1"),
        ("model.voxel.voxel_size=-0.4", "voxel.voxel_size must be a finite number > 0"),
        ("model.bev_stride=0", "model.bev_stride must be >= 1"),
    ],
)
def test_values_run_would_fail_on_are_refused_when_the_config_loads(
    override: str, message: str
) -> None:
    from hilda.engine.config_io import load_config
    from hilda.errors import ConfigError
    from hilda.train.config import TrainConfig

    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, "tiny_cpu", [override])


def test_a_key_given_twice_in_a_yaml_file_is_refused(tmp_path) -> None:
    from hilda.engine.config_io import load_config
    from hilda.errors import ConfigError
    from hilda.train.config import TrainConfig

    path = tmp_path / "twice.yaml"
    path.write_text("optim:\n  lr: 1.0e-3\nrun:\n  seed: 1\noptim:\n  epochs: 2\n")
    with pytest.raises(
        ConfigError, match=rf"{path}:5: key 'optim' is given twice \(first on line 1\)"
    ):
        load_config(TrainConfig, str(path))
