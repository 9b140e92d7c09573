"""llama-server's command line -> Settings: flags, aliases, LLAMA_ARG_* variables, checks.

Long and short forms, `_` for `-` in long names, the same defaults as upstream
(common/arg.cpp); a llama-server flag pyllama does not support is refused by name.
Used by the CLI and by the gunicorn entry point (server/wsgi.py) alike.
Imports: `settings` and the stdlib.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields, replace

from pyllama.settings import Settings

TRUTHY = {"true", "1", "on", "enabled"}
FALSY = {"false", "0", "off", "disabled"}
TRISTATE = {**{v: "on" for v in ("on", "enabled", "true", "1")},
            **{v: "off" for v in ("off", "disabled", "false", "0")},
            "auto": "auto", "-1": "auto"}

# llama-server flags that exist upstream but that this version does not implement.
UNSUPPORTED = (
    "-mu --model-url -hf -hfr --hf-repo -hff --hf-file -hft --hf-token -dr --docker-repo "
    "--control-vector --control-vector-scaled "
    "--control-vector-layer-range -mm --mmproj -mmu --mmproj-url --no-mmproj --mmproj-auto "
    "--mmproj-offload --no-mmproj-offload --spec-type -md --model-draft -hfd --draft --draft-max "
    "--draft-min --models-dir --models-preset --models-max --models-autoload --no-models-autoload "
    "--tools --mcp-servers-config --agent -ag "
    "--cache-reuse --cache-ram -cram --sleep-idle-seconds --path --media-path "
    "--reasoning-budget --reasoning -rea -ot "
    "--override-tensor --cpu-moe --n-cpu-moe -cmoe -ncmoe --fit -fit --fit-target --fit-ctx --lazy-mode -lzm "
    "--rpc --ctx-checkpoints --swa-checkpoints -ctxcp --checkpoint-min-step --cache-idle-slots "
    "--log-prompts-dir"
).split()


class FlagError(Exception):
    """A command line that cannot be turned into Settings."""


def _flag_table():
    table = {}
    for f in fields(Settings):
        meta = f.metadata
        for name in meta["names"]:
            table[name] = (f, True)
        for name in meta.get("neg", ()):
            table[name] = (f, False)
    return table


def _normalise(name: str) -> str:
    return "--" + name[2:].replace("_", "-") if name.startswith("--") else name


def _convert(f, raw: str, source: str):
    meta = f.metadata
    kind = meta.get("kind")
    try:
        if kind == "tristate":
            if raw.lower() not in TRISTATE:
                raise ValueError
            return TRISTATE[raw.lower()]
        if kind in ("flag",) or f.type in ("bool", "bool | None"):
            low = raw.lower()
            if low in TRUTHY:
                return True
            if low in FALSY:
                return False
            raise ValueError
        if f.type == "int":
            return int(raw)
        if f.type == "float":
            return float(raw)
    except ValueError:
        raise FlagError(f"invalid value for {source}: {raw!r}") from None
    if meta.get("choices") and raw not in meta["choices"]:
        raise FlagError(f"invalid value for {source}: {raw!r} (expected one of "
                        f"{', '.join(c for c in meta['choices'] if c)})")
    return raw


def parse_server_args(argv: list[str], environ: dict | None = None) -> Settings:
    """Turn llama-server flags (and LLAMA_ARG_* variables) into Settings.

    Raises:
        FlagError: an unknown, unsupported or malformed flag.
    """
    environ = os.environ if environ is None else environ
    table = _flag_table()
    values: dict = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        name, eq, inline = token.partition("=") if token.startswith("--") else (token, "", "")
        name = _normalise(name)
        if name not in table:
            if name in UNSUPPORTED:
                raise FlagError(f"{name} is a llama-server flag that pyllama does not support yet")
            raise FlagError(f"invalid argument: {token}")
        f, positive = table[name]
        kind = f.metadata.get("kind")
        takes_value = positive and kind not in ("flag",) and f.type not in ("bool", "bool | None")
        if not takes_value:
            if eq:
                raise FlagError(f"{name} takes no value")
            values[f.name] = positive
            continue
        if eq:
            raw = inline
        elif i < len(argv):
            raw = argv[i]
            i += 1
        else:
            raise FlagError(f"expected value for argument {name}")
        if kind in ("append", "keys"):
            parts = [p for p in raw.split(",")] if kind == "keys" else [raw]
            values[f.name] = tuple(values.get(f.name, ())) + tuple(p for p in parts if p)
        else:
            values[f.name] = _convert(f, raw, name)
    for f in fields(Settings):
        env = f.metadata.get("env")
        if not env or env not in environ or f.name in values:
            continue
        raw = environ[env]
        kind = f.metadata.get("kind")
        if kind == "flag":
            if raw.lower() in TRUTHY:
                values[f.name] = True
            continue
        if kind in ("append", "keys"):
            values[f.name] = tuple(p for p in raw.split(",") if p)
        else:
            values[f.name] = _convert(f, raw, env)
    settings = Settings(**values)
    return _finish(settings)


def process_escapes(text: str) -> str:
    """Upstream's string_process_escapes, on the UTF-8 bytes: \\n \\r \\t \\' \\" \\\\ and \\xNN;
    any other backslash pair stays as it is."""
    data, out, i = text.encode(), bytearray(), 0
    simple = {ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("'"): 39, ord('"'): 34, ord("\\"): 92}
    while i < len(data):
        if data[i] == 92 and i + 1 < len(data):
            i += 1
            c = data[i]
            if c in simple:
                out.append(simple[c])
            elif c == ord("x") and i + 2 < len(data) and \
                    all(chr(b) in "0123456789abcdefABCDEF" for b in data[i + 1:i + 3]):
                out.append(int(data[i + 1:i + 3], 16))
                i += 2
            else:
                out += bytes([92, c])
        else:
            out.append(data[i])
        i += 1
    return out.decode("utf-8", "replace")


def _finish(s: Settings) -> Settings:
    if s.parallel == 0 or s.parallel < -1:
        raise FlagError("--parallel must be >= 1 (or -1 for auto)")
    changes = {}
    if s.parallel == -1:
        # upstream's auto: 4 slots sharing one unified KV pool
        changes["parallel"] = 4
        if s.kv_unified is None:
            changes["kv_unified"] = True
    if s.reranking:
        changes.update(embedding=True, pooling="rank")
    if s.escape:  # common_params_parse_ex: the stop strings and DRY breakers of the command line
        changes["reverse_prompt"] = tuple(process_escapes(r) for r in s.reverse_prompt)
        changes["dry_sequence_breaker"] = tuple(process_escapes(b) for b in s.dry_sequence_breaker)
    if s.api_key_file:
        try:
            with open(s.api_key_file, encoding="utf-8") as fh:
                keys = [ln.strip() for ln in fh if ln.strip() and not ln.lstrip().startswith("#")]
        except OSError as exc:
            raise FlagError(f"cannot read --api-key-file: {exc}") from None
        changes["api_key"] = tuple(s.api_key) + tuple(keys)
    for name in ("grammar_file", "json_schema_file", "chat_template_file", "ui_config_file"):
        path = getattr(s, name)
        if path:
            try:
                with open(path, encoding="utf-8") as fh:
                    changes[name.rsplit("_file", 1)[0]] = fh.read()
            except OSError as exc:
                raise FlagError(f"cannot read --{name.replace('_', '-')}: {exc}") from None
    if s.slot_save_path and not os.path.isdir(s.slot_save_path):
        raise FlagError(f"--slot-save-path {s.slot_save_path}: not a folder")
    try:
        s.kv_override_map()
        for path, _ in s.lora_list():
            if not os.path.isfile(path):
                raise ValueError(f"LoRA adapter not found: {path}")
    except ValueError as exc:
        raise FlagError(str(exc)) from None
    ui = changes.get("ui_config", s.ui_config)
    if ui:
        try:
            if not isinstance(json.loads(ui), dict):
                raise ValueError
        except ValueError:
            raise FlagError("--ui-config must be a JSON object") from None
    if s.tensor_split:
        try:
            [float(x) for x in s.tensor_split.replace("/", ",").split(",")]
        except ValueError:
            raise FlagError(f"invalid value for --tensor-split: {s.tensor_split!r}") from None
    if s.device and not [d for d in s.device.split(",") if d]:
        raise FlagError("error while handling argument \"--device\": no devices specified")
    if s.n_gpu_layers not in ("auto", "all"):
        try:
            int(s.n_gpu_layers)
        except ValueError:
            raise FlagError(f"invalid value for --n-gpu-layers: {s.n_gpu_layers!r}") from None
    return replace(s, **changes) if changes else s


def server_help() -> str:
    lines = ["usage: pyllama-server [options]", "",
             "llama-server's flags; each may also come from its environment variable.", ""]
    for f in fields(Settings):
        meta = f.metadata
        names = ", ".join(list(meta["names"]) + list(meta.get("neg", ())))
        env = f" (env: {meta['env']})" if meta.get("env") else ""
        lines.append(f"  {names:<44} {meta['help']} [default: {f.default}]{env}")
    lines += ["", "  -h, --help                                   this help", 
              "  --version                                    pyllama and llama.cpp versions",
              "  --list-devices                               print list of available devices and exit",
              "  --completion-bash                            print a bash completion script and exit"]
    return "\n".join(lines)


def completion_bash(executables=("pyllama-server", "llama-server", "pyllama")) -> str:
    """--completion-bash: a bash completion script for these flags, as upstream's
    common_params_print_completion writes it (file completion for -m, grammars, templates)."""
    names = []
    for f in fields(Settings):
        names += [*f.metadata["names"], *f.metadata.get("neg", ())]
    names += ["-h", "--help", "--usage", "--version", "--list-devices", "--completion-bash"]
    lines = [
        "_llama_completions() {",
        "    local cur prev opts",
        "    COMPREPLY=()",
        '    cur="${COMP_WORDS[COMP_CWORD]}"',
        '    prev="${COMP_WORDS[COMP_CWORD-1]}"',
        "",
        '    opts="' + " ".join(names) + ' "',
        "",
        '    case "$prev" in',
    ]
    for flags, pattern in (("--model|-m", "*.gguf"), ("--grammar-file", "*.gbnf"),
                           ("--chat-template-file", "*.jinja")):
        lines += [f"        {flags})",
                  f"            COMPREPLY=( $(compgen -f -X '!{pattern}' -- \"$cur\") $(compgen -d -- \"$cur\") )",
                  "            return 0", "            ;;"]
    lines += ["        *)", '            COMPREPLY=( $(compgen -W "${opts}" -- "$cur") )', "            return 0",
              "            ;;", "    esac", "}", ""]
    lines += [f"complete -F _llama_completions {exe}" for exe in executables]
    return "\n".join(lines) + "\n"
