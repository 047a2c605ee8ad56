"""The Pipedrive emulator's account set-up: custom fields and their options, pipelines, stages.

A mixin of `PipedriveEmulator` (which owns the state it declares), with the emulator's error
type and time format. Behaviour follows Pipedrive's v2 OpenAPI: `POST /pipelines` takes
`{"name", "is_deal_probability_enabled"?}`, `POST /stages` `{"name", "pipeline_id", ...}`;
both answer the new object. Whether a pipeline made through the API starts with stages of its
own is not documented: `new_pipeline_stages` shows either answer (none by default).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request

INFO = "Please check developers.pipedrive.com"
Handler = Callable[[Request, dict[str, str], Any], tuple[Any, Any]]
# method, path under /api/v2, token cost, is a search, request schema, handler
RouteRow = tuple[str, str, int, bool, str | None, Handler]


class ApiError(Exception):
    def __init__(self, status: int, error: str, info: str = INFO,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(error)
        self.status, self.error, self.info, self.headers = status, error, info, headers or {}


def rfc3339(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def builtin(code: str, name: str, field_type: str) -> dict[str, Any]:
    """One of Pipedrive's own fields as `GET /personFields` lists it."""
    return {"field_code": code, "field_name": name, "field_type": field_type,
            "is_custom_field": False, "is_optional_response_field": False, "options": None,
            "subfields": None}


