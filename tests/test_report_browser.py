"""The headless-browser check of reports (tests/report_browser.py) sees what it must: decoded images, broken
images and console errors."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

from report_browser import install_browser, open_report


@pytest.fixture(scope="module")
def browser() -> None:
    problem = install_browser()
    if problem:
        pytest.skip(f"no headless browser: {problem}")


def _png() -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    plt.imsave(buffer, np.arange(16.0).reshape(4, 4), format="png")
    return base64.b64encode(buffer.getvalue()).decode()


def test_a_good_page_passes(browser, tmp_path) -> None:
    page = tmp_path / "good.html"
    page.write_text(f'<html><head><title>ok</title></head><body><p>Some report text here, long enough.</p>'
                    f'<script>const data = {{"a": "data:image/png;charset=utf8;base64,{_png()}"}};</script></body></html>')
    result = open_report(page)
    assert result["title"] == "ok" and result["images"] == result["loaded"] == 1 and not result["broken"]
    assert result["console_errors"] == []


def test_a_broken_image_and_a_console_error_are_seen(browser, tmp_path) -> None:
    page = tmp_path / "bad.html"
    page.write_text(f'<html><body><p>Some report text here, long enough.</p><script>'
                    f'const data = ["data:image/png;charset=utf8;base64,{_png()}", "data:image/png;base64,bm90IGFuIGltYWdl"];'
                    'console.error("something failed"); undefinedFunction();</script></body></html>')
    result = open_report(page)
    assert result["images"] == 2 and result["loaded"] == 1 and len(result["broken"]) == 1
    assert len(result["console_errors"]) >= 2 and any("something failed" in m for m in result["console_errors"])
