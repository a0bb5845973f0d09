"""QC reports (:mod:`mdgru_keras.reports`): self-contained pages whose panels put the marker on the landmark's voxel
in a conventional orientation, a summary table per scan, a group page worst first, ``predict --report``, and the
pages in a real headless Chromium (offline, every image rendered, no console error; skipped without Chromium).

The structure checks parse the HTML with :mod:`html.parser` and decode every embedded PNG, so they run everywhere.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import io
import re
import shutil
import tempfile
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mdgru_keras.cli import main as cli
from mdgru_keras.io.nifti import read_volume
from mdgru_keras.prediction import DEFAULT_THRESHOLDS, QualityThresholds, ScanPrediction
from mdgru_keras.reports import ReportEntry, group_report, participant_report, report_page_paths, worst_status
from mdgru_keras.reports.panels import MARKER_RGB, NO_DATA_RGB, marker_extent_px

PANEL_PX = 64
CENTRE = PANEL_PX // 2
VIEWS = ("axial", "coronal", "sagittal")
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
GENERATED = datetime.datetime(2025, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)


# ---------------------------------------------------------------------------------------------------------
# helpers


class Page(HTMLParser):
    """What the tests look at in a page: images, links, ids, table rows (cells' text and the row's class), the
    text of every element with an id, and every attribute that could load a resource."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.images: list[dict[str, str]] = []
        self.links: list[str] = []
        self.ids: set[str] = set()
        self.rows: dict[str, list[tuple[str, list[str], list[str]]]] = {}  # table class -> (row class, cells, links)
        self.resources: list[str] = []
        self.title = ""
        self._table: str | None = None
        self._row: tuple[str, list[str], list[str]] | None = None
        self._cell: list[str] | None = None
        self._in_title = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        if "id" in attributes:
            assert attributes["id"] not in self.ids, f"duplicate id {attributes['id']}"
            self.ids.add(attributes["id"])
        for name in ("src", "href", "srcset", "poster", "data", "action"):
            if name in attributes and tag != "a":
                self.resources.append(attributes[name])
        if tag == "img":
            self.images.append(attributes)
        elif tag == "a":
            self.links.append(attributes.get("href", ""))
            if self._row is not None:
                self._row[2].append(attributes.get("href", ""))
        elif tag == "table":
            self._table = attributes.get("class", "")
            self.rows.setdefault(self._table, [])
        elif tag == "tr" and self._table is not None:
            self._row = (attributes.get("class", ""), [], [])
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "title":
            self._in_title = True

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row[1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._table is not None:
                self.rows[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None
        elif tag == "title":
            self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._in_title:
            self.title += data


def read_page(path: Path) -> tuple[str, Page]:
    text = path.read_text(encoding="utf-8")
    return text, Page(text)


def decode_png(src: str) -> np.ndarray:
    """The RGB pixels ``int [rows, columns, 3]`` of a ``data:image/png;base64,...`` URI."""
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:40]
    data = base64.b64decode(src[len(prefix) :], validate=True)
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB")).astype(int)


def panel_images(page: Page, landmark: str) -> dict[str, np.ndarray]:
    """view -> RGB pixels of a landmark's three panels (found by their alt text)."""
    found = {}
    for image in page.images:
        for view in VIEWS:
            if image.get("alt") == f"{view} slice through {landmark}":
                found[view] = decode_png(image["src"])
    assert sorted(found) == sorted(VIEWS), f"panels of {landmark}: {sorted(found)}"
    return found


def color_mask(rgb: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    return (rgb == np.array(color)).all(axis=-1)


def gray_mask(rgb: np.ndarray, level: float, tolerance: int = 3) -> np.ndarray:
    """Grey pixels of intensity ``level`` in [0, 1] of the black..white window."""
    target = level * 255
    gray = (rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])
    return gray & (np.abs(rgb[..., 0] - target) <= tolerance)


def centroid(mask: np.ndarray) -> np.ndarray:
    rows, columns = np.nonzero(mask)
    assert rows.size, "no such pixel"
    return np.array([rows.mean(), columns.mean()])


def make_prediction(path: Path, names, world_mm, shape, confidence=None, disagreement=None) -> ScanPrediction:
    affine = nib.load(str(path)).affine
    world_mm = np.asarray(world_mm, dtype=np.float64)
    voxel = (world_mm - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    count = len(names)
    return ScanPrediction(
        path=str(path),
        landmark_names=tuple(names),
        world_mm=world_mm,
        voxel=voxel,
        coarse_world_mm=world_mm + 1.0,
        coarse_voxel=voxel,
        confidence=np.full(count, 0.9, np.float32) if confidence is None else np.asarray(confidence, np.float32),
        shape=tuple(shape),
        flip_disagreement_mm=np.full(count, 1.0) if disagreement is None else np.asarray(disagreement, float),
    )


# ---------------------------------------------------------------------------------------------------------
# the marker on the voxel, in a conventional orientation, for an LPS anisotropic scan

# LPS: file axis i runs to the patient's left, j posterior, k superior; 1 x 1.5 x 2 mm voxels.
LPS_AFFINE = np.array([[-1.0, 0, 0, 30.0], [0, -1.5, 0, 40.0], [0, 0, 2.0, -20.0], [0, 0, 0, 1]])
LPS_SHAPE = (40, 36, 30)
LANDMARK_VOXEL = (20, 18, 12)
# Probes beside the landmark, each a voxel of its own brightness, 8 mm right, 9 mm anterior, 10 mm superior of it.
PROBES = {"right": ((-8, 0, 0), 0.6), "anterior": ((0, -6, 0), 0.4), "superior": ((0, 0, 5), 0.2)}
# Where each probe must appear: view -> probe -> (row, column) offset from the centre pixel at 1 mm per pixel.
# Axial and coronal show the patient's right on the viewer's left, sagittal anterior on the left; superior (axial:
# anterior) is up.
EXPECTED_OFFSETS = {
    "axial": {"right": (0, -8), "anterior": (-9, 0)},
    "coronal": {"right": (0, -8), "superior": (-10, 0)},
    "sagittal": {"anterior": (0, -9), "superior": (-10, 0)},
}


@pytest.fixture(scope="module")
def lps_scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    volume = np.zeros(LPS_SHAPE, np.float32)
    volume[LANDMARK_VOXEL] = 1.0  # white; the probes are greys, everything else black
    for offset, level in PROBES.values():
        volume[tuple(np.add(LANDMARK_VOXEL, offset))] = level
    path = tmp_path_factory.mktemp("lps") / "lps.nii.gz"
    nib.save(nib.Nifti1Image(volume, LPS_AFFINE), str(path))
    return path


def test_the_reoriented_volume_is_nibabels_closest_canonical(lps_scan: Path) -> None:
    canonical = nib.as_closest_canonical(nib.load(str(lps_scan)))
    volume = read_volume(lps_scan, spacing_mm=None)
    np.testing.assert_array_equal(volume.data, np.asarray(canonical.dataobj, np.float32))
    np.testing.assert_allclose(volume.voxel_to_world, canonical.affine)


def test_the_marker_and_the_bright_voxel_coincide_in_every_view(lps_scan: Path, tmp_path: Path) -> None:
    world = LPS_AFFINE[:3, :3] @ np.array(LANDMARK_VOXEL, float) + LPS_AFFINE[:3, 3]
    prediction = make_prediction(lps_scan, ["spot"], [world], LPS_SHAPE)
    page_path = participant_report(tmp_path / "lps.html", [(lps_scan, prediction)], panel_px=PANEL_PX)
    _, page = read_page(page_path)
    gap, arm = marker_extent_px(PANEL_PX)
    for view, rgb in panel_images(page, "spot").items():
        assert rgb.shape == (PANEL_PX, PANEL_PX, 3), view
        marker = color_mask(rgb, MARKER_RGB["ok"])
        # The crosshair: 4 arms of arm - gap + 1 pixels around the centre pixel, which it leaves open.
        assert marker.sum() == 4 * (arm - gap + 1), view
        np.testing.assert_allclose(centroid(marker), [CENTRE, CENTRE], err_msg=view)
        white = gray_mask(rgb, 1.0)
        assert white[CENTRE, CENTRE], f"{view}: the landmark's voxel is not under the marker's centre"
        # One voxel of 1 x 1.5 x 2 mm at 1 mm per pixel: a small block around the centre (the nearest-voxel rule
        # puts the half-way pixels on one side, hence the half-pixel tolerance).
        assert white.sum() <= 6, view
        assert np.abs(centroid(white) - CENTRE).max() <= 0.5, view
        for probe, (d_row, d_column) in EXPECTED_OFFSETS[view].items():
            level = PROBES[probe][1]
            mask = gray_mask(rgb, level)
            assert mask[CENTRE + d_row, CENTRE + d_column], f"{view}: {probe} probe not at {(d_row, d_column)}"
            assert np.abs(centroid(mask) - [CENTRE + d_row, CENTRE + d_column]).max() <= 0.5, (view, probe)
        # beyond the scan: the no-data colour, never black (the scan ends within the panel along some axis)
        assert color_mask(rgb, NO_DATA_RGB).any(), view


# ---------------------------------------------------------------------------------------------------------
# a participant page with 32 landmarks


NAMES = tuple(f"L{k:02d}<b>&amp;" for k in range(32))  # markup-like names must be shown, not interpreted
SCAN_SHAPE = (48, 56, 40)
FLAGGED = {  # landmark index -> expected status
    3: "outside_image",
    5: "low_confidence",
    7: "unstable",
    9: "low_confidence;unstable",
}


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(7)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in SCAN_SHAPE], indexing="ij")
    volume = ((x**2 + y**2 + z**2) < 0.7) * 200.0 + rng.normal(0, 10, SCAN_SHAPE)
    affine = np.diag([1.2, 1.0, 1.5, 1.0])
    affine[:3, 3] = [-28.0, -27.0, -30.0]
    path = tmp_path_factory.mktemp("head") / "sub-01 <T1w> & co.nii.gz"
    nib.save(nib.Nifti1Image(volume.astype(np.int16), affine), str(path))
    return path


