"""Training cost: wall time and peak memory of radgate's default recipe against the seed's.

Each recipe runs `radgate train` in its own child process (same data, same machine, same
command), so peak RSS is the child's own (`os.wait4`). The seed's recipe (ResNet18 from
scratch, fit_one_cycle(30, 3e-3), crop) is the reference; the table gives the ratio.

    .venv/bin/python bench/train.py --data ../shared/data/chest-abd-xr [--json-out F]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPES = {
    "seed: resnet18 from scratch": [
        *("--arch", "resnet18"),
        *("--detail-side", "0"),
        *("--augmentation", "seed"),
    ],
    "default": [],
}


def run(data: Path, extra: list[str], out: Path) -> dict[str, float]:
    command = [sys.executable, "-m", "gateway.cli", "train", "--data", str(data), "--out", str(out)]
    started = time.perf_counter()
    child = subprocess.Popen([*command, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"training failed: {child.stderr.read().decode() if child.stderr else ''}")
    card = json.loads((out / "model.json").read_text())
    return {
        "wall_s": round(wall, 1),
        "train_s": card["train_seconds"],
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "valid_accuracy": card["metrics"]["valid_accuracy"],
        "test_accuracy": card["metrics"]["test_accuracy"],
        "arch": card["arch"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for index, (name, extra) in enumerate(RECIPES.items()):
            results[name] = run(args.data, extra, Path(scratch) / f"m{index}")
            print(name, results[name], flush=True)
    reference = results["seed: resnet18 from scratch"]
    print(
        f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}"
    )
    print(
        f"{'recipe':<30} {'arch':<18} {'wall s':>8} {'peak MiB':>9} {'valid':>6} {'test':>5} {'time ratio':>10}"
    )
    for name, row in results.items():
        print(
            f"{name:<30} {row['arch']:<18} {row['wall_s']:>8} {row['peak_rss_mib']:>9} "
            f"{row['valid_accuracy']:>6} {row['test_accuracy']:>5} {row['wall_s'] / reference['wall_s']:>10.2f}"
        )
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
