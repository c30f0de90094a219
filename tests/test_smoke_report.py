"""``make smoke``'s report says what its passkey column means."""

from fope_megatron.smoke import passkey_note


def test_untrained_retrieval_model_is_explained() -> None:
    note = passkey_note({"128": 0.0, "256": 0.0, "512": 0.0}, passkey_fraction=0.0)
    assert "0 at every length" in note and "not trained for retrieval" in note
    assert "docs/evaluation.md" in note


def test_trained_retrieval_model_gets_the_plain_definition() -> None:
    for passkey, fraction in (({"128": 1.0, "256": 0.2}, 0.5), ({"128": 0.0}, 0.5)):
        note = passkey_note(passkey, fraction)
        assert "not trained for retrieval" not in note
        assert "generated back exactly" in note
