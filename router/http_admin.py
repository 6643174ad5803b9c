"""The router's admin HTTP routes: instances, draining, live migration (API key when
keys are configured, like every route but the health probes).

    GET  /admin/instances                  each worker: role, address, health, draining,
                                           requests routed to it, its last load
    POST /admin/instances/{id}/drain       no new requests to a decode instance; its
                                           running requests migrate away
    POST /admin/requests/{id}/migrate      a request in flight (the id the client got
                                           back; with n > 1, every choice of it) moves to
                                           {"destination": id}, or to the least busy
                                           other decode instance

A migration answers 200 with what happened, also when it did not commit (the request
then goes on where it was): `committed`, `abort_reason`, `downtime_s`, `stages`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from router.core import Router
from router.errors import UnknownRequestError

admin_routes = APIRouter(prefix="/admin")


class MigrateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    destination: str | None = Field(
        default=None, description="a decode instance id; by default the least busy other one"
    )
    blocking: bool = Field(
        default=False,
        description="stop and copy: pause the request for the whole copy (a baseline)",
    )


class DrainBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    timeout_s: float = Field(default=60.0, gt=0, le=3600, description="how long to keep trying")


@admin_routes.get("/instances")
async def instances(request: Request) -> dict[str, Any]:
    return {"instances": _router(request).instances_summary()}


@admin_routes.post("/instances/{instance_id}/drain")
async def drain(instance_id: str, request: Request, body: DrainBody | None = None) -> Any:
    timeout_s = (body or DrainBody()).timeout_s
    return await _router(request).migrations.drain(instance_id, timeout_s)


@admin_routes.post("/requests/{request_id}/migrate")
async def migrate(request_id: str, request: Request, body: MigrateBody | None = None) -> Any:
    router = _router(request)
    body = body or MigrateBody()
    choices = router.migrations.choice_ids(request_id)
    if not choices:
        raise UnknownRequestError(f"no request {request_id!r} is in flight on this router")
    outcomes = [
        await router.migrations.migrate(c, body.destination, body.blocking) for c in choices
    ]
    return {"migrations": [o.to_dict() for o in outcomes]}


def _router(request: Request) -> Router:
    router: Router = request.app.state.router
    return router
