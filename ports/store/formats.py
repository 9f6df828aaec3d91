"""The dataset formats: each format's name, its writer, and the hooks resume, merge and verify call.

A run config's ``format`` names one entry of :data:`FORMATS`; ``ports.store.dataset`` looks the
entry up and calls its functions, so adding a format is one module and one row here.
"""

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path

from ports.store import voc, webdataset


@dataclasses.dataclass(frozen=True)
class Format:
    """What a dataset format provides.

    Attributes:
      writer: ``writer(out, id2label, process_index=..., **options)``, the writer of one process
        (``VocWriter``, ``ShardWriter``).
      problems: ``problems(out, records)``: for each record, what is wrong with its files (None:
        intact).
      complete: ``complete(out, records)``: for each record, whether its files are intact.
      clean: ``clean(out, finished, process_index, process_count)``: delete what a killed run
        left among the files this process owns.
      finalize: ``finalize(out, merged)``: finish the folder once the manifests are merged (VOC:
        the split lists).
    """

    writer: Callable[..., voc.VocWriter | webdataset.ShardWriter]
    problems: Callable[[Path, list[dict]], list[str | None]]
    complete: Callable[[Path, list[dict]], list[bool]]
    clean: Callable[[Path, Mapping[int, dict], int, int], None]
    finalize: Callable[[Path, list[dict]], None]


#: Format name (a run config's ``format``) to its :class:`Format`.
FORMATS: dict[str, Format] = {
    "voc": Format(voc.VocWriter, voc.problems, voc.complete, voc.clean, voc.finalize),
    "webdataset": Format(
        webdataset.ShardWriter,
        webdataset.problems,
        webdataset.complete,
        webdataset.clean,
        webdataset.finalize,
    ),
}
DEFAULT_FORMAT = "voc"
