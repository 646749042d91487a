"""The models: the Base ControlNet, per-condition adapters and their routing, presets (sd15,
tiny, demo), the VAE and text encodings, and SD/base loading and saving.

May import: the engine's base modules (errors, progress, files, images, runtime). Nothing else.
"""
