"""Output folders: the one rule every command follows.

An output may not be, contain, or be inside any input; ``--overwrite`` only replaces a folder
tokengraft wrote; every write goes to a temporary sibling renamed into place, removed on error,
Ctrl-C and SIGTERM, and swept by the next run when a killed process left it behind; written files
follow the process umask like ``save_pretrained``. Depends on the standard library only.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from .errors import TokengraftError

MARKERS = ("tokengraft.json", "run.json", ".tokengraft-demo")

class FolderError(TokengraftError):
    pass


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every cleanup path that handles an interruption runs."""


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


def _check_apart(out: Path, inputs: dict | None) -> None:
    real = out.resolve()
    for what, p in (inputs or {}).items():
        if p is None or p == "":
            continue
        rel = _relation(real, Path(p).resolve())
        if rel:
            raise FolderError(f"{out}: the output {rel} the {what} {p}; choose an output path outside "
                              f"every input (inputs are never modified)")


def check_file_output(out, inputs: dict | None = None) -> Path:
    """The rule for a single-file output (a converted ``iter_N.pth``): apart from every input, and
    never an existing path (a file tokengraft wrote cannot be told from the user's only copy)."""
    out = Path(out)
    _check_apart(out, inputs)
    if os.path.lexists(out):
        raise FolderError(f"{out}: already exists; a checkpoint file is never replaced: remove it yourself or "
                          f"choose another output path")
    if not out.parent.is_dir():
        raise FolderError(f"{out}: its folder {out.parent} does not exist")
    return out


def check_output(out, inputs: dict | None = None, overwrite: bool = False) -> Path:
    """Refuse (FolderError, one line) an output that is, contains or is inside any input (after
    resolving symlinks), a path that exists and is not a folder, an existing folder without
    --overwrite, or --overwrite of a folder tokengraft did not write. An empty folder counts as free.
    ``inputs``: {"what": path or None}, e.g. {"MODEL_DIR": args.model_dir}."""
    out = Path(out)
    _check_apart(out, inputs)
    if os.path.lexists(out) and not out.is_dir():
        raise FolderError(f"{out}: exists and is a file; tokengraft never replaces a file (it cannot tell one it "
                          f"wrote from your only copy): remove it yourself or choose another output path")
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
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:  # a single-file output's temporary (atomic_file)
                    p.unlink(missing_ok=True)
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
def signal_raises(signum, make_exc):
    """While the block runs, signal ``signum`` raises ``make_exc()`` (or, when that returns None, only
    runs it: a flag checked later); afterwards exactly the handler found before is back. A signal the
    parent set to ignored stays ignored (POSIX: a background job started by a script ignores SIGINT),
    and outside the main thread Python cannot install handlers: there the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signum) is signal.SIG_IGN:
        yield
        return

    def handler(signum, frame):
        exc = make_exc()
        if exc is not None:
            raise exc

    old = signal.signal(signum, handler)
    try:
        yield
    finally:
        signal.signal(signum, old)


def _sigterm_raises():
    """While writing, SIGTERM raises (like Ctrl-C) so the temporary folder is removed."""
    return signal_raises(signal.SIGTERM, Terminated)


def _identity(path: Path):
    """(device, inode) of an existing folder, else None: what --overwrite checked at the start."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


@contextlib.contextmanager
def _locked(folder: Path):
    """An exclusive lock on ``folder`` (flock on its descriptor) while the block runs: two tokengraft
    commands putting outputs into one folder take their final step one after the other."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


_RENAME_NOREPLACE = 1


def rename_noreplace(src, dst) -> None:
    """Rename ``src`` to ``dst`` only if ``dst`` does not exist (FileExistsError otherwise): Linux's
    renameat2(RENAME_NOREPLACE), one atomic step; where the system or file system lacks it, a file
    is hard-linked into place (also refuses an existing name) and a folder is renamed after a check
    (callers hold :func:`_locked`, so no tokengraft process slips in between)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        if fn(-100, os.fsencode(src), -100, os.fsencode(dst), _RENAME_NOREPLACE) == 0:  # -100: AT_FDCWD
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.isdir(src):
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
        os.rename(src, dst)
    else:
        os.link(src, dst)
        os.unlink(src)


def _appeared(out: Path) -> FolderError:
    return FolderError(f"{out}: appeared or changed while this command worked (another process wrote it); "
                       f"it was left untouched and nothing was written: remove it yourself or choose "
                       f"another output path")


def _put_in_place(tmp: Path, out: Path, overwrite: bool, seen) -> None:
    """The final step, under the parent folder's lock: ``tmp`` becomes ``out`` only if ``out`` is
    still free (absent or an empty folder) or, with --overwrite, still the tokengraft folder checked
    at the start (``seen``: its identity). Whatever appeared meanwhile is never replaced or removed."""
    with _locked(out.parent):
        if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
            with contextlib.suppress(OSError):
                os.rmdir(out)  # an empty folder counts as free; one filled meanwhile stays
        if not os.path.lexists(out):
            try:
                rename_noreplace(tmp, out)
            except FileExistsError:
                raise _appeared(out) from None
            return
        if not (overwrite and seen is not None and _identity(out) == seen and written_by_tokengraft(out)):
            raise _appeared(out)
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
        os.rename(out, old / "x")
        try:
            rename_noreplace(tmp, out)
        except BaseException:
            os.rename(old / "x", out)
            raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(out, overwrite: bool = False, inputs: dict | None = None):
    """Yield a temporary sibling of ``out``; on success it replaces ``out``, on error, Ctrl-C or
    SIGTERM it vanishes. ``check_output`` is applied first (``inputs``: see there) and again, under
    a lock, at the final rename: a folder another process put at ``out`` meanwhile is never touched
    (FolderError), so of two commands writing one output exactly one succeeds."""
    out = check_output(out, inputs, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(out)
    seen = _identity(out) if out.is_dir() and any(out.iterdir()) else None
    with _sigterm_raises():
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
        try:
            yield tmp
            _ordinary_modes(tmp)
            _put_in_place(tmp, out, overwrite, seen)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@contextlib.contextmanager
def atomic_file(out):
    """Yield a temporary sibling path for the file ``out``: on success it is renamed onto ``out``
    with the umask's mode (mkstemp makes 0600), never onto a file that exists by then (one another
    process wrote meanwhile stays, and this raises FolderError); on error, Ctrl-C or SIGTERM it is
    removed; the temporaries of a killed run for the same output are swept first."""
    out = Path(out)
    sweep_stale(out)
    with _sigterm_raises():
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent)
        os.close(fd)
        try:
            yield Path(tmp)
            os.chmod(tmp, 0o666 & ~_umask())
            try:
                rename_noreplace(tmp, out)
            except FileExistsError:
                raise _appeared(out) from None
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
