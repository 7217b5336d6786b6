"""Tiny random-weight checkpoints built from transformers configs, with an offline tokenizer.

Seeded, so every test session builds the same bytes. The tokenizer is a WordPiece vocabulary of
the words in the shipped evaluation set, so real text tokenises into real ids.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
FAMILIES = ("bert", "distilbert", "roberta")
#: Every family with an architecture spec (tests of the graph passes cover them all).
ALL_FAMILIES = (*FAMILIES, "xlm-roberta", "albert", "electra", "mpnet", "deberta-v2")


def vocabulary(size: int = 600) -> list[str]:
    words: dict[str, None] = {}
    for line in (
        (ROOT / "calibration" / "evaluation.jsonl").read_text(encoding="utf-8").splitlines()
    ):
        for word in re.findall(r"[a-z]+", json.loads(line)["text"].lower()):
            words.setdefault(word)
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,;:!?()-'\"")
    pieces = [f"##{c}" for c in chars]
    vocab = SPECIALS + chars + pieces + sorted(words)
    return vocab[:size]


def save_tokenizer(folder: Path, input_names: list[str]) -> None:
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    words = vocabulary()
    (folder / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    # The vocabulary as a mapping: transformers 5 ignores a ``vocab_file`` argument here and
    # would tokenise every word to [UNK].
    tokenizer = BertTokenizerFast(
        vocab={w: i for i, w in enumerate(words)}, do_lower_case=True, model_max_length=128
    )
    tokenizer.model_input_names = input_names
    tokenizer.save_pretrained(folder)


def config_for(family: str, task: str = "feature-extraction", num_labels: int = 3):  # type: ignore[no-untyped-def]
    import transformers

    common: dict[str, int] = {"vocab_size": 600, "max_position_embeddings": 128}
    #: Every BERT-style family: 2 layers of width 32, 4 heads.
    sizes = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
    }
    #: RoBERTa-style families reserve two positions and name their special tokens.
    roberta_style = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
    if family == "bert":
        config = transformers.BertConfig(
            **sizes,
            **common,
        )
    elif family == "distilbert":
        config = transformers.DistilBertConfig(
            dim=32, n_layers=2, n_heads=4, hidden_dim=64, **common
        )
    elif family == "roberta":
        common["max_position_embeddings"] = 130  # RoBERTa reserves two positions
        config = transformers.RobertaConfig(
            **sizes,
            **roberta_style,
            type_vocab_size=1,
            **common,
        )
    elif family == "xlm-roberta":
        common["max_position_embeddings"] = 130
        config = transformers.XLMRobertaConfig(
            **sizes,
            **roberta_style,
            type_vocab_size=1,
            **common,
        )
    elif family == "albert":
        config = transformers.AlbertConfig(
            embedding_size=16,
            **sizes,
            pad_token_id=0,
            **common,
        )
    elif family == "electra":
        config = transformers.ElectraConfig(
            embedding_size=16,
            **sizes,
            **common,
        )
    elif family == "mpnet":
        common["max_position_embeddings"] = 130
        config = transformers.MPNetConfig(
            **sizes,
            **roberta_style,
            **common,
        )
    elif family == "deberta-v2":
        config = transformers.DebertaV2Config(
            **sizes,
            pad_token_id=0,
            type_vocab_size=0,
            **common,
        )
    else:
        raise ValueError(family)
    if task != "feature-extraction":
        config.num_labels = num_labels
        config.id2label = {i: f"L{i}" for i in range(num_labels)}
        config.label2id = {f"L{i}": i for i in range(num_labels)}
    return config


def make_checkpoint(
    folder: Path, family: str = "bert", task: str = "feature-extraction", seed: int = 0
) -> Path:
    """Write a tiny random checkpoint (safetensors + config + tokenizer) into ``folder``."""
    import torch
    import transformers

    from pipeline.backends.torch_backend import AUTO_CLASSES

    torch.manual_seed(seed)
    config = config_for(family, task)
    model = getattr(transformers, AUTO_CLASSES[task]).from_config(config)
    model.eval()
    model.save_pretrained(folder)
    inputs = (
        ["input_ids", "token_type_ids", "attention_mask"]
        if family in ("bert", "albert", "electra")
        else ["input_ids", "attention_mask"]
    )
    save_tokenizer(folder, inputs)
    return folder
