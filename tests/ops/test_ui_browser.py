"""The Dagster UI as a person uses it: headless Chromium against `dagster dev -w workspace.yaml`.

The `train_cpu` launchpad opens with every training field at its default, and "Scaffold all default
config" writes them all again into an emptied editor. Then the sample run: registers the sample datasets
(the `observe_raw_datasets` job's Observe button), checks the `sample_pipeline` launchpad starts from
pipeline/sample_run.yaml, launches it with a tiny training budget typed into the config editor, waits for
the run in the page, then checks the artifact's upstream lineage graph (five stages connected), its asset
page (mIoU, data versions) and iou_evaluation's (mIoU, the model beside its controls). Screenshots go to
the test's tmp folder; with SEGPIPE_UPDATE_README_SCREENSHOT=1 the README's (lineage graph, train_cpu
launchpad, iou_evaluation page) are copied to docs/.
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
from training_core.config import TrainConfig
from training_core.datasets.discovery import dataset_content_hash

playwright_sync = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extras")

pytestmark = [pytest.mark.system, pytest.mark.slow]

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
SAMPLE_EXTRACTED_ROOT = REPO_ROOT / "sample_data" / "extracted"
SAMPLE_RUN_YAML = REPO_ROOT / "pipeline" / "sample_run.yaml"
# The editor mounts after the page's first network-idle on a slow machine: until then its text reads as empty.
EDITOR_TEXT = "() => document.querySelector('.CodeMirror')?.CodeMirror?.getValue() ?? ''"


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


def launchpad_ops(page: playwright_sync.Page) -> dict:
    """The `ops` section of the launchpad's YAML, once the editor holds the trained_model config."""
    page.locator(".CodeMirror").first.wait_for()
    page.wait_for_function(f"() => ({EDITOR_TEXT})().includes('trained_model:')")
    return yaml.safe_load(page.evaluate(EDITOR_TEXT))["ops"]


def put_cursor_on(page: playwright_sync.Page, key: str) -> None:
    """Put the editor's cursor at the end of the first line that starts with `key` (the help panel follows it)."""
    page.evaluate(
        """(key) => {
        const editor = document.querySelector('.CodeMirror').CodeMirror;
        const line = editor.getValue().split('\\n').findIndex((text) => text.trim().startsWith(key));
        editor.focus();
        editor.setCursor({line, ch: editor.getLine(line).length});
      }""",
        key,
    )


def update_readme_screenshots(copies: dict[Path, str]) -> None:
    """Copy screenshots to docs/ (README images) only when asked: a test run leaves the checkout alone."""
    if os.environ.get("SEGPIPE_UPDATE_README_SCREENSHOT") == "1":
        for screenshot, name in copies.items():
            shutil.copy(screenshot, REPO_ROOT / "docs" / name)


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


def test_train_cpu_launchpad_scaffolds_every_training_field_at_its_default(
    dagster_dev: DagsterDevServer, tmp_path: Path
) -> None:
    chromium = ensure_chromium_installed()
    defaults = TrainConfig(device="cpu")
    expected = defaults.model_dump(mode="json", exclude_none=True)
    with browser_page(chromium) as page:
        page.goto(f"{dagster_dev.url}/locations/{LOCATION}/jobs/train_cpu/playground", wait_until="networkidle")
        assert launchpad_ops(page)["trained_model"]["config"] == expected  # the job's default: every field
        set_launchpad_config(page, "")
        page.get_by_role("button", name="Scaffold all default config").click()
        page.get_by_role("button", name="Confirm").click()
        scaffolded = launchpad_ops(page)["trained_model"]["config"]
        assert scaffolded["steps"] == defaults.steps
        assert scaffolded["batch_size"] == defaults.batch_size
        assert scaffolded["data"]["patch_size"] == defaults.data.patch_size
        assert scaffolded == expected
        # Tall enough for the whole trained_model section, beside the help panel's types and descriptions.
        page.set_viewport_size({"width": 1600, "height": 1800})
        put_cursor_on(page, "steps:")
        page.wait_for_timeout(500)  # the help panel follows the cursor
        page.screenshot(path=tmp_path / "launchpad_train_cpu.png")
    update_readme_screenshots({tmp_path / "launchpad_train_cpu.png": "launchpad_train_cpu.png"})


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
        assert launchpad_ops(page) == yaml.safe_load(SAMPLE_RUN_YAML.read_text())["ops"]
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

        page.goto(f"{dagster_dev.url}/assets/iou_evaluation?view=events", wait_until="networkidle")
        evaluation = page.locator("table").filter(has_text="val_miou").first
        evaluation.wait_for()
        page.screenshot(path=screenshots / "05_iou_evaluation.png", full_page=True)
        assert re.search(r"val_miou\s+0\.\d+", evaluation.inner_text())
        for method in ("model", "untrained_model", "kmeans_rgb", "constant"):  # the model beside its controls
            assert metadata_row(page, evaluation, "controls").get_by_text(method, exact=True).count(), method

    update_readme_screenshots(
        {
            screenshots / "03_lineage.png": "lineage_graph.png",
            screenshots / "05_iou_evaluation.png": "iou_evaluation.png",
        }
    )
