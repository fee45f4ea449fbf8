"""What a no-op rerun of a big sweep costs: deciding that 1,000 or 10,000 items are done, on a local
store and on the GCS emulator (requests counted at the wire), from listings and headers (how stagediff
plans) against reading every artifact (how it planned before); plus real-size Wan 720p latents, whose
size planning must not depend on.

    python benchmarks/scale.py [--items 1000,10000] [--real-size 100]

Writes benchmarks/results/<date>-<host>-scale.{json,md}. The artifacts are written directly (valid keys,
checksums and headers, tiny tensors), not generated: a model's compute would take days.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
WORK = ROOT / "benchmarks" / "work" / "scale"
RESULTS = ROOT / "benchmarks" / "results"
WAN_720P_LATENTS = (1, 16, 21, 90, 160)
"""`(1, 16, (81-1)/4+1, 720/8, 1280/8)`: 9.7 MB in bf16."""


def request_for(model: str, store: str, items: int):
    from stagediff.request import Request

    seeds = 100 if items >= 100 else items
    prompts = [f"prompt {index}" for index in range(items // seeds)]
    return Request(model=model, prompts=prompts, seeds=list(range(seeds)), steps=2, height=64, width=64, store=store)


def fill(plan, latents_shape=(1, 4, 8, 8)) -> None:
    """Write every artifact of the plan as the stages would: same keys, metadata, checksums, summaries."""
    from concurrent.futures import ThreadPoolExecutor

    from stagediff.media import png_bytes
    from stagediff.containers import LATENTS_CHECKSUM
    from stagediff.stages import media_metadata
    from stagediff.store import tensor_checksum

    store = plan.store
    for embedding in plan.embeddings:
        store.write_tensors(embedding.path, {"prompt_embeds": torch.zeros(1, 4, 8)}, embedding.key, embedding.inputs)
    pixels = np.zeros((8, 8, 3), np.uint8)
    dtype = torch.bfloat16 if len(latents_shape) == 5 else torch.float32

    def write(item):
        latents = {"latents": torch.randn(latents_shape).to(dtype)}
        store.write_tensors(item.latents_path, latents, item.latents_key, item.latents_inputs)
        checksum = tensor_checksum(latents)
        metadata = {**media_metadata(plan, item), LATENTS_CHECKSUM: checksum}
        store.write_bytes(item.media_path, png_bytes(pixels, metadata), {"latents-checksum": checksum})

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(write, plan.items))


def no_op(plan, full_reads: bool) -> float:
    """Seconds to decide that nothing is left: stagediff's planning, or every artifact read in full."""
    from stagediff.inventory import plan_state
    from stagediff.scheduler import schedule
    from stagediff.media import verified_media_metadata

    start = time.perf_counter()
    if full_reads:
        store = plan.store
        for item in plan.items:
            assert store.has_valid_tensors(item.latents_path, item.latents_key)
            verified_media_metadata("png", store.read_bytes(item.media_path))
    else:
        assert schedule(plan, plan_state(plan), accelerators=1) == []
    return time.perf_counter() - start


def measure(model: str, store_uri: str, items: int, latents_shape, proxy=None, full_reads: bool = True) -> dict:
    from stagediff.plan import make_plan

    start = time.perf_counter()
    plan = make_plan(request_for(model, store_uri, items))
    plan_seconds = time.perf_counter() - start
    fill(plan, latents_shape)
    row = {"store": "emulator" if store_uri.startswith("gs://") else "local", "items": items,
           "latents_bytes": int(np.prod(latents_shape)) * (2 if len(latents_shape) == 5 else 4),
           "plan_seconds": round(plan_seconds, 2)}
    requests_before = len(proxy.log) if proxy else 0
    row["no_op_seconds"] = round(no_op(make_plan(plan.request, model=plan.model), full_reads=False), 3)
    row["ms_per_item"] = round(1000 * row["no_op_seconds"] / items, 3)
    if proxy:
        row["requests"] = len(proxy.log) - requests_before
        row["requests_per_item"] = round(row["requests"] / items, 4)
    if full_reads:
        row["full_read_seconds"] = round(no_op(plan, full_reads=True), 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", default="1000,10000", help="item counts, comma-separated")
    parser.add_argument("--real-size", type=int, default=100, help="items with real-size Wan 720p latents")
    args = parser.parse_args()
    from gcs_emulator import Emulator, FaultyProxy
    from stagediff import gcs
    from stagediff.tiny import build_tiny_model

    model = WORK / "tiny-sdxl"
    if not (model / "model_index.json").exists():
        build_tiny_model("sdxl", model)
    shutil.rmtree(WORK / "stores", ignore_errors=True)
    emulator = Emulator()
    proxy = FaultyProxy(emulator.port, failures=0)
    os.environ[gcs.EMULATOR_VARIABLE] = proxy.url
    gcs.filesystem().mkdir("scale")
    rows = []
    try:
        for items in (int(n) for n in args.items.split(",")):
            for uri in (str(WORK / "stores" / f"local-{items}"), f"gs://scale/tiny-{items}"):
                # Reading 10,000 artifacts one by one over HTTP is the old way's cost; measured up to 1,000.
                rows.append(measure(str(model), uri, items, (1, 4, 8, 8), proxy if uri.startswith("gs://") else None,
                                    full_reads=items <= 1000 or not uri.startswith("gs://")))
                print(rows[-1], flush=True)
        if args.real_size:
            for uri in (str(WORK / "stores" / "local-wan720p"), "gs://scale/wan720p"):
                rows.append(measure(str(model), uri, args.real_size, WAN_720P_LATENTS,
                                    proxy if uri.startswith("gs://") else None))
                print(rows[-1], flush=True)
    finally:
        proxy.stop()
        emulator.stop()
    report = {"date": datetime.date.today().isoformat(), "machine": f"{socket.gethostname()}, {os.cpu_count()} cores",
              "rows": rows}
    lines = [f"# No-op reruns at scale ({report['machine']}, {report['date']})", "",
             "Deciding that every item is done: stagediff's planning (listings and headers) against reading every "
             "artifact in full (the way it planned before). Emulator: fake-gcs-server on loopback, requests counted "
             "by a proxy.", "",
             "| store | items | latents bytes | plan s | no-op s | ms/item | requests | requests/item | full reads s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['store']} | {row['items']} | {row['latents_bytes']:,} | {row['plan_seconds']} | "
                     f"{row['no_op_seconds']} | {row['ms_per_item']} | {row.get('requests', '–')} | "
                     f"{row.get('requests_per_item', '–')} | {row.get('full_read_seconds', '–')} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"{report['date']}-{socket.gethostname()}-scale"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