class AccountSetup:
    """Fields, pipelines and stages: the helpers tests call and the endpoints that serve them."""

    fields: dict[str, list[dict[str, Any]]]
    pipelines: list[dict[str, Any]]
    stages: list[dict[str, Any]]
    new_pipeline_stages: tuple[str, ...]
    clock: Callable[[], float]
    _random: random.Random
    _id: Callable[[str], int]
    _page: Callable[[Request, list[Any]], tuple[Any, Any]]

    # -- helpers for tests -----------------------------------------------------------------------

    def add_pipeline(self, name: str, stage_names: list[str] | tuple[str, ...]) -> int:
        now = rfc3339(self.clock())
        pipeline_id = self._id("pipeline")
        self.pipelines.append({"id": pipeline_id, "name": name, "order_nr": pipeline_id,
                               "is_deleted": False, "is_deal_probability_enabled": False,
                               "add_time": now, "update_time": now})
        for stage in stage_names:
            self.add_stage(pipeline_id, stage)
        return pipeline_id

    def add_stage(self, pipeline_id: int, name: str) -> dict[str, Any]:
        now = rfc3339(self.clock())
        order = 1 + max((s["order_nr"] for s in self.stages if s["pipeline_id"] == pipeline_id),
                        default=0)
        stage = {"id": self._id("stage"), "order_nr": order, "name": name, "is_deleted": False,
                 "deal_probability": 100, "pipeline_id": pipeline_id,
                 "is_deal_rot_enabled": False, "days_to_rotten": None, "add_time": now,
                 "update_time": now}
        self.stages.append(stage)
        return stage

    def stage_names(self, pipeline_name: str) -> list[str]:
        """The live stages of the live pipeline called `pipeline_name`, in order."""
        pipeline = next(p for p in self.pipelines
                        if p["name"] == pipeline_name and not p["is_deleted"])
        stages = [s for s in self.stages if s["pipeline_id"] == pipeline["id"]
                  and not s["is_deleted"]]
        return [s["name"] for s in sorted(stages, key=lambda s: s["order_nr"])]

    def add_field(self, kind: str, name: str, field_type: str,
                  options: tuple[str, ...] | list[str] = ()) -> str:
        code = f"{self._random.getrandbits(160):040x}"
        opts = [{"id": self._id("option"), "label": label} for label in options]
        self.fields[kind].append({"field_code": code, "field_name": name, "field_type": field_type,
                                  "is_custom_field": True, "is_optional_response_field": False,
                                  "options": opts or None, "subfields": None})
        return code

    def field_key(self, kind: str, name: str) -> str:
        return str(next(f["field_code"] for f in self.fields[kind] if f["field_name"] == name))

    def option_label(self, kind: str, name: str, option_id: Any) -> str | None:
        spec = next(f for f in self.fields[kind] if f["field_name"] == name)
        return next((o["label"] for o in spec["options"] or [] if o["id"] == option_id), None)

    # -- endpoints -------------------------------------------------------------------------------

    def _setup_routes(self) -> list[RouteRow]:
        rows: list[RouteRow] = []
        for kind in ("person", "deal"):
            rows += [
                ("GET", f"{kind}Fields", 10, False, None,
                 lambda r, p, b, k=kind: self._page(r, self.fields[k])),
                ("POST", f"{kind}Fields", 5, False, f"{kind}_fields_create",
                 lambda r, p, b, k=kind: self._create_field(k, b)),
                ("POST", f"{kind}Fields/{{code}}/options", 5, False,
                 f"{kind}_field_options_add",
                 lambda r, p, b, k=kind: self._add_options(k, p["code"], b)),
            ]
        return [*rows,
                ("GET", "pipelines", 5, False, None, lambda r, p, b: self._page(r, [
                    x for x in self.pipelines if not x["is_deleted"]])),
                ("POST", "pipelines", 5, False, "pipelines_create",
                 lambda r, p, b: self._create_pipeline(b)),
                ("GET", "stages", 5, False, None, lambda r, p, b: self._page(r, [
                    s for s in self.stages if not s["is_deleted"] and (
                        "pipeline_id" not in r.query_params
                        or str(s["pipeline_id"]) == r.query_params["pipeline_id"])])),
                ("POST", "stages", 5, False, "stages_create",
                 lambda r, p, b: self._create_stage(b))]

    def _create_field(self, kind: str, body: dict[str, Any]) -> tuple[Any, Any]:
        options = [o["label"] for o in body.get("options", [])]
        if body["field_type"] in ("enum", "set") and not options:
            raise ApiError(400, "Options are required for enum and set fields")
        code = self.add_field(kind, body["field_name"], body["field_type"], options)
        return next(f for f in self.fields[kind] if f["field_code"] == code), None

    def _add_options(self, kind: str, code: str, body: list[dict[str, str]]) -> tuple[Any, Any]:
        spec = next((f for f in self.fields[kind] if f["field_code"] == code), None)
        if spec is None:
            raise ApiError(404, "Entity was not found", "Object was not found.")
        if spec["field_type"] not in ("enum", "set"):
            raise ApiError(400, "Only enum and set fields have options")
        existing = {o["label"] for o in spec["options"] or []}
        if any(o["label"] in existing for o in body):
            raise ApiError(400, "Option with this label already exists")
        added = [{"id": self._id("option"), "label": o["label"]} for o in body]
        spec["options"] = [*(spec["options"] or []), *added]
        return added, None

    def _create_pipeline(self, body: dict[str, Any]) -> tuple[Any, Any]:
        if not body["name"].strip():
            raise ApiError(400, "Name is required")
        pipeline_id = self.add_pipeline(body["name"], self.new_pipeline_stages)
        pipeline = next(p for p in self.pipelines if p["id"] == pipeline_id)
        if "is_deal_probability_enabled" in body:
            pipeline["is_deal_probability_enabled"] = body["is_deal_probability_enabled"]
        return pipeline, None

    def _create_stage(self, body: dict[str, Any]) -> tuple[Any, Any]:
        if not body["name"].strip():
            raise ApiError(400, "Name is required")
        if not any(p["id"] == body["pipeline_id"] and not p["is_deleted"]
                   for p in self.pipelines):
            raise ApiError(404, "Pipeline not found", "Object was not found.")
        stage = self.add_stage(body["pipeline_id"], body["name"])
        for key in ("deal_probability", "is_deal_rot_enabled", "days_to_rotten"):
            if key in body:
                stage[key] = body[key]
        return stage, None
