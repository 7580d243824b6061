"""One demo server per test process (tiny model), shared by test_app.py and test_browser.py."""

import functools
import os
import socket

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

ARTIFACTS = os.path.join(os.path.dirname(__file__), "artifacts")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@functools.lru_cache(maxsize=None)
def running_demo(limits=None, queue_size=16):
    """(demo, url): the app on the tiny model, served from a thread until the process ends; one server per
    distinct (limits, queue_size)."""
    from app import build_demo

    demo = build_demo("tiny", limits=limits, queue_size=queue_size)
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True,
                **demo.launch_options)
    return demo, demo.local_url
