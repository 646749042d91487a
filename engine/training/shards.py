"""Training data for ``train-base``: one fit-layout folder per condition, or WebDataset-style tar
shards holding many conditions, streamed.

A raw shard is a plain tar whose members are grouped by key (the name up to its first dot):

    000017.png        the target image (also .jpg/.jpeg/.webp; or 000017.target.<ext>)
    000017.cond.png   the condition image (or 000017.source.<ext>)
    000017.txt        the prompt
    000017.json       {"condition": "canny"} (and optionally "prompt")

A latent shard (``ctrlora encode-shards``, ``engine.training.latent_shards``) holds the encoders'
outputs instead. Shards are never indexed: each rank's readers stream their own share of them
(``engine.training.stream``); a raw sample is decoded in the reader (a DataLoader worker), which
also looks its latents up in the latent cache, and the training process encodes what the cache
lacks. Folders go through fit's checks and the latent cache (``engine.training.pairs``): each
rank encodes its own share of the pairs, then every rank reads them all back, kept on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from engine.errors import UsageError
from engine.files import sha256_bytes
from engine.models.encoders import encode_text
from engine.training.stream import Layout, fresh_states, open_feed, raw_fields, read_shard, resume_states, vae_input

EVAL_SAMPLES = 4  # per condition: the fixed set of the evaluation loss


@dataclass
class RawDecoder:
    """A raw shard sample -> (condition, payload) in a reader: the images decoded and resized, or
    their posterior moments when the latent cache has them (a picklable callable: it runs in
    DataLoader workers)."""

    conditions: tuple[str, ...]
    resolution: int
    cache_root: str
    vae_id: str

    def __call__(self, sample: dict):
        from engine.training.pairs import LatentCache, cache_key

        condition, prompt, target, cond = raw_fields(sample)
        if condition not in self.conditions:
            return None
        cache = LatentCache(self.cache_root)
        payload = {"prompt": prompt}
        for role, data in (("target", target), ("condition", cond)):
            key = cache_key(role, sha256_bytes(data), self.resolution, self.vae_id)
            moments = cache.get(key)
            payload[role] = (("pixels", key, vae_input(data, role, self.resolution)) if moments is None
                             else ("moments", key, moments))
        return condition, payload


class StreamedShards:
    """The shard conditions of a rank: its feed, and the encoders for what readers leave to it."""

    def __init__(self, feed, paths: list, decode, sd, cache, device, scaling_factor: float):
        self.feed, self.paths, self.decode = feed, paths, decode
        self.sd, self.cache, self.device, self.scaling_factor = sd, cache, device, scaling_factor

    def condition(self, name: str) -> "StreamedCondition":
        return StreamedCondition(self, name)

    def encode(self, payloads: list[dict], generator, drop_prompt: float):
        """(latents, condition latents, text) of raw payloads, as ``EncodedPairs.sample_batch``."""
        from engine.training.pairs import EncodedPairs, cache_key, posterior_moments, text_identity

        moments = {}
        for role in ("target", "condition"):
            todo = [p[role] for p in payloads if p[role][0] == "pixels"]  # raw shards: what the cache lacked
            if todo:
                encoded = posterior_moments(self.sd.vae, torch.stack([t[2] for t in todo]))
                for (_, key, _), value in zip(todo, encoded.cpu()):
                    self.cache.put(key, value)
                    moments[key] = value
        text_id = getattr(self, "_text_id", None) or text_identity(self.sd.text_encoder, self.sd.tokenizer)
        self._text_id = text_id

        def text(prompt: str) -> torch.Tensor:
            key = cache_key("text", prompt, text_id)
            value = self.cache.get(key)
            if value is None:
                value = encode_text(self.sd.text_encoder, self.sd.tokenizer, [prompt])[0].float().cpu()
                self.cache.put(key, value)
            return value

        def stacked(role):
            return torch.stack([moments[p[role][1]] if p[role][0] == "pixels" else p[role][2] for p in payloads])

        if all("ids" in p for p in payloads):  # latent shards: the prompts' token ids
            ids = torch.stack([p["ids"] for p in payloads]).to(self.sd.text_encoder.device)
            texts = self.sd.text_encoder(ids)[0].float()
        else:
            texts = torch.stack([text(p["prompt"]) for p in payloads])
        batch = EncodedPairs(target=stacked("target").to(self.device), cond=stacked("condition").to(self.device),
                             text=texts.to(self.device), text_index=torch.arange(len(payloads), device=self.device),
                             empty=text("").to(self.device), scaling_factor=self.scaling_factor)
        return batch.sample_batch(torch.arange(len(payloads)), generator, drop_prompt)

    def eval_payloads(self, condition: str) -> list[dict]:
        """The first samples of a condition in the sorted shard list: the evaluation set."""
        found = []
        for path in self.paths:
            for _, sample in read_shard(path):
                decoded = self.decode(sample)
                if decoded is not None and decoded[0] == condition:
                    found.append(decoded[1])
                    if len(found) == EVAL_SAMPLES:
                        return found
        if not found:
            raise UsageError(f"the shards hold no sample of condition {condition!r} (--conditions)")
        return found


class StreamedCondition:
    streamed = True

    def __init__(self, shards: StreamedShards, name: str):
        self.shards, self.name = shards, name

    def next_batch(self, n: int, generator, drop_prompt: float):
        return self.shards.encode([t.payload for t in self.shards.feed.take(self.name, n)], generator, drop_prompt)

    def eval_batch(self, generator):
        return self.shards.encode(self.shards.eval_payloads(self.name), generator, 0.0)


class FolderPairs:
    """A folder's encoded pairs, kept on the CPU; each batch moves to the training device."""

    streamed = False

    def __init__(self, encoded, device):
        self.encoded, self.device = encoded, device

    def __len__(self) -> int:
        return len(self.encoded)

    def sample_batch(self, indices: torch.Tensor, generator, drop_prompt: float = 0.0):
        from engine.training.pairs import EncodedPairs

        e, dev = self.encoded, self.device
        batch = EncodedPairs(target=e.target[indices].to(dev), cond=e.cond[indices].to(dev),
                             text=e.text[e.text_index[indices]].to(dev),
                             text_index=torch.arange(len(indices), device=dev), empty=e.empty.to(dev),
                             scaling_factor=e.scaling_factor)
        return batch.sample_batch(torch.arange(len(indices), device=dev), generator, drop_prompt)

    def eval_batch(self, generator):
        return self.sample_batch(torch.arange(min(EVAL_SAMPLES, len(self))), generator, 0.0)


