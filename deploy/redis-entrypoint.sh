#!/bin/sh
# Redis for compose.yaml: one ACL user per ReconQ role, each with the password of its Docker secret
# (/run/secrets/redis_<role>_password), and the default user off, so nothing connects without a role's
# password and no role may run Redis's administrative commands.
#
# It writes an ACL file holding only the passwords' SHA-256 hashes (mode 0600, outside the data volume),
# then starts redis-server with it and the arguments given (the compose command), through the official
# image's entrypoint where there is one (which runs Redis as the `redis` user, umask 077).
#
# What each role does in Redis, and so may do:
#   worker   jobs (reconq:job:*, logs, stages, actions), heartbeats (reconq:hb:*, reconq:workers), GPU
#            state and memory reservations (reconq:resv*, reconq:gpu*, reconq:wait*), run times, the data
#            root's id (read), the scan index (reference scans); Celery's consumer: BRPOP on the queues
#            (stat, routine, bulk, cpu, gpu.<id>, their priority lists), kombu's _kombu.* bindings and unacked
#            keys, pub/sub (worker events, the pidbox for revokes). INFO (its heartbeat reads the server's
#            uptime) is its one command from @dangerous.
#   gateway  jobs (create, queue), the scan index and the data root's id (write), its counters
#            (reconq:stats:gateway), retrieval outcomes, placement (reservations at submit), Celery's
#            producer (LPUSH, bindings, events on pub/sub). No blocking commands.
#   api      reads jobs, exams, GPUs and queue lengths; staff actions (retry, cancel: a revoke on the pidbox,
#            priority, retro-recon: jobs, placement, Celery's producer); its sign-in sessions and sign-in
#            failure counts (reconq:session:*, reconq:signin_fail:*); job events on pub/sub (the dashboard's
#            live view). No blocking commands.
# Only the API may touch the sign-in keys: the worker's and the gateway's key patterns are every reconq:
# key except reconq:se* and reconq:si*, so a stolen worker or gateway password cannot mint a staff session.
# No role has @dangerous (FLUSHALL, FLUSHDB, KEYS, CONFIG, DEBUG, SHUTDOWN, ACL, MONITOR, MODULE, SORT,
# REPLICAOF, MIGRATE, RESTORE, SAVE, ...), and none may read or write keys outside these patterns.
# Pub/sub channels: all (job events, Celery's events and pidbox), for every role.
#
# Outside compose (tests): REDIS_SECRETS_DIR and REDIS_ACL_FILE replace the two paths.
set -eu

secrets="${REDIS_SECRETS_DIR:-/run/secrets}"
acl="${REDIS_ACL_FILE:-/tmp/reconq-redis/users.acl}"

celery_keys='~_kombu.* ~unacked ~unacked_index ~unacked_mutex ~stat* ~routine* ~bulk* ~cpu* ~gpu.* ~*.celery.pidbox'
not_signin='~reconq:[^s]* ~reconq:s[^ei]*'
worker_rules="resetkeys $not_signin $celery_keys resetchannels &* -@all +@all -@dangerous +info"
gateway_rules="resetkeys $not_signin $celery_keys resetchannels &* -@all +@all -@dangerous -@blocking"
api_rules="resetkeys ~reconq:* $celery_keys resetchannels &* -@all +@all -@dangerous -@blocking"

# The SHA-256 of the password in secret $1, its trailing newlines dropped (as ReconQ reads the same file).
hash_of() {
    file="$secrets/$1"
    if [ ! -r "$file" ]; then
        echo "reconq redis: secret $file is missing or unreadable" >&2
        exit 1
    fi
    password="$(cat "$file")"
    case "$password" in
        "" | *[[:space:]]*)
            echo "reconq redis: secret $file is empty or holds white space" >&2
            exit 1
            ;;
    esac
    printf '%s' "$password" | sha256sum | cut -d ' ' -f 1
}

umask 077
gateway_hash="$(hash_of redis_gateway_password)"
api_hash="$(hash_of redis_api_password)"
worker_hash="$(hash_of redis_worker_password)"
mkdir -p "$(dirname "$acl")"
{
    echo "user default off resetpass nocommands resetkeys resetchannels"
    echo "user gateway on #$gateway_hash $gateway_rules"
    echo "user api on #$api_hash $api_rules"
    echo "user worker on #$worker_hash $worker_rules"
} >"$acl.tmp"
mv "$acl.tmp" "$acl"
if [ "$(id -u)" = 0 ] && id redis >/dev/null 2>&1; then
    chown -R redis:redis "$(dirname "$acl")"  # read by Redis once it runs as `redis`
fi

if command -v docker-entrypoint.sh >/dev/null 2>&1; then
    exec docker-entrypoint.sh redis-server --aclfile "$acl" "$@"
fi
exec redis-server --aclfile "$acl" "$@"
