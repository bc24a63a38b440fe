"""Shared fixtures: a real demo dataset (H.264 mp4 in tar shards) and one local Ray cluster."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from pathlib import Path

import pytest
import ray
import torch

from jobs.demo_data import write_demo_dataset
from jobs.orchestration.config import JobConfig, LatentConfig, RunConfig, VAEConfig, VideoConfig
from jobs.orchestration.pool import RAY_SYSTEM_CONFIG, start_embedded

# One line per scenario of tests/test_chaos.py, printed after the run. The tests record them as
# the property "chaos" (`record_property`), which reaches this process's reports also from the
# processes of `pytest -n` (pytest-xdist).
CHAOS_LINES: list[str] = []


def pytest_runtest_logreport(report) -> None:  # type: ignore[no-untyped-def]
    if report.when == "teardown":  # the last report of a test: it carries every property recorded
        CHAOS_LINES.extend(value for name, value in report.user_properties if name == "chaos")


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    if CHAOS_LINES:
        terminalreporter.section("chaos scenarios (against a clean run)")
        for line in CHAOS_LINES:
            terminalreporter.write_line(line)
        clean = sum(line.endswith("lost 0, doubled 0, files differing 0, temporaries 0") for line in CHAOS_LINES)
        terminalreporter.write_line(f"{clean} of {len(CHAOS_LINES)} scenarios ended exactly as the clean run")


def cluster_head(**args: object) -> dict[str, object]:
    """A test cluster's head node arguments (`ray.cluster_utils.Cluster`): its workers at the
    driver's priority, as `cluster.yaml` and an embedded cluster start them."""
    return {"include_dashboard": False, "_system_config": dict(RAY_SYSTEM_CONFIG), **args}


@pytest.fixture(scope="session")
def ray_cluster():
    """One embedded Ray cluster for every in-process job run of the session."""
    if not ray.is_initialized():
        start_embedded(num_cpus=2, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three shards of four real videos each (20-48 frames, 96-192 px)."""
    return write_demo_dataset(tmp_path_factory.mktemp("demo"), shards=3, samples_per_shard=4, seed=0)


def small_config(inputs: list[str], output: str | Path, **sections: dict) -> JobConfig:
    """A job small enough for a CPU test: 8 frames at 64x64 through the tiny FLUX AE."""
    config = JobConfig(
        input=[str(i) for i in inputs],
        output=str(output),
        vae=VAEConfig(name="flux-ae-tiny"),
        video=VideoConfig(num_frames=8, height=64, width=64),
        latents=LatentConfig(),
        run=RunConfig(batch_size=2, decode_threads=2),
    )
    for section, values in sections.items():
        setattr(config, section, dataclasses.replace(getattr(config, section), **values))
    return config


def in_process_encoder(config: JobConfig, first: int | None = None):  # -> (ShardEncoder, Plan)
    """The job's plan for `config`, its output prepared, and the `ShardEncoder` an actor would hold,
    in this process (no Ray): for tests that look inside the encoder. `first`: the index of the
    plan's shard that the encoder reads while it starts, as the pool's first actors do."""
    from jobs.orchestration.driver import prepare_output
    from jobs.orchestration.settings import check_config, make_plan
    from jobs.orchestration.worker import ShardEncoder

    plan = make_plan(config, check_config(config), has_gpus=False)
    prepare_output(plan)
    shard = None if first is None else plan.shards[first]
    return ShardEncoder(plan.config, str(plan.root), plan.constants, first=shard), plan


def encode_in_process(config: JobConfig) -> Path:
    """Every shard of `config`, in order, through one `in_process_encoder`; the output's root."""
    encoder, plan = in_process_encoder(config)
    try:
        for shard in plan.shards:
            for _ in encoder.encode_shard(shard):
                pass
    finally:
        encoder.decoder.close()
    return Path(plan.root)


def same_output(a: Path, b: Path) -> list[dict]:
    """Asserts that two outputs hold the same rows and the same tensors, bit for bit; the rows."""
    from jobs.dataset.reader import load_sample, read_metadata

    rows = read_metadata(a).to_pylist()
    assert rows == read_metadata(b).to_pylist()
    for row in (r for r in rows if r["status"] == "ok"):
        mine, theirs = load_sample(a, row), load_sample(b, row)
        assert mine.keys() == theirs.keys()
        for name in mine:
            assert torch.equal(mine[name], theirs[name]), (row["key"], name)
    return rows


def kill_session(sid: int) -> None:
    """SIGKILLs every process of a session: the driver, the Ray daemons and the actors."""
    for _ in range(50):
        alive = []
        for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
            try:
                if os.getsid(pid) == sid:
                    os.kill(pid, signal.SIGKILL)
                    alive.append(pid)
            except (ProcessLookupError, PermissionError):
                pass
        if not alive:
            return
        time.sleep(0.1)


def parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        pid = parent_pid(pid) or 0
    return False


def _is_encoder(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().startswith(b"ray::EncoderActor.encode_shard")
    except OSError:
        return False


def encoder_pids(ancestor: int | None = None) -> list[int]:
    """Encoder actors running a shard (the title Ray gives them), below `ancestor` (this test's
    Ray: its raylet is a child of the process that started it), so that another Ray on the machine
    is never touched. A child the actor is forking (it has the actor's title until it execs) is not
    one."""
    ancestor = os.getpid() if ancestor is None else ancestor
    return [
        int(e)
        for e in os.listdir("/proc")
        if e.isdigit()
        and _is_encoder(int(e))
        and not _is_encoder(parent_pid(int(e)) or 0)
        and descends_from(int(e), ancestor)
    ]
