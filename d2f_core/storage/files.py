"""Files the pack writes and reads back: safe names, atomic writes that never replace another run's file,
per-run counters, and readable errors for damaged files.

Pure Python + safetensors (no ComfyUI): the nodes pass in the folders (ComfyUI's output directory).
Why each piece exists:

* ``plain_name`` / ``folder_name``: user-typed names become paths; an absolute name or ``..`` would
  write outside the output folder. One rule for every name the pack creates.
* ``resolve_inside``: a user-typed path the pack reads (e.g. ``resume_from``) must stay inside the output
  folder, after resolving symlinks.
* ``atomic_save``: a crash, SIGKILL, stop or full disk in the middle of a write must never leave a truncated
  file under a real name, nor damage the previous file. The data goes to a temp file in the destination's
  own folder (same file system, so publishing it is one atomic rename), is fsynced, then published:
  ``os.replace`` only for a file its writer owns and rewrites (a run's own state), otherwise a hard link,
  which fails when the name exists: an existing final path belongs to another run and is an error, never
  an overwrite. The temp file is removed on any failure, KeyboardInterrupt included.
* Temp files are ``.<final name>.<random hex>.d2f-tmp``: hidden, with an extension no loader lists, never
  matching a counter pattern, created with O_EXCL, so they cannot collide with a real file or each other.
  One left behind by a killed process is inert.
* ``reserve_numbered``: every run gets its own counter ``<name>_<NNNNN>`` (ComfyUI's SaveImage convention),
  reserved by ``os.mkdir``, which exactly one of two concurrent runs can win.
* ``read_header`` / ``read_tensors``: a truncated or damaged file raises ``DamagedFileError`` naming the
  file and what it was for, not a raw safetensors traceback.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file  # the underlying writer (tests replace it to inject faults)

from .metadata import check_metadata

TEMP_SUFFIX = ".d2f-tmp"
_PLAIN = re.compile(r"[\w.-]+")  # \w: letters (any script), digits, underscore
NAME_RULE = "letters, digits, '-', '_' and '.' only: no '/' or '\\', no spaces, not starting with '.'"
_NO_SPACE = {errno.ENOSPC} | ({errno.EDQUOT} if hasattr(errno, "EDQUOT") else set())


class DamagedFileError(ValueError):
    """A file exists but cannot be read as what it should be (truncated, damaged, not safetensors)."""


# --- names and paths ---------------------------------------------------------------------------------
def plain_name(value, what: str) -> str:
    """``value`` stripped, if it is a plain file name (see ``NAME_RULE``); else a ValueError saying why."""
    name = str(value or "").strip()
    if not name:
        raise ValueError(f"{what} is empty: give a plain name ({NAME_RULE})")
    if name.startswith(".") or not _PLAIN.fullmatch(name):
        raise ValueError(f"{what} {value!r} is not a plain name: use {NAME_RULE}")
    return name


def folder_name(value, what: str) -> str:
    """A relative folder path whose every '/'-separated part is a ``plain_name`` (sub-folders allowed,
    never absolute, never '..'). Returned '/'-separated, without a trailing separator."""
    text = (value or "").strip()
    parts = re.split(r"[/\\]", text.rstrip("/\\")) if text else [""]
    try:
        return "/".join(plain_name(p, what) for p in parts)
    except ValueError:
        raise ValueError(f"{what} {value!r} is not allowed: use a folder name made of {NAME_RULE}; "
                         "sub-folders may be separated by '/' (no absolute paths, no '..')") from None


def resolve_inside(root: str, path: str, what: str) -> str:
    """``path`` (absolute, or relative to ``root``) with symlinks resolved, if it lies inside ``root``."""
    text = (path or "").strip()
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, text))
    try:
        inside = os.path.commonpath([real_root, real]) == real_root
    except ValueError:  # another drive (Windows)
        inside = False
    if not inside:
        raise ValueError(f"{what} '{text}' is outside {real_root}: give a path inside that folder "
                         "(relative to it, or absolute)")
    return real


def is_temp_file(name: str) -> bool:
    """Whether a file name is one of ``atomic_save``'s temp files (left behind only by a killed process)."""
    return os.path.basename(name).endswith(TEMP_SUFFIX)


# --- counters ----------------------------------------------------------------------------------------
def used_counters(folder: str, name: str) -> set[int]:
    """Counters NNNNN of entries ``<name>_<NNNNN>`` (alone or followed by '_' or '.') in ``folder``.
    Temp files start with '.' and never match."""
    pattern = re.compile(rf"{re.escape(name)}_(\d{{5}})(?=$|[_.])")
    try:
        entries = os.listdir(folder)
    except FileNotFoundError:
        return set()
    return {int(m.group(1)) for entry in entries if (m := pattern.match(entry))}


