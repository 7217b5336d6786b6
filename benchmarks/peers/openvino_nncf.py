"""NNCF's INT8 of an ONNX encoder with OpenVINO's own tools, as OpenVINO's documentation does it.

    python openvino_nncf.py MODEL.onnx TOKENIZER_DIR CALIBRATION.jsonl OUT_DIR [TEXTS]

The model is read by OpenVINO, quantized by NNCF (OpenVINO backend, transformer preset) on the
first TEXTS (300) calibration texts in batches of 8, and saved as OpenVINO IR (model.xml/.bin).
"""

import json
import sys
from pathlib import Path

import nncf
import numpy as np
import openvino as ov
from transformers import AutoTokenizer


def main() -> None:
    source, tokenizer_dir, data, out = sys.argv[1:5]
    count = int(sys.argv[5]) if len(sys.argv) > 5 else 300
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    with open(data, encoding="utf-8") as lines:
        texts = [json.loads(line)["text"] for line in lines if line.strip()][:count]
    model = ov.Core().read_model(source)
    names = [i.get_any_name() for i in model.inputs]
    batches = []
    for start in range(0, len(texts), 8):
        encoded = tokenizer(
            texts[start : start + 8],
            padding=True,
            truncation=True,
            max_length=128,
            return_tensors="np",
        )
        batches.append({k: encoded[k].astype(np.int64) for k in names})
    quantized = nncf.quantize(
        model,
        nncf.Dataset(batches),
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(batches),
    )
    Path(out).mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, str(Path(out) / "model.xml"))


if __name__ == "__main__":
    main()
