"""Training data for fit: layouts, the checks before training, and the content-keyed latent cache."""

import json

import pytest
import torch
from PIL import Image

from engine.images import image_to_tensor, resize_center_crop
from engine.models.encoders import encode_condition
from engine.training.pairs import LatentCache, encode_pairs, load_image, sample_posterior, scan_folder
from engine.errors import UsageError
from engine.models.presets import build_sd
from pairs import make_pairs


@pytest.fixture(scope="module")
def sd():
    return build_sd("tiny", seed=0)


@pytest.mark.parametrize("layout", ["reference", "plain-jsonl", "plain-txt"])
def test_layouts_give_the_same_pairs(tmp_path, layout):
    pairs = scan_folder(make_pairs(tmp_path / layout, n=3, layout=layout))
    assert pairs.layout == ("reference" if layout == "reference" else "plain")
    assert sorted(p.prompt for p in pairs.pairs) == ["a red circle 0", "a red circle 1", "a red circle 2"]
    assert all(p.source.parent.name == "source" and p.target.parent.name == "target" for p in pairs.pairs)
    # The same images and prompts are the same data, whatever the layout.
    reference = scan_folder(make_pairs(tmp_path / "ref", n=3))
    assert pairs.digest == reference.digest


def test_plain_layout_prompts_folder_and_matching_by_stem(tmp_path):
    folder = make_pairs(tmp_path / "d", n=2, layout="plain-txt")
    (folder / "target" / "1.txt").unlink()
    (folder / "prompts").mkdir()
    (folder / "prompts" / "1.txt").write_text("from the prompts folder\n")
    Image.open(folder / "source" / "0.png").save(folder / "source" / "0.jpg")  # same stem, other format
    (folder / "source" / "0.png").unlink()
    pairs = scan_folder(folder)
    prompts = {p.target.name: p.prompt for p in pairs.pairs}
    assert prompts == {"0.png": "a red circle 0", "1.png": "from the prompts folder"}


