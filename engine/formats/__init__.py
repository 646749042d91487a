"""Files on disk and what they hold: safe tensor loading, our adapter file, the official CtrLoRA
and ldm layouts (key by key, checked), and detection of what an unknown file is.

May import: the base modules and ``engine.models``.
"""
