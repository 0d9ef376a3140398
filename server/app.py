"""FastAPI routes. Every failure leaves as OpenAI's error envelope: invalid fields are 400 (never FastAPI's
422), unknown models 404, bad keys 401 (on /v1, /tokenize and /detokenize), a full queue 429, loading or
draining 503."""

from __future__ import annotations

import asyncio
import logging
import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from hotcold.engine.errors import HotcoldError
from hotcold.server import protocol as P
from hotcold.server.async_engine import AsyncEngine, Backend, NotAccepting, QueueFull
from hotcold.server.completions import serve_chat, serve_completion
from hotcold.server.metrics import CONTENT_TYPE, ServerMetrics
from hotcold.server.serving import APIError, check_text_fits, tokenize_chat

log = logging.getLogger("hotcold.server")


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses a route can answer, each with the error envelope's schema."""
    what = {400: "invalid request", 401: "missing or wrong API key", 404: "unknown model",
            408: "request body stalled (--read-timeout)", 429: "queue full, retry later",
            503: "model loading, server shutting down, or too many connections"}
    return {s: {"model": P.ErrorResponse, "description": what[s]} for s in statuses}


_HEALTH = {"application/json": {"schema": {"type": "object", "properties": {
    "status": {"type": "string", "enum": ["ok", "loading", "draining", "failed"]}}}}}
_STREAM = {"text/event-stream": {"schema": {"type": "string", "description": "with stream=true: SSE chunks"}}}


