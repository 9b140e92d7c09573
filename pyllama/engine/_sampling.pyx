# cython: language_level=3, embedsignature=True
"""Per-request sampler chains built from SamplingParams, and the C sampling step.

The chain mirrors upstream's common_sampler_init (common/sampling.cpp): logit biases (plus the
model's suppressed tokens), then the `samplers` list in order, then dist (or adaptive-p); with
mirostat 1/2, temperature + mirostat instead. A grammar is applied as upstream's
common_sampler_sample does: sample without it, and resample with it first only when the
chosen token breaks the grammar.
Imports: `_llama`, `_model`, `engine.types`, `errors`. A chain belongs to one thread at a time;
`sampler_sample` runs without the GIL.
"""

from libc.math cimport INFINITY
from libc.stdint cimport int32_t, uint32_t
from libc.stdlib cimport calloc, free, malloc
from libcpp.string cimport string
from libcpp.vector cimport vector

from pyllama cimport _llama as L
from pyllama cimport _bridge as B
from pyllama._bridge cimport pyllama_json_schema_to_grammar
from pyllama.engine._model cimport Model

from pyllama.engine.types import DEFAULT_SEED, SamplingParams
from pyllama.errors import InvalidRequestError


def json_schema_to_grammar(str schema):
    """Convert a JSON schema to a GBNF grammar with llama.cpp's own converter.

    Args:
        schema: the schema as JSON text (SamplingParams serialises dicts).

    Returns:
        The grammar text. Thread-safe.

    Raises:
        InvalidRequestError: the schema is not valid JSON or cannot be turned into a grammar;
            the message says why (upstream's words).
    """
    cdef string c_text = schema.encode()
    cdef string out
    try:
        with nogil:
            out = pyllama_json_schema_to_grammar(c_text)
    except Exception as exc:
        raise InvalidRequestError(f"\"json_schema\": {exc}", param="json_schema") from None
    return out.decode()


cdef inline void _load_logits(SamplerState * s, const float * logits) noexcept nogil:
    cdef int32_t i
    for i in range(s.n_vocab):
        s.cur[i].id = i
        s.cur[i].logit = logits[i]
        s.cur[i].p = 0.0
    s.cur_p.data = s.cur
    s.cur_p.size = s.n_vocab
    s.cur_p.selected = -1
    s.cur_p.sorted = False


cdef inline bint _ranks_before(float a, int32_t ia, float b, int32_t ib) noexcept nogil:
    return a > b or (a == b and ia < ib)


cdef inline void _swap(float * val, int32_t * ids, int32_t a, int32_t b) noexcept nogil:
    cdef float v = val[a]
    cdef int32_t t = ids[a]
    val[a] = val[b]
    ids[a] = ids[b]
    val[b] = v
    ids[b] = t


cdef inline void _sift_down(float * val, int32_t * ids, int32_t n, int32_t i) noexcept nogil:
    # min-heap on (value, then higher id first): the root is the weakest kept candidate
    cdef int32_t c
    while True:
        c = 2 * i + 1
        if c >= n:
            return
        if c + 1 < n and _ranks_before(val[c], ids[c], val[c + 1], ids[c + 1]):
            c += 1
        if not _ranks_before(val[i], ids[i], val[c], ids[c]):
            return
        _swap(val, ids, i, c)
        i = c


cdef inline void _offer(float * val, int32_t * ids, int32_t * n, int32_t k, float v, int32_t t) noexcept nogil:
    cdef int32_t i, p
    if n[0] < k:
        i = n[0]
        n[0] += 1
        val[i] = v
        ids[i] = t
        while i > 0:  # sift up
            p = (i - 1) // 2
            if not _ranks_before(val[p], ids[p], val[i], ids[i]):
                break
            _swap(val, ids, i, p)
            i = p
    elif _ranks_before(v, t, val[0], ids[0]):
        val[0] = v
        ids[0] = t
        _sift_down(val, ids, n[0], 0)


