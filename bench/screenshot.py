"""scripts/screenshot: the picture of the status page that README.md shows.

Starts `imgserver serve` on a fresh root with 8 photo-like images, runs one job over all of
them (fitted into 600 x 600, then split in four), opens its page in headless Chromium
(Debian's chromium and chromium-driver) and saves docs/job-page.png: each image's input
beside its tiles, in their places.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from inputs import make_inputs  # noqa: E402
from servers import Server, body  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "job-page.png")
    parser.add_argument("--work", type=Path, default=REPO / ".bench" / "screenshot")
    args = parser.parse_args()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    shutil.rmtree(args.work, ignore_errors=True)
    (args.work / "inbox").mkdir(parents=True)
    (args.work / "outbox").mkdir()
    photos = make_inputs(args.work / "photos", "photo", 8, 1200, 800, ".jpg")
    server = Server(args.work, 2, [])
    try:
        status, answer = server.post(body(
            [(f"photos/{p.name}", f"thumbs/{p.stem}.jpg") for p in photos],
            ["fit=600x600", "split", "sharpen=1"]))
        job = json.loads(answer)
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or "chromium"
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", "--no-first-run", "--window-size=1280,1100",
                     "--hide-scrollbars"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")),
                                  options=options)
        try:
            driver.get(f"http://127.0.0.1:{server.port}/ui/jobs/{job['id']}")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not driver.execute_script(
                    "const images = [...document.querySelectorAll('.pair img')];"
                    "return images.length === 40 && images.filter(i => i.getBoundingClientRect()"
                    ".top < innerHeight).every(i => i.complete && i.naturalWidth > 0)"):
                time.sleep(0.2)
            driver.save_screenshot(str(args.output))
        finally:
            driver.quit()
    finally:
        server.stop()
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
