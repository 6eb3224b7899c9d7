"""A `delf eval --report` page and a screenshot of it in headless Chromium (docs/report.png).

    .venv/bin/python scripts/report_screenshot.py [--manifest M.tsv] [--methods sift,global-gem]
                                                  [--out docs/report.png] [--html report.html]

Without --manifest it writes a small one from scikit-image's sample photos (public domain
or CC0, so the screenshot may go into the repository): four groups of a photo and a
perspective-warped copy, and one group of two unrelated photos (the Hubble deep field, a
microscope slide), whose queries miss their positive. The landmarks-dev photos are third-party:
look at their report, but do not commit a screenshot of it.

Then runs `delf eval MANIFEST --methods ... --report HTML` (baselines only: no running
system needed unless 'delf' is among the methods) and Chromium (Debian: `apt-get install
chromium`) with --screenshot at 1280x1600, stored with a 256-colour palette (a few hundred
KB); it prints any console line Chromium logged (there should be none) and exits 1 if
there was one.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

PAIRS = ("astronaut", "coffee", "rocket", "chelsea")
UNRELATED = ("hubble_deep_field", "immunohistochemistry")


def write_sample_manifest(root: Path) -> Path:
    import skimage.data as data

    rng = np.random.default_rng(0)
    lines = ["path\tgroup"]
    for name in PAIRS:
        bgr = cv2.cvtColor(getattr(data, name)(), cv2.COLOR_RGB2BGR)
        h, w = bgr.shape[:2]
        src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
        dst = (src + rng.uniform(-0.12, 0.12, (4, 2)) * [w, h]).astype(np.float32)
        warped = cv2.warpPerspective(bgr, cv2.getPerspectiveTransform(src, dst), (w, h))
        (root / name).mkdir()
        cv2.imwrite(str(root / name / "original.jpg"), bgr)
        cv2.imwrite(str(root / name / "warped.jpg"), np.clip(warped * 1.2 + 10, 0, 255).astype(np.uint8))
        lines += [f"{name}/original.jpg\t{name}", f"{name}/warped.jpg\t{name}"]
    (root / "mixed").mkdir()
    for name in UNRELATED:
        cv2.imwrite(str(root / "mixed" / f"{name}.jpg"), cv2.cvtColor(getattr(data, name)(), cv2.COLOR_RGB2BGR))
        lines.append(f"mixed/{name}.jpg\tmixed")
    (root / "MANIFEST.tsv").write_text("\n".join(lines) + "\n")
    return root / "MANIFEST.tsv"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--manifest", default=None)
    p.add_argument("--methods", default="sift,global-gem")
    p.add_argument("--out", default="docs/report.png")
    p.add_argument("--html", default=None, help="keep the report here (default: a temporary folder)")
    args = p.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        print("no Chromium (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="delf-report-") as tmp:
        manifest = args.manifest or write_sample_manifest(Path(tmp))
        html = Path(args.html or Path(tmp) / "report.html").resolve()
        delf = Path(sys.executable).with_name("delf")
        subprocess.run([str(delf), "eval", str(manifest), "--methods", args.methods, "--report", str(html)],
                       check=True)
        shot = subprocess.run(
            [browser, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--hide-scrollbars",
             "--enable-logging=stderr", "--v=0", f"--user-data-dir={Path(tmp) / 'profile'}",
             f"--screenshot={Path(tmp) / 'shot.png'}", "--window-size=1280,1600", html.as_uri()],
            capture_output=True, text=True, timeout=120)
        Image.open(Path(tmp) / "shot.png").convert("RGB").quantize(256).save(args.out, optimize=True)
    console = [line for line in shot.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    print("\n".join(console) or "no console messages")
    print(f"screenshot: {args.out} ({Path(args.out).stat().st_size} bytes)")
    return 1 if console else 0


if __name__ == "__main__":
    sys.exit(main())
