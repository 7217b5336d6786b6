import numpy as np
import pytest
import torch

from pipeline.stages.latency import timing_feed, token_stream
from tests.tiny import vocabulary


def test_timing_feed_is_real_text_framed_by_special_tokens(checkpoint) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint("bert"))
    stream = token_stream(tokenizer, ["Return a new list.", "The parser reads the header."])
    feed = timing_feed(
        stream, tokenizer, ["input_ids", "attention_mask", "token_type_ids"], batch=3, sequence=16
    )
    ids = feed["input_ids"]
    assert ids.shape == (3, 16) and ids.dtype == np.int64
    assert (ids[:, 0] == tokenizer.cls_token_id).all() and (
        ids[:, -1] == tokenizer.sep_token_id
    ).all()
    body = ids[:, 1:-1]
    assert set(np.unique(body)) <= set(stream.tolist())
    assert len(np.unique(body)) > 5  # varied tokens, never a constant or all-zero input
    assert feed["attention_mask"].all() and not feed["token_type_ids"].any()
    assert len(vocabulary()) > int(ids.max())


def test_timing_feed_keeps_only_the_graph_inputs(checkpoint) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint("distilbert"))
    feed = timing_feed(
        token_stream(tokenizer, ["some text here"]),
        tokenizer,
        ["input_ids", "attention_mask"],
        1,
        8,
    )
    assert set(feed) == {"input_ids", "attention_mask"}


def test_a_gpu_build_probes_memory_on_the_gpu(checkpoint, recipe_for) -> None:
    """PyTorch and the GPU variants are probed on the GPU (host RSS and device memory); a CPU
    variant of the same build on the CPU. Planned without a GPU: nothing runs."""
    from pathlib import Path

    from pipeline.backends.memory import Footprint
    from pipeline.recipes import encoder_pipeline
    from pipeline.stages.latency import memory_stats
    from pipeline.stages.load import CheckpointInfo

    variants = [
        {"name": "cpu32"},
        {"name": "cuda16", "target": "ort-cuda", "precision": "fp16"},
        {"name": "trt16", "target": "tensorrt", "precision": "fp16"},
    ]
    plan = encoder_pipeline(recipe_for(checkpoint(), variants=variants), 1)
    stage = next(s for s in plan.steps if s.id == "latency").stage
    info = CheckpointInfo.model_construct(
        task="feature-extraction", inputs=["input_ids"], output="last_hidden_state"
    )
    paths = {name: Path(f"/models/{name}") for name in ("cpu32", "cuda16", "trt16")}
    probes = stage.probes(Path("/ckpt"), info, paths)
    assert {n: (p.kind, p.device) for n, p in probes.items()} == {
        "pytorch": ("pytorch", "cuda"),
        "cpu32": ("onnxruntime", "cpu"),
        "cuda16": ("onnxruntime", "cuda"),
        "trt16": ("tensorrt", "cuda"),
    }
    assert probes["cuda16"].target == "ort-cuda" and probes["trt16"].target == "tensorrt"
    cpu_only = next(
        s for s in encoder_pipeline(recipe_for(checkpoint()), 1).steps if s.id == "latency"
    ).stage
    cpu_probes = cpu_only.probes(Path("/ckpt"), info, {"fp32": Path("/models/fp32")})
    assert {p.device for p in cpu_probes.values()} == {"cpu"}
    stats = memory_stats({"pytorch": Footprint(10, 7), "cpu32": Footprint(5)})
    assert stats == {"peak_rss_bytes": {"pytorch": 10, "cpu32": 5}, "device_bytes": {"pytorch": 7}}
    assert memory_stats({"cpu32": Footprint(5)}) == {"peak_rss_bytes": {"cpu32": 5}}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda)")
def test_the_gpu_probe_measures_device_memory(checkpoint) -> None:
    from pipeline.backends.memory import MemoryProbe, footprint

    ids = np.ones((8, 64), dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": ids, "token_type_ids": np.zeros_like(ids)}
    inputs = ("input_ids", "attention_mask", "token_type_ids")
    probe = MemoryProbe("pytorch", str(checkpoint()), 1, inputs=inputs, device="cuda")
    found = footprint(probe, feed)
    # At least the float32 weights are on the device.
    weights = sum(f.stat().st_size for f in checkpoint().glob("*.safetensors"))
    assert found.device_bytes is not None and found.device_bytes >= weights
    assert found.rss_bytes > 0
