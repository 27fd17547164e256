"""The gateway's ASGI application (Starlette): KServe V2 REST over one bus connection.

Routes: ``GET /v2/health/live``, ``/v2/health/ready``, ``/ready``, ``/v2``,
``/v2/models/<m>[/versions/<v>]`` (metadata), ``.../ready``, and
``POST /v2/models/<m>[/versions/<v>]/infer``. docs/GATEWAY.md has the mapping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, TypeVar

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from inferbus.contract import check_model_name, infer_subject
from inferbus.dashboard.app import Dashboard
from inferbus.dashboard.page import EVENTS_PATH
from inferbus.errors import (
    BadInput,
    ConnectionFailed,
    InferbusError,
    PayloadTooLarge,
    RequestError,
    Unavailable,
)
from inferbus.gateway.budget import BodyBudget, Holding
from inferbus.gateway.dashboards import OwnDashboards
from inferbus.gateway.framing import INFERENCE_HEADER, BusRequest, parse_count, to_bus, to_http
from inferbus.gateway.identities import Identities, PerUser, Session, Unauthenticated
from inferbus.gateway.replies import error_response, refusal_response
from inferbus.pipeline.discovery import ModelInfo, serves
from inferbus.version import __version__

#: a time budget in microseconds, for callers that cannot set ``parameters.timeout``
TIMEOUT_HEADER: Final = "Inferbus-Timeout-Us"
MAX_BODY_BYTES: Final = 512 * 1024 * 1024
MAX_INFLIGHT_BYTES: Final = 1024 * 1024 * 1024
#: the infer route, as Starlette would match it (``{model}`` and ``{version}`` are one segment)
_INFER_PATH: Final = re.compile(
    r"/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer"
)
MIN_BODY_WAIT_S: Final = 1.0  # even a zero budget gets this long for the body to arrive
LOOKUP_TTL_S: Final = 1.0
MAX_LOOKUPS: Final = 1024
T = TypeVar("T")
log = logging.getLogger("inferbus.gateway")


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    """``timeout``: seconds a request may take when it does not say; ``max_body_bytes``: the
    largest HTTP body accepted (413 beyond); ``max_inflight_bytes``: the bytes all bodies being
    read or served may hold at once (429 beyond, docs/GATEWAY.md)."""

    timeout: float = 30.0
    max_body_bytes: int = MAX_BODY_BYTES
    max_inflight_bytes: int = MAX_INFLIGHT_BYTES

    def __post_init__(self) -> None:
        if self.timeout <= 0 or self.max_body_bytes <= 0:
            raise BadInput("the gateway's timeout and max_body_bytes must be positive")
        if self.max_inflight_bytes < self.max_body_bytes:
            raise BadInput(
                f"the in-flight budget ({self.max_inflight_bytes} bytes) must hold at least "
                f"one body of the largest size ({self.max_body_bytes} bytes)"
            )


Handler = Callable[[Request], Awaitable[Response]]


class SlowBody(InferbusError):
    """The request body did not arrive in time: HTTP 408."""


def _coded(handler: Handler) -> Handler:
    """Every ``RequestError`` a handler raises becomes its V2 error reply; anything else is
    logged and answered 500, never a bare traceback page."""

    async def handle(request: Request) -> Response:
        try:
            return await handler(request)
        except ClientDisconnect:  # the caller left mid-body: nobody reads this reply
            return Response(status_code=400)
        except RequestError as error:
            return error_response(error)
        except (Unauthenticated, ConnectionFailed) as error:
            return refusal_response(error)
        except SlowBody as error:
            return JSONResponse({"error": str(error)}, 408, headers={"Connection": "close"})
        except Exception:
            log.exception("unexpected error answering %s %s", request.method, request.url.path)
            return JSONResponse({"error": "internal error (logged by the gateway)"}, 500)

    return handle


class Gateway:
    """The routes, each request sent as the identity ``identities`` picks; ``app`` is the ASGI
    application."""

    def __init__(
        self,
        identities: Identities,
        settings: GatewaySettings | None = None,
        *,
        dashboard: Dashboard | None = None,
    ) -> None:
        self.identities = identities
        self.dashboard = dashboard  # the page at / (docs/GATEWAY.md)
        self.settings = settings or GatewaySettings()
        self.budget = BodyBudget(self.settings.max_inflight_bytes)

    def _session(self, request: Request) -> contextlib.AbstractAsyncContextManager[Session]:
        return self.identities.using(request.headers.get("authorization"))

    def app(self) -> ASGIApp:
        """The routes; POST .../infer is dispatched before Starlette's middleware and router
        (a third of the gateway's CPU per request there, measured in BENCHMARKS.md)."""
        return _InferFirst(_coded(self.infer), self._routes())

    def _routes(self) -> Starlette:
        model = "/v2/models/{model}"
        versioned = "/v2/models/{model}/versions/{version}"
        routes = [
            Route("/v2/health/live", self.live),
            Route("/v2/health/ready", self.ready),
            Route("/ready", self.ready),
            Route("/v2", self.server_metadata),
            *(Route(path, _coded(self.metadata)) for path in (model, versioned)),
            *(Route(f"{path}/ready", _coded(self.model_ready)) for path in (model, versioned)),
            *(Route(f"{path}/infer", _not_post) for path in (model, versioned)),  # POST: above
        ]
        # the dashboard is an ASGI app: Starlette hands it the request as is
        page: ASGIApp | None = self.dashboard
        if isinstance(self.identities, PerUser):  # each caller's own view, never the gateway's
            page = OwnDashboards(self.identities)
        if page is not None:
            routes += [Route("/", page), Route(EVENTS_PATH, page)]
        return Starlette(routes=routes, exception_handlers={HTTPException: _http_error})

    async def live(self, request: Request) -> Response:
        return PlainTextResponse("live")

    async def ready(self, request: Request) -> Response:
        if self.identities.connected():
            return PlainTextResponse("ready")
        return PlainTextResponse("not connected to NATS", 503)

    async def server_metadata(self, request: Request) -> Response:
        body = {"name": "inferbus", "version": __version__, "extensions": ["binary_tensor_data"]}
        return JSONResponse(body)

    async def metadata(self, request: Request) -> Response:
        name, version = _target(request)
        async with self._session(request) as session:
            info, versions = await _look_up(session, name, version)
        return JSONResponse({
            "name": info.name,
            "versions": [str(v) for v in versions],
            "platform": info.engine,
            "inputs": [spec.to_dict() for spec in info.signature.inputs],
            "outputs": [spec.to_dict() for spec in info.signature.outputs],
        })  # fmt: skip

    async def model_ready(self, request: Request) -> Response:
        name, version = _target(request)
        async with self._session(request) as session:
            await _look_up(session, name, version)
        return PlainTextResponse("ready")

    async def infer(self, request: Request) -> Response:
        name, version = _target(request)
        header = request.headers.get(TIMEOUT_HEADER)
        timeout_us = (
            round(self.settings.timeout * 1e6)
            if header is None
            else parse_count(header, f"{TIMEOUT_HEADER} (microseconds)")
        )
        length = request.headers.get(INFERENCE_HEADER)
        # who asks, before the body is read; then the body's share of the budget
        async with self._session(request) as session:
            with self.budget.holding() as held:
                bus = await self._bus_request(request, held, length, timeout_us)
                transport = session.transport
                if transport.nats.is_closed:
                    raise Unavailable("the gateway's NATS connection is closed", model=name)
                seconds = max(bus.timeout_us / 1e6, 0.001)
                reply = await transport.exchange(infer_subject(name, version), bus.body, seconds)
                out = await _off_loop(len(reply), lambda: to_http(reply, bus))
        if out.header_length is None:
            return Response(out.body, media_type="application/json")
        headers = {INFERENCE_HEADER: str(out.header_length)}
        return Response(out.body, headers=headers, media_type="application/octet-stream")

    async def _bus_request(
        self, request: Request, held: Holding, length: str | None, timeout_us: int
    ) -> BusRequest:
        """The body read and framed for the bus (a copy: the HTTP body is dropped on return,
        not kept while the reply is awaited)."""
        body = await self._body(request, held, timeout_us)
        return await _off_loop(len(body), lambda: to_bus(body, length, timeout_us=timeout_us))

    async def _body(self, request: Request, held: Holding, timeout_us: int) -> bytes:
        """The body, refused past ``max_body_bytes`` (at once when its declared length says
        so) and counted against the in-flight budget as it arrives: a caller holds only what
        it has sent. It must arrive within the request's time budget, so a caller that
        trickles cannot hold its share for long (408)."""
        limit = self.settings.max_body_bytes
        header = request.headers.get("content-length")
        declared = (
            int(header) if header is not None and header.isascii() and header.isdigit() else 0
        )
        if declared > limit:
            raise PayloadTooLarge(f"request body of {declared} bytes exceeds {limit}")
        chunks, size = [], 0
        try:
            async with asyncio.timeout(max(timeout_us / 1e6, MIN_BODY_WAIT_S)):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise PayloadTooLarge(f"request body exceeds {limit} bytes")
                    held.take(len(chunk))
                    chunks.append(chunk)
        except TimeoutError:
            raise SlowBody(f"the body did not arrive within the request's time budget ({size} "
                           f"bytes came)") from None  # fmt: skip
        return b"".join(chunks)


class _InferFirst:
    """``infer`` for POST .../infer, ``routes`` for everything else."""

    def __init__(self, infer: Handler, routes: ASGIApp) -> None:
        self.infer = infer
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            match = _INFER_PATH.fullmatch(scope["path"])
            if match is not None:
                params = {key: value for key, value in match.groupdict().items() if value}
                scope["path_params"] = params
                response = await self.infer(Request(scope, receive))
                await response(scope, receive, send)
                return
        await self.routes(scope, receive, send)


async def _not_post(request: Request) -> Response:
    return JSONResponse({"error": "Method Not Allowed"}, 405, headers={"Allow": "POST"})


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (unknown path, wrong method) as V2 error bodies too."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    detail = exc.detail if isinstance(exc, HTTPException) else "internal error"
    return JSONResponse({"error": detail}, status)


def _target(request: Request) -> tuple[str, int | None]:
    name = check_model_name(request.path_params["model"])
    version = request.path_params.get("version")
    if version is None:
        return name, None
    number = parse_count(version, "the version in the path")
    if number < 1:
        raise BadInput(f"version must be an integer >= 1, not {version!r}")
    return name, number


async def _look_up(
    session: Session, name: str, version: int | None
) -> tuple[ModelInfo, tuple[int, ...]]:
    """The model's metadata and the versions served (as the first worker to answer discovery
    lists them), remembered for ``LOOKUP_TTL_S`` per identity, refusals too: otherwise every
    metadata or ready call for an unknown name would make every worker answer."""
    now = time.monotonic()
    found = session.lookups.get((name, version))
    if found is not None and now - found[0] < LOOKUP_TTL_S:
        if isinstance(found[1], RequestError):
            raise found[1].with_traceback(None)
        return found[1], found[2]
    if len(session.lookups) >= MAX_LOOKUPS:
        session.lookups.clear()
    try:
        info = await session.directory.describe(name, version)
        served = await session.directory.models(until=serves(name, None))
    except RequestError as error:
        session.lookups[(name, version)] = (now, error, ())
        raise
    versions = tuple(sorted({m.version for m in served if m.name == name} | {info.version}))
    session.lookups[(name, version)] = (now, info, versions)
    return info, versions


async def _off_loop(size: int, work: Callable[[], T]) -> T:
    """Small replies are translated inline; large ones in a thread, off the event loop."""
    return work() if size < 1 << 20 else await asyncio.to_thread(work)
