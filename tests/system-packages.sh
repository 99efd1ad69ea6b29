#!/usr/bin/env bash
# Debian packages some tests drive for real: a headless browser (the Prefect UI test) and a PostgreSQL
# server (the multi-worker test). Installed here when missing (as root); the tests also install them on
# first use, so `./run pytest` alone works on a fresh machine.
set -euo pipefail
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing Debian packages: ${missing[*]} (install them: sudo apt-get install -y ${missing[*]})" >&2
    exit 2
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
