# cython: language_level=3, embedsignature=True
"""MediaContext: libmtmd over a loaded Model (llama-server's --mmproj), and its media chunks.

A prompt with media markers and the media files' bytes become one token list plus the media
chunks that stand in it (upstream's process_mtmd_prompt / server_tokens). Each chunk's
positions in the token list hold one negative placeholder value derived from the media's
SHA-256 (the bitmap id mtmd_helper_bitmap_init_from_buf sets), so that prefix matching of
slot caches and the prompt cache compares media by hash as upstream's
server_tokens::get_common_prefix does: a repeated image is found in the cache, not re-encoded.
Tokenizing is thread-safe (HTTP threads); encoding a chunk into the KV cache runs on the
engine thread (EngineCore, between decodes, as upstream's update_slots).
Imports: `_llama`, `_mtmd`, `_model`, `errors`.
"""

import hashlib
import logging
import os

from libc.stdint cimport int32_t
from libcpp.vector cimport vector

from pyllama cimport _llama as L
from pyllama cimport _mtmd as M
from pyllama.engine._model cimport Model, _log_callback

from pyllama.errors import InvalidRequestError, ModelLoadError

logger = logging.getLogger("pyllama.engine")

FLASH_ATTN = {
    "auto": L.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": L.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": L.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}

# NOTE(pyllama): a decompression bomb (a small PNG of 30000x30000 pixels) would make stb_image
# allocate gigabytes before mtmd resizes it; upstream decodes whatever it is sent. Larger
# images are refused from their header, before decoding.
MAX_IMAGE_PIXELS = 8192 * 8192


def default_marker():
    """libmtmd's default media marker, "<__media__>"."""
    return (<bytes>M.mtmd_default_marker()).decode()


def mmproj_caps(path):
    """(vision, audio) of an mmproj file, read without loading it (mtmd_get_cap_from_file)."""
    cdef bytes cpath = os.fsencode(path)
    cdef M.mtmd_caps caps = M.mtmd_get_cap_from_file(cpath)
    return bool(caps.inp_vision), bool(caps.inp_audio)


