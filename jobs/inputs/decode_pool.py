"""Decoding in child processes, where a decode that hangs can be ended.

A thread cannot be interrupted: an FFmpeg call that never returns would hold a worker for good.
So each decode runs in one of a few child processes; if a sample is not decoded within its
timeout, its process is killed and replaced, the sample fails with a clear reason, and the
worker goes on. The encoded bytes go to the child through a pipe; the child probes the sample
and sends back the clips it plans (`jobs.inputs.sampling`), the parent allocates shared memory
of their size, and the child decodes into it; the parent frees it. A clip whose pixels are whole
numbers before their scaling to [-1, 1] (FFmpeg's scaler, or frames that need no resize) travels
as uint8, a quarter of the bytes, and becomes float on the encoder's device (`signed_unit`).

    pool = DecodePool(processes=2, timeout=300)
    clips = pool.submit(video_bytes, ClipSpec(ClipRequest(17, 256, 256)), key).result()   # raises VideoError
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import multiprocessing.forkserver
import multiprocessing.spawn
import os
import queue
import signal
import sys
import threading
import typing
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from typing import Any, Literal

import numpy as np
import torch

from jobs.inputs.forkserver import CONTEXT  # children come from a clean fork server
from jobs.inputs.sampling import ClipPlan, ClipRequest, ResizeMode
from jobs.inputs.video import Clip, DecodeLimits, FrameSizeChanged, RunClock, VideoError, VideoFile, VideoInfo
from vae.errors import describe_error

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1  # prctl(2)


@dataclass(frozen=True)
class ClipSpec:
    """What to cut out of a sample, and what decoding it may cost."""

    request: ClipRequest
    limits: DecodeLimits = DecodeLimits()
    uint8: bool = True  # clips of whole pixels come back as uint8 (`run.uint8_frames`)


def clip_nbytes(plan: ClipPlan, uint8: bool) -> int:
    return plan.nbytes // 4 if uint8 else plan.nbytes  # `nbytes` counts float32


DecodePriority = Literal["idle", "low", "normal"]


def lower_priority(priority: DecodePriority) -> None:
    """Sets this process's CPU priority against its parent's: `normal` leaves it; `low` is nice 19;
    `idle` is Linux's SCHED_IDLE, under which the process runs only on a CPU that no normal process
    wants, and a normal one that wakes takes its CPU at once (nice 19 where there is none)."""
    if priority == "normal":
        return
    os.setpriority(os.PRIO_PROCESS, 0, 19)  # (raising one's own nice needs no privilege)
    if priority == "idle" and hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError:  # a sandbox that refuses it: nice 19 is the nearest
            pass


def _child(conn: Connection, priority: DecodePriority) -> None:
    """A decoding process: (bytes, spec, key) in; ("plan", (plans, uint8 flags)) out, a shared memory
    name in, then ("ok", info) out, or the plan again in float32 (a frame changed size) and so on;
    or ("video", reason) out at any step."""
    _end_with_parent()
    lower_priority(priority)  # (first: a thread started later inherits it)
    torch.set_num_threads(1)  # the pool's processes share the actor's CPUs
    while True:
        try:
            data, spec, key = conn.recv()
        except EOFError:
            return
        try:
            video = VideoFile(data, spec.limits)
            plans = video.clips(spec.request, key)
            uint8 = [spec.uint8 and video.whole_pixels(plan, spec.request.resize) for plan in plans]
            conn.send(("plan", (plans, uint8)))
            try:
                _decode_into(conn.recv(), video, plans, uint8, spec.request.resize)
            except FrameSizeChanged:
                uint8 = [False] * len(plans)
                conn.send(("plan", (plans, uint8)))
                _decode_into(conn.recv(), video, plans, uint8, spec.request.resize)
            conn.send(("ok", asdict(video.info)))
        except VideoError as e:
            conn.send(("video", str(e)))
        except Exception as e:  # a sample must not end the process: the parent makes it an error row
            conn.send(("video", f"decode failed: {describe_error(e)}"))


def _end_with_parent() -> None:
    """On Linux, has the kernel SIGKILL this process when its parent, the fork server, ends. The
    server ends with the process that started it (an encoder actor, killed say), and Ray ends only
    the actor's own process: an idle decoding process then sees its pipe close and returns, but one
    caught in a decode that hangs would go on spinning, with no parent left to end it at its time
    limit. (A server that ended in the instant between the fork and this call is not noticed.)"""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _decode_into(name: str, video: VideoFile, plans: list[ClipPlan], uint8: list[bool], resize: ResizeMode) -> None:
    shm = SharedMemory(name=name)
    try:
        for plan, out in zip(plans, _views(shm, plans, uint8)):
            video.decode(plan, out, resize)
            del out
    finally:
        shm.close()


def _views(shm: SharedMemory, plans: list[ClipPlan], uint8: list[bool]) -> Iterator[torch.Tensor]:
    """Each clip's tensor in the shared memory, one after another."""
    offset = 0
    for plan, whole in zip(plans, uint8):
        shape = (3, plan.num_frames, plan.height, plan.width)
        dtype = np.uint8 if whole else np.float32
        yield torch.from_numpy(np.ndarray(shape, dtype=dtype, buffer=shm.buf, offset=offset))
        offset += clip_nbytes(plan, whole)


