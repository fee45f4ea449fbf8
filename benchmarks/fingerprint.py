"""How long identifying a model takes: every byte of a model-sized folder hashed (cold: nothing cached,
page cache dropped when this process may), then again with the per-machine digest cache (warm).

    python benchmarks/fingerprint.py [--gigabytes 10]

Writes benchmarks/results/<date>-<host>-fingerprint.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "work" / "fingerprint"
RESULTS = ROOT / "benchmarks" / "results"
FILE_BYTES = 2 * 2**30
"""Shards of a real checkpoint's size (diffusers shards at 5-10 GB; 2 GiB keeps the data on any disk)."""

MEASURE = """
import json, sys, time
from pathlib import Path
from stagediff.models import open_model
start = time.perf_counter()
model = open_model(sys.argv[1])
fingerprint = model.fingerprint(("unet",))
print(json.dumps({"seconds": time.perf_counter() - start, "fingerprint": fingerprint}))
"""


def model_folder(gigabytes: float) -> Path:
    """A folder laid out as a diffusers model whose `unet` holds `gigabytes` of random weights."""
    folder = WORK / f"{gigabytes:g}gb"
    unet = folder / "unet"
    total = int(gigabytes * 2**30)
    if sum(path.stat().st_size for path in unet.glob("*.safetensors")) != total:
        shutil.rmtree(folder, ignore_errors=True)
        unet.mkdir(parents=True)
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline",
                                                             "unet": ["diffusers", "UNet2DConditionModel"]}))
        (unet / "config.json").write_text("{}")
        for index, offset in enumerate(range(0, total, FILE_BYTES)):
            with open(unet / f"diffusion_pytorch_model-{index:05d}.safetensors", "wb") as file:
                for _ in range(min(FILE_BYTES, total - offset) // 2**26):
                    file.write(os.urandom(2**26))
    return folder


def drop_page_cache() -> bool:
    """Empty the kernel's page cache (root only), so that a cold run reads from the disk."""
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def measure(folder: Path, digests: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "STAGEDIFF_DIGEST_CACHE": str(digests)}
    output = subprocess.run([sys.executable, "-c", MEASURE, str(folder)], env=env, capture_output=True, text=True,
                            check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gigabytes", type=float, default=10)
    args = parser.parse_args()
    folder = model_folder(args.gigabytes)
    with tempfile.TemporaryDirectory() as digests:
        dropped = drop_page_cache()
        cold = measure(folder, Path(digests))
        cached_pages = measure(folder, Path(digests) / "empty")  # digests not cached, data in the page cache
        warm = measure(folder, Path(digests))
    assert cold["fingerprint"] == cached_pages["fingerprint"] == warm["fingerprint"]
    report = {"date": datetime.date.today().isoformat(), "machine": f"{socket.gethostname()}, {os.cpu_count()} cores",
              "gigabytes": args.gigabytes, "page_cache_dropped": dropped, "cold_seconds": cold["seconds"],
              "page_cache_seconds": cached_pages["seconds"], "warm_seconds": warm["seconds"]}
    table = "\n".join([
        f"# Model fingerprint, {args.gigabytes:g} GB ({report['machine']}, {report['date']})", "",
        "| run | seconds | GB/s |", "|---|---|---|",
        f"| cold (nothing cached{', page cache dropped' if dropped else ''}) | {cold['seconds']:.2f} | "
        f"{args.gigabytes / cold['seconds']:.2f} |",
        f"| digests not cached, file data in the page cache | {cached_pages['seconds']:.2f} | "
        f"{args.gigabytes / cached_pages['seconds']:.2f} |",
        f"| warm (digest cache) | {warm['seconds']:.3f} | – |", "",
    ])
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"{report['date']}-{socket.gethostname()}-fingerprint"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    stem.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
