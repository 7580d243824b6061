"""The demo attacked over raw HTTP on loopback (httpx, not only gradio_client), as issue 10 found it:

S1  a file input naming a server path (with or without Gradio's ``meta``, existing or not, a URL, a way
    out of the upload folder) is refused with one message, in every file input of every endpoint,
    public (``/gradio_api/call/<name>``) and private (the browser's ``/gradio_api/queue/join``);
S2  the UI's private handlers are not callable as API;
S4  a request body over the limit is refused before it is read (64 MB, with and without Content-Length);
S3  (per-model limits) is tested in test_limits.py.
"""

import io
import json
import os
import uuid

import httpx
import numpy as np
import pytest
from PIL import Image

from app_server import running_demo
from seg_core.guard import FILE_REFUSED, is_upload, without_server_paths

UI_HANDLERS = ("ui_generate", "ui_compare", "ui_sweep", "ui_control_map")


@pytest.fixture(scope="module")
def server():
    return running_demo()


@pytest.fixture(scope="module")
def secret_png(tmp_path_factory):
    """A PNG outside every folder Gradio allows, with a pattern its Canny map would show."""
    folder = tmp_path_factory.mktemp("secret")
    image = np.zeros((64, 64, 3), np.uint8)
    image[16:48, 16:48] = 255
    path = folder / "secret.png"
    Image.fromarray(image).save(path)
    return str(path)


def attack_payloads(secret_png):
    """File payloads naming server paths: (what, payload)."""
    from gradio.utils import get_upload_folder

    meta = {"_type": "gradio.FileData"}
    upload = get_upload_folder()
    paths = {
        "existing system file": "/etc/passwd",
        "existing PNG outside the allowed folders": secret_png,
        "missing file": "/no/such/file.png",
        "relative path to the app": "app.py",
        "out of the upload folder": os.path.join(upload, "..", "..", "etc", "passwd"),
        "missing file in the upload folder": os.path.join(upload, "no-such-upload.png"),
        "the upload folder itself": upload,
        "a URL": "http://127.0.0.1:9/x.png",
        "a file URL": "file:///etc/passwd",
    }
    for what, path in paths.items():
        yield f"{what}, bare string", path
        yield f"{what}, no meta", {"path": path}
        yield f"{what}, with meta", {"path": path, "meta": meta}
        yield f"{what}, with url and size", {"path": path, "url": path, "size": 1, "orig_name": "x.png",
                                             "meta": meta}


def api_call(url, api_name, data):
    """POST /gradio_api/call/<api_name> with ``data`` and read the event stream: (kind, payload)."""
    response = httpx.post(f"{url}gradio_api/call/{api_name}", json={"data": data}, timeout=30)
    if response.status_code != 200:
        return response.status_code, response.json()
    event_id = response.json()["event_id"]
    kind = None
    with httpx.stream("GET", f"{url}gradio_api/call/{api_name}/{event_id}", timeout=120) as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and kind in ("complete", "error"):
                return kind, json.loads(line.split(":", 1)[1])
    return kind, None


def queue_call(url, fn_index, data):
    """The browser's route: POST /gradio_api/queue/join with a handler's index, then read its session's
    event stream until that event completes: (success, output)."""
    session = uuid.uuid4().hex[:11]
    body = {"data": data, "fn_index": fn_index, "session_hash": session, "event_data": None, "trigger_id": None}
    joined = httpx.post(f"{url}gradio_api/queue/join", json=body, timeout=30)
    assert joined.status_code == 200, joined.text
    with httpx.stream("GET", f"{url}gradio_api/queue/data", params={"session_hash": session}, timeout=120) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed":
                    return message["success"], message["output"]
    raise AssertionError("no process_completed message")


def handler_index(demo, name):
    return next(i for i, fn in demo.fns.items() if getattr(fn.fn, "__name__", None) == name)


