"""Training pairs on disk, checked, preprocessed and encoded once into a content-keyed latent cache.

A data folder holds one condition's pairs in one of two layouts:

- reference: ``prompt.json`` (JSON lines ``{"source": "source/0.jpg", "target": "target/0.jpg",
  "prompt": "..."}``, paths relative to the folder) beside ``source/`` and ``target/``;
- plain: ``source/`` and ``target/`` with matching file names (matched by name without extension),
  prompts in ``prompts.jsonl`` (lines ``{"name": "0.jpg" or "0", "prompt": "..."}``) or one ``.txt``
  per image (``target/0.txt`` or ``prompts/0.txt``).

Every pair is checked before any training (``scan_folder``), then the frozen encoders run once
(``encode_pairs``): the VAE posterior of each target (SD's [-1, 1] input) and each condition
(CtrLoRA's [0, 1] input, as ``engine.models.encoders.encode_condition``), and the text embedding of each
prompt and of the empty prompt. Results live in a ``LatentCache`` keyed by content (image bytes
digest, resolution, encoder weights digest), so later epochs and later runs do no VAE or text work.

The cache stores the posterior's parameters (mean and log-variance, diffusers' ``moments``), not a
latent: every step draws a fresh latent from the posterior, as the reference does when it runs the
VAE at every step. ``train-base`` reuses all of this, one folder per condition.
"""

from __future__ import annotations

import hashlib
import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from engine.errors import UsageError
from engine.files import atomic_path, sha256_bytes
from engine.images import image_to_tensor, resize_center_crop
from engine.models.encoders import encode_text
from engine.models.state import weights_digest
from engine.progress import ProgressCallback, report

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
REFERENCE_INDEX = "prompt.json"
PLAIN_PROMPTS = "prompts.jsonl"
SHOWN_PROBLEMS = 5  # how many bad pairs an error message names
CACHE_VERSION = "1"  # bump when what a cache entry holds changes


# -- pairs and their checks -------------------------------------------------------------------

@dataclass
class Pair:
    source: Path
    target: Path
    prompt: str | None
    label: str  # how messages name the pair, e.g. "target/0.jpg"
    source_digest: str = ""
    target_digest: str = ""
    size: tuple[int, int] = (0, 0)


@dataclass
class Problem:
    label: str
    reason: str

    def __str__(self) -> str:
        return f"{self.label}: {self.reason}"


@dataclass
class PairSet:
    """The usable pairs of one data folder (checked), and what was wrong with the others."""

    folder: Path
    layout: str  # "reference" | "plain"
    pairs: list[Pair]
    skipped: list[Problem] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def digest(self) -> str:
        """Identifies the training data by content: the pairs' image digests and prompts."""
        pairs = sorted(self.pairs, key=lambda p: (p.target_digest, p.source_digest, p.prompt or ""))
        return sha256_bytes(b"".join(json.dumps([p.source_digest, p.target_digest, p.prompt]).encode() for p in pairs))


