"""Orchestration: the settings of a job, the Ray actor pool that runs it, and its progress.

    config.py     the one typed config (`JobConfig`), strict on load, its choices checked once; `UsageError`
    settings.py   checking a config against the VAE and the inputs; the settings, fingerprint and row constants
    worker.py     `ShardEncoder`: one actor, one VAE, shard in -> committed latent shard out
    actor.py      `EncoderActor`: the `ShardEncoder` as Ray starts it (its decoding processes' fork server first)
    host_memory.py  glibc's allocator set to keep freed host memory for the next batch (`run.reuse_host_memory`)
    pool.py       joining or starting Ray, the encoder actors (one per GPU), scheduling and retrying shards
    driver.py     a whole run: output directory, lock, resume, pool, manifest (`run`)
    progress.py   the progress bar and the final summary

The entrypoints (`python -m jobs.precompute`, `jobs.reconstruct`, ...) are the modules of `jobs/`.
"""
