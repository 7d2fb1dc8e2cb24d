"""Task bodies of sd_ingest's scale-out: plan -> ingest_unit (one mapped task per unit) -> commit.

``plan`` counts the source's inputs and splits them into units of ``dataset.unit_size``;
``ingest_unit`` checks and stages one unit (idempotent: a retried or rerun unit that
finished returns what it staged); ``commit`` merges the units, deduplicates across them,
names and publishes the version. Each returns a small JSON-able dict. The single-process
``sd-pipeline ingest`` runs the same three steps in one process and gives the same version.

Heavy modules load inside the functions, at run time in the worker, never at parse time.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sd_pipeline.airflow.errors import fail_fast
from sd_pipeline.airflow.settings import config_path
from sd_pipeline.airflow.tasks import _context, _run_date

if TYPE_CHECKING:
    from sd_pipeline.config import PipelineConfig

log = logging.getLogger("sd_pipeline.airflow")
UNIT_LABEL = "unit_label"  # context key that names a mapped ingest_unit in the UI


def _config(ds: str) -> PipelineConfig:
    """The pipeline config with ``{{ ds }}`` in the source URI filled with the run's date."""
    from sd_pipeline import stages

    return stages.for_date(stages.load_config_uri(config_path()), ds)


def plan() -> list[dict[str, Any]]:
    """Split the source into units; returns one JSON-able unit per mapped ``ingest_unit``."""
    from sd_pipeline import stages
    from sd_pipeline.ingest.units import plan_ingest

    with fail_fast("plan"):
        config = _config(_run_date())
        units = plan_ingest(config, stages.store_for(config))
    return [u.to_dict() for u in units]


def ingest_unit(unit: dict[str, Any]) -> dict[str, Any]:
    """Check and stage one unit's inputs on all the worker's cores; returns its counts."""
    from sd_pipeline import stages
    from sd_pipeline.ingest.units import Unit, run_unit

    planned = Unit.from_dict(unit)
    _context()[UNIT_LABEL] = f"unit {planned.index}: inputs {planned.start}-{planned.stop - 1}"
    with fail_fast("ingest_unit"):
        config = _config(_run_date())
        return run_unit(config, stages.store_for(config), planned)


def commit(units: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge the staged units into one committed version; returns the ingest summary
    (version id, counts, reasons) that the quality gate and the Asset event carry."""
    from sd_pipeline import stages
    from sd_pipeline.ingest.commit import commit_ingest
    from sd_pipeline.ingest.units import planned_units

    ds = _run_date()
    with fail_fast("commit"):
        stagings = {u["staging"] for u in units}
        if len(stagings) != 1:
            raise ValueError(
                f"ingest_unit results come from {len(stagings)} plans {sorted(stagings)}; expected 1"
            )
        config = _config(ds)
        store = stages.store_for(config)
        staging = stagings.pop()
        planned = planned_units(store, staging)
        if len(planned) != len(units):
            raise ValueError(f"{staging} planned {len(planned)} units but {len(units)} ran")
        summary = commit_ingest(config, store, staging, planned, keep_result=True)
    log.info(
        "dataset %s version %s: %d inputs in %d units -> %d accepted, %d quarantined (%s)",
        summary["dataset"],
        summary["version"],
        summary["inputs"],
        summary["units"],
        summary["accepted"],
        summary["quarantined"],
        summary["quarantine_reasons"],
    )
    return {**summary, "date": ds}
