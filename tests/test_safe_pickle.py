"""The restricted unpickler under hostile files (limits), and writing back what it read.

Hostile files are built by hand (zipfile + pickle) the way an attacker would: a deflate bomb,
views larger than their storage, negative offsets/sizes/strides, storages shorter than declared.
The write-back test uses real numpy objects and stand-ins for the mmengine/DeepSpeed records real
checkpoints hold, defined at those libraries' real module paths in a package only the reference
processes can import: safe_load -> safe_save runs without it and must still produce a file that
``torch.load`` rebuilds into objects equal to the original. Globals outside the allowlist of inert
ones (a custom class, builtins.getattr of a bound classmethod) are refused in one line.
"""
from __future__ import annotations

import collections
import io
import pickle
import subprocess
import sys
import textwrap
import zipfile
import zlib

import pytest
import torch

from tokengraft.checkpoint import safe_pickle
from tokengraft.checkpoint.repickle import safe_save
from tokengraft.checkpoint.safe_pickle import UnsafeCheckpointError, safe_load


# ---------------------------------------------------------------- hand-made torch zip files

class _StorageRef:
    """Pickled as a torch persistent storage id, with whatever numel we want to declare."""

    def __init__(self, key, numel, stype=torch.FloatStorage):
        self.key, self.numel, self.stype = key, numel, stype


class _TensorRef:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


class _HandPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", obj.stype, obj.key, "cpu", obj.numel)
        return None


