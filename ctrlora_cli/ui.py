"""``ctrlora ui``: a local web app (Gradio) on the store and the ``ctrlora gen`` pipeline; the app
itself is ``ctrlora_cli.webui``."""

from __future__ import annotations

import ipaddress
import tempfile
from pathlib import Path

import typer

from ctrlora_cli.console import say, warn
from ctrlora_cli.options import DeviceOpt, Precision, PrecisionOpt, examples
from engine.errors import CtrloraError

INSTALL = "pip install 'ctrlora[ui]'"


def register(app: typer.Typer) -> None:
    app.command("ui", epilog=examples(
        "ctrlora ui",
        "ctrlora ui --port 7861 --device cpu",
        "ctrlora ui --host 0.0.0.0",
    ))(ui)


def ui(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (another than this machine's own: "
                                                         "anyone on the network can use the app)."),
    port: int = typer.Option(7860, "--port", help="Port, 1 to 65535."),
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.auto,
    out: Path = typer.Option(Path("ctrlora-outputs"), "--out", "-o",
                             help="Folder for the images made (new names there never replace a file)."),
    share: bool = typer.Option(False, "--share", help="Also open a public link through Gradio's share servers."),
    max_file_size: int = typer.Option(20, "--max-file-size", help="Largest upload in MB."),
) -> None:
    """Start the web app: generate from the store's models, look, adjust, again; manage the store."""
    from engine.checks import between

    between("port", port, 1, 65535)
    between("max_file_size", max_file_size, 1, 1024)
    if out.exists() and not out.is_dir():
        raise CtrloraError(f"--out {out} exists and is not a folder")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise CtrloraError(f"the app needs Gradio, an optional extra: {INSTALL}") from None

    from ctrlora_cli.store.store import Store
    from ctrlora_cli.webui.handlers import Session
    from ctrlora_cli.webui.layout import build
    from ctrlora_cli.webui.warm import WarmModels

    if not _local(host):
        warn(f"listening on {host}: anyone who can reach this machine on the network can use the app, its models "
             f"and its store")
    if share:
        warn("--share: a public link; anyone who has it can use the app")
    session = Session(Store(), WarmModels(device, precision.value), out.resolve())
    app = build(session)
    say(f"ctrlora ui on http://{_url_host(host)}:{port} ({session.warm.device}, precision {precision.value}); "
        f"images go to {session.out}; Ctrl+C stops it")
    app.queue(default_concurrency_limit=1).launch(
        server_name=host, server_port=port, share=share, max_file_size=f"{max_file_size}mb", ssr_mode=False,
        show_error=False, quiet=True, inbrowser=False, footer_links=["api"], allowed_paths=_outside(session.out))


def _local(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::") else host


def _outside(folder: Path) -> list[str]:
    """The output folder, when Gradio would not otherwise hand its images to the page (it serves
    files the app returns from the current folder and the temp folder only)."""
    for root in (Path.cwd(), Path(tempfile.gettempdir())):
        if folder.is_relative_to(root.resolve()):
            return []
    return [str(folder)]
