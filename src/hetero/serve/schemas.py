"""Request validation and response shapes for the OpenAI-compatible API.

Bodies are parsed and checked by hand rather than by pydantic models so that every bad input maps
to one OpenAI-style error object ({"error": {"message", "type", "param", "code"}}) naming the field,
and so that unknown extra fields that real clients send are ignored rather than rejected.
"""
from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

# OpenAI's documented ranges; top_p 0 means "only the most likely token", i.e. greedy.
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_P_RANGE = (0.0, 1.0)
MAX_STOP = 4
DEFAULT_COMPLETION_TOKENS = 16     # OpenAI's default for /v1/completions
DEFAULT_CHAT_TOKENS = 512          # chat has no OpenAI default beyond "the rest of the context"
CHAT_ROLES = {"system", "developer", "user", "assistant", "tool"}


class APIError(Exception):
    """An error the client caused (or a busy server): becomes a JSON error object with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass
class GenRequest:
    """One validated generation request, independent of which endpoint it came from."""
    kind: str                              # "completion" | "chat"
    model: str
    prompt: Any                            # str (completion) or list of messages (chat)
    max_tokens: int | None                 # None: the endpoint default, filled once the prompt length is known
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    prompt_tokens: int = 0
    id: str = ""
    created: int = 0


MAX_JSON_DEPTH = 32               # far deeper than any request body; json.loads recurses per level
MAX_JSON_BYTES = 16 << 20          # a ceiling above any --max-body the server is given
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(rb"[\[\]{}]")


def json_depth(raw: bytes) -> int:
    """The deepest nesting of arrays/objects in `raw`, counted without parsing (strings skipped)."""
    depth = deepest = 0
    for m in _BRACKETS.finditer(_JSON_STRING.sub(b'""', raw)):
        if m.group() in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _check_text(v: Any, where: str = "body") -> None:
    """Every string (keys too) is valid Unicode: a lone surrogate such as "\\ud800" has no UTF-8."""
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, f"{where} holds invalid Unicode (a lone surrogate)", code="invalid_unicode") from None
    elif isinstance(v, dict):
        for k, x in v.items():
            _check_text(k, where)
            _check_text(x, f"'{k}'" if where == "body" else where)
    elif isinstance(v, list):
        for x in v:
            _check_text(x, where)


def parse_json_object(raw: bytes) -> dict:
    """A request body as a dict: size and nesting depth bounded before parsing, valid UTF-8 and
    Unicode after, so no body can make the parser recurse or a string fail to encode later."""
    if len(raw) > MAX_JSON_BYTES:
        raise APIError(413, f"the request body is over {MAX_JSON_BYTES} bytes", code="body_too_large")
    if json_depth(raw) > MAX_JSON_DEPTH:
        raise APIError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}",
                       code="invalid_body")
    _check_text(body)
    return body


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise APIError(400, f"'{name}' must be a number, got {json.dumps(v)}", param=name)
    if not lo <= v <= hi:
        raise APIError(400, f"'{name}' must be between {lo:g} and {hi:g}, got {v:g}", param=name)
    return float(v)


def _int(body: dict, name: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise APIError(400, f"'{name}' must be an integer, got {json.dumps(v)}", param=name)
    return v


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise APIError(400, "'stop' must be a string or a list of strings", param="stop")
    if len(v) > MAX_STOP:
        raise APIError(400, f"'stop' takes at most {MAX_STOP} sequences, got {len(v)}", param="stop")
    return [s for s in v if s]


def _unsupported(body: dict) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise APIError(400, f"only n=1 is supported, got n={json.dumps(n)}", param="n")
    for name in ("echo", "logprobs", "top_logprobs", "suffix", "tools", "functions"):
        if body.get(name) not in (None, False, 0, [], ""):
            raise APIError(400, f"'{name}' is not supported by this server", param=name)
    best_of = body.get("best_of")
    if best_of not in (None, 1):
        raise APIError(400, "only best_of=1 is supported", param="best_of")


def _message_text(content: Any, i: int) -> str:
    """Message content: a string, or a list of text parts (images etc. are not supported)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise APIError(400, f"messages[{i}].content: only text parts are supported",
                               param=f"messages[{i}].content")
            parts.append(p["text"])
        return "".join(parts)
    if content is None:
        return ""
    raise APIError(400, f"messages[{i}].content must be a string or a list of text parts",
                   param=f"messages[{i}].content")


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise APIError(400, f"messages[{i}].role must be one of {sorted(CHAT_ROLES)}, got {json.dumps(role)}",
                           param=f"messages[{i}].role")
        out.append({"role": "system" if role == "developer" else role,
                    "content": _message_text(m.get("content"), i)})
    return out


