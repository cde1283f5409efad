"""OpenAI request bodies -> what routing needs to know about them.

Parsing is strict where a malformed body would fail at the engine anyway (the client gets
a 400 now, with a reason), and lenient about everything routing does not read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

COMPLETIONS_PATH = "/v1/completions"
CHAT_PATH = "/v1/chat/completions"
ROUTED_PATHS = frozenset({COMPLETIONS_PATH, CHAT_PATH})


class RequestError(Exception):
    """A client error, answered at once with an OpenAI-style JSON body."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code

    def body(self) -> bytes:
        return msgspec.json.encode(
            {"error": {"message": self.message, "type": "invalid_request_error", "param": self.param, "code": self.code}}
        )


@dataclass(frozen=True, slots=True)
class RoutingRequest:
    """The parts of a completion or chat request that decide where its KV cache lives."""

    model: str
    kind: Literal["completion", "chat"]
    prompt: str | None = None
    token_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    tools: list[Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    subset: frozenset[str] | None = None
    """The proxy's subset hint (ip:port endpoints this request may go to), if it sent one."""
    fingerprint: int = 0
    """Hash of the path and the body bytes: the same bytes always mean the same prompt, so a
    repeated request finds its block keys without rendering or tokenizing (0: none)."""

FINGERPRINT_MAX_BYTES = 256 * 1024
"""Bodies up to this size get a fingerprint (hashing more costs more than it saves)."""


REFUSED_TEMPLATE_KWARGS = frozenset({"chat_template", "tokenize"})
"""chat_template_kwargs vLLM refuses (400): the template and tokenizing are the server's choice."""
OVERRIDABLE_TEMPLATE_ARGS = {"add_generation_prompt": True, "continue_final_message": False, "tools": None}
"""Arguments we pass to the chat template ourselves (with their defaults), which
chat_template_kwargs may override."""


def is_routed_path(path: str) -> bool:
    return path.split("?", 1)[0] in ROUTED_PATHS


def parse(path: str, body: bytes, *, max_messages: int = 1 << 30) -> RoutingRequest:
    """Parse a body sent to one of ROUTED_PATHS; raise RequestError for anything invalid."""
    try:
        data = msgspec.json.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # invalid UTF-8 inside a string too
        raise RequestError(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise RequestError("request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise RequestError("request body must be a JSON object")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("'model' is required and must be a non-empty string", param="model")
    route = path.split("?", 1)[0]
    fingerprint = (hash(("body", route, body)) or 1) if len(body) <= FINGERPRINT_MAX_BYTES else 0
    if route == CHAT_PATH:
        return _chat(model, data, max_messages, fingerprint)
    return _completion(model, data, fingerprint)


def _completion(model: str, data: dict[str, Any], fingerprint: int = 0) -> RoutingRequest:
    prompt = data.get("prompt")
    if isinstance(prompt, str):
        return RoutingRequest(model=model, kind="completion", prompt=prompt, fingerprint=fingerprint)
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, str) and all(isinstance(p, str) for p in prompt):
            return RoutingRequest(model=model, kind="completion", prompt=first, fingerprint=fingerprint)
        if _is_token_list(prompt):
            return RoutingRequest(model=model, kind="completion", token_ids=prompt, fingerprint=fingerprint)
        if isinstance(first, list) and all(_is_token_list(p) and p for p in prompt):
            return RoutingRequest(model=model, kind="completion", token_ids=first, fingerprint=fingerprint)
    raise RequestError(
        "'prompt' is required: a string, a list of strings, a list of token ids or a list of token id lists",
        param="prompt",
    )


MAX_TOKEN_ID = 2**32 - 1
"""Token ids are packed as 4-byte unsigned ints into block keys (vocabularies are far smaller)."""


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and all(type(t) is int and 0 <= t <= MAX_TOKEN_ID for t in value)


def _chat(model: str, data: dict[str, Any], max_messages: int, fingerprint: int = 0) -> RoutingRequest:
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' is required and must be a non-empty list", param="messages")
    if len(messages) > max_messages:
        raise RequestError(f"too many messages: {len(messages)} (at most {max_messages})", param="messages",
                           code="too_many_messages")
    rendered = [_message(i, m) for i, m in enumerate(messages)]
    kwargs = data.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise RequestError("'chat_template_kwargs' must be an object", param="chat_template_kwargs")
    refused = sorted(REFUSED_TEMPLATE_KWARGS & kwargs.keys())
    if refused:  # vLLM answers 400 to these as well
        raise RequestError(f"chat_template_kwargs may not set {', '.join(refused)}", param="chat_template_kwargs")
    # vLLM lets chat_template_kwargs override the arguments it passes itself, so they decide here too.
    kwargs = dict(kwargs)
    options = {name: kwargs.pop(name) if name in kwargs else data.get(name, default)
               for name, default in OVERRIDABLE_TEMPLATE_ARGS.items()}
    tools = options["tools"]
    if tools is not None and not isinstance(tools, list):
        raise RequestError("'tools' must be a list", param="tools")
    return RoutingRequest(
        model=model,
        kind="chat",
        messages=rendered,
        tools=tools or None,
        add_generation_prompt=bool(options["add_generation_prompt"]),
        continue_final_message=bool(options["continue_final_message"]),
        chat_template_kwargs=kwargs,
        fingerprint=fingerprint,
    )


def _message(index: int, message: Any) -> dict[str, Any]:
    """Flatten content parts to text the way vLLM does for string-content chat templates."""
    param = f"messages[{index}]"
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise RequestError(f"{param} must be an object with a string 'role'", param=param)
    content = message.get("content")
    if content is None or isinstance(content, str):
        return message
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("type"), str):
                if part["type"] == "text":
                    if not isinstance(part.get("text"), str):
                        raise RequestError(f"{param}.content: a text part needs a string 'text'", param=param)
                    texts.append(part["text"])
            else:
                raise RequestError(f"{param}.content parts must be objects with a 'type'", param=param)
        return {**message, "content": "\n".join(texts)}
    raise RequestError(f"{param}.content must be a string or a list of content parts", param=param)
