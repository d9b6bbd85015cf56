"""`maskformers serve`: the demo page. The page's logic (Segmenter) against the segment command's output, and the
real page in headless Chromium (Debian's, driven by Playwright): upload a scene, read the rendered table and
overlay, upload a file that is not an image and read the message. The screenshots go to pytest's tmp_path."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import PIL.Image
import pytest

from maskformers import cli
from maskformers.serve import TABLE_HEADERS, Segmenter, _load
from maskformers.training.builtin import BUILTIN_IMAGE_SIZE, BUILTIN_VAL_SEED, builtin_model_dir
from maskformers.training.synthetic import SYNTHETIC_CLASSES, SyntheticScenes

REPO_ROOT = Path(__file__).resolve().parents[1]


def _require(module: str) -> None:
    """The test extra installs ``module``: missing, it skips on a developer's machine and fails under CI."""
    if importlib.util.find_spec(module) is None:
        message = f"needs {module}: pip install -e \".[test]\""
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


@pytest.fixture(scope="module")
def scene_png(tmp_path_factory) -> Path:
    scene = SyntheticScenes(1, size=BUILTIN_IMAGE_SIZE, seed=BUILTIN_VAL_SEED)[0]
    path = tmp_path_factory.mktemp("serve") / "scene.png"
    PIL.Image.fromarray(scene["image"].permute(1, 2, 0).numpy()).save(path)
    return path


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    return Segmenter(_load("builtin"), name="builtin")


def _not_images(folder: Path) -> list[Path]:
    text = folder / "notes.png"  # a text file renamed
    text.write_text("these are my notes, not a picture\n")
    cut = folder / "cut.png"  # a PNG cut short
    buffer = folder / "whole.png"
    PIL.Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer)
    cut.write_bytes(buffer.read_bytes()[:60])
    return [text, cut]


def test_page_logic_matches_the_segment_command(segmenter, scene_png, tmp_path):
    result = segmenter(str(scene_png), "panoptic", 0.5)
    assert result.ok and result.message.startswith(f"{len(result.rows)} segments in ")
    assert "(panoptic; builtin on cpu; 128x128 px)" in result.message
    assert result.overlay.height == 512  # the 128 px scene enlarged, then its legend beside it

    # `maskformers segment` on the same model folder (with the page's input size) writes the same segments
    model_dir = tmp_path / "builtin"
    shutil.copytree(builtin_model_dir(), model_dir)
    (model_dir / "preprocessor_config.json").write_text(json.dumps(segmenter.model.preprocessor_config))
    assert cli.main(["segment", str(scene_png), "--model", str(model_dir), "--out", str(tmp_path / "seg"),
                     "--quiet"]) == 0
    written = json.loads((tmp_path / "seg" / "scene_segments.json").read_text())["segments"]
    assert result.rows == [[s["id"], s["label"], f"{s['score']:.3f}", s["area"]] for s in written]
    assert {row[1] for row in result.rows} <= set(SYNTHETIC_CLASSES) and len(result.rows) >= 2

    semantic = segmenter(str(scene_png), "semantic")
    assert semantic.ok and all(row[2] == "" for row in semantic.rows)  # semantic classes have no score
    assert sum(row[3] for row in semantic.rows) == BUILTIN_IMAGE_SIZE**2


def test_page_logic_with_a_oneformer_uses_the_task_prompt(scene_png, tmp_path):
    import torch
    from mask2former_helpers import perturb_, swin_config
    from oneformer_helpers import write_clip_vocab
    from transformers import OneFormerConfig, OneFormerForUniversalSegmentation

    from maskformers import from_pretrained

    folder = tmp_path / "oneformer"
    config = OneFormerConfig(
        backbone_config=swin_config(), hidden_dim=64, conv_dim=64, mask_dim=64, num_attention_heads=4,
        encoder_feedforward_dim=32, dim_feedforward=48, num_queries=10, num_labels=4, decoder_layers=3,
        encoder_layers=1, id2label={0: "cat", 1: "dog", 2: "sky", 3: "road"})
    torch.manual_seed(5)
    perturb_(OneFormerForUniversalSegmentation(config), seed=5, scale=0.5).eval().save_pretrained(folder)
    write_clip_vocab(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "size": {"shortest_edge": 64, "longest_edge": 128}, "num_text": 6,
        "image_processor_type": "OneFormerImageProcessor", "processor_class": "OneFormerProcessor"}))
    oneformer = Segmenter(from_pretrained(folder), name="tiny-oneformer")
    assert oneformer.is_oneformer and oneformer.prompt("instance") == "the task is instance"
    result = oneformer(str(scene_png), "semantic")
    assert result.ok and '(semantic, prompt "the task is semantic"; tiny-oneformer on cpu' in result.message
    assert cli.main(["segment", str(scene_png), "--model", str(folder), "--task", "semantic", "--out",
                     str(tmp_path / "seg"), "--quiet"]) == 0
    written = json.loads((tmp_path / "seg" / "scene_segments.json").read_text())["segments"]
    assert result.rows == [[s["id"], s["label"], "", s["area"]] for s in written]


