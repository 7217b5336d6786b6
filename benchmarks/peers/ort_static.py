"""ONNX Runtime's own static QDQ quantization, as a user would call it: MinMax, MatMul only.

Run in tforge's environment (it needs only onnxruntime). Calibration: the shipped calibration
text, tokenised with the model's tokenizer, 128 samples padded to 128 tokens.
Usage: python ort_static.py MODEL.onnx TOKENIZER_DIR CALIBRATION.jsonl OUT.onnx
"""

import json
import sys

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from transformers import AutoTokenizer

source, tokenizer_dir, calibration, target = sys.argv[1:5]
tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
with open(calibration, encoding="utf-8") as lines:
    texts = [json.loads(line)["text"] for line in lines][:128]


class Reader(CalibrationDataReader):
    def __init__(self) -> None:
        self.batches = []
        for start in range(0, len(texts), 8):
            encoded = tokenizer(
                texts[start : start + 8],
                padding="max_length",
                truncation=True,
                max_length=128,
                return_tensors="np",
            )
            self.batches.append({k: v.astype(np.int64) for k, v in encoded.items()})
        self.iterator = iter(self.batches)

    def get_next(self):
        return next(self.iterator, None)


quantize_static(
    source,
    target,
    Reader(),
    quant_format=QuantFormat.QDQ,
    op_types_to_quantize=["MatMul"],
    activation_type=QuantType.QInt8,
    weight_type=QuantType.QInt8,
    calibrate_method=CalibrationMethod.MinMax,
)
