# cython: language_level=3, embedsignature=True
"""PromptCache: llama-server's host-RAM prompt cache (--cache-ram), the KV states of slots.

When a slot is about to be reused for another prompt, its sequence state (KV cells, as
llama_state_seq_get_data_ext writes them) is copied into host memory; a later request whose
prompt continues a saved one gets that state copied back into its slot instead of recomputing
it. Mirrors upstream's server_prompt_cache (tools/server/server-task.cpp: alloc / load /
update) and server_slot::prompt_save / prompt_load (server-context.cpp).
Every copy runs with the GIL released. Engine thread only: the EngineCore that owns a
PromptCache is its only user.
Imports: `_llama`, `_bridge` (common's checkpoint).
"""

import logging

from libc.stdint cimport int64_t, uint8_t
from libc.stdlib cimport free, malloc
from libcpp.vector cimport vector

from pyllama cimport _llama as L

logger = logging.getLogger("pyllama.engine")

cdef double MIB = 1024.0 * 1024.0


cdef size_t _lcp(const vector[L.llama_token] & a, const vector[L.llama_token] & b) noexcept nogil:
    # server_tokens::get_common_prefix over plain tokens. Any thread, no GIL needed.
    cdef size_t n = min(a.size(), b.size()), i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


cdef class Checkpoint:
    """A context checkpoint: the part of a sequence's memory that cannot be rolled back.

    Sliding-window layers drop the cells that fall out of the window and recurrent layers
    keep one state, so such a sequence cannot be cut back to an earlier length; a checkpoint
    saved while the prompt was processed (its SWA cells / recurrent state, as
    llama_state_seq_get_data_ext writes them with LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY) can be
    restored instead (llama-server's --ctx-checkpoints; common_prompt_checkpoint). Immutable
    once made, so a slot and a cached prompt may share one. Engine thread.
    """

    @staticmethod
    cdef Checkpoint create(L.llama_context * ctx, L.llama_seq_id seq_id, int64_t n_tokens,
                           L.llama_pos pos_min, L.llama_pos pos_max, int id_task):
        cdef Checkpoint ckpt = Checkpoint.__new__(Checkpoint)
        ckpt.c.id_task = id_task
        ckpt.c.update_pos(n_tokens, pos_min, pos_max)
        with nogil:
            ckpt.c.update_tgt(ctx, seq_id, L.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY)
        return ckpt

    cdef void restore(self, L.llama_context * ctx, L.llama_seq_id seq_id) except *:
        with nogil:
            self.c.load_tgt(ctx, seq_id, L.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY)

    @property
    def n_tokens(self):
        """The prompt tokens the checkpoint stands for."""
        return self.c.n_tokens

    @property
    def pos_min(self):
        return self.c.pos_min

    @property
    def pos_max(self):
        return self.c.pos_max

    @property
    def id_task(self):
        """The request that made it."""
        return self.c.id_task

    @property
    def size(self):
        """Its state bytes."""
        return self.c.size()


cdef size_t _checkpoints_size(list checkpoints):
    cdef size_t n = 0
    for c in checkpoints:
        n += (<Checkpoint>c).c.size()
    return n


cdef class PromptState:
    """One saved sequence: its tokens, its state bytes and its LoRA scales (server_prompt_cache_state)."""

    def __cinit__(self):
        self.data = NULL
        self.n_data = 0
        self.lora = ()
        self.checkpoints = []
        self.n_checkpoints_data = 0

    def __dealloc__(self):
        free(self.data)  # we own it: malloc'ed in PromptCache._alloc
        self.data = NULL

    @property
    def n_tokens(self):
        return <int>self.tokens.size()

    @property
    def size(self):
        return self.n_data + self.n_checkpoints_data

    @property
    def token_list(self):
        return [t for t in self.tokens]