def test_page_logic_explains_a_bad_upload(segmenter, tmp_path):
    text, cut = _not_images(tmp_path)
    for path in (text, cut):
        result = segmenter(str(path), "panoptic")
        assert not result.ok and result.overlay is None and result.rows == []
        assert result.message.startswith(f"**{path.name} is not an image that can be read.**")
        assert str(tmp_path) not in result.message  # the server's temporary path is not shown
    assert "cannot identify image file 'notes.png'" in segmenter(str(text), "panoptic").message
    assert segmenter(None, "panoptic").message == "Upload an image to segment."


def test_serve_without_gradio_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else object())
    assert cli.main(["serve"]) == 2
    assert capsys.readouterr().err == ("maskformers serve: needs Gradio, which is not installed: "
                                       "pip install \"maskformers[demo]\"\n")


def test_bad_serve_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", "--port", "99999"])
    assert exc.value.code == 2
    assert "--port must be a TCP port number in [1, 65535], got '99999'" in capsys.readouterr().err
    _require("gradio")
    assert cli.main(["serve", "--model", "/no/such/folder"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("maskformers serve: cannot load model '/no/such/folder'") and err.count("\n") == 1


def test_import_maskformers_does_not_import_gradio():
    code = ("import sys, maskformers, maskformers.cli; maskformers.cli.make_parser(); maskformers.from_pretrained; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('gradio', 'playwright', 'fastapi')))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------------
# the real page in a real browser
# ------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`maskformers serve` (the built-in model) in a subprocess on a free local port; yields its URL."""
    _require("gradio")
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "serve.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
           "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "maskformers", "serve", "--port", str(port)], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 300  # importing Gradio takes a while on a busy 2-core machine
        while True:
            if proc.poll() is not None:
                pytest.fail(f"maskformers serve exited with {proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"maskformers serve did not answer on {url} in 300 s:\n{log.read_text()}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


ROWS = "#segments div[role=row]"  # Gradio's data frame: an ARIA grid (its <table> only sizes the columns)


def _table(page) -> list[list[str]]:
    rows = page.locator(ROWS)
    return [[c.strip() for c in rows.nth(i).locator("[role=gridcell]").all_inner_texts()] for i in range(rows.count())]


def test_demo_page_in_headless_chromium(server, segmenter, scene_png, tmp_path):
    _require("playwright")
    from browser_helpers import CHROMIUM_FLAGS, chromium_executable
    from playwright.sync_api import expect, sync_playwright

    chromium = chromium_executable()
    expected = segmenter(str(scene_png), "panoptic", 0.5)
    outside: list[str] = []

    def only_local(route) -> None:  # the page must not need the internet: record and refuse any other host
        if urlparse(route.request.url).hostname in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=chromium,
                                                       headless=True, args=CHROMIUM_FLAGS,
                                                       viewport={"width": 1400, "height": 1000})
        try:
            context.route("**/*", only_local)
            page = context.new_page()
            page.set_default_timeout(120_000)
            page.goto(server, wait_until="domcontentloaded")
            status = page.locator("#status")
            expect(status).to_contain_text("Upload an image to segment.")

            page.locator("#upload input[type=file]").set_input_files(str(scene_png))
            expect(status).to_contain_text("segments in", timeout=180_000)
            assert "(panoptic; builtin on cpu; 128x128 px)" in status.inner_text()
            expect(page.locator(ROWS)).to_have_count(len(expected.rows))
            headers = page.locator("#segments [role=columnheader]").all_inner_texts()
            assert [h.replace("⋮", "").strip() for h in headers] == TABLE_HEADERS
            shown = _table(page)
            assert shown == [[str(value) for value in row] for row in expected.rows]
            assert {row[1] for row in shown} <= set(SYNTHETIC_CLASSES)
            image = page.locator("#overlay img")
            expect(image).to_be_visible()
            size = image.evaluate("img => [img.complete, img.naturalWidth, img.naturalHeight]")
            assert size == [True, expected.overlay.width, expected.overlay.height]
            page.screenshot(path=str(tmp_path / "serve-result.png"), full_page=True)

            for bad in _not_images(tmp_path):
                page.locator("#upload button[aria-label=Clear]").click()  # as a person removes the last file
                page.locator("#upload input[type=file]").set_input_files(str(bad))
                expect(status).to_contain_text(f"{bad.name} is not an image that can be read.", timeout=120_000)
                expect(page.locator(ROWS)).to_have_count(0)
                expect(page.locator("#overlay img")).to_have_count(0)
                assert "Traceback" not in page.content()
            page.screenshot(path=str(tmp_path / "serve-bad-upload.png"), full_page=True)
        finally:
            context.close()
    assert outside == []
    print(f"screenshots: {tmp_path / 'serve-result.png'}, {tmp_path / 'serve-bad-upload.png'}")
