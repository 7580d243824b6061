"""What a request may hand a public server: files only as uploads, bodies of bounded size, and only the
endpoints that are API.

An ASGI middleware in front of the Gradio app (``launch(app_kwargs={"middleware": [...]})``), so every
route is covered, public or private, including ones added later:

- a request body larger than ``max_body_bytes`` is refused (413) from its Content-Length, or while it
  streams in, before it is held in memory;
- a file payload (a JSON object with a ``"path"``, as Gradio's FileData) that names anything but a file
  in Gradio's upload folder is emptied before Gradio sees it, so the file input refuses it with one
  message that says nothing about the path;
- ``/gradio_api/call/<name>`` (and ``/run``, ``/api``) answer only for the public API names: Gradio 6
  serves every named handler there, ``api_visibility="private"`` only hides it from the docs.

The browser's own routes (``/gradio_api/queue/join``, and ``/gradio_api/run/predict`` for unqueued
handlers, each with a handler's index) cannot be told apart from a browser, so the UI handlers take only
what the checks above let through.
"""

from __future__ import annotations

import json
import os
import re
from typing import Callable, Iterable

#: The one answer to a file payload that is not an upload of this server (same for any path).
FILE_REFUSED = ("control_image must be an image uploaded with the request (gradio_client: handle_file(path)); "
                "this server opens no path and fetches no URL that a request names")
#: ``/gradio_api/run/predict``: how the browser runs an unqueued handler (by its index, as queue/join).
BROWSER_ROUTES = {"predict"}
_API_ROUTE = re.compile(r"^(?:/gradio_api)?/(?:call/v2|call|run|api)/([^/]+)/?")
_JSON_ROUTES = re.compile(r"^(?:/gradio_api)?/(?:queue/join|call/|run/|api/|component_server)")


def upload_folder() -> str:
    """Gradio's upload folder ($GRADIO_TEMP_DIR, else <tmp>/gradio), where every upload lands."""
    from gradio.utils import get_upload_folder

    return os.path.realpath(get_upload_folder())


def is_upload(path) -> bool:
    """Whether ``path`` is a regular file inside Gradio's upload folder (symlinks and ``..`` resolved)."""
    if not isinstance(path, str) or not path or "\x00" in path:
        return False
    real, folder = os.path.realpath(path), upload_folder()
    return real.startswith(folder + os.sep) and os.path.isfile(real)


def without_server_paths(data):
    """``data`` (a request's JSON) with every file payload (an object with a ``"path"``, nested anywhere)
    that is not an upload replaced by ``{"path": ""}``: nothing downstream can open what it named, and the
    file input refuses it with :data:`FILE_REFUSED` through Gradio's ordinary error channel (a message the
    browser and gradio_client show). Returns (data, how many were replaced)."""
    if isinstance(data, dict):
        path = data.get("path")
        if "path" in data and path is not None and not is_upload(path):
            return {"path": ""}, 1
        pairs = [(key, *without_server_paths(value)) for key, value in data.items()]
        return {key: value for key, value, _ in pairs}, sum(n for _, _, n in pairs)
    if isinstance(data, list):
        pairs = [without_server_paths(value) for value in data]
        return [value for value, _ in pairs], sum(n for _, n in pairs)
    return data, 0


class RequestGuard:
    """ASGI middleware: body size limit, upload-only file payloads, API routes for public names only.

    Args:
        app: the ASGI app behind it.
        max_body_bytes: the largest request body accepted.
        public_api: returns the API names (without "/") that ``/gradio_api/call/<name>`` may serve.
    """

    def __init__(self, app, max_body_bytes: int, public_api: Callable[[], set[str]]):
        self.app, self.max_body_bytes, self.public_api = app, int(max_body_bytes), public_api

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        api = _API_ROUTE.match(path)
        if api and api.group(1) not in self.public_api() | BROWSER_ROUTES:
            names = ", ".join(f"/{name}" for name in sorted(self.public_api()))
            return await _refuse(send, 404, f"no API endpoint /{api.group(1)}; this server's API: {names}")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return await _refuse(send, 413, self._too_large(length.decode("latin-1")))
        if scope.get("method") != "POST" or not _JSON_ROUTES.match(path):  # uploads: Gradio's max_file_size
            return await self.app(scope, self._bounded(receive), send)
        body = await self._read(receive)
        if body is None:
            return await _refuse(send, 413, self._too_large(f"more than {self.max_body_bytes}"))
        try:
            payload = json.loads(body) if body else None
        except (ValueError, UnicodeDecodeError):
            return await self.app(scope, _replay(body), send)  # not JSON: Gradio answers it
        payload, replaced = without_server_paths(payload)
        if replaced:
            body = json.dumps(payload).encode()
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
            scope = {**scope, "headers": headers + [(b"content-length", str(len(body)).encode())]}
        return await self.app(scope, _replay(body), send)

    def _too_large(self, got: str) -> str:
        return f"the request body must be at most {self.max_body_bytes} bytes on this server, got {got} bytes"

    async def _read(self, receive) -> bytes | None:
        """The whole body, or None as soon as it grows past the limit (nothing more is kept)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        return b"".join(chunks)

    def _bounded(self, receive):
        """``receive`` that ends a body streamed without Content-Length once it passes the limit (the app
        sees a client that went away)."""
        seen = 0

        async def bounded():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    return {"type": "http.disconnect"}
            return message

        return bounded


def _replay(body: bytes):
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


async def _refuse(send, status: int, message: str) -> None:
    body = json.dumps({"error": message, "detail": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
