"""llama-server's command line -> Settings: flags, aliases, LLAMA_ARG_* variables, checks.

Long and short forms, `_` for `-` in long names, the same defaults as upstream
(common/arg.cpp); a llama-server flag pyllama does not support is refused by name.
Used by the CLI and by the gunicorn entry point (server/wsgi.py) alike.
Imports: `settings`, `presets` and the stdlib.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import fields, replace

from pyllama.presets import PRESETS
from pyllama.settings import Settings

TRUTHY = {"true", "1", "on", "enabled"}
FALSY = {"false", "0", "off", "disabled"}
TRISTATE = {**{v: "on" for v in ("on", "enabled", "true", "1")},
            **{v: "off" for v in ("off", "disabled", "false", "0")},
            "auto": "auto", "-1": "auto"}

# llama-server flags whose feature pyllama does not have yet, by feature: refused by name, so a
# launch line written for llama-server says what is missing instead of "invalid argument".
REFUSED_FEATURES = {
    "agent and MCP tools": "--tools --mcp-servers-config --agent -ag --ui-mcp-proxy "
                           "--webui-mcp-proxy --no-ui-mcp-proxy --no-webui-mcp-proxy "
                           "--tools-runtime --mcp-servers-json",
}
UNSUPPORTED = {name: feature for feature, names in REFUSED_FEATURES.items() for name in names.split()}


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
                raise FlagError(f"{name} is a llama-server flag that pyllama does not support yet "
                                f"({UNSUPPORTED[name]})")
            raise FlagError(f"invalid argument: {token}")
        f, positive = table[name]
        kind = f.metadata.get("kind")
        if kind == "removed":  # arg_removed
            raise FlagError(f'error while handling argument "{name}": the argument has been removed. '
                            f'{f.metadata["help"]}')
        takes_value = positive and kind not in ("flag",) and f.type not in ("bool", "bool | None")
        if not takes_value:
            if eq:
                raise FlagError(f"{name} takes no value")
            values[f.name] = positive
            if kind == "preset":  # upstream's preset handlers set these where the flag stands
                values.update(PRESETS[name].values)
            continue
        if eq:
            raw = inline
        elif i < len(argv):
            raw = argv[i]
            i += 1
        else:
            raise FlagError(f"expected value for argument {name}")
        if kind == "pair":  # two values, as upstream's START END options
            if i >= len(argv):
                raise FlagError(f"expected value for argument {name}")
            try:
                values[f.name] = (int(raw), int(argv[i]))
            except ValueError:
                raise FlagError(f"invalid value for {name}: {raw!r} {argv[i]!r}") from None
            i += 1
            continue
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
        if kind == "removed":
            raise FlagError(f'error while handling environment variable "{env}": the argument has been '
                            f'removed. {f.metadata["help"]}')
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


GGML_MAX_N_THREADS = 512


def _check_cpu(s: Settings) -> None:
    """arg.cpp's checks of the CPU placement flags (parse_cpu_mask, parse_cpu_range, --prio)."""
    for flag, mask in (("-C", s.cpu_mask), ("-Cb", s.cpu_mask_batch)):
        digits = mask[2:] if mask.startswith("0x") else mask
        if mask and any(c not in "0123456789abcdefABCDEF" for c in digits[:128]):
            raise FlagError(f'error while handling argument "{flag}": invalid cpumask')
    for flag, rng in (("-Cr", s.cpu_range), ("-Crb", s.cpu_range_batch)):
        if not rng:
            continue
        lo, dash, hi = rng.partition("-")
        try:
            if not dash or any(int(v) >= GGML_MAX_N_THREADS for v in (lo, hi) if v):
                raise ValueError
        except ValueError:
            raise FlagError(f'error while handling argument "{flag}": invalid range') from None
    if not -1 <= s.prio <= 3:
        raise FlagError('error while handling argument "--prio": invalid value')
    if not 0 <= s.prio_batch <= 3:
        raise FlagError('error while handling argument "--prio-batch": invalid value')


def _check_placement(s: Settings) -> None:
    """arg.cpp's checks of -ot, --n-cpu-moe/-ffn and the --fit flags."""
    for item in s.override_tensor:
        if "=" not in item:
            raise FlagError('error while handling argument "-ot": invalid value')
    for flag, n in (("-ncmoe", s.n_cpu_moe), ("-ncffn", s.n_cpu_ffn)):
        if n < 0:
            raise FlagError(f'error while handling argument "{flag}": invalid value')
    if s.fit not in ("on", "off"):
        raise FlagError(f"error: unknown value for --fit: '{s.fit}'")
    try:
        targets = [int(v) for v in s.fit_target.replace("/", ",").split(",") if v]
        if not targets or min(targets) < 0:
            raise ValueError
    except ValueError:
        raise FlagError(f'error while handling argument "-fitt": invalid value {s.fit_target!r}') from None
    if s.sleep_idle_seconds == 0 or s.sleep_idle_seconds < -1:  # not placement: arg.cpp's check
        raise FlagError('error while handling argument "--sleep-idle-seconds": '
                        'invalid value: cannot be 0 or less than -1')
    if s.checkpoint_min_step < 0:
        raise FlagError('error while handling argument "--checkpoint-min-step": '
                        'checkpoint-min-step must be non-negative')


SPEC_TYPES = ("none", "draft-simple", "draft-eagle3", "draft-mtp", "draft-dflash", "draft-dspark", "ngram-simple",
              "ngram-map-k", "ngram-map-k4v", "ngram-mod", "ngram-cache")


