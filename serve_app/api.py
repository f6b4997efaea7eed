"""The HTTP ingress: an OpenAI-compatible chat API, health and stats, and the Gradio chat page.

    POST /v1/chat/completions   OpenAI chat completions (messages, temperature, top_k, max_tokens, seed,
                                stream, stream_options.include_usage); errors in OpenAI's error shape
    GET  /v1/models             the served model
    GET  /health                200 once an engine replica has its model loaded, 503 before
    GET  /stats                 the engine replicas' counters (requests, tokens/s, queue depth, batch size,
                                prefix-cache hit rate and prompt tokens it saved)
    GET  /ui                    the Gradio chat page (GET / redirects there)

Requests are checked here, before any engine work: body size, JSON, the pydantic request model, then
the limits (message count, characters per message and in total, roles and their order, ranges).
With an API key set, /v1/* and /stats need `Authorization: Bearer <key>`, and the page asks for the key.
"""
import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

from nanochat.tokenizer import ConversationError, validate_conversation
from ray_jobs.metrics import record


@dataclass
class ApiConfig:
    model_name: str = "nanochat"
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_messages: int = 64
    max_message_chars: int = 16_000
    max_total_chars: int = 64_000
    max_tokens: int = 4096  # the most one request may ask for (the context may stop it sooner)
    default_max_tokens: int = 512
    control_timeout_s: float = 5.0  # health/stats calls to the replicas
    ui: bool = True


# ---- the request, as pydantic sees it ---------------------------------------------------------------

# strict types, as OpenAI's API has them: "stream": "yes" or "max_tokens": "5" is a 400 naming the field,
# not coerced; an integer is still a valid float ("temperature": 1) and null a valid optional field
STRICT = ConfigDict(strict=True)


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = STRICT
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self):
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # OpenAI clients send fields we do not use (user, ...)
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_k: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer OpenAI name for max_tokens
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)


class ApiError(Exception):
    def __init__(self, status, message, param=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def response(self):
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}
        return JSONResponse(body, status_code=self.status)


def parse_request(data, config: ApiConfig) -> ChatRequest:
    """A ChatRequest from decoded JSON, or ApiError(400) saying exactly what is wrong."""
    try:
        req = ChatRequest.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors())
        first = e.errors()[0]["loc"]
        raise ApiError(400, f"invalid request: {problems}", str(first[0]) if first else None) from None
    if len(req.messages) > config.max_messages:
        raise ApiError(400, f"too many messages: {len(req.messages)} (at most {config.max_messages})", "messages")
    total = 0
    for i, message in enumerate(req.messages):
        n = len(message.text())
        total += n
        if n > config.max_message_chars:
            raise ApiError(400, f"message {i} has {n} characters (at most {config.max_message_chars})", "messages")
        if message.role != "system" and not message.text().strip():
            raise ApiError(400, f"message {i} ({message.role}) has empty content", "messages")
    if total > config.max_total_chars:
        raise ApiError(400, f"the messages have {total} characters in all (at most {config.max_total_chars})",
                       "messages")
    if req.messages[-1].role != "user":
        raise ApiError(400, "the last message must be the user's (the model answers it)", "messages")
    try:
        validate_conversation({"messages": [{"role": m.role, "content": m.text()} for m in req.messages]})
    except ConversationError as e:
        raise ApiError(400, f"invalid conversation: {e}", "messages") from None
    asked = req.max_completion_tokens or req.max_tokens
    if asked is not None and asked > config.max_tokens:
        raise ApiError(400, f"max_tokens is {asked} (at most {config.max_tokens})", "max_tokens")
    return req


def engine_request(req: ChatRequest, config: ApiConfig) -> dict:
    return {"messages": [{"role": m.role, "content": m.text()} for m in req.messages],
            "max_tokens": req.max_completion_tokens or req.max_tokens or config.default_max_tokens,
            "temperature": req.temperature, "top_k": req.top_k, "seed": req.seed}


async def read_json(request: Request, limit: int):
    """The body as JSON: 413 past `limit` bytes (declared or streamed), 400 if it is not JSON."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is {declared} bytes (at most {limit})")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise ApiError(413, f"request body is over {limit} bytes")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ApiError(400, f"malformed JSON body: {e}") from None


# ---- the engine, as the ingress sees it --------------------------------------------------------------

class EngineClient:
    """The engine replicas behind a Serve handle: streams go to one replica (Serve picks it), control
    calls (info, stats) go to every replica at once (handle.broadcast)."""

    def __init__(self, handle, timeout_s=5.0):
        self.handle, self.timeout_s = handle, timeout_s

    def generate(self, request):
        return self.handle.options(stream=True).generate.remote(request)

    async def broadcast(self, method):
        """Each live replica's answer; replicas that fail or are still starting are left out."""
        try:
            response = self.handle.broadcast(method)
            results = await asyncio.wait_for(response.results_async(return_exceptions=True), self.timeout_s)
        except Exception:  # no replica yet, or none answering in time
            return []
        return [r for r in results if not isinstance(r, BaseException)]

    async def start(self, request):
        """Start a generation: (stream, prompt_tokens), or ApiError when the engine refuses the request."""
        stream = self.generate(request)
        try:
            first = await anext(stream)
        except BaseException:  # the client left while the request waited for a slot (or the replica died)
            stream.cancel()
            raise
        if "error" in first:
            stream.cancel()
            raise ApiError(first["status"], first["error"], kind="invalid_request_error"
                           if first["status"] < 500 else "timeout")
        return stream, first["prompt_tokens"]


