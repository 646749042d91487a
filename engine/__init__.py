"""The machine: models, file formats, generation, training and the demo world, with no face.

Rooms by idea, arrows pointing one way (a room imports only the rooms listed before it):

- base modules here: ``errors`` (one-line user errors), ``progress`` (plain progress events),
  ``files`` (atomic writes, digests), ``images`` (image files, tensors and grids), ``runtime``
  (device and precision). They import nothing of the engine but each other.
- ``models``: the Base ControlNet, adapters and routing, presets, SD loading and saving.
- ``formats``: safe tensor loading, our adapter file, the official and ldm layouts, detection.
- ``generation``: sampling helpers, the pipeline, the plain reference, premerged and prepacked
  weights, PNG recipes. Knows models and formats.
- ``training``: the objective, pairs and the latent cache, shards, fit, the distributed worker
  and its launcher. Knows models, formats and generation (validation images).
- ``demo``: the toy world, condition extractors, fidelity, eval, the toy SD. Knows all.

The engine never imports ``ctrlora_cli``, Typer or Rich: progress goes out as
``engine.progress`` events and errors as ``engine.errors`` exceptions, which the face renders.
"""
