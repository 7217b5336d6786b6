"""Stage ``optimize``: the exported graph through a profile's graph passes.

Input: the exported ``model/`` folder; output: ``model/`` in the same layout (model.onnx,
config and tokenizer files). Figures: every pass (what it did, seconds, node counts), the
fused ops in the final graph, and the graph's counts. Whether the fusions reached what the
architecture expects is a check in the report (report/checks.py), not a decision here, so
changing an expectation never re-runs the stage; with ``-v`` a shortfall is explained here
with the rewriter's own reasons.

Postconditions: ``onnx.checker`` passes; the ``standard`` profile leaves only standard ops;
inputs, output and dynamic axes are those of the exported graph.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from pipeline.architectures import family_of
from pipeline.artifacts import Artifact
from pipeline.errors import PassError, PreconditionError, first_line
from pipeline.passes import (
    FUSED_OP_TYPES,
    FUSED_OPS,
    FUSIONS,
    Fusion,
    Profile,
    op_counts,
    profile_passes,
    run_passes,
)
from pipeline.passes._fusion import FusionPass
from pipeline.stages.base import BuildContext, Stage, StageConfig, StageResult
from pipeline.stages.export import (
    _TWO_GB,
    MODEL_FILE,
    graph_stats,
    onnx_dims,
    require_model_file,
    uses_external_data,
)
from pipeline.stages.load import TOKENIZER_FILES, CheckpointInfo

log = logging.getLogger(__name__)


class OptimizeConfig(StageConfig):
    profile: Profile
    fusions: tuple[Fusion, ...] = ()
    #: Residual Adds into LayerNormalization written as Sum (pipeline.passes.residual_sum), so
    #: ONNX Runtime's session does not fuse the SkipLayerNormalization the variant left out.
    residual_sum: bool = False


class OptimizeStage(Stage[OptimizeConfig]):
    name = "optimize"

    def requires(self, inputs: Mapping[str, Artifact]) -> None:
        require_model_file("optimize", inputs["model"].path)

    def key_config(self) -> dict[str, object]:
        config = super().key_config()
        if not config["residual_sum"]:
            del config["residual_sum"]  # graphs without it keep their keys
        return config

    def describe(self) -> str:
        fusions = f" ({', '.join(self.config.fusions)})" if self.config.fusions else ""
        return f"optimize {self.config.profile}{fusions}"

    def run(self, ctx: BuildContext, inputs: Mapping[str, Artifact], out: Path) -> StageResult:
        import onnx
        import onnx_ir as ir

        source = inputs["model"].path
        info = CheckpointInfo.read(inputs["info"])
        model = ir.load(source / MODEL_FILE)
        passes = profile_passes(self.config.profile, self.config.fusions, self.config.residual_sum)
        with ctx.progress.task(f"optimize ({self.config.profile})", len(passes)) as advance:
            model, records = run_passes(model, passes, on_pass=lambda _: advance(1))
        counts = op_counts(model)
        by_type = Counter(node.op_type for node in model.graph)
        fused = {op: by_type[op] for op in FUSED_OP_TYPES if by_type[op]}
        self._explain_shortfalls(source / MODEL_FILE, info, fused)
        if self.config.profile == "standard":
            custom = sorted(op for op in counts if "." in op)
            if custom:
                raise PreconditionError(
                    f"the standard profile left non-standard ops {custom}",
                    "this is a bug in a pass: report it with the model type",
                )
        target = out / "model"
        target.mkdir()
        path = target / MODEL_FILE
        # Weights go to a data file beside the graph when the exported model kept them there
        # (over 2 GB) or the optimized one would pass protobuf's limit; onnx-ir reads weights
        # from the old file and writes every one into the new, so nothing points back.
        weights = sum(
            t.const_value.nbytes
            for t in model.graph.initializers.values()
            if t.const_value is not None
        )
        exported = onnx.load(str(source / MODEL_FILE), load_external_data=False)
        external = uses_external_data(exported) or weights > _TWO_GB
        try:
            ir.save(model, path, external_data=MODEL_FILE + ".data" if external else None)
            onnx.checker.check_model(str(path))
        except (OSError, ValueError, onnx.checker.ValidationError) as error:
            raise PassError(
                f"the optimized graph could not be written or is not valid ONNX: {first_line(error)}",
                "run with -v for the passes' records; build with optimize: none to skip graph passes",
            ) from error
        self._check_interface(path, source / MODEL_FILE)
        for name in ("config.json", *TOKENIZER_FILES):
            if (source / name).is_file():
                shutil.copy2(source / name, target / name)
        stats = {
            "profile": self.config.profile,
            "fusions": fused,
            "passes": [r.as_dict() for r in records],
            **graph_stats(path),
        }
        return StageResult(outputs={"model": "model"}, stats=stats)

    def _explain_shortfalls(
        self, exported: Path, info: CheckpointInfo, fused: dict[str, int]
    ) -> None:
        """With -v: why a fusion matched fewer times than the layer count says it should.

        The rewriter's tracer runs on the graph as it was just before that fusion pass.
        """
        if not log.isEnabledFor(logging.DEBUG):
            return
        import onnx_ir as ir

        layers = int(info.architecture["layers"])
        family = family_of(str(info.architecture["model_type"]))
        passes = profile_passes(self.config.profile, self.config.fusions)
        for name in self.config.fusions:
            op, _ = FUSED_OPS[name]
            per_layer = family.expects(name)
            if not per_layer or fused.get(op, 0) >= layers * per_layer:
                continue
            index = next(i for i, p in enumerate(passes) if isinstance(p, FUSIONS[name]))
            fusion = passes[index]
            assert isinstance(fusion, FusionPass)
            model, _ = run_passes(ir.load(exported), passes[:index])
            log.debug(
                "%s: %d %s for %d layers; the rewriter says why its patterns did not match:\n%s",
                name,
                fused.get(op, 0),
                op,
                layers,
                fusion.explain(model),
            )

    @staticmethod
    def _check_interface(path: Path, exported: Path) -> None:
        import onnx

        new = onnx.load(str(path), load_external_data=False).graph
        old = onnx.load(str(exported), load_external_data=False).graph
        for kind, a, b in (("inputs", new.input, old.input), ("outputs", new.output, old.output)):
            got = {v.name: onnx_dims(v) for v in a}
            want = {v.name: onnx_dims(v) for v in b}
            if kind == "inputs" and got != want:
                raise PreconditionError(
                    f"the optimized graph's inputs {got} differ from the exported {want}",
                    "this is a bug in a pass: report it with the model type",
                )
            if kind == "outputs" and list(got) != list(want):
                raise PreconditionError(
                    f"the optimized graph's outputs {list(got)} differ from {list(want)}",
                    "this is a bug in a pass: report it with the model type",
                )
