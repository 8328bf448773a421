"""The browser demo (declip_hf.segmentation.demo): its functions directly, the launched app through gradio_client, and
one real-browser smoke test in headless Chromium."""

import shutil
import sys
import time

import numpy as np
import pytest
from PIL import Image

from declip_hf.analysis import final_layer_attention
from declip_hf.models.preprocessing import prepare_dense_inputs
from declip_hf.segmentation import demo
from declip_hf.segmentation.demo import DemoSettings, clicked_patch, point_maps, resolve_map_size, segment_image
from declip_hf.segmentation.segment import palette
from declip_hf.segmentation.segmenter import DeCLIPSegmenter

# Small enough for milliseconds on the tiny model (patch 4): one 32 px window, an 8 x 8 grid for the point maps.
SETTINGS = DemoSettings(shorter_side=32, window=32, stride=16, logit_scale=40.0, map_size=32)
IMAGE_SIZE = (60, 40)  # width, height: not square, so the letterbox's padding and scale matter
SERVER_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def segmenter(tiny_clip_dir) -> DeCLIPSegmenter:
    return DeCLIPSegmenter.from_pretrained(tiny_clip_dir)


@pytest.fixture
def image() -> Image.Image:
    """Left half red, right half blue, with some noise so no two patches are identical."""
    pixels = np.zeros((IMAGE_SIZE[1], IMAGE_SIZE[0], 3), dtype=np.uint8)
    pixels[:, : IMAGE_SIZE[0] // 2] = (200, 30, 30)
    pixels[:, IMAGE_SIZE[0] // 2 :] = (30, 30, 200)
    noise = np.random.default_rng(0).integers(0, 40, pixels.shape, dtype=np.uint8)
    return Image.fromarray(pixels + noise)


# --------------------------------------------------------------------------------------------------------------------
# The page's functions
# --------------------------------------------------------------------------------------------------------------------


def test_clicked_patch_follows_the_letterbox():
    # 60 x 40 image into a 32 px square, 8 x 8 patches of 4 px: scale 32 / 60, the image fills the top 21 rows.
    assert clicked_patch(0, 0, (60, 40), (8, 8)) == 0
    assert clicked_patch(59.9, 39.9, (60, 40), (8, 8)) == 5 * 8 + 7
    assert clicked_patch(30, 10, (60, 40), (8, 8)) == 1 * 8 + 4
    # A tall image: columns are the short side.
    assert clicked_patch(19, 59, (20, 60), (8, 8)) == 7 * 8 + 2
    with pytest.raises(ValueError, match="outside the 60x40 image"):
        clicked_patch(60, 5, (60, 40), (8, 8))


def test_segment_image_gives_an_overlay_with_a_legend(segmenter, image):
    overlay, areas = segment_image(segmenter, image, "cat, dog; puppy, grass", SETTINGS)
    # The legend panel on the right (taller than a small image: it grows with the number of classes).
    assert overlay.height >= image.height and overlay.width > image.width
    assert [part.rsplit(" ", 1)[0] for part in areas.split(", ")] == ["cat", "dog / puppy", "grass"]
    shares = [float(part.rsplit(" ", 1)[1].rstrip("%")) for part in areas.split(", ")]
    assert sum(shares) == pytest.approx(100.0, abs=0.2)
    # Every image pixel is the 55 % blend of the photo with its class colour (colour_overlay), one of three colours.
    label_map = segmenter([image], ["cat", "dog; puppy", "grass"], shorter_side=32, window=32, stride=16).label_maps[0]
    colours = np.array(palette(3), dtype=np.float32)[label_map.numpy()]
    expected = np.asarray(image, dtype=np.float32) * 0.45 + colours * 0.55
    got = np.asarray(overlay, dtype=np.float32)[: image.height, : image.width]
    assert np.abs(got - expected).max() <= 1.0
    # The legend shows each class's swatch.
    legend = np.asarray(overlay)[:, image.width :].reshape(-1, 3)
    for colour in palette(3):
        assert (legend == colour).all(axis=1).any(), colour


@pytest.mark.parametrize(
    "labels, message",
    [(" , ", "at least one class name"), ("cat, Cat", "unique"), ("cat,,", None)],
)
def test_segment_image_checks_the_typed_names(segmenter, image, labels, message):
    if message is None:  # empty entries between commas are ignored
        assert segment_image(segmenter, image, labels, SETTINGS)[1].startswith("cat ")
        return
    with pytest.raises(ValueError, match=message):
        segment_image(segmenter, image, labels, SETTINGS)


def test_functions_refuse_a_missing_image(segmenter):
    with pytest.raises(ValueError, match="Upload an image"):
        segment_image(segmenter, None, "cat", SETTINGS)
    with pytest.raises(ValueError, match="Upload an image"):
        point_maps(segmenter, None, 1, 1, SETTINGS)


VIRIDIS_TOP = np.array((253, 231, 37))


def _shown(image: Image.Image, colour) -> np.ndarray:
    """What the map draws at a pixel of `image` whose value is the top of the colour scale."""
    return np.asarray(image).astype(np.float32) * (1 - demo._MAP_OPACITY) + np.asarray(colour) * demo._MAP_OPACITY


def _patch_pixel(row: int, column: int) -> tuple[int, int]:
    """A pixel (x, y) of the 60 x 40 image inside patch (row, column) of the 8 x 8 grid (scale 32 / 60): the
    patch's bottom-right map pixel (4 column + 3, 4 row + 3), taken back to the image."""
    return int((4 * column + 3.5) * 60 / 32), int((4 * row + 3.5) * 60 / 32)


def test_point_maps_are_drawn_over_the_image(segmenter, image):
    maps = point_maps(segmenter, image, 45, 12, SETTINGS)
    assert maps.correlation.size == maps.attention.size == image.size
    assert "row 1, column 6" in maps.caption and "'qq'" in maps.caption
    correlation = np.asarray(maps.correlation).astype(np.int32)
    # The marker: a red ring around the clicked pixel.
    assert demo.marker_radius(image.size) == 5 and tuple(correlation[12, 45 + 5]) == (255, 0, 0)
    # The clicked patch correlates 1 with itself: drawn in the scale's top colour (viridis yellow).
    x, y = _patch_pixel(1, 6)
    assert np.abs(correlation[y, x] - _shown(image, VIRIDIS_TOP)[y, x]).max() <= 1.5
    # The attention map is the clicked patch's row: its most attended patch is drawn in the top colour.
    pixel_values = prepare_dense_inputs(
        image, SETTINGS.map_size, segmenter.image_mean.flatten().tolist(), segmenter.image_std.flatten().tolist()
    )
    expected = final_layer_attention(segmenter.vision_model, pixel_values, 1 * 8 + 6)[:6]  # the rows the image covers
    row, column = divmod(int(expected.argmax()), 8)
    x, y = _patch_pixel(row, column)
    attention = np.asarray(maps.attention).astype(np.int32)
    assert np.abs(attention[y, x] - _shown(image, VIRIDIS_TOP)[y, x]).max() <= 1.5


def test_point_maps_of_a_baseline_mode_name_the_flag(segmenter, image):
    segmenter.vision_model.config.decoupled_attention = "maskclip"
    try:
        with pytest.raises(ValueError, match="--decoupled-attention qq"):
            point_maps(segmenter, image, 5, 5, SETTINGS)
    finally:
        segmenter.vision_model.config.decoupled_attention = "qq"


def test_map_size_defaults_to_the_recorded_training_size(tmp_path, tiny_clip_dir):
    (tmp_path / "preprocessor_config.json").write_text('{"declip_training_size": 64}')
    assert resolve_map_size(0, str(tmp_path), 4) == 64
    assert resolve_map_size(0, str(tiny_clip_dir), 16) == demo.DEFAULT_MAP_SIZE  # nothing recorded
    assert resolve_map_size(40, str(tiny_clip_dir), 4) == 40
    with pytest.raises(ValueError, match="multiple of the patch size 16; use 32"):
        resolve_map_size(40, str(tiny_clip_dir), 16)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--stride", "400"], "--stride"),
        (["--map-size", "0"], "--map-size"),
        (["--windows-per-batch", "0"], "--windows-per-batch"),
    ],
)
def test_cli_checks_flags_before_loading_the_model(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--model", "no/such-model-is-loaded", *flags])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error and "Traceback" not in error


# --------------------------------------------------------------------------------------------------------------------
# The launched app (Gradio optional: the [demo] extra, which .ci/run installs)
# --------------------------------------------------------------------------------------------------------------------


def test_cli_without_gradio_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # an environment without the demo extra
    with pytest.raises(SystemExit, match=r'pip install "declip-hf\[demo\]"'):
        demo.main(["--model", "no/such-model-is-loaded"])


@pytest.fixture(scope="module")
def running_app(segmenter, tmp_path_factory):
    """The demo served on 127.0.0.1 in this process; closed after the module's tests."""
    pytest.importorskip("gradio", reason='Gradio is not installed: pip install "declip-hf[demo]"')
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))  # uploads and outputs
        patch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never download a browser or driver
        page = demo.build_demo(segmenter, SETTINGS, title="DeCLIP test")
        page.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
        try:
            yield page.local_url
        finally:
            page.close()


