"""Latent shards: raw training shards with the frozen encoders already run, so that training
streams latents and never loads the VAE (``ctrlora encode-shards``).

An output folder holds one latent shard per input shard, of the same name, and beside each a
small ``NAME.json`` (its samples per condition, and what it was encoded with); ``manifest.json``
is written once every input shard is done. A sample of a latent shard:

    000017.latents.safetensors   target, cond: the VAE posterior's mean and log-variance (2C, h, w),
                                 fp16; ids: the prompt's CLIP token ids (77,), int32
    000017.json                  {"condition": "canny", "prompt": "..."}

Every step still draws a fresh latent from the posterior (as training from images does).
``train-base`` streams latent shards (``engine.training.shards``); ``fit`` reads one condition's
samples of them into memory once (``read_condition``), as it holds a folder's encoded pairs. Encoding
is resumable: a finished shard (its ``.json`` written after it) is skipped, each shard is written
to a temporary file and renamed, and several processes may encode one input list at once, each
its own part (``part``/``parts``), into the same folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import SettingError, UsageError

if TYPE_CHECKING:
    import torch

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


def check_latent_shards(manifest: dict, resolution: int, sd_folder: str | Path | None) -> None:
    """Latent shards are used at their size and with the VAE they were encoded with (checked by
    its files' digests: nothing is loaded; ``sd_folder`` None: not checked here)."""
    if manifest["resolution"] != resolution:
        raise UsageError(f"the latent shards were encoded at {manifest['resolution']} px, not --resolution "
                         f"{resolution}; train at their size, or encode them again")
    if sd_folder is not None and manifest["vae"] != vae_files_digest(sd_folder):
        raise UsageError(f"the latent shards were encoded with another VAE than {sd_folder}'s; train with the SD "
                         f"they were encoded with (--sd), or encode them again")


# -- fit: one condition of a latent shard folder, in memory ------------------------------------

def latent_folder(folder: str | Path) -> tuple[list[Path], dict] | None:
    """``fit``'s DATA when it is an ``encode-shards`` folder: (its shards, its manifest); None for
    any other folder (pairs). Shards without a manifest (raw, or still being encoded) are refused."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    manifest = read_manifest(folder)
    if manifest is None:
        if any(folder.glob("*.tar")):
            raise UsageError(f"{folder} holds shards but no {MANIFEST} of finished latent shards: fit trains from a "
                             f"folder of pairs or of latent shards; run `ctrlora encode-shards {folder} OUT --sd NAME` "
                             f"(or let it finish) and fit from OUT")
        return None
    return [folder / name for name in manifest["shards"]], manifest


def pick_condition(manifest: dict, condition: str | None) -> str:
    """The one condition a fit trains on: ``condition`` among the shards', or their only one."""
    held = list(manifest["conditions"])
    if condition is None:
        if len(held) == 1:
            return held[0]
        raise SettingError("condition", f"the latent shards hold {len(held)} conditions ({', '.join(held)}); pick "
                                        "the one to fit with --condition")
    if condition not in held:
        raise SettingError("condition", f"the latent shards hold no samples of {condition!r} (they hold "
                                        f"{', '.join(held)})")
    return condition


def fit_source(folder: str | Path, condition: str | None, config, sd_folder: str | Path
               ) -> tuple[list[Path], dict, str] | None:
    """``fit``'s checks of a latent shard folder, before anything loads: (its shards, its manifest,
    the condition to fit), or None when ``folder`` is not one (a folder of pairs). ``config``: the
    fit's ``FitConfig``; ``sd_folder``: the SD it trains with (its VAE must be the shards')."""
    found = latent_folder(folder)
    if found is None:
        return None
    paths, manifest = found
    picked = pick_condition(manifest, condition)
    check_latent_shards(manifest, config.resolution, sd_folder)
    check_latent_validation(config)
    return paths, manifest, picked


def check_latent_validation(config) -> None:
    """Validation grids from latent shards need condition images of their own: the shards hold none."""
    if config.val_every and not config.val_conds:
        raise SettingError("val_cond", "latent shards hold no condition images to validate with; give --val-cond "
                                       "IMAGE (the VAE is then loaded for the validation grids only), or leave "
                                       "--val-every off")


@dataclass
class LatentSamples:
    """One condition's samples of a latent shard folder, in shard order (``fit``'s data):
    posterior moments (N, 2C, h, w) in fp16 as stored, token ids (N, 77), prompts."""

    folder: Path
    condition: str
    target: torch.Tensor
    cond: torch.Tensor
    ids: torch.Tensor
    prompts: list[str]
    manifest: dict
    digest: str  # the samples' stored bytes, in order: what a resumed run must train on again

    def __len__(self) -> int:
        return len(self.prompts)

    def encoded(self, text_encoder, tokenizer):
        """As ``engine.training.pairs.EncodedPairs``: each distinct prompt through the text encoder
        once (and the empty prompt); the moments stay fp16 until a batch is drawn."""
        import torch

        from engine.models.encoders import encode_text
        from engine.training.pairs import EncodedPairs

        unique, index = torch.unique(self.ids, dim=0, return_inverse=True)
        with torch.no_grad():
            text = torch.cat([text_encoder(chunk.to(text_encoder.device))[0].float().cpu()
                              for chunk in unique.split(32)])
        empty = encode_text(text_encoder, tokenizer, [""])[0].float().cpu()
        return EncodedPairs(self.target, self.cond, text, index, empty, float(self.manifest["scaling_factor"]),
                            self.condition)


def read_condition(folder: Path, paths: list[Path], manifest: dict, condition: str,
                   callback=None) -> LatentSamples:
    """Read ``condition``'s samples of the shards (``LatentDecoder`` on ``stream.read_shard``)."""
    import hashlib

    import torch

    from engine.progress import report
    from engine.training.stream import read_shard

    decode = LatentDecoder((condition,))
    digest = hashlib.sha256()
    target, cond, ids, prompts = [], [], [], []
    for done, path in enumerate(paths, 1):
        for _, sample in read_shard(path):
            decoded = decode(sample)
            if decoded is None:
                continue
            payload = decoded[1]
            digest.update(sample[LATENTS])
            digest.update(sample["json"])
            target.append(payload["target"][2].half())  # stored as fp16: exact both ways
            cond.append(payload["condition"][2].half())
            ids.append(payload["ids"])
            prompts.append(payload["prompt"])
        report(callback, "read", done, len(paths))
    if not prompts:
        raise UsageError(f"the latent shards of {folder} hold no sample of {condition!r}")
    return LatentSamples(Path(folder), condition, torch.stack(target), torch.stack(cond), torch.stack(ids), prompts,
                         manifest, "sha256:" + digest.hexdigest())
