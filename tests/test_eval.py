"""Evaluation building blocks: perplexity vs length, passkey retrieval, reports and plots."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fope_megatron.data.tokenizer import get_tokenizer
from fope_megatron.eval.passkey import (
    NEEDLE_HEAD,
    QUESTION,
    bucket_labels,
    evaluate_passkey,
    make_passkey_sample,
    sample_trials,
)
from fope_megatron.eval.perplexity import LengthNotServedError, evaluate_perplexity
from fope_megatron.eval.report import compare, write_report

VOCAB = 37
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class TinyCausalLM(nn.Module):
    """A one-layer causal transformer: stands for "a model", not for megatron."""

    def __init__(self, vocab: int = VOCAB, d: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        return self.head(self.enc(self.emb(tokens), mask=mask, is_causal=True))


class Bigram(nn.Module):
    """Context-free next-token model: logits depend on the current token only."""

    def __init__(self, vocab: int = VOCAB) -> None:
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table(tokens)


@pytest.fixture
def stream() -> torch.Tensor:
    return torch.randint(0, VOCAB, (200,), generator=torch.Generator().manual_seed(0))


def test_perplexity_equals_exp_mean_cross_entropy(stream: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = TinyCausalLM().eval()
    res = evaluate_perplexity(model, stream, [8, 16, 64], max_batch_size=3, progress=False)
    n = (200 // 64) * 64
    for L in (8, 16, 64):
        chunks = stream[:n].view(-1, L)
        with torch.no_grad():
            logits = model(chunks)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), chunks[:, 1:].reshape(-1))
        assert res[L]["ppl"] == pytest.approx(math.exp(loss.item()), rel=1e-5)
        assert res[L]["nll"] == pytest.approx(loss.item(), rel=1e-5)
        assert res[L]["chunks"] == n // L
        assert res[L]["tokens"] == (n // L) * (L - 1)
        assert res[L]["stride"] is None


def test_chunks_use_same_tokens_across_lengths(stream: torch.Tensor) -> None:
    seen: dict[int, list[torch.Tensor]] = {}

    def spy(tokens: torch.Tensor) -> torch.Tensor:
        seen.setdefault(tokens.shape[1], []).append(tokens.clone())
        return torch.zeros(*tokens.shape, VOCAB)

    evaluate_perplexity(spy, stream, [16, 32, 64], max_batch_size=2, progress=False)
    span = stream[:192]  # largest multiple of the longest length
    for L in (16, 32, 64):
        assert torch.equal(torch.cat(seen[L]).reshape(-1), span), L

    seen.clear()
    res = evaluate_perplexity(spy, stream, [16, 24], n_tokens=64, progress=False)
    assert torch.equal(torch.cat(seen[16]).reshape(-1), stream[:64])
    assert torch.equal(torch.cat(seen[24]).reshape(-1), stream[:48])  # remainder dropped
    assert res[24]["chunks"] == 2


def test_sliding_window_scores_each_token_once(stream: torch.Tensor) -> None:
    torch.manual_seed(1)
    bigram = Bigram()
    L, S = 16, 5
    res = evaluate_perplexity(bigram, stream, [L], stride=S, max_batch_size=4, progress=False)
    n_windows = (192 - L) // S + 1  # span: the largest multiple of L in 200 tokens
    end = (n_windows - 1) * S + L  # tokens 1..end-1 are scored exactly once
    with torch.no_grad():
        ref = F.cross_entropy(bigram(stream[: end - 1]), stream[1:end])
    assert res[L]["tokens"] == end - 1
    assert res[L]["chunks"] == n_windows
    assert res[L]["ppl"] == pytest.approx(math.exp(ref.item()), rel=1e-5)


def test_sliding_window_matches_per_window_reference(stream: torch.Tensor) -> None:
    torch.manual_seed(2)
    model = TinyCausalLM().eval()
    L = 32
    res = evaluate_perplexity(model, stream, [L], stride=0.25, n_tokens=128, progress=False)
    S = 8
    losses = []
    with torch.no_grad():
        for k, start in enumerate(range(0, 128 - L + 1, S)):
            w = stream[start : start + L]
            nll = F.cross_entropy(model(w[None])[0, :-1], w[1:], reduction="none")
            losses.append(nll if k == 0 else nll[-S:])
    ref = torch.cat(losses)
    assert res[L]["stride"] == S
    assert res[L]["tokens"] == ref.numel()
    assert res[L]["ppl"] == pytest.approx(math.exp(ref.mean().item()), rel=1e-5)


def test_too_long_length_raises_before_any_forward(stream: torch.Tensor) -> None:
    calls = []

    def spy(tokens: torch.Tensor) -> torch.Tensor:
        calls.append(tokens.shape)
        return torch.zeros(*tokens.shape, VOCAB)

    with pytest.raises(LengthNotServedError, match=r"length 256 .*200"):
        evaluate_perplexity(spy, stream, [16, 256], progress=False)
    with pytest.raises(LengthNotServedError, match=r"length 64 .*n_tokens=32"):
        evaluate_perplexity(spy, stream, [16, 64], n_tokens=32, progress=False)
    with pytest.raises(ValueError, match="stride"):
        evaluate_perplexity(spy, stream, [16], stride=16, progress=False)
    assert calls == []


def test_passkey_prompt_layout_and_length() -> None:
    tok = get_tokenizer("byte")
    for length in (97, 128, 333, 1000):
        for depth in (0.0, 0.37, 1.0):
            s = make_passkey_sample(tok, length, depth, "48213")
            assert len(s.tokens) == length
            assert s.tokens[s.key_pos : s.key_pos + len(s.answer)] == s.answer
            assert tok.decode(s.answer).strip() == "48213"
            assert tok.decode(s.tokens[s.needle_pos :]).startswith(NEEDLE_HEAD + " 48213.")
            assert tok.decode(s.tokens).endswith(QUESTION)
            assert s.needle_pos == round(depth * s.n_filler)
    with pytest.raises(ValueError, match="too short"):
        make_passkey_sample(tok, 50, 0.5, "48213")
    with pytest.raises(ValueError, match=r"length 101 is too short.*lengths >= 102"):
        evaluate_passkey(scripted_copier(), tok, [128, 101], progress=False)


def test_passkey_trials_are_seeded_and_depth_buckets_balanced() -> None:
    tok = get_tokenizer("byte")
    trials = sample_trials(tok, 400, n_trials=20, n_buckets=5, seed=3)
    assert [t.tokens for t in trials] == [t.tokens for t in sample_trials(tok, 400, 20, 5, 3)]
    assert [t.key for t in trials] != [t.key for t in sample_trials(tok, 400, 20, 5, 4)]
    for i, t in enumerate(trials):
        assert len(t.key) == 5 and t.key.isdigit()
        assert len(t.tokens) + len(t.answer) - 1 == 400  # the key is read back within 400
        assert t.tokens[-len(QUESTION) :] == tok.encode(QUESTION)
        b = i % 5
        assert t.bucket(5) == b
        assert b / 5 <= t.needle_pos / t.n_filler <= (b + 1) / 5
    assert bucket_labels(5) == ["0-0.2", "0.2-0.4", "0.4-0.6", "0.6-0.8", "0.8-1"]


def scripted_copier(wrong: bool = False):
    """A logits_fn that finds the needle and emits its key after the question (or wrong digits)."""
    tok = get_tokenizer("byte")
    pattern = tok.encode(NEEDLE_HEAD)
    p = len(pattern)

    def fn(tokens: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*tokens.shape, tok.vocab_size)
        for i, row in enumerate(tokens.tolist()):
            hits = [j for j in range(len(row) - p + 1) if row[j : j + p] == pattern]
            answer_src, question_end = hits[0] + p, hits[-1] + p
            for t in range(question_end - 1, len(row)):
                target = row[answer_src + t - (question_end - 1)]
                if wrong and 48 <= target <= 57:
                    target = 48 + (target - 48 + 1) % 10
                out[i, t, target] = 30.0
        return out

    return fn


def test_passkey_scripted_copier_scores_one_and_wrong_scores_zero() -> None:
    tok = get_tokenizer("byte")
    kw = dict(n_trials=10, n_buckets=5, max_batch_size=4, progress=False)
    good = evaluate_passkey(scripted_copier(), tok, [128, 300], **kw)
    bad = evaluate_passkey(scripted_copier(wrong=True), tok, [128, 300], **kw)
    for L in (128, 300):
        assert good["passkey"][L] == 1.0
        assert bad["passkey"][L] == 0.0
        assert set(good["passkey_by_depth"][L].values()) == {1.0}
        assert set(bad["passkey_by_depth"][L].values()) == {0.0}
        assert good["passkey_logprob"][L] > -1e-3
        assert bad["passkey_logprob"][L] < -10.0


def _report(tmp_path, name: str, pe: str, stream: torch.Tensor) -> dict:
    torch.manual_seed(0)
    ppl = evaluate_perplexity(Bigram(), stream, [16, 32, 64], progress=False)
    pk = evaluate_passkey(
        scripted_copier(wrong=pe == "rope"),
        get_tokenizer("byte"),
        [128, 256],
        n_trials=5,
        progress=False,
    )
    return write_report(
        tmp_path / name,
        perplexity=ppl,
        passkey=pk,
        train_seq_len=32,
        checkpoint=f"runs/{name}/step_10",
        position_embedding=pe,
        params=1369,
        details={"protocol": "chunks"},
    )


def test_report_writes_json_markdown_and_pngs(tmp_path, stream: torch.Tensor) -> None:
    _report(tmp_path, "a", "fope", stream)
    out = tmp_path / "a"
    data = json.loads((out / "eval.json").read_text())
    assert {"perplexity", "passkey", "train_seq_len", "checkpoint"} <= data.keys()
    assert set(data["perplexity"]) == {"16", "32", "64"}
    assert all(isinstance(v, float) for v in data["perplexity"].values())
    assert data["passkey"] == {"128": 1.0, "256": 1.0}
    assert data["train_seq_len"] == 32 and data["checkpoint"] == "runs/a/step_10"
    assert data["label"] == "fope 1.37K" and data["details"]["protocol"] == "chunks"
    assert data["details"]["perplexity"]["16"]["chunks"] == 12
    assert "| 64 | 2 |" in (out / "eval.md").read_text()
    for png in ("perplexity.png", "passkey.png", "passkey_depth.png"):
        blob = (out / png).read_bytes()
        assert blob.startswith(PNG_MAGIC) and len(blob) > 5000, png


def test_compare_two_runs(tmp_path, stream: torch.Tensor) -> None:
    _report(tmp_path, "a", "fope", stream)
    _report(tmp_path, "b", "rope", stream)
    paths = compare([tmp_path / "a", tmp_path / "b"], tmp_path / "cmp")
    table = paths["table"].read_text()
    assert "ppl fope 1.37K" in table and "passkey rope 1.37K" in table
    assert table.count("\n| 128 |") == 1  # one table, one row per length
    assert paths["figure"].read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(FileNotFoundError, match="eval.json"):
        compare([tmp_path / "missing"], tmp_path / "cmp")
