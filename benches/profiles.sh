#!/usr/bin/env bash
# The release profile beside the dist profile (Cargo.toml), paired: ROUNDS
# rounds, each running ../shared/bench/compare.sh on moat built both ways,
# back to back (the order alternates), connrate plain and TLS. Prints, per
# row, release ÷ dist over the rounds (↓ rows: above 1 means the release
# build costs more): one round varies by ±10 % on this machine, so it takes
# about 20 rounds to bound the difference within a few percent.
#
#   benches/profiles.sh                    # builds both, then 20 rounds: about 25 minutes
#   RELEASE_BIN=… DIST_BIN=… ROUNDS=3 benches/profiles.sh
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
compare=${COMPARE:-../shared/bench/compare.sh}
rounds=${ROUNDS:-20}
work=$(mktemp -d /tmp/moat-profiles-XXXXXX)
if [ -z "${RELEASE_BIN:-}" ] || [ -z "${DIST_BIN:-}" ]; then
  cargo build --release >&2 && cp target/release/moat "$work/moat-release"
  cargo build --profile dist >&2 && cp target/dist/moat "$work/moat-dist"
  RELEASE_BIN=$work/moat-release DIST_BIN=$work/moat-dist
fi
for r in $(seq 1 "$rounds"); do
  order="release dist"
  [ $((r % 2)) -eq 0 ] && order="dist release"
  for p in $order; do
    bin=RELEASE_BIN; [ "$p" = dist ] && bin=DIST_BIN
    echo "round $r/$rounds: $p" >&2
    MOAT_BIN=${!bin} SYSTEMS=moat SCENARIOS=connrate,connrate_tls REPEAT=1 \
      WORKDIR="$work/$r-$p" OUT="$work/$r-$p.json" "$compare" >/dev/null 2>"$work/$r-$p.log"
  done
done
python3 - "$work" "$rounds" <<'PY'
import json, math, random, statistics, sys
work, rounds = sys.argv[1], int(sys.argv[2])
rows = {}
for r in range(1, rounds + 1):
    got = {p: {t["label"]: (t["unit"], t["values"].get("moat"))
               for t in json.load(open(f"{work}/{r}-{p}.json"))["table"]}
           for p in ("release", "dist")}
    for label, (unit, rel) in got["release"].items():
        dist = got["dist"][label][1]
        if rel and dist:
            rows.setdefault((label, unit), []).append((rel, dist))
def geomean(xs):
    return math.exp(statistics.mean(math.log(x) for x in xs))

random.seed(1)
print(f"{rounds} rounds; figures: medians; ratios release ÷ dist: median and geometric mean"
      " of the per-round ratios, and a bootstrap 95 % interval of the geometric mean\n")
print("| row | unit | release | dist | median ratio | geomean ratio | 95 % interval |")
print("|---|---|---|---|---|---|---|")
for (label, unit), pairs in rows.items():
    rel = statistics.median(p[0] for p in pairs)
    dist = statistics.median(p[1] for p in pairs)
    ratios = [p[0] / p[1] for p in pairs]
    boot = sorted(geomean(random.choices(ratios, k=len(ratios))) for _ in range(2000))
    lo, hi = boot[len(boot) // 40], boot[-len(boot) // 40 - 1]
    print(f"| {label} | {unit} | {rel:,.1f} | {dist:,.1f} | {statistics.median(ratios):.3f}"
          f" | {geomean(ratios):.3f} | {lo:.3f}–{hi:.3f} |")
PY
echo "raw results: $work" >&2
