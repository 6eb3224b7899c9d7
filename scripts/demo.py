"""A first look at DELF search (`make demo`).

Writes a few scikit-image sample photos into a temporary folder, starts the whole
system there (`python -m delf_tools.launcher`, embedded Redis, free ports), then
runs the `delf` CLI as a user would:

    delf ingest FOLDER          index the photos as one job, with a progress bar
    delf job JOB_ID             the job's summary
    delf search QUERY           a perspective-warped, cropped, brightened copy of one photo
    delf search QUERY --box ..  the same, only a region of it

and stops the system and removes everything it wrote.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

READY_TIMEOUT_S = 600  # the first start loads the model; a slow machine needs a while
STOP_TIMEOUT_S = 60
QUERY_SOURCE = "coffee"  # the photo the warped query is made from


def sample_photos() -> dict[str, np.ndarray]:
    """scikit-image's sample photos that ship with it (nothing is downloaded)."""
    import skimage.data

    photos = {
        "astronaut": skimage.data.astronaut,
        "chelsea": skimage.data.chelsea,
        "coffee": skimage.data.coffee,
        "rocket": skimage.data.rocket,
    }
    found = {name: load() for name, load in photos.items()}
    if _ships_with_skimage("motorcycle_left.png"):
        found["motorcycle"] = skimage.data.stereo_motorcycle()[0]
    return found


def _ships_with_skimage(filename: str) -> bool:
    """True when a data file is on disk already, so loading it needs no download."""
    import skimage.data

    folders = {Path(skimage.data.__file__).parent, Path(getattr(skimage.data, "data_dir", "."))}
    return any((folder / filename).is_file() for folder in folders)


def warped_query(photo: np.ndarray, out: Path) -> tuple[int, int]:
    """Write a copy of `photo` as seen from another angle, cropped and brighter.
    Returns its size (width, height)."""
    h, w = photo.shape[:2]
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    # Looking at the photo from the lower right: the far corners shrink inwards.
    dst = np.float32([[0.10 * w, 0.08 * h], [0.92 * w, 0.0], [w, h], [0.02 * w, 0.90 * h]])
    homography = cv2.getPerspectiveTransform(src, dst)
    warped = cv2.warpPerspective(photo, homography, (w, h), borderMode=cv2.BORDER_REFLECT)
    crop = warped[int(0.08 * h):int(0.92 * h), int(0.06 * w):int(0.95 * w)]
    brighter = cv2.convertScaleAbs(crop, alpha=1.15, beta=25)
    Image.fromarray(brighter).save(out, quality=90)
    return brighter.shape[1], brighter.shape[0]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def banner(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def delf(args: list[str], env: dict[str, str]) -> str:
    """Run `delf ARGS` like a user would, echo its output, and return its stdout."""
    print(f"$ delf {' '.join(shlex.quote(a) for a in args)}", flush=True)
    proc = subprocess.Popen([sys.executable, "-m", "delf_tools.cli", *args], env=env,
                            stdout=subprocess.PIPE, text=True)  # stderr (progress bars) goes straight through
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    if proc.wait() != 0:
        raise RuntimeError(f"`delf {args[0]}` failed with exit code {proc.returncode}")
    return "".join(lines)


def start_system(work: Path, port: int, ready_file: Path) -> subprocess.Popen:
    env = dict(os.environ)
    # A private system: its own embedded Redis and Milvus Lite in the temp folder.
    for name in ("DELF_REDIS_URL", "DELF_MILVUS_URI", "DELF_MILVUS_TOKEN"):
        env.pop(name, None)
    command = [sys.executable, "-m", "delf_tools.launcher",
               "--data-dir", str(work / "data"), "--grpc-addr", f"127.0.0.1:{port}",
               "--redis-port", "0", "--ready-file", str(ready_file), "--log-dir"]
    # Its own session: a Ctrl-C reaches only this script, which then stops it once.
    return subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, start_new_session=True)


def wait_ready(launcher: subprocess.Popen, ready_file: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not ready_file.exists():
        try:
            code = launcher.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the system did not start within {READY_TIMEOUT_S} s") from None
            continue
        raise RuntimeError(f"the system could not start (launcher exit code {code})")


def stop_system(launcher: subprocess.Popen) -> None:
    if launcher.poll() is not None:
        return
    launcher.send_signal(signal.SIGINT)
    try:
        launcher.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        print("the system did not stop in time; killing it", file=sys.stderr)
        launcher.kill()  # its children get SIGTERM as it dies (see the launcher)
        launcher.wait()


def show_logs(log_dir: Path, lines: int = 15) -> None:
    for log in sorted(log_dir.glob("*.log")) if log_dir.is_dir() else []:
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        print(f"--- {log.name} (last {len(tail)} lines) ---", file=sys.stderr)
        print("\n".join(tail), file=sys.stderr)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="delf-demo-"))
    launcher = None
    log_dir = work / "data" / "logs"  # where the launcher writes the services' logs
    ok = False
    try:
        banner("Sample photos")
        photos_dir = work / "photos"
        photos_dir.mkdir()
        photos = sample_photos()
        for name, pixels in photos.items():
            Image.fromarray(pixels).convert("RGB").save(photos_dir / f"{name}.jpg", quality=92)
            print(f"  {name}.jpg  {pixels.shape[1]}x{pixels.shape[0]}")
        query = work / "query.jpg"
        qw, qh = warped_query(photos[QUERY_SOURCE], query)
        print(f"  query.jpg  {qw}x{qh}: {QUERY_SOURCE}.jpg seen at an angle, cropped, brighter")

        banner("Starting the system (delf up) in a temporary folder")
        port = free_port()
        ready_file = work / "ready.json"
        launcher = start_system(work, port, ready_file)
        wait_ready(launcher, ready_file)
        env = dict(os.environ, DELF_GATEWAY=f"127.0.0.1:{port}")

        banner("Index the photos as one job")
        out = delf(["ingest", str(photos_dir)], env)
        job = re.search(r"^job (\S+)\s*$", out, re.MULTILINE)
        if job is None:
            raise RuntimeError("`delf ingest` printed no `job <id>` line")

        banner("The job, looked up by its id")
        delf(["job", job.group(1)], env)

        banner(f"Search with the warped copy of {QUERY_SOURCE}.jpg (expect {QUERY_SOURCE} first)")
        delf(["search", str(query), "--top-k", "3"], env)

        box = (round(0.25 * qw), round(0.25 * qh), round(0.75 * qw), round(0.75 * qh))
        banner("Search with only the middle of the query (--box x0,y0,x1,y1)")
        delf(["search", str(query), "--top-k", "3", "--box", ",".join(map(str, box))], env)
        ok = True
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
    except RuntimeError as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        show_logs(log_dir)
    finally:
        if launcher is not None:
            banner("Stopping the system")
            stop_system(launcher)
        shutil.rmtree(work, ignore_errors=True)
    if ok:
        print("\nDone. `make up` starts the system for real (data in ./data); "
              "then `delf ingest`, `delf search`, `delf --help`.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
