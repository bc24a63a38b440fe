"""The failure model on real Ray: each scenario breaks a real run, reruns it as a user would, and
compares the result with a clean run (samples lost 0, doubled 0, every data file byte-identical).

The job runs as its own command (`python -m jobs.precompute`, an embedded Ray or a
`ray.cluster_utils.Cluster` of several nodes), so kills hit the real driver, actors and nodes.
Faults inside a commit come from `jobs/dataset/faults.py` (an environment variable). Each
scenario records one line; `pytest_terminal_summary` in conftest.py prints them and a summary.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import cluster_head, encoder_pids, kill_session

from jobs.dataset.faults import FAULT_ENV
from jobs.dataset.reader import read_metadata
from jobs.demo_data import write_demo_dataset

pytestmark = pytest.mark.slow

SHARDS = 6
SETTINGS = ["--set", "video.num_frames=8", "--set", "video.height=64", "--set", "video.width=64"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chaos") / "data"
    write_demo_dataset(path, shards=SHARDS, samples_per_shard=3, seed=4)
    return path


def command(data: Path, out: Path, *extra: str) -> list[str]:
    spec = f"{data}/shard-{{000000..{SHARDS - 1:06d}}}.tar"
    return [sys.executable, "-m", "jobs.precompute", "--input", spec, "--output", str(out), *SETTINGS, *extra]


def run(data: Path, out: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command(data, out, *extra), capture_output=True, text=True, timeout=400, env={**os.environ, **(env or {})}
    )


def start(data: Path, out: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        command(data, out, *extra),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )


def wait_for_commits(out: Path, n: int, process: subprocess.Popen[bytes], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if len(list((out / "_commits").glob("*.json"))) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not commit {n} shards (exit {process.poll()})")


def kill_an_encoder(job: subprocess.Popen[bytes], then: Callable[[], None] | None = None) -> list[int]:
    """SIGKILLs the first encoder actor of `job` (its embedded Ray only) seen running a shard, once
    one is (`then` is called just before); the pid killed, or none if the job ended first."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and job.poll() is None:
        for pid in encoder_pids(ancestor=job.pid):
            if then is not None:
                then()
            os.kill(pid, signal.SIGKILL)
            return [pid]
        time.sleep(0.02)
    return []


def data_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.suffix in (".tar", ".parquet")
    }