def _openapi_without_422(app: FastAPI) -> dict[str, Any]:
    """FastAPI documents a 422 on every route with a body, but invalid fields are 400 here (see _invalid)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for path in schema["paths"].values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    model_root: str | None = None
    allowed_origins: list[str] = field(default_factory=lambda: ["*"])  # CORS


def _validation_message(exc: RequestValidationError, path: str) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    e = errors[0]
    if e.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    param = getattr((e.get("ctx") or {}).get("error"), "param", None)  # protocol.RequestError names its field
    if param is not None:
        return str(e.get("msg", "invalid value")).removeprefix("Value error, "), param
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if not loc and e.get("type") == "missing":
        return "the request body is missing", None
    if len(loc) >= 3 and loc[0] == "messages" and loc[2] == "content":  # a union: say what content may be
        where = ".".join(loc[:3])
        return (f"{where} must be a string or a list of text parts ({{\"type\": \"text\", \"text\": ...}}); "
                "image, audio and other parts are not supported", where)
    # the completion prompt is a union: pydantic's first complaint is about the wrong member
    if loc[:1] == ["prompt"] and path == "/v1/completions":
        return ("prompt must be a string, a list of strings, a list of token ids (integers >= 0) or a list "
                "of lists of token ids", "prompt")
    # union members show up as loc parts like 'str' or 'list[int]': keep only field names and indices
    loc = [x for x in loc if not any(c in x for c in "[]") and x not in ("str", "int", "float", "bool")]
    param = ".".join(loc) or None
    msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
    return (f"{param}: {msg}" if param else msg), param


def create_app(aengine: AsyncEngine, cfg: ServerConfig, metrics: ServerMetrics) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        aengine.start(asyncio.get_running_loop())
        yield
        aengine.draining = True
        await asyncio.to_thread(aengine.shutdown)

    app = FastAPI(title="hotcold", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(CORSMiddleware, allow_origins=cfg.allowed_origins, allow_methods=["*"], allow_headers=["*"])

    # ------------------------------------------------------------------------------------ errors
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.envelope(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc, request.url.path)
        return JSONResponse(APIError(400, message, param=param).envelope(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        err = APIError(exc.status_code, str(exc.detail), type=kind)
        return JSONResponse(err.envelope(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        # one line here; Starlette re-raises after this response and uvicorn logs the traceback once
        log.error("internal error on %s: %s: %s", request.url.path, type(exc).__name__, exc)
        err = APIError(500, f"internal server error: {type(exc).__name__}", type="server_error",
                       code="internal_error")
        return JSONResponse(err.envelope(), status_code=500)

    # ---------------------------------------------------------------------------------- helpers
    async def check_key(request: Request) -> None:
        if cfg.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), cfg.api_key.encode()):
            raise APIError(401, "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    def unavailable(exc: NotAccepting) -> APIError:
        return APIError(503, str(exc), type="server_error", code="service_unavailable")

    def capacity_error(exc: Exception, num_seqs: int, param: str = "n") -> APIError:
        metrics.rejected.inc()
        if isinstance(exc, NotAccepting):
            return unavailable(exc)
        if num_seqs > aengine.max_in_flight:
            return APIError(400, f"n x prompts = {num_seqs} sequences exceed the server's capacity "
                                 f"({aengine.max_in_flight})", param=param)
        return APIError(429, str(exc), type="rate_limit_error", code="rate_limit_exceeded")

    def check_model(model: str | None) -> None:
        if model is not None and model != cfg.model_name:
            raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")

    def backend_for(model: str | None, num_seqs: int, param: str = "n") -> Backend:
        check_model(model)
        try:
            aengine.check_capacity(num_seqs)
        except (NotAccepting, QueueFull) as exc:
            raise capacity_error(exc, num_seqs, param) from None
        assert aengine.backend is not None
        return aengine.backend

    async def submit(requests: list[tuple[str, list[int], Any]]):
        try:
            return await aengine.submit(requests)
        except (NotAccepting, QueueFull) as exc:
            raise capacity_error(exc, len(requests)) from None
        except HotcoldError as exc:
            raise APIError(400, str(exc)) from None

    async def until_disconnect(request: Request, coro: Any) -> Any:
        """Await coro, cancelling it if the client goes away (which aborts its engine requests)."""
        task = asyncio.ensure_future(coro)

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watcher = asyncio.ensure_future(watch())
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if task.cancelled():
            return Response(status_code=499)
        return task.result()

    # ----------------------------------------------------------------------------------- routes
    @app.api_route("/health", methods=["GET", "HEAD"], responses={
        200: {"content": _HEALTH}, 503: {"description": "loading, draining or failed", "content": _HEALTH}})
    async def health() -> JSONResponse:
        if aengine.load_error is not None:
            return JSONResponse({"status": "failed"}, status_code=503)
        if aengine.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not aengine.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.api_route("/metrics", methods=["GET", "HEAD"], response_class=PlainTextResponse,
                   responses={200: {"description": "Prometheus text exposition format"}})
    async def get_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @v1.get("/models", responses=_errors(401))
    async def models() -> P.ModelList:
        max_len = aengine.max_model_len if aengine.ready else None
        return P.ModelList(data=[P.ModelCard(id=cfg.model_name, created=P.now(), root=cfg.model_root,
                                             max_model_len=max_len)])

    @v1.post("/completions", responses={200: {"model": P.CompletionResponse, "content": _STREAM},
                                        **_errors(400, 401, 404, 408, 429, 503)})
    async def completions(req: P.CompletionRequest, request: Request) -> Any:
        many_prompts = len(req.prompts()) > 1 and req.n == 1
        backend = backend_for(req.model, len(req.prompts()) * req.n, "prompt" if many_prompts else "n")
        return await serve_completion(req, request, aengine, backend, cfg.model_name, submit, until_disconnect)

    @v1.post("/chat/completions", responses={200: {"model": P.ChatCompletionResponse, "content": _STREAM},
                                             **_errors(400, 401, 404, 408, 429, 503)})
    async def chat(req: P.ChatCompletionRequest, request: Request) -> Any:
        backend = backend_for(req.model, req.n)
        return await serve_chat(req, request, aengine, backend, cfg.model_name, submit, until_disconnect)

    # vLLM's tokenizer routes (at the root, as vLLM has them), behind the same key; no engine work
    tools = APIRouter(dependencies=[Depends(check_key)])

    def tokenizer_for(model: str | None) -> Backend:
        check_model(model)
        try:
            aengine.check_accepting()
        except NotAccepting as exc:
            raise unavailable(exc) from None
        assert aengine.backend is not None
        return aengine.backend

    @tools.post("/tokenize", responses=_errors(400, 401, 404, 503))
    async def tokenize(req: P.TokenizeRequest) -> P.TokenizeResponse:
        backend, max_len = tokenizer_for(req.model), aengine.max_model_len
        if req.messages is not None:
            ids = (await tokenize_chat(req.messages, req.add_generation_prompt, backend.tokenizer, max_len,
                                       bool(req.add_special_tokens))).ids
        else:
            prompt = req.prompt or ""
            check_text_fits(len(prompt), backend.tokenizer, max_len, "prompt")
            ids = await asyncio.to_thread(backend.tokenizer.encode, prompt, req.add_special_tokens is not False)
        return P.TokenizeResponse(count=len(ids), max_model_len=max_len, tokens=ids)

    @tools.post("/detokenize", responses=_errors(400, 401, 404, 503))
    async def detokenize(req: P.DetokenizeRequest) -> P.DetokenizeResponse:
        backend = tokenizer_for(req.model)
        bad = [t for t in req.tokens if t >= backend.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is out of range (vocabulary size {backend.vocab_size})",
                           param="tokens")
        text = await asyncio.to_thread(backend.tokenizer.decode, req.tokens, False)
        return P.DetokenizeResponse(prompt=text)

    app.include_router(v1)
    app.include_router(tools)
    app.openapi = lambda: _openapi_without_422(app)  # type: ignore[method-assign]
    return app
