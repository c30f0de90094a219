"""Shared fixtures. Slurm: one real two-node cluster on localhost for the whole session."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

# The fused-kernel tests run Triton's interpreter on CPU tensors. triton decides interpreted vs
# compiled when its functions (tl.zeros, tl.sum, ...) are decorated, i.e. when triton is first
# imported, which any test module may do during collection: so set it here, before all of them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fope_megatron.testing.slurm import LocalSlurmCluster, local_cluster


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[LocalSlurmCluster]:
    """munged + slurmctld + slurmd ``node1``/``node2`` on 127.0.0.1, both idle; torn down at exit.

    Skips when Slurm is not installed, fails instead under ``FOPE_REQUIRE_SLURM=1`` (``.ci/run``).
    """
    yield from local_cluster()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A small built-in corpus (300 synthetic documents) preprocessed to .bin/.idx."""
    from fope_megatron.data.synthetic import build_synthetic_prefix

    return build_synthetic_prefix(tmp_path_factory.mktemp("corpus"), num_docs=300, seed=1)
