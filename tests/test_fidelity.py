"""The fidelity metric: perfect for the image a condition came from, poor for another image."""

import numpy as np
import pytest
from PIL import Image, ImageFilter

from engine.errors import SettingError, UsageError
from engine.demo.fidelity import PRIMARY, aggregate, edge_scores, fidelity, iou
from engine.demo.world import CONDITIONS, make_scene

EXACT = {"canny", "sketch", "hed", "outpainting", "inpainting", "mosaic", "palette", "grayscale", "blur"}


@pytest.mark.parametrize("kind", CONDITIONS)
def test_a_scene_follows_its_own_condition_and_not_another(kind):
    metric, higher_is_better = PRIMARY[kind]
    own, other = [], []
    for i in range(8):
        scene = make_scene(i, seed=1)
        image = scene.image()
        condition = scene.condition(kind, image)
        own.append(fidelity(kind, image, condition))
        other.append(fidelity(kind, make_scene(i + 50, seed=1).image(), condition))
    own_mean, other_mean = aggregate(own)[metric], aggregate(other)[metric]
    if kind in EXACT:
        assert own_mean == (1.0 if higher_is_better else 0.0)
    else:
        assert own_mean >= 0.85
    if higher_is_better:
        assert other_mean < 0.6 and other_mean < own_mean - 0.3
    else:
        assert other_mean > 0.02


def test_fidelity_degrades_gracefully_with_a_blurred_copy():
    scene = make_scene(3)
    image = scene.image()
    soft = image.filter(ImageFilter.GaussianBlur(0.7))
    canny = fidelity("canny", soft, scene.condition("canny", image))
    assert 0.8 < canny["f1"] <= 1.0
    assert 0 < fidelity("mosaic", soft, scene.condition("mosaic", image))["mse"] < 0.005
    assert 0.8 < fidelity("hed", soft, scene.condition("hed", image))["f1"] <= 1.0
    assert 0 < fidelity("grayscale", soft, scene.condition("grayscale", image))["mse"] < 0.01
    # blur and hed default to the world's settings for the condition's size; given ones are checked
    assert fidelity("blur", image, scene.condition("blur", image), radius=4)["mse"] > 0
    with pytest.raises(SettingError, match="greater than 0"):
        fidelity("hed", image, scene.condition("hed", image), sigma=0)


def test_edge_scores_tolerance():
    wanted = np.zeros((32, 32), bool)
    wanted[10, 5:25] = True
    shifted = np.roll(wanted, 1, axis=0)
    assert edge_scores(shifted, wanted, tolerance=1)["f1"] == 1.0
    assert edge_scores(shifted, wanted, tolerance=0)["f1"] == 0.0
    half = wanted.copy()
    half[10, 15:] = False
    scores = edge_scores(half, wanted, tolerance=0)
    assert scores["precision"] == 1.0 and scores["recall"] == 0.5 and abs(scores["f1"] - 2 / 3) < 1e-12
    assert edge_scores(np.zeros((4, 4), bool), np.zeros((4, 4), bool))["f1"] == 1.0
    assert iou(wanted, half) == 0.5


def test_a_generated_image_of_another_size_is_resized():
    scene = make_scene(0, size=64)
    big = make_scene(0, size=128).image()
    assert fidelity("outpainting", big, scene.condition("outpainting"))["mse"] < 0.01


def test_aggregate_and_unknown_kind():
    assert aggregate([{"f1": 1.0, "precision": 1.0}, {"f1": 0.5}]) == {"f1": 0.75, "precision": 1.0, "count": 2}
    assert aggregate([]) == {"count": 0}
    with pytest.raises(UsageError, match="no fidelity measure for 'openpose'"):
        fidelity("openpose", Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8)))
