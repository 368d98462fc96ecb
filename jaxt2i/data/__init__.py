"""Datasets and input pipelines.

`shapes` is the embedded default world (no download, no build), and `shapes_shards` writes it
as img2dataset-style tar shards (with bad members on request); `builders` writes TFDS
array_record datasets (the shapes world, or a user's images with captions); `pipeline`
turns a random-access source into per-stage, sharded, resumable batches; `text_cache`
precomputes frozen-T5 embeddings. Import the submodule you need: `builders` and `pipeline`
pull in tensorflow_datasets and grain.
"""
