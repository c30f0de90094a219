"""Data pipeline: synthetic corpus, preprocessing to IndexedDataset, GPTDataset builds, sampler."""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from fope_megatron.data.datasets import (
    TokenizerInfo,
    batch_iterator,
    build_datasets,
    parse_data_path,
)
from fope_megatron.data.preprocess import main as preprocess_main
from fope_megatron.data.preprocess import preprocess, read_meta
from fope_megatron.data.synthetic import (
    build_synthetic_prefix,
    generate_corpus,
    passkey_document,
    synthetic_documents,
    unigram_entropy,
)
from fope_megatron.data.tokenizer import ByteTokenizer, get_tokenizer
from fope_megatron.testing.distributed import run_distributed

SEQ = 64
EXTRA_DOCS = ["héllo wörld ✓ — unicode survives", "short", "line one\nline two\n"]


def write_jsonl(path, docs, key="text"):
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({key: d, "id": len(d)}) + "\n")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """60 synthetic documents plus a few odd ones, preprocessed once with one worker."""
    root = tmp_path_factory.mktemp("data")
    docs = synthetic_documents(60, seed=3) + EXTRA_DOCS
    src = write_jsonl(root / "corpus.jsonl", docs)
    meta = preprocess([src], root / "one", tokenizer="byte", workers=1)
    return {"root": root, "docs": docs, "src": src, "prefix": str(root / "one"), "meta": meta}


def letter_prefix(root, letter, n=40):
    """A prefix whose documents use only ``letter`` bytes, so samples reveal their source."""
    docs = [letter * (50 + 7 * i) for i in range(n)]
    preprocess([write_jsonl(root / f"{letter}.jsonl", docs)], root / letter)
    return str(root / letter)


# ----- synthetic corpus ---------------------------------------------------------------------


def test_synthetic_corpus_is_deterministic_and_prefix_stable(tmp_path):
    docs = synthetic_documents(40, seed=7)
    assert docs == synthetic_documents(40, seed=7)
    assert docs[:10] == synthetic_documents(10, seed=7)
    assert docs != synthetic_documents(40, seed=8)
    path = generate_corpus(tmp_path / "c.jsonl", 40, seed=7)
    assert [json.loads(line)["text"] for line in path.read_text().splitlines()] == docs
    assert all(300 <= len(d.encode()) <= 3200 for d in docs)


def test_synthetic_corpus_has_long_range_structure():
    docs = synthetic_documents(200, seed=0)
    passkeys = [d for d in docs if "pass key" in d]
    stories = [d for d in docs if "Where does" in d]
    assert 20 <= len(passkeys) <= 80 and len(stories) >= 40
    for d in passkeys:
        m = re.search(r"The pass key is (\d{5})\. Remember it\. (\d{5}) is the pass key\.", d)
        assert m and m.group(1) == m.group(2)
        assert d.endswith(f"What is the pass key? The pass key is {m.group(1)}.")
        assert d.index(m.group(0)) < d.rindex("What is the pass key?")
    for d in stories:
        # the fact introduced in the first sentence is the answer asked for at the end
        name, city = re.match(r"(\w+) is a \w+ who lives in (\w+)\.", d).groups()
        assert d.endswith(f"Where does {name} live? {name} lives in {city}.")
    prompt = passkey_document(12345, 2, 1, answer=False)
    assert prompt.endswith("The pass key is") and prompt.count("12345") == 2


def test_build_synthetic_prefix_round_trips_and_is_reused(tmp_path):
    prefix = build_synthetic_prefix(tmp_path, num_docs=12, seed=5)
    assert read_meta(prefix)["num_docs"] == 12
    ds = IndexedDataset(prefix)
    assert ByteTokenizer().decode(ds[3][:-1]) == synthetic_documents(12, seed=5)[3]
    mtime = os.path.getmtime(prefix + ".bin")
    assert build_synthetic_prefix(tmp_path, num_docs=12, seed=5) == prefix
    assert os.path.getmtime(prefix + ".bin") == mtime


def test_unigram_entropy():
    assert unigram_entropy([1, 2, 3, 4] * 5) == pytest.approx(math.log(4))
    assert unigram_entropy(np.zeros(10, dtype=np.int64)) == pytest.approx(0.0)
    ids = ByteTokenizer().encode("".join(synthetic_documents(50, seed=1)))
    assert 2.0 < unigram_entropy(ids) < math.log(256)


