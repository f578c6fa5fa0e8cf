"""The YAML presets shipped with hilda (package data under ``hilda/configs``), found through
``importlib.resources`` so they work from a wheel as from a checkout.

A config argument is a path to a YAML file or a preset's name: ``tiny_cpu``,
``ablations/table8_final_only``, ``eval/linear_probe`` (with or without ``.yaml``). A file
that exists wins over a preset of the same name.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path

from hilda.errors import ConfigError

EVAL = "eval"  # hilda-eval's configs; the rest are hilda-train's


def preset_root() -> Path:
    """The folder of the shipped presets (a real folder: hilda installs unzipped)."""
    return Path(str(resources.files("hilda") / "configs"))


def list_presets(kind: str = "train") -> list[str]:
    """Names of the shipped presets: ``train`` (pre-training) or ``eval`` (hilda-eval)."""
    root = preset_root()
    names = sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))
    is_eval = [n.split("/")[0] == EVAL for n in names]
    return [n for n, e in zip(names, is_eval, strict=True) if e == (kind == EVAL)]


def resolve_config(spec: str | Path) -> Path:
    """The YAML file a ``--config`` argument names: an existing file, or a preset."""
    path = Path(spec)
    if path.is_file():
        return path
    name = path.as_posix().removesuffix(".yaml")
    candidate = preset_root() / f"{name}.yaml"
    if candidate.is_file():
        return candidate
    known = list_presets("train") + list_presets(EVAL)
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else " (`hilda-train presets` lists them)"
    raise ConfigError(f"config {spec} is neither a file nor a shipped preset{hint}")
