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