cdef void _load_top_k(SamplerState * s, const float * logits) noexcept nogil:
    # The k best candidates by biased logit, best first, with their unbiased logits: the chain's
    # logit-bias sampler adds the biases back, which keeps them sorted, and top_k keeps them all.
    cdef int32_t k = s.prefilter_k, n = 0, i, t
    cdef float val[256]
    cdef int32_t ids[256]
    cdef float v
    cdef const unsigned char * biased = s.biased
    for i in range(s.n_vocab):
        v = logits[i]
        if n == k and v < val[0]:  # the common case: not among the best
            continue
        if biased != NULL and biased[i]:
            continue
        _offer(val, ids, &n, k, v, i)
    for i in range(s.n_bias):
        t = s.bias[i].token
        _offer(val, ids, &n, k, logits[t] + s.bias[i].bias, t)
    # heap -> best first: repeatedly move the weakest to the end
    i = n
    while i > 1:
        i -= 1
        _swap(val, ids, 0, i)
        _sift_down(val, ids, i, 0)
    for i in range(n):
        s.cur[i].id = ids[i]
        s.cur[i].logit = logits[ids[i]]
        s.cur[i].p = 0.0
    s.cur_p.data = s.cur
    s.cur_p.size = n
    s.cur_p.selected = -1
    s.cur_p.sorted = True


cdef inline bint _grammar_applies(SamplerState * s) noexcept nogil:
    # common_sampler's grammar_should_apply: a lazy grammar waits while a budget is in force
    if s.grammar == NULL:
        return False
    if s.rbudget == NULL or not s.grammar_lazy:
        return True
    cdef B.common_reasoning_budget_state st = B.common_reasoning_budget_get_state(s.rbudget)
    return st == B.REASONING_BUDGET_IDLE or st == B.REASONING_BUDGET_DONE


cdef L.llama_token sampler_sample(SamplerState * s, const float * logits) noexcept nogil:
    # Picks a token from one logits row; does not accept it. Any thread, no GIL.
    cdef L.llama_token_data single
    cdef L.llama_token_data_array single_p
    cdef L.llama_token token
    if s.prefilter_k > 0:
        _load_top_k(s, logits)
    else:
        _load_logits(s, logits)
    if s.rbudget != NULL:  # the budget first, as common_sampler_sample
        L.llama_sampler_apply(s.rbudget, &s.cur_p)
    L.llama_sampler_apply(s.chain, &s.cur_p)
    token = s.cur_p.data[s.cur_p.selected].id
    if not _grammar_applies(s):
        return token
    # Grammar-based rejection sampling (common_sampler_sample).
    single.id = token
    single.logit = 1.0
    single.p = 0.0
    single_p.data = &single
    single_p.size = 1
    single_p.selected = -1
    single_p.sorted = False
    L.llama_sampler_apply(s.grammar, &single_p)
    if single.logit != -INFINITY:
        return token
    _load_logits(s, logits)
    if s.rbudget != NULL:
        L.llama_sampler_apply(s.rbudget, &s.cur_p)
    L.llama_sampler_apply(s.grammar, &s.cur_p)
    L.llama_sampler_apply(s.chain, &s.cur_p)
    return s.cur_p.data[s.cur_p.selected].id


cdef void sampler_accept(SamplerState * s, L.llama_token token) noexcept nogil:
    # Records the chosen token in the budget, the grammar and the chain (penalties, DRY,
    # mirostat), as common_sampler_accept does for a generated token.
    cdef bint accept_grammar = _grammar_applies(s)  # before the budget moves on
    cdef const vector[L.llama_token] * end_seq
    cdef size_t i
    if s.rbudget != NULL:
        L.llama_sampler_accept(s.rbudget, token)
        # a thinking block that just ended may hold a trigger of the waiting lazy grammar
        if s.grammar != NULL and not accept_grammar and \
                B.common_reasoning_budget_get_state(s.rbudget) == B.REASONING_BUDGET_DONE:
            end_seq = B.common_reasoning_budget_get_end_match(s.rbudget)
            if end_seq != NULL:
                for i in range(end_seq.size()):
                    L.llama_sampler_accept(s.grammar, end_seq[0][i])
    if s.grammar != NULL and accept_grammar:
        L.llama_sampler_accept(s.grammar, token)
    L.llama_sampler_accept(s.chain, token)