def _prompt(body: dict) -> str:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]
    if not isinstance(p, str):
        raise APIError(400, "'prompt' must be a string (or a list holding one string)", param="prompt")
    if not p:
        raise APIError(400, "'prompt' must not be empty", param="prompt")
    return p


def parse_request(body: dict, kind: str, known_models: set[str]) -> GenRequest:
    """Check every field of a /v1/completions (kind="completion") or /v1/chat/completions body."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "'model' is required (a string; see GET /v1/models)", param="model")
    if model not in known_models:
        raise APIError(404, f"the model {model!r} does not exist here; this server serves "
                       f"{', '.join(sorted(known_models))}", param="model", code="model_not_found")
    _unsupported(body)
    prompt = _prompt(body) if kind == "completion" else _messages(body)
    max_tokens = _int(body, "max_tokens")
    if kind == "chat" and body.get("max_completion_tokens") is not None:
        max_tokens = _int(body, "max_completion_tokens")
    if max_tokens is not None and max_tokens <= 0:
        raise APIError(400, f"'max_tokens' must be at least 1, got {max_tokens}", param="max_tokens")
    temperature = _number(body, "temperature", 1.0, *TEMPERATURE_RANGE)
    top_p = _number(body, "top_p", 1.0, *TOP_P_RANGE)
    seed = _int(body, "seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise APIError(400, "'stream' must be true or false", param="stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise APIError(400, "'stream_options' must be an object", param="stream_options")
    prefix = "cmpl" if kind == "completion" else "chatcmpl"
    return GenRequest(kind, model, prompt, max_tokens, temperature, top_p, seed, _stop(body), bool(stream),
                      bool(opts.get("include_usage")), id=f"{prefix}-{uuid.uuid4().hex[:24]}",
                      created=int(time.time()))


def check_context(req: GenRequest, prompt_tokens: int, context: int) -> None:
    """Fill the default max_tokens and refuse what cannot fit: the prompt and the reply share the context."""
    req.prompt_tokens = prompt_tokens
    if req.max_tokens is not None and req.max_tokens > context:
        raise APIError(400, f"'max_tokens' is {req.max_tokens} but the served context is {context} tokens",
                       param="max_tokens", code="context_length_exceeded")
    if prompt_tokens >= context:
        raise APIError(400, f"the prompt is {prompt_tokens} tokens but the served context is {context} tokens",
                       param="messages" if req.kind == "chat" else "prompt", code="context_length_exceeded")
    if req.max_tokens is None:
        default = DEFAULT_COMPLETION_TOKENS if req.kind == "completion" else DEFAULT_CHAT_TOKENS
        req.max_tokens = min(default, context - prompt_tokens)
    if prompt_tokens + req.max_tokens > context:
        raise APIError(400, f"the prompt is {prompt_tokens} tokens and max_tokens is {req.max_tokens}: "
                       f"{prompt_tokens + req.max_tokens} tokens, over the served context of {context}",
                       param="max_tokens", code="context_length_exceeded")


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def full_response(req: GenRequest, text: str, finish: str | None, completion_tokens: int) -> dict:
    """The non-streamed body: text_completion or chat.completion."""
    if req.kind == "completion":
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                  "logprobs": None}
        obj = "chat.completion"
    return {"id": req.id, "object": obj, "created": req.created, "model": req.model, "choices": [choice],
            "usage": usage(req.prompt_tokens, completion_tokens)}


def chunk(req: GenRequest, text: str | None, finish: str | None = None, role: bool = False) -> dict:
    """One streamed chunk; `text=None` with a finish reason is the closing chunk."""
    if req.kind == "completion":
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    else:
        delta: dict = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        obj = "chat.completion.chunk"
    return {"id": req.id, "object": obj, "created": req.created, "model": req.model, "choices": [choice]}


def usage_chunk(req: GenRequest, completion_tokens: int) -> dict:
    obj = "text_completion" if req.kind == "completion" else "chat.completion.chunk"
    return {"id": req.id, "object": obj, "created": req.created, "model": req.model, "choices": [],
            "usage": usage(req.prompt_tokens, completion_tokens)}
