"""Synthetic llama-architecture GGUF models with random weights, for tests and benchmarks.

They exercise every part of the plumbing (load, tokenize, decode, sample) in milliseconds,
and can be made large (a 1B-shaped model) on machines that cannot download one. Needs the
`gguf` and `numpy` packages (the `test` extra). Imports: stdlib, numpy, gguf.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Word pieces after the byte tokens: enough for short English prompts to use real merges.
_PIECES = ["▁", "▁the", "▁a", "▁of", "▁and", "▁to", "▁is", "▁in", "▁it", "▁Hello", "▁world",
           "e", "t", "a", "o", "i", "n", "s", "h", "r", "d", "l", "u", "c", "m", "w", "f", "g",
           "y", "p", "b", "v", "k", "x", "j", "q", "z", "."]


@dataclass(frozen=True)
class SyntheticSpec:
    """The shape of a synthetic model."""

    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    n_ctx_train: int = 2048
    extra_vocab: int = 0  # more (unreachable) tokens, to mimic a large vocabulary
    f16: bool = False
    seed: int = 1234
    chat_template: str | None = None
    fim: bool = False  # add fill-in-the-middle tokens (prefix, suffix, middle)
    # more tokens that the tokenizer keeps whole (user-defined), e.g. ("<think>", "</think>")
    # as reasoning models have them
    special_tokens: tuple = ()
    name: str = "pyllama-synthetic"
    # a sliding attention window: the gemma3 architecture then (its layers are SWA but every
    # sixth, as gemma-3's), whose memory cannot be cut back inside the window
    sliding_window: int = 0
    # M-RoPE (the qwen2vl architecture): the rotary dimensions per position axis (time,
    # height, width, extra), summing to half the head size, as Qwen2-VL's text model
    mrope_sections: tuple = ()


def _vocab(extra: int) -> tuple[list[str], list[float], list[int]]:
    from gguf import TokenType

    tokens = ["<unk>", "<s>", "</s>"]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [TokenType.BYTE] * 256
    tokens += _PIECES
    types += [TokenType.NORMAL] * len(_PIECES)
    tokens += [f"▁tok{i}" for i in range(extra)]
    types += [TokenType.NORMAL] * extra
    # SPM merges prefer higher scores: longer pieces first.
    scores = [0.0] * (3 + 256) + [float(len(p)) for p in _PIECES] + [-1.0] * extra
    return tokens, scores, [int(t) for t in types]


def add_llama_shape(writer, spec: SyntheticSpec) -> None:
    """Write the llama architecture keys for `spec`'s shape to a GGUFWriter."""
    writer.add_name(spec.name)
    writer.add_context_length(spec.n_ctx_train)
    writer.add_embedding_length(spec.n_embd)
    writer.add_block_count(spec.n_layer)
    writer.add_feed_forward_length(spec.n_ff)
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_head_kv)
    writer.add_rope_dimension_count(spec.n_embd // spec.n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    if spec.sliding_window:
        writer.add_sliding_window(spec.sliding_window)
    if spec.mrope_sections:
        writer.add_rope_dimension_sections(list(spec.mrope_sections))


def add_llama_blocks(writer, spec: SyntheticSpec, weight, norm) -> None:
    """Add every transformer block's tensors; `weight(rows, cols)` and `norm(n)` make them."""
    n_embd_kv = spec.n_embd // spec.n_head * spec.n_head_kv
    for i in range(spec.n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", norm(spec.n_embd))
        writer.add_tensor(f"blk.{i}.attn_q.weight", weight(spec.n_embd, spec.n_embd))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weight(n_embd_kv, spec.n_embd))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weight(n_embd_kv, spec.n_embd))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weight(spec.n_embd, spec.n_embd))
        if spec.mrope_sections:  # qwen2's q/k/v biases
            writer.add_tensor(f"blk.{i}.attn_q.bias", weight(spec.n_embd))
            writer.add_tensor(f"blk.{i}.attn_k.bias", weight(n_embd_kv))
            writer.add_tensor(f"blk.{i}.attn_v.bias", weight(n_embd_kv))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", norm(spec.n_embd))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(spec.n_ff, spec.n_embd))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(spec.n_ff, spec.n_embd))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(spec.n_embd, spec.n_ff))
        if spec.sliding_window:  # gemma3's extra norms
            head = spec.n_embd // spec.n_head
            writer.add_tensor(f"blk.{i}.post_attention_norm.weight", norm(spec.n_embd))
            writer.add_tensor(f"blk.{i}.post_ffw_norm.weight", norm(spec.n_embd))
            writer.add_tensor(f"blk.{i}.attn_q_norm.weight", norm(head))
            writer.add_tensor(f"blk.{i}.attn_k_norm.weight", norm(head))


