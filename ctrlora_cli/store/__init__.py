"""The model store as a library: entries (manifests over content-addressed blobs), names, the
catalog, hub downloads, pulls and imports, and resolving names for the commands that use models.

May import: ``engine`` and each other; never Typer or Rich. Progress goes out as plain events
(``engine.progress``), and the command modules render it.
"""