def image_size(bytes data):
    """(width, height) from a PNG, GIF, BMP or JPEG header, or None when not recognised."""
    n = len(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n" and n >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:6] in (b"GIF87a", b"GIF89a") and n >= 10:
        return int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    if data[:2] == b"BM" and n >= 26:
        return abs(int.from_bytes(data[18:22], "little", signed=True)), \
            abs(int.from_bytes(data[22:26], "little", signed=True))
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < n:
            if data[i] != 0xFF:
                return None
            marker = data[i + 1]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                i += 2
                continue
            seg = int.from_bytes(data[i + 2:i + 4], "big")
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
            i += 2 + seg
    return None


cdef class MediaChunk:
    """One image or audio chunk of a tokenized prompt (a copy of mtmd's). Thread-safe to read."""

    def __cinit__(self):
        self.ptr = NULL

    def __dealloc__(self):
        if self.ptr != NULL:
            M.mtmd_input_chunk_free(self.ptr)
            self.ptr = NULL

    def __repr__(self):
        return f"<MediaChunk {self.kind} {self.n_tokens} tokens id={self.id[:12]}>"


cdef int _placeholder(str media_id, int k):
    # A negative value per (media hash, its k-th chunk in the prompt), never LLAMA_TOKEN_NULL.
    digest = hashlib.sha256(f"{media_id}/{k}".encode()).digest()
    return -2 - (int.from_bytes(digest[:4], "little") & 0x3FFFFFFF)


cdef class MediaContext:
    """libmtmd's context for one Model and its mmproj file (server_context's mctx).

    Args:
        path: the mmproj GGUF.
        model: the loaded text Model; it must stay open while this context lives.
        use_gpu: offload the projector (--mmproj-offload).
        device: the device name for it (-mmdev); None follows the model's.
        n_threads: CPU threads for encoding.
        flash_attn: "auto", "on" or "off".
        warmup: run a warm-up encode after loading.
        image_min_tokens, image_max_tokens: token bounds per image (-1: the model's).
        batch_max_tokens: media tokens per encode batch (--mtmd-batch-max-tokens).
        media_marker: the marker prompts carry where media go.
        video_fps, video_timestamp_interval_ms, video_ffmpeg_dir: video decoding (ffmpeg).

    Raises:
        ModelLoadError: the file is missing or libmtmd refused it.
    Created and freed on the engine thread; tokenize() is thread-safe.
    """

    def __cinit__(self):
        self.ptr = NULL
        self.n_evals = 0

    def __init__(self, path, Model model, *, bint use_gpu=True, device=None, int n_threads=4,
                 flash_attn="auto", bint warmup=True, int image_min_tokens=-1,
                 int image_max_tokens=-1, int batch_max_tokens=1024, media_marker=None,
                 float video_fps=-1.0, int video_timestamp_interval_ms=-1, video_ffmpeg_dir=None):
        self.path = os.fspath(path)
        self.model = model
        if not os.path.isfile(self.path):
            raise ModelLoadError(f"failed to load multimodal model, '{self.path}': no such file")
        cdef M.mtmd_context_params params = M.mtmd_context_params_default()
        params.use_gpu = use_gpu
        if device:
            dev = L.ggml_backend_dev_by_name(device.encode())
            if dev == NULL:
                raise ModelLoadError(f"invalid device: {device}")
            params.device = dev
            params.use_gpu = True
        params.print_timings = False
        params.n_threads = n_threads
        if isinstance(flash_attn, bool):
            flash_attn = "on" if flash_attn else "off"
        params.flash_attn_type = FLASH_ATTN.get(flash_attn, L.LLAMA_FLASH_ATTN_TYPE_AUTO)
        params.warmup = warmup
        params.image_min_tokens = image_min_tokens
        params.image_max_tokens = image_max_tokens
        if batch_max_tokens > 0:
            params.batch_max_tokens = batch_max_tokens
        self.marker = media_marker or default_marker()
        self.marker_c = self.marker.encode()
        params.media_marker = self.marker_c
        cdef bytes cpath = os.fsencode(self.path)
        cdef const char * c_path = cpath
        model._require_open()
        M.mtmd_helper_log_set(_log_callback, NULL)
        with nogil:
            self.ptr = M.mtmd_init_from_file(c_path, model.ptr, params)
        if self.ptr == NULL:
            raise ModelLoadError(f"failed to load multimodal model, '{self.path}'")
        self.opt = M.mtmd_helper_init_opt_default()
        if video_fps > 0:
            self.opt.video_params.fps_target = video_fps
        if video_timestamp_interval_ms >= 0:
            self.opt.video_params.timestamp_interval_ms = video_timestamp_interval_ms
        self.ffmpeg_dir = os.fsencode(video_ffmpeg_dir) if video_ffmpeg_dir else None
        if self.ffmpeg_dir is not None:
            self.opt.video_params.ffmpeg_bin_dir = self.ffmpeg_dir
        logger.info("loaded multimodal model, '%s'", self.path)

    def __dealloc__(self):
        if self.ptr != NULL:
            M.mtmd_free(self.ptr)
            self.ptr = NULL

    def close(self):
        """Free libmtmd's context (before the Model it was made from). Engine thread."""
        if self.ptr != NULL:
            M.mtmd_free(self.ptr)
            self.ptr = NULL

    cdef int _require_open(self) except -1:
        if self.ptr == NULL:
            raise ModelLoadError("multimodal context is closed")
        return 0

    @property
    def vision(self):
        """Whether the projector takes images."""
        return self.ptr != NULL and M.mtmd_support_vision(self.ptr)

    @property
    def audio(self):
        """Whether the projector takes audio."""
        return self.ptr != NULL and M.mtmd_support_audio(self.ptr)

    @property
    def video(self):
        """Whether this build takes video (MTMD_VIDEO, ffmpeg run as a subprocess)."""
        return self.ptr != NULL and M.mtmd_helper_support_video(self.ptr)

    @property
    def use_mrope(self):
        """Whether the text model takes M-RoPE positions for media (Qwen2-VL and kin)."""
        return self.ptr != NULL and M.mtmd_decode_use_mrope(self.ptr)

    @property
    def audio_sample_rate(self):
        return M.mtmd_get_audio_sample_rate(self.ptr) if self.ptr != NULL else -1

    def tokenize(self, prompt, files, names=None):
        """Tokenize a prompt whose media markers stand for `files` (upstream's process_mtmd_prompt).

        Args:
            prompt: the text, with one marker per file.
            files: the media files' bytes (image: png/jpeg/bmp/gif..., audio: wav/mp3/flac).
            names: what to call each file in an error ("messages[0].content[1]"); default
                "multimodal_data[i]".

        Returns:
            (tokens, media): the token ids, each media chunk's positions holding its
            placeholder; media is {start position: MediaChunk}.

        Raises:
            InvalidRequestError: a file that is not an image or audio, a kind this projector
                does not take, an image too large, or markers that do not match the files.
        Thread-safe.
        """
        self._require_open()
        names = list(names) if names is not None else [f"multimodal_data[{i}]" for i in range(len(files))]
        cdef vector[M.mtmd_bitmap *] bitmaps
        cdef vector[M.mtmd_helper_video *] videos
        cdef M.mtmd_helper_bitmap_wrapper out
        cdef const unsigned char * buf
        cdef size_t n
        cdef bytes data
        cdef bytes text = prompt.encode("utf-8") if isinstance(prompt, str) else bytes(prompt)
        cdef M.mtmd_input_text inp
        cdef M.mtmd_input_chunks * chunks = NULL
        cdef int32_t rc
        cdef size_t i, n_chunks, n_text
        cdef const M.mtmd_input_chunk * c
        cdef const L.llama_token * toks
        cdef MediaChunk mc
        n_markers = text.count(self.marker_c)
        if n_markers != len(files):  # mtmd_tokenize's "number of bitmaps not matching the markers"
            raise InvalidRequestError(
                f"the prompt has {n_markers} media marker(s) ({self.marker}) for {len(files)} "
                f"media file(s)", param="prompt")
        try:
            for i in range(len(files)):
                data = bytes(files[i])
                name = names[i]
                if not data:
                    raise InvalidRequestError(f"{name}: the media file is empty", param=name)
                size = image_size(data)
                if size is not None and size[0] * size[1] > MAX_IMAGE_PIXELS:
                    raise InvalidRequestError(
                        f"{name}: image of {size[0]}x{size[1]} pixels is too large "
                        f"(at most {MAX_IMAGE_PIXELS} pixels)", param=name)
                buf = data
                n = len(data)
                with nogil:
                    out = M.mtmd_helper_bitmap_init_from_buf(self.ptr, buf, n, False, self.opt)
                if out.video_ctx != NULL:
                    videos.push_back(out.video_ctx)
                if out.bitmap == NULL:
                    raise InvalidRequestError(f"{name}: Failed to load image or audio file", param=name)
                bitmaps.push_back(out.bitmap)
                if M.mtmd_bitmap_is_audio(out.bitmap) and not M.mtmd_support_audio(self.ptr):
                    raise InvalidRequestError(
                        f"{name}: audio input is not supported by this model's projector", param=name)
                if not M.mtmd_bitmap_is_audio(out.bitmap) and not M.mtmd_support_vision(self.ptr):
                    raise InvalidRequestError(
                        f"{name}: image input is not supported by this model's projector", param=name)
            inp.text = text
            inp.text_len = len(text)
            inp.add_special = True
            inp.parse_special = True
            chunks = M.mtmd_input_chunks_init()
            with nogil:
                rc = M.mtmd_tokenize(self.ptr, chunks, &inp, <const M.mtmd_bitmap * const *>bitmaps.data(),
                                     bitmaps.size())
            if rc != 0:
                raise InvalidRequestError(f"Failed to tokenize prompt: media preprocessing failed ({rc})",
                                          param=names[0] if names else "prompt")
            tokens = []
            media = {}
            seen = {}
            n_chunks = M.mtmd_input_chunks_size(chunks)
            for i in range(n_chunks):
                c = M.mtmd_input_chunks_get(chunks, i)
                if M.mtmd_input_chunk_get_type(c) == M.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    toks = M.mtmd_input_chunk_get_tokens_text(c, &n_text)
                    tokens.extend([toks[j] for j in range(n_text)])
                    continue
                mc = MediaChunk.__new__(MediaChunk)
                mc.ptr = M.mtmd_input_chunk_copy(c)
                mc.n_tokens = <int>M.mtmd_input_chunk_get_n_tokens(c)
                mc.n_pos = <int>M.mtmd_input_chunk_get_n_pos(c)
                cid = M.mtmd_input_chunk_get_id(c)
                mc.id = (<bytes>cid).decode() if cid != NULL else ""
                mc.kind = "audio" if M.mtmd_input_chunk_get_type(c) == M.MTMD_INPUT_CHUNK_TYPE_AUDIO else "image"
                k = seen.get(mc.id, 0)
                seen[mc.id] = k + 1
                mc.placeholder = _placeholder(mc.id, k)
                media[len(tokens)] = mc
                tokens.extend([mc.placeholder] * mc.n_tokens)
            return tokens, media
        finally:
            if chunks != NULL:
                M.mtmd_input_chunks_free(chunks)
            for i in range(bitmaps.size()):
                M.mtmd_bitmap_free(bitmaps[i])
            for i in range(videos.size()):
                M.mtmd_helper_video_free(videos[i])

    cdef int eval_chunk(self, L.llama_context * lctx, MediaChunk chunk, L.llama_pos n_past,
                        L.llama_seq_id seq_id, int n_batch, L.llama_pos * new_n_past) noexcept nogil:
        # Encode one media chunk and decode its embeddings into seq_id from n_past on (no
        # logits); non-causal attention where the model wants it (mtmd_helper_eval_chunk_single,
        # as upstream's process_mtmd_chunk). Engine thread, GIL not needed. Returns 0 on success.
        cdef int32_t rc = M.mtmd_helper_eval_chunk_single(self.ptr, lctx, chunk.ptr, n_past, seq_id,
                                                          n_batch, False, new_n_past)
        if rc == 0:
            self.n_evals += 1
        return rc
