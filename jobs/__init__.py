"""The precompute job, in three layers that import one way: inputs and dataset <- orchestration <- entrypoints.

    inputs/          the input side: SPEC listing behind a storage interface, tar reading, video decoding
    dataset/         the latent dataset format: every on-disk name, the writer, the readers
    quality/         metrics and media for looking at latents as video (PSNR/SSIM, mp4/PNG)
    orchestration/   config, settings and fingerprint, the Ray actor pool and scheduler, the worker, progress

Entrypoints (each module's docstring starts with its command):
    python -m jobs.precompute      encode a WebDataset of videos into latent shards + Parquet
    python -m jobs.reconstruct     decode stored latents back to video, with PSNR/SSIM and previews
    python -m jobs.demo_data       write a small demo dataset of real H.264 videos
    python -m jobs.train_demo_vae  train the small demo VAE in configs/

Every layer may use `vae` (the models); none of `inputs`, `dataset` and `quality` imports Ray or
`orchestration` (tests/test_layers.py checks the arrows).

For training: `from jobs import LatentDataset, BucketBatchSampler, collate` (jobs/dataset/training.py).
"""

from typing import Any

__all__ = ["BucketBatchSampler", "LatentDataset", "collate", "latent_stream"]


def __getattr__(name: str) -> Any:  # the training side loads only when asked for
    if name in __all__:
        from jobs.dataset import training

        return getattr(training, name)
    raise AttributeError(f"module 'jobs' has no attribute {name!r}")
