"""`delf search PHOTO --show matches.png|.html`: the evidence of each match, drawn.

One row per match: the query (left) beside the matched photo (right, from the thumbnail
the index keeps, `GetImage` with ``thumbnail``), the query's region outlined on the match
(the verified corners the search returns), the RANSAC inlier correspondences of a verified
match joined by lines, the other correspondences (all of them, for a match the score does
not accept) as dots, a header with the rank, id, score, inliers, votes and whether the match
is verified, and a legend on top. ``.html`` writes one self-contained page: each
row as an inline PNG (base64) under a table of the same figures, nothing fetched.

Coordinates come from the search answer in each photo's own pixels (as submitted); a
`Panel` maps them into the picture (its offset and scale), and `draw_matches` returns the
panels it used, so a caller (the tests) can find any drawn point in the picture.
"""
from __future__ import annotations

import base64
import dataclasses
import html
from pathlib import Path

import cv2
import numpy as np

PANEL_HEIGHT = 320       # a photo's height in the picture (less for a very wide photo)
PANEL_MAX_WIDTH = 480
HEADER = 30              # the text band above each row
MARGIN = 10
GAP = 20                 # between the query and the match
MAX_LINES = 120          # inlier lines drawn per match (evenly thinned beyond: readable)

# RGB. Pure colours, drawn without anti-aliasing: exact values, easy to find in the picture.
OUTLINE = (255, 0, 255)  # the matched region on the match
INLIER = (0, 255, 0)     # lines between inlier correspondences
OUTLIER = (255, 64, 0)   # dots: correspondences RANSAC rejected
BOX = (0, 200, 255)      # the query box, when the search had one
VERIFIED_TEXT = (0, 130, 0)
UNVERIFIED_TEXT = (200, 0, 0)


@dataclasses.dataclass(frozen=True)
class Panel:
    """Where one photo lies in the picture: image pixel (x, y) -> picture pixel
    (x0 + x * sx, y0 + y * sy)."""

    x0: int
    y0: int
    width: int
    height: int
    sx: float
    sy: float

    def to_picture(self, points) -> np.ndarray:
        p = np.asarray(points, np.float64).reshape(-1, 2)
        return np.stack([self.x0 + p[:, 0] * self.sx, self.y0 + p[:, 1] * self.sy], 1)


@dataclasses.dataclass(frozen=True)
class Row:
    """One drawn match: its band of the picture and its two panels."""

    top: int
    height: int
    query: Panel
    match: Panel


@dataclasses.dataclass
class Photo:
    """Pixels to show for a photo whose coordinates are in a frame of ``size`` (w, h):
    the photo itself, or its thumbnail (smaller; same aspect ratio). ``rgb`` None: no
    pixels (an index without thumbnails): a grey panel of that shape."""

    rgb: np.ndarray | None
    size: tuple[int, int]


def decode_rgb(data: bytes) -> np.ndarray | None:
    """RGB pixels of an encoded photo (None for empty or undecodable bytes)."""
    if not data:
        return None
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _panel_size(size: tuple[int, int]) -> tuple[int, int, float, float]:
    w, h = (max(1, int(v)) for v in size)
    scale = min(PANEL_HEIGHT / h, PANEL_MAX_WIDTH / w)
    pw, ph = max(1, round(w * scale)), max(1, round(h * scale))
    return pw, ph, pw / w, ph / h


def _paste(canvas: np.ndarray, photo: Photo, x0: int, y0: int) -> Panel:
    pw, ph, sx, sy = _panel_size(photo.size)
    if photo.rgb is None:
        canvas[y0:y0 + ph, x0:x0 + pw] = 200
        cv2.putText(canvas, "no thumbnail stored", (x0 + 8, y0 + ph // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                    (60, 60, 60), 1, cv2.LINE_AA)
    else:
        rgb = photo.rgb[..., :3] if photo.rgb.ndim == 3 else np.stack([photo.rgb] * 3, -1)
        small = cv2.resize(rgb, (pw, ph), interpolation=cv2.INTER_AREA if pw < rgb.shape[1] else cv2.INTER_LINEAR)
        canvas[y0:y0 + ph, x0:x0 + pw] = small
    return Panel(x0, y0, pw, ph, sx, sy)


def _ascii(text: str) -> str:
    """OpenCV's fonts draw ASCII only."""
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in text)


def _header(match, rank: int) -> tuple[str, str]:
    verified = "verified" if match.verified else "not verified"
    return (f"#{rank} {_ascii(match.image_id)}  score {match.score:.2f}  inliers {match.inliers}  "
            f"votes {match.votes}  ", verified)


def _points(match) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query xy (M, 2), indexed xy (M, 2), inlier (M,)) of a match's correspondences."""
    c = list(match.correspondences)
    q = np.array([[p.query.x, p.query.y] for p in c], np.float64).reshape(-1, 2)
    d = np.array([[p.indexed.x, p.indexed.y] for p in c], np.float64).reshape(-1, 2)
    return q, d, np.array([p.inlier for p in c], bool)


