# cython: language_level=3, embedsignature=True
"""EngineCore: llama-server's slots over one llama_context, one shared batch per step.

Each `step()` puts the next token of every generating slot and then prompt chunks of the
slots being filled into ONE batch (at most n_batch tokens), decodes it with the GIL released,
samples every slot that produced logits (in parallel across CPU threads), then publishes one
event per request. Mirrors upstream's server_context::update_slots / process_token
(tools/server/server-context.cpp).
Engine thread only: the thread that created an EngineCore is the only one that may call it.
Imports: `_llama`, `_bridge` (common), `_model`, `_context`, `_sampling`, `_prompt_cache`,
`engine.types`, `errors`.
"""

import bisect
import logging
import os
import time

import orjson

from cython.parallel cimport prange
from libc.math cimport exp
from libc.stdint cimport int32_t, int64_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libcpp.algorithm cimport partial_sort
from libcpp.utility cimport pair
from libcpp.vector cimport vector
from cpython.pythread cimport PyThread_release_lock, PyThread_type_lock

from pyllama cimport _llama as L
from pyllama cimport _bridge as B
from pyllama._bridge cimport (
    COMMON_CONTEXT_SEQ_RM_TYPE_FULL,
    COMMON_CONTEXT_SEQ_RM_TYPE_PART,
    COMMON_CONTEXT_SEQ_RM_TYPE_NO,
    COMMON_CONTEXT_SEQ_RM_TYPE_RS,
    common_context_can_seq_rm,
    common_context_seq_rm_type,
)
from pyllama.engine._channel cimport EventChannel
from pyllama.engine._context cimport Context, check_decode
from pyllama.engine._media cimport MediaChunk, MediaContext
from pyllama.engine._model cimport Model
from pyllama.engine._prompt_cache cimport Checkpoint, PromptCache
from pyllama.engine._sampling cimport SamplerChain, SamplerState, sampler_accept, sampler_sample

from pyllama.engine.types import (
    ErrorEvent,
    FinishEvent,
    FinishReason,
    ProgressEvent,
    Timings,
    TokenEvent,
    TokenProb,
)
from pyllama.errors import ContextLengthExceededError, EngineError, InvalidRequestError

logger = logging.getLogger("pyllama.engine")

# Slots whose cache shares at most this many tokens less than the best one count as equally
# similar when choosing a slot (see free_slot_for).
cdef int SLOT_LCP_SLACK = 32
# upstream's DBG level, below logging.DEBUG (its TRC): see _model.LOG_DEBUG_VERBOSE
cdef int LOG_DEBUG_VERBOSE = 5


cdef enum SlotState:
    SLOT_IDLE = 0
    SLOT_PREFILL = 1
    SLOT_GENERATING = 2


cdef struct SlotC:
    # Per-slot state the C loop reads; the Python Slot holds the rest.
    int32_t state
    int32_t n_past          # tokens in the KV cache for this sequence
    int32_t i_batch         # output row of this slot in the current batch, -1 if none
    L.llama_token sampled
    SamplerState * sampler  # borrowed from the request's SamplerChain
    const float * logits
    bint on_backend         # the chain runs in the decode graph (llama_set_sampler)
    vector[L.llama_token] * cache   # the Slot's cache_tokens: what the KV cache holds
    vector[L.llama_token] * prompt  # the Slot's prompt
    int n_prompt_done
    int n_cached
    bint held               # not in this step's batch (another LoRA set runs this step)
    bint prefilled          # took prompt tokens in this step's batch
    int n_in_batch          # tokens _fill_batch put in the batch; committed after a decode
    int prefill_stop        # the prompt chunk of this step ends here (a checkpoint point)
    # speculative decoding (server_slot's spec_* fields)
    bint can_spec           # this request may draft
    int spec_n_max          # the request's cap on a draft (-1: none)
    int spec_n_min          # a shorter draft is dropped
    vector[L.llama_token] * draft     # the Slot's draft: tokens after `sampled` in this batch
    int n_draft             # draft tokens in this step's batch
    bint verified           # `accepted` holds this step's tokens (sampled + accepted drafts)
    vector[L.llama_token] * accepted  # the Slot's accepted tokens of this step
    int n_draft_total       # draft tokens proposed for the request
    int n_draft_accepted    # of those, accepted by the target
    uint64_t rng            # synthetic acceptance (--spec-synth-*): the slot's xorshift state
    bint media_done         # a media chunk went into the KV cache this step (no checkpoint)
    # the next token's position minus n_past: an M-RoPE media chunk (Qwen2-VL and kin) takes
    # fewer positions than KV cells, so positions run behind token counts after one
    # (upstream's server_tokens::pos_next); 0 without such media
    int32_t pos_delta


cdef int utf8_complete_len(bytes data):
    # Length of the longest prefix of `data` that does not end inside a UTF-8 character.
    cdef Py_ssize_t n = len(data), i, need
    cdef unsigned char c
    i = n - 1
    while i >= 0 and i >= n - 4:
        c = data[i]
        if c & 0xC0 != 0x80:  # a lead byte (or ASCII)
            if c < 0x80:
                need = 1
            elif c >= 0xF0:
                need = 4
            elif c >= 0xE0:
                need = 3
            elif c >= 0xC0:
                need = 2
            else:
                need = 1
            return n if n - i >= need else i
        i -= 1
    return n


def _find_partial_stop(str text, str word):
    # Start of the longest suffix of `text` that is a proper prefix of `word`, or -1.
    cdef Py_ssize_t k
    for k in range(min(len(word) - 1, len(text)), 0, -1):
        if text.endswith(word[:k]):
            return len(text) - k
    return -1


cdef class Slot:
    """One sequence of the context and the request it serves. Engine thread only."""

    cdef public int id
    cdef vector[L.llama_token] cache_tokens  # what the KV cache holds for this sequence
    cdef vector[L.llama_token] prompt
    cdef public object request
    cdef public object channel
    cdef public SamplerChain sampler
    cdef public double t_last_used
    cdef public tuple lora        # the scales this request runs with
    cdef public tuple cache_lora  # the scales the cached tokens were computed with
    cdef bint update_cache        # free_slot_for chose it so: save / load the prompt cache
    cdef public list checkpoints  # context checkpoints of cache_tokens (Checkpoint), oldest first
    cdef tuple user_starts        # where the request's user messages start, ascending
    # per-request progress
    cdef int n_decoded
    cdef int n_predict
    cdef bytes pending_bytes
    # Sent text is kept as pieces and joined once at the end (no growing-string copies per
    # token); only the unsent tail, held back while it may become a stop string, is a str.
    cdef list sent_parts
    cdef str unsent
    cdef int n_sent  # characters sent
    cdef list generated_tokens
    cdef bint truncated
    cdef double t_start
    cdef double t_prompt_done
    cdef bint has_new_line
    cdef int last_nl_pos
    cdef vector[L.llama_token] draft
    cdef vector[L.llama_token] accepted

    def __init__(self, int slot_id):
        self.id = slot_id
        self.request = None
        self.channel = None
        self.sampler = None
        self.t_last_used = 0.0
        self.lora = ()
        self.cache_lora = ()
        self.update_cache = False
        self.checkpoints = []
        self.user_starts = ()

    @property
    def cached_tokens(self):
        return [t for t in self.cache_tokens]

    @property
    def busy(self):
        return self.request is not None


