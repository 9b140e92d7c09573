"""Run llama.cpp's own server tests (tools/server/tests/unit) against pyllama-server.

Not part of `make test`: upstream's tests download their models from the Hugging Face Hub and
their images from huggingface.co, and many assert the words of those exact models. Here the Hub
is tests/hub_standin.py on 127.0.0.1 with stand-ins under the same repository names (synthetic
llama models for the stories260K / bge / jina / MoE presets, the default model and a tiny random
Gemma 3 projector for tinygemma3), the test images are random PNGs served on 127.0.0.1, and
LLAMA_SERVER_BIN_PATH points the tests at pyllama-server. So a failure is either a behaviour to
compare with upstream's code or a stand-in that is not the model the test was written for (a
different tokenizer, words, pooling, templates missing from the sdist): read each one.

    python tests/compat/upstream_suite.py [--src DIR] [pytest args, e.g. unit/test_completion.py -k probs]

--src is the whole upstream tree (default: ../upstream-llama.cpp, filled by vendor/fetch.py --all).
Needs upstream's test requirements (tools/server/tests/requirements.txt) in a virtualenv of its
own: --python names it (default: this Python).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

IMAGE_URL = "https://huggingface.co/ggml-org/tinygemma3-GGUF/resolve/main/test/"


def stand_in_files(work: Path) -> dict:
    """{repo: {path: bytes}} for every ServerPreset of upstream's utils.py."""
    from multimodal_models import tiny_gemma3_mmproj

    from pyllama.models import default_model_path
    from pyllama.synthetic import SyntheticSpec, write_synthetic_model

    llama = write_synthetic_model(work / "llama.gguf", SyntheticSpec()).read_bytes()
    fim = write_synthetic_model(work / "fim.gguf", SyntheticSpec(fim=True)).read_bytes()
    return {
        "ggml-org/test-model-stories260K": {"stories260K-f32.gguf": llama},
        "ggml-org/test-model-stories260K-infill": {"stories260K-infill-f32.gguf": fim},
        "ggml-org/models": {"bert-bge-small/ggml-model-f16.gguf": llama,
                            "jina-reranker-v1-tiny-en/ggml-model-f16.gguf": llama},
        "ggml-org/stories15M_MOE": {"stories15M_MOE-F16.gguf": llama},
        "ggml-org/tinygemma3-GGUF": {"tinygemma3-Q8_0.gguf": Path(default_model_path()).read_bytes(),
                                     "mmproj-tinygemma3.gguf": tiny_gemma3_mmproj().read_bytes()},
    }


def serve_images(folder: Path) -> str:
    from multimodal_models import png

    (folder / "91_cat.png").write_bytes(png(64, 64, seed=1))
    (folder / "11_truck.png").write_bytes(png(64, 48, seed=2))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, default=ROOT.parent / "upstream-llama.cpp")
    parser.add_argument("--python", default=sys.executable, help="the Python with upstream's test requirements")
    parser.add_argument("--server", default=str(Path(sys.executable).parent / "pyllama-server"))
    args, pytest_args = parser.parse_known_args()
    if not (args.src / "tools" / "server" / "tests" / "unit").is_dir():
        subprocess.run([sys.executable, str(ROOT / "vendor" / "fetch.py"), "--all", "--dest", str(args.src)], check=True)
    from hub_standin import HubStandIn

    work = Path(tempfile.mkdtemp(prefix="upstream-suite-"))
    tests = work / "tests"
    shutil.copytree(args.src / "tools" / "server" / "tests", tests)
    (tests / "tmp").mkdir(exist_ok=True)  # --slot-save-path ./tmp, made by upstream's own downloads
    images = serve_images(work)
    for path in (tests / "unit").glob("*.py"):
        text = path.read_text()
        if IMAGE_URL in text:
            path.write_text(text.replace(IMAGE_URL, images))
    with HubStandIn() as hub:
        for repo, files in stand_in_files(work).items():
            hub.add_repo(repo, files)
        env = {**os.environ, "LLAMA_SERVER_BIN_PATH": args.server, "HF_ENDPOINT": hub.url,
               "LLAMA_CACHE": str(work / "cache"), "HF_HOME": str(work / "hf-home")}
        return subprocess.run([args.python, "-m", "pytest", "-q", *(pytest_args or ["unit"])], cwd=tests,
                              env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
