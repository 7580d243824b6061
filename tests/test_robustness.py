"""A public demo meets every kind of input, many users at once, faults and cancellations.

Library and service checks run without a server; the rest drive the tiny app through gradio_client and
raw HTTP (the API path a script or an attacker uses). Every request is 1-2 steps at 64x64.
"""

import base64
import io
import json
import math
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from app_server import running_demo
from conftest import generator
from seg_core import StableDiffusionXLSEGPipeline, load_pipeline
from seg_core.studio import Limits, Studio, load_control_image, read_png_settings

STEPS = 2


def processors(pipe):
    return dict(pipe.unet.attn_processors)


def png_bytes(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save)
    return buffer.getvalue()


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


# ---- the library: ValueError naming the value and the range ----------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(height=4104), r"height must be a multiple of 8 in \[8, 4096\], got 4104"),
    (dict(width=True), r"width must be a multiple of 8 in \[8, 4096\], got True"),
    (dict(num_images_per_prompt=0), r"num_images_per_prompt must be an integer in \[1, 64\], got 0"),
    (dict(num_images_per_prompt=2.0), r"num_images_per_prompt must be an integer in \[1, 64\], got 2.0"),
    (dict(prompt=["a"] * 33, num_images_per_prompt=2), r"at most 64 images, got 33 x 2"),
    (dict(prompt=123), r"prompt must be a string or a non-empty list of strings, got 123"),
    (dict(prompt=[]), r"prompt must be a string or a non-empty list of strings, got \[\]"),
    (dict(prompt="x" * 10_001), r"prompt must be at most 10000 characters, got 10001"),
    (dict(negative_prompt=[None]), r"negative_prompt must be a string or a non-empty list of strings"),
    (dict(prompt_2="y" * 20_000), r"prompt_2 must be at most 10000 characters, got 20000"),
    (dict(eta=float("nan")), r"eta must be a finite number in \[0, 1\], got nan"),
    (dict(eta=2.0), r"eta must be in \[0, 1\], got 2.0"),
    (dict(guidance_rescale=float("inf")), r"guidance_rescale must be a finite number in \[0, 1\], got inf"),
    (dict(guidance_scale=1e9), r"guidance_scale must be in \[0, 100\], got 1000000000.0"),
    (dict(guidance_scale="5"), r"guidance_scale must be a finite number in \[0, 100\], got '5'"),
    (dict(denoising_end=0.0), r"denoising_end must be None or a fraction in \(0, 1\], got 0.0"),
    (dict(clip_skip=-1), r"clip_skip must be None or an integer >= 0, got -1"),
    (dict(perturbation_guidance_start=float("nan")), r"perturbation_guidance_start must be a fraction in \[0, 1\], got nan"),
    (dict(seg_applied_layers=["m0", 5]), r"layer names are strings, got 5"),
    (dict(seg_blur_sigma=float("-inf")), r"seg_blur_sigma must be a number >= 0 or 'inf', got -inf"),
    (dict(pag_scale=-1), r"pag_scale must be in \[0, 100\], got -1"),
    (dict(pag_scale=1.0, pag_adaptive_scale=float("nan")), r"pag_adaptive_scale must be a finite number"),
])
def test_library_refuses_bad_input_by_name_and_range(pipe, kwargs, message):
    before = processors(pipe)
    kwargs = {"prompt": "a red bicycle", **kwargs}
    with pytest.raises(ValueError, match=message):
        pipe(generator=generator(), num_inference_steps=1, output_type="latent", **kwargs)
    assert processors(pipe) == before


def test_library_accepts_numpy_scalars(pipe):
    out = pipe("x", generator=generator(), num_inference_steps=1, output_type="latent",
               guidance_scale=np.float32(1.0), seg_scale=np.float64(2.0)).images
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("image, message", [
    ("assets/control_house.png", r"image must be a PIL image, numpy array or torch tensor .* got str"),
    (Image.new("RGB", (4, 64)), r"image sides must be in \[8, 4096\] pixels, got 4x64"),
    (np.zeros((8, 5000, 3), np.uint8), r"got 5000x8"),
    ([], r"got \[\]"),
])
def test_controlnet_pipeline_refuses_bad_control_images(components, controlnet, image, message):
    pipe = StableDiffusionXLSEGPipeline(**components, controlnet=controlnet)
    with pytest.raises(ValueError, match=message):
        pipe("x", image=image, num_inference_steps=1, output_type="latent")


# ---- control images: decoded defensively --------------------------------------------------------------