cdef class EngineCore:
    """The continuous-batching loop over one Context (see the module docstring).

    Args:
        context: the Context, with n_seq_max = the number of slots.
        n_predict: the server-wide default generation cap (-1 = unlimited).
        ctx_shift: shift the context instead of stopping when a slot's context fills.
        slot_prompt_similarity: least prefix share that picks a slot by its cache.
        n_threads_sampling: threads that sample slots in parallel (1 = on the engine thread).
        cache_ram_mib: the host-RAM prompt cache's size limit in MiB (-1 no limit, 0 none).
        cache_idle_slots: after each admission, save every idle slot to the prompt cache, and
            clear it when the KV cache is unified.
        n_cache_reuse: the requests' default least chunk size reused by KV shifting (0 = off;
            off when the memory cannot shift).
        n_ctx_checkpoints: context checkpoints kept per slot (0 = none); made only where the
            memory cannot be cut back (sliding-window or recurrent layers).
        checkpoint_min_step: least tokens between two checkpoints of a prompt (0 = none).
        speculative: speculative decoding's parameters (csrc/pyllama_spec.h's JSON object:
            types, draft, ngram_*), or None for none.
        draft_context: the draft model's Context (-md), with as many sequences as slots; the
            caller keeps it open while the EngineCore lives.
    """

    cdef readonly Context context
    # event channels owed a wake-up (_send), woken once the next decode lets go of the GIL
    cdef list wakes
    cdef vector[PyThread_type_lock] wake_locks  # their locks, released without the GIL
    cdef readonly Model model
    cdef SlotC * slots_c
    cdef readonly list slots
    cdef readonly int n_slots
    cdef public int n_ctx_slot  # may be capped below the context's per-sequence size
    cdef readonly int n_batch
    cdef int n_swa
    cdef public int n_predict_default
    cdef public bint ctx_shift
    cdef public double slot_prompt_similarity
    cdef public int n_threads_sampling
    cdef readonly PromptCache prompt_cache  # None with cache_ram_mib = 0
    cdef public bint cache_idle_slots
    cdef public int n_cache_reuse
    cdef readonly int n_ctx_checkpoints
    cdef readonly int checkpoint_min_step
    cdef public bint do_checkpoints  # the memory needs them and n_ctx_checkpoints > 0
    cdef bint swa_only  # SWA layers but no recurrent state: any cut is fine inside the window
    cdef int n_ubatch
    cdef vector[int] prefill_ids  # slots filling their prompt, in admission order
    cdef vector[int] sample_slots
    cdef int * cpu_slots  # slots sampled on the CPU this step
    # counters (tests and /metrics read them)
    cdef readonly int64_t n_steps
    cdef readonly int64_t n_decode_calls
    cdef readonly int64_t n_tokens_predicted_total
    cdef readonly int64_t n_prompt_tokens_total
    cdef readonly double t_decode_total
    cdef readonly double t_step_total
    cdef readonly int64_t n_backend_sampled
    cdef public list lora_adapters   # LoraAdapter objects, in id order
    cdef public tuple lora_scales    # the server-wide scales (POST /lora-adapters)
    cdef tuple lora_applied          # what the context has now
    cdef int lora_turn
    # speculative decoding (server_context's spec): NULL when off
    cdef B.pyllama_spec * spec
    cdef readonly Context draft_context
    cdef readonly bint speculative
    cdef readonly tuple spec_types   # the --spec-type names in effect ("none" when off)
    cdef readonly int64_t n_draft_tokens_total
    cdef readonly int64_t n_draft_accepted_total
    cdef readonly int64_t n_draft_verif_steps
    cdef bint spec_synth
    cdef public MediaContext media   # libmtmd (--mmproj), None without a projector

    def __cinit__(self, Context context, *, int n_predict=-1, bint ctx_shift=False,
                  double slot_prompt_similarity=0.1, int n_threads_sampling=1,
                  int cache_ram_mib=0, bint cache_idle_slots=False, int n_cache_reuse=0,
                  int n_ctx_checkpoints=32, int checkpoint_min_step=8192, speculative=None,
                  Context draft_context=None):
        self.slots_c = NULL
        self.spec = NULL
        self.speculative = False
        self.spec_types = ("none",)
        self.context = context
        self.model = context.model
        self.n_slots = L.llama_n_seq_max(context.ptr)
        self.n_ctx_slot = L.llama_n_ctx_seq(context.ptr)
        self.n_batch = L.llama_n_batch(context.ptr)
        self.n_ubatch = L.llama_n_ubatch(context.ptr)
        # server_context::load_model: a full-size SWA cache keeps every cell
        self.n_swa = 0 if context.swa_full else L.llama_model_n_swa(self.model.ptr)
        # server_context::init: checkpoints where the memory cannot be cut back to any length
        # (common_context_can_seq_rm decodes two tokens and clears the memory)
        cdef common_context_seq_rm_type seq_rm_type = common_context_can_seq_rm(context.ptr)
        self.n_ctx_checkpoints = max(0, n_ctx_checkpoints)
        self.checkpoint_min_step = max(0, checkpoint_min_step)
        self.swa_only = self.n_swa > 0 and seq_rm_type == COMMON_CONTEXT_SEQ_RM_TYPE_PART
        self.do_checkpoints = self.n_ctx_checkpoints > 0 and (
            seq_rm_type == COMMON_CONTEXT_SEQ_RM_TYPE_FULL or seq_rm_type == COMMON_CONTEXT_SEQ_RM_TYPE_RS
            or self.n_swa > 0)
        if self.n_ctx_checkpoints > 0:
            logger.debug("context checkpoints enabled, max = %d, min spacing = %d",
                         self.n_ctx_checkpoints, self.checkpoint_min_step)
        else:
            logger.debug("context checkpoints disabled")
        self.n_predict_default = n_predict
        self.ctx_shift = ctx_shift and L.llama_memory_can_shift(L.llama_get_memory(context.ptr))
        # server_context::load_model: cache reuse shifts KV cells, as the context shift does
        self.n_cache_reuse = max(0, n_cache_reuse)
        if self.n_cache_reuse and not L.llama_memory_can_shift(L.llama_get_memory(context.ptr)):
            logger.warning("cache_reuse is not supported by this context, it will be disabled")
            self.n_cache_reuse = 0
        self.slot_prompt_similarity = slot_prompt_similarity
        self.n_threads_sampling = max(1, n_threads_sampling)
        # server_context::load_model / init: the prompt cache holds at most n_ctx tokens
        # (more if the size limit has room) and --cache-idle-slots needs it
        self.prompt_cache = None
        if cache_ram_mib != 0:
            logger.debug("prompt cache is enabled, size limit: %s",
                         "no limit" if cache_ram_mib < 0 else f"{cache_ram_mib} MiB")
            logger.debug("use `--cache-ram 0` to disable the prompt cache")
            self.prompt_cache = PromptCache(cache_ram_mib, L.llama_n_ctx(context.ptr))
        else:
            logger.debug("prompt cache is disabled - use `--cache-ram N` to enable it")
        self.cache_idle_slots = cache_idle_slots
        if cache_idle_slots:
            if self.prompt_cache is None:
                logger.warning("--cache-idle-slots requires --cache-ram, disabling")
                self.cache_idle_slots = False
            elif context.kv_unified:
                logger.debug("idle slots will be saved to prompt cache and cleared upon starting a new task")
            else:
                # without a unified KV cache, clearing a slot frees no room another can use
                logger.debug("idle slots will be saved to prompt cache upon starting a new task")
            if self.cache_idle_slots:
                logger.log(LOG_DEBUG_VERBOSE, "__TEST_TAG_CACHE_IDLE_SLOTS_ENABLED__")
        self.lora_adapters = []
        self.lora_scales = ()
        self.lora_applied = ()
        self.lora_turn = 0
        self.media = None
        self.slots_c = <SlotC *> malloc(sizeof(SlotC) * self.n_slots)
        self.cpu_slots = <int *> malloc(sizeof(int) * self.n_slots)
        self.slots = []
        self.wakes = []
        cdef int i
        cdef Slot slot
        for i in range(self.n_slots):
            self.slots_c[i].state = SLOT_IDLE
            self.slots_c[i].n_past = 0
            self.slots_c[i].i_batch = -1
            self.slots_c[i].sampler = NULL
            self.slots_c[i].on_backend = False
            self.slots_c[i].held = False
            self.slots_c[i].prefilled = False
            self.slots_c[i].n_in_batch = 0
            self.slots_c[i].prefill_stop = -1
            self.slots_c[i].media_done = False
            self.slots_c[i].pos_delta = 0
            slot = Slot(i)
            # the C loop reaches the Slot's vectors through these (the Slot lives as long)
            self.slots_c[i].cache = &slot.cache_tokens
            self.slots_c[i].prompt = &slot.prompt
            self.slots_c[i].draft = &slot.draft
            self.slots_c[i].accepted = &slot.accepted
            self.slots_c[i].can_spec = False
            self.slots_c[i].n_draft = 0
            self.slots_c[i].verified = False
            self.slots_c[i].n_draft_total = 0
            self.slots_c[i].n_draft_accepted = 0
            self.slots.append(slot)
        if speculative is not None:
            self._init_speculative(dict(speculative), draft_context, seq_rm_type)

    def __dealloc__(self):
        if self.spec != NULL:
            B.pyllama_spec_free(self.spec)
            self.spec = NULL
        free(self.slots_c)
        free(self.cpu_slots)
        self.slots_c = NULL

    cdef void _init_speculative(self, dict params, Context draft_context,
                                common_context_seq_rm_type seq_rm_type) except *:
        # server_context::load_model / init: speculative decoding where the context can remove
        # the rejected draft tokens; common_speculative_init refusing (an incompatible draft
        # vocabulary, a draft type without a draft model) is logged and serving goes on
        # without it, as upstream; with synthetic acceptance it is an error, as upstream.
        types = [t for t in params.get("types", ()) if t]
        # TODO(pyllama): EAGLE3 / MTP / DFlash / DSpark drafts need the target's hidden states
        # and a draft context made for them (ctx_other, LLAMA_CONTEXT_TYPE_MTP); issue 16.
        unsupported = [t for t in types if t in ("draft-eagle3", "draft-mtp", "draft-dflash", "draft-dspark")]
        if unsupported:
            logger.error("speculative decoding type(s) %s not supported by pyllama yet - ignored",
                         ",".join(unsupported))
            types = [t for t in types if t not in unsupported]
            params["types"] = types
            if not types:
                return
        synth = params.get("synth_len") not in (None, -1, -1.0) or bool(params.get("synth_rates"))
        if seq_rm_type == COMMON_CONTEXT_SEQ_RM_TYPE_NO:
            logger.warning("speculative decoding not supported by this context")
            return
        if seq_rm_type == COMMON_CONTEXT_SEQ_RM_TYPE_FULL or seq_rm_type == COMMON_CONTEXT_SEQ_RM_TYPE_RS:
            # TODO(pyllama): upstream keeps a speculative checkpoint per slot for memories that
            # cannot remove a suffix (recurrent/hybrid); issue 16.
            logger.warning("speculative decoding needs checkpoints with this context (recurrent or hybrid "
                           "memory), which pyllama does not make yet - it will be disabled")
            if synth:
                raise EngineError("synthetic acceptance requires an initialized speculative decoding context")
            return
        cdef bytes params_json = orjson.dumps(params)
        cdef L.llama_context * ctx_dft = draft_context.ptr if draft_context is not None else NULL
        try:
            self.spec = B.pyllama_spec_init(params_json, self.context.ptr, ctx_dft, self.n_slots)
        except Exception as exc:
            logger.error("failed to initialize speculative decoding context: %s", exc)
            if synth:
                raise EngineError(f"failed to initialize speculative decoding context: {exc}") from None
            self.spec = NULL
        if self.spec == NULL:
            if synth:
                raise EngineError("synthetic acceptance requires an initialized speculative decoding context")
            return
        self.draft_context = draft_context
        self.speculative = True
        self.spec_types = tuple(types) if "none" not in types else ("none",)
        self.spec_synth = B.pyllama_spec_has_synth(self.spec)
        if self.spec_synth:
            logger.warning("synthetic speculative acceptance is enabled for benchmarking; generated output is not valid")
        logger.log(LOG_DEBUG_VERBOSE, "speculative decoding context initialized")
        logger.info("speculative decoding: %s, at most %d draft tokens per step",
                    ",".join(self.spec_types), B.pyllama_spec_n_max(self.spec))

    @property
    def spec_n_max(self):
        """The most tokens one draft may hold (0 without speculative decoding)."""
        return B.pyllama_spec_n_max(self.spec) if self.spec != NULL else 0

    # --- admission ---------------------------------------------------------------------------
    def free_slot_for(self, request):
        """Return the slot a request should take now, or None to defer it (server_context::get_available_slot)."""
        cdef Slot slot
        cdef int lcp
        if request.id_slot >= 0:
            slot = self.slots[request.id_slot % self.n_slots]
            if slot.busy:
                return None
            # upstream tests the requested slot's similarity too: a cache mostly lost (or one
            # not similar enough) is saved to the prompt cache first; an empty slot is not
            slot.update_cache = False
            if self.slot_prompt_similarity > 0 and slot.cache_tokens.size():
                lcp = _common_prefix(slot.cache_tokens, request.prompt)
                if not lcp / max(1, len(request.prompt)) > self.slot_prompt_similarity:
                    lcp = 0
                slot.update_cache = lcp / <double>slot.cache_tokens.size() < 0.5
            return slot
        idle = [s for s in self.slots if not (<Slot>s).busy]
        if not idle:
            return None
        # Upstream takes the slot whose cache shares most of the prompt, else the least
        # recently used one. While other slots are busy we also keep them close together: with
        # one KV stream per slot, a decode attends over every stream from the lowest busy slot
        # to the highest, so scattered slots cost up to 2.6x per step (4 of 8 slots, 0/2/4/6
        # against 0-3, gemma-3-270m on 2 CPU threads). So then a slot next to the busy ones
        # wins over the least recently used, and over a cache match at most SLOT_LCP_SLACK
        # tokens better (a few tokens recomputed cost less than a wider span on every step).
        busy = [(<Slot>s).id for s in self.slots if (<Slot>s).busy]
        compact = bool(busy) and not self.context.kv_unified
        lo, hi = (min(busy), max(busy)) if busy else (0, 0)
        span = lambda s: max(hi, (<Slot>s).id) - min(lo, (<Slot>s).id) if compact else 0
        if self.slot_prompt_similarity > 0 and request.cache_prompt:
            scored = [(_common_prefix((<Slot>s).cache_tokens, request.prompt), s) for s in idle
                      if (<Slot>s).cache_tokens.size()]
            best_lcp = max([lcp for lcp, _ in scored], default=0)
            if best_lcp / max(1, len(request.prompt)) > self.slot_prompt_similarity:
                slack = SLOT_LCP_SLACK if compact else 0
                near = [(span(s), -lcp, (<Slot>s).t_last_used, (<Slot>s).id, s) for lcp, s in scored
                        if lcp >= best_lcp - slack]
                chosen = min(near)
                slot = chosen[-1]
                # about to lose most of the slot's cache (f_keep < 0.5): save it first
                slot.update_cache = -chosen[1] / <double>slot.cache_tokens.size() < 0.5
                return slot
        slot = min(idle, key=lambda s: (span(s), (<Slot>s).t_last_used))
        slot.update_cache = True  # selected by LRU
        return slot

    def admit(self, Slot slot, request, SamplerChain sampler, channel):
        """Start `request` on `slot`: reuse the cached prefix, queue the rest for prefill.

        Raises:
            ContextLengthExceededError: the prompt does not fit the slot's context.
            InvalidRequestError: an empty prompt or a token outside the vocabulary.
        """
        cdef int n_prompt = len(request.prompt)
        if n_prompt == 0:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        media = request.media
        if media:
            self._check_media(request)
        else:
            for t in request.prompt:
                self.model.check_token(t)
        if n_prompt >= self.n_ctx_slot:
            raise ContextLengthExceededError(
                f"request ({n_prompt} tokens) exceeds the available context size "
                f"({self.n_ctx_slot} tokens), try increasing it",
                n_prompt_tokens=n_prompt, n_ctx=self.n_ctx_slot)
        cdef SlotC * sc = &self.slots_c[slot.id]
        cdef L.llama_memory_t mem = L.llama_get_memory(self.context.ptr)
        cdef int keep = 0
        lora = self.lora_scales
        if request.lora is not None:
            if len(request.lora) > len(self.lora_adapters):
                raise InvalidRequestError(f"invalid adapter id: {len(request.lora) - 1}", param="lora")
            # unlisted adapters get scale 0 (upstream's parse_lora_request)
            lora = tuple(request.lora) + (0.0,) * (len(self.lora_adapters) - len(request.lora))
        slot.lora = lora
        cdef bint update_cache = slot.update_cache
        slot.update_cache = False
        if update_cache and self.prompt_cache is not None:
            self._update_prompt_cache(slot, request, lora)
        cdef int n_cache_reuse = request.n_cache_reuse if request.n_cache_reuse >= 0 else self.n_cache_reuse
        if request.cache_prompt and slot.cache_lora == lora:  # another LoRA set: no reuse
            keep = _common_prefix(slot.cache_tokens, request.prompt)
            if n_cache_reuse > 0:
                if L.llama_memory_can_shift(mem) and self.media is None:
                    keep = self._reuse_chunks(slot, request.prompt, keep, n_cache_reuse)
                else:
                    logger.warning("slot %d: cache reuse is not supported - ignoring n_cache_reuse = %d",
                                   slot.id, n_cache_reuse)
            keep = self._restore_checkpoint(slot, keep, keep < n_prompt)
        self._erase_checkpoints_after(slot, keep)
        keep = min(keep, n_prompt - 1)  # at least one token is evaluated, for its logits
        if media and keep < n_prompt and request.prompt[keep] < 0:
            # a media chunk is evaluated whole (server_tokens::get_common_prefix never splits one)
            keep = max([start for start in media if start <= keep], default=0)
        # the cells from the keep-th token on go: by position, which M-RoPE media before it
        # moved back (the cached prefix's media are the request's, matched by hash)
        cdef int pos_delta = _media_pos_delta(media, keep) if media else 0
        if not L.llama_memory_seq_rm(mem, slot.id, keep + pos_delta, -1):
            keep = 0
            pos_delta = 0
            L.llama_memory_seq_rm(mem, slot.id, -1, -1)
            slot.checkpoints = []
        slot.cache_tokens.resize(keep)
        slot.cache_lora = lora
        slot.prompt.clear()
        for t in request.prompt:
            slot.prompt.push_back(t)
        slot.user_starts = tuple(request.user_starts)
        sc.prefill_stop = -1
        sc.n_prompt_done = keep
        slot.request = request
        slot.channel = channel
        slot.sampler = sampler
        slot.n_decoded = 0
        slot.n_predict = request.n_predict if request.n_predict != -1 else self.n_predict_default
        sc.n_cached = keep
        slot.pending_bytes = b""
        slot.sent_parts = []
        slot.unsent = ""
        slot.n_sent = 0
        slot.generated_tokens = []
        slot.truncated = False
        slot.has_new_line = False
        slot.last_nl_pos = 0
        slot.t_start = time.perf_counter()
        slot.t_prompt_done = 0.0
        sampler.reset()
        sc.on_backend = False
        # NOTE(pyllama): a request asking for token probabilities does not draft: upstream sends
        # none for accepted draft tokens ("TODO: set result.probs"); we keep them exact.
        # TODO(pyllama): a request with media does not draft: the draft would need the media's
        # embeddings too (upstream's process_mtmd_chunk feeds them through common_speculative_process);
        # issue 16.
        sc.can_spec = self.spec != NULL and request.spec_n_max != 0 and request.sampling.n_probs == 0 \
            and not media
        sc.spec_n_max = request.spec_n_max
        sc.spec_n_min = max(0, request.spec_n_min)
        sc.n_draft = 0
        sc.verified = False
        sc.n_draft_total = 0
        sc.n_draft_accepted = 0
        slot.draft.clear()
        cdef uint64_t rng_seed
        if sc.can_spec and self.spec_synth:
            # the request's seed (a random one without), as upstream seeds spec_synth_rng
            rng_seed = <uint64_t>((request.sampling.seed if request.sampling.seed != 0xFFFFFFFF
                                   else time.perf_counter_ns()) & 0xFFFFFFFFFFFFFFFF)
            sc.rng = rng_seed * <uint64_t>0x9E3779B97F4A7C15 + 1
        if request.sampling.backend_sampling and not sc.can_spec and not request.sampling.grammar \
                and request.sampling.n_probs == 0 and not sampler.has_reasoning_budget:
            # upstream's --backend-sampling (server_context::launch_slot_with_task)
            sc.on_backend = L.llama_set_sampler(self.context.ptr, slot.id, sampler.state.chain)
        sc.state = SLOT_PREFILL
        sc.n_past = keep
        sc.pos_delta = pos_delta
        sc.i_batch = -1
        sc.sampler = sampler.state
        self.prefill_ids.push_back(slot.id)
        if request.return_progress:
            channel.put(ProgressEvent(n_prompt, keep, keep, 0.0))
        logger.debug("slot %d: request %d, %d prompt tokens, %d cached", slot.id, request.id,
                     n_prompt, keep)
        if self.cache_idle_slots:
            self._cache_idle_slots()

    cdef int _check_media(self, request) except -1:
        # A prompt with media chunks (MediaContext.tokenize): text tokens in the vocabulary,
        # each chunk's run of placeholders where its start says, nothing else negative, and
        # text after the last chunk (its logits start the generation). Engine thread.
        cdef MediaChunk chunk
        cdef int i = 0, k, n = len(request.prompt)
        prompt = request.prompt
        media = request.media
        if self.media is None:
            raise InvalidRequestError("image input is not supported - hint: if this is unexpected, "
                                      "you may need to provide the mmproj", param="prompt")
        while i < n:
            t = prompt[i]
            if t >= 0:
                self.model.check_token(t)
                i += 1
                continue
            chunk = media.get(i)
            if chunk is None or i + chunk.n_tokens > n:
                raise InvalidRequestError(f"invalid token at position {i}: no media chunk starts there",
                                          param="prompt")
            for k in range(i, i + chunk.n_tokens):
                if prompt[k] != chunk.placeholder:
                    raise InvalidRequestError(f"media chunk at position {i} is broken at {k}", param="prompt")
            i += chunk.n_tokens
        if prompt[n - 1] < 0:
            raise InvalidRequestError("the prompt must not end with a media chunk", param="prompt")
        return 0

    cdef void _eval_media(self) except *:
        # Media chunks at the head of a filling slot's prompt go into its sequence before the
        # batch is filled: encoded and decoded on this thread, the GIL released, as upstream's
        # update_slots runs process_mtmd_chunk before it adds the slot's text. A slot whose
        # chunk fails ends with an error; the others go on. Engine thread.
        cdef int j, sid, rc, k, n_tok
        cdef L.llama_pos new_n_past = 0
        cdef SlotC * sc
        cdef Slot slot
        cdef MediaChunk chunk
        cdef L.llama_context * cptr = self.context.ptr
        cdef MediaContext mctx = self.media
        cdef list failed = []
        for j in range(<int>self.prefill_ids.size()):
            sid = self.prefill_ids[j]
            sc = &self.slots_c[sid]
            sc.media_done = False
            if sc.held:
                continue
            slot = <Slot>self.slots[sid]
            while sc.n_prompt_done < <int>slot.prompt.size() and slot.prompt[sc.n_prompt_done] < 0:
                chunk = slot.request.media[sc.n_prompt_done]
                with nogil:
                    rc = mctx.eval_chunk(cptr, chunk, sc.n_past + sc.pos_delta, sid, self.n_batch, &new_n_past)
                if rc != 0:
                    logger.error("slot %d: failed to process mtmd chunk, res = %d", sid, rc)
                    failed.append(slot)
                    break
                n_tok = chunk.n_tokens
                for k in range(n_tok):
                    slot.cache_tokens.push_back(chunk.placeholder)
                # the chunk took n_pos positions for its n_tok cells (libmtmd's new_n_past)
                sc.pos_delta = new_n_past - (sc.n_past + n_tok)
                sc.n_past += n_tok
                sc.n_prompt_done += n_tok
                sc.prefilled = True
                sc.media_done = True
                logger.debug("slot %d: processed %s chunk of %d tokens", sid, chunk.kind, n_tok)
        for slot in failed:
            self._release_error(slot, EngineError("failed to process mtmd chunk"))

    cdef int _restore_checkpoint(self, Slot slot, int n_past, bint has_new_tokens) except -1:
        # server_context::update_slots: a sequence whose memory no longer covers the window
        # before n_past (SWA cells dropped, a recurrent state past it) restores the newest
        # checkpoint that does and continues from there, else starts over. Returns the new
        # n_past. Engine thread.
        cdef L.llama_memory_t mem = L.llama_get_memory(self.context.ptr)
        cdef int pos_next = n_past
        # the largest pos_min a checkpoint may have to be of use
        cdef int pos_min_thold = max(0, pos_next - self.n_swa - (0 if has_new_tokens else 1))
        cdef int pos_min
        cdef Checkpoint found = None
        if n_past <= 0 or n_past > <int>slot.cache_tokens.size():
            return n_past
        pos_min = L.llama_memory_seq_pos_min(mem, slot.id)
        if pos_min == -1:  # upstream aborts here ("should not happen"); start over instead
            logger.error("slot %d: n_past = %d, but the sequence is empty", slot.id, n_past)
            return 0
        # NOTE(pyllama): where only sliding-window layers keep the memory from being cut back,
        # the test is exact: the first token evaluated, at p, attends to the cells from
        # p - n_swa + 1 on (llama_hparams::is_masked_swa), so those must still be there.
        # Upstream asks pos_min < p - n_swa, clamped to 0: that throws away a sequence that
        # still holds every cell (pos_min 0: any prompt shorter than the window that diverges
        # before its last checkpoint starts over), and one restored from the prompt cache,
        # which keeps just the window (pos_min = its end - n_swa + 1): each returning
        # conversation then resumes from a checkpoint before the previous reply instead.
        if self.swa_only:
            if pos_min <= max(0, pos_next - (0 if has_new_tokens else 1) - self.n_swa + 1):
                return n_past
        elif pos_min < pos_min_thold:
            return n_past
        for c in reversed(slot.checkpoints):
            logger.debug("slot %d: checking checkpoint with [%d, %d] against %d...", slot.id,
                         (<Checkpoint>c).c.pos_min, (<Checkpoint>c).c.pos_max, pos_min_thold)
            if (<Checkpoint>c).c.pos_max > pos_next:  # upstream's TAG_CHECKPOINTS_FIX_POS_MIN
                continue
            if (<Checkpoint>c).c.pos_min < pos_min_thold or (<Checkpoint>c).c.pos_min == 0:
                found = <Checkpoint>c
                break
        if found is None:
            logger.debug("slot %d: forcing full prompt re-processing due to lack of cache data "
                         "(likely due to SWA or hybrid/recurrent memory, see %s)", slot.id,
                         "https://github.com/ggml-org/llama.cpp/pull/13194#issuecomment-2868343055")
            return 0
        found.restore(self.context.ptr, slot.id)
        pos_next = min(pos_next, max(found.c.pos_min + 1, found.c.pos_max))
        n_past = min(pos_next, <int>found.c.n_tokens)
        logger.debug("slot %d: restored context checkpoint (pos_min = %d, pos_max = %d, n_tokens = %d, "
                     "n_past = %d, size = %.3f MiB)", slot.id, found.c.pos_min, found.c.pos_max,
                     found.c.n_tokens, n_past, found.c.size() / (1024.0 * 1024.0))
        return n_past

    cdef void _erase_checkpoints_after(self, Slot slot, int pos_next) except *:
        # the checkpoints past where the sequence now ends no longer stand for it
        cdef list kept = []
        for c in slot.checkpoints:
            if (<Checkpoint>c).c.pos_max > pos_next:
                logger.debug("slot %d: erased invalidated context checkpoint (pos_min = %d, pos_max = %d, "
                             "n_tokens = %d, n_swa = %d, pos_next = %d, size = %.3f MiB)", slot.id,
                             (<Checkpoint>c).c.pos_min, (<Checkpoint>c).c.pos_max, (<Checkpoint>c).c.n_tokens,
                             self.n_swa, pos_next, (<Checkpoint>c).c.size() / (1024.0 * 1024.0))
            else:
                kept.append(c)
        slot.checkpoints = kept

    cdef void _plan_prefill(self) except *:
        # Where each filling slot's prompt chunk of this step must end, so that a checkpoint
        # can be made there before the next one (server_context::update_slots): at a user
        # message's start (the last one, or one min-step past the last checkpoint), and
        # 4 + n_ubatch and 4 tokens before the prompt's end. Engine thread, GIL held.
        cdef int j, sid, done, n_prompt, stop, p, k, pos, last_user
        cdef Slot slot
        cdef SlotC * sc
        cdef tuple starts
        for j in range(<int>self.prefill_ids.size()):
            sid = self.prefill_ids[j]
            sc = &self.slots_c[sid]
            slot = <Slot>self.slots[sid]
            done = sc.n_prompt_done
            n_prompt = <int>slot.prompt.size()
            stop = n_prompt
            for offset in (4 + self.n_ubatch, 4):
                p = n_prompt - min(self.n_batch, <int>offset)
                if done < p < stop:
                    stop = p
            starts = slot.user_starts
            if starts:
                last_user = starts[-1]
                k = bisect.bisect_right(starts, done)
                while k < len(starts) and <int>starts[k] < stop:
                    pos = starts[k]
                    if pos == last_user or not slot.checkpoints or \
                            pos > (<Checkpoint>slot.checkpoints[-1]).c.n_tokens + self.checkpoint_min_step:
                        stop = pos
                        break
                    k += 1
            sc.prefill_stop = stop

    cdef void _make_checkpoints(self) except *:
        # Before the decode: a slot whose chunk in this batch starts a user message, ends its
        # prompt or comes near that end saves a checkpoint of its sequence as it is, that is
        # without this chunk (server_context::update_slots). Engine thread, GIL held; the copy
        # runs without it.
        cdef L.llama_memory_t mem = L.llama_get_memory(self.context.ptr)
        cdef int j, sid, start, end, n_prompt, pos_min, pos_max
        cdef bint near_end, is_user_start, is_last_user
        cdef Slot slot
        cdef SlotC * sc
        for j in range(<int>self.prefill_ids.size()):
            sid = self.prefill_ids[j]
            sc = &self.slots_c[sid]
            if sc.n_in_batch == 0 or sc.media_done:  # upstream: no checkpoint after mtmd chunks
                continue
            slot = <Slot>self.slots[sid]
            start = sc.n_prompt_done
            end = start + sc.n_in_batch
            n_prompt = <int>slot.prompt.size()
            near_end = n_prompt < end + self.n_ubatch
            is_user_start = start in slot.user_starts
            is_last_user = bool(slot.user_starts) and start == slot.user_starts[-1]
            if not (end == n_prompt or is_user_start or near_end):
                continue  # an ordinary mid-prompt chunk
            pos_min = L.llama_memory_seq_pos_min(mem, sid)
            pos_max = L.llama_memory_seq_pos_max(mem, sid)
            if pos_min < 0:
                continue  # nothing to checkpoint yet
            # no need for checkpoints close together, unless at the last user message
            if slot.checkpoints and not is_last_user and not near_end and \
                    start <= (<Checkpoint>slot.checkpoints[-1]).c.n_tokens + self.checkpoint_min_step:
                continue
            logger.log(LOG_DEBUG_VERBOSE, "slot %d: main/do_checkpoint = yes, pos_min = %d, pos_max = %d",
                       sid, pos_min, pos_max)
            self._create_checkpoint(slot, start, pos_min, pos_max)

    cdef void _create_checkpoint(self, Slot slot, int n_tokens, int pos_min, int pos_max) except *:
        # server_context::create_checkpoint: room is made first (checkpoints of other requests
        # within min-step of an earlier one, then the oldest), a checkpoint at the same length
        # is replaced. Engine thread.
        cdef int id_task = slot.request.id
        cdef list ckpts = slot.checkpoints
        cdef Checkpoint c
        cdef int64_t last = -1
        cdef Py_ssize_t i = 0
        while len(ckpts) + 1 >= self.n_ctx_checkpoints and i < len(ckpts):
            c = <Checkpoint>ckpts[i]
            if c.c.id_task != id_task and last >= 0 and c.c.n_tokens <= last + self.checkpoint_min_step:
                logger.debug("slot %d: erasing context checkpoint too close to an earlier one (pos_min = %d, "
                             "pos_max = %d, n_tokens = %d, size = %.3f MiB)", slot.id, c.c.pos_min,
                             c.c.pos_max, c.c.n_tokens, c.c.size() / (1024.0 * 1024.0))
                del ckpts[i]
                continue
            last = c.c.n_tokens
            i += 1
        while len(ckpts) >= self.n_ctx_checkpoints:
            c = <Checkpoint>ckpts[0]
            logger.warning("slot %d: erasing old context checkpoint (pos_min = %d, pos_max = %d, n_tokens = %d, "
                           "size = %.3f MiB)", slot.id, c.c.pos_min, c.c.pos_max, c.c.n_tokens,
                           c.c.size() / (1024.0 * 1024.0))
            del ckpts[0]
        i = 0
        while i < len(ckpts):
            if (<Checkpoint>ckpts[i]).c.n_tokens == n_tokens:
                logger.debug("slot %d: superseding context checkpoint at n_tokens = %d", slot.id, n_tokens)
                del ckpts[i]
            else:
                i += 1
        c = Checkpoint.create(self.context.ptr, slot.id, n_tokens, pos_min, pos_max, id_task)
        ckpts.append(c)
        logger.debug("slot %d: created context checkpoint %d of %d (pos_min = %d, pos_max = %d, "
                     "n_tokens = %d, size = %.3f MiB)", slot.id, len(ckpts), self.n_ctx_checkpoints,
                     pos_min, pos_max, n_tokens, c.c.size() / (1024.0 * 1024.0))

    cdef int _reuse_chunks(self, Slot slot, prompt, int n_past, int n_cache_reuse) except -1:
        # server_context::update_slots, "reuse chunks from the cached prompt by shifting their
        # KV cache in the new position": past the common prefix, every run of at least
        # n_cache_reuse cached tokens that continues the prompt moves down to where the prompt
        # has it (cells in between are removed). Only removals from the cached text are found:
        # the cache head moves on, the prompt head never skips. Returns the new n_past; the
        # caller removes the cells from it on. Engine thread.
        cdef L.llama_memory_t mem = L.llama_get_memory(self.context.ptr)
        cdef vector[L.llama_token] * cache = &slot.cache_tokens
        cdef vector[L.llama_token] tokens = prompt
        cdef size_t head_c = n_past, head_p = n_past, n_match, i
        cdef size_t n_c = cache.size(), n_p = tokens.size()
        logger.log(LOG_DEBUG_VERBOSE, "slot %d: trying to reuse chunks with size > %d, n_past = %d",
                   slot.id, n_cache_reuse, n_past)
        while head_c < n_c and head_p < n_p:
            n_match = 0
            while head_c + n_match < n_c and head_p + n_match < n_p and \
                    cache[0][head_c + n_match] == tokens[head_p + n_match]:
                n_match += 1
            if n_match >= <size_t>n_cache_reuse:
                logger.debug("slot %d: reusing chunk with size %d, shifting KV cache [%d, %d) -> [%d, %d)",
                             slot.id, n_match, head_c, head_c + n_match, head_p, head_p + n_match)
                L.llama_memory_seq_rm(mem, slot.id, <L.llama_pos>head_p, <L.llama_pos>head_c)
                L.llama_memory_seq_add(mem, slot.id, <L.llama_pos>head_c, <L.llama_pos>(head_c + n_match),
                                       <L.llama_pos>head_p - <L.llama_pos>head_c)
                for i in range(n_match):
                    cache[0][head_p + i] = cache[0][head_c + i]
                n_past += <int>n_match
                head_c += n_match
                head_p += n_match
            else:
                head_c += 1
        logger.log(LOG_DEBUG_VERBOSE, "slot %d: after context reuse, new n_past = %d", slot.id, n_past)
        return n_past

    cdef void _update_prompt_cache(self, Slot slot, request, tuple lora) except *:
        # server_context::get_available_slot, update_cache: the slot's cache goes to the
        # prompt cache, then the cached prompt that best continues into the request's (if
        # any) is restored into the slot; a failed restore leaves the slot empty.
        # NOTE(pyllama): with cache_prompt off nothing is restored: the slot's KV would be
        # thrown away at once, and the cached state with it (upstream restores anyway).
        # Engine thread; the copies run without the GIL.
        cdef double t0 = time.perf_counter()
        cdef vector[L.llama_token] tokens_new
        cdef int rc
        logger.debug("updating prompt cache")
        self.prompt_cache.save(self.context.ptr, slot.id, slot.cache_tokens, slot.cache_lora,
                               slot.checkpoints)
        if request.cache_prompt:
            tokens_new = request.prompt
            rc = self.prompt_cache.load(self.context.ptr, slot.id, slot.cache_tokens, slot.cache_lora,
                                        slot.checkpoints, tokens_new, lora)
            if rc < 0:
                logger.warning("slot %d: failed to load prompt from cache", slot.id)
                self._drop_cache(slot)
            elif rc > 0:
                slot.cache_lora = lora
                self.slots_c[slot.id].n_past = <int>slot.cache_tokens.size()
                logger.debug("slot %d: restored %d tokens from the prompt cache", slot.id,
                             <int>slot.cache_tokens.size())
        self.prompt_cache.update()
        logger.debug("prompt cache update took %.2f ms", (time.perf_counter() - t0) * 1e3)

    cdef void _cache_idle_slots(self) except *:
        # server_context::process_single_task after a launch (--cache-idle-slots): every idle
        # slot is saved to the prompt cache, and with one KV buffer for all slots also cleared,
        # so that its cells serve the busy ones. Engine thread; the copies run without the GIL.
        cdef Slot slot
        for s in self.slots:
            slot = <Slot>s
            if slot.busy:
                continue
            logger.debug("slot %d: saving idle slot to prompt cache", slot.id)
            if self.prompt_cache.save(self.context.ptr, slot.id, slot.cache_tokens, slot.cache_lora,
                                      slot.checkpoints):
                logger.log(LOG_DEBUG_VERBOSE, "slot %d: __TEST_TAG_CACHE_IDLE_SLOT__", slot.id)
                self.prompt_cache.update()
            if self.context.kv_unified and slot.cache_tokens.size():
                self._drop_cache(slot)

    def cancel(self, int request_id):
        """Stop a request now; its slot is free on return. Returns whether it was running."""
        for s in self.slots:
            if (<Slot>s).busy and (<Slot>s).request.id == request_id:
                self._release(<Slot>s, FinishReason.CANCELLED, "")
                return True
        return False

    def end_reasoning(self, int request_id):
        """End the thinking block of a running request now (upstream's reasoning_end control):
        "ok", or "not_running" (no slot serves it) or "not_enabled" (no reasoning_control)."""
        for s in self.slots:
            if (<Slot>s).busy and (<Slot>s).request.id == request_id:
                if not (<Slot>s).request.sampling.reasoning_control:
                    return "not_enabled"
                (<Slot>s).sampler.end_reasoning()  # upstream answers success either way
                return "ok"
        return "not_running"

    @property
    def n_busy(self):
        return sum(1 for s in self.slots if (<Slot>s).busy)

    # --- the step ------------------------------------------------------------------------------
    cdef int _send(self, Slot slot, event) except -1:
        # PERF(pyllama): a step's events are queued at once, but their consumers (the HTTP
        # threads) are woken only once this thread lets go of the GIL, in the next step's
        # decode (_wake_nogil): woken earlier, each would sleep again on the GIL (_channel.pyx).
        handle = slot.channel
        cdef EventChannel channel = <EventChannel>handle.queue
        if channel.put_deferred((handle.tag, event) if handle.tagged else event):
            self.wakes.append(channel)
            self.wake_locks.push_back(channel.lock)
        return 0

    cdef void _wake_nogil(self) noexcept nogil:
        # the channels stay referenced by self.wakes until the GIL is taken back
        cdef size_t k
        for k in range(self.wake_locks.size()):
            PyThread_release_lock(self.wake_locks[k])
        self.wake_locks.clear()

    def flush_wakes(self):
        """Wake every consumer still owed a wake-up: before the engine thread waits for work,
        sleeps or fails, or runs something long before its next decode. Engine thread."""
        self._wake_nogil()
        self.wakes = []

    def step(self):
        """Run one decode over every busy slot. Returns False when there was nothing to do.

        A batch that finds no room in the KV cache is retried smaller, as upstream's
        server_context::update_slots / decode do: first an idle slot's cache is dropped
        (kv_unified only), else the batch is halved; when even one token does not fit, the
        request holding the most KV ends with ContextLengthExceededError and the rest go on.
        Any other decode failure ends every request (_abort_all). Engine thread only.
        """
        cdef double t0 = time.perf_counter()
        cdef int n = 0, i, j
        cdef int n_batch = self.n_batch  # halved on retries, full again next step
        cdef Slot slot
        cdef SlotC * sc
        cdef Context ctx = self.context
        cdef bint checkpointing
        cdef int rc = 0

        # context shift first (it logs, and reads the request): GIL held, rarely runs
        if self.ctx_shift:
            for i in range(self.n_slots):
                sc = &self.slots_c[i]
                if sc.state == SLOT_GENERATING and sc.n_past + 1 >= self.n_ctx_slot:
                    self._context_shift(<Slot>self.slots[i])

        if self.lora_adapters:
            self._choose_lora_group()
        if self.spec != NULL or (self.media is not None and self.prefill_ids.size() > 0):
            self.flush_wakes()  # drafting and media encoding come first, and may take a while
        if self.spec != NULL:
            self._draft_all()

        if self.media is not None and self.prefill_ids.size() > 0:
            self._eval_media()
        checkpointing = self.do_checkpoints and self.prefill_ids.size() > 0
        if checkpointing:
            self._plan_prefill()
        while True:
            # fill one batch, decode it and sample every slot with logits, all without the GIL;
            # slot positions move only once the decode succeeded
            if checkpointing:  # checkpoints are made between the fill and the decode
                with nogil:
                    self._wake_nogil()
                    n = self._fill_batch(&ctx.batch, n_batch)
                if n > 0:
                    self._make_checkpoints()
                    with nogil:
                        rc = self._decode_batch(n)
            else:
                with nogil:
                    self._wake_nogil()
                    n = self._fill_batch(&ctx.batch, n_batch)
                    if n > 0:
                        rc = self._decode_batch(n)
            if self.wakes:
                self.wakes = []  # woken above: their channels may go now
            if n == 0:
                return rc != 0  # a retry that ended the last request still did work
            self.n_decode_calls += 1
            if rc == 0:
                break
            if rc != 1:
                try:
                    check_decode(rc)
                except EngineError as exc:
                    self._abort_all(exc)
                return True
            # rc 1: no room in the KV cache for this batch; the cache is unchanged. Upstream
            # halves n_batch; we halve what the batch held, which may be less.
            if not self._release_idle_cache():
                if n == 1:
                    self._release_largest()
                    continue
                n_batch = n // 2
            logger.warning("failed to find free space in the KV cache, retrying with smaller "
                           "batch size, n_batch = %d", n_batch)

        # 5. publish: prompt progress, then the sampled tokens
        for i in range(self.n_slots):
            if self.slots_c[i].prefilled:
                self.slots_c[i].prefilled = False
                slot = <Slot>self.slots[i]
                if slot.busy and slot.request.return_progress:
                    self._send(slot, ProgressEvent(<int>slot.prompt.size(), self.slots_c[i].n_cached,
                                                   self.slots_c[i].n_prompt_done,
                                                   (time.perf_counter() - slot.t_start) * 1e3))
        for j in range(<int>self.sample_slots.size()):
            i = self.sample_slots[j]
            self._process_token(<Slot>self.slots[i])
        self.n_steps += 1
        self.t_step_total += time.perf_counter() - t0
        return True

    cdef bint _release_idle_cache(self) except -1:
        # server_context::try_clear_idle_slots: with one KV buffer for every slot, the cache an
        # idle slot keeps for reuse takes room a busy one needs. Drops one such cache (the
        # least recently used; upstream takes the first) per call. Engine thread, GIL held.
        if not self.context.kv_unified:
            return False
        cdef Slot victim = None
        for s in self.slots:
            if not (<Slot>s).busy and (<Slot>s).cache_tokens.size() > 0 and \
                    (victim is None or (<Slot>s).t_last_used < victim.t_last_used):
                victim = <Slot>s
        if victim is None:
            return False
        logger.warning("purging slot %d with %d tokens", victim.id, <int>victim.cache_tokens.size())
        self._drop_cache(victim)
        return True

    cdef void _release_largest(self) except *:
        # Not even a one-token batch fits. Upstream then fails every request ("TODO: try to
        # terminate only the largest active slot/sequence"); we end only the request holding
        # the most KV and free it. With a KV stream per slot, the full stream is the one of
        # the one slot in this one-token batch. Engine thread, GIL held.
        cdef Slot victim = None
        cdef int i
        if not self.context.kv_unified:
            for i in range(self.n_slots):
                if self.slots_c[i].n_in_batch > 0:
                    victim = <Slot>self.slots[i]
        if victim is None:
            for s in self.slots:
                if (<Slot>s).busy and (victim is None or
                                       self.slots_c[(<Slot>s).id].n_past > self.slots_c[victim.id].n_past):
                    victim = <Slot>s
        try:
            check_decode(1, self.slots_c[victim.id].n_past, L.llama_n_ctx_seq(self.context.ptr))
        except ContextLengthExceededError as exc:
            logger.error("slot %d: request %d: %s (%d tokens in the KV cache)", victim.id,
                         victim.request.id, exc, self.slots_c[victim.id].n_past)
            self._release_error(victim, exc)

    cdef void _choose_lora_group(self) except *:
        # Requests with different LoRA sets never share a batch (upstream's rule): each step
        # runs one set, taking turns among the busy slots' sets.
        busy = [s for s in self.slots if (<Slot>s).busy]
        if not busy:
            return
        self.lora_turn = (self.lora_turn + 1) % len(busy)
        group = (<Slot>busy[self.lora_turn]).lora
        for s in self.slots:
            self.slots_c[(<Slot>s).id].held = (<Slot>s).busy and (<Slot>s).lora != group
        if group != self.lora_applied:
            self.context.set_lora_c(self.lora_adapters, group)
            self.lora_applied = group

    cdef int _decode_batch(self, int n) noexcept nogil:
        # Decode the filled batch; on success commit it and sample. Engine thread, no GIL.
        cdef int rc
        cdef int64_t t1 = L.llama_time_us()
        self.context.batch.n_tokens = n
        rc = L.llama_decode(self.context.ptr, self.context.batch)
        self.t_decode_total += (L.llama_time_us() - t1) * 1e-6
        if rc == 0:
            self._commit_batch()
            self._sample_all()
        return rc

    cdef int _fill_batch(self, L.llama_batch * batch, int n_max) noexcept nogil:
        # The next token of every generating slot, then prompt chunks in admission order, up
        # to n_max tokens (server_context::update_slots). Writes the batch and each slot's
        # n_in_batch / i_batch only: _commit_batch moves positions once the decode succeeded,
        # so a batch the KV cache has no room for can be refilled smaller. Engine thread, no GIL.
        cdef int n = 0, i, j, k, take, sid, n_prompt
        cdef SlotC * sc
        for i in range(self.n_slots):
            sc = &self.slots_c[i]
            sc.i_batch = -1
            sc.n_in_batch = 0
            if sc.state != SLOT_GENERATING or sc.held or n >= n_max:
                sc.n_draft = 0
                continue
            _batch_put(batch, n, sc.sampled, sc.n_past + sc.pos_delta, i, True)
            sc.i_batch = n
            n += 1
            # the draft follows the sampled token, each with its logits (handle_last_sampled_token);
            # a draft the batch has no room for is cut
            if <int>sc.draft.size() > n_max - n:
                sc.draft.resize(n_max - n)
            sc.n_draft = <int>sc.draft.size()
            for k in range(sc.n_draft):
                _batch_put(batch, n, sc.draft[0][k], sc.n_past + sc.pos_delta + 1 + k, i, True)
                n += 1
            sc.n_in_batch = 1 + sc.n_draft
        for j in range(<int>self.prefill_ids.size()):
            if n >= n_max:
                break
            sid = self.prefill_ids[j]
            sc = &self.slots_c[sid]
            if sc.held:
                continue
            n_prompt = <int>sc.prompt.size()
            take = min(n_max - n, n_prompt - sc.n_prompt_done)
            if sc.prefill_stop > sc.n_prompt_done:
                take = min(take, sc.prefill_stop - sc.n_prompt_done)
            for k in range(take):
                if sc.prompt[0][sc.n_prompt_done + k] < 0:
                    take = k  # a media chunk: the next step's _eval_media puts it in
                    break
                _batch_put(batch, n, sc.prompt[0][sc.n_prompt_done + k], sc.n_past + sc.pos_delta + k, sid,
                           sc.n_prompt_done + k == n_prompt - 1)
                n += 1
            sc.n_in_batch = take
            if take > 0 and sc.n_prompt_done + take == n_prompt:
                sc.i_batch = n - 1
        return n

    cdef void _commit_batch(self) noexcept nogil:
        # After a successful decode: the batch's tokens are in the KV cache, so they join the
        # slots' cache_tokens and positions; a slot whose prompt is done starts generating.
        # Engine thread, no GIL.
        cdef int i, k, j = 0
        cdef SlotC * sc
        for i in range(self.n_slots):
            sc = &self.slots_c[i]
            if sc.n_in_batch == 0:
                continue
            if sc.state == SLOT_GENERATING:
                sc.cache.push_back(sc.sampled)
                for k in range(sc.n_draft):
                    sc.cache.push_back(sc.draft[0][k])
                sc.n_past += 1 + sc.n_draft
                continue
            for k in range(sc.n_prompt_done, sc.n_prompt_done + sc.n_in_batch):
                sc.cache.push_back(sc.prompt[0][k])
            sc.n_past += sc.n_in_batch
            sc.n_prompt_done += sc.n_in_batch
            sc.prefilled = True
            if sc.n_prompt_done == <int>sc.prompt.size():
                sc.state = SLOT_GENERATING
                self.n_prompt_tokens_total += <int>sc.prompt.size() - sc.n_cached
                if sc.can_spec:
                    B.pyllama_spec_begin(self.spec, i, sc.cache.data(), sc.cache.size())
                    B.pyllama_spec_prefill(self.spec, i, sc.cache)
        while j < <int>self.prefill_ids.size():
            if self.slots_c[self.prefill_ids[j]].state == SLOT_GENERATING:
                self.prefill_ids.erase(self.prefill_ids.begin() + j)
            else:
                j += 1

    cdef void _sample_all(self) noexcept nogil:
        # Logits rows are fetched here, then every slot's chain runs on its own row, in
        # parallel. Engine thread, no GIL.
        cdef int n, j, i, k = 0
        cdef SlotC * slots_c = self.slots_c
        cdef L.llama_token tok
        cdef L.llama_context * cptr = self.context.ptr
        self.sample_slots.clear()
        L.llama_get_logits(cptr)  # resolves the output order once, on this thread
        for i in range(self.n_slots):
            if slots_c[i].i_batch >= 0:
                slots_c[i].logits = L.llama_get_logits_ith(cptr, slots_c[i].i_batch)
                self.sample_slots.push_back(i)
        # tokens the decode graph already sampled: accept them, leave the rest to the CPU
        for j in range(<int>self.sample_slots.size()):
            i = self.sample_slots[j]
            tok = L.llama_get_sampled_token_ith(cptr, slots_c[i].i_batch) \
                if slots_c[i].on_backend else L.LLAMA_TOKEN_NULL
            if tok != L.LLAMA_TOKEN_NULL:
                self.n_backend_sampled += 1
                slots_c[i].sampled = tok
                sampler_accept(slots_c[i].sampler, tok)
            else:
                self.cpu_slots[k] = i
                k += 1
        n = k
        cdef int nthreads = min(self.n_threads_sampling, n)
        cdef int * idx = self.cpu_slots
        if nthreads > 1:
            # PERF: each slot's chain runs on its own logits row; upstream does this serially.
            for j in prange(n, num_threads=nthreads, schedule="static"):
                self._sample_slot(&slots_c[idx[j]])
        else:
            for j in range(n):
                self._sample_slot(&slots_c[idx[j]])
        if self.spec != NULL:
            self._finish_verification()

    cdef void _sample_slot(self, SlotC * sc) noexcept nogil:
        # The next token of one slot; with a draft in the batch, the draft is verified with the
        # request's own chain (common_sampler_sample_and_accept_n): a token is sampled at each
        # draft position in turn, accepted while it equals the draft token, and the one sampled
        # at the first mismatch (or after the last draft token) is the next token. So the
        # output is what the chain would have sampled without speculation. Any thread, no GIL;
        # touches only this slot.
        cdef int k, n_draft = sc.n_draft
        cdef L.llama_token tok
        cdef const float * row
        cdef double u
        if n_draft == 0:
            sc.sampled = sampler_sample(sc.sampler, sc.logits)
            sampler_accept(sc.sampler, sc.sampled)
            return
        cdef int n_vocab = self.model.n_vocab
        cdef const L.llama_vocab * vocab = self.model.vocab
        sc.accepted.clear()
        for k in range(n_draft + 1):
            # the draft's rows follow the sampled token's row in the batch, so in the outputs
            row = sc.logits + <size_t>k * n_vocab
            tok = sampler_sample(sc.sampler, row)
            if k < n_draft and self.spec_synth:
                # --spec-synth-*: accept at random instead of by match (server_sample_and_accept_synth);
                # a drafted EOG is never accepted; synthetic tokens do not move the chain's state
                sc.rng ^= sc.rng << 13
                sc.rng ^= sc.rng >> 7
                sc.rng ^= sc.rng << 17
                u = (sc.rng >> 11) * (1.0 / 9007199254740992.0)
                if u < B.pyllama_spec_synth_prob(self.spec, k) and not L.llama_vocab_is_eog(vocab, sc.draft[0][k]):
                    sc.accepted.push_back(sc.draft[0][k])
                    continue
                sampler_accept(sc.sampler, tok)
                sc.accepted.push_back(tok)
                break
            sampler_accept(sc.sampler, tok)
            sc.accepted.push_back(tok)
            # draft tokens after an EOG are not accepted: they would stay in the context
            if k == n_draft or tok != sc.draft[0][k] or (L.llama_vocab_is_eog(vocab, tok) and k + 1 < n_draft):
                break
        sc.sampled = sc.accepted.back()
        sc.verified = True

    cdef void _finish_verification(self) noexcept nogil:
        # After the verification of every slot's draft: the rejected draft tokens leave the KV
        # cache and the slot's tokens, and the drafter learns how many were accepted
        # (server_context::update_slots, "speculative decoding - main model sample and accept").
        # Engine thread, no GIL.
        cdef int i, n_acc
        cdef SlotC * sc
        cdef L.llama_memory_t mem = L.llama_get_memory(self.context.ptr)
        for i in range(self.n_slots):
            sc = &self.slots_c[i]
            if not sc.verified:
                continue
            n_acc = <int>sc.accepted.size() - 1
            sc.n_past -= sc.n_draft - n_acc
            sc.cache.resize(sc.n_past)
            L.llama_memory_seq_rm(mem, i, sc.n_past + sc.pos_delta, -1)
            sc.n_draft_accepted += n_acc
            self.n_draft_accepted_total += n_acc
            self.n_draft_verif_steps += 1
            B.pyllama_spec_accept(self.spec, i, <uint16_t>n_acc)
            sc.n_draft = 0
            sc.draft.clear()

    cdef void _draft_all(self) except *:
        # server_context::update_slots, "determine which slots are generating and drafting":
        # every generating slot in this step's batch asks for a draft of at most what its
        # context and its n_predict leave (get_n_draft_max), then all are drafted at once
        # (common_speculative_draft: the draft model decodes every drafting sequence in one
        # batch per position), with the GIL released. Engine thread.
        cdef int i, n_max, n_rem
        cdef bint any_draft = False
        cdef SlotC * sc
        cdef Slot slot
        for i in range(self.n_slots):
            sc = &self.slots_c[i]
            sc.draft.clear()
            sc.n_draft = 0
            if sc.state != SLOT_GENERATING or sc.held or not sc.can_spec:
                continue
            slot = <Slot>self.slots[i]
            # leave room for the sampled token and one more (a context shift) in the context
            n_max = self.n_ctx_slot - sc.n_past - 2
            if slot.n_predict >= 0:
                n_rem = slot.n_predict - slot.n_decoded
                if n_rem > 0:
                    n_max = min(n_max, n_rem - 1)
            if sc.spec_n_max > 0:
                n_max = min(n_max, sc.spec_n_max)
            n_max = min(n_max, self.n_batch - 1)
            if n_max <= 0:
                continue
            B.pyllama_spec_request(self.spec, i, sc.cache, sc.sampled, n_max, sc.draft)
            any_draft = True
        if not any_draft:
            return
        cdef bint ok
        with nogil:
            ok = B.pyllama_spec_draft(self.spec)
        if not ok:
            logger.warning("the draft context has no room for the slots' tokens; no drafts this step")
        for i in range(self.n_slots):
            sc = &self.slots_c[i]
            if sc.draft.size() == 0:
                continue
            if <int>sc.draft.size() < sc.spec_n_min:
                sc.draft.clear()
                continue
            sc.n_draft_total += <int>sc.draft.size()
            self.n_draft_tokens_total += <int>sc.draft.size()

    cdef void _context_shift(self, Slot slot) except *:
        # server_context::update_slots, "context shift": drop half of what follows n_keep.
        cdef SlotC * sc = &self.slots_c[slot.id]
        cdef L.llama_memory_t mem = L.llama_get_memory(self.context.ptr)
        request = slot.request
        cdef int n_keep = request.n_keep if request.n_keep >= 0 else <int>slot.prompt.size()
        n_keep += 1 if L.llama_vocab_get_add_bos(self.model.vocab) else 0
        n_keep = min(self.n_ctx_slot - 4, n_keep)
        cdef int n_left = sc.n_past - n_keep
        cdef int n_discard = request.n_discard if request.n_discard else n_left // 2
        n_discard = max(0, min(n_discard, n_left - 1))
        L.llama_memory_seq_rm(mem, slot.id, n_keep, n_keep + n_discard)
        L.llama_memory_seq_add(mem, slot.id, n_keep + n_discard, sc.n_past, -n_discard)
        cdef int i
        for i in range(n_keep + n_discard, <int>slot.cache_tokens.size()):
            slot.cache_tokens[i - n_discard] = slot.cache_tokens[i]
        slot.cache_tokens.resize(slot.cache_tokens.size() - n_discard)
        slot.checkpoints = []  # their positions moved
        sc.n_past -= n_discard
        slot.truncated = True
        logger.debug("slot %d: context shift, n_keep = %d, n_discard = %d", slot.id, n_keep, n_discard)

    cdef void _process_token(self, Slot slot) except *:
        # The step's tokens of one slot: the sampled one, or after a verified draft each
        # accepted token in order, until one ends the request (server_context::update_slots).
        cdef SlotC * sc = &self.slots_c[slot.id]
        cdef size_t k, n
        cdef int n_past0
        if not sc.verified:
            self._process_one(slot, sc.sampled, sc.n_past)
            return
        sc.verified = False
        n = sc.accepted.size()
        # the KV cache held n_past0 tokens when the first of them was sampled
        n_past0 = sc.n_past - <int>n + 1
        for k in range(n):
            self._process_one(slot, sc.accepted[0][k], n_past0 + <int>k)
            if not slot.busy:
                return

    cdef void _process_one(self, Slot slot, L.llama_token token, int n_past) except *:
        # server_context::process_token: text, stop strings, limits, EOG; one event per token.
        # n_past: the tokens in the KV cache when `token` was sampled.
        cdef SlotC * sc = &self.slots_c[slot.id]
        request = slot.request
        cdef double now = time.perf_counter()
        if slot.n_decoded == 0:
            slot.t_prompt_done = now
            if slot.n_predict == 0:
                # n_predict = 0 only fills the cache; the sampled token is not used.
                slot.cache_tokens.resize(sc.n_past)
                self._release(slot, FinishReason.LIMIT, "")
                return
        slot.n_decoded += 1
        self.n_tokens_predicted_total += 1
        slot.generated_tokens.append(token)
        cdef bint is_eog = L.llama_vocab_is_eog(self.model.vocab, token)
        probs = self._token_probs(slot, token) if request.sampling.n_probs > 0 else None

        piece = self.model.piece_c(token, request.special)
        data = slot.pending_bytes + piece
        cdef int n_ok = utf8_complete_len(data)
        new_text = data[:n_ok].decode("utf-8", "replace")
        slot.pending_bytes = data[n_ok:]
        slot.unsent += new_text

        reason = None
        stopping_word = ""
        if not slot.pending_bytes:
            reason, stopping_word = self._check_stop_strings(slot, len(new_text), is_eog)
        if reason is None and request.n_indent > 0 and self._indent_too_small(slot):
            reason = FinishReason.LIMIT
        send_upto = len(slot.unsent)
        if reason is None and not is_eog:
            send_upto = self._partial_stop_at(slot)
        text = slot.unsent[:send_upto]
        if text:
            slot.unsent = slot.unsent[send_upto:]
            slot.sent_parts.append(text)
            slot.n_sent += len(text)

        if reason is None:
            if not self.ctx_shift and n_past + 1 >= self.n_ctx_slot:
                slot.truncated = True
                reason = FinishReason.LIMIT
            elif slot.n_predict >= 0 and slot.n_decoded >= slot.n_predict:
                reason = FinishReason.LIMIT
            elif "\n" in new_text and request.t_max_predict_ms > 0 and \
                    (now - slot.t_prompt_done) * 1e3 > request.t_max_predict_ms:
                reason = FinishReason.LIMIT
            elif is_eog:
                reason = FinishReason.EOS
        if text or probs is not None or request.timings_per_token:
            timings = None
            if request.timings_per_token:
                timings = Timings(prompt_n=sc.n_prompt_done - sc.n_cached,
                                  prompt_ms=(slot.t_prompt_done - slot.t_start) * 1e3,
                                  predicted_n=slot.n_decoded, predicted_ms=(now - slot.t_prompt_done) * 1e3,
                                  cache_n=sc.n_cached, draft_n=sc.n_draft_total,
                                  draft_n_accepted=sc.n_draft_accepted)
            self._send(slot, TokenEvent(text, [token], [probs] if probs is not None else None, timings))
        if reason is not None:
            self._release(slot, reason, stopping_word)

    cdef str _full_text(self, Slot slot):
        return "".join(slot.sent_parts) + slot.unsent

    cdef bint _indent_too_small(self, Slot slot) except -1:
        # n_indent: a new line indented less than n_indent ends generation; the line is cut
        # after its indentation (server_context::process_token). Checked before text is sent.
        # Joins the whole text per token: n_indent (infill) outputs are short.
        cdef str text = self._full_text(slot)
        cdef int pos, n_indent
        if slot.has_new_line and slot.last_nl_pos > 0:
            pos = slot.last_nl_pos
            n_indent = 0
            while pos < len(text) and text[pos] in " \t":
                n_indent += 1
                pos += 1
            if pos < len(text) and n_indent < slot.request.n_indent:
                slot.unsent = text[slot.n_sent:max(pos, slot.n_sent)]
                return True
        pos = text.find("\n", slot.last_nl_pos)
        if pos >= 0:
            slot.has_new_line = True
            slot.last_nl_pos = pos + 1
        return False

    cdef tuple _check_stop_strings(self, Slot slot, int n_new, bint is_eog):
        # A full stop string in the unsent text cuts the text there (find_stopping_strings).
        cdef str unsent = slot.unsent
        best = -1
        word_found = ""
        for word in slot.request.stop:
            start = max(0, len(unsent) - (len(word) + n_new))
            pos = unsent.find(word, start)
            if pos >= 0 and (best < 0 or pos < best):
                best, word_found = pos, word
        if best < 0:
            return None, ""
        slot.unsent = unsent[:best]
        return FinishReason.WORD, word_found

    cdef int _partial_stop_at(self, Slot slot):
        # Hold back a suffix of the unsent text that may still grow into a stop string.
        cdef str text = slot.unsent
        cdef int hold = len(text)
        for word in slot.request.stop:
            pos = _find_partial_stop(text, word)
            if pos >= 0:
                hold = min(hold, pos)
        return hold

    cdef object _token_probs(self, Slot slot, L.llama_token token):
        # Top n_probs candidates: from the full distribution, or after the sampler chain
        # (upstream's populate_token_probs). The softmax over the vocabulary runs without the
        # GIL into C vectors; the TokenProbs are built after. Engine thread.
        cdef SlotC * sc = &self.slots_c[slot.id]
        cdef int n_probs = slot.request.sampling.n_probs
        cdef bint post = slot.request.sampling.post_sampling_probs
        cdef vector[L.llama_token] ids
        cdef vector[float] ps
        cdef float chosen_p = 0.0
        cdef L.llama_token_data_array * cur_p = &sc.sampler.cur_p
        cdef const float * logits = sc.logits
        cdef int n_vocab = self.model.n_vocab
        cdef size_t i
        with nogil:
            if post:
                _top_from_candidates(cur_p, n_probs, token, ids, ps, &chosen_p)
            else:
                _top_from_logits(logits, n_vocab, n_probs, token, ids, ps, &chosen_p)
        special = slot.request.special
        top = [TokenProb(ids[i], self.model.piece_c(ids[i], special), ps[i]) for i in range(ids.size())]
        return (TokenProb(token, self.model.piece_c(token, special), chosen_p), top)

    cdef void _release(self, Slot slot, reason, str stopping_word) except *:
        cdef SlotC * sc = &self.slots_c[slot.id]
        cdef double now = time.perf_counter()
        request = slot.request
        cdef size_t j
        for j in range(self.prefill_ids.size()):
            if self.prefill_ids[j] == slot.id:
                self.prefill_ids.erase(self.prefill_ids.begin() + j)
                break
        # The KV cache keeps exactly cache_tokens: a later request can reuse them.
        if <int>slot.cache_tokens.size() != sc.n_past:
            slot.cache_tokens.resize(sc.n_past)
        t_prompt_done = slot.t_prompt_done or now
        timings = Timings(prompt_n=sc.n_prompt_done - sc.n_cached, prompt_ms=(t_prompt_done - slot.t_start) * 1e3,
                          predicted_n=slot.n_decoded,
                          predicted_ms=(now - t_prompt_done) * 1e3 if slot.t_prompt_done else 0.0,
                          cache_n=sc.n_cached, draft_n=sc.n_draft_total, draft_n_accepted=sc.n_draft_accepted)
        # a generation that stopped inside a UTF-8 character: upstream never streams the partial
        # character (process_token sends only complete text), and a whole response's JSON
        # writes it as U+FFFD (nlohmann's error_handler_t::replace)
        tail = slot.pending_bytes.decode("utf-8", "replace") if slot.pending_bytes else ""
        slot.pending_bytes = b""
        if slot.unsent and reason != FinishReason.CANCELLED:
            self._send(slot, TokenEvent(slot.unsent, []))
        text = self._full_text(slot) + tail
        slot.sent_parts = None
        slot.unsent = ""
        self._send(slot, FinishEvent(
            reason=reason, text=text, tokens=slot.generated_tokens,
            stopping_word=stopping_word, truncated=slot.truncated,
            n_prompt_tokens=<int>slot.prompt.size(), tokens_evaluated=<int>slot.prompt.size(),
            tokens_cached=sc.n_past, timings=timings, id_slot=slot.id, partial_tail=len(tail)))
        logger.debug("slot %d: request %d done (%s), %d tokens", slot.id, request.id,
                     reason.value, slot.n_decoded)
        slot.request = None
        slot.channel = None
        slot.sampler = None
        slot.t_last_used = now
        sc.state = SLOT_IDLE
        sc.i_batch = -1
        sc.sampler = NULL
        sc.held = False
        sc.can_spec = False
        sc.verified = False
        sc.n_draft = 0
        slot.draft.clear()
        if sc.on_backend:
            L.llama_set_sampler(self.context.ptr, slot.id, NULL)
            sc.on_backend = False

    cdef void _release_error(self, Slot slot, exc) except *:
        # Ends a busy slot's request with an ErrorEvent and drops its KV: how far the failed
        # batch got is not tracked (upstream's slot.release + prompt_clear). Engine thread.
        cdef SlotC * sc = &self.slots_c[slot.id]
        cdef size_t j
        for j in range(self.prefill_ids.size()):
            if self.prefill_ids[j] == slot.id:
                self.prefill_ids.erase(self.prefill_ids.begin() + j)
                break
        self._send(slot, ErrorEvent(exc))
        slot.request = None
        slot.channel = None
        slot.sampler = None
        slot.t_last_used = time.perf_counter()
        sc.state = SLOT_IDLE
        sc.i_batch = -1
        sc.n_in_batch = 0
        sc.sampler = NULL
        sc.held = False
        sc.prefilled = False
        sc.can_spec = False
        sc.verified = False
        sc.n_draft = 0
        slot.draft.clear()
        if sc.on_backend:
            L.llama_set_sampler(self.context.ptr, slot.id, NULL)
            sc.on_backend = False
        self._drop_cache(slot)

    cdef void _drop_cache(self, Slot slot) except *:
        # Empties a slot's sequence in the KV cache and the tokens that mirror it
        # (server_slot::prompt_clear). Engine thread.
        L.llama_memory_seq_rm(L.llama_get_memory(self.context.ptr), slot.id, -1, -1)
        slot.cache_tokens.clear()
        slot.checkpoints = []
        self.slots_c[slot.id].n_past = 0
        self.slots_c[slot.id].pos_delta = 0

    cdef void _abort_all(self, exc) except *:
        # A failed decode: every busy request ends with the error, every slot's KV is dropped.
        logger.error("decode failed, aborting %d requests: %s", self.n_busy, exc)
        for s in self.slots:
            if (<Slot>s).busy:
                self._release_error(<Slot>s, exc)
            else:
                self._drop_cache(<Slot>s)
        self.prefill_ids.clear()

    # --- slot inspection and persistence (engine thread, via Engine.call) ---------------------
    def slot_info(self):
        """One dict per slot, for GET /slots."""
        out = []
        for s in self.slots:
            slot = <Slot>s
            info = dict(id=slot.id, n_ctx=self.n_ctx_slot, is_processing=slot.busy,
                        n_tokens=<int>slot.cache_tokens.size(), speculative=self.speculative)
            if slot.busy:
                info.update(id_task=slot.request.id, request=slot.request,
                            n_prompt_tokens=<int>slot.prompt.size(),
                            n_prompt_tokens_processed=self.slots_c[slot.id].n_prompt_done - self.slots_c[slot.id].n_cached,
                            n_prompt_tokens_cache=self.slots_c[slot.id].n_cached, n_decoded=slot.n_decoded,
                            n_remain=-1 if slot.n_predict < 0 else slot.n_predict - slot.n_decoded,
                            has_new_line=slot.has_new_line,
                            draft_n=self.slots_c[slot.id].n_draft_total,
                            draft_n_accepted=self.slots_c[slot.id].n_draft_accepted)
            out.append(info)
        return out

    def save_slot(self, int slot_id, str path):
        """Write a slot's KV cache and tokens to `path`. Returns (n_tokens, n_bytes).

        Engine thread; the file is written with the GIL released (SERVER_TASK_TYPE_SLOT_SAVE).
        """
        cdef Slot slot = self.slots[slot_id]
        cdef bytes cpath = os.fsencode(path)
        cdef const char * c_path = cpath
        cdef L.llama_context * cptr = self.context.ptr
        cdef const L.llama_token * tokens = slot.cache_tokens.data()
        cdef size_t n_tokens = slot.cache_tokens.size()
        cdef size_t n
        with nogil:  # may be MBs of KV, or block on a slow disk or a pipe
            n = L.llama_state_seq_save_file(cptr, c_path, slot_id, tokens, n_tokens)
        if n == 0:
            raise EngineError(f"failed to save slot {slot_id} to {path}")
        return <int>n_tokens, n

    def restore_slot(self, int slot_id, str path):
        """Load a slot's KV cache and tokens from `path`. Returns (n_tokens, n_bytes).

        Engine thread; the file is read with the GIL released (SERVER_TASK_TYPE_SLOT_RESTORE).
        On failure the slot is left empty.
        """
        cdef Slot slot = self.slots[slot_id]
        cdef bytes cpath = os.fsencode(path)
        cdef const char * c_path = cpath
        cdef L.llama_context * cptr = self.context.ptr
        cdef vector[L.llama_token] tokens
        cdef size_t n_tokens = 0, n, i
        # capacity: a longer state does not fit the slot (the header of llama-server's format too)
        tokens.resize(self.n_ctx_slot + 16)
        self._drop_cache(slot)
        with nogil:
            n = L.llama_state_seq_load_file(cptr, c_path, slot_id, tokens.data(), tokens.size(),
                                            &n_tokens)
        if n == 0:
            self._drop_cache(slot)
            raise InvalidRequestError(f"Unable to restore slot: no valid slot state in {path}")
        if n_tokens > 0 and tokens[0] == -1:
            try:
                tokens = _upstream_slot_tokens(tokens, n_tokens, self.media is not None)
            except InvalidRequestError:
                self._drop_cache(slot)
                raise
            n_tokens = tokens.size()
        for i in range(n_tokens):
            if tokens[i] <= -2 and self.media is not None:
                continue  # a media chunk's placeholder (MediaContext): matched by its hash later
            if tokens[i] < 0 or tokens[i] >= self.model.n_vocab:  # server_tokens::validate
                self._drop_cache(slot)
                raise InvalidRequestError("Unable to restore slot: Invalid tokens in slot save file")
        tokens.resize(n_tokens)
        slot.cache_tokens = tokens
        self.slots_c[slot_id].n_past = n_tokens
        return <int>n_tokens, n

    def erase_slot(self, int slot_id):
        """Drop a slot's KV cache. Returns the tokens erased. Engine thread."""
        cdef Slot slot = self.slots[slot_id]
        cdef int n = slot.cache_tokens.size()
        self._drop_cache(slot)
        return n

    def stats(self):
        """Counters since start (steps, decodes, tokens, seconds in decode and in steps), and
        the prompt cache's states, bytes, tokens, saves and restores."""
        cdef PromptCache pc = self.prompt_cache
        return dict(n_steps=self.n_steps, n_decode_calls=self.n_decode_calls,
                    n_tokens_predicted=self.n_tokens_predicted_total,
                    n_prompt_tokens=self.n_prompt_tokens_total,
                    n_draft_tokens=self.n_draft_tokens_total,
                    n_draft_accepted=self.n_draft_accepted_total,
                    n_draft_verif_steps=self.n_draft_verif_steps,
                    t_decode=self.t_decode_total, t_step=self.t_step_total,
                    n_busy=self.n_busy, n_backend_sampled=self.n_backend_sampled,
                    prompt_cache_states=len(pc.states) if pc is not None else 0,
                    prompt_cache_size=pc.size() if pc is not None else 0,
                    prompt_cache_tokens=pc.n_tokens() if pc is not None else 0,
                    n_prompt_cache_saved=pc.n_saved if pc is not None else 0,
                    n_prompt_cache_loaded=pc.n_loaded if pc is not None else 0)


