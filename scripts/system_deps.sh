#!/usr/bin/env bash
# The Debian packages the test suite needs: nginx (the download, LoRA and server tests serve files with it) and
# chromium (the realtime page's browser tests).
# Installs what is missing where it can (as root, or with sudo that needs no password); otherwise stops and
# says what to install. Never a silent skip: a suite that cannot run all its tests does not start.
set -euo pipefail
need=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v chromium >/dev/null || need+=(chromium)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ]; then sudo=(); elif sudo -n true 2>/dev/null; then sudo=(sudo); else
  echo "The tests need the Debian package(s) ${need[*]}. Install them, then run again:" >&2
  echo "  sudo apt-get install -y ${need[*]}" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null; then
  echo "The tests need ${need[*]}, and this machine has no apt-get: install them with its package manager." >&2
  exit 1
fi
echo "installing ${need[*]} (the tests need it)" >&2
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
