"""The continuous-batching engine: slots, prompt cache, limits, stop strings, cancellation."""

from __future__ import annotations

import json
import sys
import threading
import time

import pytest

from pyllama.engine.client import Engine
from pyllama.engine.types import ErrorEvent, FinishEvent, FinishReason, Request, SamplingParams, TokenEvent
from pyllama.errors import ContextLengthExceededError

GREEDY = SamplingParams(temperature=0.0)
# The quantised model's greedy text depends on the CPU's kernels: tests never assert it. They
# force it (grammar, logit bias), compare two runs of the same computation on this machine
# (cache_prompt=False: a cached prompt re-evaluates only its last token, another computation),
# or use the F32 synthetic model. NO_EOS: counts that must not depend on when the model stops.
NO_EOS = SamplingParams(temperature=0.0, ignore_eos=True)
PROMPTS = ["The three primary colors are", "Once upon a time", "The capital of France is",
           "def fibonacci(n):", "My favourite food is", "In 1969, astronauts", "The quick brown fox",
           "Water boils at"]


@pytest.fixture(scope="module")
def engine(gemma_path):
    eng = Engine(gemma_path, n_parallel=4, n_ctx=4096, n_batch=256)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def synthetic_engine(synthetic_path):
    eng = Engine(synthetic_path, n_parallel=8, n_ctx=2048, n_batch=64)
    yield eng
    eng.close()


def _run(engine, text, sampling=GREEDY, n=24, **kwargs):
    request = Request(prompt=engine.model.tokenize(text), sampling=sampling, n_predict=n, **kwargs)
    handle = engine.submit(request)
    events = list(handle)
    text = "".join(e.text for e in events if isinstance(e, TokenEvent))
    return text, handle.result, events