cdef class SamplerChain:
    """The llama.cpp sampler chain of one request.

    Args:
        model: the model whose vocabulary the chain samples from.
        params: a SamplingParams; keyword arguments override its fields
            (e.g. `SamplerChain(model, temperature=0, seed=7)`).

    Raises:
        InvalidRequestError: a parameter is out of range or the grammar does not parse.
    """

    def __cinit__(self, Model model, params=None, **overrides):
        self.state = NULL
        self.model = model
        if params is None:
            params = SamplingParams(**overrides)
        elif overrides:
            params = SamplingParams(**{**params.__dict__, **overrides})
        if not (0.0 <= params.top_p <= 1.0):
            raise InvalidRequestError(f"top_p must be between 0 and 1, got {params.top_p}", param="top_p")
        if not (0.0 <= params.min_p <= 1.0):
            raise InvalidRequestError(f"min_p must be between 0 and 1, got {params.min_p}", param="min_p")
        if params.json_schema is not None and not params.grammar:
            # As llama-server: json_schema becomes a grammar; an explicit grammar wins.
            params = SamplingParams(**{**params.__dict__, "grammar": json_schema_to_grammar(params.json_schema),
                                       "json_schema": None})
        self.params = params

        self.state = <SamplerState *> calloc(1, sizeof(SamplerState))
        if self.state == NULL:
            raise MemoryError()
        self.state.n_vocab = model.n_vocab
        self.state.cur = <L.llama_token_data *> malloc(sizeof(L.llama_token_data) * model.n_vocab)
        if self.state.cur == NULL:
            raise MemoryError()
        self.state.cur_p.data = self.state.cur
        self.state.cur_p.size = 0
        self.state.cur_p.selected = -1
        if params.grammar:
            self.state.grammar = _make_grammar(model, params)
            self.state.grammar_lazy = params.grammar_lazy
        self.state.chain = _make_chain(model, params, self.state)
        self.state.rbudget = _make_reasoning_budget(model, params)
        if self.state.rbudget != NULL:
            self.state.prefilter_k = 0  # forcing needs every candidate to pick from
            self._accept_budget_prefill()

    def __dealloc__(self):
        if self.state != NULL:
            if self.state.chain != NULL:
                L.llama_sampler_free(self.state.chain)
            if self.state.grammar != NULL:
                L.llama_sampler_free(self.state.grammar)
            if self.state.rbudget != NULL:
                L.llama_sampler_free(self.state.rbudget)
            free(self.state.cur)
            free(self.state.bias)
            free(self.state.biased)
            free(self.state)
            self.state = NULL

    @staticmethod
    def greedy(Model model):
        """Return a chain that always picks the most likely token."""
        return SamplerChain(model, temperature=0.0)

    def reset(self):
        """Forget sampled tokens and restart the RNG from the seed (the grammar's prefill stays)."""
        L.llama_sampler_reset(self.state.chain)
        if self.state.grammar != NULL:
            L.llama_sampler_reset(self.state.grammar)
            if not self.params.grammar_lazy:
                for t in self.params.grammar_prefill:  # the template's prefill stays accepted
                    L.llama_sampler_accept(self.state.grammar, t)
        if self.state.rbudget != NULL:
            L.llama_sampler_reset(self.state.rbudget)
            self._accept_budget_prefill()

    cdef void _accept_budget_prefill(self) noexcept:
        for t in self.params.reasoning_budget_prefill:
            L.llama_sampler_accept(self.state.rbudget, t)

    @property
    def has_reasoning_budget(self):
        """Whether a reasoning budget sampler runs first in this chain."""
        return self.state.rbudget != NULL

    @property
    def reasoning_state(self):
        """The budget's state: idle, counting, forcing, waiting_utf8, done (None without one)."""
        if self.state.rbudget == NULL:
            return None
        return ("idle", "counting", "forcing", "waiting_utf8", "done")[
            <int> B.common_reasoning_budget_get_state(self.state.rbudget)]

    def end_reasoning(self):
        """Force the end of the thinking block now (common_sampler_reasoning_budget_force);
        False when there is no budget sampler or it is not counting. Owner thread."""
        if self.state.rbudget == NULL:
            return False
        return B.common_reasoning_budget_force(self.state.rbudget)

    def accept(self, L.llama_token token):
        """Record a token as if it had been sampled (prompt tokens for penalties)."""
        self.model.check_token(token)
        sampler_accept(self.state, token)

    @property
    def names(self):
        """The names of the samplers in the chain, in order."""
        cdef int i
        return [(<bytes>L.llama_sampler_name(L.llama_sampler_chain_get(self.state.chain, i))).decode()
                for i in range(L.llama_sampler_chain_n(self.state.chain))]

    @property
    def prefilter_k(self):
        """How many candidates each sample loads instead of the whole vocabulary (0: all)."""
        return self.state.prefilter_k

    @property
    def seed(self):
        """The seed in use (the random one picked when the params asked for -1)."""
        return L.llama_sampler_get_seed(self.state.chain)

    cdef L.llama_token sample_c(self, L.llama_context * ctx, int idx) noexcept nogil:
        # Samples from output row `idx` of the last decode and accepts the token. Owner thread.
        cdef L.llama_token token = sampler_sample(self.state, L.llama_get_logits_ith(ctx, idx))
        sampler_accept(self.state, token)
        return token


