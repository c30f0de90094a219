"""ParallelDims: derived degrees and the errors printing every factor (pure, no process groups)."""

from __future__ import annotations

import dataclasses

import pytest

from fope_megatron.parallel.dims import ParallelDims


@pytest.mark.parametrize(
    "world, tp, cp, ulysses, dp, dp_shard",
    [
        (1, 1, 1, 1, 1, 1),
        (8, 1, 1, 1, 8, 8),
        (8, 2, 1, 1, 4, 4),
        (8, 2, 2, 1, 2, 4),
        (8, 1, 1, 2, 4, 8),
        (16, 2, 2, 2, 2, 8),
    ],
)
def test_products(world: int, tp: int, cp: int, ulysses: int, dp: int, dp_shard: int) -> None:
    dims = ParallelDims(world, tp=tp, cp=cp, ulysses=ulysses)
    assert dims.dp == dp
    assert dims.dp_shard == dp_shard
    assert dims.dp * dims.tp * dims.cp * dims.ulysses * dims.pp == world
    assert dims.dp_shard * dims.model_parallel == world
    assert dims.seq_shards == cp * ulysses
    assert dims.model_parallel == tp


def test_str_names_every_degree() -> None:
    text = str(ParallelDims(16, tp=2, cp=2, ulysses=2))
    assert text == "world=16 = dp 2 x tp 2 x cp 2 x ulysses 2 x pp 1"


@pytest.mark.parametrize(
    "world, tp, cp, ulysses, pp, factors",
    [
        (6, 2, 2, 1, 1, "tp*cp*ulysses*pp = 2*2*1*1 = 4"),
        (50, 2, 3, 5, 1, "tp*cp*ulysses*pp = 2*3*5*1 = 30"),
        (4, 1, 1, 1, 3, "tp*cp*ulysses*pp = 1*1*1*3 = 3"),
    ],
)
def test_indivisible_world_prints_every_factor(
    world: int, tp: int, cp: int, ulysses: int, pp: int, factors: str
) -> None:
    with pytest.raises(ValueError) as err:
        ParallelDims(world, tp=tp, cp=cp, ulysses=ulysses, pp=pp)
    assert f"world_size={world} is not divisible by {factors}" in str(err.value)


@pytest.mark.parametrize("name", ["world", "tp", "cp", "ulysses", "pp"])
@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_degrees_must_be_positive_ints(name: str, bad: object) -> None:
    kwargs = {"world": 4, name: bad}
    with pytest.raises(ValueError, match=f"{name}={bad!r} must be a positive integer"):
        ParallelDims(**kwargs)


def test_grad_accum_steps() -> None:
    dims = ParallelDims(8, tp=2, cp=2)
    assert dims.grad_accum_steps(32, 4) == 4
    with pytest.raises(ValueError) as err:
        dims.grad_accum_steps(10, 4)
    assert "global_batch_size=10" in str(err.value)
    assert "micro_batch_size * dp = 4 * 2 = 8" in str(err.value)


def test_frozen() -> None:
    dims = ParallelDims(4, tp=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        dims.tp = 4  # type: ignore[misc]
