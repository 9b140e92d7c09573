"""The HTTP server: Falcon resources under gunicorn threads, llama-server's surface.

Imports: public `engine` names, `errors`, `settings`, falcon; never the compiled engine internals.
"""
