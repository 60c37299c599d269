"""The OpenAI-compatible API, without I/O: request validation, the chat template, incremental
detokenization with stop strings, and the response / stream-chunk / error bodies.

nodes.http_front does the HTTP; this module decides what a body means and what the answer looks
like, so it is unit-tested without a server. The shapes follow the OpenAI API reference for
/v1/completions and /v1/chat/completions (what exo, llama.cpp's server and vLLM also serve):
non-streaming bodies carry `usage`; streams are `data: {chunk}` events ending with `data: [DONE]`.
Only n=1 is served (one sequence per request); `top_k` and `return_token_ids` ride along as
extra fields, as in vLLM.

Chat template ("coel-comment-v1", for the bundled code model, which knows no chat format): every
system or user message becomes Python comment lines, `# <role>: <first line>` then `# <line>` for
the following lines; an assistant message is its content verbatim followed by a newline. The
model then continues after the last line, i.e. writes the code the comments ask for.
"""
from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

CHAT_TEMPLATE = "coel-comment-v1"
DEFAULT_COMPLETION_MAX_TOKENS = 16  # the OpenAI completions API's documented default
DEFAULT_CHAT_MAX_TOKENS = 256  # chat has no documented default; capped by the context left
MAX_STOP_STRINGS = 4
ROLES = ("system", "user", "assistant", "developer")


