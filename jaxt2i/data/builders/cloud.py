"""Datasets whose `--data_dir` is a URL (`gs://bucket/tfds`, any fsspec URL: `jaxt2i.paths`).

TFDS writes, and grain reads, array_record files through the array_record C++ library, which
opens local files only (without TensorFlow, which jaxt2i never imports). So a URL data_dir is
reached through local folders:

* building: the dataset is built in a local staging folder (`staging_dir`), then uploaded
  below the URL (`publish`): the array_record files first, `dataset_info.json` and
  `build_inputs.json` last, so a dataset there is complete once those are (readers look for
  `dataset_info.json`; an upload that was cut short is redone by the next build, which finds
  the staging folder still built). The staging folder is removed after the upload.
* reading: a dataset below a URL is copied once to a local cache folder (`local_copy`; a
  file already there with the same size is not copied again) and read from there.

Both local folders are below `$JAXT2I_CACHE` (default `~/.cache/jaxt2i`), named by a hash of
the URL.
"""

from __future__ import annotations

import hashlib
import logging
import os

from jaxt2i import paths

LAST_FILES = ("dataset_info.json", "build_inputs.json")  # uploaded last: "the dataset is there"


def cache_root() -> str:
    return os.environ.get("JAXT2I_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                          "jaxt2i")


def _local_for(kind: str, url: str) -> str:
    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    return os.path.join(cache_root(), kind, f"{paths.basename(url) or 'root'}-{digest}")


def staging_dir(url: str) -> str:
    """The local data_dir a build for the URL data_dir `url` is made in."""
    return _local_for("staging", url)


def publish(local_dir: str, url: str) -> None:
    """Uploads a built dataset version folder to `url`, `LAST_FILES` last."""
    n = paths.upload(local_dir, url, last=LAST_FILES)
    logging.info("uploaded %d files of the dataset to %s", n, url)


def find_datasets(dataset_dir: str) -> list[str]:
    """Folders at or below `dataset_dir` (local or URL) holding a dataset_info.json."""
    return sorted(root for root, _, files in paths.walk(dataset_dir)
                  if "dataset_info.json" in files)


def local_copy(version_url: str) -> str:
    """A local copy of the dataset version folder at `version_url` (made or brought up to
    date in the cache); its path."""
    local = _local_for("datasets", version_url)
    n = paths.download(version_url, local)
    if n:
        logging.info("copied %d files of %s to %s", n, version_url, local)
    return local
