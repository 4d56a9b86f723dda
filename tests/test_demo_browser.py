"""The browser demo (demo/app.py, docs/demo.md) driven by a headless Chromium through Playwright.

`python demo/app.py` serves a small digits model (pixel tokens; random weights built here, or
the model named by EAR_DEMO_RESUME); the page samples, and completes an uploaded image whose
region to regenerate is painted with the editor's brush (mouse strokes on its canvas) or given
as a mask picture. The pictures the page shows are fetched and decoded: their size, the grid's
layout, the 16x magnification, the pixels against sample_ear.py's own functions (sampling) and
the kept pixels against the input (editing).

Needs the demo's extras (pip install -r demo/requirements.txt) and the system Chromium
(Debian: apt-get install chromium); skipped without them. Slow: `pytest -m slow
tests/test_demo_browser.py`. EAR_DEMO_SCREENSHOTS=1 also writes docs/demo_sampling.png and
docs/demo_editing.png.
"""
import io
import json
import os
import selectors
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, free_port

sync_api = pytest.importorskip("playwright.sync_api")  # demo/requirements.txt
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="no system Chromium (apt-get install "
                                 "chromium); Playwright's own browser builds are not used")]

SIDE, PAD, ZOOM = 8, 2, 16  # digits are 8x8, grids pad 2 px, the page magnifies 8 px to 128 px
SCREENSHOTS = os.environ.get("EAR_DEMO_SCREENSHOTS") == "1"


def random_digits_model(folder):
    """An exported folder (model.safetensors + config.json) of the quick start's network with
    random weights, its zero-initialised output layers perturbed so every draw depends on the
    class and the noise."""
    from safetensors.torch import save_file

    from util.args import network_settings, train_parser
    from util.builders import build_model, settings_from_checkpoint
    from util.pretrained import CONFIG, WEIGHTS
    from util.settings import FORMAT
    args = train_parser().parse_args([f"@{REPO / 'configs' / 'digits_quickstart.args'}"])
    settings = settings_from_checkpoint(vars(args))
    torch.manual_seed(0)
    model = build_model(settings)
    with torch.no_grad():
        for p in model.head.parameters():
            if not p.any():
                p.normal_(std=0.1)
    names = ("model", "head", "tokenizer", *network_settings(settings.head))
    config = {"format": FORMAT, **{n: getattr(settings, n) for n in names}, "epoch": 0,
              "weights": "ema", "run": "random-digits"}
    save_file(model.state_dict(), folder / WEIGHTS)
    (folder / CONFIG).write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def model_source(tmp_path_factory):
    """EAR_DEMO_RESUME (a folder relative to the repository, or a Hub repo id), else a random
    digits model."""
    given = os.environ.get("EAR_DEMO_RESUME")
    if given:
        return str((REPO / given).resolve()) if (REPO / given).exists() else given
    return str(random_digits_model(tmp_path_factory.mktemp("export")))


@pytest.fixture(scope="module")
def app_url(model_source):
    """`python demo/app.py --resume SOURCE --device cpu --port PORT`, up and serving."""
    pytest.importorskip("gradio")  # in the app's process; checked here, not at collection
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "demo" / "app.py"), "--resume",
                             model_source, "--device", "cpu", "--port", str(port)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    output, deadline = [], time.monotonic() + 180
    with selectors.DefaultSelector() as waiting:
        waiting.register(proc.stdout, selectors.EVENT_READ)
        while not any("Running on local URL" in line for line in output):
            if not waiting.select(timeout=max(0.0, deadline - time.monotonic())):
                proc.kill()
                pytest.fail("demo/app.py did not start in 180 s:\n" + "".join(output))
            line = proc.stdout.readline()
            if not line:
                pytest.fail(f"demo/app.py ended ({proc.wait()}):\n" + "".join(output))
            output.append(line)
    # Keep reading what the app prints, so that a full pipe never blocks it.
    threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True).start()
    yield f"http://127.0.0.1:{port}/"
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, app_url):
    """The demo's page, its model loaded (the page loads the --resume one when it opens)."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(120_000)
    page.goto(app_url, wait_until="domcontentloaded")
    page.locator("#info", has_text="tokens").wait_for()
    yield page
    context.close()


def set_field(page, selector: str, value) -> None:
    """Type into a textbox, number field or a slider's number box, as a user would."""
    field = page.locator(f"{selector} textarea, {selector} input[type=number]").first
    field.fill(str(value))
    field.press("Tab")


ERRORS = "[data-testid=toast-body].error"


def run(page, button: str, output: str, note: str) -> tuple:
    """Click `button`, wait for a new picture in `output` (or fail with the page's error):
    (its pixels, the text of `note`, seconds from the click to the picture)."""
    shown = page.locator(f"{output} img")
    old = shown.get_attribute("src") if shown.count() else ""
    start = time.perf_counter()
    page.click(button)
    page.wait_for_function("([sel, old, errors]) => { const img = document.querySelector(sel); "
                           "return (img !== null && img.complete && img.src !== old) "
                           "|| document.querySelector(errors) !== null; }",
                           arg=[f"{output} img", old, ERRORS])
    seconds = time.perf_counter() - start
    if page.locator(ERRORS).count():
        pytest.fail(f"the page says: {page.locator(ERRORS).first.inner_text()}")
    response = page.request.get(shown.get_attribute("src"))
    assert response.ok, response.status
    picture = np.asarray(Image.open(io.BytesIO(response.body())).convert("RGB"))
    return picture, page.inner_text(note), seconds


