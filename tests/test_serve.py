"""`repforce serve`: the OpenAI-compatible API through the official client, batching, limits and bad
input, the API key, the command itself, and the web app in a real browser (headless Chromium).

    pytest tests/test_serve.py
"""

import base64
import io
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import struct
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from repforce import engine as E
from repforce.serve import bind, create_app
from repforce.service import Limits, QueueFull, Service
from repforce.train import train
from repforce.worlds import shapes

from conftest import tiny_run

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def _png(img) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(img, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


class Server:
    """uvicorn on a free loopback port in a thread of this process."""

    def __init__(self, app):
        import uvicorn

        self.sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                return
            time.sleep(0.05)
        raise RuntimeError("server did not start")

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    run = tmp_path_factory.mktemp("serve") / "tiny"
    train(tiny_run("pixel_rf", steps=2, ckpt_every=100), run, progress=False)
    return E.load(run, precision="fp32")


@pytest.fixture(scope="module")
def api(model):
    service = Service(model, "tiny", Limits(max_n=4, max_steps=30, max_prompt_chars=200, max_upload_bytes=200_000,
                                            max_wait=0.2))
    server = Server(create_app(service, app=False))
    yield service, server.url
    server.stop()


def test_openai_client_generates_and_answers(api):
    openai = pytest.importorskip("openai")
    service, url = api
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    side = service.engine.cfg.image_size
    r = client.images.generate(model="tiny", prompt="a red circle", n=2, response_format="b64_json",
                               extra_body={"steps": 2, "seed": 3})
    assert len(r.data) == 2
    for d in r.data:
        with Image.open(io.BytesIO(base64.b64decode(d.b64_json))) as im:
            assert im.format == "PNG" and im.size == (side, side) and im.mode == "RGB"
    img = shapes.render(shapes.scenes("heldout", 0, 1, side)[0])
    for text in ("what color is the circle?", "describe the image"):
        c = client.chat.completions.create(model="tiny", max_tokens=6, messages=[{"role": "user", "content": [
            {"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": _data_url(_png(img))}}]}])
        assert c.choices[0].message.role == "assistant" and isinstance(c.choices[0].message.content, str)
    expected = service.engine.answer([img], ["what color is the circle?"], max_new_tokens=6)[0]
    c = client.chat.completions.create(model="tiny", max_tokens=6, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(_png(img))}},
                                     {"type": "text", "text": "what color is the circle?"}]}])
    assert c.choices[0].message.content == expected


def test_concurrent_requests_share_a_batch_and_keep_their_images(api):
    service, url = api
    alone = [service.generate("a blue square", 2, seed=11, options=service.options(steps=2)).result()]
    before = service.batcher.batches
    futures = [service.generate(p, 2, seed=s, options=service.options(steps=2))
               for p, s in (("a red circle", 5), ("a blue square", 11), ("two circles", 7))]
    together = [f.result() for f in futures]
    assert service.batcher.batches == before + 1  # three requests, one sampling batch
    for a, b in zip(alone[0], together[1]):
        np.testing.assert_array_equal(a.image, b.image)  # an image does not depend on its batch
        np.testing.assert_array_equal(a.rep, b.rep)
    assert not np.array_equal(together[0][0].image, together[0][1].image)  # seeds 5 and 6 differ