# counters that add up over replicas, for /stats' "total"
SUMMED_STATS = ("requests_total", "requests_finished", "requests_cancelled", "requests_timed_out", "requests_failed",
                "in_flight", "queue_depth", "active", "tokens_generated", "tokens_per_s", "kv_cache_mb",
                "prefix_cache_lookups", "prefix_cache_hits", "prefix_cache_prompt_tokens", "prefix_cache_tokens_saved",
                "prefix_cache_mb")


# ---- the app -----------------------------------------------------------------------------------------

def _chunk(rid, created, model, delta=None, finish=None, usage=None):
    choices = [] if usage else [{"index": 0, "delta": delta or {}, "finish_reason": finish}]
    body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if usage:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n"


def _usage(prompt_tokens, completion_tokens):
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def build_api(engine: EngineClient, config: ApiConfig) -> FastAPI:
    app = FastAPI(title="nanochat", docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return e.response()

    def check_key(request: Request):
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           kind="authentication_error")

    @app.get("/")
    async def index(request: Request):
        if config.ui:
            return RedirectResponse(request.scope.get("root_path", "") + "/ui/")
        return {"endpoints": ["/v1/chat/completions", "/v1/models", "/health", "/stats"]}

    @app.get("/health")
    async def health():
        ready = [info for info in await engine.broadcast("info") if info.get("ready")]
        if not ready:
            return JSONResponse({"status": "loading", "replicas_ready": 0}, status_code=503)
        return {"status": "ok", "replicas_ready": len(ready), "checkpoints": sorted({str(i["checkpoint"]["path"])
                                                                                    for i in ready})}

    @app.get("/stats")
    async def stats(request: Request):
        check_key(request)
        replicas = await engine.broadcast("stats")
        total = {k: sum(r[k] for r in replicas) for k in SUMMED_STATS}
        total["max_active"] = max((r["max_active"] for r in replicas), default=0)
        saved, prompt_tokens = total["prefix_cache_tokens_saved"], total["prefix_cache_prompt_tokens"]
        total["prefix_cache_hit_rate"] = round(saved / prompt_tokens, 4) if prompt_tokens else 0.0
        return {"replicas": replicas, "total": total}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "nanochat"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        """One chat completion; its outcome counted (nanochat_serve_requests_total): ok, 4xx, 5xx, timed_out,
        or, for a stream the client left, cancelled (counted when the stream ends)."""
        try:
            response = await complete(request)
        except ApiError as e:
            count_outcome("timed_out" if e.status == 504 else f"{e.status // 100}xx")
            raise
        except BaseException as e:
            count_outcome("cancelled" if isinstance(e, asyncio.CancelledError) else "5xx")
            raise
        if not isinstance(response, StreamingResponse):
            count_outcome("ok")
        return response

    async def complete(request: Request):
        check_key(request)
        req = parse_request(await read_json(request, config.max_body_bytes), config)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        stream, prompt_tokens = await engine.start(engine_request(req, config))
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_sse(stream, rid, created, config.model_name, prompt_tokens, include_usage),
                                     media_type="text/event-stream")
        text, done = [], None
        try:
            async for item in stream:
                if "error" in item:
                    raise ApiError(item["status"], item["error"], kind="timeout")
                if "text" in item:
                    text.append(item["text"])
                done = item if "finish_reason" in item else done
        finally:
            if done is None:  # the client went away, or it failed: stop generating
                stream.cancel()
        return {"id": rid, "object": "chat.completion", "created": created, "model": config.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                             "finish_reason": done["finish_reason"]}],
                "usage": _usage(prompt_tokens, done["completion_tokens"])}

    if config.ui:
        import gradio as gr

        from serve_app.ui import build_ui
        # with an API key, the page asks for it at a login form (any user name, the key as password)
        auth = None if config.api_key is None else (
            lambda user, password: hmac.compare_digest(password.encode(), config.api_key.encode()))
        app = gr.mount_gradio_app(app, build_ui(engine, config), path="/ui", auth=auth)
    return app


def count_outcome(outcome):
    record("nanochat_serve_requests_total", 1, outcome=outcome)


async def _sse(stream, rid, created, model, prompt_tokens, include_usage):
    """OpenAI's streaming format: a role chunk, content chunks, a finish chunk, [usage], [DONE]."""
    done, outcome = False, "cancelled"
    try:
        yield _chunk(rid, created, model, {"role": "assistant", "content": ""})
        async for item in stream:
            if "text" in item:
                yield _chunk(rid, created, model, {"content": item["text"]})
            elif "error" in item:
                outcome = "timed_out"
                yield f"data: {json.dumps({'error': {'message': item['error'], 'type': 'timeout'}})}\n\n"
                break
            elif "finish_reason" in item:
                yield _chunk(rid, created, model, finish=item["finish_reason"])
                if include_usage:
                    yield _chunk(rid, created, model, usage=_usage(prompt_tokens, item["completion_tokens"]))
        done, outcome = True, "ok" if outcome == "cancelled" else outcome
        yield "data: [DONE]\n\n"
    finally:
        count_outcome(outcome)
        if not done:  # the client disconnected mid-stream: cancel the generation, freeing its batch slot
            stream.cancel()


@serve.deployment(name="NanochatIngress")
@serve.ingress()
class Ingress:
    def __init__(self, engine, config: dict):
        self.config = ApiConfig(**config)
        self.engine = EngineClient(engine, self.config.control_timeout_s)

    def __serve_build_asgi_app__(self):
        return build_api(self.engine, self.config)

