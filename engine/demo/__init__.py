"""The toy world the demo model is trained in: scenes of coloured shapes, built-in condition
extractors, fidelity measures, ``eval``, and the toy Stable Diffusion.

May import: everything in the engine.
"""