def _bomb() -> bytes:
    """A valid PNG header claiming 20000 x 20000 pixels, with a tiny body."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")


def _chat(image: bytes | str, text="what color is the circle?"):
    url = image if isinstance(image, str) else _data_url(image)
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": text},
                                                      {"type": "image_url", "image_url": {"url": url}}]}]}


BAD = [  # (route, body, words the one-line message must hold)
    ("images", {"prompt": ""}, "empty prompt"),
    ("images", {"prompt": "   "}, "empty prompt"),
    ("images", {"prompt": "x" * 300}, "at most 200"),
    ("images", {"prompt": "a circle", "n": 0}, "n=0"),
    ("images", {"prompt": "a circle", "n": 50}, "n=50"),
    ("images", {"prompt": "a circle", "n": "two"}, "n must be an integer"),
    ("images", {"prompt": "a circle", "steps": 1000}, "steps=1000"),
    ("images", {"prompt": "a circle", "guidance": "high"}, "guidance must be a number"),
    ("images", {"prompt": "a circle", "temperature": -1}, "temperature"),
    ("images", {"prompt": "a circle", "colour": "red"}, "unknown field 'colour'"),
    ("images", {"prompt": "a circle", "model": "/etc/passwd"}, "not served here"),
    ("images", {"prompt": "a circle", "response_format": "url"}, "b64_json"),
    ("images", {"prompt": "a circle", "size": "1024x1024"}, "size must be"),
    ("images", {"prompt": 7}, "prompt must be a string"),
    ("images", [1, 2], "JSON object"),
    ("chat", {"messages": []}, "non-empty list"),
    ("chat", {"messages": [{"role": "user", "content": "hello"}]}, "no image"),
    ("chat", _chat("https://example.com/cat.png"), "data URLs"),
    ("chat", _chat("data:image/png;base64,@@@"), "not valid base64"),
    ("chat", _chat(b"this is not an image"), "unreadable image"),
    ("chat", _chat(_png(np.zeros((16, 16, 3)))[:40]), "unreadable image"),
    ("chat", _chat(_bomb()), "image too large"),
    ("chat", {**_chat(_png(np.zeros((16, 16, 3)))), "stream": True}, "stream"),
    ("chat", {**_chat(_png(np.zeros((16, 16, 3)))), "max_tokens": 10_000}, "max_tokens=10000"),
    ("chat", _chat(_png(np.zeros((16, 16, 3))), "q" * 300), "at most 200"),
]


@pytest.mark.parametrize("route,body,words", BAD, ids=[f"{r}-{w}" for r, _, w in BAD])
def test_bad_input_is_a_400_with_one_line(api, route, body, words):
    _, url = api
    path = {"images": "/v1/images/generations", "chat": "/v1/chat/completions"}[route]
    r = httpx.post(url + path, json=body, timeout=30)
    assert r.status_code == 400, r.text
    msg = r.json()["error"]["message"]
    assert words in msg and "\n" not in msg


def test_bodies_that_are_not_json_or_too_large_are_400(api):
    _, url = api
    r = httpx.post(url + "/v1/images/generations", content=b"{not json", timeout=30)
    assert r.status_code == 400 and "not JSON" in r.json()["error"]["message"]
    big = _chat(b"\0" * 300_000)  # over the 200 kB limit, refused from its Content-Length
    r = httpx.post(url + "/v1/chat/completions", json=big, timeout=30)
    assert r.status_code == 400 and "at most 200,000" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the server counts as it reads
        for _ in range(21):
            yield b" " * 10_000
    r = httpx.post(url + "/v1/chat/completions", content=chunks(), timeout=30)
    assert r.status_code == 400 and "over 200,000" in r.json()["error"]["message"]


def test_a_full_queue_answers_503_with_retry_after(model):
    from fastapi.testclient import TestClient

    service = Service(model, "tiny", Limits(max_queue=3, max_n=3, max_batch=3, max_steps=8, max_wait=0.0))
    gate, real = threading.Event(), service.batcher.run
    service.batcher.run = lambda key, items: gate.wait(30) and real(key, items)
    first = service.generate("a circle", 1, seed=0, options=service.options(steps=1))  # taken, held at the gate
    time.sleep(0.2)
    queued = service.generate("a circle", 3, seed=0, options=service.options(steps=1))  # fills the queue
    with pytest.raises(QueueFull):
        service.generate("a circle", 1, seed=0)
    r = TestClient(create_app(service, app=False)).post("/v1/images/generations", json={"prompt": "a square", "steps": 1})
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and "busy" in r.json()["error"]["message"]
    gate.set()
    assert len(first.result(30)) == 1 and len(queued.result(30)) == 3


def test_api_key_guards_every_api_route(model):
    from fastapi.testclient import TestClient

    client = TestClient(create_app(Service(model, "tiny"), api_key="s3cret", app=False))
    assert client.get("/health").status_code == 200
    for method, path in (("get", "/v1/models"), ("post", "/v1/images/generations"), ("post", "/v1/chat/completions")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = getattr(client, method)(path, headers=headers, **({"json": {}} if method == "post" else {}))
            assert r.status_code == 401, (path, headers)
    assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).json()["data"][0]["id"] == "tiny"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_command_serves_and_says_why_it_cannot(tmp_path):
    cli = Path(sys.executable).parent / "repforce"
    r = subprocess.run([cli, "serve", "--ckpt", str(tmp_path / "nonesuch")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no such run folder or shipped model" in r.stderr and len(r.stderr.splitlines()) == 1
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = subprocess.run([cli, "serve", "--ckpt", "shapes_vlm", "--port", str(taken.getsockname()[1])],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "cannot serve on 127.0.0.1" in r.stderr and len(r.stderr.splitlines()) == 1
    port = _free_port()
    p = subprocess.Popen([cli, "serve", "--ckpt", "shapes_vlm", "--port", str(port)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(240):
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
                break
            except httpx.HTTPError:
                assert p.poll() is None, p.stdout.read()
                time.sleep(0.5)
        else:
            pytest.fail("repforce serve did not answer /health within 2 minutes")
        assert health["model"] == "shapes_vlm" and health["variant"] == "vlm"
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=30)
        assert page.status_code == 200 and "gradio" in page.text.lower()
        r = httpx.post(f"http://127.0.0.1:{port}/v1/images/generations", json={"prompt": "a circle"}, timeout=30)
        assert r.status_code == 400 and "does not generate images" in r.json()["error"]["message"]
        img = shapes.render(shapes.make_scene(np.random.default_rng(0), [{"shape": "square", "color": "blue"}], 32, 7))
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=_chat(_png(img), "what color is the square?"),
                       timeout=60)
        assert r.json()["choices"][0]["message"]["content"] == "blue"
    finally:
        p.terminate()
        p.wait(30)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver "
                    "(.ci/run installs them)")
def test_the_web_app_in_a_real_browser(tmp_path):
    """Headless Chromium types a prompt, clicks Generate and sees judged images; asks about a picked scene."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    name = "shapes" if "shapes" in E.checkpoint.shipped() else "shapes_vlm"
    service = Service(E.load(name, precision="fp32"), name)
    server = Server(create_app(service))
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        opts.add_argument(a)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        wait = WebDriverWait(driver, 120)
        driver.get(server.url + "/")
        box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea"))
        if name == "shapes":
            box.clear()
            box.send_keys("a red circle")
            driver.find_element(By.CSS_SELECTOR, "#generate").click()
            imgs = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery img") or False)
            assert imgs
            wait.until(lambda d: "judge sees" in d.find_element(By.ID, "gallery").text)
            driver.save_screenshot(str(tmp_path / "generate.png"))
        driver.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Ask')]").click()
        scene = shapes.make_scene(np.random.default_rng(0), [{"shape": "circle", "color": "yellow"}], 32, 7)
        path = tmp_path / "scene.png"
        Image.fromarray(shapes.render(scene)).resize((128, 128), Image.NEAREST).save(path)
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#ask-image input[type=file]")).send_keys(str(path))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#ask-image img"))
        q = driver.find_element(By.CSS_SELECTOR, "#question textarea")
        q.clear()
        q.send_keys("what color is the circle?")
        driver.find_element(By.CSS_SELECTOR, "#ask").click()
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#answer textarea").get_attribute("value") == "yellow")
        driver.save_screenshot(str(tmp_path / "ask.png"))
        assert (tmp_path / "ask.png").stat().st_size > 10_000
        if os.environ.get("REPFORCE_SCREENSHOTS"):  # the README's pictures: REPFORCE_SCREENSHOTS=docs/figures
            for f in ("generate.png", "ask.png"):
                shutil.copy(tmp_path / f, Path(os.environ["REPFORCE_SCREENSHOTS"]) / f"serve_{f}")
    finally:
        driver.quit()
        server.stop()