def ui_inputs(demo, index, control_image):
    """The inputs the browser sends to handler ``index``, read from its event's components (their defaults,
    1 step), with ``control_image`` in every control image slot and canny in every control type slot."""
    inputs = []
    for block in demo.fns[index].inputs:
        kind, elem = type(block).__name__, block.elem_id or ""
        if kind == "ControlImage":
            inputs.append(control_image)
        elif elem.startswith("control-type"):
            inputs.append("canny")
        elif elem == "steps":
            inputs.append(1)
        else:
            inputs.append("" if block.value is None and kind == "Textbox" else block.value)
    assert "ControlImage" in {type(block).__name__ for block in demo.fns[index].inputs}
    return inputs


def api_inputs(url, api_name, **values):
    info = httpx.get(f"{url}gradio_api/info", timeout=30).json()["named_endpoints"][f"/{api_name}"]
    return [values.get(p["parameter_name"], p.get("parameter_default")) for p in info["parameters"]]


def test_server_paths_are_refused_by_every_public_file_input_with_one_message(server, secret_png):
    demo, url = server
    file_inputs = {}
    for name, endpoint in httpx.get(f"{url}gradio_api/info", timeout=30).json()["named_endpoints"].items():
        file_inputs[name] = [p["parameter_name"] for p in endpoint["parameters"] if p["component"] == "Image"]
    images = ["control_image", "control_image_2", "ip_adapter_image"]  # (an image prompt: refused without adapters too)
    assert file_inputs == {"/generate": images, "/compare": images, "/sweep": images}
    for name, inputs in file_inputs.items():
        for parameter in inputs:
            for what, payload in attack_payloads(secret_png):
                data = api_inputs(url, name[1:], prompt="", steps=1, control_type="canny", **{parameter: payload})
                kind, answer = api_call(url, name[1:], data)
                assert (kind, answer["error"]) == ("error", FILE_REFUSED), (name, what, answer)


@pytest.mark.parametrize("handler", UI_HANDLERS)
def test_server_paths_are_refused_by_the_ui_handlers_on_the_browsers_route(server, secret_png, handler):
    demo, url = server
    index = handler_index(demo, handler)
    for what, payload in attack_payloads(secret_png):
        success, output = queue_call(url, index, ui_inputs(demo, index, payload))
        assert not success and output["error"] == FILE_REFUSED, (handler, what, output)
    # The same handler with a real upload works (the refusal is not of everything).
    upload = httpx.post(f"{url}gradio_api/upload", timeout=30,
                        files={"files": ("c.png", open(secret_png, "rb"), "image/png")}).json()[0]
    assert is_upload(upload)
    success, output = queue_call(url, index, ui_inputs(demo, index, {"path": upload, "meta": {"_type": "gradio.FileData"}}))
    assert success, output
    control_map = output["data"][-1] if handler != "ui_control_map" else output["data"][0]
    assert control_map is not None and is_upload(control_map["path"])
    edges = np.asarray(Image.open(control_map["path"]).convert("L"))
    assert edges[13:19, 20:44].max() == 255 and edges[30, 30] == 0  # the square's edge, its flat inside


def test_gradio_client_gets_the_same_message_for_a_plain_dict(server):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(server[1], verbose=False)
    # (With Gradio's meta, gradio_client uploads the file from where the client runs: not a server path.)
    for payload in ({"path": "/etc/passwd"}, "/etc/passwd", {"url": "http://127.0.0.1:9/x.png"}, 7, ["/etc/passwd"]):
        with pytest.raises(AppError) as error:
            client.predict(prompt="", steps=1, control_type="canny", control_image=payload, api_name="/generate")
        assert str(error.value) == FILE_REFUSED