def wait_for_all(what: str, timeout: int) -> None:
    """A barrier that ends in one clear line when a rank waits past the process group's timeout."""
    import torch.distributed as dist

    try:
        dist.barrier()
    except RuntimeError as exc:  # gloo: "Timed out waiting ..."; NCCL's watchdog words its own
        if "timed out" in str(exc).lower() or "timeout" in str(exc).lower():
            raise UsageError(f"rank {dist.get_rank()} waited more than {timeout} s for the other processes ({what}); "
                             f"raise --timeout, or encode the data once with `ctrlora encode-shards`") from None
        raise


def encode_folder_share(folders: dict[str, Path], sd, args, cache, rank: int, world: int) -> dict:
    """Each rank encodes its share of every folder's pairs into the cache (rank r: pairs r, r+W, ...);
    after a barrier every rank reads them all back, on the CPU."""
    from dataclasses import replace

    from engine.training.pairs import encode_pairs, scan_folder

    scanned = {c: scan_folder(f) for c, f in folders.items()}
    for condition, pairs in scanned.items():
        encode_pairs(replace(pairs, pairs=pairs.pairs[rank::world]), sd.vae, sd.text_encoder, sd.tokenizer,
                     args.resolution, cache, condition=condition)
    if world > 1 and scanned:
        wait_for_all("encoding their share of the folders' pairs", args.timeout)
    return {c: encode_pairs(p, sd.vae, sd.text_encoder, sd.tokenizer, args.resolution, cache, condition=c)
            for c, p in scanned.items()}


def load_condition_data(args, sd, device, rank: int, world: int, stream_state: dict | None = None):
    """({condition: source}, the shard feed or None). A folder's source has ``len()`` and
    ``sample_batch(indices, generator, drop_prompt)``; a shard condition's (``streamed``)
    ``next_batch(n, generator, drop_prompt)``; both ``eval_batch(generator)``. ``stream_state``:
    the checkpoint's, to continue the shard readers where they stood."""
    from engine.training.latent_shards import LatentDecoder, check_latent_shards, shards_manifest
    from engine.training.launcher import shard_files
    from engine.training.pairs import LatentCache, vae_identity

    cache = LatentCache(args.cache or Path(args.out) / "cache")
    data = {c: FolderPairs(e, device) for c, e in encode_folder_share(args.folders(), sd, args, cache, rank,
                                                                        world).items()}
    feed = None
    if args.shards:
        paths = shard_files(args.shards)
        latent = shards_manifest(paths)
        wanted = [c for c in (args.wanted_conditions() or list(latent["conditions"])) if c not in data]
        layout = Layout(world, max(1, args.workers)).check(len(paths))
        states, leftovers = (resume_states(stream_state, layout, len(paths), args.seed) if stream_state
                             else fresh_states(layout))
        if latent:
            check_latent_shards(latent, args.resolution, args.sd)
            decode, scaling = LatentDecoder(tuple(wanted)), latent["scaling_factor"]
        else:
            decode = RawDecoder(tuple(wanted), args.resolution, str(cache.root), vae_identity(sd.vae))
            scaling = sd.vae.config.scaling_factor
        feed = open_feed(paths, layout, rank, states, leftovers.get(rank, []), args.seed, decode,
                         background=args.workers > 0)
        shards = StreamedShards(feed, paths, decode, sd, cache, device, scaling)
        for condition in wanted:
            data[condition] = shards.condition(condition)
    if not data:
        raise UsageError("no training data: give condition folders (COND=DIR) or --shards")
    return dict(sorted(data.items())), feed


def needs_vae(args) -> bool:
    """Whether a run encodes images (folders, raw shards); latent shards alone do not."""
    from engine.training.latent_shards import shards_manifest
    from engine.training.launcher import shard_files

    return bool(args.data) or not (args.shards and shards_manifest(shard_files(args.shards)))
