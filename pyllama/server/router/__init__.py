"""Router mode: one server in front of many models, each served by a child pyllama-server.

As upstream's llama-server router (tools/server/server-models.cpp, wired in server.cpp): the
router lists the models of the Hugging Face cache, `--models-dir` and `--models-preset`, starts
a child server per model on demand (`--models-autoload`, POST /models/load), at most
`--models-max` at a time, stops the least recently used one to make room, and relays every
model request to the child of the model it names, streams included, chunk by chunk.

NOTE(router): upstream starts a router whenever no model is given (no -m/-hf/-mu/-dr). pyllama
without a model serves its bundled default model instead, so pyllama's router starts when no
model is given AND `--models-dir` or `--models-preset` is (the cache models are listed then
too, as upstream lists them), and never in a process that a router started (a child whose
preset names no model serves the bundled default model rather than becoming a router).

Modules: mode.py (is this process a router?), preset.py (presets and the INI format),
models.py (the registry and the children), sched.py (the --models-max queue),
conversations.py (which model holds each resumable stream), cache.py (POST/DELETE /models'
side of the model cache), proxy.py (the relay), app.py (routes and gunicorn), streams.py (the
resumable stream routes), child.py (the child's side of the pipe, and the download child).
This file holds no code: cli.py and server/wsgi.py import mode.py.
Imports: `settings`, `errors`, the server's HTTP-only modules; never the engine or libllama.
"""