@pytest.mark.parametrize("route", ["call", "call/v2", "run", "api"])
def test_ui_handlers_are_not_api(server, route):
    demo, url = server
    public = {fn.api_name for fn in demo.fns.values() if fn.api_visibility == "public"}
    assert public == {"generate", "compare", "sweep"}
    assert "predict" not in {fn.api_name for fn in demo.fns.values()}  # the browser's route: no handler's name
    for fn in demo.fns.values():
        if fn.api_visibility == "public":
            continue
        response = httpx.post(f"{url}gradio_api/{route}/{fn.api_name}", json={"data": []}, timeout=30)
        assert response.status_code == 404, (fn.api_name, response.text)
        assert "this server's API: /compare, /generate, /sweep" in response.json()["error"]
    info = httpx.get(f"{url}gradio_api/info", timeout=30).json()
    assert set(info["named_endpoints"]) == {"/generate", "/compare", "/sweep"} and not info["unnamed_endpoints"]


def test_control_image_is_documented_as_an_upload(server):
    _, url = server
    endpoints = httpx.get(f"{url}gradio_api/info", timeout=30).json()["named_endpoints"]
    for name in ("/generate", "/compare", "/sweep"):
        (parameter,) = [p for p in endpoints[name]["parameters"] if p["parameter_name"] == "control_image"]
        text = json.dumps(parameter)
        assert "handle_file(path)" in text and "server paths and URLs are refused" in text
        assert "publicly available" not in text and "http" not in text


def test_a_64_mb_body_is_refused_before_it_is_read(server):
    demo, url = server
    limit = demo.studio.limits.max_body_bytes
    assert 10 * 2**20 < limit < 20 * 2**20  # a few MB above the 10 MB upload limit
    big = b"[" + b"0," * (32 * 2**20 - 1) + b"0]"  # 64 MB of valid JSON
    for route in ("gradio_api/queue/join", "gradio_api/call/generate", "gradio_api/upload", "gradio_api/info"):
        response = httpx.post(f"{url}{route}", content=big, timeout=60, headers={"content-type": "application/json"})
        assert response.status_code == 413, (route, response.status_code)
        assert f"at most {limit} bytes on this server, got {len(big)} bytes" in response.json()["error"]

    def chunks():  # no Content-Length: refused once the limit is passed
        for _ in range(64):
            yield b" " * 2**20

    response = httpx.post(f"{url}gradio_api/queue/join", content=chunks(), timeout=60,
                          headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert f"at most {limit} bytes" in response.json()["error"]
    # A body under the limit still reaches Gradio, and the server goes on serving.
    kind, answer = api_call(url, "generate", api_inputs(url, "generate", prompt="", seed=4, steps=1))
    assert kind == "complete" and answer[1]["seed"] == 4


def test_a_base64_upload_at_the_size_limit_fits_the_body_limit(server):
    demo, url = server
    limits = demo.studio.limits
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1200, 1200, 3), np.uint8))
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG")
    assert buffer.tell() > 4 * 2**20
    import base64

    data_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    assert len(data_url) < limits.max_body_bytes
    kind, answer = api_call(url, "generate", api_inputs(url, "generate", prompt="", seed=1, steps=1,
                                                         control_type="canny", control_image={"url": data_url}))
    assert kind == "complete" and answer[1]["settings"]["control_type"] == "canny", answer


def test_without_server_paths_replaces_only_what_is_not_an_upload(tmp_path):
    from gradio.utils import get_upload_folder

    os.makedirs(get_upload_folder(), exist_ok=True)
    upload = os.path.join(get_upload_folder(), f"test-{uuid.uuid4().hex}.png")
    open(upload, "wb").close()
    try:
        body = {"data": [1, "text", {"path": upload}, [{"path": "/etc/passwd", "meta": {}}], {"path": None}]}
        cleaned, replaced = without_server_paths(body)
        assert replaced == 1
        assert cleaned == {"data": [1, "text", {"path": upload}, [{"path": ""}], {"path": None}]}
    finally:
        os.remove(upload)
    os.symlink("/etc/passwd", tmp_path / "link")
    assert not is_upload(str(tmp_path / "link")) and not is_upload("x\x00y") and not is_upload(None)
