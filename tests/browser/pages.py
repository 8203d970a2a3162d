"""What the browser tests do on the console's pages (by the element ids of its DOM contract), the
event waits they use, and the checks of the screenshots they take."""
from __future__ import annotations

import os
import pathlib
import shutil
import struct
import zlib
from collections.abc import Callable
from html.parser import HTMLParser
from typing import Any

import requests
from selenium.common.exceptions import (NoSuchElementException, StaleElementReferenceException,
                                        WebDriverException)
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

STATUSES = ("pending", "processing", "completed", "failed", "skipped")
# The overview's fragment is polled every 2 s: a change shows within two polls, well inside this.
WAIT_SECONDS = 15.0
# Every count of the overview at once, read in one script run: #live may be replaced between
# two element look-ups.
COUNTS_SCRIPT = """
const counts = {};
for (const element of document.querySelectorAll('#queue-counts [data-status]')) {
    counts[element.dataset.status] = element.textContent.trim();
}
return counts;
"""


def wait(driver: WebDriver, condition: Callable[[WebDriver], Any], message: str,
         timeout: float = WAIT_SECONDS) -> Any:
    """Wait until `condition(driver)` is truthy; an element missing or replaced meanwhile (the
    live fragment) only means not yet."""
    waiting = WebDriverWait(driver, timeout, poll_frequency=0.05,
                            ignored_exceptions=(NoSuchElementException, StaleElementReferenceException))
    return waiting.until(condition, f"timed out after {timeout}s waiting for {message}")


def element(driver: WebDriver, css: str):
    """The element `css` selects (NoSuchElementException when none)."""
    return driver.find_element(By.CSS_SELECTOR, css)


def elements(driver: WebDriver, css: str) -> list:
    return driver.find_elements(By.CSS_SELECTOR, css)


def text_of(driver: WebDriver, css: str) -> str:
    """The text content of `css`, whether or not it is laid out on screen."""
    return element(driver, css).get_attribute("textContent").strip()


def page_counts(driver: WebDriver) -> dict[str, int]:
    """The overview's queue counts by status, as the page shows them now."""
    return {status: int(text) for status, text in driver.execute_script(COUNTS_SCRIPT).items()}


def shows_counts(expected: dict[str, int]) -> Callable[[WebDriver], bool]:
    """A wait condition: the overview shows every status, each with its count in `expected`
    (0 for one `expected` lacks)."""
    def shown(driver: WebDriver) -> bool:
        counts = page_counts(driver)
        return all(counts.get(status) == expected.get(status, 0) for status in STATUSES)
    return shown


def open_page(driver: WebDriver, url: str, ready_css: str) -> None:
    """Load `url` and wait until `ready_css` is on the page."""
    driver.get(url)
    wait(driver, lambda d: element(d, ready_css), f"{ready_css} on {url}")


def press(driver: WebDriver, button_css: str) -> None:
    """Press the submit button `button_css` and wait until the answer has replaced the page."""
    driver.execute_script("window.__beforePress = true")
    element(driver, button_css).click()
    wait(driver, lambda d: loaded(d, "!window.__beforePress"), f"the page after {button_css}")


def loaded(driver: WebDriver, condition: str = "true") -> bool:
    """True when a page has loaded whole and the script expression `condition` holds there.
    While a navigation is under way there may be no page to ask: not yet."""
    try:
        return driver.execute_script(f"return document.readyState === 'complete' && ({condition})")
    except WebDriverException:
        return False


def submit(driver: WebDriver, button_css: str, ready_css: str) -> None:
    """Press the submit button `button_css` and wait for the next page, that holds `ready_css`."""
    press(driver, button_css)
    wait(driver, lambda d: element(d, ready_css), f"{ready_css} after {button_css}")


def type_into(driver: WebDriver, css: str, text: str) -> None:
    """Replace what the input `css` holds with `text`."""
    field = element(driver, css)
    field.clear()
    field.send_keys(text)


def login(driver: WebDriver, base: str, token: str, name: str = "alice") -> None:
    """Log in through the login form as `name`; waits for the logout button."""
    open_page(driver, f"{base}/login", "#login-form")
    type_into(driver, "#login-name", name)
    type_into(driver, "#login-token", token)
    submit(driver, "#login-submit", "#logout")


def logout(driver: WebDriver) -> None:
    """Press the logout button; waits for the login link."""
    submit(driver, "#logout", "#login-link")


def save_screenshot(driver: WebDriver, directory: pathlib.Path, name: str) -> pathlib.Path:
    """A screenshot of the page as `name` in `directory`, checked to be a real PNG of a page;
    copied to $KG_SCREENSHOTS_DIR too when that is set (`make screenshots` keeps docs/images/)."""
    path = directory / name
    assert driver.save_screenshot(str(path)), f"no screenshot {name}"
    width, height = png_size(path.read_bytes())
    assert width >= 1000 and height >= 600, f"{name} is {width}x{height}"
    keep = os.environ.get("KG_SCREENSHOTS_DIR")
    if keep:
        pathlib.Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, pathlib.Path(keep) / name)
    return path


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height of the PNG `data`, after checking its signature, every chunk's CRC, and
    that its pixels decompress and are not one flat colour (a blank page)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    chunks, offset = [], 8
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        body = data[offset + 8:offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length:offset + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in the {kind!r} chunk"
        chunks.append((kind, body))
        offset += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND", "IHDR first, IEND last"
    width, height = struct.unpack(">II", chunks[0][1][:8])
    pixels = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert len(pixels) >= width * height * 3, "fewer pixel bytes than the image size needs"
    assert len(set(pixels[::97])) > 16, "a flat image: the page shows nothing"
    return width, height


class FormInputs(HTMLParser):
    """Every <input> of an HTML page, as its attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[dict[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "input":
            self.inputs.append(dict(attrs))


def page_inputs(html: str) -> list[dict[str, str | None]]:
    parser = FormInputs()
    parser.feed(html)
    return parser.inputs


def input_named(html: str, name: str) -> str:
    """The value of the first input named `name` on the page."""
    found = [i.get("value") or "" for i in page_inputs(html) if i.get("name") == name]
    assert found, f"no input named {name!r} on the page"
    return found[0]


def name_of_input(html: str, element_id: str) -> str:
    """The form field name of the input whose id is `element_id`."""
    found = [i.get("name") for i in page_inputs(html) if i.get("id") == element_id]
    assert found and found[0], f"no named input #{element_id} on the page"
    return found[0]


def logged_in_session(base: str, token: str, name: str = "mallory") -> requests.Session:
    """A requests session logged in to the console through its login form, as a browser does."""
    session = requests.Session()
    form = session.get(f"{base}/login", timeout=10)
    fields = {name_of_input(form.text, "login-name"): name, name_of_input(form.text, "login-token"): token,
              "csrf_token": input_named(form.text, "csrf_token")}
    answer = session.post(f"{base}/login", data=fields, headers={"Origin": base}, timeout=10)
    assert answer.status_code == 200 and 'id="logout"' in answer.text, answer.status_code
    return session
