"""Reading X-ray files where the settings allow, and never blocking on them.

An ``ImageAccess`` says where images may be read from (``Settings.images``): under its roots
(real paths: no ``..`` or symlink leads out), regular files only (a FIFO or a device is
refused without being read), at most ``max_bytes``, each read given ``read_timeout_s`` on
a few daemon threads (``TimedCalls``: a stalled network mount fails the image, not its
caller). Every refusal is a ``BadImage`` whose message is a short, stable reason
(``REASONS``), never a path. Decoding is ``features.cxr``'s.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote, urlparse

from m3t.settings import ImageSettings, Settings


class BadImage(ValueError):
    """An image that cannot be used; its message is one of ``REASONS``."""


# Every reason a BadImage carries: short, stable (they label metrics), never a path.
REASONS = (
    "unsupported_uri_scheme",  # not file:// (or file://localhost), nor a plain path
    "bad_uri",  # a path the OS cannot take (a NUL byte, a name too long)
    "outside_image_roots",  # its real path is not under a configured root
    "not_found",  # nothing there (yet: it may still be on its way)
    "not_a_regular_file",  # a directory, FIFO, socket or device
    "too_large",  # over max_bytes (as a file or inflated), a side over max_side, a pixel bomb
    "too_many_frames",  # a DICOM with more than max_frames frames
    "read_timeout",  # the read did not finish within read_timeout_s
    "unreadable_file",  # any other read or DICOM parsing failure
    "not_grayscale",
    "bad_pixels",
    "empty",
    "unreadable_header",
    "truncated_jpeg",
    "unsupported_format",
    "decode_failed",
)
# Reasons that may clear up by themselves: the file may still land, the mount recover.
TRANSIENT = frozenset({"not_found", "read_timeout"})


@dataclass(frozen=True)
class ImageAccess:
    """Where chest X-rays may be read from, and how much of one: ``Settings.images``.

    ``roots`` None reads any path: only for callers that vouch for the path themselves (tests,
    benchmarks on known files). Everything that reads URIs from events or cohorts passes
    ``ImageAccess.from_settings``.
    """

    roots: tuple[Path, ...] | None
    max_bytes: int
    read_timeout_s: float
    max_side: int
    max_frames: int

    @classmethod
    def from_images(
        cls, images: ImageSettings, roots: tuple[Path, ...] | None = None
    ) -> ImageAccess:
        return cls(
            roots=tuple(Path(r) for r in roots) if roots is not None else None,
            max_bytes=images.max_bytes,
            read_timeout_s=images.read_timeout_s,
            max_side=images.max_side,
            max_frames=images.max_frames,
        )

    @classmethod
    def from_settings(cls, settings: Settings, extra_roots: tuple[Path, ...] = ()) -> ImageAccess:
        """The settings' image roots (``Settings.image_roots``) and limits; ``extra_roots``
        are added (the cohort folder an operator names to the offline builder)."""
        return cls.from_images(settings.images, (*settings.image_roots, *extra_roots))


# Default limits, no roots: the settings' defaults (nothing here reads the environment).
UNCONFINED = ImageAccess.from_images(ImageSettings())


# --- reads that may stall -------------------------------------------------------------------

T = TypeVar("T")


class TimedCalls:
    """Runs calls that may block (file reads: a hung network mount, a stalled disk) on daemon
    threads, at most ``threads`` at once, and waits for each until a deadline: a call that
    does not finish by then raises ``BadImage("read_timeout")`` and is abandoned (its thread
    keeps its slot until the call returns, if ever, so stuck calls cannot pile up threads).
    """

    def __init__(self, threads: int = 8):
        self._slots = threading.BoundedSemaphore(threads)

    def start(
        self, call: Callable[[], T], timeout_s: float, slot_deadline: float | None = None
    ) -> Callable[[], T]:
        """Start ``call``; returns ``wait()``, which gives its result or raises what it raised,
        or ``BadImage("read_timeout")`` once ``timeout_s`` have passed since it started.

        A free thread is waited for until ``slot_deadline`` (a ``time.monotonic()`` value;
        default ``timeout_s`` from now): if every thread is stuck, so would this call be."""
        now = time.monotonic()
        slot_deadline = now + timeout_s if slot_deadline is None else slot_deadline
        if not self._slots.acquire(timeout=max(0.0, slot_deadline - now)):
            return _timed_out
        box: list = []
        finished = threading.Event()
        deadline = time.monotonic() + timeout_s

        def run() -> None:
            try:
                box.append((True, call()))
            except BaseException as exc:  # handed to the waiting caller
                box.append((False, exc))
            finally:
                self._slots.release()
                finished.set()

        try:
            threading.Thread(target=run, name="m3t-image-read", daemon=True).start()
        except RuntimeError:  # no thread to be had: as good as stuck
            self._slots.release()
            return _timed_out

        def wait() -> T:
            if not finished.wait(max(0.0, deadline - time.monotonic())):
                raise BadImage("read_timeout")
            ok, value = box[0]
            if ok:
                return value
            raise value

        return wait

    def call(self, call: Callable[[], T], timeout_s: float) -> T:
        return self.start(call, timeout_s)()


def _timed_out():
    raise BadImage("read_timeout")


READ_THREADS = TimedCalls()


def call_with_timeout(call: Callable[[], T], timeout_s: float) -> T:
    """``call()`` on the image-read threads; ``BadImage("read_timeout")`` after ``timeout_s``."""
    return READ_THREADS.call(call, timeout_s)


# --- reading a file under the roots ------------------------------------------------------------


def _path_of(uri: str) -> Path:
    try:
        parsed = urlparse(uri)
    except ValueError:  # an unclosed IPv6 bracket ("//[x/a.dcm"): names nothing
        raise BadImage("bad_uri") from None
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):  # file://host/...: not this machine's file
            raise BadImage("unsupported_uri_scheme")
        return Path(unquote(parsed.path))
    if parsed.scheme != "":
        raise BadImage("unsupported_uri_scheme")
    return Path(uri)


def _inside(real: str, roots: list[str]) -> bool:
    return any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


def _check_stat(st: os.stat_result, access: ImageAccess) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise BadImage("not_a_regular_file")
    if st.st_size > access.max_bytes:
        raise BadImage("too_large")


def _real_roots(access: ImageAccess) -> list[str] | None:
    return None if access.roots is None else [os.path.realpath(r) for r in access.roots]


def _resolve(
    path: Path, base_dir: Path | None, access: ImageAccess, roots: list[str] | None = None
) -> tuple[str, list[str] | None]:
    """``path``'s real path (relative: under ``base_dir``), once it is under a root and a
    regular file within ``max_bytes``; and the roots' real paths (``roots``, if given)."""
    try:
        roots = _real_roots(access) if roots is None else roots
        if not path.is_absolute() and base_dir is not None:
            if roots is not None and not _inside(os.path.realpath(base_dir), roots):
                raise BadImage("outside_image_roots")
            path = Path(base_dir) / path
        real = os.path.realpath(path)
        if roots is not None and not _inside(real, roots):
            raise BadImage("outside_image_roots")
        # stat first: a device or FIFO is refused without even being opened.
        _check_stat(os.stat(real), access)
        return real, roots
    except BadImage:  # a ValueError too
        raise
    except ValueError:  # a NUL byte in the path
        raise BadImage("bad_uri") from None
    except OSError as exc:
        raise BadImage(_os_reason(exc)) from None


