"""Latent shards: raw training shards with the frozen encoders already run, so that training
streams latents and never loads the VAE (``ctrlora encode-shards``).

An output folder holds one latent shard per input shard, of the same name, and beside each a
small ``NAME.json`` (its samples per condition, and what it was encoded with); ``manifest.json``
is written once every input shard is done. A sample of a latent shard:

    000017.latents.safetensors   target, cond: the VAE posterior's mean and log-variance (2C, h, w),
                                 fp16; ids: the prompt's CLIP token ids (77,), int32
    000017.json                  {"condition": "canny", "prompt": "..."}

Every step still draws a fresh latent from the posterior (as training from images does). Encoding
is resumable: a finished shard (its ``.json`` written after it) is skipped, each shard is written
to a temporary file and renamed, and several processes may encode one input list at once, each
its own part (``part``/``parts``), into the same folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.errors import UsageError

MANIFEST = "manifest.json"
KIND = "ctrlora latent shards"
FORMAT = 1
LATENTS = "latents.safetensors"


def vae_files_digest(sd_folder: str | Path) -> str:
    """The SD folder's VAE, by the digests of its files (training checks it without loading it)."""
    from engine.files import sha256_bytes, sha256_file

    folder = Path(sd_folder) / "vae"
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return sha256_bytes("".join(f"{p.relative_to(folder)}:{sha256_file(p)}\n" for p in files).encode())


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    return manifest if manifest.get("kind") == KIND else None


def shards_manifest(paths: list[Path]) -> dict | None:
    """The latent manifest of the shards' folder, or None for raw shards. Latent and raw shards
    are not mixed, and latent shards come from one folder."""
    folders = {Path(p).parent for p in paths}
    manifests = [read_manifest(f) for f in sorted(folders)]
    if not any(manifests):
        return None
    if len(folders) > 1 or not all(manifests):
        raise UsageError("--shards mixes folders: give the latent shards of one `ctrlora encode-shards` folder, or "
                         "raw shards only")
    listed = set(manifests[0]["shards"])
    unknown = sorted(Path(p).name for p in paths if Path(p).name not in listed)
    if unknown:
        raise UsageError(f"{unknown[0]} is not one of the latent shards of {next(iter(folders))}'s manifest")
    return manifests[0]


def input_shards(source: str) -> list[Path]:
    """``encode-shards``' IN: a folder (its ``*.tar``) or a glob, sorted."""
    import glob

    path = Path(source).expanduser()
    found = sorted(path.glob("*.tar")) if path.is_dir() else sorted(Path(p) for p in glob.glob(str(path)))
    found = [p for p in found if p.is_file()]
    if not found:
        raise UsageError(f"{source} holds no shard (.tar); give a folder of raw shards or a glob such as "
                         f"'data/shard-*.tar'")
    return found


def encode_shards(inputs: list[Path], out: Path, sd_folder: Path, resolution: int, device, batch: int = 8,
                  part: int = 0, parts: int = 1, callback=None) -> dict:
    """Encode this part's input shards into ``out`` (skipping those already done); once every
    input shard is done, write the manifest. Returns a summary."""
    import torch

    from engine.models.storage import load_sd
    from engine.progress import report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if len({p.name for p in inputs}) != len(inputs):
        raise UsageError("two input shards share a file name; the latent shards are named after them")
    recipe = {"resolution": resolution, "vae": vae_files_digest(sd_folder)}
    mine = inputs[part::parts]
    todo = [p for p in mine if _done(out, p.name, recipe) is None]
    report(callback, "encode-shards", 0, len(todo), skipped=len(mine) - len(todo))
    if todo:
        sd = load_sd(sd_folder, device=device)
        with torch.no_grad():
            for done, path in enumerate(todo, 1):
                _encode_one(path, out, sd, resolution, batch, recipe)
                report(callback, "encode-shards", done, len(todo))
    counts = {p.name: _done(out, p.name, recipe) for p in inputs}
    summary = {"out": str(out), "encoded": len(todo), "skipped": len(mine) - len(todo),
               "shards done": sum(c is not None for c in counts.values()), "shards": len(inputs)}
    if all(c is not None for c in counts.values()):
        from engine.files import write_json

        conditions: dict[str, int] = {}
        for c in counts.values():
            for condition, n in c.items():
                conditions[condition] = conditions.get(condition, 0) + n
        scaling = json.loads((Path(sd_folder) / "vae" / "config.json").read_text()).get("scaling_factor", 0.18215)
        write_json(out / MANIFEST, {"kind": KIND, "format": FORMAT, **recipe, "scaling_factor": scaling,
                                    "conditions": dict(sorted(conditions.items())),
                                    "shards": [p.name for p in inputs]})
        summary["conditions"] = dict(sorted(conditions.items()))
    return summary


