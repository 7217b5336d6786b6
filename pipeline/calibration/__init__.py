"""Reading calibration and evaluation text, and where the shipped sets live."""

from pipeline.calibration.readers import Sample, draw_samples, read_samples, shipped_data

__all__ = ["Sample", "draw_samples", "read_samples", "shipped_data"]
