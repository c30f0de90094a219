"""The apply benchmark runs on tiny shapes and its saved-memory check holds (times not asserted)."""

import json

import pytest

from fope_megatron.bench.apply import main


@pytest.mark.parametrize("groups, dtype", [(4, "fp32"), (2, "bf16")])
def test_bench_apply_runs_and_memory_check_holds(tmp_path, capsys, groups, dtype):
    out = tmp_path / "bench.json"
    argv = ["--seq", "64", "--heads", "4", "--groups", str(groups), "--head-dim", "32"]
    argv += ["--train-seq-len", "32", "--dtype", dtype, "--repeats", "1", "--warmup", "0"]
    doc = main([*argv, "--json", str(out)])

    assert json.loads(out.read_text()) == json.loads(json.dumps(doc))
    assert doc["memory_check_ok"] is True
    assert doc["meta"]["repeats"] == 1 and doc["meta"]["device"] == "cpu"
    (row,) = doc["results"]
    assert (row["seq"], row["heads"], row["groups"], row["head_dim"]) == (64, 4, groups, 32)
    assert row["dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    for name in ("fope", "rope"):
        res = row[name]
        assert res["median_ms"] > 0 and len(res["times_ms"]) == 1
        assert res["saved_bytes"] > 0 and res["saved_tensors"] > 0
    # Deterministic memory accounting: FoPE saves exactly its two float32 tables [s, G, d_r]
    # (shared by q and k); megatron's RoPE saves cos and sin [s, 1, 1, d] per call, in x's dtype.
    assert row["table_bytes"] == 64 * groups * 32 * 4
    assert row["fope"]["saved_bytes"] == 2 * row["table_bytes"]
    assert row["rope"]["saved_bytes"] == 4 * 64 * 32 * (4 if dtype == "fp32" else 2)
    assert row["fope"]["saved_bytes"] <= row["saved_limit_bytes"]
    assert row["saved_limit_bytes"] == row["rope"]["saved_bytes"] + 2 * row["table_bytes"]
    assert row["ratio"] > 0 and row["memory_check_ok"] is True

    printed = capsys.readouterr().out
    assert "FoPE/RoPE" in printed and "check FoPE <= RoPE + 2 x table" in printed
    assert "holds" in printed


def test_bench_apply_rejects_bad_groups():
    with pytest.raises(SystemExit):
        main(["--heads", "4", "--groups", "3", "--repeats", "1"])


@pytest.mark.slow
def test_profile_apply_lists_the_fused_kernels(capsys):
    """The GPU diagnosis script runs end to end (CPU: through the Triton interpreter) and its
    profile shows the fused autograd function of each method, forward and backward."""
    from fope_megatron.bench.profile_apply import main as profile_main

    assert profile_main(["--device", "cpu", "--seq", "16", "--iters", "1",
                         "--methods", "fope_fused,fope_fused_narrow_tf32x3"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert out.count("_FusedFoPEBackward") >= 2
    assert "## fope_fused_narrow_tf32x3, s=16" in out and "## autotune choices" in out


def test_suite_times_the_kernel_variants_only_when_asked():
    """The suite's default methods leave out the kernel along named paths (slow to autotune, and
    the GPU check must fit one call); ``variants=True`` (or naming them) brings them in."""
    import torch

    from fope_megatron.bench.methods import VARIANTS, available_methods

    cpu = torch.device("cpu")
    assert not set(VARIANTS) & set(available_methods(cpu))
    assert set(VARIANTS) <= set(available_methods(cpu, variants=True))
    assert "fope_fused" in available_methods(cpu)


def test_suite_path_variants_run_and_match_their_defaults():
    """The kernel along named paths (``*_dot``, ``*_each``: one head at a time; ``*_tile``: a
    group's heads as one tile) runs in the suite, is compared with the best RoPE like the
    default kernel, and gives the default's outputs."""
    import torch

    from fope_megatron.bench.methods import build_step
    from fope_megatron.bench.suite import format_suite, run_suite

    cpu = torch.device("cpu")
    names = ["fope_fused", "fope_fused_dot", "fope_fused_tile", "rope_fused",
             "rope_fused_each", "rope_fused_tile"]  # fmt: skip
    doc = run_suite(cpu, seqs=[16], methods=names, dtype=torch.float32, train_seq_len=16,
                    repeats=1, warmup=0, heads=4, groups=2, head_dim=32, copy_bytes=2**20)  # fmt: skip
    row = doc["results"][0]
    assert set(row["over_best_rope"]) == {"fope_fused", "fope_fused_dot", "fope_fused_tile"}
    assert row["best_fused_rope"] in ("rope_fused", "rope_fused_each", "rope_fused_tile")
    assert "variants / " in format_suite(doc)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(16, 1, 4, 32, generator=gen), torch.randn(16, 1, 2, 32, generator=gen)
    for name, variants in (("fope_fused", ("_dot", "_tile")), ("rope_fused", ("_each", "_tile"))):
        torch.manual_seed(0)  # the same FoPE coefficients for both builds
        base = build_step(name, 16, 4, 2, 32, 16, cpu)[0](q, k)
        for variant in variants:
            torch.manual_seed(0)
            other = build_step(name + variant, 16, 4, 2, 32, 16, cpu)[0](q, k)
            for a, b in zip(base, other, strict=True):
                assert (a - b).abs().max().item() <= 1e-6
