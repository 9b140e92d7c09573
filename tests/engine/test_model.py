"""Model loading, metadata and the vocabulary on the real default model."""

from __future__ import annotations

import pytest
from gguf import GGUFReader

from pyllama.errors import InvalidTokenError


def _field(reader: GGUFReader, key: str):
    return reader.get_field(key).contents()


def test_metadata_matches_the_file(gemma, gemma_path):
    reader = GGUFReader(gemma_path)
    arch = _field(reader, "general.architecture")
    assert gemma.architecture == arch == "gemma3"
    assert gemma.name == _field(reader, "general.name")
    assert gemma.n_ctx_train == _field(reader, f"{arch}.context_length")
    assert gemma.n_embd == _field(reader, f"{arch}.embedding_length")
    assert gemma.n_layer == _field(reader, f"{arch}.block_count")
    assert gemma.n_vocab == len(reader.get_field("tokenizer.ggml.tokens").contents())
    assert gemma.token_bos == _field(reader, "tokenizer.ggml.bos_token_id")
    assert gemma.token_eos == _field(reader, "tokenizer.ggml.eos_token_id")
    assert gemma.token_text(gemma.token_eot) == "<end_of_turn>"
    assert gemma.add_bos is True
    general = gemma.general
    assert general["architecture"] == "gemma3"
    assert general["size_label"] == "270M"
    assert gemma.metadata["general.name"] == gemma.name
    assert gemma.chat_template is None  # this base model ships none
    assert "Q4_K" in gemma.description
    assert gemma.is_eog(gemma.token_eot) and gemma.is_eog(gemma.token_eos)
    assert not gemma.is_eog(gemma.tokenize("Hello", add_special=False)[0])


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! The quick brown fox jumps over the lazy dog.",
        "  leading spaces, tabs\tand\nnew lines  ",
        "Grüße aus Köln — naïve café, 東京, Ελλάδα, русский",
        "emoji: 😀👍🏽🇫🇷 family 👨‍👩‍👧",
        "",
    ],
)
def test_tokenize_detokenize_round_trip(gemma, text):
    tokens = gemma.tokenize(text, add_special=False)
    assert all(0 <= t < gemma.n_vocab for t in tokens)
    assert gemma.detokenize(tokens) == text
    # Pieces joined as bytes give the same text, whatever they split.
    assert b"".join(gemma.token_to_piece(t) for t in tokens).decode("utf-8") == text


def test_bos_is_added_and_removed(gemma):
    tokens = gemma.tokenize("Paris", add_special=True)
    assert tokens[0] == gemma.token_bos
    assert tokens[1:] == gemma.tokenize("Paris", add_special=False)
    assert gemma.detokenize(tokens, remove_special=True) == "Paris"


def test_special_tokens_are_parsed_only_when_asked(gemma):
    text = "<start_of_turn>user\nHi<end_of_turn>"
    parsed = gemma.tokenize(text, add_special=False, parse_special=True)
    plain = gemma.tokenize(text, add_special=False, parse_special=False)
    assert parsed[-1] == gemma.token_eot
    assert gemma.token_text(parsed[0]) == "<start_of_turn>"
    assert len(plain) > len(parsed) and gemma.token_eot not in plain
    assert gemma.detokenize(parsed, unparse_special=True) == text
    assert gemma.detokenize(plain) == text
    assert gemma.token_to_piece(gemma.token_eot, special=True) == b"<end_of_turn>"
    assert gemma.token_to_piece(gemma.token_eot, special=False) == b""


def test_special_text_tokens_are_tokenize_with_specials_and_cached(gemma):
    for text in ("<start_of_turn>user\n", "<end_of_turn>\n<start_of_turn>model\n", "plain", ""):
        ids = gemma.special_text_tokens(text)
        assert ids == tuple(gemma.tokenize(text, add_special=False, parse_special=True))
        assert gemma.special_text_tokens(text) is ids  # cached
    assert len(gemma.special_text_tokens("<start_of_turn>")) == 1


def test_multibyte_character_split_across_tokens(gemma):
    # A rare CJK character falls back to byte tokens: its pieces are not valid UTF-8 alone.
    tokens = gemma.tokenize("𠜎", add_special=False)
    pieces = [gemma.token_to_piece(t) for t in tokens]
    assert b"".join(pieces).decode("utf-8") == "𠜎"


@pytest.mark.parametrize("bad", [-1, 262144, 10**9])
def test_invalid_token_ids_raise(gemma, bad):
    with pytest.raises(InvalidTokenError, match="invalid token id"):
        gemma.detokenize([2, bad])
    with pytest.raises(InvalidTokenError):
        gemma.token_to_piece(bad)
    with pytest.raises(InvalidTokenError):
        gemma.is_eog(bad)


def test_vocab_only_model_tokenizes(gemma_path):
    from pyllama.engine import Model

    vocab = Model(gemma_path, vocab_only=True)
    assert vocab.tokenize("Hello world") == Model(gemma_path).tokenize("Hello world")
