"""The search page in a real browser: headless Chromium (Debian's) driven by Selenium.

Skips, with the reason, where Chromium or ChromeDriver is not installed; `.ci/run`
installs both. Set HIERVEC_SCREENSHOT=path.png to keep a screenshot of the result grid
(docs/search-page.png was taken this way, see the README), and HIERVEC_PAGE_MODEL /
HIERVEC_PAGE_URI to point the page at a trained model and its collection instead of
the tiny generated catalogue.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest

from .conftest import ingest_catalogue, live_server

pytestmark = pytest.mark.lite
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture
def page_server(catalogue, tmp_path):
    from service import Service, ServiceSettings

    model, uri = os.environ.get("HIERVEC_PAGE_MODEL"), os.environ.get("HIERVEC_PAGE_URI")
    settings = ServiceSettings(lite_process=False, model=model or str(catalogue.model), uri=uri or str(tmp_path / "page.db"),
                               image_roots=() if model else (str(catalogue.tree),), media_dir=None)
    service = Service.open(settings)
    if not model:
        ingest_catalogue(service, catalogue)
    with live_server(service) as url:
        yield f"{url}/", service


@pytest.fixture
def browser(tmp_path):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip(f"no headless browser here: needs {CHROMIUM} and {CHROMEDRIVER} "
                    "(Debian packages chromium and chromium-driver; .ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,860", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=DriverService(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def test_upload_filter_and_click_through(page_server, browser, catalogue):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.ui import WebDriverWait

    url, service = page_server
    wait = WebDriverWait(browser, 30)
    browser.get(url)
    wait.until(lambda d: "images" in d.find_element(By.ID, "summary").text)
    levels = service.level_names
    department = Select(browser.find_element(By.ID, f"level-{levels[0]}"))
    departments = [o.get_attribute("value") for o in department.options if o.get_attribute("value")]
    assert departments == sorted(service.categories(None)[levels[0]])

    if os.environ.get("HIERVEC_PAGE_QUERY"):
        query = Path(os.environ["HIERVEC_PAGE_QUERY"])
    else:
        query = catalogue.files["clothing/tops/shirt"][0]
    upload = browser.find_element(By.ID, "file")
    browser.execute_script("arguments[0].hidden = false", upload)
    upload.send_keys(str(query.resolve()))
    wait.until(lambda d: re.match(r"\d+ hits for " + re.escape(query.name), d.find_element(By.ID, "status").text))
    first = browser.find_elements(By.CSS_SELECTOR, "#grid .hit")[0]
    assert first.find_element(By.CSS_SELECTOR, ".dist").text == "distance 0.0000"  # the query is stored too
    # the grid is drawn before its images arrive: wait for the first to load (a 404 never does)
    wait.until(lambda d: d.execute_script("const img = document.querySelector('#grid .hit img'); "
                                          "return img.complete && img.naturalWidth > 0"))

    target = departments[-1]
    department.select_by_value(target)  # the filter searches again, inside that department only
    wait.until(lambda d: "under " + target in d.find_element(By.ID, "status").text)
    paths = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#grid .hit .path")]
    assert paths and all(p == target or p.startswith(target + "/") for p in paths)
    category = Select(browser.find_element(By.ID, f"level-{levels[1]}"))
    assert all(o.get_attribute("value").startswith(target + "/") for o in category.options if o.get_attribute("value"))

    if os.environ.get("HIERVEC_SCREENSHOT"):
        department.select_by_value("")
        wait.until(lambda d: "under" not in d.find_element(By.ID, "status").text)
        browser.execute_script("arguments[0].hidden = true", upload)
        time.sleep(0.5)
        browser.save_screenshot(os.environ["HIERVEC_SCREENSHOT"])

    clicked = browser.find_elements(By.CSS_SELECTOR, "#grid .hit")[1]
    clicked_id = clicked.get_attribute("data-id")
    clicked.click()  # a hit becomes the next query
    wait.until(lambda d: f"stored image {clicked_id[:12]}" in d.find_element(By.ID, "status").text)
    ids = [e.get_attribute("data-id") for e in browser.find_elements(By.CSS_SELECTOR, "#grid .hit")]
    assert ids and clicked_id not in ids


def test_a_bad_upload_shows_the_services_message(page_server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = page_server
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("this is text")
    browser.get(url)
    WebDriverWait(browser, 30).until(lambda d: "images" in d.find_element(By.ID, "summary").text)
    upload = browser.find_element(By.ID, "file")
    browser.execute_script("arguments[0].hidden = false", upload)
    upload.send_keys(str(not_an_image))
    status = browser.find_element(By.ID, "status")
    WebDriverWait(browser, 30).until(lambda d: "not an image" in status.text)
    assert status.get_attribute("class") == "error" and "notes.jpg" in status.text
