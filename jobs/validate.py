"""Check a latent dataset, finished or interrupted: `python -m jobs.validate DIR`.

    python -m jobs.validate out/latents            # every check, reading every byte
    python -m jobs.validate out/latents --quick    # sizes only: no sha256, no latent headers
    python -m jobs.validate s3://bucket/latents    # an output on s3 (the AWS settings say where)

What is checked, for every commit marker of the directory:
- it carries the job's fingerprint, and its tar and Parquet file exist with the recorded sizes
  and sha256;
- the Parquet rows agree with the marker's counts, carry the job's fingerprint, and every ok row's
  byte range in the tar is exactly one `.safetensors` member of the tar, a complete safetensors
  file whose `latent` has the row's shape and dtype; the tar holds no other latents;
- `manifest.json` (once the job has finished) lists exactly the committed shards, with their totals;
- no file under `latents/` or `meta/` that no marker names (a reader of plain tars or of
  `meta/*.parquet` would take it for data). Temporaries of an interrupted run are only counted:
  the next run removes them.

Exit status: 0 when nothing is wrong (an unfinished job is not wrong: it says how far it got),
1 with one line per problem, 2 when DIR is not a latent dataset.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.dataset.catalog import MANIFEST_FIELDS, DatasetError, Root, lock_held, marker_names, read_job
from jobs.dataset.layout import COMMITS_DIR, LATENTS_DIR, MANIFEST_FILE, META_DIR, ShardFiles, is_temporary
from jobs.dataset.reader import read_table
from jobs.dataset.store import Store, open_store

# safetensors' dtype names, as torch spells them in the `latent_dtype` column
_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    shards: int = 0
    samples: int = 0
    ok: int = 0
    errors: int = 0
    temporaries: int = 0
    notes: list[str] = field(default_factory=list)


def validate(root: Root, quick: bool = False) -> Report:
    """Every check above; the problems found, and what the directory holds.

    Raises:
        DatasetError: `root` is not a latent dataset.
    """
    store = open_store(root)
    job = read_job(store)
    report = Report()
    named: set[str] = set()
    markers: dict[str, dict[str, Any]] = {}
    report.temporaries += sum(is_temporary(Path(rel)) for rel in store.list(COMMITS_DIR))
    for name in marker_names(store):
        marker, sound = _check_marker(store, name, job.fingerprint, quick, report)
        if marker is None:
            continue
        named.update(marker[part]["path"] for part in ("latents", "meta"))  # not strays: told already
        if marker.get("fingerprint") == job.fingerprint:
            markers[name] = marker
        if sound:
            _check_rows(store, name, marker, job.fingerprint, quick, report)
    _check_manifest(store, markers, job.fingerprint, report)
    for folder in (LATENTS_DIR, META_DIR):
        for rel in store.list(folder):
            if rel in named:
                continue
            if is_temporary(Path(rel)):
                report.temporaries += 1
            else:
                report.problems.append(f"{rel}: stray file, no commit marker names it")
    if lock_held(store):
        report.notes.append("a job is writing this directory now: what it has not committed is not counted")
    return report


def _check_marker(
    store: Store, name: str, fingerprint: str, quick: bool, report: Report
) -> tuple[dict[str, Any] | None, bool]:
    """The marker (None if it is not one), and whether its files are the ones it recorded."""
    where = ShardFiles(name).commit
    try:
        marker = json.loads(store.read_bytes(where))
        parts = {part: marker[part] for part in ("latents", "meta")}
        paths = [str(parts[part]["path"]) for part in parts]
    except (OSError, ValueError, KeyError, TypeError) as e:
        report.problems.append(f"{where}: not a commit marker ({type(e).__name__}: {e})")
        return None, False
    if marker.get("fingerprint") != fingerprint:
        report.problems.append(
            f"{where}: made with other settings (fingerprint {marker.get('fingerprint')}, the job's is {fingerprint})"
        )
        return marker, False
    files = ShardFiles(name)
    for (part, expected), rel in zip((("latents", files.latents), ("meta", files.meta)), paths):
        record, size = parts[part], store.size(rel)
        if rel != expected:
            report.problems.append(f"{where}: names {rel} for its {part}, expected {expected}")
            return marker, False
        if size is None:
            report.problems.append(f"{where}: its {part} file {rel} is missing")
            return marker, False
        if size != record.get("bytes"):
            report.problems.append(f"{rel}: {size} bytes, the marker says {record.get('bytes')}")
            return marker, False
        if not quick and store.sha256(rel) != record.get("sha256"):
            report.problems.append(f"{rel}: sha256 differs from the marker's (the file changed)")
            return marker, False
    return marker, True


def _check_rows(store: Store, name: str, marker: dict[str, Any], fingerprint: str, quick: bool, report: Report) -> None:
    meta, tar_rel = marker["meta"]["path"], marker["latents"]["path"]
    try:
        rows = read_table(store, meta).to_pylist()
    except Exception as e:  # whatever pyarrow raises for an unreadable file
        report.problems.append(f"{meta}: cannot be read as the metadata schema ({type(e).__name__}: {e})")
        return
    report.shards += 1
    ok = [r for r in rows if r["status"] == "ok"]
    report.samples += len(rows)
    report.ok += len(ok)
    report.errors += len(rows) - len(ok)
    counts = {"samples": len(rows), "ok": len(ok), "errors": len(rows) - len(ok)}
    counts["frames"] = sum(r["num_frames"] or 0 for r in ok)
    for k, v in counts.items():
        if marker.get(k) != v:
            report.problems.append(f"{meta}: {v} {k}, its marker says {marker.get(k)}")
    if any(r["fingerprint"] != fingerprint for r in rows):
        report.problems.append(f"{meta}: rows carry another fingerprint than the job's")
    members = _safetensors_members(store, tar_rel, report)
    for row in ok:
        at = f"{meta}: row {row['key']!r} (clip {row['clip']})"
        if row["shard"] != tar_rel:
            report.problems.append(f"{at} points at {row['shard']}, not its shard's {tar_rel}")
            continue
        if members is not None and members.pop((row["offset"], row["size"]), None) is None:
            report.problems.append(f"{at}: bytes {row['offset']}+{row['size']} are not a latent member of {tar_rel}")
            continue
        if not quick:
            problem = _check_latent(store, tar_rel, row)
            if problem:
                report.problems.append(f"{at}: {problem}")
    for (offset, size), member in sorted((members or {}).items()):
        report.problems.append(f"{tar_rel}: member {member} (byte {offset}, {size} bytes) has no row")


def _safetensors_members(store: Store, rel: str, report: Report) -> dict[tuple[int, int], str] | None:
    try:
        with store.open(rel) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            return {(m.offset_data, m.size): m.name for m in tar if m.name.endswith(".safetensors")}
    except (OSError, tarfile.TarError) as e:
        report.problems.append(f"{rel}: not a readable tar ({type(e).__name__}: {e})")
        return None


def _check_latent(store: Store, rel: str, row: dict[str, Any]) -> str | None:
    """Why the row's byte range is not a complete safetensors file with its latent; None if it is."""
    with store.open(rel) as f:
        f.seek(row["offset"])
        data = f.read(row["size"])
    if len(data) < 8:
        return "shorter than a safetensors header"
    (length,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8 : 8 + length])
        latent = header["latent"]
        end = max(t["data_offsets"][1] for k, t in header.items() if k != "__metadata__")
    except (ValueError, KeyError, TypeError) as e:
        return f"not a safetensors file with a latent ({type(e).__name__}: {e})"
    if 8 + length + end != len(data):
        return f"a safetensors file of {8 + length + end} bytes in a range of {len(data)}"
    if latent["shape"] != row["latent_shape"] or _DTYPES.get(latent["dtype"]) != row["latent_dtype"]:
        return f"latent {latent['dtype']} {latent['shape']}, the row says {row['latent_dtype']} {row['latent_shape']}"
    return None


