"""Annotators: the reference's post-processing on hand-made numbers, every network built small from
its config with random weights and run offline, the published files' key names, and an
annotator's weights pulled through the local test hub and used by ``prep`` on a folder."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from engine import annotators
from engine.annotators import nets, pose, post
from engine.annotators.ade20k import PALETTE
from engine.annotators.random_weights import ENTRY_KINDS, write_random
from engine.errors import CheckpointError, SettingError, UsageError


def photo(width=96, height=64, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------
# post-processing, by hand


def test_detection_size_is_the_short_side_then_multiples_of_64():
    assert post.detection_size(640, 480, 512) == (704, 512)  # 682.7 -> 704
    assert post.detection_size(512, 512, 512) == (512, 512)
    assert post.detection_size(1000, 300, 256) == (832, 256)  # 853.3 -> 832
    assert post.resize_for_detection(np.zeros((300, 1000, 3), np.uint8), 256).shape == (256, 832, 3)


def test_depth_is_min_max_normalised_and_near_is_white():
    image = post.depth_image(np.array([[0.0, 1.0], [2.0, 4.0]]) + 7)
    assert image[..., 0].tolist() == [[0, 63], [127, 255]] and (image[..., 0] == image[..., 2]).all()


def test_normal_from_depth_gradients_with_a_background_threshold():
    depth = np.tile(np.arange(16, dtype=np.float32), (8, 1))  # a ramp: slope 1 along x
    normal = post.normal_image(depth, a=2.0, bg_th=0.1).astype(int)
    # Sobel of a unit ramp is 8 inside: (8, 0, 2) / sqrt(68), mapped to 0..255 (truncated)
    x, z = 8 / math.sqrt(68), 2 / math.sqrt(68)
    assert normal[4, 8].tolist() == [int(x * 127.5 + 127.5), 127, int(z * 127.5 + 127.5)]
    # columns 0 and 1 are under 10% of the depth range: background, facing the camera
    assert normal[4, 0].tolist() == normal[4, 1].tolist() == [127, 127, 255]


def test_seg_draws_the_ade20k_palette_with_reversed_channels():
    image = post.seg_image(np.array([[0, 2], [4, 149]]))
    assert image[0, 0].tolist() == [120, 120, 120] and image[0, 1].tolist() == [230, 230, 6]  # wall, sky
    assert image[1, 0].tolist() == PALETTE[4][::-1].tolist() and PALETTE.shape == (150, 3)


def test_hed_averages_the_side_outputs_through_a_sigmoid():
    sides = [np.zeros((8, 8)), np.full((4, 4), 2.0), np.full((2, 2), -2.0)]
    assert (post.hed_image(sides, 8, 8) == 127).all()  # mean 0 -> sigmoid 0.5 -> 127
    assert (post.hed_image([np.full((4, 4), 50.0)], 8, 8) == 255).all()


def test_hedsketch_thresholds_inverts_and_blurs():
    hed = np.zeros((32, 32, 3), np.uint8)
    hed[:, 13:19] = 200
    sketch = post.hedsketch_image(hed, seed=3)
    assert (sketch[:, :10] == 255).all() and (sketch[:, 14:18] < 5).all()  # dark strokes on white
    assert 0 < sketch[5, 13, 0] < 255  # blurred edge
    assert (post.hedsketch_image(hed, seed=3) == sketch).all()


def test_lineart_keeps_the_generators_output():
    assert post.lineart_image(np.array([[0.0, 0.5, 1.0]]))[0, :, 0].tolist() == [0, 127, 255]


def _blob(shape, x, y, value=0.9, sigma=2.0):
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]]
    return value * np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma ** 2))


def test_openpose_assembles_a_person_and_draws_the_coco_colours():
    h, w = 96, 96
    joints = {1: (48, 20), 2: (48, 40), 3: (28, 40), 6: (68, 40)}  # nose, neck, right and left shoulder
    heat = np.zeros((h, w, 19))
    for j, (x, y) in joints.items():
        heat[..., j - 1] = _blob((h, w), x, y)
    pafs = np.zeros((h, w, 38))
    for k, (a, b) in enumerate(pose.LIMBS):
        if a in joints and b in joints:
            (xa, ya), (xb, yb) = joints[a], joints[b]
            norm = math.hypot(xb - xa, yb - ya)
            cx, cy = pose.PAF_CHANNELS[k]
            pafs[..., cx], pafs[..., cy] = (xb - xa) / norm, (yb - ya) / norm
    peaks = pose.find_peaks(heat)
    assert [(p[0], p[1]) for p in peaks[1]] == [(48, 40)] and not peaks[4]
    candidates, people = pose.assemble(peaks, pose.connect(peaks, pafs, h))
    assert len(people) == 1 and people[0][-1] == 4
    image = pose.draw(candidates, people, h, w)
    assert image[40, 48].tolist() == list(pose.COLOURS[1])  # the neck's disc
    assert image[40, 38].tolist() == [int(c * 0.6) for c in pose.COLOURS[0]]  # neck-right shoulder limb, dimmed
    assert image[80, 10].tolist() == [0, 0, 0]
    # three joints are too few for a person
    heat[..., 5] = 0
    peaks = pose.find_peaks(heat)
    assert len(pose.assemble(peaks, pose.connect(peaks, pafs, h))[1]) == 0


# ---------------------------------------------------------------------------------------------
# networks: published key names, random small copies run end to end


def test_our_networks_carry_the_published_files_key_names():
    assert {"norm", "block1.convs.0.weight", "block1.projection.bias", "block5.convs.2.weight"} <= set(
        nets.HEDNet().state_dict())
    assert {"model0.1.weight", "model1.3.weight", "model2.2.conv_block.5.bias", "model3.3.weight",
            "model4.1.weight"} <= set(nets.LineartNet().state_dict())
    body = nets.BodyPoseNet()
    assert sum(v.numel() for v in body.state_dict().values()) == 52_311_446  # body_pose_model.pth's size
    short = {k.split(".", 1)[1]: v for k, v in body.state_dict().items()}  # the file names layers alone
    assert "Mconv7_stage6_L2.weight" in short and "conv4_4_CPM.bias" in short
    assert set(nets.body_pose_keys(body, short)) == set(body.state_dict())


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("annotators")
    return {entry: write_random(entry, root / entry) for entry in ENTRY_KINDS}


def test_every_kind_runs_offline_on_random_weights(weights):
    images = [photo(), photo(seed=1)]
    for entry, kinds in ENTRY_KINDS.items():
        for kind in kinds:
            made = list(annotators.annotate(kind, images, weights[entry], device="cpu", batch=2, resolution=64))
            assert len(made) == 2 and all(m.size == (128, 64) and m.mode == "RGB" for m in made), kind
            a = np.asarray(made[0]).astype(int)
            if kind in ("depth", "hed", "hedsketch", "lineart", "lineart_coarse"):
                assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all(), kind  # grey
            if kind == "depth":
                assert a.min() == 0 and a.max() == 255
            if kind == "normal":
                assert a[..., 2].min() >= 127  # z points at the camera
            if kind == "seg":
                colours = {tuple(c) for c in a.reshape(-1, 3)}
                assert colours <= {tuple(c) for c in PALETTE[:, ::-1].tolist()}
            if kind == "openpose":
                assert a.shape == (64, 128, 3)


def test_batches_give_what_single_images_give(weights):
    images = [photo(seed=s) for s in range(3)]
    one = [np.asarray(m) for m in annotators.annotate("hed", images, weights["annotator-hed"], batch=1, resolution=64)]
    three = [np.asarray(m) for m in annotators.annotate("hed", images, weights["annotator-hed"], batch=3,
                                                        resolution=64)]
    assert all(np.abs(a.astype(int) - b).max() <= 1 for a, b in zip(one, three))


def test_a_pickled_body_file_with_layer_names_loads_safely(tmp_path):
    from engine.annotators.run import load

    net = nets.BodyPoseNet((4, 4, 8, 8), 8, 8, 2)
    torch.save({k.split(".", 1)[1]: v for k, v in net.state_dict().items()}, tmp_path / "body_pose_model.pth")
    loaded = load("openpose", tmp_path)
    assert torch.equal(loaded.model2_2[-1].weight, net.model2_2[-1].weight)
    torch.save({"conv1_1.weight": torch.zeros(1)}, tmp_path / "body_pose_model.pth")
    with pytest.raises(CheckpointError, match="not OpenPose body weights"):
        load("openpose", tmp_path)


def test_refusals_are_one_line(weights, monkeypatch):
    with pytest.raises(SettingError, match="normal: bg_th must be between 0 and 1"):
        annotators.annotate("normal", [], weights["annotator-depth"], bg_th=2)
    with pytest.raises(SettingError, match="hed has no parameter 'low'"):
        annotators.annotate("hed", [], weights["annotator-hed"], low=1)
    assert annotators.resolve("lineart-coarse").kind == "lineart_coarse" and annotators.resolve("canny") is None
    real = annotators.importlib.util.find_spec
    monkeypatch.setattr(annotators.importlib.util, "find_spec", lambda m: None if m == "cv2" else real(m))
    with pytest.raises(UsageError) as info:
        annotators.require("depth")
    assert str(info.value) == "depth needs the annotators extra (cv2 missing): pip install 'ctrlora[annotators]'"


# ---------------------------------------------------------------------------------------------
# weights through the store, prep on a folder


@pytest.fixture()
def annotator_hub(tmp_path, monkeypatch):
    from hub_server import TinyHub

    state = nets.HEDNet((4, 4, 8, 8, 8)).state_dict()
    torch.save(state, tmp_path / "ControlNetHED.pth")
    hub = TinyHub().start()
    hub.add_repo("test/annotators", {"ControlNetHED.pth": tmp_path / "ControlNetHED.pth", "README.md": b"# tiny\n"})
    catalog = tmp_path / "catalog.json"
    catalog.write_text(json.dumps({"format": "ctrlora-catalog", "models": {"annotator-hed": {
        "kind": "annotator", "repo": "test/annotators", "files": ["ControlNetHED.pth"]}}}))
    env = {"CTRLORA_HOME": str(tmp_path / "home"), "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": hub.url,
           "HF_HUB_DISABLE_XET": "1", "CTRLORA_CATALOG": str(catalog), "CTRLORA_DOWNLOAD_RETRIES": "0"}
    for var in ("HF_HUB_OFFLINE", "CTRLORA_OFFLINE", "HF_TOKEN", "HF_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    yield hub, state
    hub.stop()


def test_pull_an_annotator_then_prep_a_folder(annotator_hub, tmp_path):
    from hub_fixtures import cli

    from ctrlora_cli.store.store import Store

    hub, state = annotator_hub
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        photo(seed=i).save(photos / f"p{i}.jpg")
    missing = cli("prep", "hed", str(photos), "-o", str(tmp_path / "out"))
    assert missing.code == 2 and "ctrlora pull annotator-hed" in missing.err and not (tmp_path / "out").exists()

    assert cli("pull", "annotator-hed").code == 0
    manifest = Store().get("annotator-hed")
    assert manifest.kind == "annotator" and [f.path for f in manifest.files] == ["ControlNetHED.safetensors"]
    from safetensors.torch import load_file

    stored = load_file(str(Store().file("annotator-hed", "ControlNetHED.safetensors")))
    assert all(torch.equal(stored[k], v) for k, v in state.items())  # converted, same tensors
    gets = len(hub.gets())
    assert cli("pull", "annotator-hed").code == 0 and len(hub.gets()) == gets  # up to date: nothing fetched

    made = cli("prep", "hed", str(photos), "-o", str(tmp_path / "out"), "-p", "resolution=64", "--batch", "2",
               "--json")
    assert made.code == 0, made.err
    report = json.loads(made.out)
    assert report["count"] == 3 and report["size"] == [128, 64]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["p0.png", "p1.png", "p2.png"]
    again = cli("prep", "hed", str(photos), "-o", str(tmp_path / "out"))
    assert again.code == 2 and "--force" in again.err


def test_gen_prep_with_an_annotator_names_the_pull_before_any_work(tmp_path, monkeypatch):
    from ctrlora_cli.gen_conditions import CondSpec, check_prep

    monkeypatch.setenv("CTRLORA_HOME", str(tmp_path / "home"))
    with pytest.raises(UsageError, match="fetch them once with: ctrlora pull annotator-openpose"):
        check_prep([CondSpec("pose", "photo.jpg", prep="openpose")])
    check_prep([CondSpec("edges", "photo.jpg", prep="canny")])  # built in: nothing to fetch
