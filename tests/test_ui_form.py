"""The Prefect UI's run form, driven in headless Chromium (Debian's package, through Playwright) against a
real `prefect server` with the project's deployments and a process worker: the form starts from the
deployment's preset with every other field empty, a preset picked in the form is honoured, only what the
user set is sent, the run's resolved config is exactly that preset with the typed store, and the stage
report's plot renders as an image. Set LLM_TRM_SCREENSHOTS=<dir> to keep the screenshots."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx

from llm_trm_core.config import load_config, parse_config
from tests.helpers.prefect_server import (
    deploy,
    ensure_debian_package,
    prefect_server,
    wait_final,
    worker,
)

CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip
# Marks the input area of the form field labelled `name` (first match in document order).
MARK_FIELD = """([name, mark]) => {
  const labels = [...document.querySelectorAll('.schema-form-property__label')]
    .filter(s => s.textContent.trim().split(/\\s/)[0] === name);
  if (!labels.length) return false;
  labels[0].closest('.schema-form-property').querySelector('.p-label__body').setAttribute('data-field', mark);
  return true; }"""


def _field(page: Any, name: str) -> Any:
    assert page.evaluate(MARK_FIELD, [name, name]), f"no form field labelled {name}"
    return page.locator(f"[data-field='{name}']")


def _shot(page: Any, name: str, tmp_path: Path) -> None:
    folder = Path(os.environ.get("LLM_TRM_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"{name}.png"), full_page=False)


def test_run_form_gives_the_run_the_user_asked_for(tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    chromium = ensure_debian_package("chromium", "chromium")
    root = f"file://{tmp_path / 'store'}"
    with prefect_server(tmp_path) as (api, env):
        deploy(env)
        ui = api.removesuffix("/api")
        deployment = httpx.get(f"{api}/deployments/name/sweep/sweep-local").json()
        assert deployment["parameters"] == {"cfg": {"preset": "local"}}
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{ui}/deployments/deployment/{deployment['id']}/run")
            page.wait_for_selector(".schema-form-property__label", timeout=60_000)
            _shot(page, "form-before", tmp_path)

            # the form starts from the deployment's preset; every other field is empty and describes its values
            assert _field(page, "preset").locator("button").first.inner_text().strip() == "local"
            assert _field(page, "d_prime").locator("input").input_value() == ""
            text = page.inner_text("body")
            assert "Preset values: tiny 16 · local 64 · smollm3-3b 256." in text
            assert 'Property is type "None"' not in text and "No items in this list" not in text.split("d_primes")[0]
            labels = page.locator(".schema-form-property__label").count()
            described = page.locator(".schema-form-property__description").count()
            assert labels > 100 and described >= labels - 1, (labels, described)  # every field but `cfg` itself

            # pick the tiny preset, type a store, submit
            _field(page, "preset").locator("button").first.click()
            page.keyboard.press("ArrowDown")
            page.locator(".p-select-option", has_text="tiny").first.click()
            _field(page, "root").locator("textarea").fill(root)
            _shot(page, "form-filled", tmp_path)
            page.get_by_role("button", name="Submit").click()
            page.wait_for_url(lambda url: not url.endswith("/run"), timeout=30_000)  # back to the deployment

            runs = httpx.post(f"{api}/flow_runs/filter", json={"deployments": {"id": {"any_": [deployment["id"]]}}})
            (run,) = runs.json()
            assert run["parameters"] == {"cfg": {"preset": "tiny", "store": {"root": root}}}

            with worker(env, tmp_path / "worker.log"):
                final = wait_final(api, run["id"], 600)
            assert final["state_type"] == "COMPLETED", (tmp_path / "worker.log").read_text()[-3000:]

            # the run's resolved config, as the flow published it, is exactly the tiny preset with that store
            artifacts = httpx.post(f"{api}/artifacts/filter", json={"flow_runs": {"id": {"any_": [run["id"]]}}}).json()
            by_key = {a["key"]: a for a in artifacts}
            published = json.loads(by_key["resolved-config"]["data"].split("```json\n", 1)[1].split("\n```", 1)[0])
            expected = load_config("tiny", [f"store.root={root}"])
            assert parse_config(published) == expected
            assert published == expected.model_dump(mode="json")

            # the stage report's plot renders as an image in the UI
            page.goto(f"{ui}/artifacts/artifact/{by_key['sweep-artifact']['id']}")
            image = page.locator("img[alt='sweep']").first
            image.wait_for(timeout=60_000)
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
            assert image.evaluate("img => img.naturalWidth") > 100
            _shot(page, "report-plot", tmp_path)
            browser.close()


def test_the_flow_parameter_schema_is_a_partial_form() -> None:
    """What the server stores for the UI: no class defaults anywhere, booleans as a two-way choice (a toggle
    would send `false` for every untouched switch), and no required fields inside the config."""
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import pipeline

    schema = parameter_schema(pipeline.fn).model_dump_for_openapi()
    for name, definition in schema["definitions"].items():
        assert "required" not in definition, name
        for field, prop in definition["properties"].items():
            assert "default" not in prop, (name, field)
            assert prop.get("type") != "boolean", (name, field)
            assert prop.get("description") or "$ref" in prop, (name, field)  # sections carry their own
            assert not any(b == {"type": "null"} for b in prop.get("anyOf", [])), (name, field)
    root = schema["definitions"]["PipelineConfig"]["properties"]
    assert list(root)[:2] == ["preset", "store"]
