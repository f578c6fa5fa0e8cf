"""Typed records and the Zarr store layout shared by every stage."""

from hilda.data_schemas.records import Camera, Frame, RecordError
from hilda.data_schemas.store import SCHEMA, SCHEMA_VERSION, ArraySpec, GroupSpec

__all__ = ["SCHEMA", "SCHEMA_VERSION", "ArraySpec", "Camera", "Frame", "GroupSpec", "RecordError"]
