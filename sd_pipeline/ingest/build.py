"""Build a dataset version in one process: plan the units, run them in turn, commit.

This is ``sd-pipeline ingest``. The ``sd_ingest`` DAG runs the same three steps as
separate tasks, one mapped task per unit (``sd_pipeline/airflow/ingest_tasks.py``); both
give the same version for the same input. Here one pool of image workers serves every
unit, and the source is read once after the counting pass.

The version id is a hash of what the version holds, so ingesting the same input twice
gives the same id and the second run publishes nothing new. The version is committed
(``_COMMITTED`` written last) but not yet accepted: ``LATEST`` moves only after the
quality gate passes.
"""

from __future__ import annotations

import logging
import time
from itertools import islice
from typing import Any

from sd_pipeline.config import PipelineConfig
from sd_pipeline.ingest.commit import commit_ingest
from sd_pipeline.ingest.examine import Examiner, check_caption
from sd_pipeline.ingest.sources import source_records
from sd_pipeline.ingest.units import MANIFEST_COLUMNS, QUARANTINE_COLUMNS, UnitInputs, plan_ingest, run_unit
from sd_pipeline.ingest.workers import Workers
from sd_pipeline.storage import Store

__all__ = ["MANIFEST_COLUMNS", "QUARANTINE_COLUMNS", "check_caption", "ingest"]

log = logging.getLogger("sd_pipeline.ingest")


def ingest(config: PipelineConfig) -> dict[str, Any]:
    """Ingest the configured source into a committed dataset version; returns its summary."""
    ds = config.dataset
    store = Store.from_uri(config.storage.root, config.storage.endpoint_url)
    started = time.perf_counter()
    units = plan_ingest(config, store)
    found = source_records(ds.source, endpoint_url=config.storage.endpoint_url)
    stream = enumerate(found.records)
    with Workers(Examiner.from_config(config), ds.workers) as workers:
        for unit in units:
            inputs = UnitInputs(islice(stream, unit.stop - unit.start), found.read_workers, found.portable)
            run_unit(config, store, unit, inputs, workers)
    extra = next(stream, None)
    if extra is not None:
        raise RuntimeError(
            f"dataset.source {ds.source.uri} changed during the ingest: it had {units[-1].inputs} "
            "inputs when counted and more when read; rerun the ingest"
        )
    return commit_ingest(config, store, units[0].staging, units, started=started)
