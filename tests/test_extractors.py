"""Built-in condition extractors: numbers on drawn images, and one-line refusals."""

from collections import deque

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from engine.errors import UsageError
from engine.demo.extractors import (SPECS, extract, label_components, region_boxes, resolve_kind)


def square_image(size=64, box=(16, 16, 47, 47), fg=(30, 60, 200), bg=(200, 200, 40)) -> Image.Image:
    image = Image.new("RGB", (size, size), bg)
    ImageDraw.Draw(image).rectangle(box, fill=fg)
    return image


def as_mask(image: Image.Image) -> np.ndarray:
    return np.asarray(image)[..., 0] > 127


def square_outline(size=64, box=(16, 16, 47, 47), width=1) -> np.ndarray:
    """Pixels within ``width`` of the square's boundary (either side)."""
    x0, y0, x1, y1 = box
    ys, xs = np.mgrid[0:size, 0:size]
    inside_outer = (xs >= x0 - width) & (xs <= x1 + width) & (ys >= y0 - width) & (ys <= y1 + width)
    inside_inner = (xs > x0 + width - 1) & (xs < x1 - width + 1) & (ys > y0 + width - 1) & (ys < y1 - width + 1)
    return inside_outer & ~inside_inner


def test_canny_finds_the_square_and_nothing_in_flat_regions():
    edges = as_mask(extract("canny", square_image()))
    near = square_outline(width=1)
    assert edges.sum() > 0 and not (edges & ~near).any()  # every edge pixel hugs the boundary
    for side in (edges[16:48, 14:18], edges[16:48, 46:50], edges[14:18, 16:48], edges[46:50, 16:48]):
        assert side.any(axis=1 if side.shape[0] == 32 else 0).all()  # each side is closed
    assert edges[14:50, 15].sum() <= 36 and edges[30].sum() == 2  # one pixel wide
    assert not as_mask(extract("canny", Image.new("RGB", (64, 64), (90, 20, 200)))).any()


def test_canny_sees_colours_of_equal_brightness():
    # Red on green of about the same luminance: a grey-only Canny would miss it.
    image = square_image(fg=(200, 50, 50), bg=(50, 110, 50))
    assert abs(np.asarray(image.convert("L")).astype(int)[0, 0] - np.asarray(image.convert("L")).astype(int)[30, 30]) < 25
    assert as_mask(extract("canny", image)).sum() > 100


