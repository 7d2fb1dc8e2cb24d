"""A read-only web view of the store's reports, mounted in the Airflow API server.

Serves only what the pipeline publishes for people to read (quality reports, Data Docs,
data cards, evaluation grids and metrics), never shards, manifests or weights, and only to a
user of this Airflow who may read DAG runs: the API server does not put plugin apps behind
its login, so the app makes the same check as Airflow's own DAG-run routes.
"""

from __future__ import annotations

import mimetypes
import re
from typing import Annotated, Any

# At module level: FastAPI reads the dependency's annotations by name. The plugin builds the
# app when Airflow imports it, so importing these lazily would save nothing.
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

# Keys a person may open; everything else is 404.
PUBLIC_KEYS = [
    re.compile(r"^datasets/[a-z0-9][a-z0-9_-]*/versions/[0-9a-f]{16}/quality/[A-Za-z0-9_./-]+$"),
    re.compile(r"^datasets/[a-z0-9][a-z0-9_-]*/versions/[0-9a-f]{16}/DATACARD\.md$"),
    re.compile(r"^runs/[A-Za-z0-9_.-]+/eval/[A-Za-z0-9_.-]+\.(png|json|md)$"),
    re.compile(r"^runs/[A-Za-z0-9_.-]+/MODEL_CARD\.md$"),
]
# Every object is served as a sandboxed document: it shares the API server's origin, and the
# Data Docs and cards carry text from the data. "sandbox" alone gives the page an opaque origin
# and runs no script, so even markup that got through could not act as the logged-in user.
REPORT_HEADERS = {
    "Content-Security-Policy": "sandbox",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


def is_public(key: str) -> bool:
    return ".." not in key.split("/") and any(p.match(key) for p in PUBLIC_KEYS)


_BEARER = HTTPBearer(auto_error=False)


async def airflow_run_reader(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]
) -> None:
    """Refuse a request unless it comes from an Airflow user who may read DAG runs.

    Airflow's own checks, as its DAG-run routes make them: the user comes from a bearer token
    (scripts) or Airflow's JWT cookie (the UI); 401 without one, 403 if it is bad or the user may
    not read runs. Imported when a request comes: every Airflow process imports the plugin,
    and this import alone takes ~0.5 s.
    """
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
    from airflow.api_fastapi.core_api.security import get_user, requires_access_dag

    user = await get_user(request, _oauth_token=None, bearer_credentials=credentials)
    requires_access_dag("GET", DagAccessEntity.RUN)(request, user)


def create_app(store_factory: Any = None, authorize: Any = None) -> Any:
    """The FastAPI app; ``store_factory`` returns the Store (default: the DAGs' config).

    ``authorize`` is a FastAPI dependency that refuses a request whose user may not read the
    reports (default: Airflow's authenticated user, allowed to read DAG runs).
    """
    from sd_pipeline.storage import StoreError

    def default_store() -> Any:
        from sd_pipeline.airflow.settings import pipeline_config
        from sd_pipeline.storage import Store

        cfg = pipeline_config()
        return Store.from_uri(cfg.storage.root, cfg.storage.endpoint_url)

    factory = store_factory or default_store
    app = FastAPI(
        title="sd-pipeline store",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        dependencies=[Depends(authorize or airflow_run_reader)],
    )

    @app.get("/store/{key:path}")
    def get_object(key: str) -> Response:
        if not is_public(key):
            raise HTTPException(404, "not a published report")
        try:
            data = factory().get_bytes(key)
        except StoreError:
            raise HTTPException(404, "no such object") from None
        kind = (
            "text/markdown; charset=utf-8"
            if key.endswith(".md")
            else (mimetypes.guess_type(key)[0] or "application/octet-stream")
        )
        return Response(content=data, media_type=kind, headers=REPORT_HEADERS)

    return app
