"""One row of the downstream table the papers in this line report (HilDA Table 1; SLidR,
ScaLR, SuperFlow, CleverDistiller): mIoU on nuScenes-lidarseg val of the linear probe and of
fine-tunes on 1, 5, 10, 25 and 100% of the labelled training frames, and of a fine-tune on
1% of SemanticKITTI's training scans, scored on its sequence 08: every dataset of the
registry that has Table 1 columns (``hilda.datasets.labelled``), in its order.

``run_table`` plans the entries the given datasets allow (and the random-init baseline of
each, when asked), runs each through ``run_segmentation`` into its own result JSON in the
output folder, and rewrites ``table.json`` and ``table.md`` after every entry. A rerun skips
every entry whose result is there with the same config and checkpoint, so an interrupted
table resumes where it stopped (an entry interrupted midway continues from its last
checkpoint, ``hilda.eval.partial``); a result of another config or checkpoint is an error
that names the file, never silently overwritten.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rich.console import Console
from rich.table import Table

from hilda.atomic import atomic_write, write_json
from hilda.datasets.labelled import TableColumns, labelled_dataset, table_datasets
from hilda.engine.config_io import load_config, to_dict
from hilda.engine.distributed import main_process
from hilda.errors import ConfigError, HildaError
from hilda.eval.config import SegConfig, protocol
from hilda.eval.data import file_sha256
from hilda.eval.probe import result_name, run_segmentation
from hilda.eval.report import read_result
from hilda.eval.segment import Init


@dataclass(frozen=True)
class TableData:
    """One dataset of the table: its registry name, root ("" leaves its columns empty),
    release version (None: the dataset's default) and fine-tune label fractions (None: its
    Table 1 fractions)."""

    dataset: str
    root: str = ""
    version: str | None = None
    fractions: tuple[float, ...] | None = None

    @property
    def columns(self) -> TableColumns:
        ds = labelled_dataset(self.dataset)
        if ds.table is None:
            raise ConfigError(f"{ds.label} has no column in Table 1")
        return ds.table

    @property
    def finetune_fractions(self) -> tuple[float, ...]:
        return self.columns.fractions if self.fractions is None else self.fractions


@dataclass(frozen=True)
class Entry:
    """One cell of the table: a protocol on a dataset from one initialisation."""

    dataset: str
    mode: Literal["linear", "finetune"]
    fraction: float
    init: Init

    @property
    def column(self) -> str:
        name = labelled_dataset(self.dataset).label
        return f"{name} LP" if self.mode == "linear" else f"{name} {100 * self.fraction:g}%"

    @property
    def file(self) -> str:
        return result_name(self.mode, self.fraction, self.init, self.dataset)


@dataclass(frozen=True)
class TableSpec:
    """What a table measures: the checkpoint, the datasets (the table's columns, in the
    registry's order; those with a root are run), and the linear-probe and fine-tune configs
    each entry starts from (the entry sets the dataset, root, version and fraction; splits
    are the datasets' official ones)."""

    backbone: str
    linear: SegConfig
    finetune: SegConfig
    datasets: tuple[TableData, ...]
    random_init: bool = False

    def __post_init__(self) -> None:
        if not any(d.root for d in self.datasets):
            options = ", ".join(f"--{d.dataset}-root" for d in self.datasets)
            raise ConfigError(f"a table needs a dataset: pass one of {options}")
        for d in self.datasets:
            d.columns  # noqa: B018 (a dataset without Table 1 columns is refused here)
            for f in d.finetune_fractions:
                if not 0.0 < f <= 1.0:
                    raise ConfigError(f"label fractions must be in (0, 1], got {f}")
        if self.linear.mode != "linear" or self.finetune.mode != "finetune":
            raise ConfigError(
                "the table's linear config needs mode=linear, its fine-tune config mode=finetune"
            )

    def data(self, dataset: str) -> TableData:
        return next(d for d in self.datasets if d.dataset == dataset)


def table_data(roots: dict[str, str], **given: dict) -> tuple[TableData, ...]:
    """Every dataset with Table 1 columns, in the table's order, with its root from ``roots``
    ("" when absent) and any other ``TableData`` field from ``given[field][name]``."""
    out = []
    for ds in table_datasets():
        fields = {k: v[ds.name] for k, v in given.items() if ds.name in v}
        out.append(TableData(ds.name, roots.get(ds.name, ""), **fields))
    return tuple(out)


def columns(spec: TableSpec) -> list[str]:
    """The row's columns in the paper's order: each dataset's LP and fractions."""
    entries = _entries(spec, ("pretrained",), only_given=False)
    return list(dict.fromkeys(e.column for e in entries))


def plan(spec: TableSpec) -> list[Entry]:
    """The entries the given datasets allow: every pre-trained entry, then the baselines."""
    inits: tuple[Init, ...] = ("pretrained", "random") if spec.random_init else ("pretrained",)
    return _entries(spec, inits, only_given=True)


def _entries(spec: TableSpec, inits: tuple[Init, ...], *, only_given: bool) -> list[Entry]:
    out = []
    for init in inits:
        for d in spec.datasets:
            if only_given and not d.root:
                continue
            if d.columns.linear:
                out.append(Entry(d.dataset, "linear", 1.0, init))
            out += [Entry(d.dataset, "finetune", f, init) for f in d.finetune_fractions]
    return out


def entry_config(spec: TableSpec, entry: Entry) -> SegConfig:
    """The config of one entry: the linear or fine-tune config on the entry's dataset, root,
    version and fraction, with that dataset's official splits."""
    base = spec.linear if entry.mode == "linear" else spec.finetune
    own = spec.data(entry.dataset)
    data = dataclasses.replace(
        base.data,
        dataset=entry.dataset,
        root=own.root,
        version=own.version,
        train_split=None,
        val_split=None,
        fraction=entry.fraction,
    )
    return dataclasses.replace(base, data=data)


def load_table_configs(
    linear: str, finetune: str, overrides: list[str] | None = None
) -> tuple[SegConfig, SegConfig]:
    """The linear-probe and fine-tune configs (files or presets) with ``overrides``: a key
    that starts with ``linear.`` or ``finetune.`` sets that config's key, any other both."""
    own: dict[str, list[str]] = {"linear": [], "finetune": []}
    for text in overrides or []:
        head, _, rest = text.partition(".")
        if head in own and "=" in rest:
            own[head].append(rest)
        else:
            own["linear"].append(text)
            own["finetune"].append(text)
    return (
        load_config(SegConfig, linear, [*own["linear"], "mode=linear"]),
        load_config(SegConfig, finetune, [*own["finetune"], "mode=finetune"]),
    )


def _first_difference(a: object, b: object, path: str = "") -> str | None:
    """The first key path where two nested JSON values differ (None if equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            found = _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
            if found:
                return found
        return None
    return None if a == b else f"{path or '(root)'}: {a!r} here, {b!r} in the result"


def finished(path: Path, cfg: SegConfig, sha256: str) -> dict | None:
    """The result at ``path`` when it measured this config (but for its operational keys:
    workers, device, logging) on this checkpoint; None when there is none. A result of another
    config or checkpoint is an error naming the file."""
    if not path.exists():
        return None
    result = read_result(path)
    theirs = str(result.get("backbone_sha256"))
    if theirs != sha256:
        raise HildaError(
            f"{path} measured another checkpoint (SHA-256 {theirs[:12]}, this one "
            f"{sha256[:12]}): move it away or pass another --out"
        )
    diff = _first_difference(protocol(to_dict(cfg)), protocol(result.get("config") or {}))
    if diff:
        raise HildaError(
            f"{path} was run with another config ({diff}): move it away or pass another --out "
            "to measure this one"
        )
    return result


def run_table(spec: TableSpec, out: str | Path, console: Console | None = None) -> dict:
    """Run (or resume) every entry of ``plan(spec)`` into folder ``out``; returns the table
    (also written to ``out/table.json`` and ``out/table.md``)."""
    console = console or Console()
    out = Path(out)
    if not Path(spec.backbone).is_file():
        raise HildaError(f"backbone checkpoint {spec.backbone} does not exist")
    out.mkdir(parents=True, exist_ok=True)
    sha = file_sha256(spec.backbone)
    entries = plan(spec)
    if not entries:
        raise ConfigError("the table has no entry: give a dataset root and its fractions")
    results: dict[Entry, dict] = {}
    for k, entry in enumerate(entries, 1):
        cfg = entry_config(spec, entry)
        path = out / entry.file
        where = f"[{k}/{len(entries)}] {entry.column}, {entry.init} backbone"
        result = finished(path, cfg, sha)
        if result is None:
            console.rule(where)
            # not finished (or finished with another protocol): the table's own rerun
            result = run_segmentation(
                cfg, spec.backbone, entry.init, out=path, console=console, overwrite=True
            )
        console.print(f"{where}: mIoU {100 * result['miou']:.2f} ({path.name})")
        results[entry] = result
        table = table_record(spec, sha, entries, results)
        if main_process():  # under torchrun, the first process writes the table
            write_json(out / "table.json", table)
            text = markdown(table)
            atomic_write(out / "table.md", lambda tmp, text=text: tmp.write_text(text))
    table["path"] = str(out / "table.json")
    return table


def table_record(
    spec: TableSpec, sha256: str, entries: list[Entry], results: dict[Entry, dict]
) -> dict:
    """The table as JSON: one row per initialisation, mIoU (0-1) per column (None where the
    entry was not run), each entry's result file, and the spec it measured."""
    inits = list(dict.fromkeys(e.init for e in entries))
    cols = columns(spec)
    rows = {init: dict.fromkeys(cols) for init in inits}
    subsets: dict[str, str] = {}
    for entry, result in results.items():
        rows[entry.init][entry.column] = result["miou"]
        if entry.mode == "finetune":  # the protocol that chose the column's frames
            subsets[entry.column] = result.get("subset", {}).get("rule", "unrecorded")
    return {
        "backbone": spec.backbone,
        "backbone_sha256": sha256,
        "columns": cols,
        "rows": rows,
        "subsets": subsets,
        "entries": [
            {"column": e.column, "init": e.init, "file": e.file, "done": e in results}
            for e in entries
        ],
        "spec": to_dict(spec),
    }


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _row_name(init: str, backbone: str) -> str:
    return "random init" if init == "random" else f"pre-trained ({Path(backbone).name})"


def markdown(table: dict) -> str:
    """The row(s) as a Markdown table (mIoU %), '-' where an entry was not run."""
    cols = table["columns"]
    lines = [
        "| init | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for init, row in sorted(table["rows"].items(), key=lambda kv: kv[0] != "random"):
        cells = " | ".join(_cell(row[c]) for c in cols)
        lines.append(f"| {_row_name(init, table['backbone'])} | {cells} |")
    rules = table.get("subsets", {})
    if rules:
        lines += ["", "Label fractions: " + ", ".join(f"{c}: {r}" for c, r in rules.items())]
    return "\n".join(lines) + "\n"


def gains(table: dict) -> dict[str, float | None]:
    """Pre-trained minus random-init mIoU (0-1) per column; None where either entry is missing
    (or the table has no random-init row)."""
    rows = table["rows"]
    pre, rand = rows.get("pretrained", {}), rows.get("random", {})
    return {
        c: None if pre.get(c) is None or rand.get(c) is None else pre[c] - rand[c]
        for c in table["columns"]
    }


def gain_verdict(table: dict, column: str, expected: float) -> tuple[bool, str]:
    """Whether the pre-trained backbone beats random init in ``column`` by more than
    ``expected`` (0-1), and a sentence that says so plainly."""
    if column not in table["columns"]:
        raise ConfigError(f"the table has no column {column!r}; it has {table['columns']}")
    gain = gains(table)[column]
    if gain is None:
        raise ConfigError(
            f"{column}: the table needs both the pre-trained and the random-init entry "
            "(hilda-eval table --init random)"
        )
    rows = table["rows"]
    what = (
        f"{column}: pre-trained {_cell(rows['pretrained'][column])}, random init "
        f"{_cell(rows['random'][column])}, gain {100 * gain:+.1f} points"
    )
    if gain > expected:
        return True, f"{what}, above the expected {100 * expected:+.1f}"
    return False, f"{what}, NOT above the expected {100 * expected:+.1f}"


def rich_table(table: dict) -> Table:
    """The row(s) for the terminal, random init first as in the papers."""
    out = Table(title=f"mIoU (%), {table['backbone']}")
    out.add_column("init")
    for c in table["columns"]:
        out.add_column(c, justify="right")
    for init, row in sorted(table["rows"].items(), key=lambda kv: kv[0] != "random"):
        out.add_row(_row_name(init, table["backbone"]), *(_cell(row[c]) for c in table["columns"]))
    return out
