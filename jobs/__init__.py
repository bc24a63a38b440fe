"""The precompute job: config, shard I/O, video decoding, the Ray encoder actors, entrypoints.

Entrypoints (each module's docstring starts with its command):
    python -m jobs.precompute   encode a WebDataset of videos into latent shards + Parquet
    python -m jobs.reconstruct  decode stored latents back to video, with PSNR/SSIM and previews
    python -m jobs.demo_data    write a small demo dataset of real H.264 videos
    python -m jobs.train_demo_vae  train the small demo VAE in configs/
"""
