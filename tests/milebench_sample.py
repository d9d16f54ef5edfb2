"""The fabricated MileBench sample (``tests/data/milebench_sample``) made complete: its JSON files copied to a
directory and every image they name drawn there, so the sample is MileBench's layout without committed binaries.

Images are 56 x 56 PNGs of random 14-px blocks (:func:`madakv_sglang.checkpoints.write_test_image`): 4 tokens
each in the tiny Qwen2-VL, so even the 33-image sample is a short prompt.

CLI: ``python -m tests.milebench_sample OUT_DIR`` (then ``python -m benchmarks.milebench --data-dir OUT_DIR``).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from madakv_sglang.checkpoints import write_test_image

SAMPLE = Path(__file__).resolve().parent / "data" / "milebench_sample"
IMAGE_SIZE = (56, 56)


def materialize(out_dir: Path) -> Path:
    """Copy the sample's JSON files to ``out_dir`` and draw the images they name; returns ``out_dir``."""
    out_dir = Path(out_dir)
    seed = 0
    for source in sorted(SAMPLE.glob("*/*.json")):
        target = out_dir / source.relative_to(SAMPLE)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        for entry in json.loads(source.read_text())["data"]:
            for name in entry["task_instance"]["images_path"]:
                write_test_image(target.parent / "images" / name, size=IMAGE_SIZE, seed=seed)
                seed += 1
    return out_dir


if __name__ == "__main__":
    print(materialize(Path(sys.argv[1])))
