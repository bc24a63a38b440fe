"""Throughput of the job against its bounds and two baselines, on one generated dataset.

    python benchmarks/throughput.py                               # CPU, flux-ae-tiny, 48 clips
    python benchmarks/throughput.py --clips 200 --preset hunyuan-vae-tiny --frames 9
    python benchmarks/throughput.py --resize decoder --techniques float-frames batch-1 one-process
    python benchmarks/throughput.py --device cuda --preset hunyuan-vae --frames 33 --size 256
    python benchmarks/throughput.py --clips 384 --readme README.md # and rewrite the README's table

Measures, on the same clips, VAE and cores:
- decode only: the video path (PyAV decode, sampling, resize, crop), in-process on one thread and
  in `run.decode_threads` decoding processes;
- encode only: the VAE on synthetic clips of the job's shape, `run.batch_size` per call;
- the bound they set when each clip is decoded and then encoded: 1 / (1/decode + 1/encode);
- end to end: the real job (`jobs.orchestration.driver.run`) on an embedded Ray cluster, Ray's
  start-up timed apart; then again with each technique of `--techniques` turned off (`compile`
  turned on): pinned host memory, uint8 host frames, batches of a bucket, parallel decoding,
  decoding the next shard's first samples while a shard finishes, freed host memory kept for reuse,
  decoding processes below the model's CPU priority; each job row says where its actor's time went
  (the model, waiting for decoding, the rest);
- baseline "loop": one process decoding, encoding and saving each clip as a trainer's caching
  script does (a new process, whose heap grows from nothing as the job's actor's does);
- baseline "ray-data": Ray Data's `read_webdataset` -> decode -> `map_batches` with VAE actors ->
  `write_parquet` (needs pandas: `pip install pandas`; skipped without it).

Prints one JSON line per measurement and a table with the ratios the targets are stated in.
With `--readme FILE`, the results table between the `<!-- throughput:begin -->` and
`<!-- throughput:end -->` lines of FILE (`--block NAME`: another) is replaced by this run's
(hardware, settings, the command, each figure beside the bound it is measured against).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from readme_table import hardware, replace_block
from torch.utils.flop_counter import FlopCounterMode

from jobs.demo_data import write_demo_dataset
from jobs.inputs.decode_pool import ClipSpec, DecodePool
from jobs.inputs.sampling import ClipRequest
from jobs.inputs.tar_samples import read_shard, split_sample
from jobs.inputs.video import VideoError, read_clips
from jobs.orchestration.config import JobConfig, RunConfig, VAEConfig, VideoConfig
from jobs.orchestration.host_memory import reuse_freed_memory
from jobs.orchestration.progress import time_shares

VIDEO_SUFFIXES = ["mp4"]


def source_frames(frames: int) -> tuple[int, int]:
    """The generated videos' shortest and longest: `jobs.demo_data`'s 20 to 48 frames, or from the
    clip's length to 28 more where clips are longer than 20 frames (every video gives its clip)."""
    return max(20, frames), max(48, frames + 28)


def videos(scale: int, frames: int) -> str:
    """The generated videos, in words."""
    sizes = f"5 sizes from {96 * scale}x{160 * scale} to {192 * scale}x{112 * scale}"
    shortest, longest = source_frames(frames)
    return f"`jobs.demo_data`: {sizes}, {shortest} to {longest} frames at 24 to 30 fps, H.264"


def load_videos(shards: list[Path]) -> list[tuple[str, bytes]]:
    out = []
    for shard in shards:
        for raw in read_shard(str(shard), lambda reason: None):
            parts = split_sample(raw, VIDEO_SUFFIXES)
            if parts.video is not None:
                out.append((raw.key, parts.video))
    return out


