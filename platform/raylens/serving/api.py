"""The FastAPI application the Serve ingress mounts: its OpenAPI description and its
error handlers (the routes are the ingress deployment's methods, in ``serve/app.py``).

Unknown routes and methods, and requests FastAPI's own validation refuses, answer in the
same JSON shape as every other error (:mod:`raylens.serving.errors`). No Ray.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from raylens.serving import errors, openapi


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    body = errors.http_error(exc.status_code, exc.detail)
    return JSONResponse(body, exc.status_code, headers=getattr(exc, "headers", None))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(errors.validation_error(exc.errors()), status_code=422)


def make_api() -> FastAPI:
    """A FastAPI app with raylens's title, description and error handlers, no routes."""
    api = FastAPI(title=openapi.TITLE, version=openapi.VERSION, description=openapi.DESCRIPTION)
    api.add_exception_handler(HTTPException, _http_error)
    api.add_exception_handler(RequestValidationError, _validation_error)
    return api
