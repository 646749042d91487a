"""Fidelity of an adapter on a held-out set, as in the CtrLoRA paper's protocol.

For every pair of a data set (fit layout: condition image, target image, prompt) we generate one
image from the condition and the prompt, run the condition's extractor on it and score it against
the condition (``engine.demo.fidelity``). The same scores of the data set's own target images are the
ceiling: what a generator that drew exactly the training distribution would reach.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from engine.images import image_to_tensor, save_image
from engine.training.pairs import Pair
from engine.demo.fidelity import PRIMARY, aggregate, fidelity
from engine.progress import ProgressCallback, report
from engine.generation.sampling import Condition
from engine.demo.settings import EvalSettings  # its defaults and ranges; imported from here too


@dataclass
class EvalResult:
    kind: str
    metric: str  # the headline score of the kind (f1, iou, mse)
    higher_is_better: bool
    scores: dict[str, float]  # mean of every score over the generated images, and ``count``
    ceiling: dict[str, float]  # the same for the data set's target images
    per_pair: list[dict[str, float]]

    @property
    def value(self) -> float:
        return self.scores[self.metric]

    def as_dict(self) -> dict:
        return {"kind": self.kind, "metric": self.metric, "higher_is_better": self.higher_is_better,
                "value": self.value, "scores": self.scores, "ceiling": self.ceiling}


def evaluate(pipe, adapter: str | None, pairs: list[Pair], kind: str, settings: EvalSettings | None = None,
             save_dir: str | Path | None = None, callback: ProgressCallback | None = None) -> EvalResult:
    """Generate one image per pair with ``adapter`` (None: the bare base) loaded in ``pipe``
    (an ``engine.generation.pipeline.CtrLoraPipeline``) and score it; ``save_dir`` keeps the images.

    Pair i's image comes from noise seed ``seed + i``, whatever ``settings.batch``: up to that
    many consecutive pairs of one size go through one pipeline call, each with its own prompt
    and condition (what the same call for pair i alone gives, up to float rounding)."""
    s = (settings or EvalSettings()).check()
    metric, higher = PRIMARY[kind]
    scores, ceiling = [], []
    for start, chunk in _chunks(pairs, s.batch):
        result = pipe([Condition(adapter, torch.stack([image_to_tensor(c) for c, _ in chunk]), weight=s.weight)],
                      [pair.prompt or "" for _, pair in chunk], steps=s.steps, guidance=s.guidance,
                      scheduler=s.scheduler, seed=s.seed + start, batch=len(chunk))
        for (condition, pair), image in zip(chunk, result.images):
            if save_dir is not None:
                save_image(image, Path(save_dir) / f"{Path(pair.source).stem}.png")
            scores.append(fidelity(kind, image, condition))
            target = Image.open(pair.target).convert("RGB").crop((0, 0, *condition.size))
            ceiling.append(fidelity(kind, target, condition))
        report(callback, "eval", len(scores), len(pairs), **{metric: aggregate(scores)[metric]})
    return EvalResult(kind, metric, higher, aggregate(scores), aggregate(ceiling), scores)


def _chunks(pairs: list[Pair], batch: int):
    """(index of the first pair, [(condition image cropped to a multiple of 8, pair), ...]):
    runs of at most ``batch`` consecutive pairs whose conditions share one size."""
    chunk, start = [], 0
    for i, pair in enumerate(pairs):
        condition = Image.open(pair.source).convert("RGB")
        width, height = (side - side % 8 for side in condition.size)
        condition = condition.crop((0, 0, width, height))
        if chunk and (len(chunk) == batch or chunk[0][0].size != condition.size):
            yield start, chunk
            chunk, start = [], i
        chunk.append((condition, pair))
    if chunk:
        yield start, chunk