cdef class PromptCache:
    """Saved slot states under a size limit in MiB and a token limit (server_prompt_cache).

    Args:
        limit_size_mib: the most host memory the states may take; -1 = no limit (0 is not a
            cache: the engine makes none, as llama-server's --cache-ram 0).
        limit_tokens: the most tokens the states may hold (upstream: the context's n_ctx),
            raised while the size limit leaves room for more; 0 = no limit.
    """

    def __init__(self, int limit_size_mib, size_t limit_tokens):
        self.states = []
        self.limit_size = 1024 * 1024 * <size_t>(0 if limit_size_mib < 0 else limit_size_mib)
        self.limit_tokens = limit_tokens
        self.total_size = 0
        self.total_tokens = 0
        self.n_saved = 0
        self.n_loaded = 0

    def size(self):
        """Bytes held by every state (server_prompt_cache::size)."""
        return self.total_size

    def n_tokens(self):
        """Tokens held by every state (server_prompt_cache::n_tokens)."""
        return self.total_tokens

    cdef void _push(self, PromptState state) except *:
        self.states.append(state)
        self.total_size += state.n_data + state.n_checkpoints_data
        self.total_tokens += state.tokens.size()

    cdef void _pop(self, Py_ssize_t i) except *:
        cdef PromptState state = self.states.pop(i)
        self.total_size -= state.n_data + state.n_checkpoints_data
        self.total_tokens -= state.tokens.size()

    cdef PromptState _alloc(self, vector[L.llama_token] & tokens, tuple lora, list checkpoints, size_t size):
        # server_prompt_cache::alloc: None when the prompt is already cached, too large, or
        # the memory cannot be had; else a new state, newest, whose data the caller fills.
        # `size` is the sequence state's; the checkpoints that go with it count too.
        # A state only stands for a prompt computed with the same LoRA scales (NOTE(pyllama):
        # upstream's states carry no adapters; a state of other scales is never a match).
        cdef PromptState state
        cdef Py_ssize_t i
        for s in self.states:
            state = <PromptState>s
            if state.lora == lora and _lcp(state.tokens, tokens) == tokens.size():
                logger.debug(" - prompt is already in the cache, skipping")
                return None
        cdef size_t n_checkpoints_data = _checkpoints_size(checkpoints)
        cdef size_t size_new = size + n_checkpoints_data
        if self.limit_size > 0 and size_new > self.limit_size:
            logger.warning(" - prompt state size %.3f MiB exceeds cache size limit %.3f MiB, skipping",
                           size_new / MIB, self.limit_size / MIB)
            return None
        # drop the cached prompts the new one contains
        i = 0
        while i < len(self.states):
            state = <PromptState>self.states[i]
            if state.lora == lora and _lcp(state.tokens, tokens) == state.tokens.size():
                logger.debug(" - removing obsolete cached prompt with length %d", <int>state.tokens.size())
                self._pop(i)
            else:
                i += 1
        if self.limit_size > 0:
            # make room before allocating, so the limit is never breached
            while self.states and self.total_size + size_new > self.limit_size:
                logger.warning(" - making room for prompt cache entry, removing oldest entry (size = %.3f MiB)",
                               (<PromptState>self.states[0]).n_data / MIB)
                self._pop(0)
        state = PromptState()
        cdef uint8_t * data = NULL
        with nogil:
            data = <uint8_t *> malloc(size if size > 0 else 1)
        if data == NULL:
            logger.error("failed to allocate memory for prompt cache state: %d bytes", size)
            self.limit_size = max(<size_t>1, <size_t>(0.4 * self.total_size))
            logger.warning(" - cache size limit reduced to %.3f MiB", self.limit_size / MIB)
            self.update()
            return None
        state.data = data
        state.n_data = size
        state.tokens = tokens
        state.lora = lora
        state.checkpoints = list(checkpoints)
        state.n_checkpoints_data = n_checkpoints_data
        return state

    cdef bint save(self, L.llama_context * ctx, L.llama_seq_id seq_id,
                   vector[L.llama_token] & tokens, tuple lora, list checkpoints) except -1:
        """Copy sequence `seq_id`, which holds `tokens`, into the cache with the slot's
        `checkpoints` (server_slot::prompt_save).

        Returns whether a state was added. Engine thread; the copy runs without the GIL.
        """
        if tokens.size() == 0:
            return False
        cdef size_t size, n
        with nogil:
            size = L.llama_state_seq_get_size_ext(ctx, seq_id, L.LLAMA_STATE_SEQ_FLAGS_NONE)
        logger.debug(" - saving prompt with length %d, total state size = %.3f MiB",
                     <int>tokens.size(), size / MIB)
        cdef PromptState state = self._alloc(tokens, lora, checkpoints, size)
        if state is None:
            return False
        with nogil:
            n = L.llama_state_seq_get_data_ext(ctx, state.data, size, seq_id, L.LLAMA_STATE_SEQ_FLAGS_NONE)
        if n != size:
            logger.error("failed to save state of sequence %d: %d of %d bytes", seq_id, n, size)
            return False
        self._push(state)
        self.n_saved += 1
        return True

    cdef int load(self, L.llama_context * ctx, L.llama_seq_id seq_id,
                  vector[L.llama_token] & tokens, tuple tokens_lora, list checkpoints,
                  vector[L.llama_token] & tokens_new, tuple lora) except -2:
        """Restore the saved prompt that best continues into `tokens_new` (server_prompt_cache::load).

        `tokens` is what sequence `seq_id` holds now (computed with `tokens_lora`); a state wins
        if it keeps a larger share of itself and covers a larger share of the new prompt than
        that, and is not mostly lost (f_keep >= 0.25). Its state then replaces the sequence,
        its tokens replace `tokens`, its checkpoints replace those in `checkpoints` (the
        slot's list, changed in place), and it leaves the cache unless the new prompt keeps
        less than half of it: the slot holds the rest, and saves it again when it is reused. Returns 1
        (restored), 0 (nothing better) or -1 (the restore failed: the caller clears the
        sequence). Engine thread; the copy runs without the GIL.

        NOTE(pyllama): a state the new prompt keeps less than half of (another conversation
        with the same long system prompt, say) stays in the cache, as the newest: the slot
        keeps just that prefix, and upstream, which always takes the state out, loses the
        rest of that conversation for good. (The slot's own cache is saved by the same rule:
        when a request would keep less than half of it.)
        """
        cdef size_t lcp_best = _lcp(tokens, tokens_new) if tokens_lora == lora else 0
        cdef float f_keep_best = <float>lcp_best / tokens.size() if tokens.size() > 0 else -1.0
        cdef float f_sim_best = <float>lcp_best / max(<size_t>1, tokens_new.size())
        cdef float f_keep_cur, f_sim_cur
        cdef size_t lcp_cur
        cdef PromptState state, best = None
        cdef Py_ssize_t i, i_best = -1
        logger.debug(" - looking for better prompt, base f_keep = %.3f, f_sim = %.3f", f_keep_best, f_sim_best)
        for i in range(len(self.states)):
            state = <PromptState>self.states[i]
            if state.lora != lora or state.tokens.size() == 0:
                continue
            lcp_cur = _lcp(state.tokens, tokens_new)
            f_keep_cur = <float>lcp_cur / state.tokens.size()
            f_sim_cur = <float>lcp_cur / max(<size_t>1, tokens_new.size())
            logger.debug("   - prompt with length %7d, lcp = %7d, f_keep = %.3f, f_sim = %.3f",
                         <int>state.tokens.size(), <int>lcp_cur, f_keep_cur, f_sim_cur)
            if f_keep_cur < 0.25:  # don't trash large prompts
                continue
            if f_keep_best < f_keep_cur and f_sim_best < f_sim_cur:
                f_keep_best = f_keep_cur
                f_sim_best = f_sim_cur
                best = state
                i_best = i
        if best is None:
            return 0
        logger.debug(" - found better prompt with f_keep = %.3f, f_sim = %.3f", f_keep_best, f_sim_best)
        cdef size_t n
        with nogil:
            n = L.llama_state_seq_set_data_ext(ctx, best.data, best.n_data, seq_id, L.LLAMA_STATE_SEQ_FLAGS_NONE)
        if n != best.n_data:
            logger.error("failed to restore state with size %d", best.n_data)
            return -1
        self._pop(i_best)  # before the swap: it subtracts the state's tokens
        checkpoints[:] = best.checkpoints
        if f_keep_best >= 0.5:
            tokens.swap(best.tokens)  # its data is freed with `best`
        else:
            tokens = best.tokens
            self._push(best)  # kept, now the most recently used
        self.n_loaded += 1
        return 1

    cpdef void update(self) except *:
        """Evict the oldest states past the size limit, then past the token limit (server_prompt_cache::update)."""
        if self.limit_size > 0:
            while self.states and self.total_size > self.limit_size:
                logger.warning(" - cache size limit reached, removing oldest entry (size = %.3f MiB)",
                               (<PromptState>self.states[0]).n_data / MIB)
                self._pop(0)
        # the token limit grows to what the size limit holds at the average size per token
        cdef float size_per_token = max(1.0, <float>self.total_size / max(<size_t>1, self.total_tokens))
        cdef size_t limit_tokens_cur = self.limit_tokens
        if self.limit_size > 0:
            limit_tokens_cur = max(self.limit_tokens, <size_t>(self.limit_size / size_per_token))
        if self.limit_tokens > 0:
            while self.states and self.total_tokens > limit_tokens_cur:
                logger.warning(" - cache token limit (%d, est: %d) reached, removing oldest entry (size = %.3f MiB)",
                               self.limit_tokens, limit_tokens_cur, (<PromptState>self.states[0]).n_data / MIB)
                self._pop(0)
        logger.debug(" - cache state: %d prompts, %.3f MiB (limits: %.3f MiB, %d tokens, %d est)",
                     len(self.states), self.total_size / MIB, self.limit_size / MIB, self.limit_tokens,
                     limit_tokens_cur)