cdef L.llama_sampler * _make_reasoning_budget(Model model, params) except? NULL:
    # as common_sampler_init: only with start and end tags, and a finite budget, a lazy grammar
    # (whose thinking-block suppression needs it) or reasoning control
    if not params.reasoning_budget_start or not params.reasoning_budget_end or not (
            params.grammar_lazy or params.reasoning_budget_tokens >= 0 or params.reasoning_control):
        return NULL
    cdef vector[vector[L.llama_token]] starts, ends
    cdef vector[L.llama_token] seq, forced
    for t in params.reasoning_budget_start:
        seq.push_back(t)
    starts.push_back(seq)
    for tag in params.reasoning_budget_end:
        seq.clear()
        for t in tag:
            seq.push_back(t)
        ends.push_back(seq)
    for t in params.reasoning_budget_forced:
        forced.push_back(t)
    cdef int32_t budget = 0x7FFFFFFF if params.reasoning_budget_tokens < 0 else params.reasoning_budget_tokens
    return B.common_reasoning_budget_init(model.vocab, starts, ends, forced, budget)


cdef L.llama_sampler * _make_grammar(Model model, params) except NULL:
    cdef bytes grammar = params.grammar.encode()
    cdef vector[const char *] patterns
    cdef vector[L.llama_token] trigger_tokens
    cdef L.llama_sampler * smpl
    words = [_regex_escape(w).encode() for w in params.grammar_trigger_words]
    if params.grammar_lazy:
        for w in words:
            patterns.push_back(<const char *> w)
        for t in params.grammar_trigger_tokens:
            trigger_tokens.push_back(t)
        smpl = L.llama_sampler_init_grammar_lazy_patterns(
            model.vocab, grammar, b"root", patterns.data(), patterns.size(),
            trigger_tokens.data(), trigger_tokens.size())
    else:
        smpl = L.llama_sampler_init_grammar(model.vocab, grammar, b"root")
    if smpl == NULL:
        raise InvalidRequestError("Failed to initialize samplers: failed to parse grammar",
                                  param="grammar")
    if not params.grammar_lazy:
        for t in params.grammar_prefill:
            model.check_token(t)
            L.llama_sampler_accept(smpl, t)
    return smpl


def _regex_escape(text):
    # std::regex ECMAScript escaping, as upstream's regex_escape.
    import re
    return re.sub(r"([.^$|()\[\]{}*+?\\])", r"\\\1", text)


cdef bint _noop_before_top_k(str name, params):
    # Samplers that leave the candidates untouched with these params (their apply returns early).
    if name == "penalties":
        return params.repeat_last_n == 0 or (params.repeat_penalty == 1.0 and params.frequency_penalty == 0.0
                                             and params.presence_penalty == 0.0)
    if name == "dry":
        return params.dry_multiplier == 0.0 or params.dry_base < 1.0 or params.dry_penalty_last_n == 0
    if name == "top_n_sigma":
        return params.top_n_sigma <= 0.0
    return False


cdef bint _prefilter_enabled = True


def set_top_k_prefilter(bint enabled):
    """Turn the top-k prefilter of chains built from now on on or off (to compare the two)."""
    global _prefilter_enabled
    _prefilter_enabled = enabled


cdef int32_t _prefilter_k(params):
    # top_k over the whole vocabulary is the first sampler that changes anything: load only
    # its k candidates. Not with a grammar (it resamples over all of them), mirostat, or the
    # chain running on the backend.
    if not _prefilter_enabled or params.grammar or params.mirostat or params.backend_sampling \
            or not (0 < params.top_k <= 256):
        return 0
    if "top_k" not in params.samplers:
        return 0
    for name in params.samplers[:list(params.samplers).index("top_k")]:
        if not _noop_before_top_k(name, params):
            return 0
    return params.top_k


