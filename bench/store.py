"""Download throughput of ``ctrlora pull``'s fetch (Range-resumable, sha256-verified) against
huggingface_hub's own ``hf_hub_download``, both from the tests' local hub on 127.0.0.1, and the
bytes a resumed download asks for after a cut. Prints JSON. Run by hand:

    python bench/store.py [--mb 256]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=256)
    args = parser.parse_args()
    os.environ.update(HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
                      CTRLORA_DOWNLOAD_RETRIES="0")
    from hub_server import TinyHub

    data = os.urandom(args.mb * 1_000_000)
    hub = TinyHub().start()
    hub.add_repo("bench/files", {"weights.safetensors": data})
    os.environ["HF_ENDPOINT"] = hub.url
    from huggingface_hub import hf_hub_download

    from ctrlora_cli.store import hub as ours
    from ctrlora_cli.store.store import Store
    from engine.errors import CtrloraError

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["HF_HOME"] = f"{tmp}/hf-ours"  # an empty cache: nothing to reuse
        remote = ours.resolve("bench/files").file("weights.safetensors")
        t = time.perf_counter()
        ours.fetch(Store(f"{tmp}/store"), remote)
        fetch_s = time.perf_counter() - t

        t = time.perf_counter()
        hf_hub_download("bench/files", "weights.safetensors", cache_dir=f"{tmp}/hf", endpoint=hub.url)
        hf_s = time.perf_counter() - t

        hub.cut("bench/files", "weights.safetensors", after=len(data) // 2)
        store = Store(f"{tmp}/store2")
        try:
            ours.fetch(store, remote)
        except CtrloraError:
            pass
        kept = store.partials()[0].stat().st_size
        hub.log.clear()
        t = time.perf_counter()
        ours.fetch(store, remote)
        resume_s = time.perf_counter() - t
        asked = hub.gets("weights.safetensors")[0].range
    hub.stop()
    mb = len(data) / 1e6
    print(json.dumps({
        "file_mb": mb,
        "ctrlora_fetch_s": round(fetch_s, 3), "ctrlora_fetch_mb_per_s": round(mb / fetch_s, 1),
        "hf_hub_download_s": round(hf_s, 3), "hf_hub_download_mb_per_s": round(mb / hf_s, 1),
        "fetch_over_hf_time_ratio": round(fetch_s / hf_s, 3),
        "note": "fetch also re-reads the file to verify its sha256; hf_hub_download checks the size only",
        "resume": {"kept_mb": round(kept / 1e6, 1), "range_asked": asked, "resume_s": round(resume_s, 3)},
    }, indent=2))


if __name__ == "__main__":
    main()