def test_control_images_of_every_mode_become_rgb():
    gray16 = Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16))
    assert gray16.mode == "I;16"
    rgb = load_control_image(png_bytes(gray16))  # a 16-bit PNG file: scaled to 8 bits, not clipped white
    assert rgb.mode == "RGB" and rgb.getextrema()[0][0] == 0 and rgb.getextrema()[0][1] > 200
    assert np.asarray(rgb).mean() < 200
    transparent = Image.new("RGBA", (32, 32), (255, 0, 0, 0))
    assert load_control_image(png_bytes(transparent)).getpixel((0, 0)) == (255, 255, 255)  # on white
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 0] * 256)
    assert load_control_image(png_bytes(palette, transparency=0)).getpixel((0, 0)) == (255, 255, 255)
    for mode in ("L", "LA", "1", "CMYK", "F", "I"):
        assert load_control_image(Image.new(mode, (16, 16))).mode == "RGB", mode


@pytest.mark.parametrize("data, message", [
    (b"", "empty file"),
    (b"this is not an image at all", "not a readable image"),
    (png_bytes(Image.new("RGB", (64, 64), "red"))[:80], "corrupt or truncated"),
    (png_bytes(Image.new("RGB", (4, 4))), r"sides must be in \[8, 256\] pixels, got 4x4"),
    (png_bytes(Image.new("L", (300, 16))), r"got 300x16"),
    (png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8))), "at most 0.05 MB"),
])
def test_bad_control_images_are_refused_clearly(data, message):
    with pytest.raises(ValueError, match=message):
        load_control_image(data, Limits(max_image_side=256, max_upload_mb=0.05))


def test_a_decompression_bomb_is_refused_from_its_header(tmp_path):
    # A PNG whose header claims 100000 x 100000 pixels; refused before decoding a single row.
    small = png_bytes(Image.new("L", (8, 8)))
    header = bytearray(small)
    header[16:24] = (100_000).to_bytes(4, "big") * 2  # IHDR width, height (the CRC is now wrong too)
    path = tmp_path / "bomb.png"
    path.write_bytes(bytes(header))
    with pytest.raises(ValueError, match=r"100000x100000|not a readable image|corrupt"):
        load_control_image(str(path))


# ---- the service: operator limits ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_studio():
    return Studio("tiny", limits=Limits(max_pixels=64 * 64, max_steps=4, max_prompt_chars=20, max_layer_names=3))


@pytest.mark.parametrize("values, message", [
    (dict(width=72, height=64), r"width x height must be at most 4096 pixels \(64x64\) for this model on this server \(the operator's "
                                 r"--max-pixels\), got 72x64 = 4608"),
    (dict(width=0), r"width must be a multiple of 8 in \[8, 4096\], got 0"),
    (dict(height=60), r"height must be a multiple of 8 in \[8, 4096\], got 60"),
    (dict(width=float("nan")), r"width must be a multiple of 8 .* got nan"),
    (dict(steps=5), r"steps must be an integer in \[1, 4\], got 5"),
    (dict(steps=float("inf")), r"steps must be an integer in \[1, 4\], got inf"),
    (dict(prompt="x" * 21), r"prompt must be at most 20 characters, got 21"),
    (dict(negative_prompt=["x"]), r"negative_prompt must be a string, got list"),
    (dict(seed=float("nan")), r"seed must be an integer in \[0, 4294967295\] .* got nan"),
    (dict(seed=float("inf")), r"seed must be an integer .* got inf"),
    (dict(seed=2**40), r"seed must be an integer .* got 1099511627776"),
    (dict(seg_applied_layers=["mid", "m9"]), r"unknown attention layer 'm9'; allowed"),
    (dict(seg_applied_layers=["m0"] * 4), r"at most 3 layers, got 4"),
    (dict(seg_applied_layers="x" * 5000), r"unknown attention layer 'xxxxxxxxxxxxxxxx'\.\.\."),
    (dict(seg_blur_sigma=float("nan")), r"seg_blur_sigma must be a number >= 0 or 'inf', got nan"),
])
def test_studio_refuses_what_the_operator_does_not_allow(small_studio, values, message):
    with pytest.raises(ValueError, match=message):
        small_studio.settings(**{"prompt": "x", **values})


def test_studio_size_presets_fit_the_pixel_budget(small_studio):
    presets = small_studio.size_presets
    assert presets[0] == (64, 64) and all(w * h <= 64 * 64 for w, h in presets)
    assert Studio("tiny", limits=Limits(max_pixels=1000)).size_presets == [(24, 24)]
    with pytest.raises(ValueError, match="max_steps must be at most 1000"):
        Limits(max_steps=5000)


