"""/completion, /completions (native) and /v1/completions (OpenAI text completion)."""

from __future__ import annotations

from pyllama.engine import FinishEvent, ProgressEvent, TokenEvent
from pyllama.errors import InvalidRequestError
from pyllama.server import sse
from pyllama.server.protocol import completions as fmt
from pyllama.server.protocol.params import (
    build_request,
    get_bool,
    get_int,
    parse_sampling,
    parse_stop,
    split_prompts,
    tokenize_prompt,
)
from pyllama.server.resources.body import read_json, write_json
from pyllama.server.resources.generation import Run, Task, stream_response


def make_tasks(state, body: dict) -> list[Task]:
    """Parse a completion body into one Task per prompt (§3.1, §3.2). HTTP thread."""
    engine = state.require_ready()
    model = engine.model
    if "prompt" not in body or body["prompt"] is None:
        raise InvalidRequestError("\"prompt\" is required")
    prompts = split_prompts(body["prompt"])
    if body["prompt"] == [] or not prompts:
        raise InvalidRequestError("\"prompt\" must not be empty")
    sampling = parse_sampling(body, state.defaults, model)
    stop = parse_stop(body, state.defaults)
    n_cmpl = get_int(body, "n_cmpl", get_int(body, "n", 1), lo=1, hi=engine.n_slots)
    tasks = []
    for prompt in prompts:
        tokens = tokenize_prompt(model, prompt)
        if any(t < 0 or t >= model.n_vocab for t in tokens):
            raise InvalidRequestError("Prompt contains invalid tokens")
        for child in range(n_cmpl):
            child_sampling = sampling
            if child and sampling.seed != 0xFFFFFFFF:
                from dataclasses import replace

                child_sampling = replace(sampling, seed=(sampling.seed + child) & 0xFFFFFFFF)
            request = build_request(body, tokens, child_sampling, state.defaults, stop)
            tasks.append(Task(index=len(tasks), request=request))
    return tasks


def _probs(task, event, post):
    if not event.probs:
        return None
    return [fmt.prob_element(chosen, top, post) for chosen, top in event.probs]


class CompletionResource:
    """POST /completion, /completions: llama-server's native completion."""

    def __init__(self, state) -> None:
        self.state = state

    def on_post(self, req, resp):
        self.respond(req, resp, read_json(req, self.state.settings.max_body_mb << 20))

    def respond(self, req, resp, body: dict) -> None:
        tasks = make_tasks(self.state, body)
        stream = get_bool(body, "stream", False)
        return_tokens = get_bool(body, "return_tokens", False)
        model = self.state.engine.model
        for t in tasks:
            t.prompt_text = model.detokenize(t.request.prompt, unparse_special=True)
        run = Run(self.state, tasks)
        name = self.state.model_name

        def final(task):
            post = task.request.sampling.post_sampling_probs
            probs = [fmt.prob_element(c, top, post) for c, top in task.probs] \
                if task.request.sampling.n_probs else None
            out = fmt.native_final(task.index, task.result, task.request, name, task.prompt_text,
                                   stream, return_tokens, probs)
            fields = body.get("response_fields")
            return fmt.nested_fields(fields, out) if isinstance(fields, list) and fields else out

        if not stream:
            results = [final(t) for t in run.gather()]
            write_json(resp, results[0] if len(results) == 1 else results)
            return

        def frames(task, event):
            if isinstance(event, TokenEvent):
                post = task.request.sampling.post_sampling_probs
                chunk = fmt.native_partial(task.index, event.text, event.tokens, len(task.tokens),
                                           len(task.request.prompt), _probs(task, event, post))
                if event.timings is not None:
                    chunk["timings"] = fmt.timings_dict(event.timings)
                return sse.frame(chunk)
            if isinstance(event, FinishEvent):
                return sse.frame(final(task))
            if isinstance(event, ProgressEvent):
                return sse.frame({"index": task.index, "content": "", "tokens": [], "stop": False,
                                  "id_slot": -1, "tokens_predicted": 0,
                                  "tokens_evaluated": len(task.request.prompt),
                                  "prompt_progress": fmt.progress_dict(event)})
            return b""

        stream_response(resp, run, frames, frames, ping_interval=self.state.settings.sse_ping_interval)


class OAICompletionResource:
    """POST /v1/completions: OpenAI's text completion over the native parser (§4.5)."""

    def __init__(self, state) -> None:
        self.state = state

    def on_post(self, req, resp):
        body = read_json(req, self.state.settings.max_body_mb << 20)
        if body.get("logprobs") is not None and not isinstance(body["logprobs"], bool):
            body.setdefault("n_probs", body["logprobs"])
        tasks = make_tasks(self.state, body)
        stream = get_bool(body, "stream", False)
        run = Run(self.state, tasks)
        cid = fmt.completion_id()
        name, fp = self.state.model_name, self.state.build_info

        def probs_of(task):
            if not task.request.sampling.n_probs:
                return None
            post = task.request.sampling.post_sampling_probs
            return [fmt.prob_element(c, top, post) for c, top in task.probs]

        if not stream:
            done = run.gather()
            write_json(resp, fmt.oai_completion(cid, name, fp, [(t.index, t.result, probs_of(t)) for t in done]))
            return

        def frames(task, event):
            if isinstance(event, TokenEvent):
                post = task.request.sampling.post_sampling_probs
                return sse.frame(fmt.oai_completion_chunk(cid, name, fp, task.index, event.text,
                                                          probs=_probs(task, event, post)))
            if isinstance(event, FinishEvent):
                chunk = fmt.oai_completion_chunk(cid, name, fp, task.index, "", fmt.finish_reason(event))
                chunk["usage"] = fmt.usage(event.n_prompt_tokens, len(event.tokens), event.timings.cache_n)
                chunk["timings"] = fmt.timings_dict(event.timings)
                return sse.frame(chunk)
            return b""

        stream_response(resp, run, frames, frames, done=sse.DONE,
                        ping_interval=self.state.settings.sse_ping_interval)