@pytest.fixture(scope="module")
def head_prediction(head: Path) -> ScanPrediction:
    rng = np.random.default_rng(8)
    affine = nib.load(str(head)).affine
    voxel = np.stack([rng.uniform(8, n - 8, len(NAMES)) for n in SCAN_SHAPE], axis=1)
    voxel[3] = [-6.0, 20.0, 20.0]  # beyond the scan
    world = voxel @ affine[:3, :3].T + affine[:3, 3]
    confidence = np.full(len(NAMES), 0.8)
    confidence[[5, 9]] = 1e-5  # below the default --min-confidence
    disagreement = np.full(len(NAMES), 2.0)
    disagreement[[7, 9]] = 12.0
    return make_prediction(head, NAMES, world, SCAN_SHAPE, confidence, disagreement)


@pytest.fixture(scope="module")
def head_page(head: Path, head_prediction: ScanPrediction, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pages") / "sub-01.html"
    model_info = {"name": "afids<32>", "version": 3, "created_at": "2025-01-01T00:00:00+00:00", "runs": {"a": [1]}}
    return participant_report(
        out, [(head, head_prediction)], title="sub-01 <&>", model_info=model_info, panel_px=PANEL_PX,
        generated=GENERATED,
    )  # fmt: skip


def test_statuses_of_the_fixture(head_prediction: ScanPrediction) -> None:
    statuses = head_prediction.statuses()
    assert {k: s for k, s in enumerate(statuses) if s != "ok"} == FLAGGED


def test_the_page_has_a_summary_row_per_landmark_with_its_flags(head_page: Path, head_prediction) -> None:
    text, page = read_page(head_page)
    assert sorted(p.name for p in head_page.parent.iterdir()) == ["sub-01.html"]  # atomic: nothing left over
    assert page.title == "Landmark QC: sub-01 <&>"
    rows = page.rows["summary"]
    header, body = rows[0], rows[1:]
    assert header[1] == ["#", "landmark", "x (mm)", "y (mm)", "z (mm)", "confidence", "flip disagreement (mm)",
                         "coarse shift (mm)", "status"]  # fmt: skip
    assert [cells[1] for _, cells, _ in body] == list(NAMES)
    for k, (row_class, cells, links) in enumerate(body):
        status = FLAGGED.get(k, "ok")
        assert cells[-1] == status.replace(";", " "), k
        world = [float(v) for v in cells[2:5]]
        np.testing.assert_allclose(world, head_prediction.world_mm[k], atol=0.051)
        assert cells[5] == f"{head_prediction.confidence[k]:.3g}"
        assert cells[7] == f"{head_prediction.coarse_shift_mm()[k]:.1f}"
        if k in FLAGGED:
            assert row_class.split()[0] == "flagged" and row_class.split()[1] == worst_status([status]), k
        else:
            assert row_class == "ok"
        # each row links to its landmark's figure, which carries the same flags
        assert len(links) == 1 and links[0].startswith("#") and links[0][1:] in page.ids
    figures = re.findall(r'<article class="landmark ([^"]*)" id="([^"]*)"><h3>(.*?)</h3>', text)
    assert len(figures) == len(NAMES)
    for k, (classes, _, heading) in enumerate(figures):
        for flag in FLAGGED.get(k, "ok").split(";"):
            assert f">{flag}</span>" in heading, (k, heading)
        assert ("flagged" in classes.split()) == (k in FLAGGED)


def test_the_page_is_self_contained_and_escapes_text(head_page: Path) -> None:
    text, page = read_page(head_page)
    assert not re.search(r"https?://", text)
    assert all(resource.startswith("data:") for resource in page.resources), page.resources
    assert all(link.startswith("#") for link in page.links)
    # names, file names and model facts with markup characters are text, never markup
    assert "<b>" not in text and "<T1w>" not in text and "afids<32>" not in text
    assert "L00&lt;b&gt;&amp;amp;" in text
    assert "sub-01 &lt;T1w&gt; &amp; co.nii.gz" in text
    assert "afids&lt;32&gt;" in text and "2025-01-02T03:04:05+00:00" in text
    assert DEFAULT_THRESHOLDS.describe() in text
    assert "low_confidence below 0.001; unstable above 8 mm flip disagreement; coarse_fine_disagree above 15" in text


def test_every_panel_is_a_png_of_the_panel_size(head_page: Path) -> None:
    _, page = read_page(head_page)
    assert len(page.images) == 3 * len(NAMES)
    for image in page.images:
        rgb = decode_png(image["src"])
        assert rgb.shape == (PANEL_PX, PANEL_PX, 3)
        assert int(image["width"]) == int(image["height"]) == 2 * PANEL_PX  # shown at twice the size
    # the landmark beyond the scan sits in the no-data colour in the view across the edge it crossed (x < 0)
    axial = panel_images(page, NAMES[3])["axial"]
    assert color_mask(axial, NO_DATA_RGB)[CENTRE, CENTRE]
    assert color_mask(axial, MARKER_RGB["outside_image"]).sum() > 0


def test_a_page_covers_several_scans_and_failed_ones(head: Path, head_prediction, tmp_path: Path) -> None:
    second = head_prediction.select(NAMES[:2])
    world_mm = second.world_mm.copy()
    world_mm[1] = np.nan  # a model that lost a landmark altogether: no panels, "n/a", flagged outside_image
    second = dataclasses.replace(second, world_mm=world_mm, voxel=world_mm.copy())
    page_path = participant_report(
        tmp_path / "p.html", [(head, head_prediction), (head, second)], failed=[("ses-2/bad.nii.gz", "truncated")],
        panel_px=16,
    )  # fmt: skip
    text, page = read_page(page_path)
    assert len(page.rows["summary"]) == 2 * 1 + len(NAMES) + 2
    assert len(page.images) == 3 * (len(NAMES) + 1)
    assert page.rows["summary"][-1][1][2:5] == ["n/a"] * 3 and "No position to show" in text
    assert "bad.nii.gz" in text and "truncated" in text
    assert page.title.startswith("Landmark QC: sub-01 ")  # default title: the first image's file name
    assert "probably lost" not in text and "sform and qform" not in text
    # a scan the model is probably lost in, from a file whose qform lies 2 mm off its sform: both said on top
    lost = dataclasses.replace(head_prediction, flip_disagreement_mm=np.where(np.arange(32) < 24, 20.0, 0.0))
    image = nib.load(head)
    qform = image.affine.copy()
    qform[:3, 3] += [0.0, 0.0, 2.0]
    image.set_qform(qform, code=1)
    nib.save(image, str(tmp_path / "ambiguous.nii.gz"))
    text, _ = read_page(participant_report(tmp_path / "q.html", [(tmp_path / "ambiguous.nii.gz", lost)], panel_px=16))
    assert ("24 of 32 landmarks flagged, the model is probably lost in this scan: check every landmark below by eye"
            in text and "sform and qform differ by up to 2 mm (codes 2 and 1)" in text)  # fmt: skip
    with pytest.raises(ValueError, match="at least one scan"):
        participant_report(tmp_path / "none.html", [])


# ---------------------------------------------------------------------------------------------------------
# the group page


def test_report_entries_count_flags(head_prediction: ScanPrediction) -> None:
    entry = ReportEntry.from_predictions("sub-01", "sub-01.html", [head_prediction])
    assert entry.worst_status == "outside_image"
    assert entry.num_flagged == 4 and entry.num_landmarks == 32
    assert entry.flag_counts == {"outside_image": 1, "unstable": 2, "low_confidence": 2}
    failed = ReportEntry.from_predictions("sub-01", None, [head_prediction], failed=[("x/b.nii", "bad header")])
    assert failed.worst_status == "failed" and failed.note == "b.nii: bad header"
    assert head_prediction.lost_note() is None  # 4 of 32 flagged
    lost = dataclasses.replace(head_prediction, flip_disagreement_mm=np.where(np.arange(32) < 24, 20.0, 0.0))
    both = ReportEntry.from_predictions("sub-01", None, [lost, head_prediction], failed=[("x/b.nii", "bad header")])
    name = Path(head_prediction.path).name
    assert both.note == (f"{name}: 24 of 32 landmarks flagged, the model is probably lost in this scan; "
                         "b.nii: bad header")  # the first 24 unstable (the fixture's 4 flags among them): 0.75
    for bad, message in (
        ({"href": "http://example.org/a.html"}, "href must be a link relative"),
        ({"href": "/abs/a.html"}, "href must be a link relative"),
        ({"worst_status": "bad"}, "worst_status must be one of"),
        ({"flag_counts": {"ok": 1}}, "flag_counts keys"),
    ):
        with pytest.raises(ValueError, match=message):
            ReportEntry(**{"participant": "p", "href": "p.html", **bad})
    with pytest.raises(ValueError, match="needs participant and href"):
        ReportEntry.from_dict({"participant": "p"})


def test_the_group_page_lists_participants_worst_first(tmp_path: Path) -> None:
    entries = [
        ReportEntry("sub-ok", "sub-ok.html", "ok", 0, 32),
        ReportEntry("sub-low", "sub low #1.html", "low_confidence", 1, 32, {"low_confidence": 1}),
        {"participant": "sub-unstable-few", "href": "a/sub-u1.html", "worst_status": "unstable", "num_flagged": 1},
        ReportEntry("sub-unstable-many", "sub-u3.html", "unstable", 3, 32, {"unstable": 3, "low_confidence": 2}),
        ReportEntry("sub-outside", "sub-o.html", "outside_image", 1, 32, {"outside_image": 1}),
        ReportEntry("sub-<failed>", None, "failed", note="cannot read <header>"),
    ]
    for entry in entries:
        href = entry["href"] if isinstance(entry, dict) else entry.href
        if href is not None:
            (tmp_path / href).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / href).write_text("page")
    out = group_report(tmp_path / "index.html", entries, thresholds=QualityThresholds(0.01, 8.0))
    text, page = read_page(out)
    assert not re.search(r"https?://", text) and "<failed>" not in text and "&lt;header&gt;" in text
    body = page.rows["group"][1:]
    assert [cells[1] for _, cells, _ in body] == [
        "sub-<failed>", "sub-outside", "sub-low", "sub-unstable-many", "sub-unstable-few", "sub-ok",
    ]  # fmt: skip
    assert [cells[2] for _, cells, _ in body] == [
        "failed", "outside_image", "low_confidence", "unstable", "unstable", "ok",
    ]  # fmt: skip
    assert body[0][2] == []  # no page, no link
    for *_, links in body[1:]:
        (link,) = links
        assert (tmp_path / unquote(link)).is_file(), link
    assert 'href="sub%20low%20%231.html"' in text  # spaces and # in file names are percent-encoded


