"""The MLflow UI as a reviewer sees it: a real headless Chromium (Debian's chromium and
chromium-driver, installed by .ci/run) driven by selenium, with the waits the UI's pages need and
screenshots kept under test-artifacts/ as the tests' evidence."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.repo import REPO

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",  # a container's /dev/shm may be 64 MB: pages crash in it
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
]
SCREENSHOTS = REPO / "test-artifacts" / "mlflow-ui"
UI_WAIT_S = 90
EXPANDER = "button[data-component-id*='runnamecellrenderer']"  # the run table's +/- button


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium and chromium-driver (see .ci/run)")
        pytest.skip("needs Debian's chromium and chromium-driver: apt-get install them")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def text_once_it_shows(driver, *needles: str) -> str:
    """Wait until the rendered page's text holds every needle; return that text."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    body = lambda: driver.find_element("tag name", "body").text  # noqa: E731
    try:
        WebDriverWait(driver, UI_WAIT_S).until(lambda _: all(n in body() for n in needles))
    except TimeoutException:
        missing = [n for n in needles if n not in body()]
        pytest.fail(f"{driver.current_url} never showed {missing}; it said:\n{body()[:3000]}")
    return body()


def open_page(driver, url: str, *needles: str) -> str:
    driver.get(url)
    return text_once_it_shows(driver, *needles)


GENAI_ONLY = "Evaluation runs"
"""A sidebar entry of MLflow 3.17's GenAI mode, absent from its model-training mode."""
# The MLflow Assistant panel opens by itself on a browser's first visit and covers a third of
# the page; these are the UI's own keys for "it opened once" and "it is closed".
QUIET_ASSISTANT = {
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
    "mlflow.assistant.panelOpen_v1": "false",
}


def without_assistant(driver, ui: str) -> None:
    """Keep the assistant panel closed on every later page of the UI at `ui`."""
    driver.get(ui)
    for key, value in QUIET_ASSISTANT.items():
        driver.execute_script("localStorage.setItem(arguments[0], arguments[1])", key, value)


def in_training_view(text: str) -> bool:
    """Whether a page's text is MLflow's model-training mode (runs, models) and not GenAI's."""
    return "\nRuns\nModels\n" in text and GENAI_ONLY not in text


REPORT_SCREENSHOTS = REPO / "test-artifacts" / "report"


def shown_rows(driver, menu_xpath: str, row_xpath: str, clicks: int = 3) -> list:
    """The rows a report's category menu shows once clicked. Like the eye button (shown_frame),
    a click the page takes while it still draws opens nothing (seen under CI load), so the
    menu is clicked again, up to `clicks` times, each given a third of UI_WAIT_S."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, UI_WAIT_S / clicks)
    for _ in range(clicks):
        wait.until(lambda d: d.find_elements("xpath", menu_xpath))[0].click()
        try:
            return wait.until(lambda d: d.find_elements("xpath", row_xpath))
        except TimeoutException:
            continue
    raise AssertionError(
        f"the report menu {menu_xpath} showed no {row_xpath} after {clicks} clicks"
    )


def shown_frame(driver, menu_xpath: str, row_xpath: str, clicks: int = 3):
    """The frame a report row's eye button opens its HTML in. A click the page takes while it
    is still drawing the table opens nothing (seen under load), so the row is found and its
    button clicked again, up to `clicks` times, each given a third of UI_WAIT_S."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, UI_WAIT_S / clicks)
    for _ in range(clicks):
        row = shown_rows(driver, menu_xpath, row_xpath)
        row[0].find_element("css selector", "a[iconname='eye']").click()
        try:
            return wait.until(lambda d: d.find_elements("tag name", "iframe"))[0]
        except TimeoutException:
            continue
    raise AssertionError(f"the report row {row_xpath} opened no frame after {clicks} clicks")


def report_item(driver, report: Path, category: str, labels: tuple[str, str]) -> str:
    """Open a Snakemake report's result (its category, then the first row whose two labels start
    with these) as a reader does, by its eye button; the text the report shows of it inline."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(report.as_uri())
    wait = WebDriverWait(driver, UI_WAIT_S)
    menu = f"//span[normalize-space(text())='{category}']"
    cells = " and ".join(
        f"td[{i + 1}][starts-with(normalize-space(), '{v}')]" for i, v in enumerate(labels)
    )
    frame = shown_frame(driver, menu, f"//tr[{cells}]")
    driver.switch_to.frame(frame)
    try:
        body = lambda: driver.find_element("tag name", "body").text  # noqa: E731
        wait.until(lambda _: body().strip())
        return body()
    finally:
        driver.switch_to.default_content()
