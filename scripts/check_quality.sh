#!/usr/bin/env bash
# Cron-friendly quality check, like check_drift.sh: prints production's accuracy from labelled
# predictions against the service's floor, exits 1 below it, 2 when the service is unreachable.
#   QUADRA_URL      service base URL (default http://127.0.0.1:5000)
#   QUADRA_API_KEY  a key with read permission
#   --maintenance   below the floor, switch the service to MAINTENANCE (needs an admin key)
# The floor and window are the service's: QUADRA_QUALITY_MIN_ACCURACY, QUADRA_QUALITY_MAX_DROP,
# QUADRA_QUALITY_MIN_LABELS, QUADRA_QUALITY_WINDOW.
# Example crontab line:  */15 * * * * QUADRA_API_KEY=qk_... /opt/quadra/scripts/check_quality.sh
set -euo pipefail

url="${QUADRA_URL:-http://127.0.0.1:5000}"
key="${QUADRA_API_KEY:?set QUADRA_API_KEY to a key with read permission}"
switch_to_maintenance=false
[ "${1:-}" = "--maintenance" ] && switch_to_maintenance=true

response=$(curl -sf --max-time 30 -H "X-API-Key: $key" "$url/api/monitoring/quality") \
    || { echo "quality check failed: $url unreachable or the key refused" >&2; exit 2; }
verdict=$(printf '%s' "$response" | python3 -c '
import json, sys
c = json.load(sys.stdin)["check"]
state = "below" if c["below_floor"] else ("ok" if c["evaluated"] else "unknown")
fmt = lambda v: "-" if v is None else f"{v:.4f}"
print(state, c["version"] or "-", c["window"], c["labelled"], fmt(c["accuracy"]), fmt(c["floor"]))
')
read -r state version window labelled accuracy floor <<<"$verdict"
echo "$(date -u +%FT%TZ) quality=$state version=$version window=$window labelled=$labelled accuracy=$accuracy floor=$floor"

if [ "$state" = "below" ]; then
    if $switch_to_maintenance; then
        curl -sf --max-time 30 -X POST "$url/api/mode/maintenance" -H "X-API-Key: $key" \
            -H 'Content-Type: application/json' -d '{"reason": "check_quality.sh: accuracy below the floor"}' >/dev/null
        echo "switched to maintenance"
    fi
    exit 1
fi
