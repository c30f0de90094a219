"""fope-export: transformers loads the exported model and matches the megatron-core model.

Variants are built in-process (megatron-core model -> export -> transformers' loaders); the TP=2
and ZeRO-3 checkpoints are written by the real trainer and exported by the real CLI.
"""

import subprocess
import sys

import pytest
import torch

from fope_megatron.testing import launch
from fope_megatron.testing.distributed import run_distributed

TOL = 1e-4
TRAIN_LEN = 64
VARIANTS = {
    "fope_mha": ("fope", []),
    "fope_gqa_untied": ("fope", ["model.num_query_groups=2", "model.untie_embeddings=true"]),
    "fope_interleaved": ("fope", ["fope.interleaved=true"]),
    "fope_rotary_half": ("fope", ["model.rotary_percent=0.5"]),
    "rope": ("rope", []),
    "none": ("none", []),
    "fope_yarn": ("fope", ["position.scaling=yarn", "position.factor=4"]),
}


def export_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fope_megatron.checkpoint.hf.export", *map(str, args)],
        env=launch.env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _variants(rank, world, out):
    from fope_megatron.checkpoint.hf.export import write_hf_dir
    from fope_megatron.model.builder import build_gpt
    from fope_megatron.parallel.setup import init_model_parallel
    from fope_megatron.testing.hf import load_hf, parity
    from fope_megatron.testing.models import tiny_config

    init_model_parallel(tp=1)
    result = {}
    for name, (kind, overrides) in VARIANTS.items():
        # larger weights than the default init, so that logits (and FoPE) matter
        cfg = tiny_config(kind, TRAIN_LEN, "model.init_method_std=0.2", *overrides)
        model = build_gpt(cfg).eval()
        write_hf_dir(cfg, model.state_dict(), out / name)
        hf = load_hf(out / name)
        result[name] = parity(model, hf, cfg.model.vocab_size, [TRAIN_LEN, 4 * TRAIN_LEN])
        if kind == "fope":  # control: the trained coefficients matter
            for layer in hf.model.layers:
                layer.self_attn.coef_cos.normal_()
            result[name + "_control"] = parity(model, hf, cfg.model.vocab_size, [TRAIN_LEN])
    return result


