"""A headless Chromium (Debian's ``chromium`` and ``chromium-driver``) driven by Selenium, and
the API served in this process: what the ward pages' tests and benchmark, and the API's
tests, share."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from m3t.services.process import free_ports
from m3t.settings import Settings


def chromium(width: int = 1400, height: int = 900):
    """A headless Chromium under chromedriver; raises with the fix if either is missing."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver):
        raise RuntimeError(
            "Chromium and its driver are needed: apt-get install chromium chromium-driver"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (
        "--headless=new",
        "--no-sandbox",  # root in a container has no user namespace for the sandbox
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={width},{height}",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


@contextmanager
def serving(settings: Settings, **tls) -> Iterator[str]:
    """``stream.api.create_app(settings)`` under uvicorn on a free loopback port (over TLS
    given uvicorn's ``ssl_*`` arguments); its base URL."""
    from stream.api import create_app

    (port,) = free_ports(1)
    config = uvicorn.Config(
        create_app(settings),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=2,  # live pages hold their event streams open
        **tls,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the API did not start")
        time.sleep(0.05)
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def log_in(driver, base: str, token: str, timeout_s: float = 10.0) -> None:
    """Post ``token`` to the login form, as a person would, and return once the answer's page
    has replaced the form (a refusal is a new form at the same address)."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By

    driver.get(f"{base}/ward/login")
    driver.find_element(By.ID, "token").send_keys(token)
    button = driver.find_element(By.ID, "login")
    button.click()

    def replaced() -> bool:
        # Chromium says "stale element" or "node does not belong to the document".
        try:
            button.is_enabled()
        except WebDriverException:
            return True
        return False

    wait_for(replaced, timeout_s)


def wait_for(condition, timeout_s: float = 10.0, every_s: float = 0.02):
    """``condition()``'s first truthy value within ``timeout_s``; raises TimeoutError."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout_s} s")
        time.sleep(every_s)
