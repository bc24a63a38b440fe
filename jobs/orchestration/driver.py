"""A whole precompute run: check, plan, claim the output directory, encode what is left, finish.

Shards already committed by an earlier run with the same settings are skipped, so rerunning the
same command resumes an interrupted job; `manifest.json` is written once every shard is committed.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import ray

from jobs.dataset.catalog import (
    DatasetBusy,
    DatasetError,
    JobRecord,
    existing_job,
    json_bytes,
    output_lock,
    read_commit,
    remove_uncommitted,
    withdraw_commit,
    write_job,
    write_manifest,
)
from jobs.dataset.layout import MANIFEST_FILE, REPORT_FILE
from jobs.dataset.store import open_store
from jobs.inputs.shards import Shard, count_samples
from jobs.orchestration.config import JobConfig, Terminated, UsageError
from jobs.orchestration.pool import (
    EncoderPool,
    connect,
    node_resources,
    request_gpus,
    schedule,
    still_held,
    withdraw_gpu_request,
    worker_count,
)
from jobs.orchestration.progress import ProgressBar, SampleCount, Summary
from jobs.orchestration.settings import Plan, check_config, differences, make_plan

log = logging.getLogger("jobs.precompute")


def run(config: JobConfig, allow_shell: bool = False) -> Summary:
    """Runs (or resumes) a precompute job and returns its summary.

    `allow_shell` lets `pipe:` inputs run their commands (`--allow-shell`); without it they are refused.

    Raises:
        UsageError: Unusable settings, or an output directory that holds something else.
        CheckpointError: A checkpoint that does not fit the VAE.
    """
    started = time.monotonic()
    shards = check_config(config, allow_shell)
    with ExitStack() as held:
        try:  # before the cluster starts: a second job on the same directory is refused at once
            directory = held.enter_context(output_lock(config.output))
        except DatasetBusy as e:
            raise UsageError(str(e)) from None
        owns_ray = connect(config.run.address)
        try:
            resources = request_gpus(config.run) if config.run.gpus else ray.cluster_resources()
            plan = make_plan(config, shards, has_gpus=resources.get("GPU", 0) > 0, allow_shell=allow_shell)
            pending = prepare_output(plan)
            summary = Summary(output=str(plan.root), fingerprint=plan.fingerprint)
            summary.shards_skipped = len(shards) - len(pending)
            if pending:
                total = _count(pending)
                n = worker_count(plan, node_resources(), len(pending))
                print(
                    f"{len(pending)} shards to encode ({summary.shards_skipped} already committed), "
                    f"{total} samples, {n} workers, VAE {plan.config.vae.name} ({plan.config.vae.dtype})",
                    file=sys.stderr,
                )
                pool = EncoderPool(plan, n, resources.get("GPU", 0), first=pending)
                bar = ProgressBar(
                    total.known, len(pending), uncounted=total.uncounted, log_every=config.run.progress_interval_s
                )
                try:
                    schedule(plan, pending, pool, bar, summary, directory)
                except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (`Terminated`)
                    summary.interrupted = "SIGTERM" if isinstance(e, Terminated) else "interrupted"
                    if not directory.taken:
                        _write_report(plan, summary, started)
                    raise
                finally:
                    bar.close()
                    pool.shutdown()
                    if not directory.taken:  # (else the job holding it now does: its uploads are not ours)
                        _tidy(plan)
            still_held(directory, plan, taken_only=False)  # (else nothing more is written)
            if summary.complete:
                write_manifest(plan.root, plan.fingerprint)
            _write_report(plan, summary, started)
        finally:
            if config.run.gpus:
                withdraw_gpu_request()
            if owns_ray:
                ray.shutdown()
    summary.seconds = time.monotonic() - started
    return summary


def _tidy(plan: Plan) -> None:
    """What the run's attempts left unfinished once its actors are gone: temporaries, unfinished
    uploads, and data files of shards without a marker (an attempt killed while committing)."""
    store = open_store(plan.root)
    store.cleanup()
    removed = remove_uncommitted(store)
    if removed:
        log.warning("removed the files of %d shards whose commit did not finish: %s", len(removed), removed[:3])


def _write_report(plan: Plan, summary: Summary, started: float) -> None:
    """`DIR/report.json`: the figures of the last run (what `python -m jobs.status` shows)."""
    summary.seconds = time.monotonic() - started
    report = {
        **summary.report(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": sys.argv,
    }
    open_store(plan.root).write(REPORT_FILE, json_bytes(report))


def prepare_output(plan: Plan) -> list[Shard]:
    """Creates the output directory, or checks that it holds a job with the same settings whose
    shards of the same names came from these inputs; returns the shards still to encode.

    Raises:
        UsageError: Other settings, or shards committed from other inputs under these names.
        OSError: A commit marker could not be read (whether its shard is committed is not known).
    """
    try:
        previous = existing_job(plan.root)
    except DatasetError as e:
        raise UsageError(str(e)) from None
    if previous is not None and previous.fingerprint != plan.fingerprint:
        changed = differences(previous.settings, plan.settings)
        raise UsageError(
            f"{plan.root} holds latents made with other settings ({'; '.join(changed) or 'format'}); "
            "use a new --output directory, or the original settings to resume"
        )
    removed = open_store(plan.root).cleanup()
    if removed:
        log.warning("removed %d temporary files or unfinished uploads left by an interrupted run", removed)
    pending, kept = _pending(plan, plan.shards)  # (refused before job.json would name these inputs)
    earlier = previous.inputs if previous is not None else []  # a rerun with other inputs adds to the dataset
    # (a shard kept from where its input was before, `run.inputs_moved`, stays recorded by that source)
    sources = [s.source for s in plan.shards if s.source not in kept]
    write_job(
        plan.root,
        JobRecord(
            fingerprint=plan.fingerprint,
            settings=plan.settings,
            config=dataclasses.asdict(plan.config),
            inputs=list(dict.fromkeys([*earlier, *sources])),
            command=sys.argv,
        ),
    )
    return pending


def _pending(plan: Plan, shards: list[Shard]) -> tuple[list[Shard], set[str]]:
    """The shards to encode: those without a marker of this job whose files match its checksums;
    and the sources of those kept as committed from another input (`run.inputs_moved`).

    The marker of such a shard (its files corrupted, other settings) is removed first: the shard is
    not committed, and a marker left in place would make its new attempt take it for committed.
    `manifest.json` goes with it (it lists the shard). A marker that cannot be read (an I/O error,
    not its absence) ends the run with that error instead; and a shard of the same name committed
    from another input is refused, unless `run.inputs_moved` says it is the same data."""
    # sha256 checks read every byte: worth it on a disk (bit rot, a hand-edited file), not on an
    # object store, which checks each upload's checksum and keeps what it stored (sizes suffice).
    verify = not open_store(plan.root).checksummed
    with ThreadPoolExecutor(8) as pool:
        markers = list(pool.map(lambda s: read_commit(plan.root, s.name, verify), shards))
    ours = [m is not None and m.get("fingerprint") == plan.fingerprint for m in markers]
    moved = [(s, m) for s, m, o in zip(shards, markers, ours) if o and m.get("source") != s.source]
    if moved and not plan.config.run.inputs_moved:
        shard, marker = moved[0]
        raise UsageError(
            f"{len(moved)} shards of this run are committed in {plan.root} from other inputs under the same "
            f"names: {shard.name} from {marker.get('source')}, which this run reads from {shard.source}. If the "
            "data only moved, set run.inputs_moved=true to keep what is committed; if it is other data, give it "
            "other names (the part of the input SPEC after its fixed folder) or use another --output"
        )
    pending = [s for s, o in zip(shards, ours) if not o]
    withdrawn = [s.name for s in pending if withdraw_commit(plan.root, s.name)]
    if withdrawn:
        open_store(plan.root).delete(MANIFEST_FILE)
        log.warning(
            "%d shards' commit markers do not match their files or settings (%s); encoding them again",
            len(withdrawn),
            ", ".join(withdrawn[:3]),
        )
    return pending, {s.source for s, _ in moved}


def _count(shards: list[Shard]) -> SampleCount:
    """Samples in the local shards, from their tar headers; the other shards are left uncounted
    (their headers would be read over the network: the whole shard, for a tar)."""
    local = [s for s in shards if s.is_local]
    with ThreadPoolExecutor(8) as pool:
        return SampleCount(sum(pool.map(lambda s: count_samples(s.source), local)), len(shards) - len(local))
