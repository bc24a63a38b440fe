"""Fault injection for the failure tests: a crash or a full disk at a named point of a commit, a
slow commit, a slow actor start or one killed while it starts.

Off unless `LATENT_PRECOMPUTE_FAULT` is set (the chaos tests set it for a job's processes):

    LATENT_PRECOMPUTE_FAULT=before-marker            SIGKILL the writing process after the data
                                                     files are in place, before the commit marker
    LATENT_PRECOMPUTE_FAULT=hang-before-marker       the writing process stops there for ten minutes (a
                                                     stop or preemption lands mid-commit)
    LATENT_PRECOMPUTE_FAULT=mid-upload               SIGKILL the writing process after the first part of
                                                     a multipart upload to an object store
    LATENT_PRECOMPUTE_FAULT=disk-full                writing a latent tar fails with ENOSPC
    LATENT_PRECOMPUTE_FAULT=slow-commit              each commit takes a second longer (a slow store)
    LATENT_PRECOMPUTE_FAULT=slow-commit=5            five seconds longer (any pause: POINT=SECONDS)
    LATENT_PRECOMPUTE_FAULT=slow-start@/tmp/once     an encoder actor's start takes two minutes longer (a
                                                     slow node or disk); with @, only the first actor's
    LATENT_PRECOMPUTE_FAULT=before-marker@/tmp/once  the same, only the first time (the flag file
                                                     is created when it fires; later attempts pass)
    LATENT_PRECOMPUTE_FAULT=crash-start@/tmp/once    SIGKILL an encoder actor while it starts (the OOM
                                                     killer during its model's load, a node preempted);
                                                     crash-start=3: three seconds into its start
    LATENT_PRECOMPUTE_FAULT=crash-start@/tmp/once,slow-commit    both (faults separated by commas)
"""

from __future__ import annotations

import errno
import os
import signal
import time

FAULT_ENV = "LATENT_PRECOMPUTE_FAULT"
POINTS = ("before-marker", "hang-before-marker", "mid-upload", "disk-full", "slow-commit", "slow-start", "crash-start")
# seconds; the other points crash or fail
PAUSES = {"slow-commit": 1.0, "hang-before-marker": 600.0, "slow-start": 120.0}


def fault(point: str) -> None:
    """Fires the fault `point` if the environment asks for it (a no-op otherwise)."""
    for spec in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        name, _, once = spec.partition("@")
        name, _, seconds = name.partition("=")
        if name == point:
            _fire(point, spec, seconds, once)


def _fire(point: str, spec: str, seconds: str, once: str) -> None:
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return  # fired already
    if point in PAUSES:
        time.sleep(float(seconds) if seconds else PAUSES[point])
        return
    if point == "disk-full":
        raise OSError(errno.ENOSPC, f"No space left on device ({FAULT_ENV}={spec})")
    time.sleep(float(seconds or 0))  # (a crash a while into its point: `crash-start=3`)
    os.kill(os.getpid(), signal.SIGKILL)
