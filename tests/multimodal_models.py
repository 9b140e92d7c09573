"""A tiny random-weight vision projector for the default model, made with transformers + torch.

Test models cannot be downloaded, so the vision half of a Gemma 3 VLM is built here: a
SigLIP tower (2 layers, 32 wide, 64x64 images in 16x16 patches) and Gemma 3's projector onto
the text width of gemma-3-270m (640), 4 tokens per image (upstream's converter handles such
"tinygemma3" test models: proj_scale_factor). It is saved as a Hugging Face folder and
converted by the vendored convert_hf_to_gguf.py --mmproj; the text model is the real default
model, whose vocabulary has Gemma 3's <start_of_image> / <end_of_image>. The weights are
seeded, so the GGUF is the same every time; it is cached beside the embedding test models.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONVERTER = ROOT / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
SEED = 20261202
TEXT_WIDTH = 640  # gemma-3-270m's n_embd
IMAGE_SIZE = 64
PATCH_SIZE = 16
TOKENS_PER_IMAGE = 4


def _cache() -> Path:
    from pyllama.models import cache_dir

    path = cache_dir() / "test-models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _save_folder(folder: Path, model, prefixes: tuple, rename=None) -> None:
    """An HF checkpoint folder of `model`'s tensors under `prefixes` (the encoder and its
    projector: what `convert_hf_to_gguf.py --mmproj` reads) and its config.json."""
    from safetensors.torch import save_file

    tensors = {}
    for name, value in model.state_dict().items():
        for prefix in prefixes:
            at = name.find(prefix)
            if at >= 0:
                key = name[at:]
                tensors[rename(key) if rename else key] = value.detach().clone().contiguous()
    assert tensors, f"no {prefixes} tensors in the state dict"
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg["architectures"] = [type(model).__name__]
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))


def _hf_folder(folder: Path) -> None:
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(SEED)
    config = Gemma3Config(
        text_config=dict(hidden_size=TEXT_WIDTH, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=32,
                         vocab_size=262144),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
                           vision_use_head=False),
        mm_tokens_per_image=TOKENS_PER_IMAGE)
    model = Gemma3ForConditionalGeneration(config).eval()

    def transformers4_name(key: str) -> str:  # the checkpoint layout the converter reads
        if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
            return "vision_tower.vision_model." + key[len("vision_tower."):]  # transformers 5
        return key

    _save_folder(folder, model, ("vision_tower.", "multi_modal_projector."), transformers4_name)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "image_seq_length": TOKENS_PER_IMAGE,
        "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}}))


def tiny_gemma3_mmproj() -> Path:
    """The mmproj GGUF (F32) of the tiny vision tower, built and converted once."""
    return _convert(_hf_folder, "tiny-gemma3")


def _audio_folder(folder: Path) -> None:
    import torch
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    torch.manual_seed(SEED)
    config = Qwen2AudioConfig(
        # 3 layers: the converter maps audio_tower.conv{1,2} through the block ids, which
        # stop at the layer count
        audio_config=dict(d_model=32, encoder_layers=3, encoder_attention_heads=2, encoder_ffn_dim=64,
                          num_mel_bins=128, max_source_positions=1500),
        text_config=dict(hidden_size=TEXT_WIDTH, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, vocab_size=1024))
    model = Qwen2AudioForConditionalGeneration(config).eval()
    _save_folder(folder, model, ("audio_tower.", "multi_modal_projector."))


def _convert(make, name: str) -> Path:
    out = _cache() / f"{name}-mmproj-{SEED}-f32.gguf"
    if out.exists():
        return out
    folder = _cache() / f"{name}-{SEED}"
    shutil.rmtree(folder, ignore_errors=True)
    make(folder)
    tmp = out.with_suffix(".tmp.gguf")
    proc = subprocess.run([sys.executable, str(CONVERTER), str(folder), "--mmproj", "--outfile",
                           str(tmp), "--outtype", "f32"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError("convert_hf_to_gguf.py --mmproj failed:\n" + proc.stderr[-4000:])
    tmp.rename(out)
    return out


def tiny_qwen2_audio_mmproj() -> Path:
    """The mmproj GGUF (F32) of a tiny random Qwen2-Audio (Whisper) encoder onto the default
    model's width: audio in prompts, 16 kHz, as libmtmd's qwen2a takes it."""
    return _convert(_audio_folder, "tiny-qwen2-audio")


MROPE_TEXT_WIDTH = 64  # the synthetic qwen2vl text model's n_embd (SyntheticSpec's default)


def _qwen2vl_folder(folder: Path) -> None:
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(SEED)
    config = Qwen2VLConfig(
        text_config=dict(hidden_size=MROPE_TEXT_WIDTH, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=1024,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        # depth 3: the converter maps merger.mlp.{0,2} through the block ids, which stop at the depth
        vision_config=dict(depth=3, embed_dim=32, hidden_size=MROPE_TEXT_WIDTH, num_heads=2, mlp_ratio=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3))
    model = Qwen2VLForConditionalGeneration(config).eval()
    _save_folder(folder, model, ("visual.",))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "merge_size": 2,
        "temporal_patch_size": 2}))


def tiny_qwen2vl() -> tuple[Path, Path]:
    """A Qwen2-VL pair whose media take M-RoPE positions: (text model, mmproj), both F32. The text
    model is synthetic (pyllama.synthetic, the qwen2vl architecture: M-RoPE sections 2/3/3); the
    projector a tiny random Qwen2-VL vision tower (3 blocks, 14 px patches merged 2x2) converted
    by convert_hf_to_gguf.py --mmproj. An image of W x H pixels is (W/28)*(H/28) tokens at
    max(W/28, H/28) positions."""
    from pyllama.synthetic import SyntheticSpec, write_synthetic_model

    text = _cache() / f"tiny-qwen2vl-text-{SEED}-f32.gguf"
    if not text.exists():
        tmp = text.with_suffix(".tmp.gguf")
        write_synthetic_model(tmp, SyntheticSpec(n_embd=MROPE_TEXT_WIDTH, mrope_sections=(2, 3, 3, 0)))
        tmp.rename(text)
    return text, _convert(_qwen2vl_folder, "tiny-qwen2vl")


def wav(seconds: float = 1.0, rate: int = 16000, freq: float = 440.0) -> bytes:
    """A mono 16-bit PCM WAV of a sine tone (the stdlib's wave module)."""
    import io
    import math
    import struct
    import wave

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"".join(struct.pack("<h", int(12000 * math.sin(2 * math.pi * freq * i / rate)))
                               for i in range(int(seconds * rate))))
    return buf.getvalue()


def png(width: int, height: int, seed: int = 0) -> bytes:
    """A real RGB PNG of random pixels (zlib + the PNG chunk layout, no imaging library)."""
    import random
    import struct
    import zlib

    rng = random.Random(seed)
    rows = b"".join(b"\x00" + bytes(rng.getrandbits(8) for _ in range(width * 3)) for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def huge_png(width: int, height: int) -> bytes:
    """A PNG header and a little data claiming width x height (a decompression bomb's shape)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + b"\x00" * (width * 3)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(row * 4)) + chunk(b"IEND", b""))


if __name__ == "__main__":
    print(tiny_gemma3_mmproj())
    print(tiny_qwen2_audio_mmproj())
