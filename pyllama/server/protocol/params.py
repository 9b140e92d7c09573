"""Request JSON -> engine types: prompts, sampling parameters and limits (llama-server §3.1, §3.2).

Runs on HTTP threads. Tokenization uses the model's thread-safe vocabulary functions.
Field errors are 400s worded as upstream's: `Field '<name>': ...`.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field

from pyllama.engine import Request, SamplingParams
from pyllama.engine.types import DEFAULT_DRY_BREAKERS, parse_samplers
from pyllama.errors import ContextLengthExceededError, InvalidRequestError
from pyllama.server.protocol.schema import check_json_schema

INT32_MAX = 2**31 - 1

logger = logging.getLogger(__name__)

# what reading a body of an unexpected shape raises (a field of the wrong JSON type, an array
# where an object was expected, a number beyond a C integer)
SHAPE_ERRORS = (TypeError, AttributeError, KeyError, IndexError, ValueError, OverflowError)


def parses_body(fn):
    """Make a protocol entry point answer a body of the wrong shape with a 400, never a 500.

    The fields each family checks say what is wrong in upstream's words; this is the net under
    them: any other TypeError, AttributeError, ... raised while the body is read (nothing in a
    family's parse() calls the engine) becomes an InvalidRequestError naming what failed.
    """

    @functools.wraps(fn)
    def parse(body, *args, **kwargs):
        try:
            return fn(body, *args, **kwargs)
        except SHAPE_ERRORS as exc:
            logger.debug("request body rejected by %s", fn.__qualname__, exc_info=True)
            raise InvalidRequestError(f"Invalid request body: {exc}") from None

    return parse


def _err(name: str, what: str) -> InvalidRequestError:
    return InvalidRequestError(f"Field '{name}': {what}", param=name)


def get_bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _err(name, "expected a boolean")
    return value


def get_int(body: dict, name: str, default: int, lo: int | None = None, hi: int | None = None) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (isinstance(value, float) and (not math.isfinite(value) or value != int(value))):
        raise _err(name, "expected an integer")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _err(name, f"must be between {lo} and {hi}" if hi is not None else f"must be >= {lo}")
    return value


def get_float(body: dict, name: str, default: float, lo: float | None = None,
              hi: float | None = None, soft: bool = True) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _err(name, "expected a number")
    value = float(value)
    if soft:  # upstream's soft limits clamp silently
        if lo is not None:
            value = max(lo, value)
        if hi is not None:
            value = min(hi, value)
    elif (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _err(name, "out of range")
    return value


def get_str(body: dict, name: str, default: str) -> str:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise _err(name, "expected a string")
    return value


@dataclass
class Defaults:
    """Server-wide defaults from the command line."""

    sampling: SamplingParams = field(default_factory=SamplingParams)
    n_predict: int = -1
    n_keep: int = 0
    cache_prompt: bool = True
    stop: tuple = ()
    special: bool = False
    verbose: bool = False  # `verbose`'s default (params_base.verbosity > 9): __verbose blocks
    reasoning_budget_message: str = ""  # --reasoning-budget-message (the budget is in sampling)
    spec_types: str = "none"  # the requests' "speculative.types" (server-wide --spec-type)


# a text longer than this is counted before it is tokenized: one beyond the context never
# becomes a list of Python ints (36 bytes a token: 750 MB of them for a 20 MB prompt)
COUNT_FIRST = 1 << 20


COUNT_PIECE = 1 << 18  # characters counted at a time


def count_tokens_in_pieces(model, text: str, near: int, *, add_special: bool, parse_special: bool) -> int:
    """The tokens a text of megabytes makes, counted a piece at a time: llama.cpp's tokenizer
    holds state for the whole text it is given (about 45 bytes a character: 900 MB at once for
    20 MB), a piece holds a few MB. Pieces end at whitespace, but a piece boundary can still
    change the count by a token or two, so the sum is exact only where it matters: when it
    comes within that margin of `near` (the limit the caller compares with), the text is
    counted again whole. Thread-safe (the vocabulary is read-only).
    """
    n = pieces = start = 0
    end_all = len(text)
    while start < end_all:
        end = min(end_all, start + COUNT_PIECE)
        if end < end_all:
            cut = max(text.rfind(" ", start + COUNT_PIECE // 2, end), text.rfind("\n", start + COUNT_PIECE // 2, end))
            if cut > start:
                end = cut
        n += model.count_tokens(text[start:end], add_special=add_special and start == 0, parse_special=parse_special)
        pieces += 1
        start = end
    if abs(n - near) <= 4 * pieces:
        n = model.count_tokens(text, add_special=add_special, parse_special=parse_special)
    return n


def check_fits(model, text: str, n_ctx: int | None, add_special: bool, parse_special: bool = True) -> None:
    """Refuse a text of megabytes that makes n_ctx tokens or more, before its tokens are listed.

    Raises:
        ContextLengthExceededError: in the engine's words (its _admit check, upstream's
            "exceeds the available context size").
    """
    if not n_ctx or len(text) <= COUNT_FIRST:
        return
    n = count_tokens_in_pieces(model, text, n_ctx, add_special=add_special, parse_special=parse_special)
    if n >= n_ctx:
        raise ContextLengthExceededError(
            f"request ({n} tokens) exceeds the available context size ({n_ctx} tokens), try increasing it",
            n_prompt_tokens=n, n_ctx=n_ctx)


def check_embedding_input(model, text: str, n_ubatch: int, add_special: bool = True,
                          parse_special: bool = True) -> None:
    """Refuse an embedding input of megabytes that makes more than n_ubatch tokens, before its
    tokens are listed, in the embedding engine's words (EmbeddingCore's check).

    Raises:
        InvalidRequestError: the input is too large for one physical batch.
    """
    if not n_ubatch or len(text) <= COUNT_FIRST:
        return
    n = count_tokens_in_pieces(model, text, n_ubatch, add_special=add_special, parse_special=parse_special)
    if n > n_ubatch:
        raise InvalidRequestError(f"input ({n} tokens) is too large to process. increase the physical batch "
                                  f"size (current batch size: {n_ubatch})", param="input")


def tokenize_end(model, text: str, n_keep: int, *, tail: bool) -> list[int]:
    """The tokens of `text` (no specials) where only its last (tail) or first n_keep tokens are
    used: a text of megabytes is cut to a window that still makes far more than n_keep tokens
    (128 characters a token, past any vocabulary's longest token), so what is kept is what the
    whole text gives, without listing the tokens of all of it. HTTP thread."""
    window = max(COUNT_FIRST, 128 * max(0, n_keep))
    if len(text) > window:
        text = text[-window:] if tail else text[:window]
    return model.tokenize(text, add_special=False, parse_special=False)


def tokenize_prompt(model, prompt, n_ctx: int | None = None) -> list[int]:
    """One prompt: text (BOS as the model asks), ids, or a mixed list (BOS if it starts with text).

    With `n_ctx` (a slot's context), a text of megabytes that cannot fit is refused first.
    """
    if isinstance(prompt, str):
        check_fits(model, prompt, n_ctx, add_special=True)
        return model.tokenize(prompt, add_special=True, parse_special=True)
    if isinstance(prompt, list):
        tokens: list[int] = []
        for i, part in enumerate(prompt):
            if isinstance(part, bool):
                raise InvalidRequestError("\"prompt\" must be a string, a list of tokens, or a list of prompts")
            if isinstance(part, int):
                tokens.append(part)
            elif isinstance(part, str):
                check_fits(model, part, n_ctx, add_special=(i == 0))
                tokens += model.tokenize(part, add_special=(i == 0), parse_special=True)
            else:
                raise InvalidRequestError("\"prompt\" must be a string, a list of tokens, or a list of prompts")
        return tokens
    if isinstance(prompt, dict) and "prompt_string" in prompt:
        if prompt.get("multimodal_data"):
            raise InvalidRequestError("multimodal input is not supported: the server has no mmproj")
        return tokenize_prompt(model, prompt["prompt_string"], n_ctx)
    raise InvalidRequestError("\"prompt\" must be a string, a list of tokens, or a list of prompts")


def split_prompts(prompt) -> list:
    """A batch is a list of prompts (strings, lists, objects) with no bare ints at the top."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list, dict)) for p in prompt) \
            and any(isinstance(p, (list, dict)) for p in prompt) or \
            (isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str) for p in prompt)):
        return list(prompt)
    return [prompt]


def _logit_bias(model, value, n_vocab: int) -> tuple:
    out = []
    if value is None:
        return ()

    def add(key, bias):
        if bias is False:
            bias = -math.inf
        elif isinstance(bias, bool) or not isinstance(bias, (int, float)):
            raise _err("logit_bias", "a bias must be a number or false")
        if isinstance(key, int) and not isinstance(key, bool):
            if 0 <= key < n_vocab:  # out-of-range ids are skipped, as upstream
                out.append((key, float(bias)))
        elif isinstance(key, str):
            if key.lstrip("-").isdigit():
                add(int(key), bias)
                return
            for tok in model.tokenize(key, add_special=False, parse_special=False):
                out.append((tok, float(bias)))
        else:
            raise _err("logit_bias", "keys must be token ids or strings")

    if isinstance(value, dict):
        for k, b in value.items():
            add(k, b)
    elif isinstance(value, list):
        for item in value:
            if not isinstance(item, list) or len(item) != 2:
                raise _err("logit_bias", "expected [token, bias] pairs")
            add(item[0], item[1])
    else:
        raise _err("logit_bias", "expected an array or an object")
    return tuple(out)


def generation_prompt_tokens(model, generation_prompt: str) -> tuple:
    """The generation prompt as tokens, as common_sampler_init's prefill: what the template
    already placed after the last message (a grammar or the reasoning budget accepts it first)."""
    tokens = model.special_text_tokens(generation_prompt)
    if tokens and not generation_prompt[0].isspace():
        first = model.token_to_piece(tokens[0], special=True)
        if first[:1].isspace():  # some tokenizers put a space before the first special token
            tokens = tokens[1:]
    return tuple(tokens)


def _reasoning_budget(body: dict, defaults: Defaults, model) -> dict:
    """The reasoning_budget_* fields (upstream's server-schema: tags tokenized with specials;
    the message goes before the first end tag, forced when the budget runs out)."""
    d = defaults.sampling
    budget = get_int(body, "reasoning_budget_tokens", d.reasoning_budget_tokens, lo=-1, hi=INT32_MAX)
    tok = model.special_text_tokens
    start = tok(get_str(body, "reasoning_budget_start_tag", ""))
    ends = body.get("reasoning_budget_end_tags")
    if ends is None and body.get("reasoning_budget_end_tag") is not None:
        ends = [body["reasoning_budget_end_tag"]]
    if ends is not None and (not isinstance(ends, list) or not all(isinstance(t, str) for t in ends)):
        raise _err("reasoning_budget_end_tags", "expected an array of strings")
    end = tuple(tok(t) for t in ends or () if t)
    forced = ()
    if end:
        message = get_str(body, "reasoning_budget_message", "")
        forced = (tok(message) if message else ()) + end[0]
    return dict(reasoning_budget_tokens=budget, reasoning_budget_start=start, reasoning_budget_end=end,
                reasoning_budget_forced=forced,
                reasoning_control=get_bool(body, "reasoning_control", d.reasoning_control),
                reasoning_budget_prefill=generation_prompt_tokens(model, get_str(body, "generation_prompt", ""))
                if start and end else ())


def parse_sampling(body: dict, defaults: Defaults, model, grammar_prefill: tuple = ()) -> SamplingParams:
    """The sampling fields of a request, over the server defaults (§3.2).

    `grammar_prefill`: tokens the grammar accepts first (a chat template's generation prompt).
    """
    d = defaults.sampling
    samplers = d.samplers
    if body.get("samplers") is not None:
        samplers = parse_samplers(body["samplers"])
    breakers = d.dry_sequence_breakers
    if body.get("dry_sequence_breakers") is not None:
        value = body["dry_sequence_breakers"]
        if not isinstance(value, list) or not value or not all(isinstance(s, str) for s in value):
            raise _err("dry_sequence_breakers", "must be a non-empty array of strings")
        breakers = tuple(value)
    dry_base = get_float(body, "dry_base", d.dry_base)
    if dry_base < 1.0:
        dry_base = d.dry_base
    seed = body.get("seed")
    if seed is None:
        seed = d.seed
    elif isinstance(seed, bool) or not isinstance(seed, int):
        raise _err("seed", "expected an integer")
    n_probs = get_int(body, "n_probs", d.n_probs)
    if body.get("n_probs") is None and body.get("logprobs") is not None:
        # "logprobs" is n_probs' alias in upstream's schema (a boolean reads as 0 or 1)
        alias = body["logprobs"]
        n_probs = int(alias) if isinstance(alias, bool) else get_int(body, "logprobs", d.n_probs)
    grammar = get_str(body, "grammar", d.grammar)
    json_schema = body.get("json_schema")
    if json_schema is not None and not grammar:
        if not isinstance(json_schema, (dict, bool, str)):
            raise _err("json_schema", "expected an object")
        if json_schema == {}:
            json_schema = {"type": "object"}
        json_schema = check_json_schema(json_schema)  # its text, within the grammar's bounds
    elif grammar:
        json_schema = None
    triggers = body.get("grammar_triggers") or []
    trigger_words = tuple(t.get("value", "") for t in triggers if isinstance(t, dict) and t.get("type") in (1, "word"))
    trigger_tokens = tuple(t.get("token") for t in triggers if isinstance(t, dict) and t.get("type") in (0, "token"))
    try:
        return SamplingParams(
            temperature=get_float(body, "temperature", d.temperature, lo=0.0),
            dynatemp_range=get_float(body, "dynatemp_range", d.dynatemp_range),
            dynatemp_exponent=get_float(body, "dynatemp_exponent", d.dynatemp_exponent),
            top_k=get_int(body, "top_k", d.top_k) if body.get("top_k") is None or body["top_k"] >= 0 else 0,
            top_p=get_float(body, "top_p", d.top_p, lo=0.0, hi=1.0),
            min_p=get_float(body, "min_p", d.min_p, lo=0.0, hi=1.0),
            typical_p=get_float(body, "typical_p", d.typical_p),
            top_n_sigma=get_float(body, "top_n_sigma", d.top_n_sigma),
            xtc_probability=get_float(body, "xtc_probability", d.xtc_probability, lo=0.0, hi=1.0),
            xtc_threshold=get_float(body, "xtc_threshold", d.xtc_threshold, lo=0.0, hi=1.0),
            repeat_last_n=get_int(body, "repeat_last_n", d.repeat_last_n, lo=0, hi=INT32_MAX),
            repeat_penalty=get_float(body, "repeat_penalty", d.repeat_penalty),
            presence_penalty=get_float(body, "presence_penalty", d.presence_penalty),
            frequency_penalty=get_float(body, "frequency_penalty", d.frequency_penalty),
            dry_multiplier=get_float(body, "dry_multiplier", d.dry_multiplier),
            dry_base=dry_base,
            dry_allowed_length=get_int(body, "dry_allowed_length", d.dry_allowed_length, lo=0, hi=INT32_MAX),
            dry_penalty_last_n=get_int(body, "dry_penalty_last_n", d.dry_penalty_last_n, lo=0, hi=INT32_MAX),
            dry_sequence_breakers=breakers,
            mirostat=int(get_float(body, "mirostat", d.mirostat, lo=0, hi=2)),
            mirostat_tau=get_float(body, "mirostat_tau", d.mirostat_tau),
            mirostat_eta=get_float(body, "mirostat_eta", d.mirostat_eta),
            adaptive_target=get_float(body, "adaptive_target", d.adaptive_target, hi=1.0),
            adaptive_decay=get_float(body, "adaptive_decay", d.adaptive_decay, lo=0.0, hi=0.99, soft=False),
            seed=seed,
            min_keep=get_int(body, "min_keep", d.min_keep, lo=0, hi=INT32_MAX),
            logit_bias=_logit_bias(model, body.get("logit_bias"), model.n_vocab) or d.logit_bias,
            ignore_eos=get_bool(body, "ignore_eos", d.ignore_eos),
            samplers=samplers,
            grammar=grammar,
            json_schema=json_schema,
            grammar_lazy=get_bool(body, "grammar_lazy", False),
            grammar_trigger_words=trigger_words,
            grammar_trigger_tokens=tuple(t for t in trigger_tokens if isinstance(t, int)),
            grammar_prefill=tuple(grammar_prefill),
            n_probs=max(0, n_probs),
            post_sampling_probs=get_bool(body, "post_sampling_probs", d.post_sampling_probs),
            backend_sampling=get_bool(body, "backend_sampling", d.backend_sampling),
            **_reasoning_budget(body, defaults, model),
        )
    except InvalidRequestError:
        raise
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(str(exc)) from None


def parse_stop(body: dict, defaults: Defaults) -> tuple:
    value = body.get("stop")
    if value is None:
        return defaults.stop
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise _err("stop", "expected a string or an array of strings")
    words = tuple(s for s in value if s)
    return words or defaults.stop


def n_predict_of(body: dict, defaults: Defaults) -> int:
    """n_predict > max_completion_tokens > max_tokens; -1 / absent: the server default."""
    for name in ("n_predict", "max_completion_tokens", "max_tokens"):
        if body.get(name) is not None:
            value = get_int(body, name, -1, lo=-1, hi=INT32_MAX)
            return value if value != -1 else defaults.n_predict
    return defaults.n_predict


def user_message_starts(model, delimiters, tokens: list[int]) -> tuple[int, ...]:
    """Where user messages start in `tokens`, found by the message delimiters (a JSON array
    of {role, delimiter}: the chat template's, or a /completion body's `message_delimiters`)
    as common_chat_msg_delimiters::split finds them: at each position the first delimiter
    that matches opens a message. The engine makes context checkpoints there.
    NOTE(pyllama): a delimiter that tokenizes to nothing is skipped (upstream's would match
    at every position)."""
    if not isinstance(delimiters, list) or not delimiters:
        return ()
    opened: dict[int, str] = {}  # position -> role of the first delimiter matching there
    for d in delimiters:
        if not isinstance(d, dict) or not isinstance(d.get("delimiter"), str):
            continue
        delim = list(model.special_text_tokens(d["delimiter"]))
        if not delim:
            continue
        n, first, role = len(delim), delim[0], d.get("role")
        i = -1
        while True:
            try:
                i = tokens.index(first, i + 1)
            except ValueError:
                break
            if i not in opened and tokens[i:i + n] == delim:
                opened[i] = role
    return tuple(sorted(i for i, role in opened.items() if role == "user"))


def build_request(body: dict, tokens: list[int], sampling: SamplingParams, defaults: Defaults,
                  stop: tuple, user_starts: tuple[int, ...] = ()) -> Request:
    get_float(body, "speculative.p_min", 0.0, lo=0.0, hi=1.0)  # checked only (see spec_n_max)
    return Request(
        prompt=tokens,
        sampling=sampling,
        n_predict=n_predict_of(body, defaults),
        n_keep=get_int(body, "n_keep", defaults.n_keep, lo=-1),
        n_discard=get_int(body, "n_discard", 0, lo=0),
        stop=stop,
        cache_prompt=get_bool(body, "cache_prompt", defaults.cache_prompt),
        # unset: the engine's --cache-reuse (upstream's default, zeroed where memory cannot shift)
        n_cache_reuse=get_int(body, "n_cache_reuse", -1, lo=0, hi=INT32_MAX),
        id_slot=get_int(body, "id_slot", -1),
        t_max_predict_ms=get_int(body, "t_max_predict_ms", -1, lo=-1),
        n_indent=get_int(body, "n_indent", 0, lo=0),
        special=defaults.special,
        lora=_request_lora(body),
        timings_per_token=get_bool(body, "timings_per_token", False),
        return_progress=get_bool(body, "return_progress", False) and get_bool(body, "stream", False),
        user_starts=user_starts,
        spec_types=defaults.spec_types,
        # NOTE(pyllama): upstream's params_from_json has its speculative.* fields disabled
        # (server-schema.cpp, "#if 0"); we honour n_max (0 = no drafting for this request) and
        # n_min as limits under the server's; p_min is checked but the drafter's is server-wide.
        spec_n_max=get_int(body, "speculative.n_max", -1, lo=0, hi=INT32_MAX),
        spec_n_min=get_int(body, "speculative.n_min", 0, lo=0, hi=INT32_MAX),
    )


def _request_lora(body: dict):
    # the per-request `lora` field: [{id, scale}]; the adapter count is checked by the engine
    value = body.get("lora")
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(e, dict) for e in value):
        raise _err("lora", "expected an array of {id, scale}")
    n = max([e.get("id", -1) for e in value if isinstance(e.get("id"), int)] + [-1]) + 1
    scales = [0.0] * n
    for e in value:
        if not isinstance(e.get("id"), int) or e["id"] < 0:
            raise _err("lora", "invalid adapter id")
        scales[e["id"]] = float(e.get("scale", 0.0))
    return tuple(scales)


__all__ = ["DEFAULT_DRY_BREAKERS", "Defaults", "parses_body", "build_request", "get_bool", "get_float", "get_int",
           "check_fits", "get_str", "n_predict_of", "parse_sampling", "parse_stop", "split_prompts",
           "tokenize_prompt"]
