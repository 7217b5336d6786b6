"""Reading calibration and evaluation text, and where the shipped sets live."""

from pipeline.calibration.readers import Sample, read_samples, shipped_data

__all__ = ["Sample", "read_samples", "shipped_data"]