def test_report_page_paths_keep_the_group_page_free() -> None:
    paths = report_page_paths(["a/sub-01_T1w.nii.gz", "index.nii", "b/sub-01_T1w.nii.gz"], Path("qc"))
    assert [p.name for p in paths] == ["sub-01_T1w.html", "index-2.html", "sub-01_T1w-2.html"]


# ---------------------------------------------------------------------------------------------------------
# mdgru-localize predict --report


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mdgru_keras.serving.testing import save_toy_localizer

    base = tmp_path_factory.mktemp("toy") / "toy"
    save_toy_localizer(base / "2")
    return base


def test_predict_writes_a_page_per_scan_and_the_group_page(toy_model: Path, head: Path, tmp_path: Path) -> None:
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(head, scans / "sub-01_T1w.nii.gz")
    shutil.copy(head, scans / "index.nii.gz")
    (scans / "broken.nii.gz").write_bytes(b"not a nifti")
    report = tmp_path / "qc"
    result = CliRunner().invoke(
        cli,
        ["predict", str(scans / "sub-01_T1w.nii.gz"), str(scans / "broken.nii.gz"), str(scans / "index.nii.gz"),
         "--model", str(toy_model), "--out", str(tmp_path / "out.json"), "--report", str(report),
         "--max-disagreement", "0"],
    )  # fmt: skip
    assert result.exit_code == 1, result.output  # the broken scan
    assert f"QC report {report / 'index.html'}" in result.output
    assert sorted(p.name for p in report.iterdir()) == ["index-2.html", "index.html", "sub-01_T1w.html"]
    text, page = read_page(report / "index.html")
    body = page.rows["group"][1:]
    assert [cells[1] for _, cells, _ in body] == ["broken", "index", "sub-01_T1w"]
    assert [cells[2] for _, cells, _ in body] == ["failed", "unstable", "unstable"]
    assert "not a gzip file" in body[0][1][-1]
    assert [links for _, _, links in body] == [[], ["index-2.html"], ["sub-01_T1w.html"]]
    assert "toy" in text and ">2<" in text  # the model's name and version
    scan_text, scan_page = read_page(report / "sub-01_T1w.html")
    assert len(scan_page.rows["summary"]) == 1 + 3 and len(scan_page.images) == 9
    assert "unstable above 0 mm flip disagreement" in scan_text