def _check_speculative(s: Settings) -> None:
    """arg.cpp's checks of the --spec-* flags, with its messages."""
    def bad(flag, msg="invalid value"):
        return FlagError(f'error while handling argument "{flag}": {msg}')
    for name in s.spec_type:
        if name not in SPEC_TYPES:
            raise bad("--spec-type", f"unknown speculative type: {name}")
    if s.spec_draft_n_max < 0:
        raise bad("--spec-draft-n-max")
    for flag, n, lo in (("--spec-ngram-mod-n-min", s.spec_ngram_mod_n_min, 0),
                        ("--spec-ngram-mod-n-max", s.spec_ngram_mod_n_max, 0)):
        if not lo <= n <= 1024:
            raise bad(flag, f"ngram {flag.rsplit('-', 2)[-2]}-{flag.rsplit('-', 1)[-1]} must be between 0 and "
                            "1024 inclusive")
    if not 1 <= s.spec_ngram_mod_n_match <= 1024:
        raise bad("--spec-ngram-mod-n-match", "ngram size N must be between 1 and 1024 inclusive")
    for kind in ("simple", "map_k", "map_k4v"):
        flag = "--spec-ngram-" + kind.replace("_", "-")
        for part in ("n", "m"):
            if not 1 <= getattr(s, f"spec_ngram_{kind}_size_{part}") <= 1024:
                raise bad(f"{flag}-size-{part}", f"ngram size {part.upper()} must be between 1 and 1024 inclusive")
        if getattr(s, f"spec_ngram_{kind}_min_hits") < 1:
            raise bad(f"{flag}-min-hits", "ngram min hits must be at least 1")
    for flag, mask in (("--spec-draft-cpu-mask", s.spec_draft_cpu_mask),
                       ("--spec-draft-cpu-mask-batch", s.spec_draft_cpu_mask_batch)):
        digits = mask[2:] if mask.startswith("0x") else mask
        if mask and any(c not in "0123456789abcdefABCDEF" for c in digits[:128]):
            raise bad(flag, "invalid cpumask")
    if s.spec_draft_cpu_range:
        lo, dash, hi = s.spec_draft_cpu_range.partition("-")
        try:
            if not dash or any(int(v) >= GGML_MAX_N_THREADS for v in (lo, hi) if v):
                raise ValueError
        except ValueError:
            raise bad("--spec-draft-cpu-range", "invalid range") from None
    for flag, prio in (("--spec-draft-prio", s.spec_draft_prio), ("--spec-draft-prio-batch", s.spec_draft_prio_batch)):
        if not 0 <= prio <= 3:
            raise bad(flag)
    if s.spec_draft_n_cpu_moe < 0:
        raise bad("--spec-draft-n-cpu-moe")
    for item in s.spec_draft_override_tensor:
        if "=" not in item:
            raise bad("--spec-draft-override-tensor")
    if s.spec_synth_len:
        try:
            if float(s.spec_synth_len.strip()) == -1.0:
                raise ValueError
        except ValueError:
            raise bad("--spec-synth-len") from None
    if s.spec_synth_rates:
        try:
            [float(v.strip()) for v in s.spec_synth_rates.split(",")]
        except ValueError:
            raise bad("--spec-synth-rates") from None


def _finish(s: Settings) -> Settings:
    _check_cpu(s)
    _check_placement(s)
    _check_speculative(s)
    if s.reasoning_budget < -1:
        raise FlagError('error while handling argument "--reasoning-budget": invalid value')
    for item in s.control_vector_scaled:
        path, colon, scale = item.partition(":")
        try:
            if not colon or ":" in scale:
                raise ValueError
            float(scale)
        except ValueError:
            raise FlagError('error while handling argument "--control-vector-scaled": '
                            "control-vector-scaled format: FNAME:SCALE") from None
    if not [h for h in s.host.split(",") if h.strip()]:
        raise FlagError('error while handling argument "--host": --host requires at least one address')
    if s.port == 0 and len([h for h in s.host.split(",") if h.strip() and not h.strip().endswith(".sock")]) > 1:
        raise FlagError("--port 0 is not supported with multiple TCP addresses")
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
    if s.media_path:  # arg.cpp's --media-path handler: a folder, kept with a trailing separator
        if not os.path.isdir(s.media_path):
            raise FlagError(f'error while handling argument "--media-path": not a directory: {s.media_path}')
        if not s.media_path.endswith(os.sep):
            changes["media_path"] = s.media_path + os.sep
    if s.mmproj_device and s.mmproj_device != "none" and "," in s.mmproj_device.strip(","):
        # arg.cpp's -mmdev handler: parse_device_list, one device at most
        raise FlagError('error while handling argument "-mmdev": only one device may be specified for mmproj')
    if s.mmproj_device:
        changes["mmproj_device"] = s.mmproj_device.strip(",")
    if s.path and s.webui and not os.path.isdir(s.path):  # server_http_context::init
        raise FlagError(f"static assets path not found: {s.path}")
    if s.log_prompts_dir:  # arg.cpp creates the folder, and only warns when it cannot
        try:
            os.makedirs(s.log_prompts_dir, exist_ok=True)
        except OSError as exc:
            sys.stderr.write(f"warning: failed to create prompts-log-dir '{s.log_prompts_dir}': {exc.strerror}\n")
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
    if s.rpc:  # arg.cpp's --rpc; the servers themselves are reached where the model loads
        servers = [x for x in s.rpc.split(",") if x]
        if not servers:
            raise FlagError("error while handling argument \"--rpc\": no RPC servers specified")
        for server in servers:  # what ggml-rpc's parse_endpoint would abort on
            host, _, port = server.partition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise FlagError(f"error while handling argument \"--rpc\": invalid RPC server "
                                f"'{server}' (expected HOST:PORT)")
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
