from __future__ import annotations

import av
import numpy as np
import pytest
import torch

from jobs.quality.media import encode_png, preview_grid, read_image, save_clip, to_uint8


def test_to_uint8_rounds_like_save_sample():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0])
    # clamp to [-1, 1], shift to [0, 1], x * 255 + 0.5, truncate
    assert to_uint8(x).tolist() == [0, 0, 128, 191, 255, 255]


def test_png_round_trip(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, size=(12, 20, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    path.write_bytes(encode_png(image))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(read_image(path), image)


def test_save_clip_writes_h264_at_the_clip_fps(tmp_path):
    clip = torch.linspace(-1, 1, 3 * 5 * 16 * 24).reshape(3, 5, 16, 24)
    path = save_clip(clip, tmp_path / "sub" / "clip", fps=29.97)
    assert path == tmp_path / "sub" / "clip.mp4"
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert stream.codec_context.name == "h264"
        assert float(stream.average_rate) == pytest.approx(29.97, abs=0.01)
    assert len(frames) == 5 and frames[0].shape == (16, 24, 3)


def test_one_frame_clip_is_a_png(tmp_path):
    clip = torch.zeros(3, 1, 8, 8)
    path = save_clip(clip, tmp_path / "still", fps=24)
    assert path.suffix == ".png"
    assert (read_image(path) == 128).all()


def test_preview_grid_layout():
    top = torch.full((3, 10, 4, 6), -1.0)  # black
    bottom = torch.full((3, 10, 4, 6), 1.0)  # white
    top[:, 9] = 0.0  # the last frame is grey, to see that it is picked
    grid = preview_grid(top, bottom, count=3, gap=2)
    assert grid.shape == (2 * 4 + 2, 3 * 6 + 2 * 2, 3)
    assert (grid[:4, :6] == 0).all() and (grid[:4, -6:] == 128).all()  # frames 0 and 9 on top
    assert (grid[6:] == 255).all()  # bottom row white; the gaps are white too
    assert preview_grid(top[:, :2], bottom[:, :2], count=8).shape[1] == 2 * 6 + 2  # shorter clip: all frames