def expect_error(page, button: str, text: str) -> None:
    """Click `button`: the page shows `text` in an error message, and no traceback; then the
    message is closed."""
    page.click(button)
    page.locator(ERRORS, has_text=text).first.wait_for()
    assert "Traceback" not in page.locator(ERRORS).first.inner_text()
    for close in page.locator("[data-testid=toast-close]").all():
        close.click()
    page.locator(ERRORS).first.wait_for(state="detached")


def cells(picture: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """A magnified grid as shown -> its images (rows, cols, SIDE, SIDE) uint8 (grey), after
    checking its size, that every pixel is a ZOOM x ZOOM block and that the padding is white."""
    height, width = rows * (SIDE + PAD) + PAD, cols * (SIDE + PAD) + PAD
    assert picture.shape == (height * ZOOM, width * ZOOM, 3)
    blocks = picture.reshape(height, ZOOM, width, ZOOM, 3)
    assert (blocks == blocks[:, :1, :, :1]).all()
    grid = blocks[:, 0, :, 0]
    assert (grid == grid[..., :1]).all()  # a grey model: R = G = B
    grid = grid[..., 0]
    images = np.empty((rows, cols, SIDE, SIDE), np.uint8)
    inside = np.zeros_like(grid, dtype=bool)
    for r in range(rows):
        for c in range(cols):
            top, left = PAD + r * (SIDE + PAD), PAD + c * (SIDE + PAD)
            images[r, c] = grid[top:top + SIDE, left:left + SIDE]
            inside[top:top + SIDE, left:left + SIDE] = True
    assert (grid[~inside] == 255).all()
    return images


def expected_samples(source, class_ids, per_class, cfg, steps, seed, tmp_path) -> np.ndarray:
    """What sample_ear.py's functions draw for these settings, seeded as the page seeds them
    (just before sampling): uint8 (N, SIDE, SIDE)."""
    from engine_ear import generate
    from sample_ear import parse_args, set_up
    from util.images import to_uint8
    args, given = parse_args(["--resume", source, "--device", "cpu", "--class_ids",
                              *map(str, class_ids), "--samples_per_class", str(per_class),
                              "--cfg", str(cfg), "--num_iter", str(steps), "--seed", str(seed),
                              "--out", str(tmp_path / "expected.png")])
    cpu = torch.device("cpu")
    model, tokenizer, labels, _, _ = set_up(args, given, cpu)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the app's process (OMP_NUM_THREADS=1)
    try:
        torch.manual_seed(seed)
        images = generate(model, tokenizer.decode, labels.repeat_interleave(per_class), cfg,
                          args.infer_temperature, args, cpu)
    finally:
        torch.set_num_threads(threads)
    return to_uint8(images)[..., 0]


def digit_picture(path) -> np.ndarray:
    """A held-out handwritten 7, 8x8, saved magnified to 128x128 as a user might have it."""
    from util.digits import digits_split
    _, _, images, labels = digits_split()
    digit = images[list(labels).index(7)]
    Image.fromarray(digit.repeat(ZOOM, 0).repeat(ZOOM, 1)).save(path)
    return digit


def upload(page, path) -> None:
    """Upload a 128x128 picture into the editor and wait until it is on the canvas: the editor
    then zooms from its empty 800x800 canvas to the picture (225% at this page's width)."""
    zoom = page.locator("#edit_image .zoom-number")
    empty = zoom.inner_text()
    page.locator("#edit_image input[type=file]").first.set_input_files(path)
    page.wait_for_function("([sel, empty]) => document.querySelector(sel).innerText.trim() "
                           "!== empty.trim()", arg=["#edit_image .zoom-number", empty])


def check_completions(grid: np.ndarray, digit: np.ndarray, per_class: int) -> np.ndarray:
    """Each row: [input, mask, completions]. The input as uploaded; the same mask in every row;
    every token (2x2 pixels) all black in the mask kept exactly, the rest regenerated. Returns
    the mask (True: regenerated)."""
    assert grid.shape[1] == per_class + 2
    mask = grid[0, 1]
    assert set(np.unique(mask)) <= {0, 255}
    for row in grid:
        assert (row[0] == digit).all()
        assert (row[1] == mask).all()
    regenerate = (mask == 255).reshape(SIDE // 2, 2, SIDE // 2, 2).any(axis=(1, 3))
    kept = np.repeat(np.repeat(~regenerate, 2, 0), 2, 1)
    completions = grid[:, 2:]
    assert (completions[..., kept] == digit[kept]).all()
    assert (completions[..., ~kept] != digit[~kept]).any()
    assert len({c.tobytes() for c in completions.reshape(-1, SIDE, SIDE)}) > 1  # not one image
    return mask == 255


def test_sample_tab_draws_the_models_samples(page, model_source, tmp_path):
    info = page.inner_text("#info")
    assert "8x8 px images of 16 tokens, 10 classes" in info, info
    assert page.input_value("#sample_classes textarea") == "0, 1, 2, 3, 4, 5, 6, 7, 8, 9"

    set_field(page, "#sample_classes", "42")  # not a class of the model
    expect_error(page, "#sample_run", "--class_ids [42] are not among the checkpoint's classes")

    class_ids, per_class, cfg, steps, seed = [0, 3, 7], 4, 2.0, 16, 5
    set_field(page, "#sample_classes", ", ".join(map(str, class_ids)))
    set_field(page, "#sample_count", per_class)
    set_field(page, "#sample_cfg", cfg)
    set_field(page, "#sample_steps", steps)
    set_field(page, "#sample_seed", seed)
    picture, note, seconds = run(page, "#sample_run", "#sample_grid", "#sample_note")
    print(f"sampling in the page: {seconds:.2f} s from the click to the picture; {note}")
    assert f"{len(class_ids)} classes x {per_class} samples, cfg {cfg}" in note
    shown = cells(picture, len(class_ids), per_class)
    expected = expected_samples(model_source, class_ids, per_class, cfg, steps, seed, tmp_path)
    # The same draws as sample_ear.py's code; another process may round a level differently.
    difference = np.abs(shown.reshape(expected.shape).astype(int) - expected.astype(int))
    assert difference.max() <= 2, difference.max()
    assert len({image.tobytes() for image in expected}) == len(expected)
    if SCREENSHOTS:
        page.screenshot(path=str(REPO / "docs" / "demo_sampling.png"), full_page=True)


def test_edit_tab_completes_a_painted_region(page, tmp_path):
    digit = digit_picture(tmp_path / "seven.png")
    page.get_by_role("tab", name="Edit").click()
    upload(page, tmp_path / "seven.png")
    canvas = page.locator("#edit_image canvas").first
    page.locator("#edit_image button[aria-label='Brush']").click()
    # A stroke across the image's second row of pixels (the image is centred on the canvas at
    # the editor's zoom), then one down its right edge.
    box = canvas.bounding_box()
    scale = float(page.inner_text("#edit_image .zoom-number").strip().rstrip("%")) / 100
    left = box["x"] + box["width"] / 2 - 64 * scale
    top = box["y"] + box["height"] / 2 - 64 * scale
    for (x0, y0), (x1, y1) in (((8, 20), (120, 20)), ((120, 20), (120, 60))):
        page.mouse.move(left + x0 * scale, top + y0 * scale)
        page.mouse.down()
        for t in np.linspace(0, 1, 12)[1:]:
            page.mouse.move(left + (x0 + t * (x1 - x0)) * scale, top + (y0 + t * (y1 - y0)) * scale)
        page.mouse.up()

    per_class = 3
    set_field(page, "#edit_classes", "7, 1")  # inpainting as a 7, re-classing as a 1
    set_field(page, "#edit_count", per_class)
    set_field(page, "#edit_steps", 16)
    set_field(page, "#edit_seed", 3)
    picture, note, seconds = run(page, "#edit_run", "#edit_grid", "#edit_note")
    print(f"editing in the page: {seconds:.2f} s from the click to the picture; {note}")
    regenerated = check_completions(cells(picture, 2, per_class + 2), digit, per_class)
    # What the strokes covered: row 1 left to right, then down the right edge; the bottom left
    # untouched.
    assert regenerated[1, 1:7].all() and regenerated[1:4, 7].all()
    assert not regenerated[5:, :6].any()
    kept = int(note.split(" of 16 tokens kept")[0].split()[-1])
    assert 0 < kept < 16
    if SCREENSHOTS:
        page.screenshot(path=str(REPO / "docs" / "demo_editing.png"), full_page=True)


def test_edit_tab_takes_a_mask_picture(page, tmp_path):
    digit = digit_picture(tmp_path / "seven.png")
    page.get_by_role("tab", name="Edit").click()
    upload(page, tmp_path / "seven.png")
    expect_error(page, "#edit_run", "nothing to regenerate")  # nothing painted, no mask

    mask = np.zeros((128, 128), np.uint8)
    mask[:, :64] = 255  # regenerate the left half
    Image.fromarray(mask).save(tmp_path / "mask.png")
    page.locator("#edit_mask input[type=file]").set_input_files(tmp_path / "mask.png")
    page.locator("#edit_mask img").wait_for()
    set_field(page, "#edit_classes", "7")
    set_field(page, "#edit_count", 2)
    picture, note, _ = run(page, "#edit_run", "#edit_grid", "#edit_note")
    regenerated = check_completions(cells(picture, 1, 4), digit, 2)
    assert (regenerated == (np.arange(SIDE) < SIDE // 2)[None]).all()
    assert "8 of 16 tokens kept" in note
