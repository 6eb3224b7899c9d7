"""`delf eval --plot` (and the report's figure): the interpolated precision-recall curves as a
PNG, drawn with OpenCV."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from delf_tools.eval_metrics import RECALL_LEVELS
from delf_tools.eval_set import EvalError

COLOURS = {"delf": (180, 90, 20), "global-gem": (0, 140, 255), "sift": (60, 160, 60)}  # BGR


def plot_pr(results: dict[str, dict], path: str | Path, levels: np.ndarray = RECALL_LEVELS) -> None:
    """Interpolated precision-recall curves (one per method) as a PNG, drawn with OpenCV."""
    import cv2

    img = draw_pr(results, levels)
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), img):
        raise EvalError(f"could not write the plot to {path} (use a .png name)")


def pr_png(results: dict[str, dict], levels: np.ndarray = RECALL_LEVELS) -> bytes:
    """The same plot as PNG bytes (`delf eval --report` embeds it)."""
    import cv2

    ok, buf = cv2.imencode(".png", draw_pr(results, levels))
    if not ok:  # pragma: no cover - a BGR uint8 image always encodes
        raise EvalError("could not encode the precision-recall plot")
    return buf.tobytes()


def draw_pr(results: dict[str, dict], levels: np.ndarray = RECALL_LEVELS) -> np.ndarray:
    """The precision-recall plot as a BGR uint8 image."""
    import cv2

    W, H, left, right, top, bottom = 900, 680, 90, 30, 50, 80
    img = np.full((H, W, 3), 255, np.uint8)
    pw, ph = W - left - right, H - top - bottom

    def to_px(r: float, p: float) -> tuple[int, int]:
        return int(round(left + r * pw)), int(round(top + (1.0 - p) * ph))

    font = cv2.FONT_HERSHEY_SIMPLEX
    for i in range(11):
        v = i / 10
        x, _ = to_px(v, 0)
        _, y = to_px(0, v)
        cv2.line(img, (x, top), (x, top + ph), (225, 225, 225), 1)
        cv2.line(img, (left, y), (left + pw, y), (225, 225, 225), 1)
        cv2.putText(img, f"{v:.1f}", (x - 14, top + ph + 22), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(img, f"{v:.1f}", (left - 38, y + 5), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.rectangle(img, (left, top), (left + pw, top + ph), (0, 0, 0), 1)
    cv2.putText(img, "recall", (left + pw // 2 - 25, H - 25), font, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, "precision", (10, top - 15), font, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, "interpolated precision-recall, mean over queries", (left + 150, top - 15),
                font, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    extra = [(40, 40, 200), (150, 50, 150), (90, 90, 90)]
    for n, (name, r) in enumerate(results.items()):
        colour = COLOURS.get(name) or extra[n % len(extra)]
        pts = np.array([to_px(rr, pp) for rr, pp in zip(levels, r["pr_curve"])], np.int32)
        cv2.polylines(img, [pts.reshape(-1, 1, 2)], False, colour, 2, cv2.LINE_AA)
        for x, y in pts:
            cv2.circle(img, (int(x), int(y)), 3, colour, -1, cv2.LINE_AA)
        ly = top + ph - 20 - 24 * (len(results) - 1 - n)
        cv2.line(img, (left + 20, ly - 5), (left + 50, ly - 5), colour, 3, cv2.LINE_AA)
        cv2.putText(img, f"{name}  mAP {r['map']:.3f}", (left + 58, ly), font, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    return img
