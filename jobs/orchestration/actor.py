"""The encoder actor as Ray starts it: the decoding processes' fork server first, then the VAE.

Ray imports an actor's module, and its constructor's arguments, in a fresh worker process.
`ShardEncoder`'s module imports torch (about a second), and so does the fork server its decoding
processes are forked from. Started here, before that import, the fork server does its imports
beside the actor's own instead of after them, and the actor's first shard does not wait for it.
So this module imports nothing heavy, and the config and the first shard come as plain values (a
`JobConfig` or a `Shard` would import torch while Ray unpacks them, before the fork server starts).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from jobs.dataset.faults import fault
from jobs.inputs import forkserver

if TYPE_CHECKING:
    from jobs.inputs.shards import Shard
    from jobs.orchestration.worker import Progress, ShardDone


class EncoderActor:
    """A `ShardEncoder` (`jobs/orchestration/worker.py`) whose decoding processes start first."""

    def __init__(
        self,
        config: dict[str, Any],
        root: str,
        constants: dict[str, Any],
        allow_shell: bool = False,
        first: tuple[str, str] | None = None,
    ) -> None:
        """`config` is `dataclasses.asdict` of the resolved `JobConfig`, `first` the `(source, name)` of
        `ShardEncoder`'s `first`; the rest as `ShardEncoder`'s."""
        fault("slow-start")  # (the failure tests' slow node: off unless its environment asks)
        fault("crash-start")  # (and an actor killed while it starts)
        forkserver.start()  # a server that dies at once is started again by the pool, which says why if it cannot
        from jobs.inputs.shards import Shard  # torch, beside the fork server's imports
        from jobs.orchestration.config import JobConfig, from_dict
        from jobs.orchestration.worker import ShardEncoder

        shard = None if first is None else Shard(*first)
        self.encoder = ShardEncoder(from_dict(JobConfig, config), root, constants, allow_shell, shard)

    def ready(self) -> str:
        return self.encoder.ready()

    def encode_shard(self, shard: Shard, then: Shard | None = None) -> Iterator[Progress | ShardDone]:
        yield from self.encoder.encode_shard(shard, then)
