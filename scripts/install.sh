#!/usr/bin/env bash
# Installs what berth needs, builds berthd and the berth CLI, and starts it on its embedded default config
# (root /var/lib/berth, state /run/berth, socket /run/berth/berthd.sock). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --release -p berthd -p berth-cli
install -m 0755 target/release/berthd /usr/local/bin/berthd
install -m 0755 target/release/berth /usr/local/bin/berth
sock=/run/berth/berthd.sock
if ctr --address "$sock" version >/dev/null 2>&1; then
  echo "berthd already answers on $sock; restart it to run the new build"
elif [ -d /run/systemd/system ]; then
  install -m 0644 daemon/berthd.service /etc/systemd/system/berthd.service
  systemctl daemon-reload
  systemctl enable --now berthd
else
  # No systemd (containers, minimal VMs): run it in the background with a log file.
  nohup /usr/local/bin/berthd >>/var/log/berthd.log 2>&1 &
  for _ in $(seq 100); do
    ctr --address "$sock" version >/dev/null 2>&1 && break
    sleep 0.05
  done
fi
ctr --address "$sock" version
echo "berthd is running: ctr --address $sock plugins ls"