# ---- the app: one shared server (default limits), and small ones ---------------------------------------


@pytest.fixture(scope="module")
def server():
    demo, url = running_demo()
    return demo, url


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server[1], verbose=False)


def raw_call(url: str, api_name: str, **data):
    """Call an endpoint through the HTTP API with exactly ``data`` (no client-side upload): returns
    ("complete" | "error", payload)."""
    config = httpx.get(f"{url}gradio_api/info", timeout=30).json()["named_endpoints"][f"/{api_name}"]
    names = [p["parameter_name"] for p in config["parameters"]]
    defaults = {p["parameter_name"]: p.get("parameter_default") for p in config["parameters"]}
    body = {"data": [data.get(name, defaults[name]) for name in names]}
    content = json.dumps(body, allow_nan=True)  # NaN and Infinity as JavaScript clients may send them
    event_id = httpx.post(f"{url}gradio_api/call/{api_name}", content=content, timeout=30,
                          headers={"Content-Type": "application/json"}).json()["event_id"]
    kind, payload = None, None
    with httpx.stream("GET", f"{url}gradio_api/call/{api_name}/{event_id}", timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and kind in ("complete", "error"):
                payload = line.split(":", 1)[1].strip()
                break
    return kind, payload


@pytest.mark.parametrize("bad, named", [
    (dict(width=2048, height=2056), "at most 16384 pixels (128x128) for this model on this server (4x the area "
                                   "of its largest training size), got 2048x2056"),
    (dict(width=4104), "width must be a multiple of 8 in [8, 4096], got 4104"),
    (dict(steps=10**6), "steps must be an integer in [1, 150], got 1000000"),
    (dict(prompt="x" * 1001), "prompt must be at most 1000 characters, got 1001"),
    (dict(guidance_scale=1e9), "guidance_scale must be in [0, 100]"),
    (dict(seg_scale=-3), "seg_scale must be in [0, 100], got -3"),
    (dict(perturbation_guidance_end=2), "perturbation_guidance_end must be a fraction in [0, 1], got 2"),
    (dict(controlnet_conditioning_scale=99, control_type="canny",
          control_image="assets/control_house.png"), "controlnet_conditioning_scale must be in [0, 10], got 99"),
    (dict(seed=2**40), "seed must be an integer"),
    (dict(seg_applied_layers=["u99"]), "unknown attention layer 'u99'"),
])
def test_app_refuses_bad_input_naming_value_and_range(client, bad, named):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    if "control_image" in bad:
        bad = {**bad, "control_image": handle_file(bad["control_image"])}
    with pytest.raises(AppError) as error:
        client.predict(**{"prompt": "x", "steps": 1, **bad}, api_name="/generate")
    assert named in str(error.value)


def test_app_refuses_non_finite_numbers_sent_as_raw_json(server):
    _, url = server
    for name in ("guidance_scale", "seg_scale", "width", "steps", "seed"):
        kind, payload = raw_call(url, "generate", **{"prompt": "x", "steps": 1, name: float("nan")})
        assert kind == "error" and name in payload and "nan" in payload, (name, payload)


@pytest.mark.parametrize("image, outcome", [
    (Image.new("L", (40, 40), 128), "ok"),
    (Image.new("RGBA", (40, 40), (0, 0, 0, 0)), "ok"),
    (Image.fromarray((np.arange(48 * 48).reshape(48, 48) * 20).astype(np.uint16)), "ok"),
    (Image.new("P", (40, 40)), "ok"),
    (Image.new("RGB", (4, 4)), "sides must be in [8, 4096] pixels, got 4x4"),
    (b"GIF89a definitely not a gif", "not a readable image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not a readable image"),
])
def test_app_control_images_converted_or_refused(client, tmp_path, image, outcome):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    path = tmp_path / "control.png"
    path.write_bytes(image if isinstance(image, bytes) else png_bytes(image))
    call = dict(prompt="", seed=1, steps=1, control_type="canny", control_image=handle_file(str(path)),
                api_name="/generate")
    if outcome == "ok":
        result, info = client.predict(**call)
        assert info["settings"]["control_type"] == "canny" and pixels(result).shape == (64, 64, 3)
    else:
        with pytest.raises(AppError) as error:
            client.predict(**call)
        assert outcome in str(error.value)


def test_server_reads_no_file_and_fetches_no_url_a_request_names(server, client):
    _, url = server
    for path in ("/etc/passwd", "/proc/self/environ", "app.py", "../../etc/hostname"):
        control = {"path": path, "meta": {"_type": "gradio.FileData"}}
        kind, payload = raw_call(url, "generate", prompt="", steps=1, control_type="canny", control_image=control)
        assert kind == "error", (path, payload)
        assert "root:" not in str(payload)
    import http.server

    hits = []  # a URL the server would fetch: nothing may arrive

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(png_bytes(Image.new("RGB", (32, 32))))

        def log_message(self, *args):
            pass

    listener = http.server.HTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=listener.serve_forever, daemon=True).start()
    try:
        target = f"http://127.0.0.1:{listener.server_port}/x.png"
        for control in ({"path": target, "meta": {"_type": "gradio.FileData"}},
                        {"path": target, "url": target, "meta": {"_type": "gradio.FileData"}}):
            kind, payload = raw_call(url, "generate", prompt="", steps=1, control_type="canny", control_image=control)
            assert kind == "error", payload
    finally:
        listener.shutdown()
    assert hits == []
    # Gradio's own file route serves no arbitrary path either.
    for path in ("/etc/passwd", "app.py"):
        assert httpx.get(f"{url}gradio_api/file={path}", timeout=10).status_code in (403, 404)
    _, info = client.predict(prompt="", seed=0, steps=1, api_name="/generate")  # still serving
    assert info["seed"] == 0


