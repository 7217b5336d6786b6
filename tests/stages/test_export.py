from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from pipeline.backends.onnxruntime_backend import OrtRunner
from pipeline.errors import ExportError
from pipeline.stages.base import BuildContext
from pipeline.stages.export import MODEL_FILE
from pipeline.stages.load import CheckpointInfo, loaded_model
from tests.stages.helpers import run_export, run_load

TEXTS = [
    "Return a new list containing all items from the iterable.",
    "Short.",
    "The parser reads the header and the body of the message, then returns the result to the caller.",
]


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta"])
def test_export_is_valid_dynamic_and_matches_pytorch(
    checkpoint, tmp_path: Path, family: str
) -> None:
    folder = checkpoint(family)
    ctx = BuildContext()
    info_artifact, _ = run_load(ctx, folder, tmp_path / "load")
    model_dir, result = run_export(ctx, folder, info_artifact, tmp_path / "export")
    info = CheckpointInfo.read(info_artifact)

    path = model_dir.path / MODEL_FILE
    onnx.checker.check_model(str(path), full_check=True)
    assert sorted(result.stats["inputs"]) == sorted(info.inputs)
    assert all(dims == ["batch", "sequence"] for dims in result.stats["inputs"].values())
    assert list(result.stats["outputs"]) == ["last_hidden_state"]
    for name in ("config.json", "tokenizer.json", "vocab.txt"):
        assert (model_dir.path / name).is_file()

    loaded = loaded_model(ctx, folder, info.task)
    assert not loaded.model.training, "the exporter must not leave dropout switched on"
    # A batch and sequence length that differ from the traced example: the axes are dynamic.
    encoded = loaded.tokenizer(TEXTS, padding=True, return_tensors="np")
    feed = {name: encoded[name].astype(np.int64) for name in info.inputs}
    ours = OrtRunner(path, threads=1).run(feed)["last_hidden_state"]
    with torch.no_grad():
        theirs = loaded.model(
            **{k: torch.from_numpy(v) for k, v in feed.items()}
        ).last_hidden_state.numpy()
    mask = encoded["attention_mask"].astype(bool)
    assert ours.shape == theirs.shape == (3, mask.shape[1], 32)
    assert np.abs(ours - theirs)[mask].max() <= 1e-4


def test_export_is_reproducible(checkpoint, tmp_path: Path) -> None:
    folder = checkpoint("bert")
    hashes = []
    for attempt in range(2):
        ctx = BuildContext()  # a fresh model load each time, as in two separate builds
        info, _ = run_load(ctx, folder, tmp_path / f"load{attempt}")
        model_dir, _ = run_export(ctx, folder, info, tmp_path / f"export{attempt}")
        hashes.append(model_dir.sha256)
    assert hashes[0] == hashes[1]


def test_export_names_no_file_of_this_machine(checkpoint, tmp_path: Path) -> None:
    """Install paths must not reach the graph, or two installs export different bytes."""
    ctx = BuildContext()
    info, _ = run_load(ctx, checkpoint("bert"), tmp_path / "load")
    model_dir, _ = run_export(ctx, checkpoint("bert"), info, tmp_path / "export")
    raw = (model_dir.path / MODEL_FILE).read_bytes()
    assert b"site-packages" not in raw and str(Path(__file__).parents[2]).encode() not in raw
    model = onnx.load(str(model_dir.path / MODEL_FILE))
    keys = {p.key for node in model.graph.node for p in node.metadata_props}
    assert "namespace" in keys and "pkg.torch.onnx.stack_trace" not in keys


def test_unexportable_model_is_an_export_error_with_the_reason(tmp_path: Path) -> None:
    """A Longformer (data-dependent sliding-window shapes) fails torch.export; we summarise why."""
    import transformers

    from tests.tiny import save_tokenizer

    folder = tmp_path / "longformer"
    config = transformers.LongformerConfig(
        vocab_size=600,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=130,
        attention_window=[8],
        pad_token_id=0,
    )
    torch.manual_seed(0)
    transformers.AutoModel.from_config(config).save_pretrained(folder)
    save_tokenizer(folder, ["input_ids", "attention_mask"])
    ctx = BuildContext()
    info, _ = run_load(ctx, folder, tmp_path / "load")
    with pytest.raises(ExportError) as caught:
        run_export(ctx, folder, info, tmp_path / "export")
    message = caught.value.message
    assert message.startswith("longformer cannot be exported to ONNX")
    assert "\x1b[" not in message
    assert "data-dependent" in message
    assert not (tmp_path / "export" / "model" / MODEL_FILE).exists()


def test_specialised_axis_is_caught_by_the_postcondition(tmp_path: Path) -> None:
    """Reformer's hashing attention fixes the batch size when traced; the graph is refused."""
    import transformers

    from tests.tiny import save_tokenizer

    folder = tmp_path / "reformer"
    config = transformers.ReformerConfig(
        vocab_size=600,
        hidden_size=32,
        num_attention_heads=2,
        attention_head_size=16,
        feed_forward_size=64,
        axial_pos_shape=[8, 16],
        axial_pos_embds_dim=[16, 16],
        max_position_embeddings=128,
        num_hashes=1,
        attn_layers=["lsh", "local"],
        is_decoder=False,
    )
    torch.manual_seed(0)
    transformers.AutoModel.from_config(config).save_pretrained(folder)
    save_tokenizer(folder, ["input_ids", "attention_mask"])
    ctx = BuildContext()
    info, _ = run_load(ctx, folder, tmp_path / "load")
    with pytest.raises(ExportError, match="batch and sequence must both stay dynamic"):
        run_export(ctx, folder, info, tmp_path / "export")


def test_graph_stats_count_ops(checkpoint, tmp_path: Path) -> None:
    ctx = BuildContext()
    info, _ = run_load(ctx, checkpoint("bert"), tmp_path / "load")
    _, result = run_export(ctx, checkpoint("bert"), info, tmp_path / "export")
    ops = result.stats["ops"]
    assert ops["MatMul"] == 2 * 8  # per layer: Q, K, V, QK^T, AV, output, two FFN
    assert ops["LayerNormalization"] == 1 + 2 * 2
    assert result.stats["opset"]["ai.onnx"] == 20
