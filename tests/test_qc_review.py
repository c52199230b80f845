"""The QC review page ``qc.html``: what a clinician sees, checked in a real browser (headless Chromium).

CI installs the browser with ``apt-get install -y --no-install-recommends chromium``; without it the
browser test is skipped (the page's content is still checked by parsing it).
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from fedqc.cli.main import main
from fedqc.predict.review import review_html, review_order
from tests.subsets import read_csv as _read_csv
from tests.subsets import subset

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


class _Page(HTMLParser):
    """The case rows (in document order), every image and the summary line of a review page."""

    def __init__(self):
        super().__init__()
        self.rows, self.images, self.urls, self.failed = [], [], [], []
        self.csp = ""

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "case" in (a.get("class") or "").split():
            self.rows.append((a["data-case"], a["data-flagged"] == "true"))
        if tag == "tr" and a.get("class") == "failed":
            self.failed.append(a["data-case"])
        if tag == "img":
            self.images.append(a)
        if tag == "meta" and a.get("http-equiv") == "Content-Security-Policy":
            self.csp = a["content"]
        for key in ("src", "href"):
            if key in a:
                self.urls.append(a[key])


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


def test_the_page_lists_flagged_cases_first_then_by_pdc_and_embeds_everything():
    thumb = _tiny_png()
    rows = [
        {"case_id": "a", "view": "SA", "phase": "ED", "pdc": 0.9, "phd_mm": 3.0, "ood": False, "selected": 0,
         "th_low_pdc": 0.5, "th_up_phd": 9.0, "dice": 0.88, "error": ""},
        {"case_id": "b", "view": "SA", "phase": "ES", "pdc": 0.7, "phd_mm": 4.0, "ood": False, "selected": 1,
         "th_low_pdc": 0.5, "th_up_phd": 9.0, "dice": 0.8, "error": ""},
        {"case_id": "c", "view": "SA", "phase": "ED", "pdc": 0.6, "phd_mm": 12.0, "ood": True, "selected": 0,
         "th_low_pdc": 0.5, "th_up_phd": 9.0, "dice": 0.5, "error": ""},
        {"case_id": "d", "view": "SA", "phase": "ES", "pdc": 0.3, "phd_mm": 20.0, "ood": True, "selected": "fallback",
         "th_low_pdc": 0.5, "th_up_phd": 9.0, "dice": 0.2, "error": ""},
        {"case_id": "e<script>", "view": "SA", "phase": "ED", "pdc": "", "phd_mm": "", "ood": "", "selected": "",
         "th_low_pdc": 0.5, "th_up_phd": 9.0, "dice": "", "error": "/data/e.nii.gz: truncated"},
    ]
    assert [r["case_id"] for r in review_order(rows)] == ["d", "c", "b", "a"]
    page = _parse(review_html(rows, {r["case_id"]: thumb for r in rows}, "QC review"))
    assert page.rows == [("d", True), ("c", True), ("b", False), ("a", False)]
    assert page.failed == ["e<script>"]  # escaped, listed with its reason, not in the table
    assert all(url.startswith("data:image/png;base64,") for url in page.urls)
    assert "default-src 'none'" in page.csp
    plots = [i["data-plot"] for i in page.images if "data-plot" in i]
    assert plots == ["fences-SA", "dice-SA"]
    assert "<th>pTC</th>" in review_html(rows, {}, "QC review")
    with_ptc = [{**r, "ptc": 0.6543, "th_low_ptc": 0.8} if r["case_id"] == "c" else r for r in rows]
    assert "<td>0.654</td>" in review_html(with_ptc, {}, "QC review")  # the pTC column shows the case's score


def _tiny_png() -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedqc.predict.overlay import png_bytes

    fig, ax = plt.subplots(figsize=(1, 1))
    ax.imshow([[0, 1], [1, 0]])
    return png_bytes(fig, dpi=20)


@pytest.fixture(scope="module")
def predicted(trained, tiny_data, tmp_path_factory):
    """``fedqc predict`` on 2 labelled subjects per centre (16 cases): its output folder."""
    base = tmp_path_factory.mktemp("review")
    data = subset(tiny_data, base / "data", 2)
    out = base / "pred"
    assert main(["predict", "--run", str(trained[1]), "--data", str(data), "--out", str(out)]) == 0
    return data, out


def test_predict_writes_the_review_page_with_every_case_and_the_fences(predicted):
    _, out = predicted
    rows = _read_csv(out / "qc.csv")
    page = _parse((out / "qc.html").read_text())
    assert sorted(case for case, _ in page.rows) == sorted(r["case_id"] for r in rows)
    flags = [flagged for _, flagged in page.rows]
    assert flags == sorted(flags, reverse=True)  # flagged first
    by_id = {r["case_id"]: r for r in rows}
    for group in (True, False):
        pdcs = [float(by_id[c]["pdc"]) for c, f in page.rows if f == group]
        assert pdcs == sorted(pdcs)
    overlays = [i for i in page.images if i.get("class") == "overlay"]
    assert len(overlays) == len(rows) and all(i["src"].startswith("data:image/png;base64,") for i in overlays)
    assert {i["data-plot"] for i in page.images if "data-plot" in i} == {"fences-SA", "fences-LA", "dice-SA",
                                                                        "dice-LA"}
    # qc.consistency: tta (the default): every case's pTC, and the fence it was judged by
    assert all(0.0 <= float(r["ptc"]) <= 1.0 and float(r["th_low_ptc"]) < 1.0 for r in rows)
    assert not [u for u in page.urls if not u.startswith("data:")]  # self-contained


def test_evaluate_rebuilds_the_page_with_dice(predicted, tmp_path):
    data, out = predicted
    pred = shutil.copytree(out, tmp_path / "pred")
    for row in (rows := _read_csv(pred / "qc.csv")):
        row["dice"] = ""  # as if predicted without labels
    with open(pred / "qc.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (pred / "qc.html").unlink()
    assert main(["evaluate", "--data", str(data), "--pred", str(pred), "--json", str(tmp_path / "e.json")]) == 0
    html = (pred / "qc.html").read_text()
    page = _parse(html)
    assert {"dice-SA", "dice-LA"} <= {i["data-plot"] for i in page.images if "data-plot" in i}
    assert len(page.rows) == len(rows)
    scored = json.loads((tmp_path / "e.json").read_text())["cases"]
    assert len(scored) == len(rows)


PROBE = """<script>
window.addEventListener('load', () => {
  const rows = [...document.querySelectorAll('#cases tr.case')].map(r => {
    const box = r.getBoundingClientRect();
    const img = r.querySelector('img.overlay');
    return {id: r.dataset.case, flagged: r.dataset.flagged === 'true', top: box.top + window.scrollY,
            height: box.height, colour: getComputedStyle(r.querySelector('td')).backgroundColor,
            image: !!img && img.complete && img.naturalWidth > 100 && img.getBoundingClientRect().height > 50};
  });
  const plots = [...document.querySelectorAll('img.plot')].map(
    i => ({plot: i.dataset.plot, ok: i.complete && i.naturalWidth > 100}));
  const probe = document.createElement('pre');
  probe.id = 'probe';
  probe.textContent = JSON.stringify({rows, plots, summary: document.getElementById('summary').innerText});
  document.body.appendChild(probe);
});
</script>"""


def _chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--no-first-run", "--disable-extensions", f"--user-data-dir={tmp_path / 'profile'}",
                           "--virtual-time-budget=10000", *args], capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium: apt-get install -y --no-install-recommends "
                                             "chromium")
def test_the_review_page_as_a_browser_shows_it(predicted, tmp_path):
    _, out = predicted
    rows = {r["case_id"]: r for r in _read_csv(out / "qc.csv")}
    html = (out / "qc.html").read_text()
    # The page as shipped, plus a probe that reads back what the browser laid out. Its CSP is kept
    # (no network), only widened to run this one inline script.
    probed = re.sub(r"default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';", html, count=1)
    probed = probed.replace("</body>", PROBE + "</body>")
    page = tmp_path / "qc.html"
    page.write_text(probed)
    dom = _chromium(["--dump-dom", page.as_uri()], tmp_path)
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout, re.DOTALL)
    assert found, f"the browser did not render the page: {dom.stderr[-2000:]}"
    import html as html_lib

    shown = json.loads(html_lib.unescape(found.group(1)))
    listed = shown["rows"]
    assert sorted(r["id"] for r in listed) == sorted(rows)
    tops = [r["top"] for r in listed]
    assert tops == sorted(tops) and all(r["height"] > 50 for r in listed)  # laid out top to bottom, visible
    flags = [r["flagged"] for r in listed]
    n_flagged = sum(1 for r in rows.values() if r["ood"] == "True")
    assert flags == [True] * n_flagged + [False] * (len(rows) - n_flagged)  # flagged first on screen
    for group in (True, False):
        pdcs = [float(rows[r["id"]]["pdc"]) for r in listed if r["flagged"] == group]
        assert pdcs == sorted(pdcs)
    assert all(r["image"] for r in listed), [r["id"] for r in listed if not r["image"]]  # every overlay decoded
    if n_flagged and n_flagged < len(rows):  # flagged rows are tinted, others are not
        assert listed[0]["colour"] != listed[-1]["colour"]
    assert {p["plot"] for p in shown["plots"] if p["ok"]} == {"fences-SA", "fences-LA", "dice-SA", "dice-LA"}
    assert f"{len(rows)} cases" in shown["summary"] and f"{n_flagged} flagged" in shown["summary"]
    # The page as shipped renders on its own too (a screenshot that is not blank).
    shot = tmp_path / "shot.png"
    _chromium([f"--screenshot={shot}", "--window-size=1200,1600", (out / "qc.html").as_uri()], tmp_path)
    import matplotlib.image as mpimg

    pixels = mpimg.imread(shot)
    assert pixels.shape[0] >= 1000 and pixels[..., :3].std() > 0.05
