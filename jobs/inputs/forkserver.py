"""The fork server the decoding processes are forked from (`jobs.inputs.decode_pool`).

Children are forked from a clean server process (not from a process with threads), which
imports the decoder once. This module imports nothing heavy, so that an encoder actor can start
the server before it imports torch itself: the two imports then run side by side
(`jobs.orchestration.actor`).
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.forkserver

CONTEXT = mp.get_context("forkserver")
CONTEXT.set_forkserver_preload(["jobs.inputs.video"])


def start() -> None:
    """Starts the fork server now, if it is not running; its imports go on in the background."""
    multiprocessing.forkserver.ensure_running()
