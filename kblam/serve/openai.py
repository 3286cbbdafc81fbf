"""OpenAI-compatible chat: POST /v1/chat/completions (streamed as server-sent events) and GET /v1/models.

Point any OpenAI client at the server (`base_url="http://127.0.0.1:8000/v1"`). The answer is to the last
user message, from the server's KB: earlier turns and system messages are not read (the adapter has its
own prompt). `max_tokens` (or `max_completion_tokens`), `temperature` and `top_p` are honoured; `n` must
be 1; other fields are ignored. Each completion carries a `kblam` object beside OpenAI's fields:
sources, quoted triples, confidence, refused and the KB version the answer read.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import StreamingResponse

from kblam.serve.app import Answered, AnswerOut, APIError, Text, answer_out, server
from kblam.serve.batching import AskParams

router = APIRouter(tags=["openai"])


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # user, seed, stream_options, ... are accepted and not used
    model: Annotated[str, Field(max_length=256)] = "kblam"
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    n: int | None = Field(None, ge=1)
    stream: bool = False


class ChatAnswer(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: ChatAnswer
    finish_reason: Literal["stop"] = "stop"


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    kblam: AnswerOut = Field(description="the answer's sources, quoted triples, confidence and KB version")


def _question(body: ChatRequest) -> str:
    for message in reversed(body.messages):
        if message.role == "user":
            content = message.content
            text = content if isinstance(content, str) else " ".join(p.text for p in content or [])
            if text.strip():
                return text
            break
    raise APIError(422, "the last user message holds no text to answer", param="messages")


def _params(srv, body: ChatRequest) -> tuple[str, AskParams]:
    if body.n not in (None, 1):
        raise APIError(422, "n must be 1: the server gives one answer per question", param="n")
    question = _question(body)
    max_new = body.max_completion_tokens or body.max_tokens or 48
    srv.check_questions([question], max_new)
    return question, AskParams(max_new_tokens=max_new, temperature=body.temperature or None,
                               top_p=body.top_p if body.temperature else None)


@router.post("/v1/chat/completions", response_model=ChatCompletion)
async def chat_completions(body: ChatRequest, request: Request):
    """OpenAI's chat completion, answered from the KB; `stream: true` sends `chat.completion.chunk` events."""
    srv = server(request)
    question, params = _params(srv, body)
    completion_id, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), srv.config.model_id
    if not body.stream:
        (answered,) = await srv.answer([question], params, srv.config.limits.max_sources)
        return ChatCompletion(id=completion_id, created=created, model=model,
                              choices=[Choice(message=ChatAnswer(content=answered.answer.text))],
                              kblam=answer_out(answered))

    loop, pieces = asyncio.get_running_loop(), asyncio.Queue()
    # Submitted before the response starts, so that a refusal (503, 422) is an HTTP status, not an event.
    task = asyncio.ensure_future(srv.answer([question], params, srv.config.limits.max_sources,
                                            on_text=lambda text: loop.call_soon_threadsafe(pieces.put_nowait, text)))
    await asyncio.sleep(0)  # let the task submit (errors raised at submission surface on first await)
    if task.done() and task.exception() is not None:
        raise task.exception()

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        event = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(event, ensure_ascii=False)}\n\n"

    async def events():
        yield chunk({"role": "assistant", "content": ""})
        try:
            while True:
                getter = asyncio.ensure_future(pieces.get())
                done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield chunk({"content": getter.result()})
                    continue
                getter.cancel()
                while not pieces.empty():  # pieces queued before the answer's future resolved
                    yield chunk({"content": pieces.get_nowait()})
                break
            answered: Answered = (await task)[0]
            yield chunk({}, "stop", kblam=answer_out(answered).model_dump())
        except APIError as err:
            yield f"data: {json.dumps({'error': {'message': err.message, 'type': err.kind}})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/v1/models")
def models(request: Request) -> dict:
    """The one model this server answers with (any model name in a request gets it)."""
    return {"object": "list", "data": [{"id": server(request).config.model_id, "object": "model", "created": 0,
                                        "owned_by": "kblam"}]}
