"""One Optimum build step, run inside the Optimum environment: O2, O3 or dynamic INT8.

Usage: python optimum_step.py {O2,O3,int8,int8-per-tensor} EXPORT_DIR OUT_DIR
"""

import sys

from optimum.onnxruntime import ORTOptimizer, ORTQuantizer
from optimum.onnxruntime.configuration import AutoOptimizationConfig, AutoQuantizationConfig

step, source, target = sys.argv[1:4]
if step in ("O2", "O3"):
    config = getattr(AutoOptimizationConfig, step)()
    ORTOptimizer.from_pretrained(source).optimize(save_dir=target, optimization_config=config)
else:
    # avx512_vnni is Optimum's config for this CPU family; per_channel=True is its default.
    config = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=step == "int8")
    ORTQuantizer.from_pretrained(source).quantize(save_dir=target, quantization_config=config)
