"""Reads a `delf eval --report` page back with the standard library's html.parser, as a
user's browser would see its content: the summary table, per method the query rows (AP,
first results marked right or wrong, missed positives with their rank, the picture of
each), the embedded pictures and every address the page refers to."""
from __future__ import annotations

import base64
import dataclasses
import re
from html.parser import HTMLParser


@dataclasses.dataclass
class Figure:
    image_id: str
    kind: str          # query, right, wrong or missed
    caption: str = ""
    thumb: str | None = None   # the CSS class holding its picture; None when shown by id


@dataclasses.dataclass
class Row:
    query: str
    cells: dict[str, str] = dataclasses.field(default_factory=dict)   # td class -> data-value
    figures: dict[str, list[Figure]] = dataclasses.field(default_factory=dict)  # td class -> figures
    other_aps: list[float] = dataclasses.field(default_factory=list)

    @property
    def ap(self) -> float:
        return float(self.cells["ap"])


@dataclasses.dataclass
class Report:
    summary: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    methods: dict[str, list[Row]] = dataclasses.field(default_factory=dict)
    headers: dict[str, list[str]] = dataclasses.field(default_factory=dict)   # method -> th data-key
    style: str = ""
    scripts: list[str] = dataclasses.field(default_factory=list)
    addresses: list[str] = dataclasses.field(default_factory=list)          # every src / href
    images: dict[str, str] = dataclasses.field(default_factory=dict)        # img id -> src

    def thumbnails(self) -> dict[str, bytes]:
        """CSS class -> the bytes of its picture (base64 data URI in the stylesheet)."""
        return {m.group(1): base64.b64decode(m.group(3))
                for m in re.finditer(r"\.(p\d+)\{background-image:url\(data:image/(jpeg|png);base64,"
                                     r"([A-Za-z0-9+/=]+)\)\}", self.style)}

    def css_urls(self) -> list[str]:
        return re.findall(r"url\(([^)]*)\)", self.style)


class _Parser(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.report = Report()
        self.method: str | None = None      # inside table.queries of this method
        self.summary_method: str | None = None
        self.row: Row | None = None
        self.td: str | None = None
        self.figure: Figure | None = None
        self.in_caption = False
        self.raw: str | None = None         # inside <style> or <script>

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href"):
            if key in a:
                self.report.addresses.append(a[key])
        if tag in ("style", "script"):
            self.raw = tag
            if tag == "script":
                self.report.scripts.append("")
        elif tag == "img":
            self.report.images[a.get("id", "")] = a.get("src", "")
        elif tag == "table" and "queries" in (a.get("class") or ""):
            self.method = a["data-method"]
            self.report.methods[self.method] = []
            self.report.headers[self.method] = []
        elif tag == "th" and self.method and a.get("data-key"):
            self.report.headers[self.method].append(a["data-key"])
        elif tag == "tr" and self.method and "data-query" in a:
            self.row = Row(a["data-query"])
            self.report.methods[self.method].append(self.row)
        elif tag == "tr" and "data-method" in a:
            self.summary_method = a["data-method"]
            self.report.summary[self.summary_method] = {}
        elif tag == "td":
            self._td(a)
        elif tag == "figure" and self.row is not None:
            self.figure = Figure(a["data-id"], a["class"])
            self.row.figures.setdefault(self.td, []).append(self.figure)
        elif tag == "span" and self.figure is not None and "thumb" in a.get("class", ""):
            classes = a["class"].split()
            self.figure.thumb = next((c for c in classes if re.fullmatch(r"p\d+", c)), None)
        elif tag == "figcaption":
            self.in_caption = True

    def _td(self, a: dict) -> None:
        if self.row is not None:
            self.td = a.get("class")
            if self.td == "ap-other":
                self.row.other_aps.append(float(a["data-value"]))
            elif "data-value" in a:
                self.row.cells[self.td] = a["data-value"]
        elif self.summary_method and "data-key" in a:
            self.report.summary[self.summary_method][a["data-key"]] = float(a["data-value"])

    def handle_endtag(self, tag):
        if tag in ("style", "script"):
            self.raw = None
        elif tag == "table":
            self.method = None
            self.summary_method = None
        elif tag == "tr":
            self.row = None
        elif tag == "figure":
            self.figure = None
        elif tag == "figcaption":
            self.in_caption = False

    def handle_data(self, data):
        if self.raw == "style":
            self.report.style += data
        elif self.raw == "script":
            self.report.scripts[-1] += data
        elif self.in_caption and self.figure is not None:
            self.figure.caption += data


def parse_report(text: str) -> Report:
    parser = _Parser()
    parser.feed(text)
    parser.close()
    return parser.report
