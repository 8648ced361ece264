"""The web pages in headless Chromium, driven by Selenium (crates/tessera/tests/ui.rs starts
the registry and runs this). Each page must load without console errors (a CSP violation,
a missing asset, a script error all are), show what it should, and page and log in as a
person would. A full-page screenshot of each goes to $TESSERA_SHOTS. Exits non-zero with
what failed."""

import base64
import os
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

BASE = os.environ["TESSERA_URL"]
SHOTS = os.environ["TESSERA_SHOTS"]
USER = os.environ["TESSERA_USER"]
PASSWORD = os.environ["TESSERA_PASSWORD"]


def browser():
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,900", "--no-first-run", "--disable-extensions"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The Debian driver, named: Selenium never downloads one.
    return webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"), options=options)


def check(condition, what):
    if not condition:
        raise AssertionError(what)


def visit(driver, path, status=200):
    driver.get(BASE + path)
    # A page answered with an error status is logged by the browser as a failed load:
    # expected there, and nothing else may fail.
    expected = f"{BASE}{path} - Failed to load resource: the server responded with a status of {status}"
    settled(driver, path, expected if status != 200 else None)


def settled(driver, where, expected=None):
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"
              and not (expected and e["message"].startswith(expected))]
    check(not errors, f"console errors on {where}: {errors}")


def follow(driver, element, where):
    """Clicks something that loads another page, and waits until it has loaded."""
    before = driver.current_url
    element.click()
    WebDriverWait(driver, 10).until(
        lambda d: d.current_url != before and d.execute_script("return document.readyState") == "complete")
    settled(driver, where)


def shoot(driver, name):
    """The whole page, not only what the window shows (Chrome's DevTools capture)."""
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    with open(os.path.join(SHOTS, f"{name}.png"), "wb") as out:
        out.write(base64.b64decode(shot["data"]))


def text(driver):
    return driver.find_element(By.TAG_NAME, "body").text


def main():
    driver = browser()
    try:
        visit(driver, "/")
        body = text(driver)
        for expected in ("Route 1", "hub", "crane", "Every other name"):
            check(expected in body, f"home shows {expected!r}")
        check(driver.find_element(By.CSS_SELECTOR, "link[rel=stylesheet]"), "stylesheet linked")
        color = driver.execute_script(
            "return getComputedStyle(document.querySelector('.kind')).backgroundColor")
        check(color not in ("", "rgba(0, 0, 0, 0)"), f"the stylesheet applies ({color})")
        shoot(driver, "home")

        # The search box, as a person uses it.
        box = driver.find_element(By.ID, "search-box")
        box.send_keys("many")
        follow(driver, driver.find_element(By.CSS_SELECTOR, "form.search button"), "search")
        check("public/many" in text(driver) and "public/app\n" not in text(driver), "search finds by name")

        visit(driver, "/ui/repositories")
        body = text(driver)
        for expected in ("public/app", "public/many", "vendor/base", "mirror/library/base"):
            check(expected in body, f"repositories list {expected}")
        check("secret/app" not in body, "anonymous: no secret/app")
        check("vendor/private" not in body, "anonymous: no protected static repository")
        shoot(driver, "repositories")

        # Paging through a repository's tags, by its links.
        follow(driver, driver.find_element(By.LINK_TEXT, "public/many"), "public/many")
        rows = driver.find_elements(By.CSS_SELECTOR, "table.tags tbody tr")
        check(len(rows) == 50, f"fifty tags on the first page, not {len(rows)}")
        check(rows[0].find_element(By.TAG_NAME, "th").text == "t59", "newest first")
        shoot(driver, "repository")
        follow(driver, driver.find_element(By.CSS_SELECTOR, "a[rel=next]"), "page 2")
        rows = driver.find_elements(By.CSS_SELECTOR, "table.tags tbody tr")
        check(len(rows) == 10, f"ten on the second page, not {len(rows)}")
        check(rows[-1].find_element(By.TAG_NAME, "th").text == "t00", "the oldest last")

        visit(driver, "/ui/r/public/app/-/v1")
        check(driver.find_elements(By.CSS_SELECTOR, "svg.bar rect.via-cdn"), "a CDN segment in the bar")
        check("CDN" in text(driver), "layers sent to the CDN")
        copy = driver.find_element(By.CSS_SELECTOR, "button.copy")
        copy.click()
        # The clipboard answers asynchronously: wait for the button to say how it went.
        WebDriverWait(driver, 5).until(lambda d: copy.text != "Copy")
        check(copy.text in ("Copied", "Select and copy"), f"the copy button answers ({copy.text!r}): the script ran")
        settled(driver, "copying")
        shoot(driver, "image")

        visit(driver, "/ui/r/nearby/app/-/v1")
        check(driver.find_elements(By.CSS_SELECTOR, "table.blobs span.via"), "mirrored image blobs listed")
        shoot(driver, "mirrored-image")

        visit(driver, "/ui/r/vendor/base/-/9")
        check(driver.find_elements(By.CSS_SELECTOR, "svg.bar rect.via-external"), "Crane blobs on their CDN")
        shoot(driver, "static-image")

        visit(driver, "/ui/r/mirror/library/base/-/v1")
        check(driver.find_elements(By.CSS_SELECTOR, "table.blobs span.via"), "cached image blobs listed")
        shoot(driver, "cached-image")

        visit(driver, "/ui/r/secret/app", status=404)
        check("Not found" in text(driver), "anonymous: secret/app is not found")

        visit(driver, "/ui/login")
        shoot(driver, "login")
        driver.find_element(By.ID, "username").send_keys(USER)
        driver.find_element(By.ID, "password").send_keys(PASSWORD)
        follow(driver, driver.find_element(By.CSS_SELECTOR, "form.login button[type=submit]"), "after login")
        check(f"Signed in as {USER}" in text(driver), "signed in")
        visit(driver, "/ui/repositories")
        body = text(driver)
        check("secret/app" in body and "vendor/private" in body, "a logged-in user sees what they may pull")
        cookie = driver.get_cookie("tessera_session")
        check(cookie and cookie["httpOnly"] and cookie["sameSite"] == "Strict", f"session cookie {cookie}")
        check(driver.execute_script("return document.cookie").find("tessera_session") < 0,
              "scripts cannot read the session cookie")
        visit(driver, "/ui/r/secret/app")
        check("v1" in text(driver), "the secret repository's tags")
        follow(driver, driver.find_element(By.CSS_SELECTOR, ".viewer button"), "after logout")
        visit(driver, "/ui/repositories")
        check("secret/app" not in text(driver), "logged out: hidden again")

        # Last, once the server has answered for a few seconds: the chart has points.
        time.sleep(2.5)
        visit(driver, "/ui/operations")
        check("Recent pushes" in text(driver) and "Cache of hub" in text(driver), "operations")
        check(driver.find_elements(By.CSS_SELECTOR, "figure.chart polyline.rate"), "the request chart")
        shoot(driver, "operations")
    finally:
        driver.quit()
    print("browser checks passed")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as failed:
        print(f"FAILED: {failed}", file=sys.stderr)
        sys.exit(1)
