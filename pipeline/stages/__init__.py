"""Stages: load, export, reference, verify, latency (and later optimize, quantize, compile)."""

from pipeline.stages.base import BuildContext, Stage, StageConfig, StageResult, Step

__all__ = ["BuildContext", "Stage", "StageConfig", "StageResult", "Step"]
