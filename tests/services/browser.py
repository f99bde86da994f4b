"""A real headless browser for the console's tests: Debian's chromium and chromium-driver.

Selenium drives the browser through the ``chromedriver`` binary Debian
installs (``apt-get install chromium chromium-driver``; ``.ci/setup`` does).
The driver's path is given explicitly, so Selenium never looks for (or
downloads) a browser of its own.  :func:`missing_reason` says what is absent;
the ``browser`` tier (:mod:`services.tiers`) uses it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

INSTALL_HINT = (
    "apt-get install chromium chromium-driver; pip install selenium (.ci/setup does both)"
)
ARTIFACTS = Path(os.environ.get("TIDEFLOW_ARTIFACTS", "/tmp/tideflow-artifacts"))


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def find_chromedriver() -> str | None:
    return shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None
    )


def missing_reason() -> str | None:
    missing = []
    if find_chromium() is None:
        missing.append("chromium")
    if find_chromedriver() is None:
        missing.append("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    return f"{', '.join(missing)} not found; {INSTALL_HINT}" if missing else None


def chrome(width: int = 1280, height: int = 900) -> Any:
    """A headless Chromium session (quit it when done)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(find_chromium())
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", "--no-first-run",
                "--disable-background-networking", "--disable-extensions"):  # fmt: skip
        options.add_argument(arg)
    service = Service(executable_path=str(find_chromedriver()))
    return webdriver.Chrome(service=service, options=options)


def artifact(name: str) -> Path:
    """Where a test saves a screenshot: outside the repository."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS / name
