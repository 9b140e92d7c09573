"""Plain data types that cross between the engine thread and its callers.

Requests go in (`Request` with `SamplingParams`); events come out (`TokenEvent`, then one
`FinishEvent` or `ErrorEvent`). Defaults equal llama-server's (common/common.h).
Imports: stdlib and `errors`.
"""

from __future__ import annotations

import enum
import itertools
import json
import math
from dataclasses import dataclass, field

from pyllama.errors import InvalidRequestError

DEFAULT_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: a random seed per request

# Upstream's default chain (common_params_sampling::samplers), in order.
DEFAULT_SAMPLERS = ("penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc",
                    "temperature")
# Names and aliases upstream accepts (common_sampler_types_from_names), canonical on the right.
SAMPLER_ALIASES = {
    "dry": "dry", "top_k": "top_k", "top-k": "top_k", "topk": "top_k",
    "top_p": "top_p", "top-p": "top_p", "topp": "top_p", "nucleus": "top_p",
    "typ_p": "typ_p", "typ-p": "typ_p", "typp": "typ_p", "typ": "typ_p", "typical_p": "typ_p",
    "typical-p": "typ_p", "typicalp": "typ_p", "typical": "typ_p",
    "top_n_sigma": "top_n_sigma", "top-n-sigma": "top_n_sigma", "topnsigma": "top_n_sigma",
    "min_p": "min_p", "min-p": "min_p", "minp": "min_p",
    "temperature": "temperature", "temp": "temperature",
    "xtc": "xtc", "infill": "infill", "penalties": "penalties",
    "adaptive_p": "adaptive_p", "adaptive-p": "adaptive_p", "adaptivep": "adaptive_p",
}
SAMPLER_LETTERS = {"d": "dry", "k": "top_k", "y": "typ_p", "p": "top_p", "s": "top_n_sigma",
                   "m": "min_p", "t": "temperature", "x": "xtc", "i": "infill", "e": "penalties",
                   "a": "adaptive_p"}
DEFAULT_DRY_BREAKERS = ("\n", ":", '"', "*")


def parse_samplers(value) -> tuple[str, ...]:
    """Turn a `samplers` value (list of names, or a string of letters) into canonical names.

    Unknown names are skipped, as upstream does.
    """
    if isinstance(value, str):
        return tuple(SAMPLER_LETTERS[c] for c in value if c in SAMPLER_LETTERS)
    if isinstance(value, (list, tuple)):
        names = []
        for name in value:
            if not isinstance(name, str):
                raise InvalidRequestError("samplers must be a list of strings or a string",
                                          param="samplers")
            canonical = SAMPLER_ALIASES.get(name.lower()) or SAMPLER_ALIASES.get(name)
            if canonical:
                names.append(canonical)
        return tuple(names)
    raise InvalidRequestError("samplers must be a list of strings or a string", param="samplers")


