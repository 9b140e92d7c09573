"""The wire protocols: one module per endpoint family, each owning both directions.

`parse(body, ctx)` turns a request body into a Call: the engine `Request`s plus the per-call
object that turns their engine events into response JSON or SSE frames, errors included, in
the family's own wire format (upstream's server_task_result_*::to_json_* with
task_result_state; vLLM's protocol.py + serving class). Nothing here knows HTTP: the server's
resources and the in-process `pyllama.Llama` both run Calls.
Imports: public `engine` names, `errors`, the chat templates; never falcon or `server.resources`.
"""
