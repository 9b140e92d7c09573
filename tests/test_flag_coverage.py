"""pyllama-server's flags against upstream's arg table (vendor/llama.cpp/common/arg.cpp).

The table is parsed from the vendored source, so bumping llama.cpp (or implementing a flag)
shows up here: tests/data/llama_server_flags_pending.txt lists the upstream llama-server
options pyllama neither accepts nor refuses by name yet, one per line.
"""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import llama_server_flags as table  # noqa: E402

from pyllama.flags import UNSUPPORTED  # noqa: E402
from pyllama.settings import Settings  # noqa: E402

PENDING = Path(__file__).parent / "data" / "llama_server_flags_pending.txt"
# ours only: llama-server's older spellings (upstream now has --load-mode) and the body limit
OURS_ONLY = {"--mmap", "--no-mmap", "--mlock", "--max-body-mb"}


def _by_name() -> dict:
    return {table._normal(n): f for f in table.server_flags() for n in f.names}


def test_the_arg_table_parses():
    flags = table.server_flags()
    assert len(flags) > 200
    by_name = _by_name()
    assert by_name["--ctx-size"].names == ("-c", "--ctx-size") and by_name["-c"].env == "LLAMA_ARG_CTX_SIZE"
    assert by_name["--no-context-shift"].names[:2] == ("--context-shift", "--no-context-shift")
    assert "--offline" in by_name and "--log-file" in by_name
    # examples-only options are left out, as common_params_parser_init leaves them out
    assert "--draft-p-split" in by_name and "-ppl-stride" not in by_name and "--ppl-stride" not in by_name


def test_every_flag_we_take_is_upstreams_with_its_variable():
    by_name = _by_name()
    for f in fields(Settings):
        for name in (*f.metadata["names"], *f.metadata.get("neg", ())):
            if name in OURS_ONLY:
                continue
            assert name in by_name, f"{name} is not a llama-server flag upstream"
            assert f.metadata.get("env") == by_name[name].env, f"{name}: {f.metadata.get('env')} vs upstream"
    for name in UNSUPPORTED:
        assert name in by_name, f"{name} is refused by name but is not a llama-server flag"


def test_every_spelling_of_an_accepted_flag_is_accepted():
    assert not [f.names for f in table.partition()["partly"]]


def test_flags_not_yet_handled_are_the_known_list():
    pending = [line.strip() for line in PENDING.read_text().splitlines() if line.strip()]
    unknown = [" ".join(f.names) for f in table.partition()["unknown"]]
    added, gone = sorted(set(unknown) - set(pending)), sorted(set(pending) - set(unknown))
    assert not added and not gone, (
        f"upstream flags pyllama does not handle, missing from {PENDING.name}: {added}; "
        f"listed but now handled (or gone upstream), remove them: {gone}")
