"""The demo world: seeded scenes, captions that say what is drawn, exact conditions, data sets."""

import json

import numpy as np
import pytest
from PIL import Image

from engine.demo import world
from engine.errors import SettingError, UsageError
from engine.demo.extractors import extract
from engine.demo.fidelity import dilate
from engine.models.presets import _TINY_WORDS, build_tiny_tokenizer
from engine.demo.world import (BASE_CONDITIONS, CLASS_COLOURS, COLOURS, CONDITIONS, HELD_OUT_CONDITIONS, make_scene,
                               recorded_condition, write_dataset)


def pixels(image):
    return np.asarray(image).astype(int)


def test_scenes_are_determined_by_seed_and_index():
    for i in range(5):
        a, b = make_scene(i, seed=3), make_scene(i, seed=3)
        assert a == b and (pixels(a.image()) == pixels(b.image())).all()
        assert (pixels(a.condition("inpainting")) == pixels(b.condition("inpainting"))).all()
    assert make_scene(0, seed=3) != make_scene(0, seed=4)
    assert make_scene(0, seed=3) != make_scene(1, seed=3)
    assert make_scene(2, seed=3, size=128).objects == make_scene(2, seed=3, size=64).objects
    assert make_scene(2, seed=3, size=128).image().size == (128, 128)


def test_scenes_vary():
    scenes = [make_scene(i) for i in range(60)]
    assert {len(s.objects) for s in scenes} == {1, 2, 3}
    assert len({s.background for s in scenes}) >= 8
    assert len({o.kind for s in scenes for o in s.objects}) == len(world.SHAPES)
    assert sum(s.gradient[1] != 0 for s in scenes) >= 10


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def test_captions_name_what_is_drawn(tokenizer):
    for i in range(40):
        scene = make_scene(i)
        caption, image = scene.caption, pixels(scene.image())
        words = caption.split()
        assert set(words) <= set(_TINY_WORDS), caption  # each word a single token of the tiny tokenizer
        assert len(tokenizer(caption).input_ids) == len(words) + 2
        assert caption.endswith(f"{scene.background} background")
        position = 0
        for shape, visible in zip(scene.objects, scene.visible_masks()):
            phrase = f"{shape.colour} {shape.kind}"
            position = caption.index(phrase, position)  # named in drawing order
            assert visible.sum() > 0
            assert (image[visible] == COLOURS[shape.colour]).all()  # drawn in the colour it is named by
        corners = image[[0, 0, -1, -1], [0, -1, 0, -1]]
        assert np.abs(corners - COLOURS[scene.background]).max() <= world.GRADIENT + 1 or scene.background == "black"
        if len(scene.objects) >= 2:
            a, b = scene.objects[:2]
            relation = caption.split(f"{a.colour} {a.kind} ", 1)[1]
            if relation.startswith("above"):
                assert a.y < b.y
            elif relation.startswith("below"):
                assert a.y > b.y
            elif relation.startswith("left of"):
                assert a.x < b.x
            else:
                assert relation.startswith("right of") and a.x > b.x


def test_condition_sets():
    assert set(BASE_CONDITIONS).isdisjoint(HELD_OUT_CONDITIONS)
    assert set(CONDITIONS) == set(BASE_CONDITIONS) | set(HELD_OUT_CONDITIONS) == set(world.CONDITION_HELP)
    assert BASE_CONDITIONS == ("canny", "seg", "depth", "bbox", "outpainting", "grayscale", "blur", "hed")
    assert {"mosaic", "inpainting", "palette", "sketch"} <= set(HELD_OUT_CONDITIONS)


def test_conditions_are_exact():
    for i in range(12):
        scene = make_scene(i)
        image = scene.image()
        masks, visible = scene.masks(), scene.visible_masks()
        seg, depth, boxes = (pixels(scene.condition(k, image)) for k in ("seg", "depth", "bbox"))
        background = ~np.logical_or.reduce(masks)
        assert (seg[background] == 0).all() and (depth[background] == 0).all()
        greys = []
        for shape, seen, full in zip(scene.objects, visible, masks):
            assert (seg[seen] == CLASS_COLOURS[shape.kind]).all()
            assert len(np.unique(depth[seen], axis=0)) == 1
            greys.append(depth[seen][0, 0])
            ys, xs = np.nonzero(full)
            assert boxes[ys.min():ys.max() + 1, xs.min():xs.max() + 1].any(axis=2).all()
        assert greys == sorted(greys) and len(set(greys)) == len(greys) and greys[-1] == 255  # nearer is brighter
        assert (pixels(scene.condition("canny", image)) == pixels(extract("canny", image))).all()
        assert (pixels(scene.condition("mosaic", image)) == pixels(extract("mosaic", image))).all()
        kept = pixels(scene.condition("outpainting", image)).any(axis=2)
        assert 0.1 < kept.mean() < 0.55 and (pixels(image)[kept] == pixels(scene.condition("outpainting"))[kept]).all()
        hole = ~pixels(scene.condition("inpainting", image)).any(axis=2)
        assert 0.02 < hole.mean() < 0.5
        assert pixels(image).any(axis=2).all()  # scenes never use pure black: it means "masked"
        assert (pixels(scene.condition("grayscale", image)) == pixels(extract("grayscale", image))).all()


