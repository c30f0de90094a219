"""data.passkey_fraction: a share of real GPTDataset train samples replaced by passkey documents in
the evaluation's prompt format."""

import pytest
import torch

from fope_megatron.config import ConfigError, load_config
from fope_megatron.data.datasets import build_datasets
from fope_megatron.data.passkey import NEEDLE_HEAD, QUESTION, PasskeyMixture
from fope_megatron.data.tokenizer import get_tokenizer
from fope_megatron.eval.passkey import sample_trials

SEQ = 128


@pytest.fixture(scope="module")
def train_ds(corpus, tmp_path_factory):
    ds, _ = build_datasets(corpus, "98,2,0", SEQ, 1, 400, 8, None, tmp_path_factory.mktemp("c"))
    return ds


def test_mixture_share_format_and_determinism(train_ds):
    tok = get_tokenizer("byte")
    mix = PasskeyMixture(train_ds, 0.4, tok, SEQ, seed=3)
    assert len(mix) == len(train_ds)
    flags = [mix.is_passkey(i) for i in range(len(mix))]
    assert 0.3 < sum(flags) / len(flags) < 0.5
    n_checked = 0
    for i, is_pk in enumerate(flags[:60]):
        item = mix[i]
        assert item["tokens"].shape == (SEQ,) and item["labels"].shape == (SEQ,)
        if not is_pk:
            assert torch.equal(
                torch.as_tensor(item["tokens"]), torch.as_tensor(train_ds[i]["tokens"])
            )
            continue
        n_checked += 1
        full = item["tokens"].tolist() + item["labels"][-1:].tolist()
        assert item["labels"].tolist() == full[1:]  # labels are the shifted tokens
        text = tok.decode(full)
        # the key is stated in the needle and answered right after the evaluation's question
        key = text.split(NEEDLE_HEAD + " ")[1][:5]
        assert key.isdigit() and QUESTION + " " + key + "." in text, text
        assert torch.equal(mix[i]["tokens"], item["tokens"])  # deterministic per index
    assert n_checked > 10
    none = PasskeyMixture(train_ds, 0.0, tok, SEQ, seed=3)
    assert not any(none.is_passkey(i) for i in range(len(none)))
    with pytest.raises(ValueError, match="too short"):
        PasskeyMixture(train_ds, 0.5, tok, 64, seed=3)


def test_passkey_fraction_is_validated():
    cfg = load_config(None, ["data.synthetic=true", "data.passkey_fraction=0.25"])
    assert cfg.data.passkey_fraction == 0.25
    with pytest.raises(ConfigError, match="passkey_fraction"):
        load_config(None, ["data.synthetic=true", "data.passkey_fraction=1.5"]).validate(1)


def test_eval_at_the_training_length_stays_inside_the_trained_positions(train_ds):
    """A passkey trial at 1x is in distribution: its prompts have the mixture's longest prompt
    length, and the model reads the key back at positions < seq_length (its input, prompt plus
    answer but its last token, is exactly seq_length tokens). A prompt of seq_length tokens put
    the key at positions 128..132 and cost two RoPE twins 10-15% of their 1x trials."""
    tok = get_tokenizer("byte")
    mix = PasskeyMixture(train_ds, 1.0, tok, SEQ, seed=3)
    trials = sample_trials(tok, SEQ, n_trials=10, n_buckets=5, seed=0)
    for t in trials:
        assert len(t.tokens) == mix.max_len
        assert len(t.tokens) + len(t.answer) - 1 == SEQ
    # the mixture does produce prompts of that length: the question ends at token max_len
    q = tok.encode(QUESTION)
    ends = set()
    for i in range(400):
        ids = mix.passkey_tokens(i)
        for j in range(len(ids) - len(q) + 1):
            if ids[j : j + len(q)] == q:
                ends.add(j + len(q))
    assert max(ends) == mix.max_len
