"""The FastAPI app: /v1/ask, the KB endpoints, /healthz, /metrics and the page (OpenAI's chat in openai.py).

    app = create_app(model, "facts.kbstore", ServeConfig())

Questions go to the micro-batcher (kblam.serve.batching), whose one thread runs `KBLaM.ask` on a
batch at one KB version; the KB endpoints go to the store (kblam.serve.kbservice). Blocking KB calls
are plain `def` endpoints, which FastAPI runs in its thread pool. Every error is JSON in OpenAI's
shape, `{"error": {"message", "type", "param", "code"}}`, with a message that says what to change.
"""

from __future__ import annotations

import asyncio
import logging
import math
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, FastAPI, File, Header, Query, Request, Response, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from kblam._version import __version__
from kblam.kb import MAX_FIELD_CHARS, KBFormatError, Triple
from kblam.serve.batching import Answered, AskParams, Job, MicroBatcher, Overloaded
from kblam.serve.kbservice import Conflict, KBService, VersionMismatch
from kblam.serve.metrics import CONTENT_TYPE, Metrics, MetricsMiddleware
from kblam.serve.security import (
    LOOPBACK_HOSTS,
    BearerAuth,
    BodyLimits,
    Limits,
    SameOriginWrites,
    error_response,
    is_loopback,
)

log = logging.getLogger("kblam.serve")


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)  # none: CORS off
    allowed_hosts: list[str] | None = None  # None: the loopback names on a loopback bind, any host otherwise
    limits: Limits = field(default_factory=Limits)
    batch_window_ms: float = 5.0
    max_batch: int = 32  # 1: one question at a time
    max_queue: int = 512
    model_id: str = "kblam"


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers


class EmptyKB(Exception):
    pass


def _unicode(text: str) -> str:
    if any("\ud800" <= ch <= "\udfff" for ch in text):
        raise ValueError("is not valid Unicode text (it holds a lone surrogate)")
    return text


Text = Annotated[str, AfterValidator(_unicode)]
FieldText = Annotated[str, Field(min_length=1, max_length=MAX_FIELD_CHARS), AfterValidator(_unicode)]


# --- request and response bodies -------------------------------------------------------------------


class AskRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: Text | list[Text] = Field(description="one question, or a list answered together")
    max_new_tokens: int = Field(48, ge=1, description="longest answer in tokens (the server's limit applies)")
    max_sources: int = Field(5, ge=0, description="triples listed per answer, by their share of the KB attention")
    min_confidence: float | None = Field(None, ge=0, le=1, allow_inf_nan=False,
                                         description="refuse below this confidence; default: the adapter's "
                                                     "calibrated threshold; 0: never refuse")


class TripleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: FieldText
    property: FieldText
    value: FieldText


class TriplesIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    triples: list[TripleIn] = Field(min_length=1)


class TripleOut(BaseModel):
    name: str
    property: str
    value: str


class Source(TripleOut):
    score: float | None = Field(description="the triple's share of the question's KB attention")


class AnswerOut(BaseModel):
    question: str
    text: str
    refused: bool
    confidence: float | None
    quoted: list[TripleOut]
    sources: list[Source]
    signals: dict[str, float | None]
    kb_version: int = Field(description="the KB version (store generation) the whole answer read")


class AskResponse(BaseModel):
    answers: list[AnswerOut]


class Version(BaseModel):
    version: int


class Added(Version):
    added: int


class Removed(Version):
    removed: int


class Imported(Version):
    triples_in_file: int
    changed: int
    size: int


class TriplePage(Version):
    total: int
    offset: int
    limit: int
    triples: list[TripleOut]


class KBInfo(Version):
    size: int
    encoder: str
    key_template: str
    value_template: str
    model: str
    base_model: str
    kb_layers: list[int]
    calibrated: bool


# --- the server ----------------------------------------------------------------------------------


