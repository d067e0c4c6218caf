#!/usr/bin/env bash
# Debian's Chromium for the chat-page tests (tests/e2e/test_ui.py drives it through
# Playwright's executable_path). Never `playwright install`: that downloads a browser build.
# Needs root (or sudo) and the Debian package index; safe to run again.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    chromium --version
    exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core
chromium --version
