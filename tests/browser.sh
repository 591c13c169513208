#!/usr/bin/env bash
# Debian's chromium and chromium-driver for the MLflow UI tests, and curl, with which the
# README asks a served model (tests/integration/test_readme_commands.py); needs root; idempotent.
#   bash tests/browser.sh install
set -euo pipefail

[[ ${1:-} == install ]] || { echo "usage: $0 install" >&2; exit 2; }
if command -v chromium >/dev/null && command -v chromedriver >/dev/null \
    && command -v curl >/dev/null; then
    exit 0
fi
echo "browser.sh: installing chromium chromium-driver curl" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium chromium-driver curl ca-certificates \
    >/dev/null