def decode_only(videos: list[tuple[str, bytes]], request: ClipRequest, processes: int) -> list[dict[str, Any]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started, frames = time.perf_counter(), 0
    for key, data in videos:
        frames += sum(c.pixels.shape[1] for c in read_clips(data, request, key))
    serial = time.perf_counter() - started
    torch.set_num_threads(threads)
    pool = DecodePool(processes, timeout=600)
    try:
        pool.submit(videos[0][1], ClipSpec(request), videos[0][0]).result()  # the processes started
        started = time.perf_counter()
        futures = [pool.submit(data, ClipSpec(request), key) for key, data in videos]
        pooled_frames = sum(c.pixels.shape[1] for f in futures for c in f.result())
        pooled = time.perf_counter() - started
    finally:
        pool.close()
    return [
        {"name": "decode, 1 thread", "frames": frames, "seconds": serial},
        {"name": f"decode, {processes} processes", "frames": pooled_frames, "seconds": pooled},
    ]


def encode_only(
    preset: str, request: ClipRequest, batch: int, clips: int, device: str, peak_tflops: float | None = None
) -> dict[str, Any]:
    """Frames/s of the VAE alone; FLOPs counted by `torch.utils.flop_counter` (MFU against `peak_tflops`)."""
    from vae import encode_video, get_preset, load_vae

    spec = get_preset(preset)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = load_vae(spec, None, device=device, dtype=dtype)
    x = torch.rand(batch, 3, request.num_frames, request.height, request.width, device=device, dtype=dtype) * 2 - 1
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:  # the warm-up call, counted
            encode_video(model, spec, x)
        _sync(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        calls = max(1, clips // batch)
        started = time.perf_counter()
        for _ in range(calls):
            encode_video(model, spec, x)
        _sync(device)
        seconds = time.perf_counter() - started
    tflops = counter.get_total_flops() * calls / seconds / 1e12
    result: dict[str, Any] = {
        "name": f"encode, batch {batch}",
        "frames": calls * batch * request.num_frames,
        "seconds": seconds,
        "tflops": round(tflops, 4),
        "pid": os.getpid(),  # (this process: the loop's is another)
    }
    if peak_tflops:
        result["mfu"] = round(tflops / peak_tflops, 4)
    if device == "cuda":
        result["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def job_config(shards: list[Path], out: Path, args: argparse.Namespace) -> JobConfig:
    return JobConfig(
        input=[str(s) for s in shards],
        output=str(out),
        vae=VAEConfig(name=args.preset),
        video=VideoConfig(num_frames=args.frames, height=args.height, width=args.width, resize=args.resize),
        run=RunConfig(
            workers=args.workers,
            cpus_per_worker=args.cpus_per_worker,
            batch_size=args.batch,
            decode_threads=args.decode_processes,
            max_error_rate=1.0,
        ),
    )


# The job again with one technique turned off (or, for `compile`, on): name -> (row, `run` settings).
TECHNIQUES = {
    "pageable": ("job, pageable host memory", {"pin_memory": False}),
    "no-write-behind": ("job, each batch written before the next encodes", {"write_behind": False}),
    "float-frames": ("job, float32 host frames", {"uint8_frames": False}),
    "batch-1": ("job, batch 1", {"batch_size": 1}),
    "one-process": ("job, 1 decoding process", {"decode_threads": 1}),
    "equal-priority": ("job, decoding at the model's CPU priority", {"decode_priority": "normal"}),
    "nice-priority": ("job, decoding at nice 19", {"decode_priority": "low"}),
    # (on a Ray cluster started with this system config over `pool.RAY_SYSTEM_CONFIG`)
    "ray-nice-15": ("job, Ray's workers at its default nice 15", {"ray": {"worker_niceness": 15}}),
    "no-read-ahead": ("job, no read-ahead across shards", {"read_ahead": False}),
    "default-malloc": ("job, glibc's default allocator thresholds", {"reuse_host_memory": False}),
    "compile": ("job, compiled encoder", {"compile": True}),
}
# (`float-frames` only where clips are whole pixels: `--resize decoder`, or sources at the clip's size)
DEFAULT_TECHNIQUES = {"cpu": [], "cuda": ["pageable", "no-write-behind", "batch-1", "one-process"]}


def start_ray(system_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """An embedded Ray cluster, as the job starts one (`system_config` changing its Ray settings);
    its start-up timed."""
    from jobs.orchestration.pool import start_embedded

    started = time.perf_counter()
    start_embedded(logging_level="ERROR", log_to_driver=False, _system_config=system_config or {})
    return {"name": "ray start-up", "frames": 0, "seconds": time.perf_counter() - started}


def restart_ray(system_config: dict[str, Any] | None = None) -> None:
    import ray

    ray.shutdown()
    start_ray(system_config)


def end_to_end(shards: list[Path], out: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The job on the running Ray cluster; then once more per technique of `--techniques`, with
    that technique turned off (`compile`: on), the rest as they were."""
    from jobs.orchestration.driver import run

    results: list[dict[str, Any]] = []
    runs = [("job, end to end", {})] + [TECHNIQUES[t] for t in args.techniques]
    for name, settings in runs:
        config = job_config(shards, out / name.replace(" ", "-").replace(",", ""), args)
        config.run = dataclasses.replace(config.run, **{k: v for k, v in settings.items() if k != "ray"})
        ray_settings = settings.get("ray")
        if ray_settings:
            restart_ray(ray_settings)
        started = time.perf_counter()
        summary = run(config)
        seconds = time.perf_counter() - started
        if ray_settings:
            restart_ray()
        actors = summary.actors.values()
        model_share, wait_share = time_shares(actors)  # of the actors' shard time: the model, waiting for frames
        row = {"name": name, "frames": summary.frames, "seconds": seconds, "clips": summary.ok}
        row.update(decode_wait_s=sum(a["decode_wait_s"] for a in actors), busy_s=max(a["seconds"] for a in actors))
        row.update(model_share=model_share, wait_share=wait_share)
        row.update(model_fps=summary.frames / sum(a["model_s"] for a in actors))  # the model's own rate
        results.append(row)
    return results


def loop_baseline(
    videos: list[tuple[str, bytes]], request: ClipRequest, args: argparse.Namespace, out: Path
) -> dict[str, Any]:
    """What trainers' caching scripts do: one process, decode, encode, save a file per clip (run in a
    process of its own, `in_new_process`, as such a script is)."""
    from safetensors.torch import save_file

    from vae import encode_video, get_preset, load_vae

    spec = get_preset(args.preset)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    started = time.perf_counter()
    model = load_vae(spec, None, device=args.device, dtype=dtype)
    out.mkdir(parents=True, exist_ok=True)
    frames = 0
    with torch.inference_mode():
        for key, data in videos:
            try:
                (clip,) = read_clips(data, request, key)
            except VideoError:
                continue
            z, _ = encode_video(model, spec, clip.pixels[None].to(args.device, dtype))
            save_file({"latent": z[0].float().cpu().contiguous()}, str(out / f"{key}.safetensors"))
            frames += clip.pixels.shape[1]
    seconds = time.perf_counter() - started
    return {"name": "baseline: single-process loop", "frames": frames, "seconds": seconds, "pid": os.getpid()}


def in_new_process(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """`fn(*args)` in a new process, with the job's allocator settings: its heap grows from nothing,
    as the job's actor's does, instead of reusing what this process's earlier measurements freed
    (encode-only's batches leave up to `host_memory.TRIM_THRESHOLD` freed in it)."""
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn, initializer=reuse_freed_memory) as pool:
        return pool.submit(fn, *args).result()


class _RayDataEncoder:
    def __init__(self, preset: str, device: str, threads: int) -> None:
        from vae import get_preset, load_vae

        reuse_freed_memory()  # as the job's actors do (the baselines get every technique they can use)
        self.spec = get_preset(preset)
        self.device = device
        self.dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self.model = load_vae(self.spec, None, device=device, dtype=self.dtype)
        torch.set_num_threads(threads)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        from vae import encode_video

        x = torch.from_numpy(np.stack(batch["pixels"])).to(self.device, self.dtype)
        with torch.inference_mode():
            z, _ = encode_video(self.model, self.spec, x)
        return {"key": batch["key"], "latent": [t.float().cpu().numpy().ravel() for t in z]}


def ray_data_baseline(
    shards: list[Path], clips: int, request: ClipRequest, args: argparse.Namespace, out: Path
) -> dict[str, Any] | None:
    try:
        import pandas  # noqa: F401  (Ray Data needs it)
    except ImportError:
        return None
    import ray
    import ray.data

    def decode(row: dict[str, Any]) -> dict[str, Any]:
        (clip,) = read_clips(row["mp4"], request, row["__key__"])
        return {"key": row["__key__"], "pixels": clip.pixels.numpy(), "frames": clip.pixels.shape[1]}

    started = time.perf_counter()
    ds = ray.data.read_webdataset([str(s) for s in shards], decoder=None, suffixes=VIDEO_SUFFIXES)
    ds = ds.map(decode)
    ds = ds.map_batches(
        _RayDataEncoder,
        fn_constructor_args=(args.preset, args.device, args.cpus_per_worker),
        batch_size=args.batch,
        concurrency=max(1, args.workers),
        # Room for the read and decode tasks beside the actors (all CPUs to the actors deadlocks);
        # the actors' torch still uses `cpus_per_worker` threads.
        num_cpus=max(1, args.cpus_per_worker - 1),
        num_gpus=1 if args.device == "cuda" else 0,
    )
    ds.write_parquet(str(out))
    seconds = time.perf_counter() - started
    frames = clips * request.num_frames
    return {"name": "baseline: Ray Data", "frames": frames, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--preset", default="flux-ae-tiny")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", default="64", help="the clips' frame size: N (square) or WxH, e.g. 1280x720")
    parser.add_argument(
        "--source-scale",
        type=int,
        default=1,
        help="multiplies the generated videos' sizes (96x160 to 192x112): 6 is about 720p, 10 about 1080p",
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument(
        "--per-shard", type=int, default=32, help="videos per input shard (real datasets hold hundreds to thousands)"
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--cpus-per-worker", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--decode-processes", type=int, default=2)
    parser.add_argument("--resize", default="exact", choices=["exact", "decoder"], help="video.resize")
    parser.add_argument(
        "--techniques",
        nargs="*",
        choices=list(TECHNIQUES),
        help="run the job again with each turned off (compile: on); default on a GPU: "
        + " ".join(DEFAULT_TECHNIQUES["cuda"]),
    )
    parser.add_argument("--peak-tflops", type=float, help="the chip's dense peak (H100/H200 SXM bf16: 989), for MFU")
    parser.add_argument(
        "--rounds", type=int, default=1, help="every measurement this many times, interleaved; medians are reported"
    )
    parser.add_argument("--readme", type=Path, help="rewrite the results table of this Markdown file")
    parser.add_argument("--block", default="throughput", help="which table of --readme (<!-- BLOCK:begin -->)")
    args = parser.parse_args()
    # Freed host memory kept for reuse (`run.reuse_host_memory`) here too, where encode only, decode
    # only and the loop run: the bound and the baselines are measured at their best.
    reuse_freed_memory()
    if args.techniques is None:
        args.techniques = DEFAULT_TECHNIQUES[args.device]
    args.width, args.height = (int(n) for n in args.size.split("x")) if "x" in args.size else (int(args.size),) * 2
    request = ClipRequest(num_frames=args.frames, height=args.height, width=args.width, resize=args.resize)
    rounds: list[list[dict[str, Any]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        count = max(1, -(-args.clips // args.per_shard))  # shards of at most --per-shard videos
        per_shard = args.clips // count
        shortest, longest = source_frames(args.frames)
        shards = write_demo_dataset(root / "data", count, per_shard, 0, shortest, args.source_scale, longest)
        videos = load_videos(shards)
        for number in range(args.rounds):
            rows = one_round(shards, videos, request, args, root / f"round-{number}")
            for r in rows:
                r["frames_per_s"] = round(r["frames"] / r["seconds"], 2) if r["frames"] else None
                r["videos_per_s"] = round(r["frames_per_s"] / args.frames, 2) if r["frames"] else None  # one clip each
                r["seconds"] = round(r["seconds"], 3)
                clip = [args.frames, args.height, args.width]
                print(json.dumps({**r, "round": number, "preset": args.preset, "device": args.device, "clip": clip}))
            rounds.append(rows)
    results = [median_row([rows[i] for rows in rounds]) for i in range(len(rounds[0]))]
    each = [ratios(rows, args) for rows in rounds]
    figures = {k: statistics.median(f[k] for f in each) for k in each[0]}
    spread = {k: (min(f[k] for f in each), max(f[k] for f in each)) for k in each[0]}
    figures["videos"], figures["per_shard"] = len(videos), len(videos) // len(shards)
    what = f"median of {args.rounds} rounds" if args.rounds > 1 else "one round"
    print(f"\n{'measurement (' + what + ')':<40} {'frames':>7} {'seconds':>8} {'frames/s':>9} {'videos/s':>9}")
    for r in results:
        rates = f"{r['frames_per_s'] or '':>9} {r['videos_per_s'] or '':>9}"
        waited = (
            f"   the model waited {r['decode_wait_s']:.2f} s for decoding; {actor_time(r)}"
            if "decode_wait_s" in r
            else ""
        )
        print(f"{r['name']:<40} {r['frames']:>7} {r['seconds']:>8} {rates}{waited}")

    def said(key: str) -> str:
        return with_spread(key, figures, spread, args.rounds, "rounds: ")

    print(f"\nbound 1/(1/decode + 1/encode): {figures['bound']:.1f} frames/s; job / bound = {said('job/bound')}")
    print(f"job while its actors encode shards (their start apart) / bound = {said('busy/bound')}")
    print(f"job (Ray start-up included) / single-process loop = {said('job+startup/loop')}")
    if "job/ray-data" in figures:
        print(f"job / Ray Data = {said('job/ray-data')}")
    else:
        print("Ray Data baseline skipped (pip install pandas)")
    if args.readme:
        replace_block(args.readme, args.block, results_table(results, figures, spread, args))
        print(f"rewrote the results table of {args.readme}")


def one_round(
    shards: list[Path], videos: list[tuple[str, bytes]], request: ClipRequest, args: argparse.Namespace, out: Path
) -> list[dict[str, Any]]:
    """Every measurement once, one after another (rounds interleave them, so that a machine whose
    speed drifts, as a shared one does, slows each measurement alike instead of one of them)."""
    import ray

    rows = decode_only(videos, request, args.decode_processes)
    rows.append(encode_only(args.preset, request, args.batch, len(videos), args.device, args.peak_tflops))
    rows.append(in_new_process(loop_baseline, videos, request, args, out / "loop"))
    rows.append(start_ray())
    try:
        rows += end_to_end(shards, out / "job", args)
        data = ray_data_baseline(shards, len(videos), request, args, out / "ray-data")
        if data is not None:
            rows.append(data)
    finally:
        ray.shutdown()
    return rows


def actor_time(row: dict[str, Any]) -> str:
    """Where a job's actor time went (`report.json`'s figures): the model at work, waiting for
    decoding, and the rest, which is the job's own machinery (reading tars, writing, commits)."""
    model, wait = row["model_share"], row["wait_share"]
    split = f"actor time: {model:.0%} model, {wait:.0%} decode wait, {max(0.0, 1 - model - wait):.0%} the rest"
    return f"{split}; the model at {row['model_fps']:.1f} frames/s"


def median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One measurement over the rounds: its median seconds and rates."""
    out = dict(rows[0])
    for key in (
        "seconds",
        "frames_per_s",
        "videos_per_s",
        "decode_wait_s",
        "busy_s",
        "model_share",
        "wait_share",
        "model_fps",
    ):
        if rows[0].get(key) is not None:
            out[key] = round(statistics.median(r[key] for r in rows), 3 if key == "seconds" else 2)
    return out


def with_spread(
    key: str, figures: dict[str, float], spread: dict[str, tuple[float, float]], rounds: int, label: str = ""
) -> str:
    """A figure's median, and with several rounds its lowest and highest round."""
    low, high = spread[key]
    return f"{figures[key]:.2f}" + (f" ({label}{low:.2f} to {high:.2f})" if rounds > 1 else "")


def ratios(rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, float]:
    """A round's figures that the targets are stated in."""
    rate = {r["name"]: r["frames_per_s"] for r in rows}
    by_name = {r["name"]: r for r in rows}
    bound = 1 / (1 / rate[f"decode, {args.decode_processes} processes"] + 1 / rate[f"encode, batch {args.batch}"])
    job = by_name["job, end to end"]
    with_startup = job["frames"] / (job["seconds"] + by_name["ray start-up"]["seconds"])
    out = {
        "bound": bound,
        "job/bound": rate["job, end to end"] / bound,
        # the same while its actors encode shards: without the actors' start and the run's end
        "busy/bound": job["frames"] / job["busy_s"] / bound,
        "job+startup/loop": with_startup / rate["baseline: single-process loop"],
    }
    if "baseline: Ray Data" in rate:
        out["job/ray-data"] = rate["job, end to end"] / rate["baseline: Ray Data"]
    for name, _ in TECHNIQUES.values():
        if name in rate:
            out[f"job/{name}"] = rate["job, end to end"] / rate[name]
    return out


def results_table(
    results: list[dict[str, Any]],
    figures: dict[str, float],
    spread: dict[str, tuple[float, float]],
    args: argparse.Namespace,
) -> list[str]:
    """The README's block: what ran where, each figure, and its ratio to what it is measured against
    (with several rounds: medians, and each ratio's lowest and highest round)."""
    bound = figures["bound"]
    command = shlex.join(["python", "benchmarks/throughput.py", *sys.argv[1:]])
    rounds = f"the median of {args.rounds} rounds, each measurement once per round" if args.rounds > 1 else "one round"
    lines = [
        f"Hardware: {hardware(args.device)}; torch {torch.__version__}. Settings: `{args.preset}`, "
        f"{figures['videos']} videos of mixed sizes and lengths ({videos(args.source_scale, args.frames)}), one "
        f"{args.frames}x{args.height}x{args.width} clip each, {figures['per_shard']} per shard, batch {args.batch}, "
        f"{args.decode_processes} decoding processes, `video.resize: {args.resize}`, {args.workers} encoder "
        f"actor(s) of {args.cpus_per_worker} threads; {rounds}. Command: `{command}` "
        f"({time.strftime('%Y-%m-%d')}).",
        "",
        "| measurement | frames | seconds | frames/s | videos/s | against |",
        "| --- | --- | --- | --- | --- | --- |",
    ]

    def ratio(key: str) -> str:
        return with_spread(key, figures, spread, args.rounds)

    against = {
        "job, end to end": f"{ratio('job/bound')} of the bound (target 0.9), {ratio('busy/bound')} while its actor "
        "encodes shards (its start apart)",
        "baseline: single-process loop": f"the job with Ray's start-up: {ratio('job+startup/loop')}x this (target 0.9)",
    }
    if "job/ray-data" in figures:
        against["baseline: Ray Data"] = f"the job: {ratio('job/ray-data')}x this (target 1.5)"
    for name, _ in TECHNIQUES.values():
        if f"job/{name}" in figures:
            against[name] = f"the job: {ratio('job/' + name)}x this"
    for r in results:
        cells = [r["name"], r["frames"], r["seconds"], r["frames_per_s"] or "", r["videos_per_s"] or ""]
        notes = [against.get(r["name"], "")]
        if "decode_wait_s" in r:
            notes.append(f"its model waited {r['decode_wait_s']:.2f} s for decoding")
            notes.append(actor_time(r))
        cells.append("; ".join(n for n in notes if n))
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    bound_cells = f"{bound:.1f} | {bound / args.frames:.1f} | the limit of these cores"
    lines.append(f"| bound 1/(1/decode + 1/encode) | | | {bound_cells} |")
    return lines


if __name__ == "__main__":
    main()