def scan_folder(folder: str | Path, skip_bad: bool = False, workers: int = 4,
                callback: ProgressCallback | None = None) -> PairSet:
    """List and check every pair of ``folder``. Missing files, unreadable images, pairs whose two
    images differ in size and empty prompts are refused in one UsageError naming the first few
    and the count, or left out with ``skip_bad``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"data folder {folder} does not exist")
    if (folder / REFERENCE_INDEX).is_file():
        layout, (pairs, problems) = "reference", _list_reference(folder)
    elif (folder / "source").is_dir() and (folder / "target").is_dir():
        layout, (pairs, problems) = "plain", _list_plain(folder)
    else:
        raise UsageError(f"{folder} holds neither {REFERENCE_INDEX} nor source/ and target/ folders; "
                         "see `ctrlora fit --help` for the data layouts")

    checked: list[Pair] = []
    with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL decodes without the GIL
        for i, (pair, problem) in enumerate(pool.map(_check_pair, pairs)):
            if problem:
                problems.append(problem)
            else:
                checked.append(pair)
            report(callback, "check", i + 1, len(pairs))
    if problems and not skip_bad:
        raise UsageError(describe_problems(problems, folder) + "; fix them or pass --skip-bad to leave them out")
    if not checked:
        detail = f" ({describe_problems(problems, folder)})" if problems else ""
        raise UsageError(f"no usable pairs in {folder}{detail}")
    return PairSet(folder, layout, checked, problems)


def describe_problems(problems: list[Problem], folder: Path) -> str:
    shown = "; ".join(str(p) for p in problems[:SHOWN_PROBLEMS])
    more = f"; and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
    return f"{len(problems)} bad pair{'s' if len(problems) != 1 else ''} in {folder}: {shown}{more}"


def _rel(folder: Path, path: Path) -> str:
    try:
        return path.relative_to(folder).as_posix()
    except ValueError:
        return str(path)


def _list_reference(folder: Path) -> tuple[list[Pair], list[Problem]]:
    pairs, problems = [], []
    lines = (folder / REFERENCE_INDEX).read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{REFERENCE_INDEX} line {number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            problems.append(Problem(where, "not a JSON object"))
            continue
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("source", "target")):
            problems.append(Problem(where, 'needs "source" and "target" paths'))
            continue
        prompt = entry.get("prompt")
        prompt = prompt if isinstance(prompt, str) else None
        pairs.append(Pair(folder / entry["source"], folder / entry["target"], prompt, label=entry["target"]))
    return pairs, problems


def _images(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}


def _list_plain(folder: Path) -> tuple[list[Pair], list[Problem]]:
    sources, targets = _images(folder / "source"), _images(folder / "target")
    prompts = _plain_prompts(folder)
    pairs, problems = [], []
    for stem, target in targets.items():
        label = _rel(folder, target)
        if stem not in sources:
            problems.append(Problem(label, f"no matching image in source/ (looked for {stem}.*)"))
            continue
        prompt = prompts.get(stem)
        if prompt is None:
            for txt in (folder / "target" / f"{stem}.txt", folder / "prompts" / f"{stem}.txt"):
                if txt.is_file():
                    prompt = txt.read_text(encoding="utf-8", errors="replace").strip()
                    break
        pairs.append(Pair(sources[stem], target, prompt, label=label))
    for stem, source in sources.items():
        if stem not in targets:
            problems.append(Problem(_rel(folder, source), f"no matching image in target/ (looked for {stem}.*)"))
    return pairs, problems


def _plain_prompts(folder: Path) -> dict[str, str]:
    path = folder / PLAIN_PROMPTS
    prompts: dict[str, str] = {}
    if not path.is_file():
        return prompts
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            name = next(entry[k] for k in ("name", "file", "target", "source") if isinstance(entry.get(k), str))
            prompt = entry["prompt"]
        except (json.JSONDecodeError, StopIteration, KeyError, TypeError):
            raise UsageError(f'{path} line {number}: expected {{"name": "<image file>", "prompt": "..."}}') from None
        prompts[Path(name).stem] = prompt if isinstance(prompt, str) else ""
    return prompts


def _check_pair(pair: Pair) -> tuple[Pair, Problem | None]:
    sizes = []
    for role in ("source", "target"):
        path = getattr(pair, role)
        if not path.is_file():
            return pair, Problem(pair.label, f"missing file {path.name} ({role})")
        try:
            data = path.read_bytes()
            with Image.open(io.BytesIO(data)) as image:
                image.load()  # decode fully: a truncated file fails here, not mid-training
                sizes.append(image.size)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            return pair, Problem(pair.label, f"unreadable {role} image {path.name} ({type(exc).__name__})")
        setattr(pair, f"{role}_digest", sha256_bytes(data))
    if sizes[0] != sizes[1]:
        (sw, sh), (tw, th) = sizes
        return pair, Problem(pair.label, f"source is {sw}x{sh} but target is {tw}x{th}")
    if pair.prompt is None:
        return pair, Problem(pair.label, "no prompt")
    if not pair.prompt.strip():
        return pair, Problem(pair.label, "empty prompt")
    pair.size = sizes[1]
    return pair, None


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """The reference preprocessing: short side resized, centre crop; (3, H, W) in [0, 1]."""
    with Image.open(path) as image:
        return image_to_tensor(resize_center_crop(image.convert("RGB"), resolution))


# -- the cache ---------------------------------------------------------------------------------

# The frozen encoders are identified by their weights (and the tokenizer by its vocabulary), so a
# cache entry is reused only for the very same encoder; the cache version leads, so bumping it
# retires every entry.

def vae_identity(vae) -> str:
    return weights_digest(CACHE_VERSION, type(vae).__name__, vae.encoder, vae.quant_conv)


def text_identity(text_encoder, tokenizer) -> str:
    vocab = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return weights_digest(CACHE_VERSION, type(text_encoder).__name__, text_encoder, vocab, tokenizer.model_max_length)


def cache_key(*parts) -> str:
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()


class LatentCache:
    """One small safetensors file per entry, ``<root>/<key[:2]>/<key>.safetensors``, written
    atomically so a killed run never leaves a torn entry; several runs may share a root."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        from safetensors.torch import load_file

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return load_file(str(path))["value"]
        except Exception:  # a damaged entry is recomputed, never trusted
            return None

    def put(self, key: str, value: torch.Tensor) -> None:
        from safetensors.torch import save_file

        with atomic_path(self.path(key)) as tmp:
            save_file({"value": value.detach().to("cpu").contiguous()}, str(tmp))


