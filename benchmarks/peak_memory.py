"""Peak RSS of a few stage commands, run with /usr/bin/time -v in a temporary copy of the repository.

The copy holds the tracked and untracked-but-not-ignored files plus ``data/`` and ``dvc.lock``, so the stages read
their real inputs and write only inside the copy; tracking is off. /work/main itself is never written.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import ROOT, write_result

STAGES = {
    "teacher@ce": ["-m", "stages.teacher", "--name", "ce"],
    "index@ce": ["-m", "stages.index", "--name", "ce"],
    "evaluate": ["-m", "stages.evaluate"],
    "student@deit_lt": ["-m", "stages.student", "--name", "deit_lt"],
}


def make_copy(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.splitlines()
    for rel in files:
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    shutil.copytree(ROOT / "data", dest / "data")
    shutil.copy2(ROOT / "dvc.lock", dest / "dvc.lock")


def peak_rss(copy: Path, args: list[str]) -> dict:
    """Run ``python <args>`` in ``copy``; return max RSS (MiB) and wall time (s)."""
    env = {**os.environ, "PYTHONPATH": str(copy), "LONGTAIL_TRACKING": "off"}
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, *args], cwd=copy, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{args} failed:\n{proc.stderr[-2000:]}")
    kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return {"max_rss_mib": round(kib / 1024, 1), "wall_s": round(wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stages", nargs="+", default=["teacher@ce", "index@ce", "evaluate"], choices=list(STAGES))
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    args = parser.parse_args()
    copy = Path(tempfile.mkdtemp(prefix="longtail-peakmem-"))
    try:
        make_copy(copy)
        results = {}
        for stage in args.stages:
            results[stage] = peak_rss(copy, STAGES[stage])
            r = results[stage]
            print(f"{stage:18s} max RSS {r['max_rss_mib']:8.1f} MiB  wall {r['wall_s']:6.1f} s", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(copy, ignore_errors=True)
    command = "PYTHONPATH=. .venv/bin/python benchmarks/peak_memory.py --stages " + " ".join(args.stages)
    write_result("peak_memory", {"command": command, "stages": results})


if __name__ == "__main__":
    main()