def _free(shm: SharedMemory) -> None:
    shm.close()
    shm.unlink()


class DecodeUnavailable(RuntimeError):
    """The decoding processes cannot be started: the worker's failure, not a sample's (the shard's
    attempt fails and is retried instead of its samples becoming error rows)."""


class _ProcessDied(VideoError):
    """The decoding process died while it decoded the sample."""


def _ended(pid: int | None) -> bool:
    """Whether process `pid` has ended (gone, or a zombie not yet reaped); False where unknown."""
    if pid is None or not sys.platform.startswith("linux"):
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _forget_fork_server() -> None:
    """Drops multiprocessing's record of a fork server that is gone, so the next start launches a new
    one (Python's own check, `waitpid` on it, fails for good once the process was reaped elsewhere)."""
    server = getattr(mp.forkserver, "_forkserver", None)
    if server is None:
        return
    with server._lock:
        if server._forkserver_alive_fd is not None:
            try:
                os.close(server._forkserver_alive_fd)
            except OSError:
                pass
        server._forkserver_address = server._forkserver_alive_fd = server._forkserver_pid = None


_starting = threading.local()  # `_starting.child`: this thread is starting a decoding process


def _preparation_data(name: str) -> dict[str, Any]:
    """multiprocessing's data for a child's start, without the parent's main module while this thread
    starts a decoding process.

    multiprocessing has every child it starts run the parent's main module first, so that it can
    unpickle what that module defines. In an encoder actor that is Ray's `default_worker.py`, which
    imports all of ray: each decoding process took about 0.4 s to start on two cores, and the
    actor's first samples waited for it. A decoding process needs nothing of it (`_child` and its
    arguments are defined in this package). Only the thread that starts one is affected: others,
    and other processes started by this one, get multiprocessing's data as it is.
    """
    data = _PREPARATION_DATA(name)
    if getattr(_starting, "child", False):
        data.pop("init_main_from_path", None)
        data.pop("init_main_from_name", None)
    return data


# multiprocessing's own function (once, should this module be imported again), then this one in its place
# (`popen_forkserver` looks it up at each start).
_PREPARATION_DATA = getattr(mp.spawn.get_preparation_data, "__wrapped__", mp.spawn.get_preparation_data)
_preparation_data.__wrapped__ = _PREPARATION_DATA  # type: ignore[attr-defined]
mp.spawn.get_preparation_data = _preparation_data