# ---------------------------------------------------------------------------------------------------------
# in a real browser

# Without the background-networking flags Chromium keeps trying to reach Google's services.
BROWSER_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-default-apps",
    "--window-size=1300,900",
)  # fmt: skip


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(f"no headless browser: {CHROMIUM} and {CHROMEDRIVER} are needed (make browser installs them)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[dev])")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*BROWSER_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        # offline: nothing may leave the machine (file:// and data: still load)
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd(
            "Network.emulateNetworkConditions",
            {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
        )
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def load(driver, path: Path) -> list[dict]:
    """Open ``path`` and return the console messages it caused."""
    driver.get_log("browser")  # drop earlier messages
    driver.get(path.resolve().as_uri())
    driver.execute_script("return document.readyState")
    return driver.get_log("browser")


def test_the_participant_page_in_chromium(browser, head_page: Path) -> None:
    messages = load(browser, head_page)
    assert [m for m in messages if m["level"] == "SEVERE"] == [], messages
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])"
    )
    assert len(images) == 3 * len(NAMES)
    assert all(complete and width == PANEL_PX and height == PANEL_PX for complete, width, height in images), images
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(not name.startswith(("http:", "https:")) for name in resources), resources
    rows = browser.execute_script("return Array.from(document.querySelectorAll('table.summary tbody tr'))"
                                  ".map(r => [r.className, r.cells[r.cells.length - 1].innerText.trim()])")  # fmt: skip
    assert len(rows) == len(NAMES)
    for k, (row_class, status_text) in enumerate(rows):
        assert status_text.split() == FLAGGED.get(k, "ok").split(";"), k
        assert row_class.startswith("flagged") == (k in FLAGGED), k
    # the checkbox hides the landmarks without a flag
    browser.find_element("id", "flagged-only").click()
    shown = browser.execute_script(
        "return Array.from(document.querySelectorAll('article.landmark')).filter(a => a.offsetParent !== null).length"
    )
    assert shown == len(FLAGGED)


def test_the_group_page_in_chromium(browser, head_page: Path, head_prediction, tmp_path: Path) -> None:
    shutil.copy(head_page, tmp_path / "sub-01.html")
    entries = [
        ReportEntry("sub-02", "sub-02.html", "ok", 0, 32),
        ReportEntry.from_predictions("sub-01", "sub-01.html", [head_prediction]),
    ]
    (tmp_path / "sub-02.html").write_text("<!DOCTYPE html><title>sub-02</title>")
    messages = load(browser, group_report(tmp_path / "index.html", entries))
    assert [m for m in messages if m["level"] == "SEVERE"] == [], messages
    names = browser.execute_script(
        "return Array.from(document.querySelectorAll('table.group tbody tr')).map(r => r.cells[1].innerText)"
    )
    assert names == ["sub-01", "sub-02"]
    browser.find_element("link text", "sub-01").click()
    assert browser.title == "Landmark QC: sub-01 <&>"
    assert browser.execute_script("return document.images.length") == 3 * len(NAMES)