def drawn_inliers(inlier: np.ndarray) -> np.ndarray:
    """The correspondences whose inlier line is drawn: all inliers, evenly thinned to
    MAX_LINES."""
    idx = np.flatnonzero(inlier)
    if len(idx) > MAX_LINES:
        idx = idx[np.linspace(0, len(idx) - 1, MAX_LINES).round().astype(int)]
    return idx


def _draw_evidence(canvas: np.ndarray, row: Row, match, box) -> None:
    q, d, inlier = _points(match)
    if not match.verified:  # lines only for what the score accepts
        inlier = np.zeros(len(inlier), bool)
    qp, dp = row.query.to_picture(q), row.match.to_picture(d)
    for x, y in np.vstack([qp[~inlier], dp[~inlier]]).round().astype(int):
        cv2.circle(canvas, (int(x), int(y)), 2, OUTLIER, -1, cv2.LINE_8)
    for i in drawn_inliers(inlier):
        a, b = qp[i].round().astype(int), dp[i].round().astype(int)
        cv2.line(canvas, (int(a[0]), int(a[1])), (int(b[0]), int(b[1])), INLIER, 1, cv2.LINE_8)
    if box is not None:
        x0, y0, x1, y1 = box
        corners = row.query.to_picture([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
        cv2.polylines(canvas, [corners.round().astype(np.int32)], True, BOX, 2, cv2.LINE_8)
    if match.verified and len(match.corners) == 4:
        _outline(canvas, row.match, [[p.x, p.y] for p in match.corners])


def _outline(canvas: np.ndarray, panel: Panel, corners) -> None:
    """The region's outline, clipped to the match's panel (a region partly outside the
    photo would otherwise cross the query or the header)."""
    quad = panel.to_picture(corners) - [panel.x0, panel.y0]
    if not np.all(np.isfinite(quad)) or np.abs(quad).max() > 1e6:
        return
    view = np.ascontiguousarray(canvas[panel.y0:panel.y0 + panel.height, panel.x0:panel.x0 + panel.width])
    cv2.polylines(view, [quad.round().astype(np.int32)], True, OUTLINE, 2, cv2.LINE_8)
    canvas[panel.y0:panel.y0 + panel.height, panel.x0:panel.x0 + panel.width] = view


def draw_row(query: Photo, match, photo: Photo, rank: int, box=None) -> tuple[np.ndarray, Row]:
    """The picture of one match (RGB) and where its panels lie in it."""
    qw, qh, _, _ = _panel_size(query.size)
    mw, mh, _, _ = _panel_size(photo.size)
    height = HEADER + max(qh, mh) + MARGIN
    canvas = np.full((height, MARGIN + qw + GAP + mw + MARGIN, 3), 255, np.uint8)
    row = Row(0, height, _paste(canvas, query, MARGIN, HEADER), _paste(canvas, photo, MARGIN + qw + GAP, HEADER))
    _draw_evidence(canvas, row, match, box)
    text, verified = _header(match, rank)
    cv2.putText(canvas, text, (MARGIN, HEADER - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    (tw, _), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
    cv2.putText(canvas, verified, (MARGIN + tw, HEADER - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                VERIFIED_TEXT if match.verified else UNVERIFIED_TEXT, 2 if match.verified else 1, cv2.LINE_AA)
    return canvas, row


LEGEND_HEIGHT = 46


def legend(width: int, verified_score: float | None = None) -> np.ndarray:
    """The key to the pictures' marks (RGB band ``width`` wide)."""
    band = np.full((LEGEND_HEIGHT, max(width, 760), 3), 255, np.uint8)
    y, x = 16, MARGIN
    font = cv2.FONT_HERSHEY_SIMPLEX

    def label(text: str, x: int) -> int:
        cv2.putText(band, text, (x, y + 5), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        return x + cv2.getTextSize(text, font, 0.45, 1)[0][0] + 18

    cv2.line(band, (x, y), (x + 24, y), INLIER, 2, cv2.LINE_8)
    x = label("RANSAC inlier (verified match)", x + 30)
    cv2.circle(band, (x + 4, y), 3, OUTLIER, -1, cv2.LINE_8)
    x = label("other correspondence", x + 12)
    cv2.rectangle(band, (x, y - 6), (x + 18, y + 6), OUTLINE, 2, cv2.LINE_8)
    x = label("query region found", x + 24)
    cv2.rectangle(band, (x, y - 6), (x + 18, y + 6), BOX, 2, cv2.LINE_8)
    label("query box", x + 24)
    bar = "" if verified_score is None else f"; verified from {verified_score:.2f}"
    cv2.putText(band, f"score 0-1 from votes and inliers, one scale for every match{bar}",
                (MARGIN, y + 24), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return band


def draw_matches(query: Photo, matches, photos: dict[str, Photo], box=None,
                 verified_score: float | None = None) -> tuple[np.ndarray, list[Row]]:
    """One picture (RGB) of every match, one row each, best first, under the legend, and
    each row's panels in that picture's coordinates."""
    drawn = [draw_row(query, m, photos[m.image_id], rank, box) for rank, m in enumerate(matches, 1)]
    if not drawn:
        canvas = np.full((HEADER + MARGIN, 400, 3), 255, np.uint8)
        cv2.putText(canvas, "no matches", (MARGIN, HEADER - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
        return canvas, []
    key = legend(max(c.shape[1] for c, _ in drawn), verified_score)
    width = max(key.shape[1], *(c.shape[1] for c, _ in drawn))
    picture = np.full((LEGEND_HEIGHT + sum(c.shape[0] for c, _ in drawn), width, 3), 255, np.uint8)
    picture[:LEGEND_HEIGHT, :key.shape[1]] = key
    rows, top = [], LEGEND_HEIGHT
    for canvas, row in drawn:
        picture[top:top + canvas.shape[0], :canvas.shape[1]] = canvas
        rows.append(Row(top, row.height, _shifted(row.query, top), _shifted(row.match, top)))
        top += canvas.shape[0]
    return picture, rows


def _shifted(panel: Panel, dy: int) -> Panel:
    return dataclasses.replace(panel, y0=panel.y0 + dy)


def png_bytes(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def html_page(query: Photo, response, photos: dict[str, Photo], box=None, title: str = "") -> str:
    """One self-contained page: a table of the matches' figures, then each match's
    picture (inline PNG) under its own figures."""
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title or 'delf search')}</title>",
             "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}td.id{text-align:left}"
             ".no{color:#c00}.yes{color:#070;font-weight:bold}img{display:block;margin:.3em 0 1.5em}</style>",
             f"</head><body><h1>{esc(title or 'delf search')}</h1>",
             f"<p>{len(response.matches)} matches, {response.query_features} query features, "
             f"{response.elapsed_s:.2f} s. Score: 0-1 from the nearest-neighbour votes and the RANSAC "
             f"inliers, one scale for every match; verified from {response.verified_score:.2f}. "
             "Green lines join the RANSAC inliers of a verified match; dots are the other "
             "correspondences (all of them for a match that is not verified); the magenta outline "
             "is the query's region as found in the match.</p>",
             "<table><tr><th>rank</th><th>image id</th><th>score</th><th>inliers</th><th>votes</th>"
             "<th>verified</th><th>correspondences</th></tr>"]
    for rank, m in enumerate(response.matches, 1):
        yes = "yes" if m.verified else "no"
        parts.append(f"<tr><td>{rank}</td><td class='id'><a href='#m{rank}'>{esc(m.image_id)}</a></td>"
                     f"<td>{m.score:.2f}</td><td>{m.inliers}</td><td>{m.votes}</td>"
                     f"<td class='{yes}'>{yes}</td><td>{len(m.correspondences)}</td></tr>")
    parts.append("</table>")
    for rank, m in enumerate(response.matches, 1):
        rgb, _ = draw_row(query, m, photos[m.image_id], rank, box)
        meta = ", ".join(f"{esc(k)}={esc(v)}" for k, v in sorted(m.metadata.items()))
        data = base64.b64encode(png_bytes(rgb)).decode("ascii")
        parts.append(f"<h2 id='m{rank}'>#{rank} {esc(m.image_id)}</h2><p>{meta}</p>"
                     f"<img alt='match {rank}: {esc(m.image_id)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def fetch_photos(client, matches) -> dict[str, Photo]:
    """Each match's thumbnail and frame (GetImage with the thumbnail)."""
    photos = {}
    for m in matches:
        info = client.get_image(m.image_id, thumbnail=True)
        photos[m.image_id] = Photo(decode_rgb(info.thumbnail), (info.width, info.height))
    return photos


def query_photo(client, photo: Path | None, image_id: str | None) -> Photo:
    """The query's pixels: the local photo as the server saw it (upright by its EXIF
    orientation), or an indexed query's thumbnail."""
    if photo is not None:
        from delf_common.images import ImageLimits, decode_image

        rgb = decode_image(Path(photo).read_bytes(), ImageLimits.from_env())
        return Photo(rgb, (rgb.shape[1], rgb.shape[0]))
    info = client.get_image(image_id, thumbnail=True)
    return Photo(decode_rgb(info.thumbnail), (info.width, info.height))


def write_show(path: str | Path, client, response, photo: Path | None, image_id: str | None, box=None) -> Path:
    """Write the evidence of ``response`` (a search made with correspondences) as a PNG,
    or as one HTML page when ``path`` ends in .html/.htm. Returns the path."""
    path = Path(path)
    query = query_photo(client, photo, image_id)
    photos = fetch_photos(client, response.matches)
    if path.suffix.lower() in (".html", ".htm"):
        title = f"delf search {photo.name if photo is not None else '--id ' + image_id}"
        path.write_text(html_page(query, response, photos, box, title), encoding="utf-8")
    else:
        picture, _ = draw_matches(query, response.matches, photos, box, response.verified_score)
        path.write_bytes(png_bytes(picture))
    return path

