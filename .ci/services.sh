#!/usr/bin/env bash
# Start PostgreSQL and Redis on loopback if they are not up (the tests use both).
set -euo pipefail

if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
  echo "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
  for _ in $(seq 30); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 1; done
fi
pg_isready -h 127.0.0.1 -p 5432

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  for _ in $(seq 30); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 1; done
fi
redis-cli -h 127.0.0.1 -p 6379 ping

# The dashboard's browser test (tests/e2e/test_dashboard.py) drives Debian's chromium through
# chromedriver; install both when missing. Where they cannot be installed (no root, no sudo,
# no apt) the test skips and says why; nothing else depends on them.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then as_root=""; elif command -v sudo >/dev/null 2>&1; then as_root="sudo -n"; else as_root="none"; fi
  if [ "$as_root" != "none" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium and chromium-driver"
    { $as_root apt-get update -qq \
      && DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -qq --no-install-recommends \
        chromium chromium-driver; } \
      || echo "could not install chromium; the dashboard's browser test will skip"
  else
    echo "chromium is missing and cannot be installed here; the dashboard's browser test will skip"
  fi
fi
