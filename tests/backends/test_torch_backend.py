"""TorchRunner: which module it runs, a copy or the caller's."""

import torch

from pipeline.backends.torch_backend import TorchRunner


def test_a_cast_copies_unless_the_module_is_handed_over() -> None:
    """A build shares its float32 model, so a cast (or a move to the GPU) runs on a copy; the
    memory probe's fresh process hands its model over, which then moves in place, as a
    deployment's model.to() does, instead of holding the weights twice."""
    shared = torch.nn.Linear(4, 4)
    copied = TorchRunner(shared, "out", dtype="float16")
    assert copied.module is not shared and shared.weight.dtype == torch.float32
    assert copied.module.weight.dtype == torch.float16
    owned = torch.nn.Linear(4, 4)
    moved = TorchRunner(owned, "out", dtype="float16", owned=True)
    assert moved.module is owned and owned.weight.dtype == torch.float16
    # The float32 CPU model is used as it is either way.
    assert TorchRunner(shared, "out").module is shared