def _bad_folder(tmp_path):
    folder = make_pairs(tmp_path / "bad", n=7)
    (folder / "target" / "1.png").unlink()  # missing file
    (folder / "source" / "2.png").write_bytes(b"not an image at all")  # unreadable
    data = (folder / "target" / "3.png").read_bytes()
    (folder / "target" / "3.png").write_bytes(data[: len(data) // 2])  # truncated
    Image.new("RGB", (48, 64)).save(folder / "source" / "4.png")  # other size than its target
    lines = [json.loads(line) for line in (folder / "prompt.json").read_text().splitlines()]
    lines[5]["prompt"] = "  "  # empty prompt
    (folder / "prompt.json").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder


def test_bad_pairs_are_named_and_refused(tmp_path):
    folder = _bad_folder(tmp_path)
    with pytest.raises(UsageError) as info:
        scan_folder(folder)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"5 bad pairs in {folder}")
    assert "target/1.png: missing file 1.png (target)" in message
    assert "target/2.png: unreadable source image 2.png" in message
    assert "target/3.png: unreadable target image 3.png" in message
    assert "target/4.png: source is 48x64 but target is 64x64" in message
    assert "target/5.png: empty prompt" in message
    assert "--skip-bad" in message


def test_skip_bad_keeps_the_good_pairs(tmp_path):
    pairs = scan_folder(_bad_folder(tmp_path), skip_bad=True)
    assert [p.target.name for p in pairs.pairs] == ["0.png", "6.png"]
    assert len(pairs.skipped) == 5


def test_many_problems_show_the_first_few_and_a_count(tmp_path):
    folder = make_pairs(tmp_path / "d", n=8, layout="plain-txt")
    for i in range(8):
        (folder / "target" / f"{i}.txt").write_text("")
    (folder / "source" / "extra.png").write_bytes((folder / "source" / "0.png").read_bytes())
    with pytest.raises(UsageError) as info:
        scan_folder(folder)
    message = str(info.value)
    assert message.startswith("9 bad pairs") and "; and 4 more" in message
    assert "no matching image in target/" in message and message.count("empty prompt") == 4


def test_unusable_folders_are_refused(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        scan_folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="neither prompt.json nor source/ and target/"):
        scan_folder(tmp_path / "empty")
    folder = make_pairs(tmp_path / "d", n=1)
    (folder / "prompt.json").write_text("{not json\n")
    with pytest.raises(UsageError, match="prompt.json line 1: not a JSON object"):
        scan_folder(folder)


def test_preprocessing_is_the_reference_resize_and_centre_crop(tmp_path):
    path = tmp_path / "wide.png"
    Image.effect_mandelbrot((96, 64), (-2, -1, 1, 1), 50).convert("RGB").save(path)
    expected = image_to_tensor(resize_center_crop(Image.open(path), 32))
    assert torch.equal(load_image(path, 32), expected)
    assert expected.shape == (3, 32, 32)


def _count_calls(module):
    calls = []
    module.register_forward_hook(lambda *args: calls.append(1))
    return calls


def test_encoders_run_once_and_the_cache_serves_later_runs(tmp_path, sd):
    pairs = scan_folder(make_pairs(tmp_path / "d", n=3, prompts=["a dog", "a dog", "a cat"]))
    cache = LatentCache(tmp_path / "cache")
    vae_calls, text_calls = _count_calls(sd.vae.encoder), _count_calls(sd.text_encoder)
    first = encode_pairs(pairs, sd.vae, sd.text_encoder, sd.tokenizer, 64, cache, batch_size=2)
    assert sum(vae_calls) > 0 and sum(text_calls) > 0
    # 3 targets + 3 conditions + 3 distinct prompts ("a dog", "a cat", "") = 9 entries.
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 9
    vae_calls.clear(), text_calls.clear()
    again = encode_pairs(scan_folder(pairs.folder), sd.vae, sd.text_encoder, sd.tokenizer, 64, cache)
    assert not vae_calls and not text_calls
    for name in ("target", "cond", "text", "text_index", "empty"):
        assert torch.equal(getattr(first, name), getattr(again, name))
    assert first.text.shape[0] == 3 and first.text_index[0] == first.text_index[1]
    # A damaged entry is computed afresh, never trusted.
    entry = sorted((tmp_path / "cache").rglob("*.safetensors"))[0]
    entry.write_bytes(entry.read_bytes()[:40])
    repaired = encode_pairs(pairs, sd.vae, sd.text_encoder, sd.tokenizer, 64, cache)
    assert torch.equal(repaired.target, first.target) and torch.equal(repaired.text, first.text)
    assert len(vae_calls) + len(text_calls) == 1
    vae_calls.clear(), text_calls.clear()
    # Another resolution is another entry: the encoder runs again.
    encode_pairs(pairs, sd.vae, sd.text_encoder, sd.tokenizer, 32, cache)
    assert vae_calls and not text_calls


def test_cache_follows_the_encoder_weights(tmp_path, sd):
    pairs = scan_folder(make_pairs(tmp_path / "d", n=1))
    cache = LatentCache(tmp_path / "cache")
    encode_pairs(pairs, sd.vae, sd.text_encoder, sd.tokenizer, 64, cache)
    other = build_sd("tiny", seed=1)
    calls = _count_calls(other.vae.encoder)
    encode_pairs(pairs, other.vae, sd.text_encoder, sd.tokenizer, 64, cache)
    assert calls


def test_cached_posteriors_draw_what_the_encoders_would(tmp_path, sd):
    pairs = scan_folder(make_pairs(tmp_path / "d", n=1))
    data = encode_pairs(pairs, sd.vae, sd.text_encoder, sd.tokenizer, 64, LatentCache(tmp_path / "cache"))
    cond = load_image(pairs.pairs[0].source, 64)[None]
    # Conditions: exactly engine.models.encoders.encode_condition ([0, 1] input, posterior sample, scaled).
    expected = encode_condition(sd.vae, cond, generator=torch.Generator().manual_seed(3))
    drawn = sample_posterior(data.cond[:1], torch.Generator().manual_seed(3)) * data.scaling_factor
    torch.testing.assert_close(drawn, expected, rtol=0, atol=1e-5)
    # Targets: SD's usual [-1, 1] input.
    target = load_image(pairs.pairs[0].target, 64)[None]
    with torch.no_grad():
        mean = sd.vae.encode(target * 2 - 1).latent_dist.mean
    torch.testing.assert_close(data.target[:1, :4], mean, rtol=0, atol=1e-5)
    # Every step draws afresh from the posterior (the reference runs the VAE at every step).
    g = torch.Generator().manual_seed(0)
    a, b = (data.sample_batch(torch.tensor([0]), g)[0] for _ in range(2))
    assert not torch.equal(a, b)


def test_prompt_dropout_uses_the_empty_prompt(tmp_path, sd):
    pairs = scan_folder(make_pairs(tmp_path / "d", n=2))
    data = encode_pairs(pairs, sd.vae, sd.text_encoder, sd.tokenizer, 64, LatentCache(tmp_path / "cache"))
    g = torch.Generator().manual_seed(0)
    _, _, kept = data.sample_batch(torch.tensor([0, 1]), g, drop_prompt=0.0)
    _, _, dropped = data.sample_batch(torch.tensor([0, 1]), g, drop_prompt=1.0)
    assert torch.equal(kept, data.text[data.text_index])
    assert torch.equal(dropped, data.empty.expand_as(dropped))
