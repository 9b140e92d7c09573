"""Multimodal input (--mmproj) end to end: a real server, the default model and a tiny random
Gemma 3 vision projector (tests/multimodal_models.py), real HTTP.

The projector's weights are random, so no test reads the words: they check how prompts are
counted (each image is <start_of_image>, 4 image tokens, <end_of_image>, as libmtmd lays a
Gemma 3 image out), that generation happens, that a repeated image is served from the cache
(timings cache_n / prompt_n, and the projector's log of encodes), and the error shapes.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from multimodal_models import TOKENS_PER_IMAGE, huge_png, png  # noqa: E402

from .conftest import ServerProcess  # noqa: E402

pytest.importorskip("transformers")

IMAGE_TOKENS = TOKENS_PER_IMAGE + 2  # <start_of_image>, the embeddings, <end_of_image>


@pytest.fixture(scope="module")
def mmproj_path():
    from multimodal_models import tiny_gemma3_mmproj

    return tiny_gemma3_mmproj()


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    (folder / "cat.png").write_bytes(png(48, 40, seed=7))
    (folder / "sub").mkdir()
    (folder / "sub" / "dog.png").write_bytes(png(40, 48, seed=8))
    return folder


@pytest.fixture(scope="module")
def vlm(gemma_path, mmproj_path, media_dir, tmp_path_factory):
    srv = ServerProcess(["-m", str(gemma_path), "--mmproj", str(mmproj_path), "-np", "2", "-c", "4096",
                         "--media-path", str(media_dir), "--image-min-tokens", "4",
                         "--mtmd-batch-max-tokens", "512",
                         "--slot-save-path", str(tmp_path_factory.mktemp("mm-slots"))])
    srv.wait_ready()
    yield srv
    srv.stop()


@pytest.fixture
def client(vlm):
    with httpx.Client(base_url=vlm.base, timeout=300) as c:
        yield c


def data_url(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


def chat(client, parts, **extra):
    body = {"messages": [{"role": "user", "content": parts}], "max_tokens": 4, "temperature": 0, **extra}
    return client.post("/v1/chat/completions", json=body)


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def test_props_and_models_say_multimodal(client):
    props = client.get("/props").json()
    assert props["modalities"]["vision"] is True
    assert props["modalities"]["audio"] is False
    assert props["media_marker"].startswith("<__media_") and props["media_marker"].endswith("__>")
    models = client.get("/v1/models").json()
    assert models["models"][0]["capabilities"] == ["completion", "multimodal"]


def expected_tokens(client, messages) -> int:
    """The prompt tokens upstream counts: the rendered prompt's text with each marker as
    <start_of_image><end_of_image>, plus the image embeddings (process_mtmd_prompt)."""
    marker = client.get("/props").json()["media_marker"]
    prompt = client.post("/apply-template", json={"messages": messages}).json()["prompt"]
    n_images = prompt.count(marker)
    text = prompt.replace(marker, "<start_of_image><end_of_image>")
    tokens = client.post("/tokenize", json={"content": text, "add_special": True, "parse_special": True}).json()
    return len(tokens["tokens"]) + n_images * TOKENS_PER_IMAGE


def test_an_image_counts_as_libmtmd_lays_it_out_and_generation_happens(client):
    text = {"type": "text", "text": "Describe the picture."}
    one_parts = [text, image_part(data_url(png(64, 48, seed=1)))]
    two_parts = [text, image_part(data_url(png(64, 48, seed=2))), image_part(data_url(png(30, 90, seed=3)))]
    one = chat(client, one_parts).json()
    two = chat(client, two_parts).json()
    n1, n2 = one["usage"]["prompt_tokens"], two["usage"]["prompt_tokens"]
    assert n1 == expected_tokens(client, [{"role": "user", "content": one_parts}])
    assert n2 == expected_tokens(client, [{"role": "user", "content": two_parts}])
    assert n2 - n1 == IMAGE_TOKENS  # markers side by side; any size: the projector resizes to 64x64
    assert one["usage"]["completion_tokens"] == 4
    assert one["choices"][0]["finish_reason"] == "length"
    assert one["timings"]["prompt_n"] + one["timings"]["cache_n"] == n1


def test_a_repeated_image_is_served_from_the_cache(client, vlm):
    picture = image_part(data_url(png(64, 64, seed=11)))
    parts = [{"type": "text", "text": "What colour dominates here?"}, picture]
    log_before = Path(vlm.log.name).read_text(errors="replace").count("image slice encoded")
    first = chat(client, parts).json()
    second = chat(client, parts).json()
    n = first["usage"]["prompt_tokens"]
    assert second["usage"]["prompt_tokens"] == n
    assert second["timings"]["cache_n"] == n - 1 and second["timings"]["prompt_n"] == 1
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == n - 1
    encodes = Path(vlm.log.name).read_text(errors="replace").count("image slice encoded") - log_before
    assert encodes == 1, "the repeated image was encoded again"
    # another image at the same place: the prefix up to it is reused, the image is encoded
    other = chat(client, [parts[0], image_part(data_url(png(64, 64, seed=12)))]).json()
    assert 0 < other["timings"]["cache_n"] < n - IMAGE_TOKENS
    assert other["timings"]["prompt_n"] >= IMAGE_TOKENS
    assert Path(vlm.log.name).read_text(errors="replace").count("image slice encoded") - log_before == 2


def test_completion_multimodal_data_and_the_marker(client):
    marker = client.get("/props").json()["media_marker"]
    image = base64.b64encode(png(50, 50, seed=4)).decode()
    plain = client.post("/completion", json={"prompt": "A picture:<start_of_image><end_of_image> and more",
                                             "n_predict": 3}).json()
    res = client.post("/completion", json={
        "prompt": {"prompt_string": f"A picture:{marker} and more", "multimodal_data": [image]},
        "n_predict": 3, "temperature": 0})
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["tokens_evaluated"] == plain["tokens_evaluated"] + TOKENS_PER_IMAGE
    assert body["timings"]["predicted_n"] == 3
    # one marker, two files: a 400 that says so
    bad = client.post("/completion", json={
        "prompt": {"prompt_string": f"A picture:{marker}", "multimodal_data": [image, image]}, "n_predict": 1})
    assert bad.status_code == 400
    assert "marker" in bad.json()["error"]["message"]


def test_streamed_chat_with_an_image(client):
    parts = [{"type": "text", "text": "Hi"}, image_part(data_url(png(20, 20, seed=5)))]
    with client.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": parts}], "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}) as resp:
        assert resp.status_code == 200
        lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert '"usage"' in lines[-2]


def test_files_under_media_path(client):
    ok = chat(client, [{"type": "text", "text": "x"}, image_part("file://cat.png")])
    assert ok.status_code == 200, ok.text
    ok = chat(client, [{"type": "text", "text": "x"}, image_part("file://sub/dog.png")])
    assert ok.status_code == 200, ok.text
    ok = chat(client, [{"type": "text", "text": "x"}, image_part("file:////sub//dog.png")])  # the same file there
    assert ok.status_code == 200, ok.text
    for url in ("file://../etc/passwd", "file:///etc/passwd", "file://missing.png"):
        res = chat(client, [{"type": "text", "text": "x"}, image_part(url)])
        assert res.status_code == 400, url
        assert res.json()["error"]["message"].startswith("messages[0].content[1]: ")


def test_anthropic_image_blocks(client):
    block = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": base64.b64encode(png(40, 40, seed=6)).decode()}}
    text = {"type": "text", "text": "What is this?"}
    with_image = client.post("/v1/messages", json={"model": "m", "max_tokens": 3,
                                                   "messages": [{"role": "user", "content": [text, block]}]})
    without = client.post("/v1/messages", json={"model": "m", "max_tokens": 3,
                                                "messages": [{"role": "user", "content": [text]}]})
    assert with_image.status_code == 200, with_image.text

    def total(res):  # input_tokens leaves out what came from the cache
        usage = res.json()["usage"]
        return usage["input_tokens"] + usage.get("cache_read_input_tokens", 0)

    assert total(with_image) > total(without) + TOKENS_PER_IMAGE
    counted = client.post("/v1/messages/count_tokens", json={
        "model": "m", "messages": [{"role": "user", "content": [text, block]}]})
    assert counted.json()["input_tokens"] == total(with_image)


@pytest.mark.parametrize("payload, words", [
    (b"this is not an image at all", "Failed to load image"),
    (png(64, 64, seed=9)[:60], "Failed to load image"),  # truncated inside the pixel data
    (huge_png(20000, 20000), "too large"),
])
def test_bad_images_are_a_400_that_names_the_part(client, payload, words):
    res = chat(client, [{"type": "text", "text": "x"}, {"type": "text", "text": "y"},
                        image_part(data_url(payload))])
    assert res.status_code == 400
    error = res.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("messages[0].content[2]: ") and words in error["message"]
    assert client.get("/health").status_code == 200


def test_bad_urls_are_a_400(client):
    for url in ("data:image/png;base64,@@@not-base64@@@", "data:text/plain;base64,aGk=", "", "data:image/png,abc"):
        res = chat(client, [image_part(url)])
        assert res.status_code == 400, url
        assert res.json()["error"]["message"].startswith("messages[0].content[0]: ")
    audio = chat(client, [{"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}])
    assert audio.status_code == 400 and "audio input is not supported" in audio.json()["error"]["message"]


def test_transcriptions_without_an_audio_model_is_upstreams_501(client):
    res = client.post("/v1/audio/transcriptions", files={"file": ("a.wav", b"RIFF")}, data={"model": "m"})
    assert res.status_code == 501
    assert res.json()["error"]["type"] == "not_supported_error"


def test_an_image_sent_to_a_text_only_model_is_a_400(http):
    res = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "text", "text": "x"}, image_part(data_url(png(8, 8)))]}], "max_tokens": 1})
    assert res.status_code == 400
    assert "messages[0].content[1]" in res.json()["error"]["message"]
    assert "image input is not supported" in res.json()["error"]["message"]
    res = http.post("/completion", json={"prompt": {"prompt_string": "x", "multimodal_data": ["aGk="]}})
    assert res.status_code == 400
    assert "does not support multimodal" in res.json()["error"]["message"]
    props = http.get("/props").json()
    assert props["modalities"] == {"vision": False, "video": False, "audio": False}
    assert http.get("/v1/models").json()["models"][0]["capabilities"] == ["completion"]


def test_a_bad_projector_or_device_fails_the_start_clearly(gemma_path, mmproj_path, tmp_path):
    import subprocess

    script = Path(sys.executable).parent / "pyllama-server"
    junk = tmp_path / "junk-mmproj.gguf"
    junk.write_bytes(b"GGUF-not-really")
    for args, words in ((["--mmproj", str(junk)], f"failed to load multimodal model, '{junk}'"),
                        (["--mmproj", str(mmproj_path), "-mmdev", "NoSuchDevice"], "invalid device: NoSuchDevice")):
        done = subprocess.run([str(script), "-m", str(gemma_path), "--port", "0", *args],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode != 0
        assert words in done.stdout + done.stderr


# --- audio: a tiny random Qwen2-Audio (Whisper) encoder onto the default model -----------------
AUDIO_TOKENS = 750  # libmtmd's qwen2a: one 30 s window of 16 kHz audio (3000 mel frames / 4)


@pytest.fixture(scope="module")
def audio_server(gemma_path):
    from multimodal_models import tiny_qwen2_audio_mmproj

    srv = ServerProcess(["-m", str(gemma_path), "--mmproj", str(tiny_qwen2_audio_mmproj()), "-np", "1",
                         "-c", "4096", "--no-mmproj-offload"])
    srv.wait_ready()
    yield srv
    srv.stop()


@pytest.fixture
def audio(audio_server):
    with httpx.Client(base_url=audio_server.base, timeout=300) as c:
        yield c


def test_audio_props_and_an_input_audio_part(audio):
    from multimodal_models import wav

    modalities = audio.get("/props").json()["modalities"]
    assert modalities["audio"] is True and modalities["vision"] is False
    text = {"type": "text", "text": "What is said?"}
    sound = {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav(1.0)).decode(), "format": "wav"}}
    res = chat(audio, [text, sound])
    assert res.status_code == 200, res.text
    n = res.json()["usage"]["prompt_tokens"]
    marker = audio.get("/props").json()["media_marker"]
    prompt = audio.post("/apply-template", json={"messages": [{"role": "user", "content": [text, sound]}]}).json()["prompt"]
    # libmtmd's qwen2a wraps the audio in <|audio_bos|> / <|audio_eos|>, each piece tokenized
    # on its own (they are plain text in this vocabulary)
    before, after = prompt.split(marker)
    n_text = len(audio.post("/tokenize", json={"content": [before, "<|audio_bos|>", "<|audio_eos|>", after],
                                               "add_special": True, "parse_special": True}).json()["tokens"])
    assert n == n_text + AUDIO_TOKENS
    assert res.json()["usage"]["completion_tokens"] == 4
    image = chat(audio, [text, image_part(data_url(png(8, 8)))])
    assert image.status_code == 400 and "image input is not supported" in image.json()["error"]["message"]


def test_transcriptions(audio):
    from multimodal_models import wav

    res = audio.post("/v1/audio/transcriptions", files={"file": ("a.wav", wav(1.5), "audio/wav")},
                     data={"model": "m", "max_tokens": "5", "temperature": "0", "language": "en"})
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["type"] == "transcript.text.done" and isinstance(body["text"], str)
    usage = body["usage"]
    assert usage["type"] == "tokens" and usage["output_tokens"] == 5
    assert usage["input_tokens"] > AUDIO_TOKENS and usage["total_tokens"] == usage["input_tokens"] + 5
    # the same file again: served from the cache
    again = audio.post("/v1/audio/transcriptions", files={"file": ("a.wav", wav(1.5), "audio/wav")},
                       data={"model": "m", "max_tokens": "5", "temperature": "0", "language": "en"}).json()
    assert again["usage"]["input_tokens_details"]["cached_tokens"] == usage["input_tokens"] - 1
    with audio.stream("POST", "/audio/transcriptions", files={"file": ("a.wav", wav(0.5), "audio/wav")},
                      data={"stream": "true", "max_tokens": "3"}) as stream:
        assert stream.status_code == 200
        events = [line for line in stream.iter_lines() if line.startswith("data: ")]
    assert '"transcript.text.done"' in events[-2] or '"transcript.text.done"' in events[-1]
    for data, words in (({"model": "m"}, "No input file"),):
        res = audio.post("/v1/audio/transcriptions", files={"other": ("a.wav", wav(0.1))}, data=data)
        assert res.status_code == 400 and words in res.json()["error"]["message"]
    res = audio.post("/v1/audio/transcriptions", files={"file": ("a.wav", wav(0.1))}, data={"response_format": "text"})
    assert res.status_code == 400 and "response_format" in res.json()["error"]["message"]
    res = audio.post("/v1/audio/transcriptions", files={"file": ("a.txt", b"not audio at all")})
    assert res.status_code == 400 and res.json()["error"]["message"].startswith("file: ")


def test_the_projector_sleeps_and_wakes_with_the_model(gemma_path, mmproj_path):
    from .test_sleep import _wait_sleeping

    srv = ServerProcess(["-m", str(gemma_path), "--mmproj", str(mmproj_path), "-np", "1", "-c", "2048",
                         "--sleep-idle-seconds", "1"])
    try:
        srv.wait_ready()
        with httpx.Client(base_url=srv.base, timeout=300) as c:
            parts = [{"type": "text", "text": "Hi"}, image_part(data_url(png(16, 16, seed=21)))]
            first = chat(c, parts).json()
            _wait_sleeping(c)
            asleep = c.get("/props").json()
            assert asleep["is_sleeping"] is True and asleep["modalities"]["vision"] is True
            woken = chat(c, parts)  # reloads the model and its projector
            assert woken.status_code == 200, woken.text
            assert woken.json()["usage"]["prompt_tokens"] == first["usage"]["prompt_tokens"]
            assert c.get("/props").json()["modalities"]["vision"] is True
        log = Path(srv.log.name).read_text(errors="replace")
        assert log.count("loaded multimodal model") == 2
    finally:
        srv.stop()


def test_responses_input_image(client):
    image = {"type": "input_image", "image_url": data_url(png(24, 24, seed=31))}
    text = {"type": "input_text", "text": "Describe the picture."}
    res = client.post("/v1/responses", json={"input": [{"role": "user", "content": [text, image]}],
                                             "max_output_tokens": 3})
    assert res.status_code == 200, res.text
    expected = expected_tokens(client, [{"role": "user", "content": [
        {"type": "text", "text": "Describe the picture."}, image_part(image["image_url"])]}])
    assert res.json()["usage"]["input_tokens"] == expected
    bad = client.post("/v1/responses", json={"input": [{"role": "user", "content": [
        text, {"type": "input_image", "image_url": data_url(b"nope")}]}], "max_output_tokens": 1})
    assert bad.status_code == 400 and bad.json()["error"]["message"].startswith("messages[0].content[1]: ")


def test_a_slot_with_an_image_saves_and_restores(client, vlm):
    parts = [{"type": "text", "text": "Keep this picture:"}, image_part(data_url(png(36, 36, seed=41)))]
    first = chat(client, parts, id_slot=1).json()
    n = first["usage"]["prompt_tokens"]
    kept = n + first["usage"]["completion_tokens"] - 1  # the last reply token is not in the KV
    saved = client.post("/slots/1?action=save", json={"filename": "with-image.bin"})
    assert saved.status_code == 200 and saved.json()["n_saved"] == kept
    assert client.post("/slots/1?action=erase").json()["n_erased"] == kept
    encodes = Path(vlm.log.name).read_text(errors="replace").count("image slice encoded")
    restored = client.post("/slots/1?action=restore", json={"filename": "with-image.bin"})
    assert restored.status_code == 200, restored.text
    assert restored.json()["n_restored"] == kept
    again = chat(client, parts, id_slot=1).json()
    assert again["timings"]["cache_n"] == n - 1  # the image matched by its hash, not encoded again
    assert Path(vlm.log.name).read_text(errors="replace").count("image slice encoded") == encodes


def test_an_image_comes_back_from_the_ram_prompt_cache(client, vlm):
    parts = [{"type": "text", "text": "An image for the RAM cache:"}, image_part(data_url(png(44, 44, seed=51)))]
    first = chat(client, parts, id_slot=0).json()
    n = first["usage"]["prompt_tokens"]
    other = [{"type": "text", "text": "Something else entirely, a long text that shares nothing. " * 3}]
    chat(client, other, id_slot=0)  # the image's conversation goes to the prompt cache (--cache-ram)
    encodes = Path(vlm.log.name).read_text(errors="replace").count("image slice encoded")
    back = chat(client, parts, id_slot=0).json()
    assert back["timings"]["cache_n"] == n - 1
    assert Path(vlm.log.name).read_text(errors="replace").count("image slice encoded") == encodes


# --- M-RoPE: a tiny Qwen2-VL, whose images take fewer positions than tokens ----------------------
UPSTREAM = os.environ.get("PYLLAMA_UPSTREAM_SERVER")


@pytest.fixture(scope="module")
def qwen2vl():
    from multimodal_models import tiny_qwen2vl

    return tiny_qwen2vl()


@pytest.fixture(scope="module")
def mrope(qwen2vl):
    text, mmproj = qwen2vl
    srv = ServerProcess(["-m", str(text), "--mmproj", str(mmproj), "-np", "1", "-c", "2048"])
    srv.wait_ready()
    with httpx.Client(base_url=srv.base, timeout=300) as c:
        yield c
    srv.stop()


def mrope_requests() -> list:
    look = {"type": "text", "text": "look at this"}
    ask = {"type": "text", "text": "and tell me what it is"}
    two = [{"type": "text", "text": "two"}, image_part(data_url(png(28, 56, seed=2))), {"type": "text", "text": "and"},
           image_part(data_url(png(84, 28, seed=3))), {"type": "text", "text": "end"}]
    return [[look, image_part(data_url(png(56, 84, seed=1))), ask], two]


def mrope_chat(client, parts, **extra):
    res = chat(client, parts, max_tokens=3, logprobs=True, top_logprobs=3, **extra)
    assert res.status_code == 200, res.text
    return res.json()


def top_logprobs(res: dict) -> list:
    # the first two tokens' top-3 log-probabilities: they move in the third decimal when the
    # text after an image sits at the wrong positions, where the greedy words of this random
    # model do not
    return [t["logprob"] for c in res["choices"][0]["logprobs"]["content"][:2] for t in c["top_logprobs"]]


def assert_close(a: list, b: list, tolerance: float = 1e-4) -> None:
    assert len(a) == len(b) == 6 and a == pytest.approx(b, abs=tolerance), (a, b)


# a prompt evaluated whole and one whose last token alone is decoded after the cache differ by up
# to ~7e-4 (F32 kernels of other batch shapes; llama-server gives the same two figures); text
# after an image at the wrong positions moves them by 3e-3 to 2e-2
BATCH_NOISE = 3e-3


def test_mrope_images_take_their_positions_and_come_back_from_the_cache(mrope):
    # 56x84 px: 2x3 merged patches, 6 tokens at 3 positions; the text after the image continues
    # from the image's positions, in a fresh evaluation and after a cached prefix alike
    single, two = mrope_requests()
    fresh = mrope_chat(mrope, single, cache_prompt=False)
    first = mrope_chat(mrope, single)
    again = mrope_chat(mrope, single)
    assert again["timings"]["cache_n"] == again["usage"]["prompt_tokens"] - 1
    assert fresh["usage"]["prompt_tokens"] == first["usage"]["prompt_tokens"]
    assert_close(top_logprobs(first), top_logprobs(fresh), BATCH_NOISE)
    assert_close(top_logprobs(again), top_logprobs(first))
    # two images, the second prompt sharing only the chat head with the first
    after_head = mrope_chat(mrope, two)
    assert 0 < after_head["timings"]["cache_n"] < after_head["usage"]["prompt_tokens"] // 2
    cached_two = mrope_chat(mrope, two)  # everything but the last token from the cache
    assert cached_two["timings"]["cache_n"] == cached_two["usage"]["prompt_tokens"] - 1
    fresh_two = mrope_chat(mrope, two, cache_prompt=False)
    assert_close(top_logprobs(after_head), top_logprobs(fresh_two), BATCH_NOISE)
    assert_close(top_logprobs(cached_two), top_logprobs(fresh_two), BATCH_NOISE)


@pytest.mark.skipif(not UPSTREAM, reason="PYLLAMA_UPSTREAM_SERVER names no llama-server binary")
def test_mrope_output_is_upstreams(mrope, qwen2vl, tmp_path):
    from server_process import free_port

    text, mmproj = qwen2vl
    port = free_port()
    with open(tmp_path / "upstream.log", "wb") as log:
        theirs = subprocess.Popen([UPSTREAM, "-m", str(text), "--mmproj", str(mmproj), "-np", "1", "-c", "2048",
                                   "--no-webui", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as upstream:
            deadline = time.time() + 120
            while time.time() < deadline:
                try:
                    if upstream.get("/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            for parts in mrope_requests():
                ours, want = mrope_chat(mrope, parts, cache_prompt=False), mrope_chat(upstream, parts, cache_prompt=False)
                assert ours["usage"]["prompt_tokens"] == want["usage"]["prompt_tokens"]
                assert_close(top_logprobs(ours), top_logprobs(want))
    finally:
        theirs.terminate()
        theirs.wait()