cdef int _common_prefix(vector[L.llama_token] & cached, prompt):
    cdef int n = min(<int>cached.size(), len(prompt)), i = 0
    while i < n and cached[i] == prompt[i]:
        i += 1
    return i


cdef void _take_top(vector[pair[float, L.llama_token]] & cand, int k, vector[L.llama_token] & ids,
                    vector[float] & ps) noexcept nogil:
    # The k most probable of `cand` ((-p, id) pairs) into (ids, ps), descending; ties by lower
    # id first. A partial sort, O(n log k), as get_token_probabilities (server-common.cpp):
    # n_probs may ask for the whole vocabulary. Any thread, no GIL needed.
    cdef size_t n = cand.size() if <size_t>k > cand.size() else <size_t>k
    cdef size_t i
    partial_sort(cand.begin(), cand.begin() + n, cand.end())
    ids.resize(n)
    ps.resize(n)
    for i in range(n):
        ids[i] = cand[i].second
        ps[i] = -cand[i].first


cdef void _top_from_logits(const float * logits, int n_vocab, int k, L.llama_token chosen,
                           vector[L.llama_token] & ids, vector[float] & ps, float * chosen_p) noexcept nogil:
    # Softmax over the whole vocabulary (upstream's populate_token_probs, pre-sampling).
    # Any thread, no GIL needed; fills the caller's vectors.
    cdef float mx = logits[0]
    cdef double total = 0.0
    cdef int i
    cdef vector[pair[float, L.llama_token]] cand
    for i in range(1, n_vocab):
        if logits[i] > mx:
            mx = logits[i]
    for i in range(n_vocab):
        total += exp(logits[i] - mx)
    cand.resize(n_vocab)
    for i in range(n_vocab):
        cand[i].first = -<float>(exp(logits[i] - mx) / total)
        cand[i].second = i
    _take_top(cand, k, ids, ps)
    chosen_p[0] = <float>(exp(logits[chosen] - mx) / total)


