"""Making images: sampling helpers, the batched multi-condition pipeline, the plain reference
sampler, premerged and prepacked weights, and the recipe carried in PNGs.

May import: the base modules, ``engine.models`` and ``engine.formats``.
"""