@dataclass(frozen=True)
class SamplingParams:
    """Every sampling parameter llama-server accepts, with its defaults."""

    temperature: float = 0.8
    dynatemp_range: float = 0.0
    dynatemp_exponent: float = 1.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    top_n_sigma: float = -1.0
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    repeat_last_n: int = 64
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = 64
    dry_sequence_breakers: tuple[str, ...] = DEFAULT_DRY_BREAKERS
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    adaptive_target: float = -1.0
    adaptive_decay: float = 0.9
    seed: int = DEFAULT_SEED
    min_keep: int = 0
    # (token id, bias) pairs; -inf bans. Text keys are resolved to ids by the caller.
    logit_bias: tuple[tuple[int, float], ...] = ()
    ignore_eos: bool = False
    samplers: tuple[str, ...] = DEFAULT_SAMPLERS
    grammar: str = ""
    json_schema: str | None = None  # JSON text (a dict is serialised); becomes `grammar`, which wins
    grammar_lazy: bool = False
    grammar_trigger_words: tuple[str, ...] = ()
    grammar_trigger_tokens: tuple[int, ...] = ()
    # tokens the chat template already placed in the prompt, fed to a (non-lazy) template
    # grammar before sampling (common_sampler_init's generation-prompt prefill)
    grammar_prefill: tuple[int, ...] = ()
    n_probs: int = 0
    post_sampling_probs: bool = False
    # run the chain inside the decode graph (llama_set_sampler), as upstream's --backend-sampling;
    # not with a grammar or n_probs (upstream's limits)
    backend_sampling: bool = False
    # the reasoning budget (upstream's reasoning_budget_*: common_reasoning_budget_init): the
    # tokens that open and close a thinking block, those forced when the budget runs out
    # (the budget message, then the first end tag), the budget (-1 unlimited), whether
    # /v1/chat/completions/control may end the reasoning, and the generation-prompt tokens
    # the template already placed (accepted before sampling, as the grammar's prefill)
    reasoning_budget_tokens: int = -1
    reasoning_budget_start: tuple[int, ...] = ()
    reasoning_budget_end: tuple[tuple[int, ...], ...] = ()
    reasoning_budget_forced: tuple[int, ...] = ()
    reasoning_control: bool = False
    reasoning_budget_prefill: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.json_schema is not None and not isinstance(self.json_schema, str):
            object.__setattr__(self, "json_schema", json.dumps(self.json_schema))
        if self.seed < 0 or self.seed > 0xFFFFFFFF:
            object.__setattr__(self, "seed", DEFAULT_SEED if self.seed == -1 else self.seed & 0xFFFFFFFF)
        if not math.isfinite(self.repeat_penalty) or self.repeat_penalty <= 0:
            raise InvalidRequestError("repeat_penalty must be finite and greater than 0",
                                      param="repeat_penalty")
        for name in ("presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise InvalidRequestError(f"{name} must be finite", param=name)
        if self.mirostat not in (0, 1, 2):
            raise InvalidRequestError("mirostat must be 0, 1 or 2", param="mirostat")
        if self.min_keep < 0:
            raise InvalidRequestError("min_keep must be >= 0", param="min_keep")
        if self.n_probs < 0:
            raise InvalidRequestError("n_probs must be >= 0", param="n_probs")
        if self.repeat_last_n < -1 or self.dry_penalty_last_n < -1:
            raise InvalidRequestError("penalty windows must be >= -1", param="repeat_last_n")
        if self.reasoning_budget_tokens < -1:
            raise InvalidRequestError("reasoning_budget_tokens must be >= -1", param="reasoning_budget_tokens")
        if self.grammar_lazy and not (self.grammar_trigger_words or self.grammar_trigger_tokens):
            raise InvalidRequestError("grammar_lazy needs at least one trigger", param="grammar_lazy")


class FinishReason(str, enum.Enum):
    """Why a request stopped (upstream's stop_type, plus our own ends)."""

    EOS = "eos"  # an end-of-generation token
    WORD = "word"  # a stop string
    LIMIT = "limit"  # n_predict, the context, or t_max_predict_ms
    CANCELLED = "cancelled"
    ERROR = "error"


_request_ids = itertools.count(1)


@dataclass
class Request:
    """One generation request: a tokenized prompt and how to continue it."""

    prompt: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    n_predict: int = -1  # -1: the engine's default cap (itself -1 = until the context ends)
    n_keep: int = 0
    n_discard: int = 0
    stop: tuple[str, ...] = ()
    cache_prompt: bool = True
    n_cache_reuse: int = -1  # least chunk reused by KV shifting; -1: the engine's (--cache-reuse)
    id_slot: int = -1
    t_max_predict_ms: int = -1
    n_indent: int = 0
    special: bool = False  # render special tokens into the text
    lora: tuple[float, ...] | None = None  # a scale per loaded adapter; None = the server's scales
    timings_per_token: bool = False  # attach the running Timings to every TokenEvent
    return_progress: bool = False  # ProgressEvents while the prompt is processed
    user_starts: tuple[int, ...] = ()  # prompt positions where user messages start (checkpoints)
    # speculative decoding (with a server-wide --spec-type): the most draft tokens per step
    # (-1 = the server's; 0 = none for this request) and the least a draft must have to be used
    spec_n_max: int = -1
    spec_n_min: int = 0
    spec_types: str = "none"  # the server's speculative types, as the request's params report them
    # media chunks (MediaContext.tokenize) by the prompt position where each starts; their
    # positions in `prompt` hold the chunk's placeholder (a negative value from the media hash)
    media: dict | None = None
    id: int = field(default_factory=lambda: next(_request_ids))


@dataclass
class TokenProb:
    """One candidate token with its probability."""

    id: int
    piece: bytes
    prob: float


@dataclass
class TokenEvent:
    """Text produced by one step for one request (may be empty while a stop string is decided)."""

    text: str
    tokens: list[int]
    probs: list | None = None  # per token: (TokenProb of the chosen one, [top TokenProb])
    timings: "Timings | None" = None  # only with Request.timings_per_token


@dataclass
class ProgressEvent:
    """Prompt processing progress: at the start, then after each prompt batch."""

    total: int
    cache: int
    processed: int
    time_ms: float


@dataclass
class Timings:
    """Per-request timings, as llama-server reports them."""

    prompt_n: int = 0
    prompt_ms: float = 0.0
    predicted_n: int = 0
    predicted_ms: float = 0.0
    cache_n: int = 0
    draft_n: int = 0  # speculative decoding: draft tokens proposed, and those the target accepted
    draft_n_accepted: int = 0

    @property
    def prompt_per_token_ms(self) -> float:
        return self.prompt_ms / self.prompt_n if self.prompt_n else 0.0

    @property
    def prompt_per_second(self) -> float:
        return 1e3 * self.prompt_n / self.prompt_ms if self.prompt_ms > 0 else 0.0

    @property
    def _steps(self) -> int:
        return max(0, self.predicted_n - 1)  # the first token comes with the prompt batch

    @property
    def predicted_per_token_ms(self) -> float:
        return self.predicted_ms / self._steps if self._steps else 0.0

    @property
    def predicted_per_second(self) -> float:
        return 1e3 * self._steps / self.predicted_ms if self._steps and self.predicted_ms > 0 else 0.0


@dataclass
class FinishEvent:
    """The last event of a request that ended normally or was cancelled."""

    reason: FinishReason
    text: str  # the whole generated text (stop string removed)
    tokens: list[int]
    stopping_word: str
    truncated: bool
    n_prompt_tokens: int
    tokens_evaluated: int
    tokens_cached: int
    timings: Timings
    id_slot: int
    # characters at the end of `text` (U+FFFD) that stand for an incomplete UTF-8 character the
    # generation stopped inside: never streamed, and left out of a chat message (see chat_text)
    partial_tail: int = 0

    @property
    def chat_text(self) -> str:
        """The text a chat parser reads: without a trailing incomplete character, as common's
        PEG parser stops before one (upstream's chat content and deltas never carry it)."""
        return self.text[:len(self.text) - self.partial_tail] if self.partial_tail else self.text


@dataclass
class ErrorEvent:
    """The last event of a request that failed inside the engine."""

    error: Exception


@dataclass
class EmbeddingResult:
    """Vectors for the inputs of one embed() call, in order.

    With pooling "none" each entry is a list of per-token vectors; with "rank" it is [score].
    """

    embeddings: list
    n_tokens: list[int]
    pooling: str
