"""Where a precompute job stands: `python -m jobs.status DIR` (no Ray needed).

    python -m jobs.status out/latents
    python -m jobs.status out/latents --json
    python -m jobs.status s3://bucket/latents

Shows the shards committed (by the markers that carry the job's fingerprint), the input shards
still pending (the inputs `job.json` lists that no marker covers), the shards the last run could
not write and why (from `report.json`), the last run's figures, and whether a job holds the
directory now. Exit status 0 when every input shard is committed, 1 while some are pending or
failed, 2 when DIR is not a latent dataset or cannot be read (an I/O or network error).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from jobs.dataset.catalog import DatasetError, Root, committed_markers, lock_held, read_job
from jobs.dataset.layout import MANIFEST_FILE, REPORT_FILE
from jobs.dataset.store import open_store
from jobs.orchestration.progress import time_split


def status(root: Root) -> dict[str, Any]:
    """The state of a dataset directory, as `--json` prints it.

    Raises:
        DatasetError: `root` is not a latent dataset.
    """
    store = open_store(root)
    job = read_job(store)
    markers = committed_markers(store, job.fingerprint)
    done = {m["source"] for m in markers}
    report: dict[str, Any] | None = None
    try:
        report = json.loads(store.read_bytes(REPORT_FILE))
    except (OSError, ValueError):
        pass
    failed = (report or {}).get("shards", {}).get("failed", {})
    committed_names = {m["name"] for m in markers}
    return {
        "dir": store.url,
        "fingerprint": job.fingerprint,
        "inputs": len(job.inputs),
        "committed": len(markers),
        "pending": [s for s in job.inputs if s not in done],
        "failed_last_run": {name: why for name, why in failed.items() if name not in committed_names},
        "samples": sum(m["samples"] for m in markers),
        "ok": sum(m["ok"] for m in markers),
        "errors": sum(m["errors"] for m in markers),
        "frames": sum(m["frames"] for m in markers),
        "bytes": sum(m["latents"]["bytes"] + m["meta"]["bytes"] for m in markers),
        "finished": store.exists(MANIFEST_FILE) and all(s in done for s in job.inputs),
        "running": lock_held(store),
        "last_run": report,
    }


def text(state: dict[str, Any]) -> str:
    lines = [
        f"{state['dir']}: {state['committed']} of {state['inputs']} input shards committed "
        f"({state['samples']} rows: {state['ok']} ok, {state['errors']} errors; {state['frames']} frames; "
        f"{state['bytes'] / 1e6:.1f} MB)",
        f"a job is writing it now: {'yes' if state['running'] else 'no'}",
    ]
    pending = state["pending"]
    if pending:
        shown = ", ".join(pending[:5]) + (f", ... ({len(pending) - 5} more)" if len(pending) > 5 else "")
        lines.append(f"pending: {len(pending)} shards: {shown}")
    for name, why in state["failed_last_run"].items():
        lines.append(f"failed in the last run: {name}: {why}")
    last = state["last_run"]
    if last:
        how = "complete" if last["complete"] else ("interrupted" if last.get("interrupted") else "incomplete")
        lines.append(
            f"last run ({last.get('finished_at', '?')}): {how}, {last['shards']['written']} shards written in "
            f"{last['seconds']:.0f} s, {last['frames_per_s']:.1f} frames/s"
        )
        if busy := time_split(last.get("actors", {}).values()):
            lines.append(f"  {busy}")
        if last.get("stopped"):
            lines.append(f"  stopped: {last['stopped']}")
        for entry in last.get("error_reasons", [])[:3]:
            lines.append(f"  errors: {entry['reason']} ({entry['count']})")
    lines.append("finished: every input committed, manifest.json written" if state["finished"] else "not finished")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", help="the output directory of a precompute job (a path or s3://bucket/prefix)")
    parser.add_argument("--json", action="store_true", help="print the state as JSON")
    args = parser.parse_args(argv)
    try:
        state = status(args.dir)
    except (DatasetError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(state, indent=2) if args.json else text(state))
    return 0 if not state["pending"] and not state["failed_last_run"] else 1


if __name__ == "__main__":
    sys.exit(main())
