"""Learning weights: the diffusion objective, training pairs and the latent cache, tar shards,
``fit`` (one adapter on one device), the distributed ``train-base`` worker and its launcher.

May import: the base modules, ``engine.models``, ``engine.formats`` and ``engine.generation``.
"""
