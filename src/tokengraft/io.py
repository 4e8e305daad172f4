"""Load and save Hugging Face checkpoint folders (causal LM or LLaVA) with their manifest.

The one output-folder rule lives here (``check_output`` / ``atomic_folder``), used by every command:
the output may not be, contain, or sit inside any input; ``--overwrite`` only ever replaces a folder
tokengraft wrote; every write goes to a temporary sibling that is renamed into place at the end, so
an interrupted run (Ctrl-C or SIGTERM) leaves nothing half-written and never touches the input, and
temporaries a killed run left behind are swept by the next run for the same output.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from .errors import TokengraftError
from .manifest import Manifest

# files whose presence says "tokengraft wrote this folder": the manifest, a training run's run.json
# (train/run.py RUN_FILE), the demo's marker
MARKERS = ("tokengraft.json", "run.json", ".tokengraft-demo")


class FolderError(TokengraftError):
    pass


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every cleanup path that handles an interruption runs."""


def read_config(path) -> dict:
    p = Path(path) / "config.json"
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FolderError(f"{path}: no config.json; expected a Hugging Face model folder "
                          f"(save one with model.save_pretrained(DIR))") from None
    except json.JSONDecodeError as e:
        raise FolderError(f"{p}: not valid JSON ({e.msg}, line {e.lineno})") from None
    except UnicodeDecodeError:
        raise FolderError(f"{p}: not UTF-8 text; expected a JSON config") from None
    if not isinstance(cfg, dict):
        raise FolderError(f"{p}: expected a JSON object (model_type, vocab_size, ...), "
                          f"found {type(cfg).__name__}")
    return cfg


def is_llava(config: dict) -> bool:
    return "vision_config" in config and "text_config" in config


# ---------------------------------------------------------------------------------------------
# no remote code: a folder that needs its own Python files is refused before transformers sees it
# (transformers would otherwise offer "run the custom code? [y/N]" on a terminal)

def _known_model_type(model_type) -> bool:
    from transformers import CONFIG_MAPPING

    return isinstance(model_type, str) and model_type in CONFIG_MAPPING


def refuse_remote_code(folder, cfg: dict | None = None) -> None:
    """FolderError when loading ``folder`` would need code from the folder itself (``auto_map`` with
    a model_type transformers does not know). Nothing of the folder is imported or executed."""
    folder = Path(folder)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        return
    cfg = read_config(folder) if cfg is None else cfg
    mt = cfg.get("model_type")
    if mt == "internlm2":  # read by the built-in bridge (internlm2.py); its *.py files are data
        return
    if "auto_map" in cfg and not _known_model_type(mt):
        raise FolderError(f"{folder}: config.json has auto_map and model_type {mt!r}, which this "
                          f"transformers does not know; loading it would run the folder's own Python "
                          f"code, which tokengraft never does (convert it to a built-in architecture)")


def _remote_code_guard(folder, e: ValueError) -> None:
    """transformers refuses (with trust_remote_code=False) a tokenizer/processor that only exists as
    the folder's code: say so in one line instead of a traceback."""
    if "trust_remote_code" in str(e) or "custom code" in str(e):
        raise FolderError(f"{folder}: its tokenizer or processor exists only as the folder's own Python "
                          f"code (auto_map), which tokengraft never runs") from None


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def require_weights(path) -> None:
    """A folder with config.json but no weights file: one line, before transformers is asked."""
    path = Path(path)
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise FolderError(f"{path}: has config.json but no weights ({', '.join(WEIGHT_FILES[:3])}); pass the "
                          f"complete folder model.save_pretrained(DIR) wrote")


EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "tok_embeddings.weight",
                      "lm_head.weight", "embed_out.weight", "output.weight")
_HEADER_CAP = 100 << 20  # a safetensors header beyond this is not a model's


def _safetensors_shapes(path: Path) -> dict:
    """{tensor name: shape} from a safetensors file's JSON header (no tensor data read)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n <= _HEADER_CAP:
            raise FolderError(f"{path}: not a readable safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise FolderError(f"{path}: not a readable safetensors file (damaged header)") from None
    if not isinstance(header, dict):
        raise FolderError(f"{path}: not a readable safetensors file (header is not a JSON object)")
    return {k: v.get("shape") for k, v in header.items() if isinstance(v, dict)}


def check_rows_match(path, cfg: dict) -> None:
    """config.json's vocab_size against the embedding/head rows in the safetensors headers: a
    mismatch is one line naming both numbers (transformers would raise a long RuntimeError)."""
    from .hf import config_rows

    path = Path(path)
    rows = config_rows(cfg)
    if rows is None:
        return
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise FolderError(f"{index}: not a valid safetensors index (no weight_map)") from None
    elif (path / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        return  # .bin weights: transformers' own check, turned into one line in load_folder
    for shard in shards:
        f = path / shard
        if not f.is_file():
            raise FolderError(f"{f}: listed in {index.name} but missing")
        for name, shape in _safetensors_shapes(f).items():
            if (name.endswith(EMBEDDING_SUFFIXES) and isinstance(shape, list) and len(shape) == 2
                    and shape[0] != rows):
                raise FolderError(f"{path}: config.json says vocab_size {rows} but {name} in {shard} has "
                                  f"{shape[0]} rows; use the config.json saved with these weights")


def load_folder(path, dtype=None):
    """(model, tokenizer, processor or None, manifest or None) from a folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer

    path = Path(path)
    cfg = read_config(path)
    if cfg.get("model_type") == "internlm2":  # built-in bridge (internlm2.py): the folder's code never runs
        from . import internlm2
        return internlm2.load_folder(path, dtype)
    refuse_remote_code(path, cfg)
    require_weights(path)
    check_rows_match(path, cfg)
    manifest = Manifest.find(path)  # a broken manifest is an error before the slow load
    dtype = dtype or torch.float32
    processor = None
    try:
        if is_llava(cfg):
            from transformers import AutoModelForImageTextToText

            model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, trust_remote_code=False)
            processor = AutoProcessor.from_pretrained(path, trust_remote_code=False)
            tokenizer = processor.tokenizer
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False)
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except ValueError as e:
        _remote_code_guard(path, e)
        raise
    except pickle.UnpicklingError:  # torch's weights_only loader refused it: nothing of it ran
        raise FolderError(f"{path}: a .bin weights file holds something other than tensors (code to run, or "
                          f"a damaged pickle); refused without running it; use safetensors weights") from None
    except RuntimeError as e:
        if "mismatched" in str(e) or "size mismatch" in str(e):
            raise FolderError(f"{path}: config.json does not match the weights' shapes (vocab_size or hidden "
                              f"size); use the config.json saved with these weights") from None
        raise
    return model, tokenizer, processor, manifest


