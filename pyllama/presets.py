"""llama-server's preset flags (--fim-qwen-7b-default, --gpt-oss-20b-default, ...) as data.

Each preset is what its handler in upstream's common/arg.cpp ("// presets") sets, written as
Settings field values; flags.py applies them where the flag stands on the command line, so
later flags override a preset and a preset overrides earlier flags and LLAMA_ARG_* variables,
as upstream's handlers do. What a preset sets that pyllama does not have (a draft model for
speculative decoding) is listed in `unapplied` and
logged at start-up (downloads.prepare_model) instead of failing.
Imports: stdlib only.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    """One preset flag: the Settings values it sets, and what pyllama cannot apply."""

    values: dict = field(default_factory=dict)
    unapplied: tuple = ()


# the Qwen 2.5 Coder 0.5B draft of the *-spec presets (-hfd with -md as its file, as upstream sets
# draft.mparams); upstream sets no --spec-type, so it drafts only with --spec-type draft-simple
_DRAFT = dict(spec_draft_hf="ggml-org/Qwen2.5-Coder-0.5B-Q8_0-GGUF", spec_draft_model="qwen2.5-coder-0.5b-q8_0.gguf")


def _fim(repo: str, file: str, draft: dict | None = None) -> Preset:
    return Preset(dict(hf_repo=repo, hf_file=file, port=8012, ubatch_size=1024, batch_size=1024, ctx_size=0,
                       cache_reuse=256, **(draft or {})))


def _gpt_oss(repo: str, file: str = "") -> Preset:
    values = dict(hf_repo=repo, port=8013, ubatch_size=2048, batch_size=32768, parallel=2,
                  ctx_size=131072 * 2, temp=1.0, top_p=1.0, top_k=0, min_p=0.01, jinja=True)
    if file:
        values["hf_file"] = file
    return Preset(values)


def _vision(repo: str) -> Preset:
    return Preset(dict(hf_repo=repo, port=8014, ctx_size=0, jinja=True))  # -hf takes the mmproj


# NOTE(downloads): the order and values of common/arg.cpp's preset handlers; upstream's
# verbose_prompt (--embd-gemma-default) is a llama-cli option that llama-server never reads.
PRESETS = {
    "--embd-gemma-default": Preset(dict(
        hf_repo="ggml-org/embeddinggemma-300M-qat-q4_0-GGUF", hf_file="embeddinggemma-300M-qat-Q4_0.gguf",
        port=8011, ubatch_size=2048, batch_size=2048, parallel=32, ctx_size=2048 * 32, embedding=True)),
    "--fim-qwen-1.5b-default": _fim("ggml-org/Qwen2.5-Coder-1.5B-Q8_0-GGUF", "qwen2.5-coder-1.5b-q8_0.gguf"),
    "--fim-qwen-3b-default": _fim("ggml-org/Qwen2.5-Coder-3B-Q8_0-GGUF", "qwen2.5-coder-3b-q8_0.gguf"),
    "--fim-qwen-7b-default": _fim("ggml-org/Qwen2.5-Coder-7B-Q8_0-GGUF", "qwen2.5-coder-7b-q8_0.gguf"),
    "--fim-qwen-7b-spec": _fim("ggml-org/Qwen2.5-Coder-7B-Q8_0-GGUF", "qwen2.5-coder-7b-q8_0.gguf", _DRAFT),
    "--fim-qwen-14b-spec": _fim("ggml-org/Qwen2.5-Coder-14B-Q8_0-GGUF", "qwen2.5-coder-14b-q8_0.gguf", _DRAFT),
    "--fim-qwen-30b-default": _fim("ggml-org/Qwen3-Coder-30B-A3B-Instruct-Q8_0-GGUF",
                                   "qwen3-coder-30b-a3b-instruct-q8_0.gguf"),
    "--gpt-oss-20b-default": _gpt_oss("ggml-org/gpt-oss-20b-GGUF", "gpt-oss-20b-mxfp4.gguf"),
    "--gpt-oss-120b-default": _gpt_oss("ggml-org/gpt-oss-120b-GGUF"),
    "--vision-gemma-4b-default": _vision("ggml-org/gemma-3-4b-it-qat-GGUF"),
    "--vision-gemma-12b-default": _vision("ggml-org/gemma-3-12b-it-qat-GGUF"),
    "--spec-default": Preset(dict(spec_type=("ngram-mod",), spec_ngram_mod_n_match=24, spec_ngram_mod_n_min=48,
                                  spec_ngram_mod_n_max=64)),
}
