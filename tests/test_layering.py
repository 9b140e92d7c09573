"""The layer boundaries of shared/STYLE.md, checked on the source."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "pyllama"


def _imports(path: Path) -> set[str]:
    if path.suffix == ".py":
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        return names
    text = path.read_text()
    return set(re.findall(r"^\s*(?:from|c?import)\s+([\w.]+)", text, re.M))


def test_errors_imports_nothing_from_pyllama():
    assert not [n for n in _imports(PKG / "errors.py") if n.startswith("pyllama")]


def test_engine_never_imports_http_or_server():
    for path in (PKG / "engine").iterdir():
        if path.suffix in (".py", ".pyx", ".pxd"):
            banned = ("falcon", "gunicorn") + (("json",) if path.suffix != ".py" else ())
            bad = [n for n in _imports(path)
                   if n.split(".")[0] in banned or n.startswith("pyllama.server")]
            assert not bad, f"{path.name} imports {bad}"


def test_llama_h_is_declared_once():
    externs = [p for p in PKG.rglob("*.px[di]") if 'cdef extern from "llama.h"' in p.read_text()]
    assert [p.name for p in externs] == ["_llama.pxd"]


def test_importing_pyllama_loads_no_engine():
    import subprocess
    import sys

    code = "import sys, pyllama; print(any(m.startswith('pyllama.engine') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False"


def test_server_uses_only_public_engine_names():
    for path in (PKG / "server").rglob("*.py"):
        bad = [n for n in _imports(path) if n.startswith("pyllama.engine._") or n == "pyllama._llama"]
        assert not bad, f"{path.name} imports {bad}"


def test_compiled_chat_module_stays_below_the_server():
    bad = [n for n in _imports(PKG / "_chat.pyx") if n.startswith("pyllama.server") or n in ("falcon", "json")]
    assert not bad, f"_chat.pyx imports {bad}"


def test_protocol_layer_knows_no_http():
    for path in (PKG / "server" / "protocol").glob("*.py"):
        bad = [n for n in _imports(path) if n.split(".")[0] in ("falcon", "gunicorn")
               or n.startswith("pyllama.server.resources") or n == "pyllama.server.streaming"]
        assert not bad, f"protocol/{path.name} imports {bad}"


def test_no_resource_imports_another():
    for path in (PKG / "server" / "resources").glob("*.py"):
        bad = [n for n in _imports(path) if n.startswith("pyllama.server.resources")]
        assert not bad, f"resources/{path.name} imports {bad}"


def test_cli_and_wsgi_imports_run_downwards():
    assert not [n for n in _imports(PKG / "cli.py") if n.startswith("pyllama.engine._")]
    assert not [n for n in _imports(PKG / "flags.py")
                if n.startswith("pyllama") and n not in ("pyllama.settings", "pyllama.presets")]
    assert "pyllama.cli" not in _imports(PKG / "server" / "wsgi.py")


def test_downloads_stay_below_the_server_and_the_engine():
    # downloads.py runs before gunicorn forks: huggingface_hub and the stdlib, no HTTP server code
    assert not [n for n in _imports(PKG / "presets.py") if n.startswith("pyllama")]
    bad = [n for n in _imports(PKG / "downloads.py") if n.split(".")[0] in ("falcon", "gunicorn")
           or n.startswith(("pyllama.server", "pyllama.engine", "pyllama._"))]
    assert not bad, f"downloads.py imports {bad}"


def test_in_process_api_loads_no_http_layer():
    # what `pyllama.Llama` pulls in when used: the protocol layer, never Falcon or a resource
    import subprocess
    import sys

    code = ("import sys, pyllama.llama; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('falcon', 'gunicorn') "
            "or m.startswith('pyllama.server.resources') or m == 'pyllama.server.app'))")
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_router_stays_off_the_engine():
    # router mode (server/router/) is a process in front of child servers: no engine, no
    # libllama, none of the model-serving resources or protocol modules
    allowed_resources = {"pyllama.server.resources.features"}
    for path in (PKG / "server" / "router").glob("*.py"):
        bad = [n for n in _imports(path)
               if n.startswith(("pyllama.engine", "pyllama._", "pyllama.server.protocol", "pyllama.server.app",
                                "pyllama.server.streaming", "pyllama.llama"))
               or (n.startswith("pyllama.server.resources") and n not in allowed_resources)]
        assert not bad, f"router/{path.name} imports {bad}"


def test_importing_the_router_loads_no_engine():
    import subprocess
    import sys

    code = ("import sys, pyllama.server.router.app, pyllama.server.router.mode; "
            "print(sorted(m for m in sys.modules if m.startswith(('pyllama.engine', 'pyllama._'))))")
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
