"""The local API's OpenAPI document: the job bodies are the v1 pydantic schema (schema.py), so /openapi.json
and /docs show every field with its bounds. The routes read their bodies themselves (to answer the contract's
typed errors rather than FastAPI's), so the schemas are added to the generated document here."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from multitalk_worker.local_api.envelope import Policy
from multitalk_worker.schema import GenerateInput

REF = "#/components/schemas/{model}"


def job_schemas() -> dict[str, Any]:
    """Component schemas: GenerateInput, the models it uses, RunPod's Policy and RunRequest
    (`{"input": GenerateInput, "policy": Policy, "webhook": URL}`)."""
    schema = GenerateInput.model_json_schema(ref_template=REF)
    components: dict[str, Any] = schema.pop("$defs", {})
    components["GenerateInput"] = schema
    components["Policy"] = Policy.model_json_schema(ref_template=REF)
    components["RunRequest"] = {
        "title": "RunRequest",
        "type": "object",
        "description": "The RunPod-shaped body of /run and /runsync.",
        "properties": {
            "input": {"$ref": REF.format(model="GenerateInput")},
            "policy": {"$ref": REF.format(model="Policy")},
            "webhook": {
                "type": "string",
                "format": "uri",
                "description": "https URL that receives the final status as a POST (public addresses only)",
            },
        },
        "required": ["input"],
        "additionalProperties": False,
    }
    return components


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            document.setdefault("components", {}).setdefault("schemas", {}).update(job_schemas())
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi
