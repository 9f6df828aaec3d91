"""A dataset run: the plan's items, generated in fixed-size batches and written with the store.

Every item is a function of the run config and its global index: prompt and classes from the
plan, noise from ``fold_in(key(seed), global_index)``. So the same config gives the same items
whatever the batch size or the number of hosts, and a killed run resumes where it stopped
(``ports.store.open_dataset``). Each process generates its share (``global_indices``), writes its
own manifest; process 0 merges them after a barrier.
"""

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

import jaxmask
from jaxmask.tokens import token_positions
from ports import api
from ports.plan import Plan
from ports.scale import hosts
from ports.store import mask_stats, open_dataset, software_versions

SOFT_MASK_SIDE = 64  # optional soft masks are stored at 64 x 64 (float16), not at image size


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that decides a dataset's content (and nothing that only spreads the work)."""

    plan: Plan
    model: str | None
    method: str = "seediff-code"
    method_params: tuple[tuple[str, object], ...] = ()
    steps: int = 50
    guidance: float = 7.5
    size: int | None = None
    scheduler: str = "ddim"
    negative_prompt: str = ""
    seed: int = 0
    dtype: str = "float32"
    format: str = "voc"
    pamr: bool = False
    soft_masks: bool = False

    def method_config(self):
        return jaxmask.methods.get(self.method, **dict(self.method_params))

    def to_json(self, model_id: str, fingerprint: str, size: int) -> dict:
        return {
            "plan": self.plan.to_json(),
            "model": {"id": model_id, "fingerprint": fingerprint},
            "method": {"name": self.method, "params": dict(self.method_params)},
            "steps": self.steps,
            "guidance": self.guidance,
            "size": size,
            "scheduler": self.scheduler,
            "negative_prompt": self.negative_prompt,
            "seed": self.seed,
            "dtype": self.dtype,
            "format": self.format,
            "pamr": self.pamr,
            "soft_masks": self.soft_masks,
        }


@dataclasses.dataclass(frozen=True)
class RunResult:
    out: Path
    total: int
    written: int
    resumed: int
    seconds: float


def _label_lookup(plan: Plan, item_classes) -> np.ndarray:
    """Prompt-order labels 1..k -> dataset ids (position in the class list + 1); 255 kept."""
    lut = np.zeros(256, np.uint8)
    lut[255] = 255
    for j, name in enumerate(item_classes):
        lut[j + 1] = plan.classes.index(name) + 1
    return lut


def run(
    cfg: RunConfig,
    out: Path,
    *,
    batch_size: int = 4,
    overwrite: bool = False,
    pipeline: api.Pipeline | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> RunResult:
    """Generate ``cfg.plan`` into ``out`` (VOC folder or WebDataset shards), resuming if it exists.

    Args:
      cfg: the run config.
      out: the dataset folder.
      batch_size: images per sampler call (the last batch is padded; padding is not written).
      overwrite: replace a dataset made with another config.
      pipeline: an already loaded pipeline (default ``api.load(cfg.model, dtype=cfg.dtype)``).
      on_batch: called with the number of items written after each batch (progress).
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    method_cfg = cfg.method_config()
    pipeline = pipeline or api.load(cfg.model, dtype=cfg.dtype)
    size = pipeline._size(cfg.size, cfg.size)  # validates the size against the UNet
    method_cfg.capture_spec(pipeline.layout(size))  # ...and the method against its sides
    plan = cfg.plan
    sd = pipeline.sd
    if jax.local_device_count() > 1:  # split every batch over this host's devices
        from ports.scale.mesh import data_mesh

        if batch_size % jax.local_device_count():
            raise ValueError(
                f"batch size {batch_size} is not a multiple of this host's "
                f"{jax.local_device_count()} devices; use a multiple"
            )
        pipeline.sampler.mesh = data_mesh()
    dataset = open_dataset(
        out,
        cfg.to_json(sd.source, sd.fingerprint, size),
        overwrite,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        barrier=hosts.barrier,
    )
    todo = dataset.todo(plan.total)
    key = jax.random.key(cfg.seed)
    from ports.sd.tokenizer import class_ids, tokenize

    start, written = time.perf_counter(), 0
    versions = software_versions()
    with dataset.writer(plan.id2label()) as writer:
        for batch in hosts.batches(todo, batch_size):
            items = [plan.item(int(i)) for i in batch.indices]
            prompts = [it.prompt for it in items]
            result = pipeline.generate(
                prompts,
                key,
                classes=[list(it.words) for it in items],
                method=method_cfg,
                steps=cfg.steps,
                guidance=cfg.guidance,
                negative_prompt=cfg.negative_prompt,
                height=size,
                width=size,
                scheduler=cfg.scheduler,
                pamr=cfg.pamr,
                item_ids=np.asarray(batch.indices),
            )
            ids = tokenize(sd.tokenizer, prompts)
            for j, (index, valid) in enumerate(zip(batch.indices, batch.valid)):
                if not valid:
                    continue
                item = items[j]
                lut = _label_lookup(plan, item.classes)
                label = lut[result.label_maps[j]]
                class_ids_ = [plan.classes.index(c) + 1 for c in item.classes]
                soft = None
                if cfg.soft_masks:
                    soft = np.asarray(
                        jaxmask.resize(result.soft_masks[j], (SOFT_MASK_SIDE,) * 2, "bilinear")
                    )
                record = {
                    "prompt": item.prompt,
                    "negative_prompt": cfg.negative_prompt,
                    "classes": [
                        {
                            "id": cid,
                            "name": name,
                            "token_positions": token_positions(
                                ids[j].tolist(), class_ids(sd.tokenizer, word)
                            ),
                        }
                        for cid, name, word in zip(class_ids_, item.classes, item.words)
                    ],
                    "seed": {"rule": hosts.SEED_RULE, "value": cfg.seed},
                    "method": {"name": cfg.method, "params": dataclasses.asdict(method_cfg)},
                    "model": {"id": sd.source, "fingerprint": sd.fingerprint},
                    "scheduler": cfg.scheduler,
                    "steps": cfg.steps,
                    "guidance": cfg.guidance,
                    "size": [size, size],
                    "dtype": cfg.dtype,
                    "mask_stats": mask_stats(label, [0, *class_ids_]),
                    "versions": versions,
                }
                writer.write(int(index), result.images[j], label, record, soft_masks=soft)
                written += 1
            if on_batch:
                on_batch(int(np.sum(batch.valid)))
    hosts.barrier("jaxmask-generate-done")
    if jax.process_index() == 0:
        dataset.merge()
    return RunResult(Path(out), plan.total, written, len(dataset.done), time.perf_counter() - start)
