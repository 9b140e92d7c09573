"""Media chunks in the engine (MediaContext, --mmproj): tokenizing, encoding between decodes,
the cache keyed by media hashes, and requests side by side. The default model with the tiny
random Gemma 3 projector of tests/multimodal_models.py: counts and events, never words.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from multimodal_models import TOKENS_PER_IMAGE, png  # noqa: E402

from pyllama.engine import Engine, FinishEvent, Request, SamplingParams, TokenEvent  # noqa: E402
from pyllama.errors import InvalidRequestError  # noqa: E402

pytest.importorskip("transformers")

NO_EOS = SamplingParams(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(gemma_path):
    from multimodal_models import tiny_gemma3_mmproj

    eng = Engine(gemma_path, n_parallel=2, n_ctx=2048, n_batch=64, mmproj=str(tiny_gemma3_mmproj()))
    yield eng
    eng.close()


def _prompt(engine, *images, before="Look at this:", after=" What is it?"):
    marker = engine.media.marker
    text = before + "".join(marker for _ in images) + after
    return engine.media.tokenize(text, [png(32, 32, seed=s) for s in images])


def test_tokenize_lays_each_image_out_with_its_placeholder(engine):
    assert engine.media.vision and not engine.media.audio and not engine.media.use_mrope
    tokens, media = _prompt(engine, 1, 2, 1)
    assert len(media) == 3
    starts = sorted(media)
    chunks = [media[s] for s in starts]
    assert all(c.kind == "image" and c.n_tokens == TOKENS_PER_IMAGE == c.n_pos for c in chunks)
    for start, chunk in zip(starts, chunks):
        assert tokens[start:start + chunk.n_tokens] == [chunk.placeholder] * chunk.n_tokens
        assert tokens[start - 1] >= 0 and tokens[start + chunk.n_tokens] >= 0  # <start/end_of_image>
    # the same image twice: one hash, two placeholders; another image: another hash
    assert chunks[0].id == chunks[2].id != chunks[1].id and len(chunks[0].id) == 64
    assert len({c.placeholder for c in chunks}) == 3
    assert sum(1 for t in tokens if t < 0) == 3 * TOKENS_PER_IMAGE
    again, media2 = _prompt(engine, 1, 2, 1)
    assert again == tokens  # the same media give the same tokens: the cache can match them


def test_a_repeated_image_is_encoded_once(engine):
    tokens, media = _prompt(engine, 3)
    n0 = engine.media.n_evals
    first = engine.submit(Request(prompt=tokens, media=media, sampling=NO_EOS, n_predict=4, id_slot=0)).wait()
    assert engine.media.n_evals == n0 + 1
    assert first.timings.prompt_n == len(tokens) and first.n_prompt_tokens == len(tokens)
    again = engine.submit(Request(prompt=tokens, media=media, sampling=NO_EOS, n_predict=4, id_slot=0)).wait()
    assert engine.media.n_evals == n0 + 1
    assert again.timings.cache_n == len(tokens) - 1 and again.timings.prompt_n == 1
    assert again.tokens == first.tokens  # greedy over the same KV
    # tokenized afresh (new chunk objects, same hash): still a cache hit
    fresh, fresh_media = _prompt(engine, 3)
    third = engine.submit(Request(prompt=fresh, media=fresh_media, sampling=NO_EOS, n_predict=4, id_slot=0)).wait()
    assert engine.media.n_evals == n0 + 1 and third.timings.cache_n == len(tokens) - 1


def test_an_image_request_beside_a_generating_one(engine):
    text = engine.model.tokenize("Count from one to fifty: one, two, three,")
    long = engine.submit(Request(prompt=text, sampling=NO_EOS, n_predict=40, id_slot=0))
    tokens, media = _prompt(engine, 4, 5)
    image = engine.submit(Request(prompt=tokens, media=media, sampling=NO_EOS, n_predict=6, id_slot=1))
    done_long, done_image = long.wait(), image.wait()
    assert len(done_long.tokens) == 40 and len(done_image.tokens) == 6
    assert done_image.timings.prompt_n + done_image.timings.cache_n == len(tokens)
    # the text request alone gives the same tokens: the image's decodes did not disturb it
    alone = engine.submit(Request(prompt=text, sampling=NO_EOS, n_predict=40, id_slot=0, cache_prompt=False)).wait()
    assert alone.tokens == done_long.tokens


def test_streamed_events_of_an_image_request(engine):
    tokens, media = _prompt(engine, 6)
    events = list(engine.submit(Request(prompt=tokens, media=media, sampling=NO_EOS, n_predict=3)))
    assert isinstance(events[-1], FinishEvent)
    assert sum(len(e.tokens) for e in events if isinstance(e, TokenEvent)) == 3


def test_broken_media_prompts_are_refused(engine):
    tokens, media = _prompt(engine, 7)
    start = min(media)
    with pytest.raises(InvalidRequestError, match="invalid token id"):  # placeholders without media
        engine.submit(Request(prompt=tokens, media={}, n_predict=1)).wait()
    with pytest.raises(InvalidRequestError, match="no media chunk starts there"):
        engine.submit(Request(prompt=tokens, media={start + 1: media[start]}, n_predict=1)).wait()
    cut = tokens[:start + 2] + tokens[start + TOKENS_PER_IMAGE:]
    with pytest.raises(InvalidRequestError):
        engine.submit(Request(prompt=cut, media=media, n_predict=1)).wait()
    with pytest.raises(InvalidRequestError, match="must not end with a media chunk"):
        engine.submit(Request(prompt=tokens[:start + TOKENS_PER_IMAGE], media=media, n_predict=1)).wait()
    with pytest.raises(InvalidRequestError, match="marker"):
        engine.media.tokenize("no marker here", [png(8, 8)])
    with pytest.raises(InvalidRequestError, match="^files\\[0\\]: Failed to load image"):
        engine.media.tokenize(engine.media.marker, [b"\x00\x01 not an image at all"], ["files[0]"])
    # the engine goes on
    assert len(engine.submit(Request(prompt=tokens, media=media, sampling=NO_EOS, n_predict=2)).wait().tokens) == 2