def test_blur_and_hed_scale_with_the_size():
    for size in (32, 64):
        scene = make_scene(4, size=size)
        image = scene.image()
        blurred = pixels(scene.condition("blur", image))
        assert (blurred == pixels(extract("blur", image, radius=size / 12))).all()
        assert np.abs(blurred - pixels(image)).max() > 60  # the outlines are gone
        soft = pixels(scene.condition("hed", image))[..., 0]
        edges = pixels(scene.condition("canny", image))[..., 0] > 0
        sigma = size / 32
        assert soft[edges].max() == 255 and np.median(soft[edges]) > 200  # white on the edges ...
        beside = dilate(edges, round(sigma)) & ~edges
        assert 100 < soft[beside].mean() < 250  # ... fading beside them ...
        assert (soft[~dilate(edges, 3 * round(sigma))] == 0).all()  # ... to black
        assert (pixels(scene.condition("hed", image)) == soft[..., None]).all()  # grey


def test_bad_condition_size_and_count(tmp_path):
    with pytest.raises(UsageError, match="unknown world condition 'openpose'"):
        make_scene(0).condition("openpose")
    with pytest.raises(UsageError, match="multiple of 8"):
        make_scene(0, size=60)
    # Settings are refused naming the setting (the CLI words it as the flag: --count, --size).
    for args, setting, message in [((0,), "count", "must be at least 1, not 0"),
                                   ((2, 1024), "size", "must be a multiple of 8 from 32 to 512, not 1024"),
                                   ((2, 64, -1), "seed", "must be between 0 and 4294967295, not -1")]:
        with pytest.raises(SettingError, match=message) as refused:
            write_dataset(tmp_path / "d", "canny", *args)
        assert refused.value.setting == setting
    assert not (tmp_path / "d").exists()


def read_index(folder):
    return [json.loads(line) for line in (folder / "prompt.json").read_text().splitlines()]


def test_write_dataset_makes_the_fit_layout(tmp_path):
    folder = tmp_path / "canny"
    write_dataset(folder, "canny", 6, size=64, seed=5)
    records = read_index(folder)
    assert len(records) == 6
    for i, record in enumerate(records):
        assert record == {"source": f"source/{i}.png", "target": f"target/{i}.png",
                          "prompt": make_scene(i, 5).caption}
        source, target = Image.open(folder / record["source"]), Image.open(folder / record["target"])
        assert source.size == target.size == (64, 64) and source.mode == target.mode == "RGB"
        scene = make_scene(i, 5)
        assert (pixels(target) == pixels(scene.image())).all()
        assert (pixels(source) == pixels(scene.condition("canny"))).all()
    assert json.loads((folder / "world.json").read_text())["condition"] == "canny"
    assert sorted(p.name for p in (folder / "source").iterdir()) == sorted(f"{i}.png" for i in range(6))


def test_write_dataset_refuses_to_clobber_and_replaces_with_force(tmp_path):
    folder = tmp_path / "d"
    write_dataset(folder, "seg", 5)
    with pytest.raises(SettingError, match="needed to replace the data set already in") as refused:
        write_dataset(folder, "seg", 2)
    assert refused.value.setting == "force"
    assert recorded_condition(folder) == "seg"
    write_dataset(folder, "depth", 2, force=True)
    assert recorded_condition(folder) == "depth" and recorded_condition(tmp_path) is None
    assert len(read_index(folder)) == 2
    assert sorted(p.name for p in (folder / "target").iterdir()) == ["0.png", "1.png"]  # no stale pairs


def test_an_interrupted_run_leaves_no_index_pointing_at_missing_files(tmp_path):
    def interrupt_at(n):
        def callback(update):
            if update.completed == n:
                raise KeyboardInterrupt
        return callback

    folder = tmp_path / "d"
    with pytest.raises(KeyboardInterrupt):
        write_dataset(folder, "palette", 5, progress=interrupt_at(2))
    assert not (folder / "prompt.json").exists()
    write_dataset(folder, "palette", 3)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(folder, "sketch", 5, force=True, progress=interrupt_at(2))
    assert not (folder / "prompt.json").exists()  # the old index went first
    assert not [p for p in folder.rglob("*.tmp")]


def test_the_tiny_tokenizer_keeps_every_known_word_whole(tokenizer):
    assert [w for w in _TINY_WORDS if len(tokenizer.tokenize(w)) != 1] == []
