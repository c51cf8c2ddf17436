#!/usr/bin/env bash
# Cron-friendly drift check (the seed's script): prints the verdict, exits 1 on drift.
#   QUADRA_URL      service base URL (default http://127.0.0.1:5000)
#   QUADRA_API_KEY  an admin key; with --maintenance, drift switches the service to MAINTENANCE
# Example crontab line:  */5 * * * * QUADRA_API_KEY=qk_... /opt/quadra/scripts/check_drift.sh --maintenance
set -euo pipefail

url="${QUADRA_URL:-http://127.0.0.1:5000}"
switch_to_maintenance=false
[ "${1:-}" = "--maintenance" ] && switch_to_maintenance=true

response=$(curl -sf --max-time 30 "$url/api/monitoring/drift") || { echo "drift check failed: $url unreachable" >&2; exit 2; }
verdict=$(printf '%s' "$response" | python3 -c '
import json, sys
d = json.load(sys.stdin)
print("drift" if d["drift_detected"] else "ok", d["drift_score"], d["threshold"], ",".join(d.get("fired", [])) or "-", ",".join(d.get("drifted_features", [])) or "-")
')
read -r state score threshold fired features <<<"$verdict"
echo "$(date -u +%FT%TZ) drift=$state score=$score threshold=$threshold detectors=$fired features=$features"

if [ "$state" = "drift" ]; then
    if $switch_to_maintenance; then
        curl -sf --max-time 30 -X POST "$url/api/mode/maintenance" \
            -H "X-API-Key: ${QUADRA_API_KEY:?set QUADRA_API_KEY to switch modes}" \
            -H 'Content-Type: application/json' -d '{"reason": "check_drift.sh: drift detected"}' >/dev/null
        echo "switched to maintenance"
    fi
    exit 1
fi
