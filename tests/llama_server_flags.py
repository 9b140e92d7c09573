"""Upstream's llama-server flags, read from the vendored common/arg.cpp, against ours.

`python tests/llama_server_flags.py` prints which upstream flags pyllama accepts, refuses by
name, or does not know yet; tests/test_flag_coverage.py holds the "not yet" list steady, so a
llama.cpp bump (or a flag implemented) shows up as a diff.

An option applies to llama-server when its examples include LLAMA_EXAMPLE_SERVER or
LLAMA_EXAMPLE_COMMON (the default) and its excludes do not name the server
(common_params_parser_init's add_opt filter).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARG_CPP = ROOT / "vendor" / "llama.cpp" / "common" / "arg.cpp"
# handled by pyllama-server itself, before the flags become Settings (cli.server_main)
CLI_ONLY = {"-h", "--help", "--usage", "--version", "--list-devices", "--completion-bash"}


@dataclass(frozen=True)
class UpstreamFlag:
    names: tuple  # every spelling, negative forms included
    env: str | None
    examples: frozenset
    excludes: frozenset

    @property
    def for_server(self) -> bool:
        return bool(self.examples & {"SERVER", "COMMON"}) and "SERVER" not in self.excludes


def _strip(text: str) -> str:
    """The source with comments removed and string literals kept intact."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            i = text.find("\n", i)
            i = n if i < 0 else i
        elif text.startswith("/*", i):
            i = text.find("*/", i) + 2
        elif c in "\"'":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            out.append(text[i:j + 1])
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _balanced(text: str, start: int) -> int:
    """The index just past the parenthesis that closes the one at `start`."""
    depth, i = 0, start
    while i < len(text):
        c = text[i]
        if c in "\"'":
            j = i + 1
            while text[j] != c:
                j += 2 if text[j] == "\\" else 1
            i = j + 1
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise ValueError("unbalanced parentheses in arg.cpp")


_STRINGS = re.compile(r'"((?:[^"\\]|\\.)*)"')
_BRACED_STRINGS = re.compile(r'\s*\{\s*("(?:[^"\\]|\\.)*"(?:\s*,\s*"(?:[^"\\]|\\.)*")*)\s*\}')


def upstream_flags(path: Path = ARG_CPP) -> list[UpstreamFlag]:
    text = _strip(path.read_text())
    flags = []
    for match in re.finditer(r"add_opt\(\s*common_arg\(", text):
        end = _balanced(text, match.start() + len("add_opt"))
        expr = text[match.start():end]
        args = expr[expr.index("common_arg(") + len("common_arg("):]
        names = []
        pos = 0
        for _ in range(2):  # the names, then the negative forms if a second list follows
            group = _BRACED_STRINGS.match(args, pos)
            if not group:
                break
            names += _STRINGS.findall(group.group(1))
            pos = group.end()
            if not args[pos:].lstrip().startswith(","):
                break
            pos = args.index(",", pos) + 1
        env = re.search(r'\.set_env\(\s*"([^"]+)"', expr)
        examples = re.search(r"\.set_examples\(\s*\{([^}]*)\}", expr)
        excludes = re.search(r"\.set_excludes\(\s*\{([^}]*)\}", expr)

        def kinds(m):
            return frozenset(re.findall(r"LLAMA_EXAMPLE_(\w+)", m.group(1))) if m else frozenset()

        flags.append(UpstreamFlag(tuple(names), env.group(1) if env else None,
                                  kinds(examples) or frozenset({"COMMON"}), kinds(excludes)))
    return flags


def server_flags() -> list[UpstreamFlag]:
    return [f for f in upstream_flags() if f.for_server and f.names]


def ours() -> tuple[set, set]:
    """(names pyllama-server accepts, names it refuses by name)."""
    from pyllama.flags import UNSUPPORTED
    from pyllama.settings import Settings

    accepted = set(CLI_ONLY)
    for f in fields(Settings):
        accepted.update(f.metadata["names"])
        accepted.update(f.metadata.get("neg", ()))
    return accepted, set(UNSUPPORTED)


def _normal(name: str) -> str:
    from pyllama.flags import _normalise  # the spelling pyllama-server itself looks flags up by

    return _normalise(name)


def partition() -> dict:
    """Upstream's server options split by what pyllama does with them (first name as the key)."""
    accepted, refused = ours()
    out = {"accepted": [], "partly": [], "refused": [], "unknown": []}
    for flag in server_flags():
        names = [_normal(n) for n in flag.names]
        known = [n for n in names if n in accepted]
        if len(known) == len(names):
            out["accepted"].append(flag)
        elif known:
            out["partly"].append(flag)  # some spellings accepted, not all
        elif any(n in refused for n in names):
            out["refused"].append(flag)
        else:
            out["unknown"].append(flag)
    return out


def main() -> int:
    parts = partition()
    total = sum(len(v) for v in parts.values())
    print(f"llama-server options in {ARG_CPP.relative_to(ROOT)}: {total}")
    for kind, flags in parts.items():
        print(f"\n{kind}: {len(flags)}")
        for flag in flags:
            print("  " + " ".join(flag.names) + (f"  [{flag.env}]" if flag.env else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
