"""Typed records of the frames the dataset readers hand the pipeline."""

from hilda.data_schemas.records import Camera, Frame, RecordError

__all__ = ["Camera", "Frame", "RecordError"]
