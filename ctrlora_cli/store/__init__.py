"""The model store as a library: entries (manifests over content-addressed blobs), names, the
catalog, hub downloads, pulls and imports, and resolving names for the commands that use models.

    store       the Store: blobs, manifests written last, the rule for taken names (claim), views
                that survive moving the store, links between entries (made for, paired with),
                run folders, locks, scratch, removal, gc
    names       entry names (the rule, names made from files) and the kinds of entry
    sources     where an entry came from, in words; the command that fetches it (again)
    catalog     what ``ctrlora pull NAME`` fetches (shipped catalog.json + CTRLORA_CATALOG)
    hub         the Hugging Face Hub: resolving, resumable verified downloads, the HF cache
    hf_cache    hub files shared with the Hugging Face cache (hard links), and purging them
    pull        from a source (catalog name, hf://, sd:, local path, tiny, demo) to an entry
    ingest      what a file or folder holds, converted and stored; up to date or replaced
    sd_layout   which files make a diffusers-layout Stable Diffusion entry
    tiny        the random tiny model, made offline
    demo        the demo model shipped in the package: into the store, and exported from one
    parameters  parameter counts of an entry from its safetensors headers
    resolve     from store names to the folders and files the engine loads; the base an
                adapter was made for, and the base a command uses
    paths       store names -> the files of a pipeline: the resolver of CtrLoraPipeline.from_store
    export      an entry written as a file other tools load (the official layout, or ours)
    events      what the library reports (byte progress, messages) for the face to render

May import: ``engine``, ``ctrlora_cli.envconfig`` and each other; never Typer, Rich or the
command modules (tests/test_layout.py checks). Nothing here prints: progress and messages go out
as plain events (``events``), and the command modules render them.
"""
