"""The Ray side of a run: joining or starting a cluster, the encoder actors, and handing out shards.

One encoder actor (`EncoderActor`, a `ShardEncoder`) per GPU (`num_gpus=1`; CPU actors when the
cluster has no GPU) holds one VAE. The driver hands each idle actor the next shard, follows its
progress through a streaming generator, and retries a shard whose attempt failed; an actor whose
process died is replaced.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Any

import ray
import ray.exceptions

from jobs.dataset.store import Lost
from jobs.inputs.shards import Shard
from jobs.orchestration.actor import EncoderActor
from jobs.orchestration.config import RunConfig, RunFailed, Terminated
from jobs.orchestration.progress import ProgressBar, Summary
from jobs.orchestration.settings import Plan
from jobs.orchestration.worker import Progress, ShardDone
from vae import describe_error

log = logging.getLogger("jobs.precompute")


# Ray starts its workers at nice 15, below its own services and the driver, whose wakeups (a few
# hundred a second on an idle cluster) then take a CPU from the model's threads in the middle of an
# operation, and its other threads wait for them. Here the workers are the work: they run at the
# driver's priority (a cluster started with `ray start` gets the same from RAY_worker_niceness=0).
RAY_SYSTEM_CONFIG = {"worker_niceness": 0}


def start_embedded(**options: Any) -> None:
    """Starts an embedded Ray cluster, as a local run does (`options` go to `ray.init`; a
    `_system_config` among them adds to `RAY_SYSTEM_CONFIG`, or replaces its values)."""
    system = {**RAY_SYSTEM_CONFIG, **options.pop("_system_config", {})}  # (a new dict: Ray adds to it)
    ray.init(address="local", include_dashboard=False, _system_config=system, **options)


def connect(address: str | None) -> bool:
    """Joins the given cluster (or RAY_ADDRESS's); else starts an embedded one. True if we started it.

    A SIGTERM then raises `Terminated` in the driver (Ray's own handler would exit at once), so the
    run stops as on Ctrl-C: the actors are ended, what is committed stays, the directory resumes.
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    quiet = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        ray.init(address=address, **quiet)
        print(f"joined the Ray cluster at {address}", file=sys.stderr)
    else:
        start_embedded(**quiet)
        print("started an embedded Ray cluster (give --address or RAY_ADDRESS to join one)", file=sys.stderr)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
    return not address


def _terminated(signum: int, frame: Any) -> None:
    raise Terminated("SIGTERM")


@dataclasses.dataclass
class _Starting:
    """An actor being placed and loaded, until its `ready()` resolves."""

    actor: Any
    deadline: float  # placed and loaded by then, or dropped (no room to place it)
    first: bool  # one of the first `count` (or started in place of one): how they all started is said once


class EncoderPool:
    """The encoder actors, each holding one VAE (on one GPU when the cluster has GPUs).

    An actor that dies is not reused: it is killed and replaced by a fresh one, which loads
    the model again, and so is one killed while it starts. Replacements are bounded, so a node
    that kills every actor (a broken GPU) ends the job instead of looping; an actor whose
    constructor raised (a model that cannot load) is not started again.

    Every actor starts the same way, whether one of the first `count`, a replacement or one for a
    node that joined: it is in `starting` until its `ready()` resolves (`settle`), and is dropped if
    it is not placed and loaded within `run.actor_start_timeout` (`expire`). The run starts as soon
    as one of the first actors is ready; `schedule` gives the others shards as they become ready,
    so a slow node or disk holds up only its own actor. With `run.read_ahead`, the first actors are
    each given one of `first`, the shards they will encode first, and read it while they load their
    model (`ShardEncoder`'s `first`): `self.first` says which actor holds which (`schedule` gives
    each its own first).
    """

    def __init__(self, plan: Plan, count: int, gpus: float, first: Sequence[Shard] = ()) -> None:
        run = plan.config.run
        options: dict[str, Any] = {"num_cpus": run.cpus_per_worker, "max_restarts": 0, "max_concurrency": 1}
        if gpus:
            options["num_gpus"] = 1
        self._remote = ray.remote(EncoderActor).options(**options)
        self.gpus = bool(gpus)  # GPU actors (one GPU each) or CPU ones, for the whole run
        self._plan = plan
        self.say: Callable[[str], None] = _to_stderr  # where its lines go (`schedule`: the progress bar's `note`)
        self.replacements_left = count * run.max_attempts
        firsts: list[Shard | None] = list(first[:count]) if run.read_ahead else []
        firsts += [None] * (count - len(firsts))
        self.actors: list[Any] = []  # every live actor, ready or starting
        self.first: dict[Any, Shard] = {}  # actor id -> the shard it reads while it starts
        self.starting: dict[Any, _Starting] = {}  # ready() ref -> the actor that is starting
        for shard in firsts:
            actor = self._start(first=True, shard=shard)
            if shard is not None:
                self.first[actor._actor_id] = shard
        self._count, self._devices, self._failures = count, [], []  # of the first actors
        self.ready: list[Any] = []  # the first actors ready when the pool is made
        while self.starting and not self.ready:
            soonest = min(entry.deadline for entry in self.starting.values())
            done, _ = ray.wait(list(self.starting), num_returns=1, timeout=max(0.0, soonest - time.monotonic()))
            self.ready += [actor for actor in map(self.settle, done) if actor is not None]
            self.expire()
        if not self.ready:
            raise RunFailed(f"no encoder actor could start: {self._failures[0]}")
        if self.starting:
            more = len(self.starting)
            self.say(f"encoder actors ready: {self._where()}; {more} more starting, each given shards once ready")

    def settle(self, ref: Any) -> Any | None:
        """A starting actor's `ready()` resolved: the actor if it is ready; else None. One whose
        process died while it started (the OOM killer during its model's load, a node preempted) is
        replaced while replacements are left: the new one joins `starting`. One whose constructor
        raised (a model that cannot load) would raise again: it is dropped, with its reason."""
        entry = self.starting.pop(ref)
        try:
            device = ray.get(ref)
        except ray.exceptions.RayError as e:
            reason = creation_error(e)
            self.first.pop(entry.actor._actor_id, None)  # its first shard goes to the others with the rest
            if died_starting(e) and self.replace(entry.actor, first=entry.first) is not None:
                self.say(f"an encoder actor died while it started ({reason}); starting another")
            else:
                self._failed(entry, reason)
            return None
        if entry.first:
            self._devices.append(device)
            self._announce()
        return entry.actor

    def expire(self) -> list[Any]:
        """The starting actors not ready by their deadline (no room to place them): dropped, and returned."""
        now, timeout = time.monotonic(), self._plan.config.run.actor_start_timeout
        late = [self.starting.pop(ref) for ref, entry in list(self.starting.items()) if now > entry.deadline]
        for entry in late:
            self._failed(entry, f"not started within run.actor_start_timeout = {timeout:g} s")
        return [entry.actor for entry in late]

    def _failed(self, entry: _Starting, reason: str) -> None:
        self.first.pop(entry.actor._actor_id, None)  # its first shard goes to the others with the rest
        self.drop(entry.actor)
        if not entry.first:  # a replacement, or one for a node that joined: the others go on
            log.warning("a replacement encoder actor failed to start: %s", reason)
            return
        self._failures.append(reason)
        if self._devices:  # the run has started: said now, not only once the other first actors are up
            self.say(f"an encoder actor failed to start: {reason}")
        self._announce()

    def _announce(self) -> None:
        """Once each of the first actors is ready or has failed: how many started, and on what."""
        if not self._devices or len(self._devices) + len(self._failures) < self._count:
            return
        if self._failures:
            self.say(f"started {len(self._devices)} of {self._count} encoder actors; the others: {self._failures[0]}")
        self.say(f"encoder actors ready: {self._where()}")

    def _where(self) -> str:
        return ", ".join(f"{self._devices.count(d)} on {d}" for d in sorted(set(self._devices)))

    def replace(self, actor: Any, first: bool = False) -> Any | None:
        """Kills a failed actor and starts a new one in `starting` (given shards once it is ready; a
        node lost may leave no room to place it); None once replacements are used up."""
        self.drop(actor)
        if self.replacements_left <= 0:
            return None
        self.replacements_left -= 1
        return self._start(first=first)

    def grow(self, count: int) -> None:
        """Starts `count` more actors (room appeared: a node joined)."""
        for _ in range(count):
            self._start()

    def _start(self, first: bool = False, shard: Shard | None = None) -> Any:
        actor = self._remote.remote(*actor_args(self._plan, shard))
        self.actors.append(actor)
        deadline = time.monotonic() + self._plan.config.run.actor_start_timeout
        self.starting[actor.ready.remote()] = _Starting(actor, deadline, first)
        return actor

    def drop(self, actor: Any) -> None:
        ray.kill(actor, no_restart=True)
        if actor in self.actors:
            self.actors.remove(actor)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Kills every actor and waits (up to `timeout` seconds) until Ray reports each one dead,
        so that none is still publishing a shard when the driver tidies the directory."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        gone = [actor.ready.remote() for actor in self.actors]  # each fails once its actor is dead
        ray.wait(gone, num_returns=len(gone), timeout=timeout)
        self.actors = []


def _to_stderr(text: str) -> None:
    print(text, file=sys.stderr)


def actor_args(plan: Plan, first: Shard | None = None) -> tuple[Any, ...]:
    """What an encoder actor's constructor is given: plain values only. Ray unpacks them before the
    constructor runs, and a `JobConfig` or a `Shard` would import torch then, before the actor
    starts its decoding processes' fork server (`jobs/orchestration/actor.py`)."""
    shard = None if first is None else (first.source, first.name)
    return dataclasses.asdict(plan.config), str(plan.root), plan.constants, plan.allow_shell, shard


def node_resources() -> list[dict[str, float]]:
    """The total resources of each live node of the cluster."""
    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def capacity(cpus_per_worker: int, nodes: list[dict[str, float]], gpus: bool) -> int:
    """How many encoder actors the nodes hold, node by node (an actor's CPUs and GPU are on one
    node): one per GPU with `cpus_per_worker` CPUs beside it, or on CPU nodes one per
    `cpus_per_worker` CPUs."""
    total = 0
    for node in nodes:
        fits = int(node.get("CPU", 0) // cpus_per_worker)
        total += min(fits, int(node.get("GPU", 0))) if gpus else fits
    return total


def worker_count(plan: Plan, nodes: list[dict[str, float]], pending: int) -> int:
    """How many encoder actors to start: as asked (default one per GPU, else per `cpus_per_worker`
    CPUs), but no more than the cluster's nodes can place and than there are shards.

    Raises:
        RunFailed: The cluster cannot place a single actor.
    """
    run = plan.config.run
    cpus = sum(node.get("CPU", 0) for node in nodes)
    gpus = int(sum(node.get("GPU", 0) for node in nodes))
    fits = capacity(run.cpus_per_worker, nodes, bool(gpus))
    needs = f"{run.cpus_per_worker} CPUs" + (" and 1 GPU" if gpus else "") + " on one node"
    has = f"{cpus:g} CPUs" + (f" and {gpus} GPUs" if gpus else "") + f" on {len(nodes)} node" + "s" * (len(nodes) != 1)
    if fits < 1:
        raise RunFailed(
            f"no encoder actor can be placed: each needs {needs}, the cluster has {has} (run.cpus_per_worker)"
        )
    wanted = run.workers or gpus or fits
    if wanted > fits:
        print(f"{wanted} workers asked for, but the cluster ({has}) places {fits} of {needs} each", file=sys.stderr)
    return max(1, min(wanted, fits, pending))


def request_gpus(run: RunConfig) -> dict[str, float]:
    """Asks the autoscaler for `run.gpus` GPUs (with each actor's CPUs beside them), and waits up to
    `run.actor_start_timeout` for the first to join; returns the cluster's resources then.

    Raises:
        RunFailed: No GPU joined in time.
    """
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[{"GPU": 1, "CPU": run.cpus_per_worker}] * run.gpus)
    deadline = time.monotonic() + run.actor_start_timeout
    said = False
    while (resources := ray.cluster_resources()).get("GPU", 0) < 1:
        if time.monotonic() > deadline:
            raise RunFailed(
                f"asked the cluster for {run.gpus} GPUs (run.gpus), but none joined within "
                f"run.actor_start_timeout = {run.actor_start_timeout:g} s (is there an autoscaler with GPU nodes?)"
            )
        if not said:
            print(f"asked the cluster for {run.gpus} GPUs; waiting for the first GPU node", file=sys.stderr)
            said = True
        time.sleep(1.0)
    return resources


def withdraw_gpu_request() -> None:
    """Lets the autoscaler scale the GPU nodes down again (the job is over)."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[])


def died_starting(e: BaseException) -> bool:
    """Whether an actor's `ready()` failed because its process (or node) died, not because its
    constructor raised."""
    return isinstance(e, ray.exceptions.RayActorError) and not e.actor_init_failed


def creation_error(e: BaseException) -> str:
    """The reason an actor's constructor failed: the last line of Ray's remote traceback."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(e).splitlines()]
    lines = [line for line in lines if line]
    return (lines[-1] if lines else describe_error(e))[:300]


def schedule(
    plan: Plan, shards: list[Shard], pool: EncoderPool, bar: ProgressBar, summary: Summary, directory: Lost
) -> None:
    """Runs every shard on the actor pool; retries a shard whose worker failed.

    Raises:
        RunFailed: Another job took the output directory's lock over (`directory.taken`: on s3, this
            driver's renewals failed for a lease's length): this job stops at once.
    """
    pool.say = bar.note
    # An actor's first shard is the one it read while it started (`EncoderPool.first`).
    firsts = {shard.name for shard in pool.first.values()}
    queue = deque(shard for shard in shards if shard.name not in firsts)
    attempts: Counter[str] = Counter()
    counted: Counter[str] = Counter()  # samples reported so far by a shard's current attempt
    frames: Counter[str] = Counter()
    errored: Counter[str] = Counter()
    idle = list(pool.ready)
    running: dict[Any, tuple[Any, Shard]] = {}
    labels: dict[Any, str] = {}  # actor id -> "w0", "w1", ... (a replacement gets a new one)
    dispatched: dict[str, float] = {}  # shard -> when its current attempt started

    def label(actor: Any) -> str:
        return labels.setdefault(actor._actor_id, f"w{len(labels)}")

    run = plan.config.run
    # With `run.read_ahead`, an actor is handed its next shard with the one it encodes (it decodes the
    # next one's first samples ahead): actor id -> that shard, which no other actor is given while
    # there is other work (an actor with nothing else to do takes it over).
    ahead: dict[Any, Shard] = dict(pool.first)

    def next_shard(actor: Any) -> Shard | None:
        shard = ahead.pop(actor._actor_id, None)
        if shard is None and queue:
            shard = queue.popleft()
        if shard is None and ahead:  # nothing left but what others read ahead: take one over
            shard = ahead.pop(next(iter(ahead)))
        return shard

    def forget_ahead(actor: Any) -> None:
        """An actor died: what it read ahead goes back to the front of the queue."""
        if (shard := ahead.pop(actor._actor_id, None)) is not None:
            queue.appendleft(shard)

    checked = time.monotonic()
    while running or ((queue or ahead) and (idle or pool.starting)):
        still_held(directory, plan)
        if run.workers == 0 and queue and time.monotonic() - checked >= run.scale_interval_s:
            checked = time.monotonic()  # the pool follows the cluster: a node joined, more actors
            room = capacity(run.cpus_per_worker, node_resources(), pool.gpus) - len(pool.actors)
            extra = min(room, len(queue))
            if extra > 0:
                bar.note(f"the cluster grew: starting {extra} more encoder actors")
                pool.grow(extra)
        while idle and (shard := next_shard(idle[-1])) is not None:
            actor = idle.pop()
            # (only from shards that no idle actor is about to take)
            then = queue.popleft() if run.read_ahead and len(queue) > len(idle) else None
            if then is not None:
                ahead[actor._actor_id] = then
            attempts[shard.name] += 1
            dispatched[shard.name] = time.monotonic()
            running[actor.encode_shard.options(num_returns="streaming").remote(shard, then)] = (actor, shard)
        ready, _ = ray.wait([*running, *pool.starting], num_returns=1, timeout=1.0)
        for ref in [r for r in ready if r in pool.starting]:
            actor = pool.starting[ref].actor
            if pool.settle(ref) is not None:
                idle.append(actor)
            else:  # failed (another may be starting in its place)
                forget_ahead(actor)
        for actor in pool.expire():  # no room left for it (a node was lost): the others go on
            forget_ahead(actor)
        for gen in [r for r in ready if r in running]:
            actor, shard = running[gen]
            try:
                message = ray.get(next(gen))
            except StopIteration:
                del running[gen]
                idle.append(actor)
                continue
            except (ray.exceptions.RayError, OSError) as e:
                del running[gen]
                if isinstance(e, ray.exceptions.RayActorError):  # the process (or its node) died
                    forget_ahead(actor)
                    pool.replace(actor)
                else:
                    idle.append(actor)
                bar.update(
                    samples=-counted.pop(shard.name, 0),
                    frames=-frames.pop(shard.name, 0),
                    errors=-errored.pop(shard.name, 0),
                    actor=label(actor),
                )
                reason = describe_error(e)
                if attempts[shard.name] < plan.config.run.max_attempts:
                    log.warning("shard %s failed (attempt %d): %s; retrying", shard.name, attempts[shard.name], reason)
                    queue.append(shard)
                else:
                    summary.failed[shard.name] = f"{attempts[shard.name]} attempts, last: {reason}"
                continue
            if isinstance(message, Progress):
                counted[shard.name] += message.samples
                frames[shard.name] += message.frames
                errored[shard.name] += message.errors
                bar.update(message.samples, message.frames, errors=message.errors, actor=label(actor))
            elif isinstance(message, ShardDone):
                counted.pop(shard.name, None)
                frames.pop(shard.name, None)
                errored.pop(shard.name, None)
                marker = message.marker
                seconds = time.monotonic() - dispatched.pop(shard.name)
                summary.shard_seconds[shard.name] = seconds
                summary.shard_samples[shard.name] = marker["samples"]
                summary.bytes_written += marker["latents"]["bytes"] + marker["meta"]["bytes"]
                stats = summary.actors.setdefault(
                    label(actor),
                    {"samples": 0, "shards": 0, "seconds": 0.0, "model_s": 0.0, "decode_wait_s": 0.0, "read_ahead": 0},
                )
                stats["samples"] += marker["samples"]
                stats["shards"] += 1
                stats["seconds"] = round(stats["seconds"] + seconds, 3)
                stats["model_s"] = round(stats["model_s"] + message.model_s, 3)
                stats["decode_wait_s"] = round(stats["decode_wait_s"] + message.decode_wait_s, 3)
                stats["read_ahead"] += message.read_ahead
                summary.ok += marker["ok"]
                summary.errors += marker["errors"]
                summary.frames += marker["frames"]
                summary.shards_written += 1
                summary.error_reasons += message.error_reasons
                summary.reason_kinds.update(message.reason_kinds)
                bar.update(shards=1)
                if summary.stopped is None and (reason := over_budget(summary, plan.config.run)):
                    summary.stopped = reason
                    log.warning("stopping: %s", reason)
                    queue.clear()  # the shards running now finish and commit; the rest wait for a rerun
                    ahead.clear()
        bar.update()
    if pool.starting:
        bar.note(f"{len(pool.starting)} encoder actors were still starting when the work ran out")
    for shard in [*queue, *ahead.values()]:  # only when every actor died and none could replace it
        summary.failed[shard.name] = "no encoder actor left (each one died or could not be placed; see the Ray logs)"


def still_held(directory: Lost, plan: Plan, taken_only: bool = True) -> None:
    """Raises RunFailed if another job took over the output directory's lock (`Lost.taken`); with
    `taken_only` false, also once it reads as lost (not renewed for most of a lease's length)."""
    if directory.taken or (not taken_only and directory.is_set()):
        raise RunFailed(
            f"another job took over, or may take over, the lock of {plan.root} (this driver's renewals of it "
            "failed for most of a lease's length): this job stops and leaves the directory alone; its committed "
            "shards are kept (a rerun writes the manifest)"
        )


def over_budget(summary: Summary, run: RunConfig) -> str | None:
    """Why the error budget is spent (more than `run.max_error_rate` of the samples failed), or None."""
    seen = summary.ok + summary.errors
    if seen < run.error_rate_after or summary.errors <= run.max_error_rate * seen:
        return None
    return (
        f"{summary.errors} of {seen} samples ({summary.errors / seen:.0%}) are error rows, more than "
        f"run.max_error_rate = {run.max_error_rate:g}; most common: {summary.most_common()}"
    )
