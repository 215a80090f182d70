"""The Dagster UI as a person uses it: headless Chromium against `dagster dev -w workspace.yaml`.

Registers the sample datasets (the `observe_raw_datasets` job's Observe button), launches
`sample_pipeline` from its launchpad with a tiny training budget typed into the config editor, waits for
the run in the page, then checks the artifact's upstream lineage graph (five stages connected) and its
asset page (mIoU, data versions, the evaluation picture). Screenshots go to the test's tmp folder; the
lineage graph is copied to docs/lineage_graph.png for the README with SEGPIPE_UPDATE_README_SCREENSHOT=1.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from tests.ops.conftest import REPO_ROOT, DagsterDevServer, ensure_chromium_installed
from training_core.datasets.discovery import dataset_content_hash

playwright_sync = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extras")

pytestmark = pytest.mark.slow

LOCATION = yaml.safe_load((REPO_ROOT / "workspace.yaml").read_text())["load_from"][0]["python_module"]
STAGES = ("dataset_header", "processed_shards", "trained_model", "iou_evaluation", "runtime_artifact")
# A run of a few seconds of training: the point here is the UI, not the model.
TINY_RUN_CONFIG = """\
ops:
  trained_model:
    config:
      device: cpu
      steps: 4
      batch_size: 2
      log_every: 2
      checkpoint_every: 2
      data:
        patch_size: 128
"""
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
RUN_TIMEOUT_S = 600
LINEAGE_SCREENSHOT = REPO_ROOT / "docs" / "lineage_graph.png"
SAMPLE_EXTRACTED_ROOT = REPO_ROOT / "sample_data" / "extracted"


@contextmanager
def browser_page(chromium: Path) -> Iterator[playwright_sync.Page]:
    with playwright_sync.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(60_000)
            yield page
        finally:
            browser.close()


def wait_for_run_outcome(page: playwright_sync.Page, timeout_s: float = RUN_TIMEOUT_S) -> str:
    """On a run page: wait until the run's status tag reads Success/Failure/Canceled and return it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for status in ("Success", "Failure", "Canceled"):
            if page.get_by_text(status, exact=True).count():
                return status
        page.wait_for_timeout(1000)
    raise AssertionError(f"run at {page.url} did not finish within {timeout_s:.0f}s")


def open_run_from_toast(page: playwright_sync.Page) -> str:
    """After a launch button: follow the "Launched run <id>" toast to the run page; returns the short run id."""
    toast = page.get_by_text(re.compile(r"Launched run [0-9a-f]{8}"))
    short_id = re.search(r"[0-9a-f]{8}", toast.inner_text()).group(0)
    page.get_by_role("link", name="View").or_(page.get_by_text("View", exact=True)).first.click()
    page.wait_for_url(re.compile(rf"/runs/{short_id}"))
    return short_id


def set_launchpad_config(page: playwright_sync.Page, run_config_yaml: str) -> None:
    """Replace the launchpad's YAML, as typing into the editor would (CodeMirror 5 holds the text)."""
    page.locator(".CodeMirror").first.wait_for()
    page.evaluate("(text) => document.querySelector('.CodeMirror').CodeMirror.setValue(text)", run_config_yaml)


def rendered_graph(page: playwright_sync.Page) -> tuple[set[str], set[tuple[str, str]]]:
    """Asset nodes and edges as drawn: each edge path's ends are matched to the node box they touch."""
    drawn = page.evaluate(
        """(names) => {
        const boxes = [...document.querySelectorAll('foreignObject')].map((node) => ({
          name: [...node.querySelectorAll('*')]
            .filter((el) => el.children.length === 0)
            .map((el) => el.textContent.trim())
            .find((text) => names.includes(text)),
          x: +node.getAttribute('x'), y: +node.getAttribute('y'),
          w: +node.getAttribute('width'), h: +node.getAttribute('height'),
        })).filter((box) => box.name);
        const distance = (box, [px, py]) => Math.hypot(
          Math.max(box.x - px, 0, px - box.x - box.w), Math.max(box.y - py, 0, py - box.y - box.h));
        const nearest = (point) => boxes.reduce((a, b) => (distance(a, point) <= distance(b, point) ? a : b));
        const edges = [...document.querySelectorAll('path[marker-end]')].map((path) => {
          const numbers = path.getAttribute('d').match(/-?[0-9.]+/g).map(Number);
          const from = nearest(numbers.slice(0, 2)), to = nearest(numbers.slice(-2));
          return [from.name, to.name];
        }).filter(([from, to]) => from !== to);
        return {nodes: boxes.map((box) => box.name), edges};
      }""",
        list(STAGES),
    )
    return set(drawn["nodes"]), {(source, target) for source, target in drawn["edges"]}


