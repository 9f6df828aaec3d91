"""Old import path, kept for the modules that still import from it: the manifest module was split
into ``ports.store.records`` (records and manifest files), ``ports.store.dataset`` (run config,
open, resume, merge, verify) and ``ports.store.formats`` (the format table). Import from those.
"""

from ports.store.dataset import read_run_config
from ports.store.formats import FORMATS

__all__ = ["FORMATS", "read_run_config"]
