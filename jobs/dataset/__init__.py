"""The latent dataset format: the one owner of every name in a dataset, its writer and its readers. No Ray here.

DIR is a local directory or an s3:// prefix (store.py); the names are the same in both.

DIR/job.json                       resolved config, fingerprint, VAE identity     (catalog.py)
DIR/latents/<name>.tar             per input shard: `<stem>.safetensors` + `<stem>.json` per ok clip
DIR/meta/<name>.parquet            per input shard: one row per clip (ok) or failed sample (error)
DIR/_commits/<name>.json           commit marker, written last                    (writer.py, catalog.py)
DIR/_commits/.<name>.lock          held by the one attempt committing the shard   (writer.py)
DIR/manifest.json                  written when every shard is committed          (catalog.py)
DIR/.lock                          held by the one job writing the directory      (catalog.py)

layout.py    the names above, the Parquet SCHEMA, the shard-level error-row key, the format version
store.py     where the dataset lives (a local directory, or s3://): reads, whole-file publishing,
             create-if-absent markers, locks and leftovers, each as that storage allows
atomic.py    temporary names and fsync: how a local file appears complete or not at all
writer.py    `ShardWriter`: one latent tar + its Parquet file + its commit marker, atomically
catalog.py   job.json, commit markers, manifest.json and the lock: which shards are done, and how
reader.py    `read_metadata`, `load_sample` (random access by byte range), `iter_shard`
faults.py    fault injection for the failure tests (off unless LATENT_PRECOMPUTE_FAULT is set)
training.py  `LatentDataset`, `BucketBatchSampler`, `collate`, `latent_stream`: the trainer's side
"""
