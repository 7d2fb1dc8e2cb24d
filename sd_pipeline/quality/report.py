"""Pages a person reads about a gate run: GX Data Docs and a one-page offline summary.

Both render from the stored GX result dict alone, so a report can be rebuilt from
``validation.json`` at any time without the data. Both are served from the Airflow API
server's origin, so neither may carry markup from the data nor load anything from elsewhere.
"""

from __future__ import annotations

import html
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sd_pipeline.quality.gate import GateResult

SITE_NAME = "sd_pipeline_quality"
# GX's page templates pull jQuery, Bootstrap, Vega and fonts from public CDNs (a few with no
# integrity hash) and its logo from S3. The pages are plain HTML without them, so they go.
_SCRIPT = re.compile(r"<script\b.*?</script\s*>", re.S | re.I)
_REMOTE = re.compile(r"<(?:link|img)\b[^>]*\b(?:href|src)\s*=\s*[\"']?(?:https?:)?//[^>]*>", re.I)


def escaped(value: Any) -> Any:
    """``value`` with every string in it (dict keys too) HTML-escaped.

    GX's Jinja templates are ``.j2`` files, outside its autoescape, so a licence or caption
    among the unexpected values would otherwise land in the page as markup. GX does escape
    string-template parameters (thresholds, column names): such a value holding ``<`` or ``&``
    shows escaped twice, which is legible and safe.
    """
    if isinstance(value, str):
        return html.escape(value)
    if isinstance(value, dict):
        return {escaped(k): escaped(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [escaped(v) for v in value]
    return value


def without_remote_assets(page: str) -> str:
    """A GX page without its scripts and its stylesheets and images from other origins.

    Only GX's own markup can match: every value from the data was escaped before rendering.
    """
    return _REMOTE.sub("", _SCRIPT.sub("", page))


def build_data_docs(results_json: dict[str, Any], site_dir: Path) -> Path:
    """Render a GX Data Docs site for one validation result into ``site_dir``.

    Returns the path of the validation's page. A fresh ephemeral context holds the result
    and its suite just long enough for GX's own site builder to render them. GX renders an
    escaped copy of the result, and its pages are stripped of scripts and remote assets.
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.core.expectation_validation_result import (
        expectationSuiteValidationResultSchema,
    )
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
        ValidationResultIdentifier,
    )
    from great_expectations.expectations.expectation_configuration import (
        ExpectationConfiguration,
    )

    # Only the results carry values from the data; GX escapes its own meta (batch parameters).
    results_json = {**results_json, "results": escaped(results_json["results"])}
    result = expectationSuiteValidationResultSchema.load(results_json)
    context = gx.get_context(mode="ephemeral")
    # SiteBuilder takes show_how_to_buttons, though GX's TypedDict for the config omits it.
    site_config: Any = {
        "class_name": "SiteBuilder",
        "show_how_to_buttons": False,
        "store_backend": {
            "class_name": "TupleFilesystemStoreBackend",
            "base_directory": str(site_dir),
        },
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder", "show_cta_footer": False},
    }
    context.add_data_docs_site(SITE_NAME, site_config)
    # The suite page is rendered from the expectations the result carries.
    expectations = []
    for r in results_json["results"]:
        cfg = r["expectation_config"]
        kwargs = {k: v for k, v in cfg["kwargs"].items() if k != "batch_id"}
        expectations.append(
            ExpectationConfiguration(type=cfg["type"], kwargs=kwargs, meta=cfg.get("meta")).to_domain_obj()
        )
    context.suites.add(gx.ExpectationSuite(name=result.suite_name, expectations=expectations))

    batch_id = results_json["results"][0]["expectation_config"]["kwargs"].get("batch_id", "batch")
    context.validation_results_store.store_validation_results(
        suite_validation_result=result,
        suite_validation_result_identifier=ValidationResultIdentifier(
            expectation_suite_identifier=ExpectationSuiteIdentifier(name=result.suite_name),
            run_id=result.meta.get("run_id"),
            batch_identifier=batch_id,
        ),
    )
    context.build_data_docs(site_names=[SITE_NAME])
    pages = sorted((site_dir / "validations").rglob("*.html"))
    if len(pages) != 1:
        raise RuntimeError(f"expected one validation page in {site_dir}, found {len(pages)}")
    for path in site_dir.rglob("*.html"):
        path.write_text(without_remote_assets(path.read_text(encoding="utf-8")), encoding="utf-8")
    # GX's site index is a table that its scripts fill in: without them it is empty.
    (site_dir / "index.html").write_text(_site_index(site_dir, pages[0], result.suite_name), encoding="utf-8")
    return pages[0]


def _site_index(site_dir: Path, validation_page: Path, suite_name: str) -> str:
    """The Data Docs home page as plain links: the validation and its expectation suite."""
    links = [(validation_page, f"Validation of suite {suite_name}")]
    links += [
        (p, f"Expectation suite {html.escape(p.stem)}")
        for p in sorted((site_dir / "expectations").glob("*.html"))
    ]
    items = "\n".join(
        f'<li><a href="{html.escape(p.relative_to(site_dir).as_posix())}">{label}</a></li>'
        for p, label in links
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>Data Docs: {suite_name}</title>
<style>body {{ font-family: system-ui, sans-serif; margin: 2em; }}</style>
</head><body>
<h1>Great Expectations Data Docs</h1>
<ul>
{items}
</ul>
</body></html>
"""


def _cell(value: Any) -> str:
    if value is None or value == {}:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return html.escape(text)


def render_index_html(result: GateResult, data_docs_page: str | None = None) -> str:
    """A self-contained HTML summary: one row per expectation, pass or fail, observed, expected."""
    from sd_pipeline.quality.gate import expectation_records

    s = result.statistics
    status = "PASSED" if result.passed else "FAILED"
    rows = [
        f'<tr class="{"pass" if r["success"] else "fail"}">'
        f"<td>{'pass' if r['success'] else 'FAIL'}</td>"
        f"<td><code>{_cell(r['expectation'])}</code></td><td>{_cell(r['column'])}</td>"
        f"<td>{_cell(r['observed'])}</td><td>{_cell(r['expected'])}</td>"
        f"<td>{_cell(r['examples'] or None)}</td></tr>"
        for r in expectation_records(result.results_json)
    ]
    link = (
        f'<p>Full detail: <a href="{html.escape(data_docs_page)}">Great Expectations Data Docs</a>.</p>'
        if data_docs_page
        else ""
    )
    meta = result.results_json.get("meta", {})
    run_time = (meta.get("run_id") or {}).get("run_time", "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>Quality gate {status}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }}
tr.fail td {{ background: #fde8e8; }}
tr.pass td:first-child {{ color: #1a7f37; }}
tr.fail td:first-child {{ color: #b42318; font-weight: bold; }}
.status {{ color: {"#1a7f37" if result.passed else "#b42318"}; }}
</style></head><body>
<h1>Quality gate <span class="status">{status}</span></h1>
<p>{s["successful_expectations"]} of {s["evaluated_expectations"]} expectations met on
{s["rows"]} rows; {s["quarantined"]} inputs quarantined (rate {s["quarantine_rate"]:.3f}).
Suite <code>{_cell(result.results_json.get("suite_name"))}</code>, validated {_cell(run_time)}.</p>
{link}
<table>
<tr><th>result</th><th>expectation</th><th>column</th><th>observed</th><th>expected</th>
<th>examples of unexpected rows</th></tr>
{chr(10).join(rows)}
</table>
</body></html>
"""