# -- encoding ----------------------------------------------------------------------------------

@dataclass
class EncodedPairs:
    """A folder's pairs as cached encoder outputs (kept in memory, on the training device).

    ``target``/``cond``: (N, 2C, h, w) posterior moments (fp32; fp16 from latent shards); ``text``:
    (U, L, D) embeddings of the U distinct prompts, ``text_index`` (N,) which one each pair uses;
    ``empty``: (L, D) of ""."""

    target: torch.Tensor
    cond: torch.Tensor
    text: torch.Tensor
    text_index: torch.Tensor
    empty: torch.Tensor
    scaling_factor: float
    condition: str = ""
    # (N, 3, H, W) condition images in [0, 1] at the training resolution, as ``load_image`` gives
    # them: only with ``encode_pairs(..., condition_pixels=True)`` (a standard ControlNet's input)
    cond_pixels: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.target.shape[0]

    def to(self, device) -> "EncodedPairs":
        for name in ("target", "cond", "text", "text_index", "empty", "cond_pixels"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device))
        return self

    def sample_batch(self, indices: torch.Tensor, generator: torch.Generator, drop_prompt: float = 0.0):
        """(target latents, condition latents, text embeddings) for ``indices``: both latents drawn
        from their posteriors and scaled, as the reference's VAE call at every step; each prompt
        replaced by "" with probability ``drop_prompt`` (the condition is never dropped)."""
        indices = indices.to(self.target.device)
        # .float(): latent shards' moments are held in fp16, as stored (fp32 ones are left as they are)
        latents = sample_posterior(self.target[indices].float(), generator) * self.scaling_factor
        cond = sample_posterior(self.cond[indices].float(), generator) * self.scaling_factor
        text = self.text[self.text_index[indices]]
        drop = torch.rand(len(indices), generator=generator, device=generator.device) < drop_prompt
        text = torch.where(drop.to(text.device)[:, None, None], self.empty.expand_as(text), text)
        return latents, cond, text


