"""Making images: sampling helpers, the batched multi-condition pipeline, the plain reference
sampler, premerged and prepacked weights, the recipe carried in PNGs, and loading a pipeline
from files (``pretrained``: ``CtrLoraPipeline.from_pretrained`` / ``from_store``).

May import: the base modules, ``engine.models`` and ``engine.formats``.
"""