def test_no_request_can_choose_a_model(client, server):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    for name, endpoint in endpoints.items():
        params = {p["parameter_name"] for p in endpoint["parameters"]}
        assert not params & {"model", "model_id", "repo", "path", "pretrained_model_name_or_path",
                             "custom_pipeline", "trust_remote_code"}, name
    demo, _ = server
    assert demo.studio.settings(prompt="x", model="attacker/model").model == "tiny"  # overwritten, never loaded


def test_weights_load_from_safetensors_only(tmp_path, pipe):
    folder = tmp_path / "pickled"
    pipe.save_pretrained(folder)
    unet = folder / "unet"
    torch.save(pipe.unet.state_dict(), unet / "diffusion_pytorch_model.bin")  # a pickle: may run code on load
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(Exception, match="safetensors"):
        load_pipeline(str(folder), device="cpu")


def test_upload_size_limit_and_operator_limits_in_the_app():
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    limits = Limits(max_pixels=64 * 64, max_steps=3, max_upload_mb=0.02)
    demo, url = running_demo(limits, 4)
    assert demo.launch_options["max_file_size"] == int(0.02 * 2**20)
    client = Client(url, verbose=False)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), np.uint8))
    big = io.BytesIO()
    noise.save(big, format="PNG")
    path = f"{demo.studio.output_dir}/big-upload.png"
    with open(path, "wb") as file:
        file.write(big.getvalue())
    with pytest.raises(Exception) as error:
        client.predict(prompt="", steps=1, control_type="canny", control_image=handle_file(path),
                       api_name="/generate")
    assert "size" in str(error.value).lower() or "MB" in str(error.value)
    with pytest.raises(AppError, match=r"steps must be an integer in \[1, 3\], got 4"):
        client.predict(prompt="", steps=4, api_name="/generate")
    with pytest.raises(AppError, match="at most 4096 pixels .64x64. for this model on this server"):
        client.predict(prompt="", steps=1, width=72, api_name="/generate")
    _, info = client.predict(prompt="", seed=5, steps=1, api_name="/generate")
    assert info["seed"] == 5


# ---- many users at once ---------------------------------------------------------------------------------


def _call_many(url, requests):
    """Each request from its own client (its own session), all released at once; returns outcomes."""
    from gradio_client import Client

    clients = [Client(url, verbose=False) for _ in requests]
    outcomes = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def call(k):
        barrier.wait()
        try:
            outcomes[k] = ("ok", clients[k].predict(**requests[k], api_name="/generate"))
        except Exception as error:  # noqa: BLE001 - the test inspects it
            outcomes[k] = ("error", error)

    threads = [threading.Thread(target=call, args=(k,)) for k in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads), "a request hung"
    return outcomes


def alone_through_studio(studio, request):
    values = {k: v for k, v in request.items() if k != "api_name"}
    run, _ = studio.generate(studio.settings(**values))
    return run.path