def _read_file(
    path: Path, base_dir: Path | None, access: ImageAccess, roots: list[str] | None = None
) -> bytes:
    """The bytes of ``path`` (relative: under ``base_dir``), where ``access`` allows.
    Everything that touches the file system is in here, so it runs under the read timeout."""
    real, roots = _resolve(path, base_dir, access, roots)
    try:
        # O_NONBLOCK: should a FIFO have been put there since, opening it does not wait for
        # a writer; O_NOFOLLOW: nor may a symlink have been.
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise BadImage(_os_reason(exc)) from None
    try:
        _check_stat(os.fstat(fd), access)
        if roots is not None:
            # What was opened, whatever happened to the path between the check and the open.
            opened = f"/proc/self/fd/{fd}"
            if os.path.exists(opened) and not _inside(os.readlink(opened), roots):
                raise BadImage("outside_image_roots")
        chunks, size = [], 0
        while True:
            chunk = os.read(fd, min(1 << 20, access.max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > access.max_bytes:  # it grew since fstat
                raise BadImage("too_large")
        return b"".join(chunks)
    except BadImage:
        raise
    except OSError as exc:
        raise BadImage(_os_reason(exc)) from None
    finally:
        os.close(fd)


def _os_reason(exc: OSError) -> str:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return "not_found"
    if exc.errno in (errno.EISDIR, errno.ENXIO, errno.ENODEV):
        return "not_a_regular_file"
    if exc.errno == errno.ELOOP:  # a symlink swapped in after the check
        return "outside_image_roots"
    if exc.errno == errno.ENAMETOOLONG:
        return "bad_uri"
    return "unreadable_file"


def check_uri(uri: str, base_dir: Path | None = None, access: ImageAccess | None = None) -> None:
    """Raises ``BadImage`` where ``uri`` can never be read under ``access``: another scheme,
    outside the roots, not a regular file, over ``max_bytes``. Nothing is read, only
    resolved and stat'ed (within ``read_timeout_s``). A file not there yet, or a stat that
    stalls, passes: it may still land (the scorer retries those)."""
    access = access or UNCONFINED
    path = _path_of(uri)
    try:
        call_with_timeout(
            functools.partial(_resolve, path, base_dir, access), access.read_timeout_s
        )
    except BadImage as exc:
        if str(exc) not in TRANSIENT:
            raise