class Server:
    """What the routes share: the model, the KB service, the batcher, the metrics and the settings."""

    def __init__(self, model, kb: KBService, config: ServeConfig):
        self.model, self.kb, self.config = model, kb, config
        self.metrics = Metrics()
        self.batcher = MicroBatcher(self._run, model.tokenizer, window_s=config.batch_window_ms / 1000,
                                    max_batch=config.max_batch, max_queue=max(config.max_queue, config.max_batch),
                                    on_batch=self.metrics.batch)
        self.metrics.queue_depth.set_function(lambda: self.batcher.waiting)

    def _run(self, questions, params: AskParams, max_sources, streamer):
        """One batch, in the answering thread: the newest KB version, read for the whole generation."""
        store = self.kb.reader()
        if not len(store):
            raise EmptyKB
        extra = {} if streamer is None else {"streamer": streamer}
        if params.temperature:
            extra.update(do_sample=True, temperature=params.temperature, top_p=params.top_p or 1.0)
        answers = self.model.ask(questions, kb=store, max_new_tokens=params.max_new_tokens, max_sources=max_sources,
                                 min_confidence=params.min_confidence, **extra)
        return answers, store.generation

    def check_questions(self, questions: list[str], max_new_tokens: int, max_sources: int = 0) -> None:
        limits = self.config.limits
        most = min(limits.max_questions, self.config.max_batch)
        if not questions or len(questions) > most:
            raise APIError(422, f"send 1 to {most} questions per request, not {len(questions)}", param="question")
        for q in questions:
            if not q.strip():
                raise APIError(422, "a question is empty", param="question")
            if len(q) > limits.max_question_chars:
                raise APIError(422, f"a question is {len(q):,} characters; this server takes at most "
                                    f"{limits.max_question_chars:,}", param="question")
        if max_new_tokens > limits.max_new_tokens:
            raise APIError(422, f"max_new_tokens is {max_new_tokens}; this server allows at most "
                                f"{limits.max_new_tokens}", param="max_new_tokens")
        if max_sources > limits.max_sources:
            raise APIError(422, f"max_sources is {max_sources}; this server allows at most {limits.max_sources}",
                           param="max_sources")

    async def answer(self, questions: list[str], params: AskParams, max_sources: int,
                     on_text=None) -> list[Answered]:
        job = Job(questions, params, max_sources, on_text)
        try:
            future = self.batcher.submit(job)
        except Overloaded as err:
            raise APIError(503, str(err), "overloaded", headers={"Retry-After": "2"}) from None
        try:
            return await asyncio.wrap_future(future)
        except EmptyKB:
            raise APIError(409, "the knowledge base is empty: add triples or import a file first") from None
        except KBFormatError as err:  # a KB the model cannot read (should not happen with a store)
            raise APIError(422, str(err)) from None
        except ValueError as err:  # ask() refuses the question: too long for the model's context, ...
            raise APIError(422, str(err), param="question") from None


def server(request: Request) -> Server:
    return request.app.state.kblam


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def triple_out(t: Triple) -> TripleOut:
    return TripleOut(name=t.name, property=t.property, value=t.value)


def answer_out(item: Answered) -> AnswerOut:
    a = item.answer
    return AnswerOut(
        question=a.question, text=a.text, refused=a.refused, confidence=_finite(a.confidence),
        quoted=[triple_out(t) for t in a.quoted],
        sources=[Source(name=t.name, property=t.property, value=t.value, score=_finite(s)) for t, s in a.sources],
        signals={k: _finite(v) for k, v in a.signals.items()}, kb_version=item.kb_version,
    )


def _etag(response: Response, version: int) -> None:
    response.headers["ETag"] = f'"{version}"'


# --- routes ------------------------------------------------------------------------------------------

router = APIRouter()
IfMatch = Annotated[str | None, Header(alias="If-Match", description="refuse the write (412) unless the KB is "
                                                                       "at this version")]


@router.post("/v1/ask", response_model=AskResponse, tags=["answers"])
async def ask(body: AskRequest, request: Request) -> AskResponse:
    """Answer one question or a list from the KB: text, sources (triple and score), quoted triples,
    confidence, refusal, and the KB version the answer read."""
    srv = server(request)
    questions = [body.question] if isinstance(body.question, str) else list(body.question)
    srv.check_questions(questions, body.max_new_tokens, body.max_sources)
    answered = await srv.answer(questions, AskParams(body.max_new_tokens, body.min_confidence), body.max_sources)
    return AskResponse(answers=[answer_out(a) for a in answered])


@router.get("/v1/kb", response_model=KBInfo, tags=["kb"])
def kb_info(request: Request, response: Response) -> KBInfo:
    """The KB's size and version, its encoder and templates, and the model reading it."""
    srv = server(request)
    store, cfg = srv.kb.reader(), srv.model.config
    _etag(response, store.generation)
    return KBInfo(version=store.generation, size=len(store), encoder=store.encoder_name,
                  key_template=store.key_template, value_template=store.value_template, model=srv.config.model_id,
                  base_model=cfg.base_model, kb_layers=list(cfg.kb_layers),
                  calibrated=srv.model.calibrator is not None)


@router.get("/v1/kb/triples", response_model=TriplePage, tags=["kb"])
def list_triples(
    request: Request, response: Response,
    name: Annotated[Text | None, Query(max_length=MAX_FIELD_CHARS, description="exact name")] = None,
    property: Annotated[Text | None, Query(max_length=MAX_FIELD_CHARS, description="exact property")] = None,
    q: Annotated[Text | None, Query(max_length=1000, description="text in the name, property or value "
                                                                  "(case-insensitive)")] = None,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, description="triples per page (the server's limit applies)")] = 50,
) -> TriplePage:
    """Triples, filtered by name and property, searched by text, a page at a time."""
    srv = server(request)
    if limit > srv.config.limits.max_page:
        raise APIError(422, f"limit is {limit}; this server sends at most {srv.config.limits.max_page} per page",
                       param="limit")
    version, total, items = srv.kb.find(name=name, property=property, q=q, offset=offset, limit=limit)
    _etag(response, version)
    return TriplePage(version=version, total=total, offset=offset, limit=limit,
                      triples=[triple_out(t) for t in items])


