"""Decoding in child processes, where a decode that hangs can be ended.

A thread cannot be interrupted: an FFmpeg call that never returns would hold a worker for good.
So each decode runs in one of a few child processes; if a sample is not decoded within its
timeout, its process is killed and replaced, the sample fails with a clear reason, and the
worker goes on. The encoded bytes go to the child through a pipe; the clip comes back through
shared memory that the parent allocates (it knows the clip's size) and frees.

    pool = DecodePool(processes=2, timeout=300)
    clip = pool.submit(video_bytes, ClipSpec(17, 256, 256)).result()   # raises VideoError
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import threading
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np
import torch

from jobs.inputs.video import Clip, VideoError, VideoInfo, read_clip
from vae.errors import describe_error

log = logging.getLogger(__name__)

# Children are forked from a clean server process (not from a process with threads), which
# imports the decoder once.
_CONTEXT = mp.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["jobs.inputs.video"])


@dataclass(frozen=True)
class ClipSpec:
    """What to decode from a sample (see `read_clip`)."""

    num_frames: int
    height: int
    width: int
    threads: int = 1
    max_pixels: int | None = None
    timeout: float | None = None  # the decoder's own check, after every frame

    @property
    def nbytes(self) -> int:
        return 3 * self.num_frames * self.height * self.width * 4  # float32


def _child(conn: Connection) -> None:
    """A decoding process: (shared memory name, bytes, spec) in; ("ok", info) or an error out."""
    torch.set_num_threads(1)  # the pool's processes share the actor's CPUs
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        name, data, spec = message
        try:
            clip = read_clip(
                data, spec.num_frames, spec.height, spec.width, spec.threads, spec.max_pixels, spec.timeout
            )
            shm = SharedMemory(name=name)
            try:
                out = np.ndarray(tuple(clip.pixels.shape), dtype=np.float32, buffer=shm.buf)
                out[...] = clip.pixels.numpy()
                del out
            finally:
                shm.close()
            conn.send(("ok", asdict(clip.info)))
        except VideoError as e:
            conn.send(("video", str(e)))
        except Exception as e:  # a sample must not end the process: the parent makes it an error row
            conn.send(("error", f"decode failed: {describe_error(e)}"))


class _Slot:
    """One child process and the thread that feeds it tasks."""

    def __init__(self, pool: DecodePool, number: int) -> None:
        self.pool = pool
        self.number = number
        self.process: Any = None
        self.conn: Connection | None = None
        self.thread = threading.Thread(target=self._serve, name=f"decode-{number}", daemon=True)
        self.thread.start()

    def _start(self) -> None:
        parent, child = _CONTEXT.Pipe()
        self.process = _CONTEXT.Process(target=_child, args=(child,), name=f"decode-{self.number}", daemon=True)
        self.process.start()
        child.close()
        self.conn = parent

    def _stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.join()
        if self.conn is not None:
            self.conn.close()
        self.process = self.conn = None

    def _serve(self) -> None:
        while True:
            task = self.pool._tasks.get()
            if task is None:
                self._stop()
                return
            data, spec, future = task
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self._decode(data, spec))
            except BaseException as e:
                future.set_exception(e)

    def _decode(self, data: bytes, spec: ClipSpec) -> Clip:
        if self.process is None or not self.process.is_alive():
            self._stop()
            self._start()
        assert self.conn is not None
        shm = SharedMemory(create=True, size=max(1, spec.nbytes))
        try:
            self.conn.send((shm.name, data, spec))
            if not self.conn.poll(self.pool.timeout):
                self._stop()  # killed: the hang (or the slow decode) ends here; a fresh process takes the next
                raise VideoError(
                    f"decoding did not finish within {self.pool.timeout:g} s (limits.decode_timeout_s); "
                    "its process was ended"
                )
            try:
                kind, payload = self.conn.recv()
            except (EOFError, OSError) as e:  # the child died (a crash in FFmpeg, the OOM killer)
                self._stop()
                raise VideoError(f"the decoding process died ({describe_error(e)})") from e
            if kind == "video":
                raise VideoError(payload)
            if kind == "error":
                raise VideoError(payload)
            shape = (3, spec.num_frames, spec.height, spec.width)
            pixels = torch.from_numpy(np.ndarray(shape, dtype=np.float32, buffer=shm.buf).copy())
            return Clip(pixels=pixels, info=VideoInfo(**payload))
        finally:
            shm.close()
            shm.unlink()


class DecodePool:
    """Decodes samples in `processes` child processes, each sample within `timeout` seconds.

    Args:
        processes: Child processes (and decodes at a time).
        timeout: Seconds a sample may take from the moment its process starts on it; then the
            process is killed and the sample fails with `VideoError`.
    """

    def __init__(self, processes: int, timeout: float) -> None:
        self.timeout = timeout
        self._tasks: queue.Queue[tuple[bytes, ClipSpec, Future[Clip]] | None] = queue.Queue()
        self._slots = [_Slot(self, i) for i in range(processes)]

    def submit(self, data: bytes, spec: ClipSpec) -> Future[Clip]:
        """The future clip of `data`; its `result()` raises VideoError for a sample that cannot give it."""
        future: Future[Clip] = Future()
        self._tasks.put((data, spec, future))
        return future

    def close(self) -> None:
        """Ends the child processes once the submitted work is done."""
        for _ in self._slots:
            self._tasks.put(None)
        for slot in self._slots:
            slot.thread.join()