def _done(out: Path, name: str, recipe: dict) -> dict | None:
    """A finished latent shard's samples per condition; None when it is still to do. A shard
    encoded with another recipe (resolution, VAE) is refused, not replaced."""
    side = out / f"{name}.json"
    if not side.is_file() or not (out / name).is_file():
        return None
    info = json.loads(side.read_text())
    if {k: info.get(k) for k in recipe} != recipe:
        raise UsageError(f"{out / name} was encoded at {info.get('resolution')} px with another VAE or size than "
                         f"asked now; give another OUT folder, or delete it")
    return info["conditions"]


def _encode_one(path: Path, out: Path, sd, resolution: int, batch: int, recipe: dict) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from webdataset import TarWriter

    from engine.files import atomic_path, write_json
    from engine.training.stream import read_shard

    counts: dict[str, int] = {}
    with atomic_path(out / path.name) as tmp, ThreadPoolExecutor(4) as pool:
        writer = TarWriter(str(tmp), encoder=False, mtime=0)
        chunk: list[dict] = []
        for _, sample in read_shard(path):
            chunk.append(sample)
            if len(chunk) == batch:
                _write_chunk(chunk, writer, sd, resolution, pool, counts)
                chunk = []
        if chunk:
            _write_chunk(chunk, writer, sd, resolution, pool, counts)
        writer.close()
    write_json(out / f"{path.name}.json", {**recipe, "conditions": counts})


def _write_chunk(chunk, writer, sd, resolution, pool, counts) -> None:
    import torch
    from safetensors.torch import save

    from engine.models.encoders import tokenize
    from engine.training.pairs import posterior_moments
    from engine.training.stream import raw_fields, vae_input

    fields = [raw_fields(s) for s in chunk]
    moments = {}
    for role, column in (("target", 2), ("cond", 3)):
        pixels = list(pool.map(lambda f: vae_input(f[column], "target" if role == "target" else "condition",
                                                   resolution), fields))
        moments[role] = posterior_moments(sd.vae, torch.stack(pixels)).to("cpu", torch.float16)
    ids = tokenize(sd.tokenizer, [f[1] for f in fields]).to(torch.int32)
    for i, (sample, (condition, prompt, _, _)) in enumerate(zip(chunk, fields)):
        tensors = {"target": moments["target"][i].contiguous(), "cond": moments["cond"][i].contiguous(),
                   "ids": ids[i].contiguous()}
        writer.write({"__key__": sample["__key__"], LATENTS: save(tensors),
                      "json": json.dumps({"condition": condition, "prompt": prompt}).encode()})
        counts[condition] = counts.get(condition, 0) + 1


class LatentDecoder:
    """A latent shard sample -> (condition, payload) in a reader (picklable: DataLoader workers)."""

    def __init__(self, conditions: tuple[str, ...]):
        self.conditions = conditions

    def __call__(self, sample: dict):
        from safetensors.torch import load

        meta = json.loads(sample["json"])
        if meta["condition"] not in self.conditions:
            return None
        tensors = load(sample[LATENTS])
        return meta["condition"], {"target": ("moments", None, tensors["target"].float()),
                                   "condition": ("moments", None, tensors["cond"].float()),
                                   "ids": tensors["ids"].long(), "prompt": meta.get("prompt", "")}