@pytest.fixture(scope="module")
def clean(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "out"
    result = run(data, out)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


_LINES: list[str] = []  # this test's scenario line, recorded as its "chaos" property (conftest.py)


@pytest.fixture(autouse=True)
def _record_scenario(record_property):  # type: ignore[no-untyped-def]
    yield
    while _LINES:
        record_property("chaos", _LINES.pop(0))


def compare(scenario: str, out: Path, clean: Path) -> None:
    """Samples lost, doubled, and files that differ, against the clean run; records the line."""
    rows = Counter((r["source"].rsplit("/", 1)[-1], r["key"], r["clip"]) for r in read_metadata(out).to_pylist())
    expected = Counter((r["source"].rsplit("/", 1)[-1], r["key"], r["clip"]) for r in read_metadata(clean).to_pylist())
    lost, doubled = sum((expected - rows).values()), sum((rows - expected).values())
    a, b = data_files(out), data_files(clean)
    differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    leftovers = [str(p) for p in out.rglob("*.tmp")]
    _LINES.append(
        f"{scenario:<46} lost {lost}, doubled {doubled}, files differing {len(differ)}, temporaries {len(leftovers)}"
    )
    assert (lost, doubled, differ, leftovers) == (0, 0, [], [])


def test_one_actor_and_the_shards_in_reverse_order_give_the_same_bytes(data, clean, tmp_path):
    out = tmp_path / "out"
    inputs = [arg for i in reversed(range(SHARDS)) for arg in ("--input", str(data / f"shard-{i:06d}.tar"))]
    cmd = [sys.executable, "-m", "jobs.precompute", *inputs, "--output", str(out), *SETTINGS, "--workers", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-2000:]
    compare("1 actor instead of 2, shards in reverse order", out, clean)


def test_sigkill_of_an_encoder_actor_mid_shard(data, clean, tmp_path):
    out = tmp_path / "out"
    first = start(data, out, "--workers", "2")
    killed = kill_an_encoder(first)
    _, stderr = first.communicate(timeout=300)
    assert killed and first.returncode == 0, stderr[-2000:]
    assert b"retrying" in stderr
    compare("SIGKILL of an encoder actor mid-shard", out, clean)


def test_a_crash_between_the_data_and_the_marker(data, clean, tmp_path):
    """The actor process is SIGKILLed after its tar and Parquet file are in place, before the marker."""
    out, flag = tmp_path / "out", tmp_path / "fired"
    result = run(data, out, env={FAULT_ENV: f"before-marker@{flag}"})
    assert flag.exists() and result.returncode == 0, result.stderr[-2000:]
    assert "retrying" in result.stderr  # the killed attempt's shard was handed out again
    compare("crash between data files and commit marker", out, clean)


def test_a_full_disk_commits_nothing_and_a_rerun_completes(data, clean, tmp_path):
    out = tmp_path / "out"
    result = run(data, out, "--set", "run.max_attempts=2", env={FAULT_ENV: "disk-full"})
    assert result.returncode == 1 and "No space left on device" in result.stderr
    assert f"{SHARDS} failed" in result.stdout
    assert not list((out / "_commits").glob("*.json")) and not data_files(out)  # no partial shard anywhere
    again = run(data, out)  # space freed
    assert again.returncode == 0, again.stderr[-2000:]
    compare("disk full, then a rerun", out, clean)


def test_sigterm_of_the_driver_stops_cleanly_and_a_rerun_completes(data, clean, tmp_path):
    """The SIGTERM lands while one actor has published a shard's files and not yet its marker
    (it hangs there) and the other has committed shards: the stop removes the unfinished shard."""
    out, flag = tmp_path / "out", tmp_path / "hung"
    first = start(data, out, "--workers", "2", env={FAULT_ENV: f"hang-before-marker@{flag}"})
    wait_for_commits(out, 1, first)
    while not flag.exists() and first.poll() is None:
        time.sleep(0.05)
    committed = {p.stem for p in (out / "_commits").glob("*.json")}
    assert {Path(k).stem for k in data_files(out)} - committed, "no shard was caught between its files and marker"
    os.kill(first.pid, signal.SIGTERM)  # a preemption
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 143, stderr[-2000:]
    assert b"terminated (SIGTERM): committed shards are kept; rerun the same command to resume" in stderr
    kill_session(first.pid)  # nothing of it should be left; this only makes sure
    committed = {p.stem for p in (out / "_commits").glob("*.json")}
    assert committed and {Path(k).stem for k in data_files(out)} <= committed  # nothing visible uncommitted
    again = run(data, out)
    assert again.returncode == 0 and f"({len(committed)} already committed)" in again.stderr, again.stderr[-2000:]
    compare("SIGTERM of the driver, then a rerun", out, clean)


def test_sigkill_of_the_driver_alone_then_a_rerun_beside_its_zombies(data, clean, tmp_path):
    """Only the driver is killed: its actors may still be writing while the rerun (a new cluster)
    encodes the same shards. Committed shards are never rewritten; the end is the clean run's."""
    out = tmp_path / "out"
    first = start(data, out, "--workers", "2")
    wait_for_commits(out, 1, first)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    try:
        again = run(data, out)
    finally:
        kill_session(first.pid)
    assert again.returncode == 0, again.stderr[-2000:]
    compare("SIGKILL of the driver, rerun beside zombies", out, clean)


def test_a_second_job_on_the_same_directory_is_refused_while_the_first_runs(data, clean, tmp_path):
    out = tmp_path / "out"
    # Three seconds per commit: the first job still holds the directory (15 s more) when the second
    # has started, however fast this machine encodes the other five shards. (At a second per commit, a
    # second job whose start-up took over 5 s beside a busy test process found the directory free.)
    first = start(data, out, "--workers", "1", env={FAULT_ENV: "slow-commit=3"})
    wait_for_commits(out, 1, first)
    second = run(data, out)
    _, stderr = first.communicate(timeout=300)
    assert second.returncode == 2 and f"another precompute job is writing to {out}" in second.stderr, second.stderr[
        -2000:
    ]
    assert first.returncode == 0, stderr[-2000:]
    compare("two jobs on one directory", out, clean)


def test_an_actor_slow_to_start_holds_up_no_other(data, clean, tmp_path):
    """One of two actors takes two minutes longer to start (a slow node or disk): the other starts
    the run at once and encodes every shard, and the job ends without waiting for the slow one."""
    out = tmp_path / "out"
    started = time.monotonic()
    result = run(data, out, "--workers", "2", env={FAULT_ENV: f"slow-start@{tmp_path / 'fired'}"})
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-2000:]
    assert seconds < 100, f"the job waited for the slow actor: {seconds:.0f} s"
    report = json.loads((out / "report.json").read_text())
    assert len(report["actors"]) == 1 and report["ok"] == SHARDS * 3
    compare("an encoder actor slow to start", out, clean)