# ----- preprocessing ------------------------------------------------------------------------


def test_preprocess_round_trip(corpus):
    tok, docs = ByteTokenizer(), corpus["docs"]
    ds = IndexedDataset(corpus["prefix"])
    assert len(ds) == len(docs)
    assert ds.index.dtype == np.uint16
    assert list(ds.document_indices) == list(range(len(docs) + 1))  # one sequence per document
    for i, doc in enumerate(docs):
        seq = ds[i]
        assert seq[-1] == tok.eod and tok.eod not in seq[:-1]
        assert tok.decode(seq[:-1]) == doc
    raw = np.fromfile(corpus["prefix"] + ".bin", dtype=np.uint16)
    expected = [t for d in docs for t in tok.encode(d) + [tok.eod]]
    np.testing.assert_array_equal(raw, expected)
    meta = read_meta(corpus["prefix"])
    assert meta == corpus["meta"]
    assert (meta["tokenizer"], meta["vocab_size"], meta["eod"]) == ("byte", 258, 256)
    assert (meta["num_docs"], meta["num_tokens"]) == (len(docs), len(expected))


def test_preprocess_workers_match_one_worker(corpus):
    prefix = corpus["root"] / "two"
    meta = preprocess([corpus["src"]], prefix, workers=2)
    for ext in (".bin", ".idx"):
        assert (prefix.parent / f"two{ext}").read_bytes() == open(
            corpus["prefix"] + ext, "rb"
        ).read()
    assert meta["num_tokens"] == corpus["meta"]["num_tokens"]


