"""Read the samples of one input shard as a chain of webdataset stages, and split each sample.

Reading is a short chain of stages (open a stream -> expand tar members -> group by key) with
an explicit error policy: nothing is raised mid-shard; every problem is handed to `on_error`
and reading goes on where it can, so the caller can turn each problem into an error row.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from webdataset import tariterators

from jobs.inputs.shards import storage_for


@dataclass
class RawSample:
    key: str
    index: int  # position among the shard's samples
    files: dict[str, bytes]  # lower-cased suffix -> member bytes


def open_streams(
    sources: Iterable[str], opener: Callable[[str], BinaryIO], handler: Callable[[Exception], bool]
) -> Iterator[dict[str, Any]]:
    """The first stage: `{"url", "stream"}` per source (webdataset's `url_opener`, with our opener).

    A source that cannot be opened goes to `handler` (with the source appended to the
    exception's args, as webdataset does); reading stops if the handler returns False.
    """
    for source in sources:
        try:
            yield {"url": source, "stream": opener(source)}
        except Exception as exn:
            exn.args = exn.args + (source,)
            if not handler(exn):
                break


def read_shard(source: str, on_error: Callable[[Exception], None]) -> Iterator[RawSample]:
    """Yields the samples of one shard, in order.

    Args:
        source: Path or URL of the tar (opened by the storage of its form, `jobs.inputs.shards`).
        on_error: Called with each read problem (missing file, truncated tar, duplicate
            member); reading then continues with whatever comes next.
    """

    def handler(exn: Exception) -> bool:
        on_error(exn)
        return True

    streams = open_streams([source], storage_for(source).open, handler)
    files = tariterators.tar_file_expander(streams, handler=handler)
    for index, sample in enumerate(tariterators.group_by_keys(files, handler=handler)):
        members = {k: v for k, v in sample.items() if not k.startswith("__")}
        yield RawSample(key=sample["__key__"], index=index, files=members)


@dataclass
class SampleParts:
    video: bytes | None
    caption: str | None
    meta: str | None  # the `.json` member as text, if any
    problem: str | None = None  # why the sample cannot be encoded (its error row's reason)


def split_sample(sample: RawSample, video_extensions: list[str]) -> SampleParts:
    """Finds a sample's video, caption (`.txt`, else the JSON's `caption`/`text`) and metadata.

    Never raises: a sample without a video member or with invalid JSON comes back with
    `problem` set, and with whatever caption and metadata it does have, for its error row.
    """
    problem = None
    meta_text, meta = None, None
    if "json" in sample.files:
        meta_text = sample.files["json"].decode("utf-8", errors="replace")
        try:
            meta = json.loads(meta_text)
        except json.JSONDecodeError as e:
            problem = f"invalid .json member: {e}"
    caption = None
    if "txt" in sample.files:
        caption = sample.files["txt"].decode("utf-8", errors="replace").strip()
    elif isinstance(meta, dict):
        caption = _caption_from(meta)
    video = next((sample.files[ext] for ext in video_extensions if ext in sample.files), None)
    if video is None:
        found = ", ".join(sorted(sample.files)) or "nothing"
        problem = f"no video member (looked for {', '.join(video_extensions)}; found {found})"
    return SampleParts(video=video, caption=caption, meta=meta_text, problem=problem)


def _caption_from(meta: dict[str, Any]) -> str | None:
    for field in ("caption", "text"):
        if isinstance(meta.get(field), str):
            return meta[field]
    return None
