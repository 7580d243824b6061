"""The real app under an emulation of ZeroGPU's process model (tests/zerogpu_spaces/spaces.py): every GPU
handler runs in a worker forked from the server on first use and reused afterwards, which sees the server's
state only as the copy taken at the fork. Each result must equal a plain run of the same request.

The server runs in its own process (tests/zerogpu_server.py) with one torch thread, since an OpenMP pool
used before a fork cannot be used in the child, and so that the fork copies no state of pytest's (other
tests' servers and threads); the plain runs happen here, in the test process.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from app_server import free_port
from seg_core.studio import Studio

HERE = os.path.dirname(os.path.abspath(__file__))
HOUSE = os.path.join(os.path.dirname(HERE), "assets", "control_house.png")

GENERATE_CALLS = [  # five requests with different settings; every one must run (the bug: all but the first)
    dict(prompt="a corgi", seed=1, steps=2),
    dict(prompt="", seed=2, steps=3, seg_blur_sigma="4"),
    dict(prompt="a cottage", seed=3, steps=2, guidance_scale=3.0, pag_scale=2.0),
    dict(prompt="a lake", seed=4, steps=2, sag_scale=1.0, seg_scale=0.0),
    dict(prompt="a house", seed=5, steps=2, control_type="canny", control_image=HOUSE),
]


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def zerogpu(tmp_path_factory):
    """(client, log path, server pid): the app served under the stand-in, in a process of its own."""
    from gradio_client import Client

    folder = tmp_path_factory.mktemp("zerogpu")
    log, output = folder / "calls.jsonl", folder / "server.log"
    port = free_port()
    env = dict(os.environ, FAKE_SPACES_LOG=str(log), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               GRADIO_ANALYTICS_ENABLED="False")
    with open(output, "w") as sink:
        server = subprocess.Popen([sys.executable, os.path.join(HERE, "zerogpu_server.py"), str(port)], env=env,
                                  stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                pytest.fail(f"the server under the ZeroGPU stand-in exited:\n{output.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the server did not answer in 180 s:\n{output.read_text()[-3000:]}")
                time.sleep(0.5)
        yield Client(url, verbose=False), log, server.pid
    finally:  # the server and the workers it forked: one process group
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(20)


@pytest.fixture(scope="module")
def plain():
    return Studio("tiny", fallback=None)


def records(log, event: str) -> list[dict]:
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    return [line for line in lines if line["event"] == event]


def test_generate_five_times_then_compare_and_sweep_equal_plain_runs(zerogpu, plain):
    from gradio_client import handle_file

    client, log, server_pid = zerogpu
    for call in GENERATE_CALLS:
        request = dict(call)
        if "control_image" in request:
            request["control_image"] = handle_file(request["control_image"])
        path, info = client.predict(**request, api_name="/generate")
        control = call.get("control_image")
        settings = plain.settings(**{k: v for k, v in call.items() if k != "control_image"})
        run, _ = plain.generate(settings, control)
        assert info["settings"] == run.settings.to_dict()
        assert np.array_equal(pixels(path), pixels(run.path)), call

    gallery, runs = client.predict(prompt="a corgi", seed=6, steps=2, api_name="/compare")
    expected, _ = plain.compare(plain.settings(prompt="a corgi", seed=6, steps=2), None, 1.0, 3.0)
    assert [run["label"] for run in runs] == [run.label for run in expected]
    for item, run in zip(gallery, expected, strict=True):
        assert np.array_equal(pixels(item["image"]), pixels(run.path)), run.label

    grid, info = client.predict(prompt="", seed=7, steps=1, seg_blur_sigmas="1, inf", second_axis="seg_scale",
                                second_axis_values="1, 3", api_name="/sweep")
    sweep, _ = plain.sweep(plain.settings(prompt="", seed=7, steps=1), [1.0, math.inf], "seg_scale", [1.0, 3.0])
    assert len(info["runs"]) == 4 and np.array_equal(pixels(grid), pixels(sweep.path))

    # The process model really was ZeroGPU's: one worker per handler, forked once, reused for every call.
    scheduled = records(log, "schedule")
    assert Counter(r["task"] for r in scheduled) == {"generate": 5, "compare": 1, "sweep": 1}
    generate_workers = {r["worker_pid"] for r in scheduled if r["task"] == "generate"}
    assert len(generate_workers) == 1 and server_pid not in generate_workers
    ran = records(log, "run")
    assert len(ran) == 7 and all(r["pid"] != server_pid for r in ran)
    # Progress went from the worker to the server's queue: at least one update per denoising step.
    progress = Counter(r["task"] for r in records(log, "queue") if r["method"] == "set_progress")
    assert progress["generate"] >= sum(call["steps"] for call in GENERATE_CALLS)
    assert progress["compare"] >= 4 * 2 and progress["sweep"] >= 4


def test_a_cancelled_request_does_not_break_the_next_one(zerogpu, plain):
    client, _, _ = zerogpu
    job = client.submit(prompt="long", seed=8, steps=150, api_name="/generate")
    deadline = time.monotonic() + 60
    while job.status().code.name not in ("PROCESSING", "FINISHED") and time.monotonic() < deadline:
        time.sleep(0.05)
    job.cancel()
    path, _ = client.predict(prompt="after", seed=9, steps=2, api_name="/generate")
    run, _ = plain.generate(plain.settings(prompt="after", seed=9, steps=2))
    assert np.array_equal(pixels(path), pixels(run.path))


def test_durations_follow_the_work_and_what_never_fits_is_refused_before_scheduling(zerogpu, plain):
    from gradio_client.exceptions import AppError

    client, log, _ = zerogpu
    asked = {r["task"]: r["duration"] for r in records(log, "schedule")}  # the last one of each handler
    assert all(isinstance(seconds, int) and seconds > 0 for seconds in asked.values()), asked
    settings = plain.settings(prompt="", seed=0, steps=4)
    assert plain.gpu_seconds("generate", settings) < plain.gpu_seconds("generate", plain.settings(steps=150))
    assert plain.gpu_seconds("generate", settings) < plain.gpu_seconds("compare", settings)
    assert (plain.gpu_seconds("sweep", settings, [1, 4], "seg_scale", [1, 3])
            > plain.gpu_seconds("sweep", settings, [1, 4]))

    scheduled = len(records(log, "schedule"))
    with pytest.raises(AppError, match=r"needs about \d+ s of GPU time \(150 steps x 64 images at 64x64"):
        client.predict(prompt="", seed=0, steps=150, seg_blur_sigmas=", ".join(map(str, range(1, 9))),
                       second_axis="seg_scale", second_axis_values="1, 2, 3, 4, 5, 6, 7, 8", api_name="/sweep")
    assert len(records(log, "schedule")) == scheduled  # refused before a worker was asked for


def test_sdxl_durations_fit_a_logged_out_visitor_at_the_defaults(plain, monkeypatch):
    from seg_core.studio import SDXL_PROFILE, Studio
    from seg_core.zerogpu import DURATION_FACTOR, QUOTA_SECONDS

    monkeypatch.setattr(Studio, "profile", property(lambda self: SDXL_PROFILE))
    monkeypatch.setattr(Studio, "check_budget", lambda self, *args: None)  # durations here, not tiny's memory
    settings = plain.settings(prompt="a jellyfish", width=1024, height=1024, steps=25)
    quota = QUOTA_SECONDS["logged out"]
    for kind, axes in (("generate", ()), ("compare", ()), ("sweep", ([1, 4, 16, 64, math.inf],))):
        assert plain.gpu_seconds(kind, settings, *axes) * DURATION_FACTOR <= quota, kind
    cfg = plain.settings(prompt="a jellyfish", width=1024, height=1024, steps=25, guidance_scale=5.0)
    assert plain.gpu_seconds("compare", cfg) * DURATION_FACTOR <= quota
    with pytest.raises(ValueError, match=r"at most 200 s .* Use fewer steps"):
        plain.gpu_seconds("sweep", plain.settings(width=1024, height=1024, steps=100), [1, 2, 4, 8, 16, math.inf],
                          "guidance_scale", [3, 5, 7])


def test_an_error_in_the_worker_reaches_the_visitor_and_the_next_request_runs(zerogpu, plain, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    client, log, _ = zerogpu
    not_an_image = tmp_path / "not-an-image.png"
    not_an_image.write_bytes(b"these bytes are no PNG" * 10)
    with pytest.raises(AppError, match="control_image is not a readable image"):  # decoded in the worker
        client.predict(prompt="x", steps=1, control_type="canny", control_image=handle_file(str(not_an_image)),
                       api_name="/generate")
    path, _ = client.predict(prompt="again", seed=10, steps=2, api_name="/generate")
    run, _ = plain.generate(plain.settings(prompt="again", seed=10, steps=2))
    assert np.array_equal(pixels(path), pixels(run.path))
    workers = [r["worker_pid"] for r in records(log, "schedule") if r["task"] == "generate"]
    assert workers[-1] != workers[-2]  # as spaces does, a failed worker is not reused: a new one was forked