def metadata_row(page: playwright_sync.Page, table: playwright_sync.Locator, key: str) -> playwright_sync.Locator:
    """The row of a materialization's metadata table whose key cell reads exactly `key`."""
    return table.locator("tr").filter(has=page.get_by_text(key, exact=True)).first


def test_sample_pipeline_from_the_ui(dagster_dev: DagsterDevServer, tmp_path: Path) -> None:
    chromium = ensure_chromium_installed()
    screenshots = tmp_path / "screenshots"
    screenshots.mkdir()
    with browser_page(chromium) as page:
        page.goto(f"{dagster_dev.url}/locations/{LOCATION}/jobs/observe_raw_datasets", wait_until="networkidle")
        page.get_by_text("Observe", exact=True).click()
        open_run_from_toast(page)
        assert wait_for_run_outcome(page, timeout_s=120) == "Success"

        page.goto(f"{dagster_dev.url}/locations/{LOCATION}/jobs/sample_pipeline/playground", wait_until="networkidle")
        set_launchpad_config(page, TINY_RUN_CONFIG)
        page.screenshot(path=screenshots / "01_launchpad.png")
        page.get_by_role("button", name=re.compile("Launch Run")).click()
        # The job names its partition range in its tags, so no single partition is picked here.
        page.get_by_text("launch a run without a partition specified").wait_for()
        page.get_by_role("button", name="Confirm").click()
        page.wait_for_url(re.compile(r"/runs/[0-9a-f-]+"))
        outcome = wait_for_run_outcome(page)
        page.screenshot(path=screenshots / "02_run.png")
        assert outcome == "Success", f"sample_pipeline ended {outcome}; see {screenshots / '02_run.png'}"

        page.goto(
            f"{dagster_dev.url}/assets/runtime_artifact?view=lineage&lineageScope=upstream&lineageDepth=6",
            wait_until="networkidle",
        )
        page.get_by_text("Hide navigation").click()
        page.locator("path[marker-end]").first.wait_for()
        nodes, edges = rendered_graph(page)
        page.screenshot(path=screenshots / "03_lineage.png")
        assert nodes == set(STAGES)
        assert set(itertools.pairwise(STAGES)) <= edges, edges

        page.goto(f"{dagster_dev.url}/assets/runtime_artifact?view=events", wait_until="networkidle")
        metadata = page.locator("table").filter(has_text="val_miou").first
        metadata.wait_for()
        page.screenshot(path=screenshots / "04_artifact_metadata.png", full_page=True)
        assert re.search(r"val_miou\s+0\.\d+", metadata.inner_text())
        data_versions = metadata_row(page, metadata, "data_versions").inner_text()
        for dataset_id in ("kampala_buildings", "quebec_buildings"):
            assert dataset_content_hash(SAMPLE_EXTRACTED_ROOT / dataset_id) in data_versions, dataset_id
        metadata_row(page, metadata, "evaluation_picture").get_by_text("Show Markdown").click()
        picture = page.get_by_role("dialog").locator("img").first
        picture.wait_for()
        page.screenshot(path=screenshots / "05_evaluation_picture.png")
        assert picture.evaluate("(img) => img.complete && img.naturalWidth > 100")

    if os.environ.get("SEGPIPE_UPDATE_README_SCREENSHOT") == "1":  # a test run leaves the checkout alone
        shutil.copy(screenshots / "03_lineage.png", LINEAGE_SCREENSHOT)
