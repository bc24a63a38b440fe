"""The driver's progress line: plain lines on a pipe, a redrawn line on a terminal, honest estimates
for shards whose samples were not counted ahead, and `run.progress_interval_s`."""

from __future__ import annotations

import io
import os
import pty
import random
import re
import select
import tarfile
import tty

import pytest
from conftest import small_config

from jobs.inputs.shards import Shard
from jobs.orchestration import driver
from jobs.orchestration.config import JobConfig, UsageError, apply_override
from jobs.orchestration.progress import ProgressBar, SampleCount
from jobs.orchestration.settings import check_config, make_plan


class Clock:
    """The bar's time, moved by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_one_per_interval_and_no_carriage_returns():
    stream, clock = io.StringIO(), Clock()
    bar = ProgressBar(total=100, shards=4, stream=stream, log_every=10.0, clock=clock)
    for step in range(36):  # one sample a second for 35 s: lines at 0, 10, 20 and 30 s
        clock.now = float(step)
        bar.update(samples=1, frames=8, actor="w0")
    assert stream.getvalue().count("\n") == 4
    bar.close()
    out = stream.getvalue()
    assert "\r" not in out and "\x1b" not in out
    lines = out.splitlines()
    assert len(lines) == 5 and [line.split()[0] for line in lines] == ["1/100", "11/100", "21/100", "31/100", "36/100"]
    assert lines[2].endswith("20s elapsed | per actor: w0 1.05/s")


def test_all_local_line_is_unchanged():
    stream, clock = io.StringIO(), Clock()
    bar = ProgressBar(total=10, shards=2, stream=stream, log_every=10.0, clock=clock)
    clock.now = 10.0
    bar.update(samples=5, frames=40, shards=1, errors=1, actor="w0")
    assert stream.getvalue() == (
        "5/10 samples  50.0% |############............| 1 errors, 0.50 samples/s, 4.0 frames/s, "
        "ETA 10s, shards 1/2, 10s elapsed | per actor: w0 0.50/s\n"
    )


def test_terminal_line_is_redrawn_in_place_at_the_refresh_rate():
    master, slave = pty.openpty()
    tty.setraw(slave)  # no newline translation: the bytes as written
    stream = os.fdopen(slave, "w")
    try:
        clock = Clock()
        bar = ProgressBar(total=10, shards=1, stream=stream, refresh=1.0, log_every=10.0, clock=clock)
        assert bar.tty
        for step in range(10):  # every 0.5 s: redrawn every second (refresh), not every 10 (log_every)
            clock.now = step * 0.5
            bar.update(samples=1)
        bar.update(shards=1)
        bar.close()
        out = b""
        while select.select([master], [], [], 0.5)[0]:
            chunk = os.read(master, 65536)
            if not chunk:
                break
            out += chunk
    finally:
        stream.close()
        os.close(master)
    text = out.decode()
    assert text.count("\r\x1b[K") == 6 and text.count("\n") == 1 and text.endswith("\n")
    assert text.split("\r\x1b[K")[-1].startswith("10/10 samples 100.0% |########################|")


def test_a_note_on_a_terminal_takes_a_line_above_the_bar_which_is_redrawn():
    master, slave = pty.openpty()
    tty.setraw(slave)
    stream = os.fdopen(slave, "w")
    try:
        bar = ProgressBar(total=10, shards=1, stream=stream, refresh=1.0, log_every=10.0, clock=Clock())
        bar.update(samples=3)
        bar.note("encoder actors ready: 2 on cpu")
        stream.flush()
        out = b""
        while select.select([master], [], [], 0.5)[0]:
            out += os.read(master, 65536)
    finally:
        stream.close()
        os.close(master)
    bar_line, note, again = out.decode().split("\r\x1b[K")[1:]
    assert bar_line.startswith("3/10 samples") and "\n" not in bar_line
    assert note == "encoder actors ready: 2 on cpu\n" and again.startswith("3/10 samples")


def test_a_note_in_a_log_is_a_line_of_its_own():
    stream = io.StringIO()
    bar = ProgressBar(total=10, shards=1, stream=stream, log_every=10.0, clock=Clock())
    bar.note("the cluster grew: starting 2 more encoder actors")
    assert stream.getvalue() == "the cluster grew: starting 2 more encoder actors\n"


def _pending_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if (m := re.search(r"shards (\d+)/(\d+)", line)) and m[1] != m[2]]


def test_uncounted_shards_are_estimated_never_done_while_pending():
    # The case of the issue: 3 s3 shards of 4 samples, all samples in before the first commit.
    stream, clock = io.StringIO(), Clock()
    bar = ProgressBar(total=0, shards=3, stream=stream, log_every=1.0, uncounted=3, clock=clock)
    for step in range(12):
        clock.now = float(step)
        bar.update(samples=1, frames=4, actor=f"w{step % 3}")
    for step in range(12, 15):
        clock.now = float(step)
        bar.update(shards=1)
    lines = stream.getvalue().splitlines()
    assert lines[11].startswith("12/? samples     ?% |........................|") and "ETA ?," in lines[11]
    assert lines[12].startswith("12/~36 samples ~33.3% |########................|") and "ETA ~24s," in lines[12]
    assert "shards 1/3 (3 uncounted)" in lines[12]
    assert lines[13].startswith("12/~18 samples ~66.7% |")
    assert lines[14].startswith("12/12 samples 100.0% |") and "ETA 0s, shards 3/3 (3 uncounted)" in lines[14]
    for line in _pending_lines(lines):
        assert "100.0%" not in line and "ETA 0s" not in line and "ETA ~0s" not in line


def test_a_total_that_the_samples_outgrow_is_estimated_while_shards_are_pending():
    # Several clips per video: more rows than the tar headers counted.
    stream, clock = io.StringIO(), Clock()
    bar = ProgressBar(total=4, shards=2, stream=stream, log_every=0.0, clock=clock)
    clock.now = 2.0
    bar.update(samples=6, shards=1)
    assert stream.getvalue().startswith("6/~12 samples ~50.0% |")


def test_an_estimate_a_hair_from_the_end_still_reads_short_of_it():
    # 10,000 local shards of one sample done in a second; one uncounted shard to go.
    stream, clock = io.StringIO(), Clock()
    bar = ProgressBar(total=10_000, shards=10_001, stream=stream, log_every=0.0, uncounted=1, clock=clock)
    clock.now = 1.0
    bar.update(samples=10_000, shards=10_000)
    assert stream.getvalue().startswith("10000/~10001 samples ~99.9% |#######################.|")
    assert "ETA ~1s," in stream.getvalue()


@pytest.mark.parametrize("seed", range(20))
def test_no_estimate_claims_the_end_before_the_last_shard(seed):
    rng = random.Random(seed)
    sizes = [rng.randint(0, 6) for _ in range(rng.randint(1, 5))]
    counted = [rng.random() < 0.5 for _ in sizes]
    stream, clock = io.StringIO(), Clock()
    bar = ProgressBar(
        total=sum(n for n, c in zip(sizes, counted) if c),
        shards=len(sizes),
        stream=stream,
        log_every=0.0,
        uncounted=counted.count(False),
        clock=clock,
    )
    left = list(sizes)
    while any(n >= 0 for n in left):  # samples of random shards, each committed after its last
        i = rng.choice([i for i, n in enumerate(left) if n >= 0])
        clock.now += rng.random() * 3
        if left[i]:
            bar.update(samples=1, frames=2, errors=int(rng.random() < 0.2))
        else:
            bar.update(shards=1)
        left[i] -= 1
    lines = stream.getvalue().splitlines()
    for line in _pending_lines(lines):
        assert "100.0%" not in line and "ETA 0s" not in line and "ETA ~0s" not in line, line
    assert lines[-1].startswith(f"{sum(sizes)}/{sum(sizes)} samples 100.0%")


def test_count_leaves_remote_shards_uncounted(tmp_path):
    path = tmp_path / "local.tar"
    with tarfile.open(path, "w") as tar:
        for key in ("a", "b", "c"):
            for suffix in ("mp4", "txt"):
                member = tmp_path / f"{key}.{suffix}"
                member.write_bytes(b"x")
                tar.add(member, arcname=member.name)
    shards = [Shard(str(path), "local"), Shard("s3://bucket/r0.tar", "r0"), Shard("pipe:cat x.tar", "x")]
    count = driver._count(shards)
    assert count == SampleCount(known=3, uncounted=2) and str(count) == "3+?"
    assert str(driver._count(shards[:1])) == "3" and str(driver._count(shards[1:])) == "?"


def test_progress_interval_setting_is_checked_and_not_fingerprinted(tmp_path):
    assert JobConfig().run.progress_interval_s == 10.0
    for bad in ("0", "-1.5"):
        config = small_config(["x.tar"], tmp_path / "o")
        apply_override(config, f"run.progress_interval_s={bad}")
        with pytest.raises(UsageError, match=r"run.progress_interval_s must be positive seconds; got -?[\d.]+"):
            config.validate()
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w"):
        pass

    def fingerprint(override: str | None) -> str:
        config = small_config([str(shard)], tmp_path / "o")
        if override:
            apply_override(config, override)
        return make_plan(config, check_config(config), has_gpus=False).fingerprint

    assert fingerprint("run.progress_interval_s=2.5") == fingerprint(None)


def test_the_driver_passes_the_interval_and_the_uncounted_shards(
    ray_cluster, demo_shards, tmp_path, capsys, monkeypatch
):
    bars: list[ProgressBar] = []

    class Recorded(ProgressBar):
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(driver, "ProgressBar", Recorded)
    inputs = [str(demo_shards[0]), f"pipe:cat {demo_shards[1]}"]
    config = small_config(inputs, tmp_path / "out", run={"progress_interval_s": 1000.0})
    assert driver.run(config, allow_shell=True).complete
    (bar,) = bars
    assert (bar.total, bar.uncounted, bar.interval) == (4, 1, 1000.0)
    err = capsys.readouterr().err
    assert "2 shards to encode (0 already committed), 4+? samples" in err
    progress = [line for line in err.splitlines() if " samples/s, " in line]
    assert len(progress) == 2  # the first update, then nothing within 1000 s, then the closing line
    assert progress[-1].startswith("8/8 samples 100.0%") and "shards 2/2 (1 uncounted)" in progress[-1]
