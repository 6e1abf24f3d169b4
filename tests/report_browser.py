"""Open a Snakemake HTML report in a real headless browser (Debian's Chromium through Selenium) and say whether it
renders: the page's text once the report app has drawn it, every embedded image decoded by the browser, and the
browser console's errors.

Used by tests/test_workflow_pipeline.py and, by hand, on ``make demo``'s report::

    .venv/bin/python tests/report_browser.py results/report.html
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

#: Debian's packages: the browser and the WebDriver that drives it.
PACKAGES = ("chromium", "chromium-driver")

# Decodes every image the report embeds (data: URIs in its script data), in the page's own browser context.
_DECODE_IMAGES = """
const done = arguments[arguments.length - 1];
const uris = [...new Set(document.documentElement.outerHTML.match(/data:image\\/[a-z+.-]+;[^"'\\s)]+/g) || [])];
let loaded = 0, broken = [];
if (uris.length === 0) { done({images: 0, loaded: 0, broken: []}); }
let pending = uris.length;
for (const uri of uris) {
  const img = new Image();
  img.onload = () => { if (img.naturalWidth > 0) loaded++; else broken.push(uri.slice(0, 60)); if (--pending === 0) done({images: uris.length, loaded, broken}); };
  img.onerror = () => { broken.push(uri.slice(0, 60)); if (--pending === 0) done({images: uris.length, loaded, broken}); };
  img.src = uri.replace(/;charset=[^;,]*/, "");
}
"""


def browser_available() -> str | None:
    """None when Chromium, its driver and Selenium are here; else what is missing."""
    missing = [name for name in ("chromium", "chromedriver") if not shutil.which(name)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip)")
    return ", ".join(missing) or None


def install_browser(timeout: int = 900) -> str | None:
    """Install Debian's Chromium and its driver when missing (root and apt-get needed); None on success."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            return "Chromium is not installed and this is not root with apt-get (apt-get install chromium chromium-driver)"
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run = subprocess.run(["apt-get", "install", "-y", "-q", *PACKAGES], capture_output=True, text=True,
                             timeout=timeout, env=env)
        if run.returncode:
            return f"apt-get install {' '.join(PACKAGES)} failed: {run.stderr[-500:]}"
    return browser_available()


def open_report(path: str | os.PathLike[str], *, timeout_s: float = 120.0) -> dict[str, Any]:
    """Load ``path`` in headless Chromium; return its title, text, image counts and SEVERE console messages."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--allow-file-access-from-files", "--window-size=1400,1000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "chromedriver"), options=options)
    try:
        driver.set_page_load_timeout(timeout_s)
        driver.set_script_timeout(timeout_s)
        driver.get(Path(path).resolve().as_uri())
        deadline = time.monotonic() + timeout_s
        text = ""
        while time.monotonic() < deadline:  # the report is an app: wait until it has drawn its menu
            text = driver.execute_script("return document.body ? document.body.innerText : ''") or ""
            if len(text.strip()) > 20:
                break
            time.sleep(0.5)
        images = driver.execute_async_script(_DECODE_IMAGES)
        console = driver.get_log("browser")
        return {"title": driver.title, "text": text, **images,
                "console_errors": [entry["message"] for entry in console if entry.get("level") == "SEVERE"]}
    finally:
        driver.quit()


if __name__ == "__main__":
    problem = browser_available()
    if problem:
        sys.exit(f"missing: {problem}")
    result = open_report(sys.argv[1])
    result["text"] = result["text"][:300]
    print(json.dumps(result, indent=1))
    sys.exit(1 if result["console_errors"] or result["broken"] or not result["images"] else 0)
