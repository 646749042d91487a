"""Training data for ``train-base``: one fit-layout folder per condition, or WebDataset-style tar
shards holding many conditions.

A shard is a plain tar whose members are grouped by key (the name up to its first dot):

    000017.png        the target image (also .jpg/.jpeg/.webp; or 000017.target.<ext>)
    000017.cond.png   the condition image (or 000017.source.<ext>)
    000017.txt        the prompt
    000017.json       {"condition": "canny"} (and optionally "prompt")

Shards are indexed once (member headers only); each rank then reads only the samples its slice
of the schedule asks for (``engine.training.worker.sample_indices``), straight from their offsets.
Folders go through fit's checks and latent cache (``engine.training.pairs``); shard samples are encoded
when first drawn and cached the same way, keyed by content.
"""

from __future__ import annotations

import glob
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from engine.files import sha256_bytes
from engine.images import image_to_tensor, resize_center_crop
from engine.models.encoders import encode_text
from engine.errors import UsageError

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


@dataclass
class Member:
    shard: Path
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


@dataclass
class ShardSample:
    key: str
    target: Member
    cond: Member
    prompt: str
    condition: str


def index_shards(patterns: list[str]) -> dict[str, list[ShardSample]]:
    """Every complete sample of the shards, grouped by condition (sorted for a stable order)."""
    paths = sorted({Path(p) for pattern in patterns for p in glob.glob(pattern)})
    if patterns and not paths:
        raise UsageError(f"no shard matches {', '.join(patterns)}")
    by_condition: dict[str, list[ShardSample]] = {}
    for shard in paths:
        groups: dict[str, dict[str, Member]] = {}
        texts: dict[str, dict[str, bytes]] = {}
        try:
            with tarfile.open(shard, "r:") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    name = Path(info.name).name
                    key, _, field = name.partition(".")
                    member = Member(shard, info.offset_data, info.size)
                    groups.setdefault(key, {})[field.lower()] = member
                    if field.lower() in ("txt", "json"):
                        texts.setdefault(key, {})[field.lower()] = tar.extractfile(info).read()
        except (tarfile.TarError, OSError) as exc:
            raise UsageError(f"shard {shard} is not a readable tar file ({exc})") from None
        for key, fields in sorted(groups.items()):
            meta = json.loads(texts.get(key, {}).get("json", b"{}") or b"{}")
            target = next((fields[f] for f in (*IMAGE_EXTS, *(f"target.{e}" for e in IMAGE_EXTS)) if f in fields), None)
            cond = next((fields[f] for e in IMAGE_EXTS for f in (f"cond.{e}", f"source.{e}") if f in fields), None)
            prompt = texts.get(key, {}).get("txt", b"").decode("utf-8", "replace").strip() or meta.get("prompt", "")
            condition = meta.get("condition")
            if target is None or cond is None or not condition:
                raise UsageError(f"shard {shard}: sample {key!r} lacks a target image, a .cond image or a "
                                 f".json with \"condition\"")
            by_condition.setdefault(condition, []).append(ShardSample(key, target, cond, prompt, condition))
    return by_condition


class ShardData:
    """One condition's shard samples, encoded on first use (through the latent cache)."""

    def __init__(self, samples: list[ShardSample], vae, text_encoder, tokenizer, resolution: int, cache):
        from engine.training.pairs import text_identity, vae_identity

        self.samples = samples
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.resolution, self.cache = resolution, cache
        self.vae_id, self.text_id = vae_identity(vae), text_identity(text_encoder, tokenizer)
        self.empty = self._text([""])[0]

    def __len__(self) -> int:
        return len(self.samples)

    def _moments(self, member: Member, role: str) -> torch.Tensor:
        from engine.training.pairs import cache_key, posterior_moments

        data = member.read()
        key = cache_key(role, sha256_bytes(data), self.resolution, self.vae_id)
        value = self.cache.get(key)
        if value is None:
            with Image.open(io.BytesIO(data)) as image:
                pixels = image_to_tensor(resize_center_crop(image.convert("RGB"), self.resolution))[None]
            value = posterior_moments(self.vae, pixels * 2 - 1 if role == "target" else pixels)[0]
            self.cache.put(key, value)
        return value

    def _text(self, prompts: list[str]) -> torch.Tensor:
        from engine.training.pairs import cache_key

        out = []
        for prompt in prompts:
            key = cache_key("text", prompt, self.text_id)
            value = self.cache.get(key)
            if value is None:
                value = encode_text(self.text_encoder, self.tokenizer, [prompt])[0].float()  # as encode_pairs
                self.cache.put(key, value)
            out.append(value)
        return torch.stack(out)

    def sample_batch(self, indices: torch.Tensor, generator: torch.Generator, drop_prompt: float = 0.0):
        from engine.training.pairs import EncodedPairs

        picked = [self.samples[int(i)] for i in indices]
        device = self.vae.device
        batch = EncodedPairs(
            target=torch.stack([self._moments(s.target, "target") for s in picked]).to(device),
            cond=torch.stack([self._moments(s.cond, "condition") for s in picked]).to(device),
            text=self._text([s.prompt for s in picked]).to(device),
            text_index=torch.arange(len(picked), device=device),
            empty=self.empty.to(device),
            scaling_factor=self.vae.config.scaling_factor,
        )
        return batch.sample_batch(torch.arange(len(picked)), generator, drop_prompt)


def load_condition_data(args, sd, device, rank: int, world: int) -> dict:
    """{condition: data with ``len()`` and ``sample_batch(indices, generator, drop_prompt)``}.

    Rank 0 fills the latent cache first; the other ranks then read it back (no duplicate work)."""
    import torch.distributed as dist

    from engine.training.pairs import LatentCache, encode_pairs, scan_folder

    cache = LatentCache(args.cache or Path(args.out) / "cache")
    folders = args.folders()

    def encode_folders():
        return {c: encode_pairs(scan_folder(f), sd.vae, sd.text_encoder, sd.tokenizer, args.resolution, cache,
                                condition=c).to(device) for c, f in folders.items()}

    if rank == 0:
        data = encode_folders()
    if world > 1:
        dist.barrier()
    if rank != 0:
        data = encode_folders()
    for condition, samples in index_shards(args.shards).items():
        if condition in data:
            raise UsageError(f"condition {condition!r} comes from both a folder and shards; give one")
        data[condition] = ShardData(samples, sd.vae, sd.text_encoder, sd.tokenizer, args.resolution, cache)
    if not data:
        raise UsageError("no training data: give condition folders (COND=DIR) or --shards")
    return dict(sorted(data.items()))