def test_app_answers_through_gradio_client(running_app, image, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    image.save(tmp_path / "in.png")
    client = Client(running_app, verbose=False, download_files=str(tmp_path / "downloads"))
    assert set(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == {
        "/segment", "/point_maps"
    }
    overlay_path, areas = client.predict(handle_file(str(tmp_path / "in.png")), "cat, grass", api_name="/segment")
    with Image.open(overlay_path) as overlay:
        assert overlay.height >= image.height and overlay.width > image.width
    assert areas.startswith("cat ") and ", grass " in areas
    correlation_path, attention_path, caption = client.predict(
        handle_file(str(tmp_path / "in.png")), 45, 12, api_name="/point_maps"
    )
    for path in (correlation_path, attention_path):
        with Image.open(path) as rendered:
            assert rendered.size == image.size
    assert "row 1, column 6" in caption
    # A user error comes back as its message, not a generic failure.
    with pytest.raises(AppError, match="at least one class name"):
        client.predict(handle_file(str(tmp_path / "in.png")), " ", api_name="/segment")
    with pytest.raises(AppError, match="Click a point"):
        client.predict(handle_file(str(tmp_path / "in.png")), None, None, api_name="/point_maps")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="No headless Chromium: apt-get install chromium chromium-driver (.ci/run does) to run the browser test",
)
def test_browser_uploads_an_image_and_shows_the_overlay(running_app, image, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the test extra has it)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as expected
    from selenium.webdriver.support.ui import WebDriverWait

    image.resize((240, 160), Image.Resampling.NEAREST).save(tmp_path / "upload.png")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1200"):
        options.add_argument(argument)
    browser = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    try:
        browser.get(running_app)
        wait = WebDriverWait(browser, SERVER_TIMEOUT_S)
        upload = wait.until(expected.presence_of_element_located((By.CSS_SELECTOR, "#image input[type=file]")))
        upload.send_keys(str(tmp_path / "upload.png"))
        wait.until(expected.presence_of_element_located((By.CSS_SELECTOR, "#image img")))
        labels = browser.find_element(By.CSS_SELECTOR, "#labels textarea")
        labels.clear()
        labels.send_keys("red, blue")
        browser.find_element(By.CSS_SELECTOR, "#segment").click()
        overlay = wait.until(expected.visibility_of_element_located((By.CSS_SELECTOR, "#overlay img")))
        wait.until(lambda _: "red " in browser.find_element(By.CSS_SELECTOR, "#areas textarea").get_attribute("value"))
        assert overlay.get_attribute("naturalWidth") not in (None, "0")
        # A click on the input image picks a point (Gradio's select event) and draws its two maps.
        browser.find_element(By.CSS_SELECTOR, "#image img").click()
        for name in ("correlation", "attention"):
            wait.until(expected.visibility_of_element_located((By.CSS_SELECTOR, f"#{name} img")))
        wait.until(lambda _: "Patch (row" in browser.find_element(By.CSS_SELECTOR, "#caption").text)
        time.sleep(0.5)  # let the images finish painting before the screenshot
        browser.save_screenshot(str(tmp_path / "demo_page.png"))
    finally:
        browser.quit()
    with Image.open(tmp_path / "demo_page.png") as screenshot:
        assert screenshot.size[0] >= 1000