def test_preprocess_other_formats(tmp_path):
    import datasets

    docs = ["first document", "second one, longer", "third ✓"]
    table = datasets.Dataset.from_dict({"body": docs})
    table.to_parquet(str(tmp_path / "d.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    for i, d in enumerate(docs):
        (tmp_path / f"t{i}.txt").write_text(d)
    cases = {
        "parquet": dict(inputs=[tmp_path / "d.parquet"], json_key="body"),
        "saved": dict(inputs=[tmp_path / "saved"], json_key="body"),
        "text": dict(inputs=[str(tmp_path / "t*.txt")]),
    }
    tok = ByteTokenizer()
    for name, kw in cases.items():
        preprocess(output_prefix=tmp_path / name, **kw)
        ds = IndexedDataset(str(tmp_path / name))
        assert [tok.decode(ds[i][:-1]) for i in range(len(ds))] == docs, name


def test_preprocess_with_local_hf_tokenizer(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    docs = synthetic_documents(20, seed=1)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(docs, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", unk_token="<unk>")
    hf.save_pretrained(str(tmp_path / "tok"))
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    meta = preprocess([src], tmp_path / "hf", tokenizer=str(tmp_path / "tok"), workers=2)
    assert (meta["vocab_size"], meta["eod"], meta["pad"]) == (400, 1, None)
    tok = get_tokenizer(str(tmp_path / "tok"))
    ds = IndexedDataset(str(tmp_path / "hf"))
    assert [tok.decode(ds[i][:-1]) for i in range(len(ds))] == docs
    assert all(ds[i][-1] == 1 for i in range(len(ds)))
    # the datasets read the tokenizer from the sidecar; EOD (1) shows up inside samples
    train, _ = build(str(tmp_path / "hf"), tmp_path / "cache", tok=None)
    tokens = torch.stack([train[i]["tokens"] for i in range(len(train))])
    assert int(tokens.max()) < 400 and (tokens == 1).any()
    assert torch.all(torch.stack([train[i]["loss_mask"] for i in range(10)]) == 1.0)


def test_preprocess_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        preprocess([tmp_path / "nowhere.jsonl"], tmp_path / "x")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty"):
        preprocess([tmp_path / "empty.jsonl"], tmp_path / "x")
    blank = write_jsonl(tmp_path / "blank.jsonl", ["", ""])
    with pytest.raises(ValueError, match="empty"):
        preprocess([blank], tmp_path / "x")
    with pytest.raises(ValueError, match=r"no column 'content'.*\['text', 'id'\]"):
        preprocess([blank], tmp_path / "x", json_key="content")
    assert not list(tmp_path.glob("x.*"))  # nothing half-written
    args = ["--input", str(tmp_path / "gone.json"), "--output-prefix", str(tmp_path / "y")]
    assert preprocess_main(args) == 2
    assert "gone.json" in capsys.readouterr().err


# ----- GPTDataset builds --------------------------------------------------------------------


BYTE_INFO = TokenizerInfo(vocab_size=258, eod=256, pad=257, name="byte")


def build(
    prefix_or_blend, cache_dir, seed=1, n_train=200, n_valid=20, split="90,10,0", tok=BYTE_INFO
):
    return build_datasets(prefix_or_blend, split, SEQ, seed, n_train, n_valid, tok, cache_dir)


def test_gpt_dataset_samples_are_shifted_windows_of_documents(corpus, tmp_path):
    train, valid = build(corpus["prefix"], tmp_path / "cache")
    assert len(train) >= 200 and len(valid) >= 20
    docs = [d.encode() for d in corpus["docs"]]
    crossed = 0
    for i in range(0, len(train), max(1, len(train) // 50)):
        s = train[i]
        assert s["tokens"].shape == s["labels"].shape == (SEQ,)
        assert torch.equal(s["labels"][:-1], s["tokens"][1:])
        assert torch.equal(s["position_ids"], torch.arange(SEQ))
        assert torch.all(s["loss_mask"] == 1.0)
        # the window splits at EOD into: a document suffix, whole documents, a document prefix
        window = torch.cat([s["tokens"], s["labels"][-1:]]).tolist()
        pieces = bytes(t if t < 256 else 0 for t in window).split(b"\0")
        if len(pieces) == 1:  # inside one document
            assert any(pieces[0] in d for d in docs)
            continue
        assert any(d.endswith(pieces[0]) for d in docs)
        assert all(p in docs for p in pieces[1:-1])
        assert any(d.startswith(pieces[-1]) for d in docs)
        crossed += 1
    assert crossed > 0
    assert list((tmp_path / "cache").glob("*GPTDataset-train-shuffle_index.npy"))


def test_gpt_dataset_is_deterministic_for_a_seed(corpus, tmp_path):
    a, _ = build(corpus["prefix"], tmp_path / "a")
    b, _ = build(corpus["prefix"], tmp_path / "b", tok=None)  # tokenizer from the .meta.json
    c, _ = build(corpus["prefix"], tmp_path / "c", seed=2, tok=ByteTokenizer())
    assert (
        TokenizerInfo.from_any(ByteTokenizer())
        == BYTE_INFO
        == TokenizerInfo.from_any(corpus["meta"])
    )
    first = lambda ds: torch.stack([ds[i]["tokens"] for i in range(20)])  # noqa: E731
    assert torch.equal(first(a), first(b))
    assert not torch.equal(first(a), first(c))


def test_blend_draws_in_proportion(tmp_path):
    a, b = letter_prefix(tmp_path, "a"), letter_prefix(tmp_path, "b")
    train, _ = build([0.7, a, 0.3, b], tmp_path / "cache", n_train=400)
    frac_a = np.mean([(train[i]["tokens"] == ord("a")).sum().item() > SEQ // 2 for i in range(400)])
    assert abs(frac_a - 0.7) < 0.05
    # unweighted prefixes are blended by size, still repeating past one epoch
    train, _ = build([a, b], tmp_path / "cache2", n_train=400)
    assert len(train) >= 400


def test_missing_prefix_and_mismatched_tokenizer(corpus, tmp_path):
    missing = str(tmp_path / "nope" / "corpus")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        build([0.5, corpus["prefix"], 0.5, missing], tmp_path / "cache")
    with pytest.raises(ValueError, match="vocab_size 258"):
        build_datasets(corpus["prefix"], "90,10,0", SEQ, 1, 10, 2, TokenizerInfo(100, 99), tmp_path)
    with pytest.raises(ValueError, match="valid part"):
        build(corpus["prefix"], tmp_path / "cache", split="999,1,0")


def test_parse_data_path():
    assert parse_data_path("p") == (["p"], None)
    assert parse_data_path(["p", "q"]) == (["p", "q"], None)
    assert parse_data_path([0.7, "p", "0.3", "q"]) == (["p", "q"], [0.7, 0.3])
    with pytest.raises(ValueError, match="mixes numbers"):
        parse_data_path([0.7, "p", "q"])
    with pytest.raises(ValueError, match="positive"):
        parse_data_path([0, "p", 1, "q"])


# ----- sampler ------------------------------------------------------------------------------


def tokens_of(batches):
    return [b["tokens"] for b in batches]


def test_batch_iterator_resumes_with_the_next_sample(corpus, tmp_path):
    train, _ = build(corpus["prefix"], tmp_path / "cache")
    full = tokens_of(batch_iterator(train, 0, 2, 0, 1))
    assert len(full) == len(train) // 2 and full[0].shape == (2, SEQ)
    tail = tokens_of(batch_iterator(train, 12, 2, 0, 1))
    assert len(tail) == len(full) - 6
    assert all(torch.equal(x, y) for x, y in zip(tail, full[6:], strict=True))
    assert torch.equal(full[6][0], train[12]["tokens"])
    with pytest.raises(ValueError, match="multiple"):
        next(batch_iterator(train, 3, 2, 0, 2))


def test_dp_ranks_partition_the_global_batch(corpus, tmp_path):
    train, _ = build(corpus["prefix"], tmp_path / "cache")
    gbs, mbs, dp = 8, 2, 2
    accum = gbs // (mbs * dp)
    single = torch.cat(tokens_of(batch_iterator(train, 0, mbs, 0, 1)))
    ranks = [list(batch_iterator(train, 0, mbs, r, dp)) for r in range(dp)]
    for i in range(3):  # global batches
        union = torch.cat(
            [ranks[r][i * accum + j]["tokens"] for j in range(accum) for r in range(dp)]
        )
        assert torch.equal(union, single[i * gbs : (i + 1) * gbs])
        ids = {tuple(t.tolist()) for t in union}
        assert len(ids) == gbs  # no sample given to two ranks


# ----- multi-process build ------------------------------------------------------------------


def _distributed_build(rank, world_size, prefix, blend, cache_dir):
    train, valid = build(prefix, cache_dir)
    blended, _ = build(blend, cache_dir + "-blend", n_train=64)
    mine = tokens_of(batch_iterator(train, 0, 2, rank, world_size))[:4]
    # numpy, not tensors: torch's queue pickling shares tensors through file descriptors that
    # vanish when the rank exits
    return {
        "first": torch.stack([train[i]["tokens"] for i in range(8)]).numpy(),
        "blend": torch.stack([blended[i]["tokens"] for i in range(8)]).numpy(),
        "valid_len": len(valid),
        "mine": torch.cat(mine).numpy(),
        "world": torch.distributed.get_world_size(),
    }


@pytest.mark.slow
def test_distributed_build_matches_single_process(corpus, tmp_path):
    a, b = letter_prefix(tmp_path, "a"), letter_prefix(tmp_path, "b")
    blend = [0.5, a, 0.5, b]
    results = run_distributed(
        _distributed_build, 2, corpus["prefix"], blend, str(tmp_path / "dist"), timeout=180
    )
    train, valid = build(corpus["prefix"], tmp_path / "local")
    blended, _ = build(blend, tmp_path / "local-blend", n_train=64)
    expected = torch.stack([train[i]["tokens"] for i in range(8)]).numpy()
    expected_blend = torch.stack([blended[i]["tokens"] for i in range(8)]).numpy()
    for r in results:
        assert r["world"] == 2
        np.testing.assert_array_equal(r["first"], expected)
        np.testing.assert_array_equal(r["blend"], expected_blend)
        assert r["valid_len"] == len(valid)
    single = torch.cat(tokens_of(batch_iterator(train, 0, 4, 0, 1))[:4]).numpy()
    interleaved = np.concatenate(
        [results[r]["mine"][2 * k : 2 * k + 2] for k in range(4) for r in (0, 1)]
    )
    np.testing.assert_array_equal(interleaved, single)
    # with a process group megatron caches the blend too (rank 0 builds, the other rank loads)
    assert list((tmp_path / "dist-blend").glob("*BlendedDataset-train-dataset_index.npy"))
