"""Save a checkpoint: where it may go, the bounded shard writer, and the atomic commit.

The output is built in ``DST.partial-<pid>`` (created before anything slow runs, so an unwritable destination is
found first) and renamed to DST only when complete. ``--overwrite`` replaces only what is recognisably one of
our checkpoints (or an empty directory), and never the current directory, a home directory, ``/``, the source or
a directory holding any of them. Temporary directories of killed conversions (their process is gone) are removed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from collections.abc import Iterator
from typing import Any

from .. import interrupts
from ..format import QUANT_METHOD, SIDECAR_NAME, FormatError, resolve_inside
from .errors import ConversionError

DEFAULT_MAX_SHARD_BYTES = 2 * 1000**3  # output shards of at most ~2 GB (one tensor larger than that gets its own)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "preprocessor_config.json",
    "processor_config.json",
)

_NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


# ----------------------------------------------------------------------------------------------------------
# write errors -> one line
# ----------------------------------------------------------------------------------------------------------
def _as_oserror(e: BaseException) -> OSError | None:
    """An OSError for ``e`` (safetensors reports I/O errors as ``IoError(Os { code: 28, ... })`` strings)."""
    if isinstance(e, OSError):
        return e
    m = re.search(r"\bcode:\s*(\d+)", str(e))
    if m and ("IoError" in str(e) or "Os {" in str(e)):
        code = int(m.group(1))
        return OSError(code, os.strerror(code))
    return None


@contextlib.contextmanager
def write_errors(dst: str) -> Iterator[None]:
    """Translate an I/O error while writing the output into a one-line ConversionError."""
    try:
        yield
    except Exception as e:
        ose = _as_oserror(e)
        if ose is None:
            raise
        if ose.errno in _NO_SPACE:
            raise ConversionError(
                f"no space left on device while writing {dst}; nothing was written (the "
                "partial output is removed) - free some space or choose another DST"
            ) from None
        raise ConversionError(f"cannot write {dst}: {ose.strerror or ose}") from None


# ----------------------------------------------------------------------------------------------------------
# the destination
# ----------------------------------------------------------------------------------------------------------
def is_our_checkpoint(path: str) -> bool:
    """A directory holding config.json with quant_method superweight_rtn and its sidecar file."""
    try:
        with open(os.path.join(path, "config.json"), "rb") as f:
            qc = json.loads(f.read().decode("utf-8")).get("quantization_config")
        if not isinstance(qc, dict) or str(qc.get("quant_method", "")).lower() != QUANT_METHOD:
            return False
        return os.path.isfile(resolve_inside(path, qc.get("sidecar", SIDECAR_NAME), "sidecar"))
    except (OSError, ValueError, AttributeError, FormatError):
        return False


def _contains(outer: str, inner: str) -> bool:
    """Whether real path ``inner`` is ``outer`` or lies inside it."""
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Destination:
    """Where one conversion writes: checks (``__init__``), temporary directory (``prepare``), ``commit``/``abort``."""

    def __init__(self, dst: str, source_path: str, overwrite: bool) -> None:
        if not dst or not str(dst).strip():
            raise ConversionError("DST is empty")
        self.final = os.path.abspath(dst)
        self.parent = os.path.dirname(self.final)
        self.name = os.path.basename(self.final)
        self.overwrite = overwrite
        self.tmp = f"{self.final}.partial-{os.getpid()}"
        self._created: list[str] = []  # parent directories this conversion created
        self.committed = False  # the finished checkpoint is at ``final`` (nothing to clean up any more)
        self._check(source_path)

    # -- checks -------------------------------------------------------------------------------------------
    def _check(self, source_path: str) -> None:
        real = os.path.realpath(self.final)
        for what, path in (
            ("the root directory", "/"),
            ("the current directory", os.getcwd()),
            ("a home directory", os.path.expanduser("~")),
        ):
            p = os.path.realpath(path)
            if _contains(real, p):
                which = what if real == p else f"a directory holding {what} {p}"
                raise ConversionError(f"DST {self.final} is {which}; choose a new directory for the checkpoint")
        src = os.path.realpath(source_path)
        src_dir = src if os.path.isdir(src) else os.path.dirname(src)
        if _contains(real, src) or (os.path.isdir(src) and _contains(src, real)):
            raise ConversionError(f"DST {self.final} would overlap the source {source_path}; choose another directory")
        if os.path.isfile(src) and _contains(real, src_dir):
            raise ConversionError(f"DST {self.final} holds the source {source_path}; choose another directory")
        if os.path.lexists(self.final):
            self._check_replaceable()
        elif os.path.lexists(self.parent) and not os.path.isdir(self.parent):
            raise ConversionError(f"{self.parent} is not a directory")

    def _check_replaceable(self) -> None:
        if not self.overwrite:
            raise ConversionError(f"{self.final} already exists (pass --overwrite to replace it)")
        if os.path.islink(self.final):
            raise ConversionError(f"{self.final} is a symbolic link; not replacing it (remove it yourself)")
        if not os.path.isdir(self.final):
            raise ConversionError(f"{self.final} is a file, not a checkpoint directory; not replacing it")
        try:
            empty = not os.listdir(self.final)
        except OSError as e:
            raise ConversionError(f"cannot read {self.final}: {e.strerror}") from None
        if not empty and not is_our_checkpoint(self.final):
            raise ConversionError(
                f"{self.final} exists and is not a {QUANT_METHOD} checkpoint (no config.json with quant_method "
                f"{QUANT_METHOD} and its sidecar); --overwrite only replaces a checkpoint or an empty directory - "
                "choose another DST or remove it yourself"
            )

    # -- temporary directory ------------------------------------------------------------------------------
    def prepare(self, log: Any = None) -> None:
        """Create the parent (if needed) and the temporary directory; remove leftovers of killed conversions.

        Each directory is created and recorded with interrupts held back, so :meth:`abort` (call it however this
        ends) removes exactly what was created."""
        missing = []
        p = self.parent
        while not os.path.lexists(p):
            missing.append(p)
            p = os.path.dirname(p)
        for d in reversed(missing):
            with interrupts.critical():
                self._mkdir(d)
                self._created.append(d)
        self._remove_stale(log)
        if os.path.lexists(self.tmp):  # our own pid: a previous run in this process that was killed
            shutil.rmtree(self.tmp) if os.path.isdir(self.tmp) and not os.path.islink(self.tmp) else os.remove(self.tmp)
        with interrupts.critical():
            self._mkdir(self.tmp)

    def _mkdir(self, path: str) -> None:
        try:
            os.mkdir(path)
        except OSError as e:
            parent = os.path.dirname(path)
            if e.errno == errno.ENOENT and os.path.isdir(parent):
                why = f"{parent} does not accept new directories ({e.strerror})"
            elif e.errno in (errno.EACCES, errno.EPERM):
                why = f"permission denied in {parent}"
            elif e.errno == errno.EROFS:
                why = f"{parent} is on a read-only file system"
            elif e.errno in _NO_SPACE:
                why = f"no space left on the device of {parent}"
            else:
                why = f"cannot create {path} ({e.strerror or e})"
            self.abort()
            raise ConversionError(f"cannot write the destination {self.final}: {why}") from None

    def _remove_stale(self, log: Any) -> None:
        pat = re.compile(re.escape(self.name) + r"\.partial-(\d+)$")
        try:
            names = sorted(os.listdir(self.parent))
        except OSError:
            return
        for fn in names:
            m = pat.fullmatch(fn)
            if m is None or int(m.group(1)) == os.getpid():
                continue
            path = os.path.join(self.parent, fn)
            if _pid_alive(int(m.group(1))):
                if log:
                    log(f"note: {path} belongs to a running conversion (pid {m.group(1)}); left alone")
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.remove(path)
            if log:
                log(f"removed {path}, left by a killed conversion (pid {m.group(1)} is gone)")

    # -- end ----------------------------------------------------------------------------------------------
    def commit(self) -> None:
        """Move the finished checkpoint into place (an old DST is replaced only now). Interrupts are held back
        until it is in place and ``committed`` is set: one that arrived meanwhile is raised after that."""
        with interrupts.critical():
            self._commit()

    def _commit(self) -> None:
        if os.path.lexists(self.final):
            if not self.overwrite:
                raise ConversionError(
                    f"{self.final} appeared during the conversion; not replacing it (use --overwrite)"
                )
            self._check_replaceable()  # it may have changed since the start
            old = f"{self.final}.old-{os.getpid()}"
            os.replace(self.final, old)
            try:
                os.replace(self.tmp, self.final)
            except BaseException:
                os.replace(old, self.final)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.final)
        self._created = []
        self.committed = True

    def abort(self) -> None:
        """Remove the temporary directory and the parent directories this conversion created (a further
        interrupt waits until that is done); nothing once committed."""
        if self.committed:
            return
        with interrupts.critical():
            shutil.rmtree(self.tmp, ignore_errors=True)
            for d in reversed(self._created):
                with contextlib.suppress(OSError):
                    os.rmdir(d)
            self._created = []


# ----------------------------------------------------------------------------------------------------------
# shards and small files
# ----------------------------------------------------------------------------------------------------------
def save_file(tensors: dict[str, Any], path: str) -> None:
    """One safetensors shard (the usual file permissions, not safetensors' 0600)."""
    from safetensors.torch import save_file as st_save

    try:
        st_save(tensors, path, metadata={"format": "pt"})
    except Exception as e:
        ose = _as_oserror(e)
        if ose is not None:
            raise ose from None
        raise
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


class ShardWriter:
    """Accumulates output tensors and writes safetensors shards of bounded size (deterministic bytes)."""

    def __init__(self, directory: str, max_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
        self.dir = directory
        self.max_bytes = int(max_bytes)
        self.cur: dict[str, Any] = {}
        self.cur_bytes = 0
        self.parts: list[tuple[str, list[str], int]] = []  # (temp file name, tensor names, bytes)
        self.total_bytes = 0

    def add(self, name: str, t: Any) -> None:
        nb = t.numel() * t.element_size()
        if self.cur and self.cur_bytes + nb > self.max_bytes:
            self.flush()
        self.cur[name] = t.detach().cpu().contiguous()
        self.cur_bytes += nb

    def flush(self) -> None:
        if not self.cur:
            return
        fn = f"part-{len(self.parts) + 1:05d}.safetensors"
        save_file(self.cur, os.path.join(self.dir, fn))
        self.parts.append((fn, sorted(self.cur), self.cur_bytes))
        self.total_bytes += self.cur_bytes
        self.cur, self.cur_bytes = {}, 0

    def finish(self) -> list[str]:
        """Rename the parts to HF shard names, write the index when sharded; returns the file names."""
        self.flush()
        if len(self.parts) == 1:
            os.replace(os.path.join(self.dir, self.parts[0][0]), os.path.join(self.dir, "model.safetensors"))
            return ["model.safetensors"]
        n = len(self.parts)
        weight_map: dict[str, str] = {}
        names = []
        for i, (fn, tnames, _) in enumerate(self.parts, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.dir, fn), os.path.join(self.dir, final))
            names.append(final)
            for t in tnames:
                weight_map[t] = final
        write_json(
            os.path.join(self.dir, "model.safetensors.index.json"),
            {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))},
        )
        return names


def write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def copy_tokenizer_files(source: Any, tmp: str, tokenizer: Any = None, model: Any = None) -> list[str]:
    """Tokenizer / generation / chat-template files of the source (saved from the objects for GGUF)."""
    copied = []
    if source.kind == "hf":
        for fn in sorted(os.listdir(source.path)):
            if fn in TOKENIZER_FILES or fn.endswith(".model") or fn.endswith(".tiktoken"):
                src = os.path.join(source.path, fn)
                if os.path.isfile(src):
                    shutil.copyfile(src, os.path.join(tmp, fn))
                    copied.append(fn)
        return copied
    before = set(os.listdir(tmp))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if model is not None and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    return sorted(set(os.listdir(tmp)) - before)
