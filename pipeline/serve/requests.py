"""What a completion request to a served specialist must be, checked before any work (a refusal is a RequestError:
an HTTP status and a message for the client). Light on purpose: the GGUF server's process (serve/gguf_server.py)
imports it without the pipeline's model code."""

from __future__ import annotations


class RequestError(Exception):
    """A request the server cannot take: its HTTP status and a message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status

    def __reduce__(self):  # intact across processes (Exception's own pickling would call cls(message))
        return (type(self), (self.status, str(self)))


def check_request(body: dict, chat: bool, one_answer: bool = True) -> None:
    """Refuse (400) what the server cannot answer as asked, before any work: every field it reads, typed.
    one_answer: the server answers one input with one answer (no prompt lists, n: 1)."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(400, f"model: {model!r} is not a model name (a string)")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, f"stream: {stream!r} is not true or false")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise RequestError(400, 'stream_options: give an object, e.g. {"include_usage": true}')
    max_tokens(body, 1)  # its type, whatever the server's default
    n = body.get("n", 1)
    if one_answer and (n != 1 or isinstance(n, bool)):
        raise RequestError(400, f"n: {n!r}; this server gives one answer per request (n: 1)")
    if chat:
        turns = body.get("messages")
        if not isinstance(turns, list) or not turns:
            raise RequestError(400, 'messages: give a list of turns, e.g. [{"role": "user", "content": "..."}]')
        for i, turn in enumerate(turns):
            if not (isinstance(turn, dict) and isinstance(turn.get("role"), str)):
                raise RequestError(400, f"messages[{i}]: each turn needs a role (a string) and a content")
            content_text(turn.get("content"), f"messages[{i}].content")
    elif "prompt" in body and not isinstance(body["prompt"], str) and (one_answer or not _texts(body["prompt"])):
        raise RequestError(400, "prompt: give one prompt, a string (this server answers one input per request)")
    fields = body.get("fields")
    if fields is not None:
        if not isinstance(fields, dict):
            raise RequestError(400, 'fields: give an object of the prompt template\'s fields, e.g. {"text": "..."}')
        for name, value in fields.items():
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                raise RequestError(400, f"fields.{name}: {value!r} is not text")


def content_text(content, where: str = "content") -> str:
    """A message's text: a string, or OpenAI's list of content parts of type text (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str) for part in content
    ):
        return "".join(part["text"] for part in content)
    raise RequestError(400, f'{where}: give text: a string, or a list of {{"type": "text", "text": ...}} parts')


def _texts(prompt) -> bool:
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(p, str) for p in prompt)


def max_tokens(body: dict, default: int) -> int:
    value = body.get("max_tokens", body.get("max_completion_tokens"))
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise RequestError(400, f"max_tokens: {value!r} is not a positive whole number")
    return value