def test_twenty_concurrent_clients_each_get_their_own_image():
    from gradio_client import Client

    demo, url = running_demo(None, 32)
    requests = [dict(prompt=f"p{k % 3}", seed=100 + k, steps=STEPS, seg_blur_sigma=[1, "inf"][k % 2],
                     guidance_scale=[1.0, 3.0][k % 2]) for k in range(20)]
    outcomes = _call_many(url, requests)
    assert [kind for kind, _ in outcomes] == ["ok"] * 20, [o for o in outcomes if o[0] != "ok"]
    alone = Client(url, verbose=False)
    for k, (request, (_, (path, info))) in enumerate(zip(requests, outcomes)):
        assert info["seed"] == request["seed"] and read_png_settings(path)["prompt"] == request["prompt"]
        if k < 4:  # the same request alone, through the app
            expected, _ = alone.predict(**request, api_name="/generate")
        else:  # (faster) through the service
            expected = alone_through_studio(demo.studio, request)
        assert np.array_equal(pixels(path), pixels(expected)), request


def test_a_full_queue_refuses_cleanly_and_keeps_serving():
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    demo, url = running_demo(None, 2)
    requests = [dict(prompt="", seed=k, steps=STEPS) for k in range(16)]
    outcomes = _call_many(url, requests)
    done = [(request, result) for request, (kind, result) in zip(requests, outcomes) if kind == "ok"]
    refused = [result for kind, result in outcomes if kind == "error"]
    assert done and refused, outcomes
    assert all("queue is full" in str(error).lower() and not isinstance(error, AppError) for error in refused)
    for request, (path, info) in done:
        assert info["seed"] == request["seed"]
        assert np.array_equal(pixels(path), pixels(alone_through_studio(demo.studio, request)))
    assert Client(url, verbose=False).predict(prompt="", seed=1, steps=1, api_name="/generate")[1]["seed"] == 1


# ---- faults and cancellation ------------------------------------------------------------------------------


class Fault:
    """A forward pre-hook on the UNet that raises ``error`` at its ``at``-th call."""

    def __init__(self, unet, error, at=2):
        self.error, self.at, self.calls = error, at, 0
        self.handle = unet.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1
        if self.calls == self.at:
            raise self.error

    def remove(self):
        self.handle.remove()


@pytest.mark.parametrize("error, message", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), "ran out of memory at 64x64"),
    (KeyError("boom"), "the request failed (KeyError)"),
])
def test_a_fault_mid_run_leaves_the_model_clean_and_the_next_request_correct(server, client, error, message):
    from gradio_client.exceptions import AppError

    demo, _ = server
    unet = demo.studio.pipeline("none").unet
    request = dict(prompt="a fault", seed=11, steps=3, seg_blur_sigma=2, api_name="/generate")
    expected, _ = client.predict(**request)
    before = dict(unet.attn_processors)
    fault = Fault(unet, error)
    try:
        with pytest.raises(AppError) as raised:
            client.predict(**request)
    finally:
        fault.remove()
    assert message in str(raised.value) and fault.calls == 2
    assert dict(unet.attn_processors) == before
    assert not unet._forward_pre_hooks and not unet._forward_hooks
    again, _ = client.predict(**request)
    assert np.array_equal(pixels(again), pixels(expected))


class UNetCalls:
    def __init__(self, unet):
        self.count = 0
        self.handle = unet.register_forward_pre_hook(lambda *_: setattr(self, "count", self.count + 1))


def _wait_for(condition, timeout=60.0):
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_a_cancelled_request_stops_its_work(server, client):
    demo, url = server
    unet = demo.studio.pipeline("none").unet
    request = dict(prompt="cancel me", seed=21, steps=2, api_name="/generate")
    expected, _ = client.predict(**request)
    calls = UNetCalls(unet)
    try:
        job = client.submit(prompt="long", seed=1, steps=150, guidance_scale=3.0, api_name="/generate")
        _wait_for(lambda: calls.count >= 3)
        job.cancel()
        time.sleep(1.0)
        stopped_at = calls.count
        time.sleep(1.0)
        assert calls.count == stopped_at < 150  # 150 steps would be 150 calls; it stopped within a step
    finally:
        calls.handle.remove()
    again, _ = client.predict(**request)
    assert np.array_equal(pixels(again), pixels(expected))