def _triples(items: list[TripleIn]) -> list[Triple]:
    try:
        return [Triple(t.name, t.property, t.value) for t in items]
    except KBFormatError as err:
        raise APIError(422, str(err)) from None


@router.post("/v1/kb/triples", response_model=Added, status_code=201, tags=["kb"])
def add_triples(body: TripleIn | TriplesIn, request: Request, response: Response, if_match: IfMatch = None) -> Added:
    """Add one triple, or {"triples": [...]}. A (name, property) stored with another value is a 409
    (PATCH changes values); one stored with the same value is skipped."""
    srv = server(request)
    items = body.triples if isinstance(body, TriplesIn) else [body]
    if len(items) > srv.config.limits.max_triples:
        raise APIError(422, f"{len(items):,} triples in one request; this server takes at most "
                            f"{srv.config.limits.max_triples:,} (import a file for more)", param="triples")
    triples = _triples(items)
    version, added = _write(srv, "add", lambda: srv.kb.add(triples, if_match))
    _etag(response, version)
    return Added(version=version, added=added)


@router.patch("/v1/kb/triples", response_model=Version, tags=["kb"])
def update_triple(body: TripleIn, request: Request, response: Response, if_match: IfMatch = None) -> Version:
    """Change the value of a stored (name, property)."""
    srv = server(request)
    (t,) = _triples([body])
    version = _write(srv, "update", lambda: srv.kb.update(t.name, t.property, t.value, if_match))
    _etag(response, version)
    return Version(version=version)


@router.delete("/v1/kb/triples", response_model=Removed, tags=["kb"])
def delete_triples(
    request: Request, response: Response,
    name: Annotated[Text, Query(min_length=1, max_length=MAX_FIELD_CHARS)],
    property: Annotated[Text | None, Query(max_length=MAX_FIELD_CHARS,
                                           description="omit it to remove every triple of the entity")] = None,
    if_match: IfMatch = None,
) -> Removed:
    """Remove one (name, property), or every triple of an entity."""
    srv = server(request)
    if not name.strip() or (property is not None and not property.strip()):
        raise APIError(422, "name and property must not be empty")
    version, removed = _write(srv, "remove", lambda: srv.kb.remove(name, property, if_match))
    _etag(response, version)
    return Removed(version=version, removed=removed)


@router.post("/v1/kb/import", response_model=Imported, tags=["kb"])
def import_file(
    request: Request, response: Response,
    file: Annotated[UploadFile, File(description="a KB file: .csv, .tsv, .json, .jsonl or .parquet")],
    if_match: IfMatch = None,
) -> Imported:
    """Add or update every triple of a KB file, in one commit. A malformed file is a 422 naming the line
    and the problem, and changes nothing."""
    srv = server(request)
    data = file.file.read(srv.config.limits.max_upload_bytes + 1)
    if len(data) > srv.config.limits.max_upload_bytes:
        raise APIError(413, f"the file is over this server's {srv.config.limits.max_upload_bytes:,} bytes")
    try:
        kb = srv.kb.load_upload(data, file.filename)
    except KBFormatError as err:
        raise APIError(422, str(err), param="file") from None
    version, changed = _write(srv, "import", lambda: srv.kb.import_kb(kb, if_match))
    _etag(response, version)
    return Imported(version=version, triples_in_file=len(kb), changed=changed, size=len(srv.kb.reader()))


@router.get("/v1/kb/export", tags=["kb"], response_class=Response,
            responses={200: {"content": {"application/x-ndjson": {}, "application/json": {}, "text/csv": {}}}})
def export(request: Request, format: Literal["jsonl", "json", "csv", "tsv"] = "jsonl") -> Response:
    """Every triple, as a file of this format."""
    version, text = server(request).kb.export(format)
    media = {"jsonl": "application/x-ndjson", "json": "application/json", "csv": "text/csv",
             "tsv": "text/tab-separated-values"}[format]
    return Response(text.encode("utf-8"), media_type=media, headers={
        "ETag": f'"{version}"', "Content-Disposition": f'attachment; filename="kb-v{version}.{format}"'})


