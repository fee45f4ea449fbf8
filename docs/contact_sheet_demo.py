"""Makes docs/contact-sheet.png: the demo model (`make demo`'s tiny SDXL, random weights) with a tiny LoRA
built as tests build theirs, 2 prompts × 2 seeds × scales 0 (the base model), 0.5 and 1.

    .venv/bin/python docs/contact_sheet_demo.py
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from lora_files import sdxl_lora  # noqa: E402
from stagediff.cli import main  # noqa: E402
from stagediff.tiny import build_tiny_model  # noqa: E402

os.chdir(ROOT)
model = Path("demo-models") / "tiny-sdxl"
if not (model / "model_index.json").exists():
    build_tiny_model("sdxl", model)
with tempfile.TemporaryDirectory() as work:
    lora = Path(work) / "style.safetensors"
    shutil.copy(sdxl_lora(model, Path(work) / "built"), lora)
    scales = [argument for scale in (0, 0.5, 1) for argument in ("--lora", f"{lora}:{scale}")]
    store = Path(work) / "store"
    main(["generate", "--model", str(model), "--prompt", "a lighthouse on a cliff at dawn", "--prompt",
          "a red fox in fresh snow", "--seed", "0", "--seed", "1", "--steps", "4", *scales, "--store", str(store),
          "--run-name", "demo-lora"])
    shutil.copy(store / "runs" / "demo-lora" / "contact-sheet.png", ROOT / "docs" / "contact-sheet.png")
print(ROOT / "docs" / "contact-sheet.png")
