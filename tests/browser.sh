#!/usr/bin/env bash
# Debian's chromium and chromium-driver for the MLflow UI test (needs root; idempotent).
#   bash tests/browser.sh install
set -euo pipefail

[[ ${1:-} == install ]] || { echo "usage: $0 install" >&2; exit 2; }
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
echo "browser.sh: installing chromium chromium-driver" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