def _concurrently(fn, args):
    results = [None] * len(args)

    def work(i):
        results[i] = fn(*args[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return results


def test_streamed_text_equals_the_final_text(engine):
    text, result, events = _run(engine, PROMPTS[0], NO_EOS)
    assert isinstance(events[-1], FinishEvent) and result.reason == FinishReason.LIMIT
    assert text and text == result.text == engine.model.detokenize(result.tokens)
    assert len(result.tokens) == 24 and result.n_prompt_tokens == len(engine.model.tokenize(PROMPTS[0]))
    assert result.timings.predicted_n == 24 and result.timings.prompt_ms > 0


@pytest.mark.parametrize("sampling", [GREEDY, SamplingParams(temperature=0.9, seed=1234)])
def test_eight_at_once_equal_each_alone(synthetic_engine, sampling):
    # F32 weights: every CPU kernel gives the same numbers whatever the batch (see the
    # closing note for the quantised model, where upstream's batched kernels differ too).
    sampling = SamplingParams(**{**sampling.__dict__, "ignore_eos": True})
    alone = [_run(synthetic_engine, p, sampling, n=32, cache_prompt=False)[1].tokens for p in PROMPTS]
    together = _concurrently(lambda p: _run(synthetic_engine, p, sampling, n=32, cache_prompt=False)[1].tokens,
                             [(p,) for p in PROMPTS])
    assert together == alone
    assert len({tuple(t) for t in alone}) > 1


def test_a_ninth_request_waits_for_a_slot(synthetic_engine):
    sampling = SamplingParams(temperature=0.0, ignore_eos=True)
    results = _concurrently(lambda p: _run(synthetic_engine, p, sampling, n=40)[1],
                            [(p,) for p in PROMPTS + ["one more request"]])
    assert all(r.reason == FinishReason.LIMIT and len(r.tokens) == 40 for r in results)
    assert len({r.id_slot for r in results}) == 8


def test_same_prefix_evaluates_only_the_suffix(engine):
    prefix = "Here is a long shared system prompt about colours and painting. " * 4
    first = _run(engine, prefix + "Question one: what is red?", n=4)[1]
    second = _run(engine, prefix + "Question two: what is blue?", n=4)[1]
    n_prefix = len(engine.model.tokenize(prefix + "Question"))
    assert first.id_slot == second.id_slot
    assert second.timings.cache_n >= n_prefix - 1
    assert second.timings.prompt_n == second.n_prompt_tokens - second.timings.cache_n
    assert second.timings.prompt_n < 12
    again = _run(engine, prefix + "Question two: what is blue?", n=4)[1]
    assert again.timings.cache_n == again.n_prompt_tokens - 1 and again.timings.prompt_n == 1
    nocache = _run(engine, prefix + "Question two: what is blue?", n=4, cache_prompt=False)[1]
    assert nocache.timings.cache_n == 0 and nocache.timings.prompt_n == nocache.n_prompt_tokens


def test_cached_prefix_never_leaks_between_conversations(synthetic_engine):
    # Conversations that share a prefix alternate over the slots, alone and side by side; each
    # answer must equal a fresh evaluation (F32 model: batch composition changes no number).
    eng = synthetic_engine
    sampling = SamplingParams(temperature=0.0, ignore_eos=True)
    convs = ["Conversation A: my dog is called Rex and he likes",
             "Conversation B: my cat is called Tom and he likes",
             "Conversation A: my dog is called Rex and he likes to run"]
    fresh = [_run(eng, c, sampling, n=16, cache_prompt=False)[1].tokens for c in convs]
    for _ in range(2):
        for c, expected in zip(convs, fresh):
            assert _run(eng, c, sampling, n=16)[1].tokens == expected
        got = _concurrently(lambda c: _run(eng, c, sampling, n=16)[1].tokens, [(c,) for c in convs])
        assert got == fresh


def test_cancel_frees_the_slot_within_a_step(engine):
    request = Request(prompt=engine.model.tokenize(PROMPTS[1]),
                      sampling=SamplingParams(temperature=0.0, ignore_eos=True), n_predict=100000)
    handle = engine.submit(request)
    first = handle.get(timeout=60)
    assert isinstance(first, TokenEvent)
    steps_before = engine.stats()["n_steps"]
    handle.cancel()
    while True:
        event = handle.get(timeout=30)
        assert event is not None
        if isinstance(event, FinishEvent):
            break
    assert event.reason == FinishReason.CANCELLED
    # the step in flight may finish; the next one no longer carries the request
    assert engine.stats()["n_steps"] - steps_before <= 2
    deadline = time.time() + 5
    while engine.core.n_busy and time.time() < deadline:
        time.sleep(0.01)
    assert engine.core.n_busy == 0


def _stop_strings_from(engine, baseline):
    # Stop strings taken from this machine's own greedy text: a whole word, the start of a
    # word, one that spans two tokens (so its first part must be held back), and one that
    # starts like a word of the text but never completes.
    text, tokens = baseline.text, baseline.tokens
    words = [w for w in text.split() if len(w) >= 3 and text.find(w[:2]) > 0]
    assert words, text
    word = words[len(words) // 2]
    prefix = word[:2]
    spanning = None
    order = sorted(range(2, len(tokens) - 1), key=lambda i: abs(i - len(tokens) // 2))
    for i in order:
        cut = len(engine.model.detokenize(tokens[:i]))
        assert text.startswith(engine.model.detokenize(tokens[:i]))
        candidate = text[cut - 2:cut + 2]
        if cut >= 2 and len(candidate) == 4 and text.find(candidate) == cut - 2:
            spanning = candidate
            break
    assert spanning is not None, text
    return word, prefix, spanning, word + "\u2603"


def test_stop_strings_cut_the_text_and_never_leak(engine):
    baseline = _run(engine, PROMPTS[0], NO_EOS, n=40, cache_prompt=False)[1]
    word, prefix, spanning, never = _stop_strings_from(engine, baseline)
    for stop in (word, prefix, spanning, never):
        text, result, events = _run(engine, PROMPTS[0], NO_EOS, n=40, stop=(stop,), cache_prompt=False)
        at = baseline.text.find(stop)
        expected = baseline.text if at < 0 else baseline.text[:at]
        assert result.text == expected, (stop, baseline.text)
        assert result.tokens == baseline.tokens[:len(result.tokens)]
        if at < 0:
            assert result.reason == FinishReason.LIMIT and result.stopping_word == ""
            assert result.tokens == baseline.tokens  # the held-back text went out in the end
        else:
            assert result.reason == FinishReason.WORD and result.stopping_word == stop
        streamed = ""
        for e in events:
            if isinstance(e, TokenEvent):
                streamed += e.text
                # not a character of the stop string goes out, even before it is complete
                assert expected.startswith(streamed), (stop, streamed)
        assert streamed == text == result.text


def test_eos_and_ignore_eos(engine):
    tokens = engine.model.tokenize(PROMPTS[0])
    eot = engine.model.token_eot  # this base model rarely ends by itself: bias it up
    push = ((eot, 50.0),)
    result = engine.submit(Request(prompt=tokens, n_predict=20,
                                   sampling=SamplingParams(temperature=0.0, logit_bias=push))).wait()
    assert result.reason == FinishReason.EOS and result.tokens == [eot] and result.text == ""
    ignored = engine.submit(Request(prompt=tokens, n_predict=8, sampling=SamplingParams(
        temperature=0.0, logit_bias=push, ignore_eos=True))).wait()
    assert ignored.reason == FinishReason.LIMIT and len(ignored.tokens) == 8
    assert not any(engine.model.is_eog(t) for t in ignored.tokens)
    special = engine.submit(Request(prompt=tokens, n_predict=20, special=True,
                                    sampling=SamplingParams(temperature=0.0, logit_bias=push))).wait()
    assert special.text == "<end_of_turn>"


def test_prompt_longer_than_the_slot_context(gemma_path):
    with Engine(gemma_path, n_parallel=2, n_ctx=512) as eng:
        assert eng.n_ctx_slot == 256
        handle = eng.submit(Request(prompt=eng.model.tokenize("word " * 300), sampling=GREEDY))
        with pytest.raises(ContextLengthExceededError) as info:
            handle.wait()
        assert info.value.n_ctx == 256
        # the engine keeps serving
        assert eng.submit(Request(prompt=eng.model.tokenize("Hi"), sampling=GREEDY, n_predict=2)).wait()


def test_context_full_stops_or_shifts(gemma_path):
    prompt = "Count: one two three four five"
    sampling = SamplingParams(temperature=0.0, ignore_eos=True)
    with Engine(gemma_path, n_parallel=1, n_ctx=256) as eng:
        tokens = eng.model.tokenize(prompt)
        result = eng.submit(Request(prompt=tokens, sampling=sampling)).wait()
        assert result.reason == FinishReason.LIMIT and result.truncated
        assert len(tokens) + len(result.tokens) == 256
    with Engine(gemma_path, n_parallel=1, n_ctx=256, ctx_shift=True) as eng:
        result = eng.submit(Request(prompt=tokens, sampling=sampling, n_predict=400, n_keep=4)).wait()
        assert result.reason == FinishReason.LIMIT and result.truncated
        assert len(result.tokens) == 400


def test_multibyte_characters_survive_streaming(engine):
    # Each event's text is valid on its own: no character is split across two events. The
    # text is forced, with a rare character that only byte tokens spell: pieces that are not
    # UTF-8 alone are held until the character is whole.
    forced = "今日は𠜎と日本語"
    grammar = "root ::= " + json.dumps(forced, ensure_ascii=False)
    text, result, events = _run(engine, "日本語の文章: ", SamplingParams(temperature=0.0, grammar=grammar), n=64)
    pieces = [e.text for e in events if isinstance(e, TokenEvent)]
    assert text == result.text == forced and result.reason == FinishReason.EOS
    assert all(p and "\ufffd" not in p for p in pieces)

    def whole(piece):
        try:
            piece.decode("utf-8")
            return True
        except UnicodeDecodeError:
            return False

    assert not all(whole(engine.model.token_to_piece(t)) for t in result.tokens)


def test_n_probs(engine):
    sampling = SamplingParams(temperature=0.0, n_probs=5, ignore_eos=True)
    _, result, events = _run(engine, PROMPTS[0], sampling, n=3)
    probs = [p for e in events if isinstance(e, TokenEvent) and e.probs for p in e.probs]
    assert len(probs) == 3
    chosen, top = probs[0]
    assert len(top) == 5 and top[0].id == chosen.id and abs(top[0].prob - chosen.prob) < 1e-6
    assert all(top[i].prob >= top[i + 1].prob for i in range(4))
    post = SamplingParams(temperature=0.0, n_probs=5, post_sampling_probs=True)
    _, _, events = _run(engine, PROMPTS[0], post, n=2)
    chosen, top = [p for e in events if isinstance(e, TokenEvent) and e.probs for p in e.probs][0]
    assert chosen.prob == pytest.approx(1.0) and len(top) == 1  # greedy leaves one candidate


def test_grammar_constrains_the_output(engine):
    grammar = 'root ::= "{" ws "\\"answer\\":" ws ("\\"yes\\"" | "\\"no\\"") ws "}"\nws ::= [ \\t]{0,3}'
    sampling = SamplingParams(temperature=0.7, seed=3, grammar=grammar)
    text, result, _ = _run(engine, "Is the sky blue? Answer in JSON:", sampling, n=40)
    assert json.loads(text)["answer"] in ("yes", "no")
    assert result.reason == FinishReason.EOS


def test_seeded_sampling_alone_and_batched_on_gemma(engine):
    sampling = SamplingParams(temperature=0.8, seed=77)
    a = _run(engine, PROMPTS[1], sampling, n=16, cache_prompt=False)[1].tokens
    b = _run(engine, PROMPTS[1], sampling, n=16, cache_prompt=False)[1].tokens
    assert a and a == b


def test_n_predict_zero_only_fills_the_cache(engine):
    text, result, _ = _run(engine, PROMPTS[2], n=0)
    assert text == "" and result.tokens == [] and result.reason == FinishReason.LIMIT


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
    },
    "required": ["name", "age", "colors"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("seed", [1, 2])
def test_json_schema_output_parses_and_matches(engine, seed):
    sampling = SamplingParams(temperature=0.8, seed=seed, json_schema=SCHEMA)
    text, result, _ = _run(engine, "A person as JSON:", sampling, n=400)
    value = json.loads(text)
    assert set(value) == {"name", "age", "colors"}
    assert isinstance(value["name"], str) and len(value["name"]) <= 12
    assert isinstance(value["age"], int) and 0 <= value["age"] <= 120
    assert isinstance(value["colors"], list) and set(value["colors"]) <= {"red", "green", "blue"}
    assert result.reason == FinishReason.EOS


def test_json_schema_that_cannot_be_converted_fails_at_submit(engine):
    from pyllama.errors import InvalidRequestError

    bad = SamplingParams(json_schema={"type": "object", "properties": {"a": {"$ref": "#/definitions/x"}}})
    with pytest.raises(InvalidRequestError, match="json_schema"):
        engine.submit(Request(prompt=engine.model.tokenize("x"), sampling=bad))
    with pytest.raises(InvalidRequestError, match="json_schema"):
        engine.submit(Request(prompt=engine.model.tokenize("x"), sampling=SamplingParams(json_schema="{oops")))


def test_bad_grammar_is_refused_at_submit_and_the_engine_keeps_serving(engine):
    from pyllama.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="failed to parse grammar"):
        engine.submit(Request(prompt=engine.model.tokenize("x"), sampling=SamplingParams(grammar="root ::= (")))
    assert _run(engine, PROMPTS[0], NO_EOS, n=2)[1].reason == FinishReason.LIMIT


def test_n_indent_stops_at_a_less_indented_line(engine):
    # A grammar forces an indented body, then an unindented line.
    body = "\n    return a + b\n"
    code = body + "\ndef sub(a, b):\n    return a - b\n"
    sampling = SamplingParams(temperature=0.0, grammar="root ::= " + json.dumps(code))
    free, result, _ = _run(engine, "def add(a, b):", sampling, n=64, cache_prompt=False)
    assert free == code and result.reason == FinishReason.EOS
    text, cut, _ = _run(engine, "def add(a, b):", sampling, n=64, n_indent=4, cache_prompt=False)
    assert cut.reason == FinishReason.LIMIT and text == cut.text
    assert cut.tokens == result.tokens[:len(cut.tokens)] and len(cut.tokens) < len(result.tokens)
    # cut where the unindented line starts: the body stays whole, nothing of "def sub" is kept
    assert text.startswith(body) and text[len(body):] in ("", "\n"), text
    # the body itself is indented enough for n_indent=4; n_indent=5 cuts before it
    strict, _, _ = _run(engine, "def add(a, b):", sampling, n=64, n_indent=5, cache_prompt=False)
    assert strict == "\n    "


def test_id_slot_pins_the_slot(engine):
    for slot in (3, 1, 7):  # 7 wraps to 3 with 4 slots
        assert _run(engine, PROMPTS[4], n=2, id_slot=slot)[1].id_slot == slot % 4


def test_backend_sampling_runs_the_chain_in_the_decode_graph(engine):
    before = engine.stats()["n_backend_sampled"]
    cpu = _run(engine, PROMPTS[0], GREEDY, n=12, cache_prompt=False)[1]
    graph = _run(engine, PROMPTS[0], SamplingParams(temperature=0.0, backend_sampling=True), n=12,
                 cache_prompt=False)[1]
    assert graph.tokens == cpu.tokens
    assert engine.stats()["n_backend_sampled"] - before == len(graph.tokens)  # an EOS is in tokens too
    seeded = SamplingParams(seed=11, backend_sampling=True)
    a = _run(engine, PROMPTS[1], seeded, n=12, cache_prompt=False)[1].tokens
    assert a and a == _run(engine, PROMPTS[1], seeded, n=12, cache_prompt=False)[1].tokens
    # with n_probs (upstream's limit) the CPU samples instead
    before = engine.stats()["n_backend_sampled"]
    _run(engine, PROMPTS[0], SamplingParams(temperature=0.0, backend_sampling=True, n_probs=2), n=3)
    assert engine.stats()["n_backend_sampled"] == before


def test_lora_sets_are_never_mixed_in_one_batch(synthetic_path, tmp_path):
    from pyllama.synthetic import write_synthetic_lora

    lora = write_synthetic_lora(tmp_path / "lora.gguf")
    sampling = SamplingParams(temperature=0.0, ignore_eos=True)
    with Engine(synthetic_path, n_parallel=4, n_ctx=1024, lora=[(str(lora), 1.0)]) as eng:
        tokens = eng.model.tokenize("Hello world")

        def run(scale):
            return eng.submit(Request(prompt=tokens, sampling=sampling, n_predict=12,
                                      lora=(scale,), cache_prompt=False)).wait().tokens

        alone = {scale: run(scale) for scale in (0.0, 0.5, 1.0)}
        assert len({tuple(v) for v in alone.values()}) == 3
        together = _concurrently(run, [(s,) for s in (0.0, 0.5, 1.0, 0.0, 1.0)])
        assert together == [alone[s] for s in (0.0, 0.5, 1.0, 0.0, 1.0)]
        # the cached prefix of one LoRA set is not reused under another
        first = eng.submit(Request(prompt=tokens, sampling=sampling, n_predict=2, lora=(1.0,))).wait()
        other = eng.submit(Request(prompt=tokens, sampling=sampling, n_predict=2, lora=(0.0,), id_slot=first.id_slot)).wait()
        assert other.timings.cache_n == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names via /proc")
def test_engine_thread_is_named_and_counts_its_busy_time(engine):
    from pathlib import Path

    names = {p.read_text().strip() for p in Path("/proc/self/task").glob("*/comm")}
    assert "pyllama-engine" in names  # what `top -H` shows; compute threads inherit it
    before = engine.stats()
    _run(engine, PROMPTS[0], n=4)
    after = engine.stats()
    assert after["t_decode"] > before["t_decode"]
    assert after["t_busy"] - before["t_busy"] >= after["t_decode"] - before["t_decode"]


@pytest.mark.parametrize("params", [
    dict(seed=5), dict(seed=5, ignore_eos=True), dict(temperature=0.0),
    dict(seed=7, top_k=100, top_p=0.9, logit_bias=((10, 5.0), (20, -3.0))),
    dict(seed=4, logit_bias=((236764, 8.0),)), dict(seed=12, xtc_probability=0.5, xtc_threshold=0.05),
    dict(seed=3, n_probs=3, post_sampling_probs=True),
])
def test_top_k_prefilter_samples_exactly_as_the_full_vocabulary(engine, params):
    # Loading only top_k candidates must not change a single token (one request at a time:
    # batch composition alone changes quantised CPU results).
    from pyllama.engine import _sampling

    prompt = engine.model.tokenize("Once upon a time")
    results = []
    for prefilter in (True, False):
        _sampling.set_top_k_prefilter(prefilter)
        try:
            results.append(engine.submit(Request(prompt=prompt, sampling=SamplingParams(**params), n_predict=24,
                                                 cache_prompt=False)).wait())
        finally:
            _sampling.set_top_k_prefilter(True)
    assert results[0].tokens and results[0].tokens == results[1].tokens


def test_top_k_prefilter_applies_only_when_nothing_before_top_k_acts(gemma_path):
    from pyllama.engine import Model, SamplerChain

    model = Model(gemma_path, vocab_only=True)
    assert SamplerChain(model, SamplingParams()).prefilter_k == 40
    assert SamplerChain(model, SamplingParams(ignore_eos=True, top_k=8)).prefilter_k == 8
    assert SamplerChain(model, SamplingParams(repeat_penalty=1.1)).prefilter_k == 0
    assert SamplerChain(model, SamplingParams(dry_multiplier=0.8)).prefilter_k == 0
    assert SamplerChain(model, SamplingParams(top_k=0)).prefilter_k == 0
    assert SamplerChain(model, SamplingParams(grammar='root ::= "a"')).prefilter_k == 0
    assert SamplerChain(model, SamplingParams(samplers=("temperature", "top_k"))).prefilter_k == 0
    assert SamplerChain(model, SamplingParams(logit_bias=((5, 1.0), (5, 2.0)))).prefilter_k == 0


def test_new_requests_keep_the_busy_slots_together(synthetic_engine):
    # One KV stream per slot: a decode spans every stream between the lowest and the highest
    # busy slot, so scattered slots cost more per step. Make LRU order scattered (0, 2, 4, 6
    # least recent), then start four requests at once: they must take four adjacent slots.
    eng = synthetic_engine
    prompt = eng.model.tokenize("Hello world")
    for slot in (0, 2, 4, 6, 1, 3, 5, 7):
        eng.submit(Request(prompt=prompt, sampling=SamplingParams(seed=1), n_predict=1, id_slot=slot)).wait()
    handles = [eng.submit(Request(prompt=eng.model.tokenize(f"the {i} of"), sampling=SamplingParams(seed=i, ignore_eos=True),
                                  n_predict=200, cache_prompt=False)) for i in range(4)]
    try:
        busy = []
        for _ in range(100):
            busy = eng.call(lambda core: sorted(s.id for s in core.slots if s.busy))
            if len(busy) == 4:
                break
            time.sleep(0.01)
        assert len(busy) == 4 and busy[-1] - busy[0] == 3, busy
    finally:
        for h in handles:
            h.cancel()
        for h in handles:
            h.wait()


def test_an_idle_engine_reuses_the_slot_with_the_longest_cached_prefix(synthetic_engine):
    # Keeping busy slots together must not cost cache hits when nothing else runs.
    eng = synthetic_engine
    prompt = eng.model.tokenize(" the of and a the of and a the of and a")
    other = eng.model.tokenize(" the of is in it")
    eng.submit(Request(prompt=other, sampling=SamplingParams(seed=1), n_predict=1, id_slot=5)).wait()
    eng.submit(Request(prompt=prompt, sampling=SamplingParams(seed=1), n_predict=1, id_slot=3)).wait()
    again = eng.submit(Request(prompt=prompt, sampling=SamplingParams(seed=1), n_predict=1)).wait()
    assert again.id_slot == 3 and again.timings.cache_n == len(prompt) - 1