cdef int _set_prefilter(SamplerState * state, Model model, params, vector[L.llama_logit_bias] & biases) except -1:
    # Arms _load_top_k with the chain's biases, so it ranks candidates as the chain will.
    cdef int32_t k = _prefilter_k(params), i, n = biases.size()
    # (a token biased twice is summed over the whole vocabulary but not over k candidates)
    if k == 0 or len({biases[i].token for i in range(n)}) != n:
        return 0
    state.prefilter_k = min(k, model.n_vocab)
    state.n_bias = n
    if n:
        state.bias = <L.llama_logit_bias *> malloc(sizeof(L.llama_logit_bias) * n)
        state.biased = <unsigned char *> calloc(model.n_vocab, 1)
        if state.bias == NULL or state.biased == NULL:
            raise MemoryError()
        for i in range(n):
            state.bias[i] = biases[i]
            state.biased[biases[i].token] = 1
    return 0


cdef L.llama_sampler * _make_chain(Model model, params, SamplerState * state=NULL) except NULL:
    cdef L.llama_sampler_chain_params cparams = L.llama_sampler_chain_default_params()
    cparams.no_perf = True
    cdef L.llama_sampler * chain = L.llama_sampler_chain_init(cparams)
    cdef uint32_t seed = params.seed
    cdef vector[L.llama_logit_bias] biases
    cdef L.llama_logit_bias bias
    cdef int32_t n_suppress = 0, i
    cdef const L.llama_token * suppress = L.llama_vocab_get_suppress_tokens(model.vocab, &n_suppress)
    cdef vector[const char *] breakers
    try:
        for token, value in params.logit_bias:
            if 0 <= token < model.n_vocab:
                bias.token = token
                bias.bias = value
                biases.push_back(bias)
        if params.ignore_eos:
            for i in range(<int32_t>model.eog_ids.size()):
                bias.token = model.eog_ids[i]
                bias.bias = -INFINITY
                biases.push_back(bias)
        for i in range(n_suppress):
            bias.token = suppress[i]
            bias.bias = -INFINITY
            biases.push_back(bias)
        if biases.size():
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_logit_bias(
                model.n_vocab, biases.size(), biases.data()))
        if state != NULL:
            _set_prefilter(state, model, params, biases)

        if params.mirostat == 1:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(params.temperature))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_mirostat(
                model.n_vocab, seed, params.mirostat_tau, params.mirostat_eta, 100))
            return chain
        if params.mirostat == 2:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(params.temperature))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_mirostat_v2(
                seed, params.mirostat_tau, params.mirostat_eta))
            return chain

        use_adaptive_p = False
        breaker_bytes = [b.encode() for b in params.dry_sequence_breakers]
        for b in breaker_bytes:
            breakers.push_back(<const char *> b)
        for name in params.samplers:
            if name == "dry":
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_dry(
                    model.vocab, params.dry_multiplier, params.dry_base, params.dry_allowed_length,
                    params.dry_penalty_last_n, breakers.data(), breakers.size()))
            elif name == "top_k":
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(params.top_k))
            elif name == "top_p":
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(params.top_p, params.min_keep))
            elif name == "top_n_sigma":
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_n_sigma(params.top_n_sigma))
            elif name == "min_p":
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_min_p(params.min_p, params.min_keep))
            elif name == "xtc":
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_xtc(
                    params.xtc_probability, params.xtc_threshold, params.min_keep, seed))
            elif name == "typ_p":
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_typical(params.typical_p, params.min_keep))
            elif name == "temperature":
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp_ext(
                    params.temperature, params.dynatemp_range, params.dynatemp_exponent))
            elif name == "infill":
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_infill(model.vocab))
            elif name == "penalties":
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_penalties(
                    model.n_vocab, params.repeat_last_n, params.repeat_penalty,
                    params.frequency_penalty, params.presence_penalty))
            elif name == "adaptive_p":
                use_adaptive_p = True
            else:
                raise InvalidRequestError(f"unknown sampler {name!r}", param="samplers")
        if use_adaptive_p:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_adaptive_p(
                params.adaptive_target, params.adaptive_decay, seed))
        else:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(seed))
        return chain
    except BaseException:
        L.llama_sampler_free(chain)
        raise