def _write(srv: Server, kind: str, write):
    try:
        result = write()
    except VersionMismatch as err:
        raise APIError(412, str(err), "version_mismatch", param="If-Match",
                       headers={"ETag": f'"{err.current}"'}) from None
    except Conflict as err:
        raise APIError(409, str(err), "conflict") from None
    except KeyError as err:
        raise APIError(404, err.args[0] if err.args else str(err), "not_found") from None
    except KBFormatError as err:
        raise APIError(422, str(err)) from None
    srv.metrics.kb_writes.labels(kind).inc()
    return result


@router.get("/healthz", tags=["server"])
def healthz(request: Request) -> dict:
    """The server answers and its KB is readable."""
    srv = server(request)
    store = srv.kb.reader()
    return {"status": "ok", "kb_version": store.generation, "kb_size": len(store), "queue": srv.batcher.waiting}


@router.get("/metrics", tags=["server"], response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus text format: requests, latency histogram, KB size and version, queue depth, batches."""
    srv = server(request)
    store = srv.kb.reader()
    srv.metrics.kb_triples.set(len(store))
    srv.metrics.kb_version.set(store.generation)
    return Response(srv.metrics.render(), media_type=CONTENT_TYPE)


# The page: three files read once from the package. Routes, not a static folder: no request value picks a file.
PAGE = {"/": "index.html", "/app.js": "app.js", "/style.css": "style.css"}
_MEDIA = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8"}
# Only this server's own files and API: nothing is fetched from outside, inline script cannot run.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")


def _page_route(url: str, name: str):
    body = resources.files("kblam.serve").joinpath("static", name).read_bytes()
    media = _MEDIA[Path(name).suffix]

    def page() -> Response:
        return Response(body, media_type=media, headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"})

    router.add_api_route(url, page, methods=["GET"], include_in_schema=False, response_class=Response)


for _url, _name in PAGE.items():
    _page_route(_url, _name)


# --- the app ---------------------------------------------------------------------------------------------


def create_app(model, kb_path: str | Path, config: ServeConfig | None = None, *, encoder=None) -> FastAPI:
    """The server's app over a KB store folder. `encoder`: the writer's sentence encoder (default: a second
    copy of the model's, loaded by name: the store writes from request threads, the model answers from its own)."""
    from kblam.serve import openai as openai_routes

    config = config or ServeConfig()
    if encoder is None:
        from kblam import defaults

        encoder = defaults.load_encoder(model.encoder.name)
    kb = KBService(kb_path, encoder)
    try:
        model._check_store(kb.reader())  # the store's encoder and templates are the model's
    except BaseException:
        kb.close()
        raise
    srv = Server(model, kb, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        srv.batcher.start()
        try:
            yield
        finally:
            srv.batcher.stop()
            kb.close()

    app = FastAPI(title="kblam", version=__version__, lifespan=lifespan, redoc_url=None,
                  description="Answers from a knowledge base that a language model reads directly (KBLaM), "
                              "and the KB's triples. OpenAI-compatible chat at /v1/chat/completions.")
    app.state.kblam = srv
    app.include_router(router)
    app.include_router(openai_routes.router)
    _add_error_handlers(app)
    # Outermost last: metrics see every response, CORS answers preflights before the key is asked for,
    # and no body is read before the key is checked.
    app.add_middleware(BodyLimits, default=config.limits.max_body_bytes,
                       by_path={"/v1/kb/import": config.limits.max_upload_bytes})
    if config.api_key is not None:
        app.add_middleware(BearerAuth, api_key=config.api_key)
    app.add_middleware(SameOriginWrites, allowed_origins=config.cors_origins)
    hosts = config.allowed_hosts
    if hosts is None and is_loopback(config.host):
        hosts = LOOPBACK_HOSTS
    if hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["*"],
                           allow_headers=["Authorization", "Content-Type", "If-Match"], expose_headers=["ETag"])
    app.add_middleware(MetricsMiddleware, metrics=srv.metrics)
    return app


def _where(loc) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "header", "path")]
    return ".".join(parts) or "body"


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request, err: APIError):
        return error_response(err.status, err.message, err.kind, err.param, err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, err: RequestValidationError):
        # The problems in words, without echoing the input (which may be huge, or bytes).
        problems = [f"{_where(e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in err.errors()[:10]]
        first = err.errors()[0].get("loc", ()) if err.errors() else ()
        return error_response(422, "; ".join(problems) or "the request is not valid", "invalid_request_error",
                      _where(first) if first else None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, err: StarletteHTTPException):
        messages = {404: "no such endpoint: see /docs", 405: "this endpoint does not take that method",
                    413: "the request body is over this server's limit"}
        detail = err.detail if isinstance(err.detail, str) and err.status_code not in messages else \
            messages.get(err.status_code, str(err.detail))
        return error_response(err.status_code, detail, "invalid_request_error", headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request, err: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, "internal error: the server's log has the details", "server_error")