# ---------------------------------------------------------------------------------------------
# the output-folder rule

def written_by_tokengraft(folder) -> bool:
    """True when ``folder`` carries a tokengraft manifest, a training run's run.json or the demo
    marker: the only folders --overwrite may replace."""
    f = Path(folder)
    return f.is_dir() and any((f / m).is_file() for m in MARKERS)


def _relation(out: Path, inp: Path) -> str | None:
    if out == inp:
        return "is"
    if out in inp.parents:
        return "contains"
    if inp in out.parents:
        return "is inside"
    return None


def check_output(out, inputs: dict | None = None, overwrite: bool = False) -> Path:
    """Refuse (FolderError, one line) an output that is, contains or is inside any input (after
    resolving symlinks), a path that exists and is not a folder, an existing folder without
    --overwrite, or --overwrite of a folder tokengraft did not write. An empty folder counts as free.
    ``inputs``: {"what": path or None}, e.g. {"MODEL_DIR": args.model_dir}."""
    out = Path(out)
    real = out.resolve()
    for what, p in (inputs or {}).items():
        if p is None or p == "":
            continue
        rel = _relation(real, Path(p).resolve())
        if rel:
            raise FolderError(f"{out}: the output {rel} the {what} {p}; choose an output folder outside "
                              f"every input (inputs are never modified)")
    if os.path.lexists(out) and not out.is_dir():
        raise FolderError(f"{out}: exists and is not a folder; choose another output folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FolderError(f"{out}: already exists; pass --overwrite (only folders tokengraft wrote "
                              f"are replaced) or choose another output folder")
        if not written_by_tokengraft(out):
            raise FolderError(f"{out}: not written by tokengraft (no {MARKERS[0]} or {MARKERS[1]}); "
                              f"--overwrite never replaces such a folder: remove it yourself or choose "
                              f"another output folder")
    return out


def check_writable(out) -> None:
    """Before slow work: the output's nearest existing parent takes a new folder (a read-only file
    system, missing permission or a full disk fail here as one OSError line, not after minutes)."""
    parent = Path(out).absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{Path(out).name}.probe-", dir=parent))
    except OSError as e:
        raise FolderError(f"{out}: cannot create a folder in {parent} ({e.strerror or e}); choose a "
                          f"writable output location") from None


_TEMP = re.compile(r"\.(tmp|old)-(\d+)-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep_stale(out) -> list[Path]:
    """Remove ``.NAME.tmp-PID-*`` / ``.NAME.old-PID-*`` siblings of ``out`` whose process is gone
    (a run killed with SIGKILL, or a crash): they can hold hundreds of MB nobody will use."""
    out = Path(out)
    removed = []
    if not out.parent.is_dir():
        return removed
    for prefix in (f".{out.name}.tmp-", f".{out.name}.old-"):
        for p in out.parent.glob(glob_escape(prefix) + "*"):
            m = _TEMP.match(p.name[len(out.name) + 1:])
            if m and not _alive(int(m.group(2))) and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def glob_escape(s: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", s)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _ordinary_modes(tmp: Path) -> None:
    """mkdtemp makes 0700; give the output what save_pretrained would (the umask's modes). Files
    with other links are left alone: a hard-linked shard is the input's own file."""
    mask = _umask()
    for root, dirs, files in os.walk(tmp):
        os.chmod(root, 0o777 & ~mask)
        for f in files:
            p = os.path.join(root, f)
            st = os.lstat(p)
            if st.st_nlink == 1 and not os.path.islink(p):
                os.chmod(p, 0o666 & ~mask)


@contextlib.contextmanager
def _sigterm_raises():
    """While writing, SIGTERM raises (like Ctrl-C) so the temporary folder is removed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def atomic_folder(out, overwrite: bool = False, inputs: dict | None = None):
    """Yield a temporary sibling of ``out``; on success it replaces ``out``, on error, Ctrl-C or
    SIGTERM it vanishes. ``check_output`` is applied first (``inputs``: see there)."""
    out = check_output(out, inputs, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(out)
    with _sigterm_raises():
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
        try:
            yield tmp
            _ordinary_modes(tmp)
            if out.is_dir():
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
                os.rename(out, old / "x")
                try:
                    os.rename(tmp, out)
                except BaseException:
                    os.rename(old / "x", out)
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def save_folder(out, model, tokenizer, manifest: Manifest | None, processor=None, overwrite: bool = False,
                max_shard_size="5GB", inputs: dict | None = None) -> Path:
    """Write model (safetensors), tokenizer, processor, generation config and manifest atomically."""
    with atomic_folder(out, overwrite, inputs=inputs) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if processor is not None:
            processor.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if manifest is not None:
            manifest.save(tmp)
    return Path(out)
