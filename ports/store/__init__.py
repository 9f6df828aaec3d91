"""Dataset writers: VOC folders and WebDataset shards, the manifest, resume, atomic writes.

``records`` (manifest records and files), ``dataset`` (run config, open, resume, merge, verify),
``formats`` (format name to writer and hooks), ``voc``, ``webdataset``, ``atomic``, ``lock``.

A run::

    dataset = open_dataset(out, run_config, overwrite, process_index=p, process_count=n,
                           barrier=ports.scale.hosts.barrier)
    with dataset.writer(id2label) as writer:             # VocWriter or ShardWriter
        for index in dataset.todo(total):                 # this process's share, minus done
            writer.write(index, image, label_map, record, soft_masks=None)
    ports.scale.hosts.barrier("jaxmask-written")
    if p == 0:
        dataset.merge()                                   # manifest.jsonl (+ train.txt for VOC)
"""

from ports.store.atomic import StoreError
from ports.store.dataset import RUN_CONFIG, Dataset, merge_manifests, open_dataset, verify
from ports.store.records import (
    MANIFEST,
    REQUIRED_KEYS,
    ManifestWriter,
    item_id,
    mask_stats,
    read_manifest,
    software_versions,
    validate_record,
)
from ports.store.voc import VOC_PALETTE, VocWriter
from ports.store.webdataset import ShardWriter

__all__ = [
    "MANIFEST",
    "REQUIRED_KEYS",
    "RUN_CONFIG",
    "VOC_PALETTE",
    "Dataset",
    "ManifestWriter",
    "ShardWriter",
    "StoreError",
    "VocWriter",
    "item_id",
    "mask_stats",
    "merge_manifests",
    "open_dataset",
    "read_manifest",
    "software_versions",
    "validate_record",
    "verify",
]