def test_a_closed_tab_stops_its_work(server, client):
    """The browser's path: join the queue, listen on the event stream, then drop the connection."""
    demo, url = server
    unet = demo.studio.pipeline("none").unet
    calls = UNetCalls(unet)
    fn_index = next(i for i, dep in enumerate(demo.config["dependencies"]) if dep.get("api_name") == "generate")
    config = httpx.get(f"{url}gradio_api/info", timeout=30).json()["named_endpoints"]["/generate"]
    data = [p.get("parameter_default") for p in config["parameters"]]
    names = [p["parameter_name"] for p in config["parameters"]]
    data[names.index("prompt")], data[names.index("steps")], data[names.index("guidance_scale")] = "tab", 150, 3.0
    session = "closedtab123"
    try:
        with httpx.Client(timeout=30) as http:
            joined = http.post(f"{url}gradio_api/queue/join",
                               json={"data": data, "fn_index": fn_index, "session_hash": session,
                                     "event_data": None, "trigger_id": None})
            assert joined.status_code == 200, joined.text
            with http.stream("GET", f"{url}gradio_api/queue/data", params={"session_hash": session}) as stream:
                for line in stream.iter_lines():
                    if calls.count >= 3:
                        break  # leaves the stream: the connection closes like a closed tab
        _wait_for(lambda: (c := calls.count, time.sleep(1.5), calls.count == c)[-1], timeout=30)
        assert calls.count < 150
    finally:
        calls.handle.remove()
    _, info = client.predict(prompt="", seed=3, steps=1, api_name="/generate")
    assert info["seed"] == 3


def test_cancellation_in_the_service_restores_the_model():
    from seg_core.studio import GenerationCancelled

    studio = Studio("tiny")
    pipe = studio.pipeline("none")
    before = processors(pipe)
    steps_seen = []
    with pytest.raises(GenerationCancelled, match="after 2 of 20 steps"):
        studio.generate(studio.settings(prompt="", seed=0, steps=20), should_stop=lambda: len(steps_seen) >= 2,
                        progress=lambda done, total, label: steps_seen.append(done))
    assert processors(pipe) == before and steps_seen == [1, 2]
    with pytest.raises(GenerationCancelled, match="after 0 of"):  # cancelled while waiting: never starts
        studio.compare(studio.settings(prompt="", seed=0, steps=2), should_stop=lambda: True)
    run, _ = studio.generate(studio.settings(prompt="", seed=0, steps=2))
    assert run.unet_evaluations == 4


# ---- every refusal is a readable message naming the value (raw HTTP and gradio_client) -------------------

READABLE_REFUSALS = [
    ("generate", dict(seed=-5), "seed must be an integer in [0, 4294967295] (or -1 for a random one), got -5"),
    ("generate", dict(seed="abc"), "got 'abc'"),
    ("generate", dict(guidance_scale="x"), "guidance_scale must be a finite number in [0, 100], got 'x'"),
    ("generate", dict(controlnet_conditioning_scale=float("nan")),
     "controlnet_conditioning_scale must be a finite number in [0, 10], got nan"),
    ("generate", dict(perturbation_guidance_start="x"), "perturbation_guidance_start must be a fraction in [0, 1]"),
    ("generate", dict(width=512, height=512), "at most 16384 pixels (128x128) for this model on this server"),
    ("generate", dict(control_type="canny", control_image={
        "url": "data:image/png;base64," + base64.b64encode(png_bytes(Image.new("RGB", (4, 4)))).decode()}),
     "control_image sides must be in [8, "),
    ("compare", dict(sag_scale="x"), "sag_scale must be a finite number in [0, 100], got 'x'"),
    ("compare", dict(one_loop="yes"), "one_loop must be true or false, got 'yes'"),
    ("sweep", dict(second_axis=5), "'none', 'seg_scale' or 'guidance_scale', got '5'"),  # Studio.sweep's words
    ("sweep", dict(seg_blur_sigmas="1, abc"), "bad value 'abc'"),
]


@pytest.mark.parametrize("api_name, bad, message", READABLE_REFUSALS)
def test_every_refusal_is_a_readable_message_over_raw_http(server, api_name, bad, message):
    kind, payload = raw_call(server[1], api_name, **{"prompt": "x", "steps": 1, **bad})
    assert kind == "error" and message in json.loads(payload)["error"], payload


@pytest.mark.parametrize("api_name, bad, message", [r for r in READABLE_REFUSALS if "nan" not in r[2]])
def test_every_refusal_is_a_readable_message_through_gradio_client(client, api_name, bad, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as error:
        client.predict(**{"prompt": "x", "steps": 1, **bad}, api_name=f"/{api_name}")
    assert message in str(error.value) and "upstream" not in str(error.value)