def sample_posterior(moments: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """A draw from diffusers' DiagonalGaussianDistribution with these parameters."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    return DiagonalGaussianDistribution(moments).sample(generator=generator)


@torch.no_grad()
def posterior_moments(vae, pixels: torch.Tensor) -> torch.Tensor:
    """The VAE posterior's parameters (mean, log-variance) for what the VAE is fed."""
    return vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.parameters.float()


def encode_pairs(pairs: PairSet, vae, text_encoder, tokenizer, resolution: int, cache: LatentCache,
                 batch_size: int = 4, workers: int = 4, callback: ProgressCallback | None = None,
                 condition: str = "", condition_pixels: bool = False) -> EncodedPairs:
    """Run the frozen encoders on whatever the cache lacks, then gather every pair's entries.
    ``condition_pixels``: also keep every condition image itself (``EncodedPairs.cond_pixels``)."""
    vae_id, text_id = vae_identity(vae), text_identity(text_encoder, tokenizer)
    # Each image is keyed by its bytes, its role (the VAE sees targets in [-1, 1], conditions in
    # [0, 1]), the resolution and the encoder: a target reused with another condition is shared.
    jobs: dict[str, tuple[Path, str]] = {}
    target_keys, cond_keys = [], []
    for pair in pairs.pairs:
        tk = cache_key("target", pair.target_digest, resolution, vae_id)
        ck = cache_key("condition", pair.source_digest, resolution, vae_id)
        target_keys.append(tk)
        cond_keys.append(ck)
        jobs.setdefault(tk, (pair.target, "target"))
        jobs.setdefault(ck, (pair.source, "condition"))
    prompts = sorted({p.prompt for p in pairs.pairs} | {""})
    prompt_keys = {p: cache_key("text", p, text_id) for p in prompts}

    # Read what the cache holds (each entry once); a missing or damaged entry is computed afresh.
    values = {k: cache.get(k) for k in [*jobs, *prompt_keys.values()]}
    missing_images = [(k, *v) for k, v in jobs.items() if values[k] is None]
    missing_prompts = [p for p in prompts if values[prompt_keys[p]] is None]
    total = len(missing_images) + len(missing_prompts)
    done = 0
    report(callback, "encode", done, total, cached=len(values) - total)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for start in range(0, len(missing_images), batch_size):
            chunk = missing_images[start:start + batch_size]
            images = list(pool.map(lambda job: load_image(job[1], resolution), chunk))
            for role in ("target", "condition"):
                picked = [i for i, job in enumerate(chunk) if job[2] == role]
                if not picked:
                    continue
                pixels = torch.stack([images[i] for i in picked])
                moments = posterior_moments(vae, pixels * 2 - 1 if role == "target" else pixels)
                for i, m in zip(picked, moments.cpu()):
                    cache.put(chunk[i][0], m)
                    values[chunk[i][0]] = m
            done += len(chunk)
            report(callback, "encode", done, total)
    for start in range(0, len(missing_prompts), batch_size * 4):
        chunk = missing_prompts[start:start + batch_size * 4]
        # float32 whatever the encoder's dtype: a cache entry must not depend on how it was loaded
        for prompt, embedding in zip(chunk, encode_text(text_encoder, tokenizer, chunk).float().cpu()):
            cache.put(prompt_keys[prompt], embedding)
            values[prompt_keys[prompt]] = embedding
        done += len(chunk)
        report(callback, "encode", done, total)

    def gather(keys):
        return torch.stack([values[k] for k in keys])

    text_rows = {p: i for i, p in enumerate(prompts)}
    pixels = None
    if condition_pixels:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            pixels = torch.stack(list(pool.map(lambda pair: load_image(pair.source, resolution), pairs.pairs)))
    return EncodedPairs(
        target=gather(target_keys),
        cond=gather(cond_keys),
        text=gather([prompt_keys[p] for p in prompts]),
        text_index=torch.tensor([text_rows[p.prompt] for p in pairs.pairs]),
        empty=gather([prompt_keys[""]])[0],
        scaling_factor=float(vae.config.scaling_factor),
        condition=condition,
        cond_pixels=pixels,
    )
