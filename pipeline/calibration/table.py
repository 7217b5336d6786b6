"""The calibration table: each calibrated tensor's activation range, as one JSON artifact.

The table is what static quantization needs from calibration data, kept apart from any one
quantized model: the ``calibrate`` stage writes it once per (float graph, data, settings) and
every static variant and later build reuses it from the store. It converts to

* ONNX Runtime's ``TensorsData`` (what its QDQ quantizer takes), and
* a TensorRT calibration cache (``TRT-<version>-EntropyCalibration2`` then one
  ``tensor: <hex of the big-endian float32 scale>`` line per tensor, scale = amax / 127), for
  TensorRT's implicit INT8 path.

Ranges are stored as float32 values written with Python's shortest round-trip repr, and tensors
in sorted order, so the same ranges always give byte-identical files.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.errors import InputError

Method = Literal["minmax", "entropy", "percentile"]

FORMAT = "tforge-calibration"
FORMAT_VERSION = 1
#: The TensorRT release whose version number heads an exported cache when TensorRT is not
#: installed. TensorRT 10 ignores a cache whose header names another version, so the
#: compile stage writes it again with the installed version.
DEFAULT_TENSORRT = "10.13.0"


@dataclass(frozen=True)
class CalibrationTable:
    method: Method
    symmetric: bool
    #: Tensor name -> (lowest, highest), float32 values.
    ranges: dict[str, tuple[float, float]]
    #: How the table was made (samples, seed, data hash, percentile...): recorded, not used.
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        document = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "method": self.method,
            "symmetric": self.symmetric,
            "meta": self.meta,
            "tensors": {
                name: [_f32(low), _f32(high)] for name, (low, high) in sorted(self.ranges.items())
            },
        }
        return json.dumps(document, indent=1, sort_keys=True) + "\n"

    @classmethod
    def read(cls, path: Path) -> CalibrationTable:
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise InputError(f"calibration table {path} cannot be read: {error}") from None
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise InputError(f"{path} is not a tforge calibration table")
        if document.get("version") != FORMAT_VERSION:
            raise InputError(
                f"{path} is a version {document.get('version')} table; this tforge reads version {FORMAT_VERSION}",
                "calibrate again",
            )
        ranges = {name: (float(lo), float(hi)) for name, (lo, hi) in document["tensors"].items()}
        return cls(document["method"], bool(document["symmetric"]), ranges, document["meta"])

    def tensors_data(self) -> Any:
        """The ranges as ONNX Runtime's ``TensorsData``."""
        from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData

        method = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }[self.method]
        return TensorsData(
            method,
            {
                name: TensorData(lowest=np.float32(low), highest=np.float32(high))
                for name, (low, high) in self.ranges.items()
            },
        )

    def tensorrt_cache(self, tensorrt_version: str = DEFAULT_TENSORRT) -> str:
        """The table as a TensorRT calibration cache (symmetric: amax = max |range|)."""
        lines = [f"TRT-{tensorrt_version_number(tensorrt_version)}-EntropyCalibration2"]
        for name, (low, high) in sorted(self.ranges.items()):
            scale = max(abs(low), abs(high)) / 127.0
            # A constant-zero tensor still needs a non-zero scale.
            scale = scale if scale > 0 else 1.0 / 127.0
            lines.append(f"{name}: {struct.pack('>f', scale).hex()}")
        return "\n".join(lines) + "\n"


def tensorrt_version_number(version: str) -> int:
    """TensorRT's numeric version in cache headers: 8.6.1 -> 8601, 10.13.0 -> 101300."""
    parts = [int(p) for p in version.split(".")[:3]] + [0, 0]
    major, minor, patch = parts[:3]
    return major * 1000 + minor * 100 + patch if major < 10 else major * 10000 + minor * 100 + patch


def _f32(value: float) -> float:
    """The value rounded to float32, written as the shortest repr that reads back the same."""
    rounded = float(np.float32(value))
    if not math.isfinite(rounded):
        raise ValueError(f"non-finite calibration range {value}")
    return rounded
