"""Random-weight GGUF models shaped like Llama-3.2-1B and Llama-3.1-8B, for speed benchmarks.

Speed is all we measure on them, so the values only have to be sane (small normals, unit norms):
each tensor *shape* gets one random block, shared by every tensor of that shape (all layers, K
and V, gate and up, token_embd and output). Generating 8e9 normals would take minutes; this
takes seconds, and GGUFWriter holds references, not copies, so memory stays at the few distinct
blocks (about 1.3 GB for 8b). The tokenizer is pyllama.synthetic's SPM vocab (bytes and a few word
pieces) padded with unreachable tokens to Llama-3's 128256, plus Llama-3's chat header tokens and
a Llama-3-style chat template, so sampling and chat cost what they cost on the real models.

    python bench/synth_llama.py --shape 1b --out /tmp/models/synth-llama-1b-F16.gguf
    python bench/synth_llama.py --shape 8b --out /tmp/models/synth-llama-8b-Q4_K_M.gguf \
        --quantize Q4_K_M --quantize-bin ../upstream-build/bin/llama-quantize

With --quantize, the F16 file is written beside --out, quantized into --out, then deleted.
Imports: stdlib, numpy, gguf, pyllama.synthetic (pure Python: no compiled pyllama needed).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# pyllama.synthetic from this checkout, installed or not.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pyllama.synthetic import SyntheticSpec, _vocab, add_llama_blocks, add_llama_shape  # noqa: E402

N_VOCAB = 128256  # Llama-3's vocabulary size
# Llama-3's chat header tokens, so the template's markers are single control tokens.
SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>")
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)
WEIGHT_SCALE = 0.02
TOKEN_TYPE_CONTROL = 3


@dataclass(frozen=True)
class LlamaShape:
    """A model shape: pyllama's SyntheticSpec plus what Llama-3 adds to it."""

    spec: SyntheticSpec
    tied_output: bool  # no output.weight: the output projection reuses token_embd
    rope_theta: float = 500000.0
    rope_scale: float = 8.0  # Llama-3 "llama3" rope scaling factor (rope_freqs.weight)


def _shape(name: str, n_embd: int, n_layer: int, n_head: int, n_head_kv: int, n_ff: int,
           tied_output: bool, rope_scale: float) -> LlamaShape:
    spec = SyntheticSpec(n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv,
                         n_ff=n_ff, n_ctx_train=131072, f16=True, name=name)
    return LlamaShape(spec=spec, tied_output=tied_output, rope_scale=rope_scale)


SHAPES = {
    # small enough for CPU tests, with the full vocabulary so sampling costs what it really does
    "tiny": _shape("synth-llama-tiny", 256, 2, 4, 2, 1024, tied_output=False, rope_scale=8.0),
    "1b": _shape("synth-llama-3.2-1b", 2048, 16, 32, 8, 8192, tied_output=True, rope_scale=32.0),
    "8b": _shape("synth-llama-3.1-8b", 4096, 32, 32, 8, 14336, tied_output=False, rope_scale=8.0),
}


def llama3_rope_freqs(head_dim: int, theta: float, factor: float):
    """Return the rope_freqs.weight tensor for Llama-3's "llama3" rope scaling.

    Mirrors LlamaModel.generate_extra_tensors in upstream's convert_hf_to_gguf.py.
    """
    import numpy as np

    low_freq_factor, high_freq_factor, old_context_len = 1.0, 4.0, 8192
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < high_freq_wavelen:
            factors.append(1.0)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return 1.0 / np.array(factors, dtype=np.float32)


def vocab() -> tuple[list[str], list[float], list[int], dict[str, int]]:
    """Return tokens, scores, types and the special tokens' ids, N_VOCAB tokens in all."""
    n_base = len(_vocab(0)[0])
    tokens, scores, types = _vocab(N_VOCAB - n_base - len(SPECIAL_TOKENS))
    special_ids = {}
    for text in SPECIAL_TOKENS:
        special_ids[text] = len(tokens)
        tokens.append(text)
        scores.append(0.0)
        types.append(TOKEN_TYPE_CONTROL)
    assert len(tokens) == N_VOCAB
    return tokens, scores, types, special_ids