def write_pth(path, obj, members: dict[str, bytes], compress: set[str] = frozenset()):
    """A torch-layout zip (``archive/data.pkl`` + ``archive/data/<key>``) from raw pieces."""
    buf = io.BytesIO()
    _HandPickler(buf, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        for key, data in members.items():
            z.writestr(f"archive/data/{key}", data,
                       compress_type=zipfile.ZIP_DEFLATED if key in compress else zipfile.ZIP_STORED)
        z.writestr("archive/version", "3\n")
    return path


def floats(n):
    return torch.arange(n, dtype=torch.float32).numpy().tobytes()


def one_line_error(fn):
    with pytest.raises(UnsafeCheckpointError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400, msg
    assert e.value.exit_code == 2
    return msg


def test_well_formed_hand_file_loads(tmp_path):
    s = _StorageRef("0", 6)
    p = write_pth(tmp_path / "ok.pth", {"w": _TensorRef(s, 0, (2, 3), (3, 1)),
                                       "t": _TensorRef(s, 1, (2, 2), (1, 3))}, {"0": floats(6)})
    obj = safe_load(p)
    assert obj["w"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert obj["t"].tolist() == [[1, 4], [2, 5]]


@pytest.mark.parametrize("offset,size,stride,words", [
    (0, (10,), (1,), "larger than its storage"),
    (3, (2, 2), (2, 1), "larger than its storage"),   # last element at 3+2+1 = 6 > 5
    (0, (2, 3), (4, 1), "larger than its storage"),   # a stride that walks off the end
    (-1, (2,), (1,), "negative"),
    (0, (-2, 3), (3, 1), "negative"),
    (0, (2, 3), (-3, 1), "negative"),
    (0, (2, 3), (3,), "disagree"),
])
def test_hostile_views_are_one_line_errors(tmp_path, offset, size, stride, words):
    p = write_pth(tmp_path / "bad.pth", {"w": _TensorRef(_StorageRef("0", 6), offset, size, stride)},
                  {"0": floats(6)})
    msg = one_line_error(lambda: safe_load(p))
    assert words in msg and str(p) in msg, msg


def test_storage_shorter_than_declared_and_negative_numel(tmp_path):
    p = write_pth(tmp_path / "short.pth", {"w": _TensorRef(_StorageRef("0", 100), 0, (4,), (1,))},
                  {"0": floats(6)})
    assert "declares 400 bytes but the file holds 24" in one_line_error(lambda: safe_load(p))
    p = write_pth(tmp_path / "neg.pth", {"w": _TensorRef(_StorageRef("0", -5), 0, (0,), (1,))},
                  {"0": floats(6)})
    assert "invalid size" in one_line_error(lambda: safe_load(p))


def test_allocation_requests_in_the_pickle_are_refused(tmp_path):
    class Alloc:
        def __reduce__(self):
            return (bytearray, (10 ** 12,))

    p = write_pth(tmp_path / "alloc.pth", {"x": Alloc()}, {})
    assert "allocation" in one_line_error(lambda: safe_load(p))


def _deflate_zeros(nbytes: int) -> tuple[bytes, int]:
    """A raw deflate stream of ``nbytes`` zeros and its CRC, fast: after a full flush the
    compressor's state is reset, so every 16 MiB chunk compresses to the same bytes."""
    chunk = bytes(1 << 24)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(nbytes // len(chunk)):
        crc = zlib.crc32(chunk, crc)
    return block * (nbytes // len(chunk)) + c.flush(), crc


def _zip_by_hand(path, members):
    """Write a zip from (name, payload, method, crc, uncompressed size): zipfile cannot take a
    ready-made deflate stream."""
    import struct

    local, central = bytearray(), bytearray()
    for name, payload, method, crc, usize in members:
        n = name.encode()
        head = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc, len(payload), usize, len(n), 0)
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0x21, crc, len(payload),
                               usize, len(n), 0, 0, 0, 0, 0, len(local)) + n
        local += head + n + payload
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), len(local), 0)
    path.write_bytes(bytes(local + central + end))
    return path


def _write_bomb(path, declared: int, inflated: int):
    """A storage declaring ``declared`` floats whose deflated member inflates to ``inflated`` bytes."""
    raw, crc = _deflate_zeros(inflated)
    buf = io.BytesIO()
    _HandPickler(buf, protocol=2).dump({"w": _TensorRef(_StorageRef("0", declared), 0, (declared,), (1,))})
    pkl = buf.getvalue()
    return _zip_by_hand(path, [("archive/data.pkl", pkl, 0, zlib.crc32(pkl), len(pkl)),
                               ("archive/byteorder", b"little", 0, zlib.crc32(b"little"), 6),
                               ("archive/data/0", raw, 8, crc, inflated)])


BOMB_SCRIPT = textwrap.dedent("""
    import resource, sys
    from tokengraft.errors import TokengraftError
    from tokengraft.checkpoint.safe_pickle import safe_load
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        safe_load(sys.argv[1])
        code, msg = 0, "loaded"
    except TokengraftError as e:
        code, msg = e.exit_code, str(e)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{(peak - before) // 1024}")
    print(msg, file=sys.stderr)
    sys.exit(code)
""")


@pytest.mark.parametrize("declared_floats", [1 << 28, 1 << 20])
def test_zip_bomb_stays_small(tmp_path, declared_floats):
    # 1 GiB of zeros deflates to ~1 MB (what the issue saw: 1.5 MB -> 3.4 GB peak RSS). Declared as
    # a 1 GiB storage it is over the budget for compressed members; declared as 4 MiB it is
    # refused as inflating past its claim. Either way, before inflating.
    p = _write_bomb(tmp_path / "bomb.pth", declared_floats, 1 << 30)
    assert p.stat().st_size < 2_000_000
    r = subprocess.run([sys.executable, "-c", BOMB_SCRIPT, str(p)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "bomb" in err[0] and str(p) in err[0], r.stderr
    grown_mb = int(r.stdout.strip())
    assert grown_mb < 300, f"peak RSS grew by {grown_mb} MB reading a 1 MB file"


CLI_RSS = textwrap.dedent("""
    import resource, subprocess, sys
    r = subprocess.run([sys.executable, "-m", "tokengraft", "convert", *sys.argv[1:]], capture_output=True, text=True)
    sys.stderr.write(r.stderr)
    print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)
    sys.exit(r.returncode)
""")


def _convert_cli(tmp_path, ckpt):
    """`tokengraft convert CKPT` in a fresh parent, reporting the child's peak RSS (MB)."""
    from checkpoint_helpers import word_tokenizer, words

    word_tokenizer(words(6)).save_pretrained(tmp_path / "src_tok")
    word_tokenizer(words(6) + ["<box>"]).save_pretrained(tmp_path / "target")
    out = tmp_path / "out.pth"
    r = subprocess.run([sys.executable, "-c", CLI_RSS, str(ckpt), "--to", str(tmp_path / "target"), "-o", str(out),
                        "--source-tokenizer", str(tmp_path / "src_tok")], capture_output=True, text=True, timeout=300)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    return r.returncode, r.stderr.strip().splitlines(), int(r.stdout.strip() or 0)


@pytest.mark.parametrize("case", ["view", "negative", "bomb"])
def test_convert_cli_refuses_hostile_pickles_in_one_line(tmp_path, case):
    if case == "bomb":
        p = _write_bomb(tmp_path / "bomb.pth", 1 << 20, 1 << 30)
    else:
        offset, size = (0, (6, 4)) if case == "view" else (-2, (6, 3))
        p = write_pth(tmp_path / f"{case}.pth", {"state_dict": {
            "model.embed_tokens.weight": _TensorRef(_StorageRef("0", 18), offset, size, (size[1], 1))}},
            {"0": floats(18)})
    before = p.read_bytes()
    code, err, peak_mb = _convert_cli(tmp_path, p)
    assert code == 2 and len(err) == 1 and err[0].startswith("tokengraft convert: error:"), err
    assert {"view": "larger than its storage", "negative": "negative", "bomb": "bomb"}[case] in err[0], err
    assert "Traceback" not in "\n".join(err) and p.read_bytes() == before
    assert peak_mb < 900, f"convert peaked at {peak_mb} MB on a {p.stat().st_size} byte file"


def test_compressed_data_pkl_is_bounded(tmp_path, monkeypatch):
    p = tmp_path / "pklbomb.pth"
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", pickle.dumps(["x" * (4 << 20)], protocol=2))
    monkeypatch.setattr(safe_pickle, "COMPRESSED_BUDGET", 1 << 20)
    assert "bomb" in one_line_error(lambda: safe_load(p))


def test_an_honestly_compressed_file_still_loads(tmp_path):
    # re-zipping a torch.save file with deflate (zip -r) is legal and small: it loads
    w = torch.randn(5, 3)
    torch.save({"w": w, "b": w[1]}, tmp_path / "plain.pt")
    with zipfile.ZipFile(tmp_path / "plain.pt") as src, \
            zipfile.ZipFile(tmp_path / "deflated.pt", "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    obj = safe_load(tmp_path / "deflated.pt")
    assert torch.equal(obj["w"], w) and torch.equal(obj["b"], w[1])


# ---------------------------------------------------------------- write back what was read

# stand-ins at the real module paths of what mmengine/XTuner/DeepSpeed pickle (the same pickle
# opcodes: NEWOBJ + BUILD(__dict__), SETITEMS + BUILD on a dict subclass, __getstate__/__setstate__,
# an enum REDUCE (cls, (value,)), a namedtuple); never imported by tokengraft
HELPER_FILES = {
    "mmengine/__init__.py": "", "mmengine/logging/__init__.py": "", "mmengine/config/__init__.py": "",
    "deepspeed/__init__.py": "", "deepspeed/runtime/__init__.py": "", "deepspeed/runtime/zero/__init__.py": "",
    "deepspeed/runtime/fp16/__init__.py": "", "deepspeed/utils/__init__.py": "",
    "mmengine/logging/history_buffer.py": '''
import numpy as np


class HistoryBuffer:
    def __init__(self, values=(), counts=()):
        self._log_history = np.array(values, dtype=np.float64)
        self._count_history = np.array(counts, dtype=np.int64)
        self.max_length = 1000000
''',
    "mmengine/config/config.py": '''
class ConfigDict(dict):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.title = "t"
''',
    "deepspeed/runtime/fp16/loss_scaler.py": '''
class LossScaler:
    def __init__(self, x):
        self.x = x

    def __getstate__(self):
        return {"packed": [self.x, self.x * 2]}

    def __setstate__(self, state):
        self.x = state["packed"][0]
        self.restored = True
''',
    "deepspeed/runtime/zero/config.py": '''
import enum


class ZeroStageEnum(int, enum.Enum):
    gradients = 2
''',
    "deepspeed/utils/tensor_fragment.py": '''
import collections
fragment_address = collections.namedtuple("fragment_address", ["numel", "start"])
''',
    "tgtest_helpers.py": '''
class FromParts:                          # REDUCE whose callable is a bound classmethod (builtins.getattr)
    def __init__(self, a, b):
        self.a, self.b = a, b

    @classmethod
    def make(cls, a, b):
        return cls(a, b)

    def __reduce__(self):
        return (FromParts.make, (self.a, self.b))
''',
}

BUILD = textwrap.dedent('''
    import collections, datetime, sys
    import numpy as np, torch
    from mmengine.logging.history_buffer import HistoryBuffer
    from mmengine.config.config import ConfigDict
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    w = torch.randn(7, 4)
    obj = {
        "meta": {"iter": 4, "time": datetime.datetime(2026, 11, 28, 18, 0, 0), "stage": ZeroStageEnum.gradients,
                 "cfg": "model = dict(type='LLaVAModel')", "dtype": np.dtype("float32"), "blob": b"bytes"},
        "state_dict": collections.OrderedDict([("llm.embed.weight", w), ("llm.lm_head.weight", w),
                                               ("half", torch.ones(3, dtype=torch.bfloat16)),
                                               ("t", w.t()), ("row", w[2])]),
        "message_hub": {
            "log_scalars": {"train/loss": HistoryBuffer([1.5, 1.25], [1, 1])},
            "runtime_info": {"iter": np.int64(4), "lr": np.float64(1e-3), "flag": np.bool_(True),
                             "arr": np.arange(6, dtype=np.float32).reshape(2, 3)},
            "resumed_keys": collections.OrderedDict(iter=True),
        },
        "other": [LossScaler(3), [1, "two", np.float32(3.0)], ConfigDict(a=1, b=[2]),
                  fragment_address(5, 6), collections.defaultdict(list, {"k": [1]}),
                  {1, 2}, frozenset({3}), (1, (2, 3)), b"bytes", None, 1.5],
    }
    obj["alias"] = obj["message_hub"]["log_scalars"]["train/loss"]  # shared reference
    torch.save(obj, sys.argv[1])
''')

COMPARE = textwrap.dedent('''
    import collections, enum, sys
    import numpy as np, torch

    def same(a, b, path="obj"):
        assert type(a) is type(b), (path, type(a), type(b))
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), path
            assert torch.equal(a, b), path
        elif isinstance(a, np.ndarray):
            assert a.dtype == b.dtype and np.array_equal(a, b), path
        elif isinstance(a, dict):
            assert list(a) == list(b), (path, list(a), list(b))
            for k in a:
                same(a[k], b[k], f"{path}[{k!r}]")
            if isinstance(a, collections.defaultdict):
                assert a.default_factory is b.default_factory, path
        elif isinstance(a, (list, tuple)):
            assert len(a) == len(b), path
            for i, (x, y) in enumerate(zip(a, b)):
                same(x, y, f"{path}[{i}]")
        elif not hasattr(a, "__dict__") or isinstance(a, (type, enum.Enum)):
            assert a == b, (path, a, b)
        if hasattr(a, "__dict__") and not isinstance(a, (type, enum.Enum)):
            same(vars(a), vars(b), path + ".__dict__")

    ref = torch.load(sys.argv[1], weights_only=False)
    out = torch.load(sys.argv[2], weights_only=False)
    same(ref, out)
    sd = out["state_dict"]
    # shared storage and shared objects survive the round trip
    assert sd["llm.embed.weight"].data_ptr() == sd["llm.lm_head.weight"].data_ptr() == sd["t"].data_ptr()
    assert out["alias"] is out["message_hub"]["log_scalars"]["train/loss"]
    assert out["other"][0].restored and type(out["other"][2]).__name__ == "ConfigDict"
    print("SAME")
''')


def _helper_env(tmp_path):
    helpers = tmp_path / "helpers"
    for rel, text in HELPER_FILES.items():
        (helpers / rel).parent.mkdir(parents=True, exist_ok=True)
        (helpers / rel).write_text(text)
    return helpers


def _run_with_helpers(helpers, script, *args):
    import os

    env = dict(os.environ, PYTHONPATH=f"{helpers}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120)


def test_safe_save_writes_back_the_same_objects(tmp_path):
    pytest.importorskip("numpy")
    helpers = _helper_env(tmp_path)
    src, out = tmp_path / "iter_4.pth", tmp_path / "iter_4_out.pth"
    r = _run_with_helpers(helpers, BUILD, src)
    assert r.returncode == 0, r.stderr
    before = src.read_bytes()

    # here the stand-ins are not importable: everything custom stays inert and is written back
    before_modules = set(sys.modules)
    obj = safe_load(src)
    assert repr(obj["message_hub"]["log_scalars"]["train/loss"]) == "<inert mmengine.logging.history_buffer.HistoryBuffer>"
    assert obj["alias"] is obj["message_hub"]["log_scalars"]["train/loss"]
    safe_save(obj, out)
    assert not {m for m in set(sys.modules) - before_modules if m.split(".")[0] in ("mmengine", "deepspeed")}
    assert src.read_bytes() == before  # the input is untouched

    r = _run_with_helpers(helpers, COMPARE, src, out)
    assert r.returncode == 0 and "SAME" in r.stdout, r.stderr[-3000:]
    # the comparison can fail: an edited tree is noticed
    obj["message_hub"]["runtime_info"]["iter"].args = obj["message_hub"]["runtime_info"]["lr"].args
    safe_save(obj, tmp_path / "edited.pth")
    r = _run_with_helpers(helpers, COMPARE, src, tmp_path / "edited.pth")
    assert r.returncode != 0 and "AssertionError" in r.stderr


def test_safe_save_round_trips_edits_and_tensors(tmp_path):
    w = torch.randn(6, 3)
    torch.save({"state_dict": {"emb": w, "head": w}, "optimizer": {"state": {0: {"step": torch.tensor(4.0)}},
                                                                     "param_groups": [{"lr": 0.1, "params": [0]}]}},
               tmp_path / "a.pth")
    obj = safe_load(tmp_path / "a.pth")
    obj["state_dict"]["emb"] = torch.cat([obj["state_dict"]["emb"], torch.zeros(2, 3)])  # a remap adds rows
    safe_save(obj, tmp_path / "b.pth")
    back = torch.load(tmp_path / "b.pth", weights_only=True)  # plain content stays weights_only-loadable
    assert back["state_dict"]["emb"].shape == (8, 3) and torch.equal(back["state_dict"]["head"], w)
    assert back["optimizer"]["state"][0]["step"].item() == 4.0
    assert oct((tmp_path / "b.pth").stat().st_mode & 0o777) != oct(0o600)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_write_back_refuses_globals_that_run_code(tmp_path):
    import os

    hit = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {hit}",))

    class Opener:
        def __reduce__(self):
            return (open, (str(hit), "w"))

    for payload in (Evil(), Opener(), {"nested": [Evil()]}):
        torch.save({"w": torch.ones(2), "evil": payload}, tmp_path / "evil.pt")
        obj = safe_load(tmp_path / "evil.pt")
        msg = one_line_error(lambda: safe_save(obj, tmp_path / "evil_out.pt"))
        assert "refusing to write back" in msg and ("system" in msg or "open" in msg), msg
        assert not hit.exists() and not (tmp_path / "evil_out.pt").exists()
        assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_write_back_refuses_what_is_not_known_to_be_inert(tmp_path):
    """A custom class, or a bound classmethod (pickled as builtins.getattr(cls, name)), is not on the
    allowlist: one line naming the global, no output, nothing imported."""
    helpers = _helper_env(tmp_path)
    script = ("import sys, torch\nimport tgtest_helpers as h\n"
              "torch.save({'w': torch.ones(2), 'x': h.FromParts(5, 'six')}, sys.argv[1])\n")
    r = _run_with_helpers(helpers, script, tmp_path / "parts.pt")
    assert r.returncode == 0, r.stderr
    obj = safe_load(tmp_path / "parts.pt")
    msg = one_line_error(lambda: safe_save(obj, tmp_path / "out.pt"))
    assert "refusing to write back builtins.getattr" in msg, msg
    obj["x"] = obj["x"].func.args[0]  # the class itself: an unknown global
    msg = one_line_error(lambda: safe_save(obj, tmp_path / "out.pt"))
    assert "refusing to write back tgtest_helpers.FromParts" in msg, msg
    assert not (tmp_path / "out.pt").exists() and "tgtest_helpers" not in sys.modules


def test_getattr_is_written_back_only_as_the_lookups_real_records_pickle(tmp_path):
    """Real mmengine 0.10.6 HistoryBuffers pickle ``statistics_methods`` as getattr(HistoryBuffer, 'min')
    (checked on a real XTuner iter_N.pth): that exact lookup is written back; any other getattr is
    refused, also after an allowed one (the global is memoized, every record is still checked)."""
    from tokengraft.checkpoint.inert import _placeholder_class

    hb, getattr_ = _placeholder_class("mmengine.logging.history_buffer", "HistoryBuffer"), \
        _placeholder_class("builtins", "getattr")
    ok = {"min": getattr_(hb, "min"), "mean": getattr_(hb, "mean")}
    safe_save({"w": torch.ones(1), "methods": ok}, tmp_path / "ok.pt")
    back = safe_load(tmp_path / "ok.pt")["methods"]
    assert [(type(v).module, v.name, v.args[1]) for v in back.values()] == [("builtins", "getattr", "min"),
                                                                             ("builtins", "getattr", "mean")]
    for bad in (getattr_(hb, "__init__"), getattr_(_placeholder_class("pkgutil", "resolve_name"), "min")):
        msg = one_line_error(lambda: safe_save({"methods": ok, "bad": bad}, tmp_path / "bad.pt"))
        assert "refusing to write back builtins.getattr" in msg, msg
        assert not (tmp_path / "bad.pt").exists()
