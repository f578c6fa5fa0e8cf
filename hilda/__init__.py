"""hilda: self-supervised LiDAR pre-training by HilDA on a Zarr training cache."""

__version__ = "0.1.0"
