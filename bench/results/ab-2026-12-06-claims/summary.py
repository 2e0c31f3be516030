"""Summary of the A/B runs in this directory (after-3 failed: its rings ran dry, see
after-3.log). Run from this directory."""
import json
import os
import statistics as st

rows: dict[str, list[dict]] = {}
for v in ("before", "after"):
    for r in (1, 2, 3):
        if not os.path.exists(f"{v}-{r}.json"):
            continue
        with open(f"{v}-{r}.json") as fh:
            d = json.load(fh)
        rows.setdefault(v, []).append(d)
        pts = {p["path"]: p for p in d["points"]}
        runs = ", ".join(f"{x:.2f}" for x in pts["direct"]["runs_gbps"])
        print(f"{v} {r}: direct {d['direct_gbps']:.2f} (runs {runs}) / ceiling "
              f"{d['ceiling_direct_gbps']:.1f} = {d['ratio_direct_vs_ceiling']:.3f}; relay "
              f"{d['relay_gbps']:.2f} / {d['ceiling_relay_gbps']:.1f} = "
              f"{d['ratio_relay_vs_ceiling']:.3f}")
for k in ("direct_gbps", "relay_gbps", "ratio_direct_vs_ceiling", "ratio_relay_vs_ceiling"):
    b = st.median(d[k] for d in rows["before"])
    a = st.median(d[k] for d in rows["after"])
    print(f"{k}: before {b:.3f} after {a:.3f} after/before {a / b:.2f}")