def write_synthetic_model(path: str | Path, spec: SyntheticSpec = SyntheticSpec()) -> Path:
    """Write a random-weight llama GGUF to `path` and return the path."""
    import numpy as np
    from gguf import GGUFWriter, LlamaFileType

    path = Path(path)
    rng = np.random.default_rng(spec.seed)
    dtype = np.float16 if spec.f16 else np.float32
    tokens, scores, types = _vocab(spec.extra_vocab)
    fim_ids = {}
    if spec.fim:
        for key, text in (("pre", "<fim_prefix>"), ("suf", "<fim_suffix>"), ("mid", "<fim_middle>")):
            fim_ids[key] = len(tokens)
            tokens.append(text)
            scores.append(0.0)
            types.append(3)  # CONTROL
    for text in spec.special_tokens:
        tokens.append(text)
        scores.append(0.0)
        types.append(4)  # USER_DEFINED
    n_vocab = len(tokens)

    writer = GGUFWriter(str(path), "gemma3" if spec.sliding_window else "qwen2vl" if spec.mrope_sections else "llama")
    add_llama_shape(writer, spec)
    writer.add_file_type(LlamaFileType.MOSTLY_F16 if spec.f16 else LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    for key, token_id in fim_ids.items():
        writer.add_uint32(f"tokenizer.ggml.fim_{key}_token_id", token_id)
    if spec.chat_template is not None:
        writer.add_chat_template(spec.chat_template)

    def weight(*shape: int, scale: float = 0.05):
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(dtype)

    def norm(n: int):
        return np.ones(n, dtype=np.float32)  # norms stay f32, as converters write them

    writer.add_tensor("token_embd.weight", weight(n_vocab, spec.n_embd, scale=0.5))
    writer.add_tensor("output_norm.weight", norm(spec.n_embd))
    writer.add_tensor("output.weight", weight(n_vocab, spec.n_embd, scale=0.5))
    add_llama_blocks(writer, spec, weight, norm)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_synthetic_lora(path: str | Path, spec: SyntheticSpec = SyntheticSpec(), rank: int = 4,
                         seed: int = 99, scale: float = 1.0) -> Path:
    """Write a random LoRA adapter (on every attn_q and ffn_up) for a synthetic model."""
    import numpy as np
    from gguf import GGUFWriter

    path = Path(path)
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(str(path), "llama")
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(rank))
    for i in range(spec.n_layer):
        for name, n_in, n_out in ((f"blk.{i}.attn_q.weight", spec.n_embd, spec.n_embd),
                                  (f"blk.{i}.ffn_up.weight", spec.n_embd, spec.n_ff)):
            a = (rng.standard_normal((rank, n_in)) * scale).astype(np.float32)
            b = (rng.standard_normal((n_out, rank)) * scale).astype(np.float32)
            writer.add_tensor(name + ".lora_a", a)
            writer.add_tensor(name + ".lora_b", b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_synthetic_control_vector(path: str | Path, n_embd: int = SyntheticSpec.n_embd, layers=(1, 2),
                                   value: float = 0.3, seed: int = 0) -> Path:
    """Write a random control vector: one F32 "direction.<layer>" per layer, as llama.cpp's
    cvector-generator writes them (direction.N steers the output of layer N)."""
    import numpy as np
    from gguf import GGUFWriter

    path = Path(path)
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_uint32("controlvector.layer_count", len(layers))
    for layer in layers:
        writer.add_tensor(f"direction.{layer}", (rng.standard_normal(n_embd) * value).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
