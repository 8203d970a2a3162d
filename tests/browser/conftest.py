"""The browser tests' harness: one headless Debian Chromium for the whole session, driven by its
chromedriver through Selenium, kept on loopback; its cookies are cleared before every test."""
from __future__ import annotations

import os
import pathlib
import threading
from collections.abc import Iterator

import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service

from kgsupervisor.store.schema import init_db

from ..processes import Processes, free_port, wait_for
from .servers import TOKEN, Console, GatedService, answers

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Selenium Manager fetches drivers and browsers from the network when it runs; the explicit paths
# below keep it from running at all, and this keeps it offline should a later Selenium call it anyway.
os.environ["SE_OFFLINE"] = "true"


def chromium_options(profile: pathlib.Path) -> webdriver.ChromeOptions:
    """Headless Chromium that can reach loopback only: a dead proxy for whatever is not loopback
    (Chromium never proxies loopback), every name and address but 127.0.0.1 resolving to nothing,
    and none of its own background traffic (updates, sync, first-run pages)."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--proxy-server=http://127.0.0.1:9",
                     "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
                     "--disable-background-networking", "--disable-component-update", "--no-first-run",
                     "--disable-sync", "--window-size=1400,1000", f"--user-data-dir={profile}"):
        options.add_argument(argument)
    return options


@pytest.fixture(scope="session")
def browser(tmp_path_factory) -> Iterator[webdriver.Chrome]:
    """One Chromium for the whole session: starting one costs more than most of these tests."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        pytest.fail(f"{' and '.join(missing)} missing: run scripts/ensure-chromium (make test does)",
                    pytrace=False)
    profile = tmp_path_factory.mktemp("chromium-profile")
    service = Service(executable_path=CHROMEDRIVER, log_output=str(profile.parent / "chromedriver.log"))
    try:
        driver = webdriver.Chrome(service=service, options=chromium_options(profile))
    except WebDriverException as exc:
        pytest.fail(f"cannot start {CHROMIUM} through {CHROMEDRIVER}: {exc.msg}", pytrace=False)
    yield driver
    driver.quit()


@pytest.fixture
def driver(browser) -> Iterator[webdriver.Chrome]:
    """The session's browser with no cookies (so no login) and one blank tab."""
    browser.execute_cdp_cmd("Network.clearBrowserCookies", {})
    yield browser
    for handle in browser.window_handles[1:]:
        browser.switch_to.window(handle)
        browser.close()
    browser.switch_to.window(browser.window_handles[0])
    browser.get("about:blank")


@pytest.fixture(scope="module")
def console(tmp_path_factory) -> Iterator[Console]:
    """One supervisor (two workers, one document a claim) for the module, its console at a free
    loopback status address with an operator token."""
    tmp = tmp_path_factory.mktemp("console")
    db = str(tmp / "kg.db")
    init_db(db)
    service = GatedService()
    threading.Thread(target=service.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    processes = Processes(tmp / "processes")
    addr = f"127.0.0.1:{free_port()}"
    # --adaptive off: both workers send at once, so the pages show two documents in hand.
    supervisor = processes.supervisor(db, service.url, "--workers", "2", "--batch-size", "1", "--adaptive", "off",
                                      "--status-addr", addr, env={"KG_CONSOLE_TOKEN": TOKEN})
    base = f"http://{addr}"
    try:
        wait_for(lambda: answers(f"{base}/") and answers(f"{base}/health"), 30, interval=0.1,
                 message=f"the console at {base}/ (log: {supervisor.log})")
        yield Console(base, db, service, supervisor)
        service.open()
        log = supervisor.stop()
        assert supervisor.returncode == 0, log[-3000:]
    finally:
        service.open()
        processes.kill_all()
        service.shutdown()
        service.server_close()