def test_the_only_actor_killed_while_it_starts_is_replaced(data, clean, tmp_path):
    """The one encoder actor is SIGKILLed while it starts (the OOM killer during its model's load, a
    preempted node): the pool starts another in its place instead of ending the job."""
    out = tmp_path / "out"
    result = run(data, out, "--workers", "1", env={FAULT_ENV: f"crash-start@{tmp_path / 'fired'}"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "an encoder actor died while it started" in result.stderr
    compare("the only encoder actor killed while it starts", out, clean)


def test_an_actor_killed_while_it_starts_beside_a_running_one_is_replaced_and_works(data, clean, tmp_path):
    """Two actors; one is SIGKILLed three seconds into its start, after the other has begun the run
    (each commit a second longer, so the run outlasts both starts): the one started in its place
    joins the run and encodes shards too."""
    out = tmp_path / "out"
    faults = f"crash-start=3@{tmp_path / 'fired'},slow-commit"
    result = run(data, out, "--workers", "2", env={FAULT_ENV: faults})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "an encoder actor died while it started" in result.stderr
    report = json.loads((out / "report.json").read_text())
    assert len(report["actors"]) == 2 and report["ok"] == SHARDS * 3, report["actors"]
    compare("an actor killed while starting, beside another", out, clean)


def test_a_replacement_killed_while_it_starts_is_replaced_too(data, clean, tmp_path):
    """The only actor is SIGKILLed mid-shard, and the one started in its place is SIGKILLed while it
    starts (the fault is armed only then): a third one finishes the run."""
    out, armed = tmp_path / "out", tmp_path / "fired"
    armed.touch()  # (present: the fault has "fired" already, and the first actor starts as usual)
    first = start(data, out, "--workers", "1", env={FAULT_ENV: f"crash-start@{armed}"})
    killed = kill_an_encoder(first, then=armed.unlink)  # and the next actor to start is killed
    _, stderr = first.communicate(timeout=300)
    assert killed and first.returncode == 0, stderr[-2000:]
    assert armed.exists() and b"an encoder actor died while it started" in stderr
    compare("a replacement killed while it starts", out, clean)


def test_losing_a_worker_node_mid_run(data, clean, tmp_path):
    """A `ray.cluster_utils.Cluster` of a head and two one-CPU worker nodes, one actor each; the
    second node is removed while its actor encodes a shard: that shard is redone on the other."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args=cluster_head(num_cpus=0))
    try:
        cluster.add_node(num_cpus=1)
        doomed = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        out = tmp_path / "out"
        extra = ["--address", cluster.address, "--workers", "2", "--set", "run.actor_start_timeout=20"]
        first = start(data, out, *extra)
        raylet = doomed.all_processes["raylet"][0].process.pid
        deadline = time.monotonic() + 120
        while not encoder_pids(ancestor=raylet) and time.monotonic() < deadline:
            time.sleep(0.01)  # until the doomed node's actor is encoding a shard
        cluster.remove_node(doomed, allow_graceful=False)
        _, stderr = first.communicate(timeout=300)
        assert first.returncode == 0, stderr[-3000:]
        assert b"retrying" in stderr  # the lost node's shard was handed out again
    finally:
        cluster.shutdown()
    compare("a worker node lost mid-run", out, clean)
