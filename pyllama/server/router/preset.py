"""Model presets for the router: upstream's common_preset, over pyllama's flag table.

A preset is a model name and a set of options, each option one flag of the table and its value
as text, as common/preset.cpp keeps them (`std::map<common_arg, std::string>`). Presets come
from four places, cascaded as server_models::load_models does:

- the Hugging Face cache (load_from_cache): one preset per cached `repo:tag`, `-hf repo:tag`;
- `--models-dir` (load_from_models_dir): each `*.gguf` file, and each subfolder holding a model
  (the first shard of a multi-part model, `mmproj*` and draft sidecars beside it);
- `--models-preset FILE.ini` (load_from_ini): one section per model, `[*]` for every model;
- the router's own command line (load_from_args), which overrides everything else.

The INI format is upstream's (parse_ini_from_file's grammar): `[section]` lines, `key = value`
lines where a key is a flag without its dashes (`ctx-size`, `c`), a `no-` form (which negates
the value) or its environment variable (`LLAMA_ARG_CTX_SIZE`); `;` and `#` start comments;
keys before the first section belong to a section named `default`, skipped when empty; the
`version` key is reserved. `load-on-startup`, `stop-timeout` and `dedup-cache-models` exist only
in presets (common_params_add_preset_options). A child's command line is rendered from its
preset as common_preset::to_args does: options in the order of their first name, each written
with its last (long) name, a false flag as its `--no-` form or left out.
Imports: `settings`, `flags` (the refused llama-server flags), `downloads` (the cache), stdlib.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field, fields

from pyllama.flags import UNSUPPORTED
from pyllama.settings import Settings

logger = logging.getLogger(__name__)

DEFAULT_NAME = "default"  # COMMON_PRESET_DEFAULT_NAME
# common/arg.h: the pseudo environment variables of the preset-only options
PRESET_LOAD_ON_STARTUP = "__PRESET_LOAD_ON_STARTUP"
PRESET_STOP_TIMEOUT = "__PRESET_STOP_TIMEOUT"
PRESET_DEDUP_CACHE_MODELS = "__PRESET_DEDUP_CACHE_MODELS"


class PresetError(Exception):
    """A preset file or option the router cannot use (upstream's std::runtime_error)."""


def is_truthy(value: str) -> bool:
    """common_arg_utils::is_truthy."""
    return value in ("on", "enabled", "true", "1")


def is_falsey(value: str) -> bool:
    """common_arg_utils::is_falsey."""
    return value in ("off", "disabled", "false", "0")


@dataclass(frozen=True)
class Option:
    """One flag, as common_arg describes it: names, negated names, variable, whether it takes
    a value. Ordered and compared by its first name (common_arg::operator<)."""

    args: tuple
    args_neg: tuple = ()
    env: str | None = None
    takes_value: bool = True
    preset_only: bool = False
    pair: bool = False  # two values (START END): upstream's to_args cannot render these

    def __lt__(self, other: "Option") -> bool:
        return self.args[0] < other.args[0]

    def env_names(self) -> list:
        """common_arg::get_env: the variable, and its LLAMA_ARG_NO_ twin for a negatable flag."""
        if not self.env:
            return []
        out = [self.env]
        if self.args_neg:
            out.append(self.env.replace("LLAMA_ARG_", "LLAMA_ARG_NO_"))
        return out


def _settings_options() -> list:
    out = []
    for f in fields(Settings):
        meta = f.metadata
        kind = meta.get("kind")
        takes_value = kind != "flag" and f.type not in ("bool", "bool | None")  # as flags.py
        out.append(Option(tuple(meta["names"]), tuple(meta.get("neg", ())), meta.get("env"),
                          takes_value, pair=kind == "pair"))
    # common_params_add_preset_options
    out += [Option(("load-on-startup",), env=PRESET_LOAD_ON_STARTUP, preset_only=True),
            Option(("stop-timeout",), env=PRESET_STOP_TIMEOUT, preset_only=True),
            Option(("dedup-cache-models",), env=PRESET_DEDUP_CACHE_MODELS, preset_only=True)]
    return out


OPTIONS = _settings_options()


def _key_map() -> dict:
    """get_map_key_opt: every variable and every name without its dashes -> its Option."""
    mapping = {}
    for opt in OPTIONS:
        for env in opt.env_names():
            mapping[env] = opt
        for arg in opt.args + opt.args_neg:
            mapping[arg.lstrip("-")] = opt
    return mapping


KEY_TO_OPT = _key_map()
_ARG_TO_OPT = {arg: opt for opt in OPTIONS for arg in opt.args + opt.args_neg}


@dataclass
class Preset:
    """common_preset: a name and its options (Option -> value as text)."""

    name: str = ""
    options: dict = field(default_factory=dict)

    def copy(self) -> "Preset":
        return Preset(self.name, dict(self.options))

    def _find(self, env: str):
        for opt in self.options:
            if opt.env and opt.env == env:
                return opt
        return None

    def set_option(self, env: str, value: str) -> None:
        """Set the option whose variable is `env` (common_preset::set_option)."""
        opt = self._find(env)
        if opt is None:
            if env not in KEY_TO_OPT:
                raise PresetError(f"set_option: option with env '{env}' not found in ctx_params")
            opt = KEY_TO_OPT[env]
        self.options[opt] = value

    def unset_option(self, env: str) -> None:
        opt = self._find(env)
        if opt is not None:
            del self.options[opt]

    def get_option(self, env: str) -> str | None:
        opt = self._find(env)
        return None if opt is None else self.options[opt]

    def merge(self, other: "Preset") -> None:
        """Overwrite with `other`'s options (common_preset::merge)."""
        self.options.update(other.options)

    def sorted_options(self) -> list:
        return sorted(self.options.items(), key=lambda kv: kv[0].args[0])

    def to_args(self, bin_args: list | tuple = ()) -> list:
        """The command line of this preset (common_preset::to_args)."""
        args = list(bin_args)
        for opt, value in self.sorted_options():
            if opt.preset_only:
                continue
            if opt.pair:
                raise PresetError(f"common_preset::to_args(): option '{opt.args[-1]}' has two values, "
                                  "which is not supported yet")
            args.append(opt.args[-1])  # the last name: the long form
            if not opt.takes_value:
                if is_falsey(value):
                    if opt.args_neg:
                        args[-1] = opt.args_neg[-1]
                    else:
                        args.pop()
            else:
                args.append(value)
        return args

    def to_ini(self) -> str:
        """This preset as an INI section (common_preset::to_ini)."""
        lines = [f"[{self.name}]"]
        for opt, value in self.sorted_options():
            lines.append(f"{opt.args[-1].lstrip('-')} = {value.replace(chr(10), chr(92) + chr(10))}")
        return "\n".join(lines) + "\n\n"


# --- the INI file (parse_ini_from_file) -------------------------------------------------------
_NEWLINE = re.compile(r"\r\n|\n|\r")
_EOL = r"[ \t]*(?:[;#].*)?$"
_HEADER = re.compile(r"\[[ \t]*([^\]]+)\]" + _EOL)
_KV = re.compile(r"([a-zA-Z_][a-zA-Z0-9_.\-]*)[ \t]*=[ \t]*(.*?)" + r"(?=[ \t]*(?:[;#]|$))" + _EOL)
_BLANK_OR_COMMENT = re.compile(r"[ \t]*(?:[;#].*)?$")


def parse_ini(text: str, path: str = "") -> dict:
    """Sections -> {key: value}, by upstream's grammar: a line is a header, a key = value pair,
    a comment or blank; anything else makes the whole file invalid."""
    parsed: dict = {}
    section = DEFAULT_NAME
    for line in _NEWLINE.split(text):
        m = _HEADER.match(line)
        if m:
            section = m.group(1)
            parsed[section] = {}  # a repeated header starts the section again, as upstream's map
            continue
        m = _KV.match(line)
        if m:
            parsed.setdefault(section, {})[m.group(1)] = m.group(2)
            continue
        if _BLANK_OR_COMMENT.match(line):
            continue
        raise PresetError(f"failed to parse server config file: {path}")
    return dict(sorted(parsed.items()))  # std::map: sections in name order


def _canonical_tag(tag: str) -> str:
    m = re.search(r"[-.]([A-Z0-9_]+)$", tag, re.I)
    return (m.group(1) if m else tag).upper()


def _parse_bool_arg(opt: Option, key: str, value: str) -> str:
    for neg in opt.args_neg:
        if neg.lstrip("-") == key:
            return "false" if is_truthy(value) else "true"
    return value


def load_from_ini(path: str) -> tuple:
    """The presets of an INI file and its `[*]` section (common_preset_context::load_from_ini).

    Returns:
        (presets by name, the global preset).
    Raises:
        PresetError: a missing or unparseable file, an unknown key.
    """
    if not os.path.exists(path):
        raise PresetError(f"preset file does not exist: {path}")
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            text = fh.read()
    except OSError:
        raise PresetError(f"failed to open server preset file: {path}") from None
    out, global_preset = {}, Preset()
    for section_name, items in parse_ini(text, path).items():
        name = section_name or DEFAULT_NAME
        if name not in ("*", DEFAULT_NAME):
            colon = name.rfind(":")
            if colon >= 0:
                tag = name[colon + 1:]
                if _canonical_tag(tag) != tag:
                    name = name[:colon + 1] + _canonical_tag(tag)
        preset = Preset(name)
        for key, value in items.items():
            if key == "version":  # reserved for future use
                continue
            opt = KEY_TO_OPT.get(key)
            if opt is None:
                for flag in ("--" + key, "-" + key):
                    if flag in UNSUPPORTED:
                        raise PresetError(f"option '{key}' in preset '{name}' is a llama-server flag that "
                                          f"pyllama does not support yet ({UNSUPPORTED[flag]})")
                raise PresetError(f"option '{key}' not recognized in preset '{name}'")
            preset.options[opt] = _parse_bool_arg(opt, key, value) if opt.args_neg else value
        if preset.name == DEFAULT_NAME and not preset.options:
            continue
        if preset.name == "*":
            global_preset = preset
        else:
            out[preset.name] = preset
    return out, global_preset


def load_from_cache() -> dict:
    """One preset per model in the Hugging Face cache, `-hf repo:tag` (load_from_cache)."""
    from pyllama.downloads import cached_models

    out = {}
    try:
        models = cached_models()
    except OSError as exc:
        logger.warning("cannot list the model cache: %s", exc)
        models = []
    for repo, tag in models:
        preset = Preset(f"{repo}:{tag}")
        preset.set_option("LLAMA_ARG_HF_REPO", f"{repo}:{tag}")
        out[preset.name] = preset
    return out


_DRAFT_PREFIXES = ("mtp-", "dspark-", "dflash-")


def _is_mmproj(name: str) -> bool:
    return "mmproj" in name


def _is_draft(name: str) -> bool:
    return name.startswith(_DRAFT_PREFIXES)


def _listdir(path: str) -> list:
    """fs_list: the entries of a folder, sorted by name."""
    return sorted(os.scandir(path), key=lambda e: e.name)


def load_from_models_dir(models_dir: str) -> dict:
    """One preset per model of a --models-dir folder (load_from_models_dir).

    A subfolder's draft sidecar becomes the child's --spec-draft-model, and its mmproj sidecar
    the child's --mmproj, as upstream.
    Raises:
        PresetError: the folder does not exist.
    """
    if not os.path.isdir(models_dir):
        raise PresetError(f"error: '{models_dir}' does not exist or is not a directory\n")
    models = []
    for entry in _listdir(models_dir):
        if entry.is_dir():
            model = first_shard = mmproj = draft = ""
            for f in _listdir(entry.path):
                if not f.name.endswith(".gguf"):
                    continue
                if _is_mmproj(f.name):
                    mmproj = f.path
                elif _is_draft(f.name):
                    draft = draft or f.path  # the first sidecar found wins
                elif "-00001-of-" in f.name:
                    first_shard = f.path
                else:
                    model = f.path
            path = first_shard or model
            if path:
                models.append((entry.name, path, mmproj, draft))
        elif entry.name.endswith(".gguf"):
            if _is_mmproj(entry.name) or _is_draft(entry.name):
                continue  # a companion file cannot be loaded as a model on its own
            models.append((entry.name.replace(".gguf", ""), entry.path, "", ""))
    out = {}
    for name, path, mmproj, draft in models:
        preset = Preset(name)
        preset.set_option("LLAMA_ARG_MODEL", path)
        if draft:  # as upstream, the draft drafts once --spec-type draft-simple asks for it
            preset.set_option("LLAMA_ARG_SPEC_DRAFT_MODEL", draft)
        if mmproj:
            preset.set_option("LLAMA_ARG_MMPROJ", mmproj)
        out[name] = preset
    return out


def load_from_args(argv: list) -> Preset:
    """The router's own command line as a preset (common_params_to_map).

    Flags become "1" (their `--no-` form "0"), a repeated flag keeps its last value.
    Raises:
        PresetError: an argument the table does not know.
    """
    preset = Preset(DEFAULT_NAME)
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        name, eq, inline = token.partition("=") if token.startswith("--") else (token, "", "")
        if name.startswith("--"):
            name = name.replace("_", "-")
        opt = _ARG_TO_OPT.get(name)
        if opt is None:
            raise PresetError(f"error: invalid argument: {token}")
        if opt.pair:
            raise PresetError("error: argument with 2 values is not yet supported\n")
        if not opt.takes_value:
            value = "0" if name in opt.args_neg else "1"
        elif eq:
            value = inline
        else:
            if i >= len(argv):
                raise PresetError("expected value for argument")
            value = argv[i]
            i += 1
        preset.options[opt] = value
    return preset


def cascade(base: Preset, presets: dict) -> dict:
    """Each preset over a copy of `base` (the CSS-like cascade of common_preset_context)."""
    out = {}
    for name, preset in presets.items():
        tmp = base.copy()
        tmp.name = name
        tmp.merge(preset)
        out[name] = tmp
    return out


def unset_reserved_args(preset: Preset, unset_model_args: bool) -> None:
    """What the router owns and never passes on (server-models.cpp unset_reserved_args)."""
    for env in ("LLAMA_ARG_SSL_KEY_FILE", "LLAMA_ARG_SSL_CERT_FILE", "LLAMA_API_KEY", "LLAMA_ARG_API_KEY_FILE",
                "LLAMA_ARG_MODELS_DIR", "LLAMA_ARG_MODELS_MAX", "LLAMA_ARG_MODELS_PRESET",
                "LLAMA_ARG_MODELS_AUTOLOAD"):
        preset.unset_option(env)
    if unset_model_args:
        for env in ("LLAMA_ARG_MODEL", "LLAMA_ARG_MMPROJ", "LLAMA_ARG_ALIAS", "LLAMA_ARG_HF_REPO"):
            preset.unset_option(env)
