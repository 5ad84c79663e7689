#!/usr/bin/env bash
# Installs etcd (Debian's etcd-server) for the membership tests, only when no etcd is on PATH.
# The package's postinst enables and may start a system etcd on 127.0.0.1:2379; the tests start their own
# etcd on free ports, so a started system service is stopped and disabled again.
set -euo pipefail
if command -v etcd >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    SUDO="sudo"
fi
# a fresh image may have no package lists yet: update them once if the first try fails
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y etcd-server || {
    $SUDO apt-get update && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y etcd-server; }
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now etcd >/dev/null 2>&1 || true
fi