class RandomBlocks:
    """One random F16 block per tensor shape, made on first use and shared afterwards."""

    CHUNK = 1 << 24  # elements generated at a time: bounds the float32 scratch to 64 MB

    def __init__(self, seed: int):
        import numpy as np

        self._np = np
        self._rng = np.random.default_rng(seed)
        self._blocks = {}

    def get(self, *shape: int):
        np = self._np
        block = self._blocks.get(shape)
        if block is None:
            block = np.empty(shape, dtype=np.float16)
            flat = block.reshape(-1)
            for start in range(0, flat.size, self.CHUNK):
                stop = min(start + self.CHUNK, flat.size)
                flat[start:stop] = self._rng.standard_normal(stop - start, dtype=np.float32) * WEIGHT_SCALE
            self._blocks[shape] = block
        return block


def write_model(path: Path, shape: LlamaShape) -> Path:
    """Write an F16 llama-architecture GGUF of `shape` with random weights to `path`."""
    import numpy as np
    from gguf import GGUFWriter, LlamaFileType

    spec = shape.spec
    tokens, scores, types, special_ids = vocab()
    head_dim = spec.n_embd // spec.n_head

    writer = GGUFWriter(str(path), "llama")
    add_llama_shape(writer, spec)
    writer.add_vocab_size(len(tokens))
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_file_type(LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(special_ids["<|begin_of_text|>"])
    writer.add_eos_token_id(special_ids["<|end_of_text|>"])
    writer.add_eot_token_id(special_ids["<|eot_id|>"])
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    blocks = RandomBlocks(spec.seed)
    ones = np.ones(spec.n_embd, dtype=np.float32)  # norms stay f32, as converters write them
    norm = lambda n: ones  # noqa: E731 (one array for every norm: they are all n_embd long)
    writer.add_tensor("token_embd.weight", blocks.get(len(tokens), spec.n_embd))
    writer.add_tensor("rope_freqs.weight", llama3_rope_freqs(head_dim, shape.rope_theta, shape.rope_scale))
    writer.add_tensor("output_norm.weight", ones)
    if not shape.tied_output:
        writer.add_tensor("output.weight", blocks.get(len(tokens), spec.n_embd))
    add_llama_blocks(writer, spec, blocks.get, norm)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def quantize(binary: str, src: Path, dst: Path, qtype: str) -> None:
    # NOTE: absolute paths: llama-quantize takes an output name that stoi() can read ("1b-...")
    # for the type and writes ggml-model-F16.gguf instead.
    cmd = [binary, str(src.resolve()), str(dst.resolve()), qtype, str(os.cpu_count() or 1)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"synth_llama: {' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--out", type=Path, required=True, help="the GGUF to write")
    parser.add_argument("--tied", action=argparse.BooleanOptionalAction, default=None,
                        help="share token_embd as the output projection (default: as the real model: "
                             "1b tied, 8b and tiny untied)")
    parser.add_argument("--quantize", metavar="TYPE", help="quantize to TYPE (e.g. Q4_K_M) with llama-quantize")
    parser.add_argument("--quantize-bin", metavar="PATH", help="llama-quantize (default: the one on PATH)")
    args = parser.parse_args(argv)

    shape = SHAPES[args.shape]
    if args.tied is not None:
        shape = LlamaShape(spec=shape.spec, tied_output=args.tied, rope_theta=shape.rope_theta,
                           rope_scale=shape.rope_scale)
    binary = None
    if args.quantize:
        binary = args.quantize_bin or shutil.which("llama-quantize")
        if not binary or not os.access(binary, os.X_OK):
            parser.error("--quantize needs llama-quantize: pass --quantize-bin PATH")
    args.out.parent.mkdir(parents=True, exist_ok=True)

    f16_path = args.out.with_name(args.out.stem + ".f16-tmp.gguf") if args.quantize else args.out
    t0 = time.perf_counter()
    write_model(f16_path, shape)
    t_write = time.perf_counter() - t0
    size_gb = f16_path.stat().st_size / 1e9
    print(f"synth_llama: wrote {f16_path} ({size_gb:.2f} GB F16) in {t_write:.1f} s")
    if args.quantize:
        t0 = time.perf_counter()
        try:
            quantize(binary, f16_path, args.out, args.quantize)
        finally:
            f16_path.unlink(missing_ok=True)
        size_gb = args.out.stat().st_size / 1e9
        print(f"synth_llama: quantized to {args.out} ({size_gb:.2f} GB {args.quantize}) "
              f"in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
