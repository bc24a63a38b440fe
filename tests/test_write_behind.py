"""Writing a batch's latents while the next batch encodes (`run.write_behind`): the model is given
batch k+1 before batch k's rows are written, the last batch lands before the shard commits, an
attempt that fails drops its batch in flight, and the output is the same as without it."""

from __future__ import annotations

import time

import pytest
from conftest import encode_in_process, in_process_encoder, same_output, small_config

from jobs.dataset.faults import FAULT_ENV
from jobs.dataset.reader import read_metadata
from jobs.orchestration.worker import Progress, ShardDone, ShardEncoder


def _events(encoder: ShardEncoder, messages) -> list[str]:  # type: ignore[no-untyped-def]
    """What happened, in order: each batch given to the model, each batch written, the commit."""
    events: list[str] = []
    run_model = encoder._run_model

    def noting(items):  # type: ignore[no-untyped-def]
        events.append(f"model {len(items)}")
        return run_model(items)

    encoder._run_model = noting  # type: ignore[method-assign]
    for message in messages:
        if isinstance(message, Progress):
            events.append(f"written {message.samples}")
        elif isinstance(message, ShardDone):
            events.append(f"committed {message.marker['ok']}")
    return events


@pytest.mark.parametrize("behind", [True, False])
def test_a_batch_is_written_once_the_next_is_with_the_model_and_the_last_before_the_commit(
    demo_shards, tmp_path, behind
):
    encoder, plan = in_process_encoder(small_config(demo_shards, tmp_path / "out", run={"write_behind": behind}))
    try:
        events = _events(encoder, encoder.encode_shard(plan.shards[0]))
    finally:
        encoder.decoder.close()
    if behind:  # four samples, batches of two
        assert events == ["model 2", "model 2", "written 2", "written 2", "committed 4"]
    else:
        assert events == ["model 2", "written 2", "model 2", "written 2", "committed 4"]


def test_the_output_is_the_same_with_and_without_it(demo_shards, tmp_path):
    roots = [
        encode_in_process(
            small_config(demo_shards, tmp_path / f"out-{behind}", run={"write_behind": behind, "batch_size": 3})
        )
        for behind in (True, False)
    ]
    assert [r["status"] for r in same_output(*roots)] == ["ok"] * 12


def test_an_attempt_that_fails_with_a_batch_in_flight_drops_it(demo_shards, tmp_path, monkeypatch):
    """The disk fills while the first batch is written, the second being with the model; the
    encoder's next shard, and the failed shard's next attempt, hold their own samples only."""
    monkeypatch.setenv(FAULT_ENV, f"disk-full@{tmp_path / 'fired'}")
    encoder, plan = in_process_encoder(small_config(demo_shards, tmp_path / "out"))
    a, b, _ = plan.shards
    try:
        with pytest.raises(OSError, match="No space left"):
            assert _events(encoder, encoder.encode_shard(a)) == ["never"]
        done_b = [m for m in encoder.encode_shard(b) if isinstance(m, ShardDone)]
        done_a = [m for m in encoder.encode_shard(a) if isinstance(m, ShardDone)]
    finally:
        encoder.decoder.close()
    assert done_a[0].marker["ok"] == done_b[0].marker["ok"] == 4
    rows = read_metadata(plan.root).to_pylist()
    keys = {shard.name: [r["key"] for r in rows if r["shard"] == f"latents/{shard.name}.tar"] for shard in (a, b)}
    assert sorted(map(len, keys.values())) == [4, 4] and not set(keys[a.name]) & set(keys[b.name])


def test_a_pause_fault_takes_the_seconds_it_is_given(monkeypatch):
    """`slow-commit=SECONDS` (the tests that need a longer pause than the default second)."""
    from jobs.dataset.faults import fault

    for spec, low, high in (("slow-commit=0.3", 0.3, 0.9), ("slow-commit=0", 0.0, 0.5), ("slow-start=0", 0.0, 0.5)):
        monkeypatch.setenv(FAULT_ENV, spec)
        started = time.monotonic()
        fault(spec.partition("=")[0])
        assert low <= time.monotonic() - started < high, spec
