"""uint8 frames on the host (`run.uint8_frames`): clips of whole pixels leave the decoding processes
as uint8 and become [-1, 1] on the encoder's device, with the very bits of the float path."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from conftest import in_process_encoder, small_config

from jobs.dataset.reader import load_sample, read_metadata
from jobs.demo_data import synth_video, video_file_bytes, write_shard
from jobs.inputs.decode_pool import ClipSpec, DecodePool
from jobs.inputs.sampling import ClipRequest
from jobs.inputs.video import read_clips, signed_unit


@pytest.fixture(scope="module")
def pool():
    pool = DecodePool(1, timeout=60)
    yield pool
    pool.close()


def _video(width: int, height: int, frames: int = 10) -> bytes:
    return video_file_bytes(synth_video(np.random.default_rng(3), width, height, frames, 25).frames, 25)


def _size_changing_avi() -> bytes:
    """Motion JPEG in avi whose frames turn from 64x48 to 80x60 after the fourth (each JPEG
    carries its own size, and FFmpeg's decoder follows it)."""
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(4)]
    frames += [rng.integers(0, 256, (60, 80, 3), dtype=np.uint8) for _ in range(4)]
    buf = io.BytesIO()
    with av.open(buf, "w", format="avi") as container:
        stream = container.add_stream("mjpeg", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuvj420p"
        for i, rgb in enumerate(frames):
            codec = av.CodecContext.create("mjpeg", "w")
            codec.width, codec.height, codec.pix_fmt = rgb.shape[1], rgb.shape[0], "yuvj420p"
            codec.time_base = Fraction(1, 25)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuvj420p")
            (packet,) = [*codec.encode(frame), *codec.encode(None)]
            packet = av.Packet(bytes(packet))
            packet.stream, packet.pts, packet.dts, packet.time_base = stream, i, i, Fraction(1, 25)
            container.mux(packet)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("source", "request_", "uint8"),
    [
        ((96, 64), ClipRequest(8, 48, 64, resize="decoder"), True),  # FFmpeg's scaler: whole pixels
        ((64, 48), ClipRequest(8, 48, 64), True),  # exact, and the frames need no resize
        ((80, 48), ClipRequest(8, 48, 64), True),  # exact: a crop only
        ((96, 64), ClipRequest(8, 48, 64), False),  # exact, resized in float
    ],
)
def test_whole_pixels_travel_as_uint8_and_become_the_float_paths_bits(pool, source, request_, uint8):
    data = _video(*source)
    (clip,) = pool.submit(data, ClipSpec(request_), "k").result()
    (expected,) = read_clips(data, request_, "k")  # in process, float32 in [-1, 1]
    assert clip.pixels.dtype == (torch.uint8 if uint8 else torch.float32)
    assert expected.pixels.dtype == torch.float32
    assert torch.equal(signed_unit(clip.pixels), expected.pixels)
    (off,) = pool.submit(data, ClipSpec(request_, uint8=False), "k").result()
    assert off.pixels.dtype == torch.float32 and torch.equal(off.pixels, expected.pixels)


def test_a_frame_that_changes_size_mid_clip_is_decoded_again_in_float(pool):
    data = _size_changing_avi()
    request = ClipRequest(8, 48, 64)  # the first frame's size: planned as whole pixels
    (clip,) = pool.submit(data, ClipSpec(request), "k").result()
    (expected,) = read_clips(data, request, "k")
    assert clip.pixels.dtype == torch.float32 and torch.equal(clip.pixels, expected.pixels)
    assert pool.submit(_video(64, 48), ClipSpec(request), "k").result()[0].pixels.dtype == torch.uint8  # goes on


def test_the_job_stores_the_same_latents_from_uint8_and_float_frames(tmp_path):
    sizes = [(64, 64), (64, 64), (96, 80), (80, 64)]  # whole pixels twice; resized, and cropped (whole)
    shard = tmp_path / "data" / "shard-000000.tar"
    write_shard(shard, [(f"clip-{i}", {"mp4": _video(w, h)}) for i, (w, h) in enumerate(sizes)])
    outputs, fingerprints = [], []
    for on in (True, False):
        config = small_config([shard], tmp_path / f"out-{on}", run={"uint8_frames": on})
        encoder, plan = in_process_encoder(config)
        batches: list[list[torch.dtype]] = []

        def note_dtypes(pixels: list[torch.Tensor], seen: list = batches, stack=encoder._host_batch) -> torch.Tensor:
            seen.append([p.dtype for p in pixels])
            return stack(pixels)

        encoder._host_batch = note_dtypes  # type: ignore[method-assign]
        try:
            list(encoder.encode_shard(plan.shards[0]))
        finally:
            encoder.decoder.close()
        # Batches of 2: one of uint8 clips crosses as uint8; one that mixes them is made float on the host.
        assert batches == [[torch.uint8] * 2 if on else [torch.float32] * 2, [torch.float32] * 2]
        outputs.append(plan.root)
        fingerprints.append(plan.fingerprint)
    assert fingerprints[0] == fingerprints[1]  # the same bytes: the same dataset
    rows = [read_metadata(out).to_pylist() for out in outputs]
    assert [r["status"] for r in rows[0]] == ["ok"] * 4
    for a, b in zip(*rows):
        assert torch.equal(load_sample(outputs[0], a)["latent"], load_sample(outputs[1], b)["latent"])