class _Slot:
    """One child process and the thread that feeds it tasks."""

    def __init__(self, pool: DecodePool, number: int) -> None:
        self.pool = pool
        self.number = number
        self.process: Any = None
        self.conn: Connection | None = None
        self.server: int | None = None  # the pid of the fork server its process came from
        self.thread = threading.Thread(target=self._serve, name=f"decode-{number}", daemon=True)
        self.thread.start()

    def _start(self) -> None:
        """Starts the decoding process; if the fork server is gone (killed, say by the OOM killer,
        and reaped), it is forgotten and started afresh once.

        Raises:
            DecodeUnavailable: No decoding process can be started (not a sample's fault).
        """
        for attempt in (1, 2):
            parent, child = CONTEXT.Pipe()
            process = CONTEXT.Process(
                target=_child, args=(child, self.pool.priority), name=f"decode-{self.number}", daemon=True
            )
            try:
                _starting.child = True
                try:
                    process.start()
                finally:
                    _starting.child = False
            except (OSError, EOFError) as e:  # ChildProcessError, ConnectionRefusedError, a closed pipe
                parent.close()
                child.close()
                if attempt == 2:
                    raise DecodeUnavailable(f"no decoding process can be started: {describe_error(e)}") from e
                log.warning("the fork server of the decoding processes is gone (%s); starting a new one", e)
                _forget_fork_server()
                continue
            child.close()
            self.process, self.conn = process, parent
            self.server = getattr(getattr(mp.forkserver, "_forkserver", None), "_forkserver_pid", None)
            return

    def _stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.join()
        if self.conn is not None:
            self.conn.close()
        self.process = self.conn = None

    def _serve(self) -> None:
        try:
            self._start()  # at once, not at the first sample: the start (imports) overlaps the caller's work
        except DecodeUnavailable as e:  # started again at the first sample, which then fails with the reason
            log.warning("decoding process %d did not start: %s", self.number, describe_error(e))
            self._stop()
        while True:
            task = self.pool._tasks.get()
            if task is None:
                self._stop()
                return
            data, spec, key, future = task
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self._decode_anew_if_the_server_ended(data, spec, key))
            except BaseException as e:
                future.set_exception(e)

    def _decode_anew_if_the_server_ended(self, data: bytes, spec: ClipSpec, key: str) -> list[Clip]:
        """A decoding process ends with its fork server (`_end_with_parent`): if the server ended
        (killed, say by the OOM killer) while the sample was decoded, the sample is not to blame,
        and is decoded once more in a process of a new server."""
        try:
            return self._decode(data, spec, key)
        except _ProcessDied:
            if not _ended(self.server):
                raise
            log.warning("the fork server of the decoding processes ended mid-sample; decoding %s again", key)
            return self._decode(data, spec, key)

    def _decode(self, data: bytes, spec: ClipSpec, key: str) -> list[Clip]:
        if self.process is None or not self.process.is_alive():
            self._stop()
            self._start()
        assert self.conn is not None
        clock = RunClock(self.process.pid)  # the sample's time, less the time its process waited for a CPU
        self.conn.send((data, spec, key))
        kind, payload = self._receive(clock)
        shm: SharedMemory | None = None
        try:
            while kind == "plan":  # again, in float32, where a frame changed size mid-clip
                if shm is not None:
                    _free(shm)
                plans, uint8 = payload
                shm = SharedMemory(create=True, size=max(1, sum(map(clip_nbytes, plans, uint8))))
                self.conn.send(shm.name)
                kind, payload = self._receive(clock)
            if kind == "video":
                raise VideoError(payload)
            assert shm is not None
            info = VideoInfo(**payload)
            return [Clip(view.clone(), info, plan) for plan, view in zip(plans, _views(shm, plans, uint8))]
        except VideoError:
            raise
        except BaseException:  # (the shared memory could not be made, say): the child may still wait for
            self._stop()  # its name, and would take the next sample for it; a fresh one takes that
            raise
        finally:
            if shm is not None:
                _free(shm)

    def _receive(self, clock: RunClock) -> tuple[str, Any]:
        assert self.conn is not None
        timeout, wall_limit = self.pool.timeout, self.pool.timeout * self.pool.wait_allowance
        left = timeout - clock.wall()  # its own time is at most the wall time: the kernel is asked only then
        while not self.conn.poll(max(0.0, min(left, wall_limit - clock.wall()))):
            left = timeout - clock.seconds()
            if left > 0 and clock.wall() < wall_limit:  # it waited for a CPU meanwhile
                continue
            self._stop()  # killed: the hang (or the slow decode) ends here; a fresh process takes the next
            raise VideoError(
                f"decoding did not finish within {self.pool.timeout:g} s (limits.decode_timeout_s); "
                "its process was ended"
            )
        try:
            return self.conn.recv()
        except (EOFError, OSError) as e:  # the child died (a crash in FFmpeg, the OOM killer)
            self._stop()
            raise _ProcessDied(f"the decoding process died ({describe_error(e)})") from e


class DecodePool:
    """Decodes samples in `processes` child processes, each sample within `timeout` seconds.

    Args:
        processes: Child processes (and decodes at a time).
        timeout: Seconds a sample may take from the moment its process starts on it, less the time
            the process waits for a CPU; then the process is killed and the sample fails with
            `VideoError`.
        priority: The processes' CPU priority against the caller's (`lower_priority`): beside a
            model on the same cores, `idle` has them decode only in the time it leaves.

    A sample's time leaves out its process's waits for a CPU, up to `wait_allowance` times
    `timeout` in all: a hang kept from the CPU by other work is still ended in bounded time.
    """

    wait_allowance = 10.0

    def __init__(self, processes: int, timeout: float, priority: DecodePriority = "normal") -> None:
        if priority not in typing.get_args(DecodePriority):
            raise ValueError(f"a decoding priority is one of {typing.get_args(DecodePriority)}; got {priority!r}")
        self.timeout = timeout
        self.priority = priority
        self._tasks: queue.Queue[tuple[bytes, ClipSpec, str, Future[list[Clip]]] | None] = queue.Queue()
        self._slots = [_Slot(self, i) for i in range(processes)]

    def submit(self, data: bytes, spec: ClipSpec, key: str = "") -> Future[list[Clip]]:
        """The future clips of sample `key`; `result()` raises VideoError for a sample that gives none."""
        future: Future[list[Clip]] = Future()
        self._tasks.put((data, spec, key, future))
        return future

    def close(self) -> None:
        """Ends the child processes once the submitted work is done."""
        for _ in self._slots:
            self._tasks.put(None)
        for slot in self._slots:
            slot.thread.join()
