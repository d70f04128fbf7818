"""The Dagster UI in a real headless Chromium, against the served deployment of test_webserver.py (materialized
through GraphQL): the asset lineage page and an asset's page with its latest materialization's metadata.
Screenshots are saved by scripts/ui_screenshots.py; the rendered DOM is checked for what must be on screen."""

from __future__ import annotations

import re

import pytest

from tests.orchestration.test_webserver import SAMPLE, ui

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        ui.chromium_path() is None, reason="headless Chromium is not installed (apt-get install -y chromium)"
    ),
]

ASSETS = (
    "reference_data",
    "slide_inputs",
    "segmented_slide",
    "typed_cells",
    "score_checkpoint",
    "decomposed_cells",
    "decomposed_cells_by_sample",
    "enhanced_subspots",
)


def _text(dom: str) -> str:
    dom = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


def _png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


@pytest.fixture(scope="module")
def url(deployment):
    ui.prepare_ui(deployment["server"].url)
    return deployment["server"].url


def test_lineage_page_shows_the_asset_graph(deployment, url):
    path = ui.lineage_path(url)
    assert path.startswith("/asset-groups?expanded=global%40global%3A")
    dom = ui.dump_dom(f"{url}{path}")
    text = _text(dom)
    assert "Global asset lineage" in text and "Join the Dagster community" not in text
    # every asset drawn as a node (long names are shortened on the node: decompo…_by_sample)
    missing = [a for a in ASSETS if a not in text and not (a.endswith("_by_sample") and "_by_sample" in text)]
    assert not missing, f"lineage page lacks {missing}: {text[:1500]}"
    for group in ("inputs", "spatialscope", "soscope"):
        assert group in text
    png = ui.screenshot(f"{url}{path}", deployment["tmp"] / "screenshots" / "lineage.png")
    assert _png_size(png) == (1600, 1000) and png.stat().st_size > 30_000  # a rendered graph, not a blank page


def test_asset_page_shows_latest_materialization_metadata(deployment, url):
    text = _text(ui.dump_dom(f"{url}/assets/typed_cells"))
    assert "typed_cells" in text and "Latest materialization" in text
    # the latest materialization's metadata table (keys written by the asset) and its partition
    for label in ("cells_path", "cell_types_figure", "proportions_figure", "sigma", "cell_type_counts"):
        assert label in text, f"asset page lacks metadata '{label}': {text[:2000]}"
    assert SAMPLE in text
    events = _text(ui.dump_dom(f"{url}/assets/typed_cells?view=events"))
    run_id = deployment["runs"][f"sample_job:{SAMPLE}"]
    assert f"Partition {SAMPLE} materialized in run {run_id[:8]}" in events
    png = ui.screenshot(f"{url}/assets/typed_cells", deployment["tmp"] / "screenshots" / "typed_cells.png")
    assert _png_size(png) == (1600, 1000) and png.stat().st_size > 30_000


def test_metadata_figure_opens_in_the_asset_page(deployment, url):
    """typed_cells' cell-type figure (markdown with a PNG) opened from its metadata row in a real browser."""
    png = deployment["tmp"] / "screenshots" / "typed_cells__cell_types_figure.png"
    w, h = ui.screenshot_metadata_figure(url, "typed_cells", "cell_types_figure", png)
    import base64
    import json
    import struct

    assert w >= 300 and h >= 200, (w, h)
    assert _png_size(png) == (1600, 1000) and png.stat().st_size > 30_000
    # the figure shown is the one stored in the materialization's metadata
    q = """{ assetOrError(assetKey: {path: ["typed_cells"]}) { ... on Asset { assetMaterializations(limit: 1) {
      metadataEntries { label ... on MarkdownMetadataEntry { mdStr } } } } } }"""
    mats = ui.graphql(url, q)["assetOrError"]["assetMaterializations"]
    md = {m["label"]: m.get("mdStr") for m in mats[0]["metadataEntries"]}["cell_types_figure"]
    raw = base64.b64decode(md.split("base64,", 1)[1].split(")", 1)[0])
    assert struct.unpack(">II", raw[16:24]) == (w, h), json.dumps([w, h])


def test_screenshot_script_against_running_server(deployment, url):
    out = deployment["tmp"] / "screenshots_cli"
    assert ui.main(["--url", url, "--out", str(out)]) == 0
    stems = [stem for stem, _ in ui.PAGES] + [f"{a}__{k}" for a, k in ui.FIGURES]
    for stem in stems:
        assert _png_size(out / f"{stem}.png") == (1600, 1000), stem


FIGURE_Q = """query($path: [String!]!) { assetOrError(assetKey: {path: $path}) { ... on Asset {
  assetMaterializations(limit: 1) { metadataEntries { label ... on MarkdownMetadataEntry { mdStr } } } } } }"""


def test_each_asset_figure_comes_first_and_decodes_to_a_non_blank_image(deployment, url):
    """Every served asset with figures (decomposed cells included) lists them first in its latest metadata, and
    each decodes to a real, non-blank image; decomposed_cells' marker map also opens in Chromium."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    expected = {
        "segmented_slide": "qc_figure",
        "typed_cells": "cell_types_figure",
        "decomposed_cells": "decomposed_maps",
        "enhanced_subspots": "marker_maps",
    }
    for asset, must in expected.items():
        mats = ui.graphql(url, FIGURE_Q, {"path": [asset]})["assetOrError"]["assetMaterializations"]
        entries = mats[0]["metadataEntries"]
        is_fig = [bool(e.get("mdStr") and "data:image/png;base64," in e["mdStr"]) for e in entries]
        assert is_fig[0] and must in [e["label"] for e, f in zip(entries, is_fig) if f], (asset, entries[:3])
        assert is_fig == sorted(is_fig, reverse=True), f"{asset}: a figure comes after other metadata"
        for e, f in zip(entries, is_fig):
            if f:
                raw = base64.b64decode(e["mdStr"].split("base64,", 1)[1].split(")", 1)[0])
                img = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"), dtype=float)
                assert min(img.shape[:2]) >= 200 and img.std() > 10, (asset, e["label"], img.shape, img.std())
    png = deployment["tmp"] / "screenshots" / "decomposed_cells__decomposed_maps.png"
    w, h = ui.screenshot_metadata_figure(url, "decomposed_cells", "decomposed_maps", png)
    assert w >= 300 and h >= 300 and png.stat().st_size > 30_000
