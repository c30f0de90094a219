"""The host snapshot of an asynchronous save: a copy the live tensors cannot change, tensors
shared within a file stay shared, and the next save copies into the same host buffers."""

import torch

from fope_megatron.checkpoint.async_save import snapshot


def test_snapshot_copies_shares_and_reuses_buffers():
    w = torch.arange(6.0).reshape(2, 3)
    state = {"module": {"w": w, "tied": w}, "opt": [torch.ones(4), 3], "step": 7}
    made = []
    first = snapshot(state, made=made)
    w.add_(100)  # training goes on
    assert torch.equal(first["module"]["w"], torch.arange(6.0).reshape(2, 3))
    assert first["module"]["tied"] is first["module"]["w"] and len(made) == 2
    assert first["opt"][1] == 3 and first["step"] == 7

    again = []
    second = snapshot(state, reuse=made, made=again)
    assert second["module"]["w"].data_ptr() == made[0].data_ptr()  # the same host memory
    assert torch.equal(second["module"]["w"], w)  # now holding the new values
    other = {"module": {"w": torch.zeros(3, 2), "tied": w}, "opt": [torch.ones(4), 3]}
    third = snapshot(other, reuse=again, made=[])
    assert third["module"]["w"].data_ptr() != again[0].data_ptr()  # another shape: a new buffer
