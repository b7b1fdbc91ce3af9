"""The console in a real headless browser (Debian's chromium + chromedriver, driven by selenium).

A node receives a study from DCMTK storescu while its target is down, so the
forwarder parks the files. A person then opens the console, finds the study,
sees the parked files, clicks Retry (and confirms) and sees the file delivered
to the DCMTK storescp target that is now up. Screenshots are kept under
``test-artifacts/`` (not committed).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    REPO,
    files_below,
    free_port,
    require_tool,
    run_storescu,
    wait_for_port,
    wait_until,
)
from tests.factories import make_image, save
from tests.integration.test_console import PATIENT, node_config
from tests.integration.test_forward import StoreSCP

pytestmark = pytest.mark.interop

ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    chromium = require_tool("chromium")
    chromedriver = require_tool("chromedriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def parked_files(watch: Path) -> list[Path]:
    return [p for p in files_below(watch / "failed") if p.suffix == ".dcm"]


def test_console_finds_study_and_retries_a_parked_file(  # type: ignore[no-untyped-def]
    tmp_path: Path, start_node, browser
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser
    target = StoreSCP(tmp_path)  # not started yet: the target is down
    port, web_port = free_port(), free_port()
    cfg = node_config(tmp_path, port, web_port, target.port)
    node = start_node(["--config", str(cfg)], port=port)
    wait_for_port(web_port)
    study = "1.2.826.0.1.3680043.8.498.5151"
    files = [
        save(
            make_image(
                "CT",
                patient_id=PATIENT,
                patient_name="PHANTOM^RETRY",
                study_uid=study,
                instance=i + 1,
            ),
            tmp_path / "send" / f"ct{i}.dcm",
        )
        for i in range(3)
    ]
    sent = run_storescu(port, files, "STORESCU", "NODE")
    assert sent.returncode == 0, sent.stderr
    watch = tmp_path / "data" / "outgoing"
    assert wait_until(lambda: len(parked_files(watch)) == 3, 90), node.output()
    target.start()
    ARTIFACTS.mkdir(exist_ok=True)
    from selenium.common.exceptions import StaleElementReferenceException

    # The pages refresh themselves: an element found just before a refresh goes stale.
    wait = WebDriverWait(driver, 60, ignored_exceptions=(StaleElementReferenceException,))

    def click(by: str, value: str) -> None:
        def clicked(d: object) -> bool:
            driver.find_element(by, value).click()
            return True

        wait.until(clicked)

    try:
        base = f"http://127.0.0.1:{web_port}"
        driver.get(base + "/")
        assert "Dashboard" in driver.title
        driver.find_element(By.LINK_TEXT, "Studies").click()
        box = wait.until(ec.presence_of_element_located((By.ID, "patient")))
        box.send_keys("PHANTOM")
        driver.find_element(By.ID, "search").click()
        wait.until(ec.element_to_be_clickable((By.LINK_TEXT, PATIENT)))
        assert "PHANTOM^RETRY" in driver.find_element(By.ID, "studies").text
        click(By.LINK_TEXT, PATIENT)
        series = wait.until(ec.presence_of_element_located((By.ID, "series")))
        assert "CT" in series.text and "3" in series.text
        assert "parked" in driver.find_element(By.ID, "deliveries").text
        driver.save_screenshot(str(ARTIFACTS / "console-study.png"))

        driver.find_element(By.LINK_TEXT, "Failed").click()
        table = wait.until(ec.presence_of_element_located((By.ID, "parked")))
        assert len(table.find_elements(By.CSS_SELECTOR, "button.retry")) == 3
        assert "gave up after give_up_after_s=3" in table.text
        driver.save_screenshot(str(ARTIFACTS / "console-failed.png"))
        table.find_elements(By.CSS_SELECTOR, "button.retry")[0].click()
        alert = wait.until(ec.alert_is_present())
        assert "Send this file again" in alert.text
        alert.accept()
        flash = wait.until(ec.presence_of_element_located((By.ID, "flash")))
        assert "Moved back for sending" in flash.text

        def delivered(_: object) -> bool:
            driver.refresh()
            return "delivered" in driver.find_element(By.ID, "retries").text

        WebDriverWait(driver, 90, poll_frequency=1.0).until(delivered)
        retries = driver.find_element(By.ID, "retries").text
        assert f"TARGET@127.0.0.1:{target.port}" in retries
        assert len(driver.find_elements(By.CSS_SELECTOR, "#parked button.retry")) == 2
        driver.save_screenshot(str(ARTIFACTS / "console-retried.png"))
        assert wait_until(lambda: len(target.order()) == 1, 30)
        assert len(parked_files(watch)) == 2
        assert "WEB-RETRY user=local client=127.0.0.1" in node.output()
        driver.find_element(By.LINK_TEXT, "Dashboard").click()
        health = wait.until(ec.presence_of_element_located((By.ID, "health")))
        assert "healthy" in health.text
        assert "STORESCU" in driver.page_source  # today's received per calling AE
        driver.find_element(By.LINK_TEXT, "Log").click()
        wait.until(ec.presence_of_element_located((By.ID, "log")))
        assert "RETRY-QUEUED" in driver.find_element(By.ID, "log").text
        driver.get(base + "/")
        driver.save_screenshot(str(ARTIFACTS / "console-dashboard.png"))
    finally:
        target.stop()