def test_export_variants_match_megatron_logits(tmp_path):
    diffs = run_distributed(_variants, 1, tmp_path)[0]
    for name in VARIANTS:
        for length, diff in diffs[name].items():
            assert diff <= TOL, (name, length, diff)
        if name + "_control" in diffs:
            assert diffs[name + "_control"][TRAIN_LEN] > 1e-2, name


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Real trainer checkpoints (TP=2 GQA untied; ZeRO-3 MHA), exported by the CLI."""
    root = tmp_path_factory.mktemp("hf")
    runs = {
        "tp2": (["parallel.tp=2", "model.num_query_groups=2", "model.untie_embeddings=true"],
                "torchrun", 2),
        "zero3": (["deepspeed.zero_stage=3"], "python", 1),
    }  # fmt: skip
    out = {}
    for name, (overrides, launcher, nproc) in runs.items():
        run_dir = root / name
        launch.train(run_dir, ["data.synthetic=true", "train.steps=2", *overrides], launcher, nproc)
        proc = export_cli("--run", run_dir, "--out", root / f"{name}_hf")
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name] = (run_dir, root / f"{name}_hf")
    return out


def _trained_parity(rank, world, runs):
    from fope_megatron.checkpoint.full_state import load_model
    from fope_megatron.testing.hf import hf_greedy, load_hf, megatron_greedy, parity

    result = {}
    for name, (run_dir, hf_dir) in runs.items():
        model, cfg, _ = load_model(run_dir)
        hf = load_hf(hf_dir)
        vocab = cfg.model.vocab_size
        result[name] = parity(model, hf, vocab, [TRAIN_LEN, 4 * TRAIN_LEN])
        prompt = torch.tensor([list(b"The grass is green. The sky is")])
        result[name + "_greedy"] = (
            hf_greedy(hf, prompt, 32, use_cache=True),
            hf_greedy(hf, prompt, 32, use_cache=False),
            megatron_greedy(model, prompt, 32, vocab),
        )
    return result


@pytest.mark.integration
def test_trainer_checkpoints_export_with_parity_and_cached_greedy(exported):
    result = run_distributed(_trained_parity, 1, exported)[0]
    for name in exported:
        for length, diff in result[name].items():
            assert diff <= TOL, (name, length, diff)
        cached, uncached, ours = result[name + "_greedy"]
        assert cached.shape == (1, 32)
        assert torch.equal(cached, uncached) and torch.equal(cached, ours), name


@pytest.mark.integration
def test_export_dir_is_self_contained(exported):
    import json

    _, hf_dir = exported["tp2"]
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["fope"]["kind"] == "fope" and config["num_key_value_heads"] == 2
    assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_fope_llama.")
    assert not config["tie_word_embeddings"] and config["vocab_size"] == 258
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    text = "héllo, pass key 48213\n"
    assert tok.encode(text, add_special_tokens=False) == list(text.encode())
    assert tok.eos_token_id == 256 and tok.pad_token_id == 257


@pytest.mark.integration
def test_lm_eval_hflm_loglikelihood_matches_ours(exported):
    pytest.importorskip("lm_eval", reason="the lm-eval extra (make test installs it)")
    run_dir, hf_dir = exported["zero3"]
    requests = [("The grass is", " green."), ("The pass key is", " 48213"), ("Here we", " go")]
    theirs = run_distributed(_lm_eval_loglikelihood, 1, str(hf_dir), requests)[0]
    ours = run_distributed(_our_loglikelihood, 1, run_dir, requests)[0]
    for (a, greedy_a), (b, greedy_b) in zip(theirs, ours, strict=True):
        assert abs(a - b) <= TOL and greedy_a == greedy_b, (theirs, ours)


def _lm_eval_loglikelihood(rank, world, hf_dir, requests):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=hf_dir, trust_remote_code=True, dtype="float32", batch_size=1,
              device="cpu")  # fmt: skip
    instances = [
        Instance(request_type="loglikelihood", doc={}, arguments=req, idx=i)
        for i, req in enumerate(requests)
    ]
    return [(float(ll), bool(greedy)) for ll, greedy in lm.loglikelihood(instances)]


def _our_loglikelihood(rank, world, run_dir, requests):
    """Sum of log-probs of the continuation bytes, from the megatron-core model over the real
    vocab, with the byte tokenizer (what the exported tokenizer must also produce)."""
    from fope_megatron.checkpoint.full_state import load_model
    from fope_megatron.testing.hf import megatron_logits

    model, cfg, _ = load_model(run_dir)
    out = []
    for context, continuation in requests:
        ctx, cont = list(context.encode()), list(continuation.encode())
        tokens = torch.tensor([ctx + cont])
        logp = torch.log_softmax(megatron_logits(model, tokens, cfg.model.vocab_size), -1)[0]
        rows = logp[len(ctx) - 1 : -1]
        target = torch.tensor(cont)
        ll = rows.gather(-1, target[:, None]).sum().item()
        out.append((ll, bool((rows.argmax(-1) == target).all())))
    return out


@pytest.mark.integration
def test_export_errors_name_the_input(exported, tmp_path):
    run_dir, hf_dir = exported["zero3"]
    empty = tmp_path / "norun"
    (empty / "checkpoints").mkdir(parents=True)
    (empty / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    cases = [
        (["--run", empty, "--out", tmp_path / "a"], "no complete checkpoint"),
        (["--run", run_dir, "--checkpoint", "step_7", "--out", tmp_path / "b"], "step_7"),
        (["--run", run_dir, "--out", hf_dir], "--force"),
        (["--run", tmp_path / "nothing", "--out", tmp_path / "c"], "config.yaml"),
    ]
    for args, needle in cases:
        proc = export_cli(*args)
        assert proc.returncode == 2 and needle in proc.stderr, (args, proc.stderr[-2000:])
    assert export_cli("--run", run_dir, "--out", hf_dir, "--force").returncode == 0


def _passkey_both_ways(rank, world, run_dir):
    from fope_megatron.checkpoint.full_state import load_model
    from fope_megatron.checkpoint.hf.export import transformers_model
    from fope_megatron.data.tokenizer import get_tokenizer
    from fope_megatron.eval.loader import cached_greedy_fn, logits_fn
    from fope_megatron.eval.passkey import _greedy, evaluate_passkey, sample_trials

    model, cfg, _ = load_model(run_dir)
    fn, tok = logits_fn(model), get_tokenizer("byte")
    greedy = cached_greedy_fn(transformers_model(cfg, model.state_dict()))
    kw = dict(n_trials=4, seed=3, max_batch_size=2, progress=False)
    full = evaluate_passkey(fn, tok, [128, 256], **kw)
    cached = evaluate_passkey(fn, tok, [128, 256], greedy_fn=greedy, **kw)
    prompts = torch.tensor([s.tokens for s in sample_trials(tok, 256, 2, 2, seed=3)])
    return full, cached, _greedy(fn, prompts, 8), greedy(prompts, 8)


@pytest.mark.integration
def test_passkey_through_kv_cache_gives_the_same_answers(exported):
    full, cached, tokens_full, tokens_cached = run_distributed(
        _passkey_both_ways, 1, exported["tp2"][0]
    )[0]
    assert full == cached
    assert torch.equal(tokens_full, tokens_cached)