def test_canny_thresholds_matter():
    image = Image.new("RGB", (64, 64), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.rectangle((4, 4, 27, 27), fill=(255, 255, 255))  # strong step
    draw.rectangle((36, 36, 59, 59), fill=(30, 30, 30))  # faint step: Sobel L1 magnitude <= 180, under high=200
    default = as_mask(extract("canny", image))
    assert default[:32, :32].sum() > 80 and not default[32:, 32:].any()
    sensitive = as_mask(extract("canny", image, low=20, high=40))
    assert sensitive[32:, 32:].sum() > 80
    assert not as_mask(extract("canny", image, low=2000, high=3000)).any()
    # A blur (sigma > 0) softens the gradients: the strong square's 1020 drops under high=1000.
    assert as_mask(extract("canny", image, low=900, high=1000, sigma=0))[:32, :32].sum() > 80
    assert not as_mask(extract("canny", image, low=900, high=1000, sigma=1)).any()


def test_canny_matches_opencv():
    """The built-in canny is cv2.Canny(image, 100, 200) (L1 gradient, no blur) on several images:
    drawn shapes, blurred and noisy versions of them, colour and grey."""
    import cv2

    rng = np.random.default_rng(0)
    for k in range(4):
        image = Image.new("RGB", (160, 120), tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(10):
            x, y = (int(v) for v in rng.integers(0, 130, 2))
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            draw.ellipse((x, y, x + int(rng.integers(5, 60)), y + int(rng.integers(5, 60))), fill=colour)
            draw.line(tuple(int(v) for v in rng.integers(0, 160, 4)), fill=colour[::-1], width=int(rng.integers(1, 4)))
        array = np.asarray(image.filter(ImageFilter.GaussianBlur(0.7 * k))).astype(float)
        array = (array + rng.normal(0, 6 * k, array.shape)).clip(0, 255).astype(np.uint8)
        for sample in (array, np.ascontiguousarray(array[..., 1])):
            theirs = cv2.Canny(sample, 100, 200) > 0
            ours = as_mask(extract("canny", Image.fromarray(sample)))
            f1 = 2 * (theirs & ours).sum() / (theirs.sum() + ours.sum())
            assert theirs.sum() > 300 and f1 >= 0.99, (k, sample.ndim, f1)


def test_canny_hysteresis_keeps_weak_edges_only_when_linked():
    # A white bar on a background ramping from black to light grey: its edges start strong and fade
    # to weak. A second bar of constant faint contrast is weak everywhere.
    ramp = np.repeat(np.linspace(0, 220, 64)[None, :], 64, axis=0)
    array = ramp.copy()
    array[10:21, 4:60] = 255
    array[40:51, 4:60] = ramp[40:51, 4:60] + 25
    image = Image.fromarray(np.repeat(array.round().clip(0, 255).astype(np.uint8)[..., None], 3, axis=2))
    edges = as_mask(extract("canny", image, low=100, high=200))
    top = edges[8:12]
    assert top[:, 6:58].any(axis=0).all()  # the whole top edge, the weak end included
    assert not edges[36:56].any()  # the lone weak bar is dropped
    strict = as_mask(extract("canny", image, low=400, high=400))
    assert strict[8:12, 6:40].any(axis=0).all() and not strict[8:12, 50:58].any()
    assert not as_mask(extract("canny", image, low=20, high=60))[16, 6:58].any()  # flat inside


def test_label_components_matches_a_flood_fill():
    rng = np.random.default_rng(0)
    for density in (0.3, 0.5, 0.6):
        mask = rng.random((40, 37)) < density
        labels, count = label_components(mask)
        expected, expected_count = _flood_fill(mask)
        assert count == expected_count
        # the same partition: a one-to-one map between label sets
        pairs = set(zip(labels[mask].tolist(), expected[mask].tolist()))
        assert len(pairs) == count == len({a for a, _ in pairs}) == len({b for _, b in pairs})
        assert (labels[~mask] == 0).all()


def _flood_fill(mask):
    labels = np.zeros(mask.shape, int)
    count = 0
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        count += 1
        labels[start] = count
        queue = deque([start])
        while queue:
            y, x = queue.popleft()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = count
                        queue.append((ny, nx))
    return labels, count


def test_mosaic_is_constant_blocks_of_block_means():
    rng = np.random.default_rng(1)
    array = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    out = np.asarray(extract("mosaic", Image.fromarray(array), block=8)).astype(int)
    assert out.shape == array.shape
    for y0 in range(0, 50, 8):
        for x0 in range(0, 70, 8):
            block = out[y0:y0 + 8, x0:x0 + 8].reshape(-1, 3)
            assert (block == block[0]).all()
            mean = array[y0:y0 + 8, x0:x0 + 8].reshape(-1, 3).mean(axis=0)
            assert np.abs(block[0] - mean).max() <= 0.5 + 1e-9
    assert len(np.unique(out.reshape(-1, 3), axis=0)) > 40
    auto = np.asarray(extract("pixelate", Image.fromarray(array)))  # alias; block = 50 // 16 = 3
    assert (auto[:3, :3] == auto[0, 0]).all() and not (auto[:, :4] == auto[0, 0]).all()


def test_palette_has_at_most_k_colours_on_a_grid():
    rng = np.random.default_rng(2)
    smooth = np.stack([*np.meshgrid(np.linspace(0, 255, 64), np.linspace(0, 255, 64)), rng.uniform(0, 255, (64, 64))],
                      axis=2).astype(np.uint8)
    image = Image.fromarray(smooth)
    for k in (1, 3, 6):
        out = np.asarray(extract("palette", image, colors=k, grid=8))
        assert len(np.unique(out.reshape(-1, 3), axis=0)) == k
        cells = out.reshape(8, 8, 8, 8, 3)
        assert (cells == cells[:, :1, :, :1]).all()  # constant over each 8 x 8 cell
    two_tone = square_image(box=(0, 0, 31, 63))
    out = np.asarray(extract("palette", two_tone, colors=6))
    assert {tuple(c) for c in np.unique(out.reshape(-1, 3), axis=0)} == {(30, 60, 200), (200, 200, 40)}
    again = np.asarray(extract("palette", image, colors=6))
    assert (again == np.asarray(extract("palette", image, colors=6))).all()  # deterministic


def test_outpainting_keeps_the_centre():
    rng = np.random.default_rng(3)
    array = rng.integers(1, 256, (64, 80, 3), dtype=np.uint8)
    out = np.asarray(extract("outpainting", Image.fromarray(array), ratio=0.5))
    kept = out.any(axis=2)
    ys, xs = np.nonzero(kept)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (16, 47, 20, 59)
    assert (out[kept] == array[kept]).all() and kept.sum() == 32 * 40
    assert (np.asarray(extract("outpainting", Image.fromarray(array), ratio=1.0)) == array).all()


def test_inpainting_rect_and_brush():
    rng = np.random.default_rng(4)
    array = rng.integers(1, 256, (64, 64, 3), dtype=np.uint8)
    image = Image.fromarray(array)
    out = np.asarray(extract("inpainting", image, box="0.25,0.5,0.75,1"))
    hole = ~out.any(axis=2)
    assert hole[32:, 16:48].all() and hole.sum() == 32 * 32
    assert (out[~hole] == array[~hole]).all()
    brush = ~np.asarray(extract("inpainting", image, mode="brush", seed=7)).any(axis=2)
    assert 50 < brush.sum() < 64 * 64 * 0.8
    assert (brush == ~np.asarray(extract("inpainting", image, mode="brush", seed=7)).any(axis=2)).all()
    assert (brush != ~np.asarray(extract("inpainting", image, mode="brush", seed=8)).any(axis=2)).any()


def test_bbox_boxes_each_coloured_region():
    mask = Image.new("RGB", (64, 64))
    draw = ImageDraw.Draw(mask)
    draw.ellipse((5, 10, 24, 29), fill=(255, 0, 0))
    draw.polygon([(40, 30), (60, 60), (30, 55)], fill=(0, 0, 255))
    draw.point((62, 2), fill=(0, 255, 0))  # a speck, below min_area
    found = region_boxes(np.asarray(mask))
    assert found == [((30, 30, 60, 60), (0, 0, 255)), ((5, 10, 24, 29), (255, 0, 0))]  # largest first
    out = np.asarray(extract("bbox", mask))
    assert (out[10:30, 5:25] == (255, 0, 0)).all() and (out[30:61, 30:61] == (0, 0, 255)).all()
    assert out.any(axis=2).sum() == 20 * 20 + 31 * 31
    outline = np.asarray(extract("bbox", mask, fill="false", width=1)).any(axis=2)
    assert outline[10, 5:25].all() and not outline[20, 15]


def test_sketch_draws_dark_strokes_at_boundaries():
    out = np.asarray(extract("sketch", square_image()))[..., 0]
    strokes = out < 128
    assert strokes.sum() > 4 * 32 and not (strokes & ~square_outline(width=2)).any()
    assert (out[30, 30] == 255) and (out[2, 2] == 255)


def test_grayscale_and_blur():
    image = square_image()
    gray = np.asarray(extract("grayscale", image))
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert (np.asarray(extract("blur", image, radius=0)) == np.asarray(image)).all()
    blurred = np.asarray(extract("blur", image, radius="3")).astype(float)
    assert blurred.std() < np.asarray(image).astype(float).std()


@pytest.mark.parametrize("kind, params, message", [
    ("canny", {"low": "abc"}, "canny: low must be a number"),
    ("canny", {"low": 300, "high": 200}, "must not exceed high"),
    ("canny", {"colour": 1}, "canny has no parameter 'colour'"),
    ("mosaic", {"block": "2.5"}, "mosaic: block must be a whole number"),
    ("palette", {"colors": 0}, "palette: colors must be between 1 and 64"),
    ("outpainting", {"ratio": 0}, "outpainting: ratio must be between"),
    ("inpainting", {"mode": "lasso"}, "inpainting: mode must be one of rect, brush"),
    ("inpainting", {"box": "0,0,1"}, "inpainting: box must be four fractions"),
    ("bbox", {"fill": "maybe"}, "bbox: fill must be true or false"),
    ("depth", {}, "needs an annotator network"),
    ("lineart", {}, "give a ready lineart condition image"),
    ("sparkles", {}, "unknown condition kind 'sparkles'"),
])
def test_bad_parameters_are_one_line_usage_errors(kind, params, message):
    with pytest.raises(UsageError) as info:
        extract(kind, square_image(), **params)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert info.value.exit_code == 2


def test_every_kind_returns_an_rgb_image_of_the_same_size():
    image = square_image(size=40).resize((40, 24))
    for kind in SPECS:
        out = extract(kind, image)
        assert out.mode == "RGB" and out.size == (40, 24), kind
    assert resolve_kind("Outpaint") == "outpainting"
