#!/bin/bash
# sealpost-healthcheck [PATH]: exit 0 if and only if GET PATH (default /healthz) on the local
# broker answers HTTP 200. Uses bash's /dev/tcp, so the runtime image needs no curl or wget.
# The port is SEALPOST_HEALTHCHECK_PORT (default 8080); the broker must listen on 127.0.0.1
# or 0.0.0.0 for this to reach it.
set -u
path=${1:-/healthz}
port=${SEALPOST_HEALTHCHECK_PORT:-8080}
{ exec 3<>"/dev/tcp/127.0.0.1/${port}"; } 2>/dev/null ||
    { echo "unhealthy: cannot connect to 127.0.0.1:${port}" >&2; exit 1; }
printf 'GET %s HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\n\r\n' "$path" >&3 || exit 1
IFS= read -r -t 3 status <&3 || exit 1
exec 3<&-
[[ $status =~ ^HTTP/1\.[01]\ 200 ]] || { echo "unhealthy: ${status%$'\r'}" >&2; exit 1; }
