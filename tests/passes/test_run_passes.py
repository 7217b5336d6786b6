import pytest

from pipeline.errors import PassError
from pipeline.passes import profile_passes, run_passes
from pipeline.passes.base import GraphPass, PassResult
from pipeline.passes.infer_shapes import InferShapes
from tests.passes.conftest import unrelated_graph


class Broken(GraphPass):
    name = "broken"

    def run(self, model):  # type: ignore[no-untyped-def]
        raise ValueError("cannot handle this graph")


def test_a_failing_pass_is_named_with_the_passes_before_it() -> None:
    with pytest.raises(
        PassError, match=r"pass broken failed \(after: infer-shapes\).*cannot handle"
    ):
        run_passes(unrelated_graph(), [InferShapes(), Broken()])


def test_records_say_what_each_pass_did() -> None:
    seen = []
    _, records = run_passes(unrelated_graph(), [InferShapes()], on_pass=seen.append)
    assert seen == records
    assert records[0].as_dict()["pass"] == "infer-shapes"
    assert records[0].nodes_before == records[0].nodes_after == 3


def test_profiles() -> None:
    def names(passes: list[GraphPass]) -> list[str]:
        return [p.name for p in passes]

    assert "fuse-attention" not in names(profile_passes("standard"))
    ort = names(profile_passes("ort", ["ffn", "attention"]))
    # Fusions run in their fixed order whatever order the recipe lists them in.
    assert ort.index("fuse-attention") < ort.index("fuse-ffn")
    assert "fuse-skip-layernorm" not in ort
    assert ort[-3:] == ["fold-constants", "remove-unused", "infer-shapes"]


def test_a_pass_result_is_returned_unchanged_by_the_runner() -> None:
    class Marks(GraphPass):
        name = "marks"

        def run(self, model):  # type: ignore[no-untyped-def]
            return PassResult(model, True, {"marked": 1})

    _, records = run_passes(unrelated_graph(), [Marks()])
    assert records[0].changed and records[0].stats == {"marked": 1}