def reserve_numbered(parent: str, name: str, also_used: Iterable[int] = ()) -> tuple[int, str]:
    """Create the folder ``parent/<name>_<NNNNN>`` with a counter above every one in use (in ``parent``
    and ``also_used``) and return (counter, folder). ``os.mkdir`` is the reservation: two runs racing for
    one counter cannot both create it; the loser takes the next."""
    os.makedirs(parent, exist_ok=True)
    counter = max(used_counters(parent, name) | set(also_used), default=0) + 1
    while True:
        folder = os.path.join(parent, f"{name}_{counter:05d}")
        try:
            os.mkdir(folder)
            return counter, folder
        except FileExistsError:
            counter += 1


# --- writing -----------------------------------------------------------------------------------------
def _exists_error(path: str) -> FileExistsError:
    return FileExistsError(f"'{path}' already exists and belongs to another run: it is never replaced. "
                           "Move it away, or use another name")


def _new_temp(path: str) -> str:
    folder, base = os.path.split(path)
    while True:
        tmp = os.path.join(folder, f".{base}.{secrets.token_hex(6)}{TEMP_SUFFIX}")
        try:  # O_EXCL: ours alone; mode 0o666 & umask, as a plain open() would give the final file
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0), 0o666))
            return tmp
        except FileExistsError:
            continue


def _fsync(path: str, directory: bool = False) -> None:
    """Flush a file's data (errors raise) or a folder's entries (best effort: after the rename the file is
    already complete under its name; the folder sync only makes the rename survive a power cut)."""
    if directory:
        if os.name == "nt":  # Windows cannot open folders for fsync; its renames are journaled
            return
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return
    else:
        fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def _publish(tmp: str, path: str, replace: bool) -> None:
    if replace:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic, and fails when the name exists
    except FileExistsError:
        raise _exists_error(path) from None
    except (OSError, AttributeError, NotImplementedError):  # no hard links here (FAT/exFAT, some shares)
        if os.name == "nt":
            try:
                os.rename(tmp, path)  # Windows' rename never replaces an existing file
            except FileExistsError:
                raise _exists_error(path) from None
            return
        if os.path.lexists(path):
            raise _exists_error(path) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def atomic_save(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None, *,
                replace: bool = False) -> str:
    """Write ``tensors`` as safetensors to ``path`` atomically: the file at ``path`` is either the previous
    one or the complete new one, whatever happens (see the module docstring). ``replace=False`` (the
    default): an existing ``path`` is an error (FileExistsError), checked before anything is written and
    again, atomically, when publishing. ``replace=True``: only for a file the caller owns. A full disk
    raises an OSError that says so and names the path. ``metadata``: the safetensors header's str → str map
    (``metadata.py``), checked before anything is written."""
    if metadata is not None:
        check_metadata(metadata)
    return _atomic_write(path, lambda tmp: save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                                                     tmp, metadata=metadata), replace)


def atomic_write_bytes(data: bytes, path: str, *, replace: bool = False) -> str:
    """``atomic_save`` for a file's bytes (e.g. a PNG): complete or absent, never replacing another's file."""
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    return _atomic_write(path, write, replace)


def _atomic_write(path: str, write, replace: bool) -> str:
    """Temp file in the destination's folder, ``write(tmp)``, fsync, publish (module docstring)."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    if not replace and os.path.lexists(path):
        raise _exists_error(path)
    tmp = _new_temp(path)
    try:
        write(tmp)
        _fsync(tmp)  # the data is on disk before the name points at it
        _publish(tmp, path, replace)
    except BaseException as exc:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            raise OSError(exc.errno, f"not enough disk space to write '{path}' ({exc.strerror or exc}). Nothing "
                                     "was written under that name and earlier files are intact: free disk space "
                                     "and run again") from exc
        raise
    _fsync(folder, directory=True)  # the rename itself survives a power cut
    return path


# --- reading -----------------------------------------------------------------------------------------
def _damaged(path: str, what: str, exc: BaseException) -> DamagedFileError:
    return DamagedFileError(f"{what} '{path}' is damaged or incomplete (cut off by a crash, a full disk or an "
                            f"unfinished copy?) and cannot be read: {exc}. Delete or replace that file.")


def read_header(path: str, what: str) -> dict[str, str]:
    """The safetensors metadata of ``path`` (reads the header only)."""
    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except SafetensorError as exc:
        raise _damaged(path, what, exc) from None


def read_tensors(path: str, what: str, device="cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of ``path``."""
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except SafetensorError as exc:
        raise _damaged(path, what, exc) from None
