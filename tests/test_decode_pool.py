"""Decoding in child processes: the same clips as in-process, errors passed back, hangs ended."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import in_process_encoder, small_config

from jobs.demo_data import demo_sample, synth_video, video_file_bytes
from jobs.inputs.decode_pool import ClipSpec, DecodePool, _ended
from jobs.inputs.sampling import ClipRequest
from jobs.inputs.video import DecodeLimits, VideoError, read_clip


def spec(num_frames: int, height: int, width: int) -> ClipSpec:
    return ClipSpec(ClipRequest(num_frames, height, width))


@pytest.fixture
def pool():
    pool = DecodePool(2, timeout=60)
    yield pool
    pool.close()


def test_clips_are_the_ones_decoded_in_process_single_threaded(pool):
    data = [demo_sample(0, i)["mp4"] for i in range(4)]
    futures = [pool.submit(d, spec(8, 64, 48)) for d in data]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a decoding process (and in a trainer's DataLoader workers)
    try:
        for d, future in zip(data, futures):
            (clip,), expected = future.result(), read_clip(d, 8, 64, 48)
            assert torch.equal(clip.pixels, expected.pixels) and clip.info == expected.info
    finally:
        torch.set_num_threads(threads)


def test_a_bad_sample_is_its_video_error_and_the_process_goes_on(pool):
    with pytest.raises(VideoError, match="cannot open video"):
        pool.submit(b"junk", spec(8, 64, 64)).result()
    with pytest.raises(VideoError, match="too short"):
        pool.submit(demo_sample(0, 0)["mp4"], spec(500, 64, 64)).result()
    assert pool.submit(demo_sample(0, 1)["mp4"], spec(4, 32, 32)).result()[0].pixels.shape == (3, 4, 32, 32)


def test_any_other_failure_in_the_child_is_the_samples_error_and_the_process_stays(pool):
    # A 0x0 clip makes the resize raise a RuntimeError, not a VideoError: the child's catch-all
    # sends it back as the sample's reason instead of dying with it.
    with pytest.raises(VideoError, match=r"^decode failed: RuntimeError: .*sizes should be greater than 0"):
        pool.submit(demo_sample(0, 0)["mp4"], spec(2, 0, 0)).result()
    pids = {slot.process.pid for slot in pool._slots if slot.process is not None}
    assert pool.submit(demo_sample(0, 1)["mp4"], spec(2, 32, 32)).result()[0].pixels.shape == (3, 2, 32, 32)
    assert pids <= {slot.process.pid for slot in pool._slots if slot.process is not None}  # none was replaced


def test_a_decode_past_its_timeout_is_ended_and_the_next_sample_decodes():
    frames = synth_video(np.random.default_rng(0), 3840, 2160, 2, 24).frames
    slow = video_file_bytes(frames, fps=24)  # a 4K frame takes far longer than 10 ms to decode
    pool = DecodePool(1, timeout=0.01)
    try:
        with pytest.raises(VideoError, match=r"did not finish within 0.01 s \(limits.decode_timeout_s\); its process"):
            pool.submit(slow, spec(2, 64, 64)).result()
        pool.timeout = 60
        (clip,) = pool.submit(demo_sample(0, 0)["mp4"], spec(4, 32, 32)).result()  # in a fresh process
        assert clip.pixels.shape == (3, 4, 32, 32)
    finally:
        pool.close()


def kill_decoding_processes(pool: DecodePool) -> None:
    for slot in pool._slots:
        if slot.process is not None:
            os.kill(slot.process.pid, signal.SIGKILL)
            slot.process.join()


def test_a_decoding_process_that_died_is_replaced(pool):
    assert pool.submit(demo_sample(0, 0)["mp4"], spec(2, 32, 32)).result()
    kill_decoding_processes(pool)
    for i in range(3):
        assert pool.submit(demo_sample(0, i)["mp4"], spec(2, 32, 32)).result()[0].pixels.shape[1] == 2


def test_a_fork_server_killed_and_reaped_is_started_afresh(pool):
    """Python's own check of its fork server (`waitpid`) fails for good once the process was reaped
    elsewhere; the pool then forgets it and starts a new one instead of failing every sample."""
    import multiprocessing.forkserver as forkserver

    assert pool.submit(demo_sample(0, 0)["mp4"], spec(2, 32, 32)).result()
    server = forkserver._forkserver._forkserver_pid
    assert server is not None
    os.kill(server, signal.SIGKILL)
    os.waitpid(server, 0)  # reaped here, as a process manager of the host might
    kill_decoding_processes(pool)
    for i in range(3):
        assert pool.submit(demo_sample(0, i)["mp4"], spec(2, 32, 32)).result()[0].pixels.shape[1] == 2
    assert forkserver._forkserver._forkserver_pid not in (None, server)


def _running(pid: int) -> bool:
    """Whether `pid` runs (not gone, and not a zombie that no one has reaped)."""
    return not _ended(pid)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_a_decoding_process_ends_with_its_fork_server(pool):
    """The fork server ends with the encoder actor that started it; its decoding processes end with
    it, even one whose decode hangs (it would otherwise go on with no parent to end it). Here the
    server is killed while a decoding process waits, alive, for the pool's next sample."""
    import multiprocessing.forkserver as forkserver

    assert pool.submit(demo_sample(0, 0)["mp4"], spec(2, 32, 32)).result()
    children = [slot.process.pid for slot in pool._slots if slot.process is not None]
    assert children and all(map(_running, children))
    os.kill(forkserver._forkserver._forkserver_pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(map(_running, children)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(_running, children))
    for i in range(3):  # and the pool goes on, with a new server and new processes
        assert pool.submit(demo_sample(0, i)["mp4"], spec(2, 32, 32)).result()[0].pixels.shape[1] == 2


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_a_sample_being_decoded_when_the_fork_server_is_killed_is_decoded_again_not_blamed():
    """The fork server killed (the OOM killer) while a sample decodes takes the decoding process with
    it; the sample is not at fault, and is decoded again in a process of a new server."""
    import multiprocessing.forkserver as forkserver

    frames = synth_video(np.random.default_rng(1), 3840, 2160, 4, 24).frames
    slow = video_file_bytes(frames, fps=24)  # 4K frames: a decode long enough to be caught in
    pool = DecodePool(1, timeout=60)
    try:
        assert pool.submit(demo_sample(0, 0)["mp4"], spec(2, 32, 32)).result()  # (its process is up)
        busy = pool._slots[0].process.pid
        before = _cpu_ticks(busy)
        future = pool.submit(slow, spec(4, 64, 64))
        deadline = time.monotonic() + 30
        while _cpu_ticks(busy) < before + 10 and time.monotonic() < deadline:  # 0.1 s into the decode
            time.sleep(0.005)
        assert not future.done()
        os.kill(forkserver._forkserver._forkserver_pid, signal.SIGKILL)
        (clip,) = future.result()
        assert clip.pixels.shape == (3, 4, 64, 64) and pool._slots[0].process.pid != busy
    finally:
        pool.close()


MAIN_SCRIPT = """
import os, sys
if __name__ != "__main__":  # run again as `__mp_main__`, by a child process, before its work
    with open(os.environ["IMPORTED_AS"], "a") as f:
        f.write(__name__ + "\\n")
else:
    from jobs.demo_data import demo_sample
    from jobs.inputs.decode_pool import ClipSpec, DecodePool
    from jobs.inputs.sampling import ClipRequest

    pool = DecodePool(2, timeout=60)
    clips = [pool.submit(demo_sample(0, i)["mp4"], ClipSpec(ClipRequest(2, 32, 32))) for i in range(4)]
    print(sum(c.result()[0].pixels.shape[1] for c in clips))
    pool.close()
"""


def test_a_decoding_process_does_not_run_the_parents_main_module(tmp_path):
    """multiprocessing would have each decoding process run its parent's main module first (in an
    encoder actor, Ray's worker script, which imports all of ray: 0.4 s per process); a decoding
    process needs nothing of it. The parent here is a script that notes each such run."""
    script, noted = tmp_path / "main.py", tmp_path / "imported_as.txt"
    script.write_text(MAIN_SCRIPT)
    env = {**os.environ, "IMPORTED_AS": str(noted), "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["8"]  # the four samples decoded, two frames each
    assert not noted.exists(), noted.read_text()


NO_SHARED_MEMORY_SCRIPT = """
import resource, signal
from jobs.demo_data import demo_sample
from jobs.inputs.decode_pool import ClipSpec, DecodePool
from jobs.inputs.sampling import ClipRequest

if __name__ == "__main__":
    pool = DecodePool(1, timeout=60)
    pool.submit(demo_sample(0, 0)["mp4"], ClipSpec(ClipRequest(2, 32, 32))).result()  # its process is up
    # Files of this process (the shared memory it makes for a clip) may not grow past 64 KiB
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**16, resource.RLIM_INFINITY))
    try:
        pool.submit(demo_sample(0, 1)["mp4"], ClipSpec(ClipRequest(8, 64, 64))).result()  # 384 KiB
    except OSError as e:
        print("failed:", e.strerror)
    (clip,) = pool.submit(demo_sample(0, 2)["mp4"], ClipSpec(ClipRequest(2, 32, 32))).result()  # 24 KiB
    print("next:", tuple(clip.pixels.shape))
    pool.close()
"""


def test_a_sample_whose_shared_memory_cannot_be_made_leaves_the_next_one_whole(tmp_path):
    """The parent fails between the child's plan and the shared memory's name (no room for it): the
    sample fails with the reason, and the next one is decoded as usual, not taken by a child still
    waiting for the name (which would make it an error row with a reason of nonsense)."""
    script = tmp_path / "main.py"
    script.write_text(NO_SHARED_MEMORY_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == ["failed: File too large", "next: (3, 2, 32, 32)"]


def _priorities(pool: DecodePool, expected: tuple[int, int]) -> list[tuple[int, int]]:
    """The pool's processes' (nice, scheduling policy), once each has started and set its own (or
    10 s passed)."""
    deadline = time.monotonic() + 10
    while True:
        pids = [slot.process.pid for slot in pool._slots if slot.process is not None]
        found = [(os.getpriority(os.PRIO_PROCESS, pid), os.sched_getscheduler(pid)) for pid in pids]
        if (len(pids) == len(pool._slots) and set(found) == {expected}) or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


def priority_of(level: str) -> tuple[int, int]:
    """The (nice, scheduling policy) of a decoding process started by this one at `level`."""
    nice, policy = os.getpriority(os.PRIO_PROCESS, 0), os.sched_getscheduler(0)
    return {"normal": (nice, policy), "low": (19, policy), "idle": (19, os.SCHED_IDLE)}[level]


needs_sched_idle = pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux's scheduling policies")


@needs_sched_idle
@pytest.mark.parametrize("level", ["idle", "low", "normal"])
def test_the_decoding_processes_run_at_the_pools_priority(level):
    pool = DecodePool(2, timeout=60, priority=level)
    try:
        assert pool.submit(demo_sample(0, 0)["mp4"], spec(2, 32, 32)).result()
        assert _priorities(pool, priority_of(level)) == [priority_of(level)] * 2
    finally:
        pool.close()


def test_an_unknown_decoding_priority_is_refused():
    with pytest.raises(ValueError, match=r"a decoding priority is one of \('idle', 'low', 'normal'\); got 'nice'"):
        DecodePool(1, timeout=60, priority="nice")  # type: ignore[arg-type]


@pytest.mark.skipif(not os.path.exists("/proc/thread-self/schedstat"), reason="the kernel does not say")
@pytest.mark.skipif(os.getpriority(os.PRIO_PROCESS, 0) >= 10, reason="no room below this process's priority")
def test_a_decode_kept_waiting_for_a_cpu_is_not_taken_for_a_slow_one_within_bounds():
    """A decoding process at the lowest priority, on one CPU beside a busy process: it waits far past
    its time limit for the CPU, and yet its sample decodes (its limit, in the process and in the
    pool, counts only the time it could run), up to the pool's allowance for waiting, after which
    it is ended (a hang kept from the CPU by other work); a decode that hangs with the CPU to
    itself is ended on time (`test_a_decode_past_its_timeout_is_ended_and_the_next_sample_decodes`)."""
    data = demo_sample(0, 0, scale=6)["mp4"]  # about 70 ms of decoding: seconds, kept from the CPU
    # The process's own check: 14x the decode's CPU time (a VM's steal time counts as running time:
    # 0.5 s once failed in CI, "decoding took over 0.5 s (11 frames)")
    within = ClipSpec(ClipRequest(16, 64, 64), DecodeLimits(timeout=1.0))
    pool = DecodePool(1, timeout=1.0, priority="low")  # the pool's, which ends the process
    busy = None
    try:
        assert pool.submit(data, within).result()  # the process started
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(pool._slots[0].process.pid, {cpu})
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        os.sched_setaffinity(busy.pid, {cpu})
        time.sleep(0.2)
        pool.wait_allowance = 60  # (a loaded machine keeps it waiting longer)
        started = time.monotonic()
        (clip,) = pool.submit(data, within).result()
        assert time.monotonic() - started > 1.5  # kept waiting past both limits
        assert clip.pixels.shape == (3, 16, 64, 64)
        pool.wait_allowance = 1.5  # 1.5 s in all
        with pytest.raises(VideoError, match=r"did not finish within 1 s \(limits.decode_timeout_s\)"):
            pool.submit(data, within).result()
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
        pool.close()


@needs_sched_idle
@pytest.mark.skipif(torch.cuda.is_available(), reason="an encoder on a GPU decodes at the model's priority")
def test_an_encoder_on_the_cpu_decodes_at_idle_priority_unless_told(demo_shards, tmp_path):
    """On the CPU the model and the decoders share the cores: the decoders take only what the model
    leaves (`run.decode_priority` auto); a level given is used as it is."""
    for level, expected in (("auto", "idle"), ("low", "low"), ("normal", "normal")):
        encoder, plan = in_process_encoder(
            small_config(demo_shards, tmp_path / f"out-{level}", run={"decode_priority": level})
        )
        try:
            assert encoder.decoder.submit(demo_sample(0, 0)["mp4"], spec(2, 32, 32)).result()
            assert _priorities(encoder.decoder, priority_of(expected)) == [priority_of(expected)] * 2
        finally:
            encoder.decoder.close()