cdef void _top_from_candidates(L.llama_token_data_array * cur_p, int k, L.llama_token chosen,
                               vector[L.llama_token] & ids, vector[float] & ps,
                               float * chosen_p) noexcept nogil:
    # The candidates left by the chain, with the probabilities it computed (post-sampling);
    # zero probabilities left out, as populate_token_probs. Any thread, no GIL needed.
    cdef size_t i
    cdef vector[pair[float, L.llama_token]] cand
    chosen_p[0] = 0.0
    for i in range(cur_p.size):
        if cur_p.data[i].id == chosen:
            chosen_p[0] = cur_p.data[i].p
        if cur_p.data[i].p > 0.0:
            cand.push_back(pair[float, L.llama_token](-cur_p.data[i].p, cur_p.data[i].id))
    _take_top(cand, k, ids, ps)


cdef vector[L.llama_token] _upstream_slot_tokens(vector[L.llama_token] & packed, size_t n_packed,
                                                 bint has_media) except *:
    # The token list of a slot file llama-server wrote (server_tokens::serialize, state version
    # 1): LLAMA_TOKEN_NULL, the version, the token count and tokens, then the media chunks' start
    # indices and data. Text only: the media chunks of upstream's files are not read here.
    cdef vector[L.llama_token] out
    cdef size_t i, n
    if n_packed < 4 or <uint32_t>packed[1] != 1:
        raise InvalidRequestError("Unable to restore slot: Unsupported server tokens state version")
    n = <uint32_t>packed[2]
    if 3 + n >= n_packed:
        raise InvalidRequestError("Unable to restore slot: Unexpected end of server tokens state")
    if <uint32_t>packed[3 + n] != 0:
        if not has_media:
            raise InvalidRequestError("Unable to restore slot: Cannot restore media tokens without an mmproj")
        raise InvalidRequestError("Unable to restore slot: media in a llama-server slot file is not supported "
                                  "by pyllama yet")
    out.reserve(n)
    for i in range(n):
        out.push_back(packed[3 + i])
    return out


cdef int _media_pos_delta(dict media, int upto) except? -1:
    # Positions minus tokens of the media chunks that end by token `upto`: what M-RoPE chunks
    # (n_pos < n_tokens) moved the next position back by. 0 for every other projector.
    cdef int delta = 0
    for start, chunk in media.items():
        if start + (<MediaChunk>chunk).n_tokens <= upto:
            delta += (<MediaChunk>chunk).n_pos - (<MediaChunk>chunk).n_tokens
    return delta


cdef inline void _batch_put(L.llama_batch * batch, int i, L.llama_token token, L.llama_pos pos,
                            L.llama_seq_id seq_id, bint logits) noexcept nogil:
    batch.token[i] = token
    batch.pos[i] = pos
    batch.n_seq_id[i] = 1
    batch.seq_id[i][0] = seq_id
    batch.logits[i] = logits