def _check_manifest(store: Store, markers: dict[str, dict[str, Any]], fingerprint: str, report: Report) -> None:
    if not store.exists(MANIFEST_FILE):
        report.notes.append(f"no {MANIFEST_FILE}: the job has not finished ({len(markers)} shards committed so far)")
        return
    try:
        manifest = json.loads(store.read_bytes(MANIFEST_FILE))
        listed = {s["name"]: s for s in manifest["shards"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        report.problems.append(f"{MANIFEST_FILE}: not a manifest ({type(e).__name__}: {e})")
        return
    if manifest.get("fingerprint") != fingerprint:
        report.problems.append(
            f"{MANIFEST_FILE}: fingerprint {manifest.get('fingerprint')}, the job's is {fingerprint}"
        )
    for name in sorted(set(listed) - set(markers)):
        report.problems.append(f"{MANIFEST_FILE}: lists {name}, which is not committed")
    for name in sorted(set(markers) - set(listed)):
        report.problems.append(f"{MANIFEST_FILE}: does not list committed shard {name}")
    for key in ("samples", "ok", "errors", "frames"):
        total = sum(s.get(key) or 0 for s in listed.values())
        if manifest.get(key) != total:
            report.problems.append(f"{MANIFEST_FILE}: {key} = {manifest.get(key)}, its shards hold {total}")
    for name in sorted(set(listed) & set(markers)):
        changed = [k for k in MANIFEST_FIELDS if listed[name].get(k) != markers[name].get(k)]
        if changed:
            report.problems.append(
                f"{MANIFEST_FILE}: its entry for {name} differs from the marker in {', '.join(changed)}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", help="the output directory of a precompute job (a path or s3://bucket/prefix)")
    parser.add_argument("--quick", action="store_true", help="check sizes only (no sha256, no latent headers)")
    args = parser.parse_args(argv)
    try:
        report = validate(args.dir, quick=args.quick)
    except (DatasetError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for problem in report.problems:
        print(f"PROBLEM {problem}")
    for note in report.notes:
        print(f"note: {note}")
    if report.temporaries:
        print(f"note: {report.temporaries} temporaries of an interrupted write (the next run removes them)")
    verdict = f"{len(report.problems)} problems" if report.problems else "valid"
    print(
        f"{args.dir}: {verdict}; {report.shards} committed shards, {report.samples} rows "
        f"({report.ok} ok, {report.errors} errors)"
    )
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