class ApiError(Exception):
    """An error answered as the OpenAI error body {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else
                             "service_unavailable" if status == 503 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


@dataclass(frozen=True)
class ApiRequest:
    """A validated completion or chat-completion request (prompt not yet tokenized)."""
    kind: str  # "completion" | "chat"
    model: str
    prompt_text: str | None = None  # completion with a text prompt, or the rendered chat
    prompt_ids: tuple[int, ...] | None = None  # completion with a token-id prompt
    max_tokens: int | None = None  # None = the endpoint's default (capped by the context left)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False
    ignore_eos: bool = False
    echo: bool = False
    user_fields: dict[str, Any] = field(default_factory=dict)


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(doc, dict):
        raise bad(f"the request body must be a JSON object, got {type(doc).__name__}", code="invalid_json")
    return doc


def _num(doc: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = doc.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad(f"'{name}' must be a number, got {json.dumps(v)[:60]}", name, "invalid_type")
    if v < lo or v > hi or (lo_open and v == lo):
        raise bad(f"'{name}' must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v}", name, "invalid_value")
    return float(v)


def _int(doc: dict, name: str, lo: int | None = None) -> int | None:
    v = doc.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"'{name}' must be an integer, got {json.dumps(v)[:60]}", name, "invalid_type")
    if lo is not None and v < lo:
        raise bad(f"'{name}' must be >= {lo}, got {v}", name, "invalid_value")
    return v


def _bool(doc: dict, name: str) -> bool:
    v = doc.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad(f"'{name}' must be true or false, got {json.dumps(v)[:60]}", name, "invalid_type")
    return v


def _stop(doc: dict) -> tuple[str, ...]:
    v = doc.get("stop")
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise bad("'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(items) > MAX_STOP_STRINGS:
        raise bad(f"'stop' holds at most {MAX_STOP_STRINGS} strings, got {len(items)}", "stop", "invalid_value")
    if any(s == "" for s in items):
        raise bad("'stop' strings must not be empty", "stop", "invalid_value")
    return tuple(dict.fromkeys(items))


def render_chat(messages: Any) -> str:
    """The chat template (module docstring) applied to an OpenAI `messages` list."""
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list of {role, content} objects", "messages", "invalid_type")
    out: list[str] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]", "invalid_type")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise bad(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {json.dumps(role)[:40]}",
                      f"messages[{i}].role", "invalid_value")
        if isinstance(content, list):  # content parts: only text is understood
            texts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise bad(f"messages[{i}].content[{j}]: only {{'type': 'text', 'text': ...}} parts are "
                              f"supported", f"messages[{i}].content", "invalid_value")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content must be a string, got {json.dumps(content)[:40]}",
                      f"messages[{i}].content", "invalid_type")
        if role == "assistant":
            out.append(content + "\n")
        else:
            lines = content.split("\n")
            out.append(f"# {'system' if role == 'developer' else role}: {lines[0]}\n" +
                       "".join(f"# {line}\n" for line in lines[1:]))
    return "".join(out)


def parse_request(kind: str, doc: dict[str, Any], served_models: tuple[str, ...]) -> ApiRequest:
    """Validate a /v1/completions (kind "completion") or /v1/chat/completions ("chat") body."""
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' must be a non-empty string (GET /v1/models lists the served models)", "model",
                  "invalid_type" if model is not None else "missing_field")
    if model not in served_models:
        raise ApiError(404, f"the model '{model[:80]}' does not exist; this server serves "
                       f"{', '.join(served_models)}", "model", "model_not_found")
    n = _int(doc, "n", 1)
    if n not in (None, 1):
        raise bad(f"'n' must be 1 (one sequence per request), got {n}", "n", "invalid_value")
    if _int(doc, "best_of", 1) not in (None, 1):
        raise bad("'best_of' must be 1", "best_of", "invalid_value")
    max_tokens = _int(doc, "max_tokens")
    mct = _int(doc, "max_completion_tokens")
    if max_tokens is None:
        max_tokens, name = mct, "max_completion_tokens"
    else:
        name = "max_tokens"
    if max_tokens is not None and max_tokens <= 0:
        raise bad(f"'{name}' must be >= 1, got {max_tokens}", name, "invalid_value")
    stream_options = doc.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise bad("'stream_options' must be an object", "stream_options", "invalid_type")
    stream = _bool(doc, "stream")
    include_usage = _bool(stream_options or {}, "include_usage")
    kw: dict[str, Any] = dict(
        kind=kind, model=model, max_tokens=max_tokens, temperature=_num(doc, "temperature", 1.0, 0.0, 2.0),
        top_p=_num(doc, "top_p", 1.0, 0.0, 1.0, lo_open=True), top_k=_int(doc, "top_k", 0) or 0,
        seed=_int(doc, "seed"), stop=_stop(doc), stream=stream, include_usage=stream and include_usage,
        return_token_ids=_bool(doc, "return_token_ids"), ignore_eos=_bool(doc, "ignore_eos"))
    if kind == "chat":
        if "prompt" in doc:
            raise bad("chat completions take 'messages', not 'prompt'", "prompt", "invalid_value")
        kw["prompt_text"] = render_chat(doc.get("messages"))
    else:
        kw["echo"] = _bool(doc, "echo")
        p = doc.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]  # a batch of one
        if isinstance(p, str):
            if not p:
                raise bad("'prompt' is empty", "prompt", "invalid_value")
            kw["prompt_text"] = p
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            kw["prompt_ids"] = tuple(p)
        elif isinstance(p, list) and len(p) > 1 and all(isinstance(t, (str, list)) for t in p):
            raise bad(f"'prompt' holds a batch of {len(p)} prompts; send one prompt per request", "prompt",
                      "invalid_value")
        else:
            raise bad("'prompt' must be a string or a non-empty list of token ids", "prompt",
                      "missing_field" if p is None else "invalid_type")
    return ApiRequest(**kw)


def generation_budget(req: ApiRequest, prompt_tokens: int, max_seq_len: int) -> int:
    """max_tokens to generate; ApiError 400 when the prompt (+ max_tokens) does not fit the context."""
    left = max_seq_len - prompt_tokens
    if req.max_tokens is not None:
        if prompt_tokens + req.max_tokens > max_seq_len:
            raise bad(f"this model's maximum context length is {max_seq_len} tokens; the prompt holds "
                      f"{prompt_tokens} and max_tokens asks for {req.max_tokens} more ({prompt_tokens + req.max_tokens})",
                      "max_tokens" if prompt_tokens < max_seq_len else "prompt", "context_length_exceeded")
        return req.max_tokens
    if left < 1:
        raise bad(f"this model's maximum context length is {max_seq_len} tokens; the prompt holds "
                  f"{prompt_tokens}", "messages" if req.kind == "chat" else "prompt", "context_length_exceeded")
    return min(left, DEFAULT_CHAT_MAX_TOKENS if req.kind == "chat" else DEFAULT_COMPLETION_MAX_TOKENS)


class TextStream:
    """Token ids -> text deltas, holding back incomplete UTF-8 and anything that could start a stop
    string; `stopped` becomes True when a stop string appears (the text ends before it)."""

    def __init__(self, decode: Any, eos_id: int, stop: tuple[str, ...] = ()):
        self.decode, self.eos_id, self.stop = decode, eos_id, stop
        self.text = ""  # decoded so far (complete characters only)
        self.sent = 0  # characters of self.text handed out
        self.pending: list[int] = []  # ids whose bytes do not end on a character boundary yet
        self.stopped = False
        self.finish_reason: str | None = None

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        if token_id == self.eos_id:
            self.stopped, self.finish_reason = True, "stop"
            return self.flush()
        self.pending.append(token_id)
        piece = self.decode(self.pending)
        if piece.endswith("\ufffd") and len(self.pending) < 4:
            return ""  # a character split across tokens: wait for its last byte
        self.pending = []
        self.text += piece
        if self.stop:
            window = max(len(s) for s in self.stop)
            start = max(0, self.sent - window + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped, self.finish_reason = True, "stop"
                return self._take(len(self.text))
            hold = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
            return self._take(len(self.text) - hold)
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out = self.text[self.sent:upto]
        self.sent = upto
        return out

    def flush(self) -> str:
        """The rest at the end of the request (held-back prefixes that never became a stop string)."""
        if self.pending:
            self.text += self.decode(self.pending)
            self.pending = []
        return self._take(len(self.text))


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def completion_body(req: ApiRequest, rid: str, created: int, text: str, finish_reason: str,
                    prompt_tokens: int, token_ids: list[int]) -> dict[str, Any]:
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(token_ids),
             "total_tokens": prompt_tokens + len(token_ids)}
    if req.kind == "chat":
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                  "logprobs": None, "finish_reason": finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    if req.return_token_ids:
        choice["token_ids"] = list(token_ids)
    return {"id": rid, "object": obj, "created": created, "model": req.model, "choices": [choice], "usage": usage}


def chunk_body(req: ApiRequest, rid: str, created: int, text: str | None, finish_reason: str | None = None,
               first: bool = False, token_id: int | None = None) -> dict[str, Any]:
    """One streamed chunk; text None and finish_reason None never happen together."""
    if req.kind == "chat":
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    if req.return_token_ids and token_id is not None:
        choice["token_ids"] = [token_id]
    return {"id": rid, "object": obj, "created": created, "model": req.model, "choices": [choice]}


def usage_chunk(req: ApiRequest, rid: str, created: int, prompt_tokens: int, completion_tokens: int) -> dict:
    obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": req.model, "choices": [],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def models_body(model_ids: tuple[str, ...], created: int | None = None) -> dict[str, Any]:
    t = int(created if created is not None else time.time())
    return {"object": "list", "data": [{"id": m, "object": "model", "created": t, "owned_by": "coel"}
                                       for m in model_ids]}


def sse(doc: dict[str, Any] | str) -> bytes:
    """One Server-Sent Event line pair."""
    data = doc if isinstance(doc, str) else json.dumps(doc, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


# entry error codes (nodes.protocol.ErrorCode values) -> HTTP status
STATUS_OF_ENTRY_ERROR = {"malformed": 400, "busy": 503, "unavailable": 503, "internal": 500}
