"""Screenshot of the built-in chat page for the docs (not a benchmark; needs Chromium).

    python bench/ui_screenshot.py --config configs/smollm2-135m-ngram.toml --out docs/chat-ui.png

Starts `specdec serve` on a free localhost port, asks one question in the page through
Playwright on Debian's Chromium, waits for the answer and its stats, and saves a PNG.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time


def start_server(config: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "server", "--config", config, "--port", "0",
                             "--server.log_requests", "false"],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    for line in proc.stderr:
        if '"ready"' in line:
            return proc, re.search(r'"url":"([^"]+)"', line).group(1)
        if time.monotonic() > deadline or proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit(f"server did not become ready (last line: {line.strip()})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/smollm2-135m-ngram.toml")
    parser.add_argument("--out", default="docs/chat-ui.png")
    parser.add_argument("--prompt", default="Write a Python function that reverses a list, "
                                            "with a one-line explanation.")
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--dark", action="store_true")
    args = parser.parse_args()
    chromium = os.environ.get("SPECDEC_CHROMIUM") or shutil.which("chromium")
    if not chromium:
        raise SystemExit("no chromium: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    proc, url = start_server(args.config)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium,
                                        args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 960, "height": 640},
                                    color_scheme="dark" if args.dark else "light")
            page.goto(url + "/")
            page.locator("#model option").first.wait_for(state="attached")
            page.locator("#settings summary").click()
            page.locator("#temperature").fill("0.2")
            page.locator("#max-tokens").fill(str(args.max_tokens))
            page.locator("#settings summary").click()
            page.locator("#input").fill(args.prompt)
            page.locator("#input").press("Enter")
            page.locator(".msg.assistant .stats [data-stat=ttft]").wait_for(timeout=300_000)
            page.screenshot(path=args.out)
            print(args.out, page.locator(".msg.assistant .stats").inner_text())
            browser.close()
    finally:
        proc.terminate()
        proc.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
