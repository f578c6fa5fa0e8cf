"""The training cache's store format, both ways: the one package that knows it.

- ``schema``: the layout (groups, arrays, dtypes, symbolic shapes, chunking and sharding),
  its version, the paths of dataset files in the index;
- ``validate``: what every command checks before it reads or resumes a store;
- ``codecs``: teacher-grid codecs and their fidelity, the occupancy bit packing;
- ``writer``: stores and stage groups (created atomically for readers), completion maps,
  provenance, the index, per-frame writes;
- ``ragged``: the staged, shard-exclusive writes of the ragged (CSR) groups;
- ``reader``: ``CacheReader`` for training, evaluation and benchmarks, and the stages' reads;
- ``written``: the write records (what each shard's files were when written) and the
  checks against them, so nothing is read that was not written;
- ``info``: what a store holds (``hilda-prep info``);
- ``lock``: one writer per store (and per run folder).

Stages, the trainer, evaluation and benchmarks go through it and name groups by their specs
(``INDEX``, ``POINTS``, ``POINTMAPS``, ``OCCUPANCY``, ``teacher_path(name)``), never by a path
string. It imports neither ``hilda.pipeline``, ``hilda.train`` nor ``hilda.models``.
"""

from hilda.store.schema import (
    INDEX,
    OCCUPANCY,
    POINTMAPS,
    POINTS,
    SCHEMA,
    SCHEMA_VERSION,
    ArraySpec,
    GroupSpec,
    teacher_path,
)

__all__ = [
    "INDEX",
    "OCCUPANCY",
    "POINTMAPS",
    "POINTS",
    "SCHEMA",
    "SCHEMA_VERSION",
    "ArraySpec",
    "GroupSpec",
    "teacher_path",
]
