"""Fault injection lives on the test side (``fope_megatron/testing/faults.py``): no production
module reads a ``FOPE_FAULT_*`` variable or imports the seam; the optimizer step the trainer drops
under ZeRO-0 is skipped by a flag, not by replacing the method."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import fope_megatron
from fope_megatron.testing import faults
from fope_megatron.train.engine import _skippable

PACKAGE = Path(fope_megatron.__file__).parent
SEAM = re.compile(r"FOPE_FAULT|testing\.faults|testing import .*\bfaults\b|from \. import faults")


def test_production_code_reads_no_fault_variable_and_never_imports_the_seam():
    found = [
        f"{path.relative_to(PACKAGE)}:{n}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if "testing" not in path.relative_to(PACKAGE).parts
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if SEAM.search(line)
    ]
    assert not found, found


def test_loss_factors_parse():
    assert faults.loss_factors("") == {}
    got = faults.loss_factors("5:nan, 7:10")
    assert set(got) == {5, 7} and got[5] != got[5] and got[7] == 10.0


def test_a_skipped_step_changes_neither_the_parameters_nor_the_optimizer_state():
    p = torch.nn.Parameter(torch.ones(3))
    opt = _skippable(torch.optim.AdamW)([p], lr=0.1, foreach=False)
    assert isinstance(opt, torch.optim.AdamW) and type(opt).__name__ == "AdamW"
    p.grad = torch.ones(3)
    opt.skip_next_step = True
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3)) and not opt.state
    assert not opt.skip_next_step and "step" not in vars(opt)  # the flag, not a patched method
    opt.step()  # the next one updates
    assert (p.detach() < 1).all() and opt.state[p]["step"] == 1
