"""Plots of scripts/bench.sh's CSV files: scripts/plot.py <csv dir> <png dir>.

stores.png  the store matrix: idem, the hand loop and the store's own tool
sweep.png   throughput and p50/p99 latency against concurrency and batch size
soak.png    resident memory over a million messages, TTL purge running
brokers.png end to end per broker (when brokers.csv exists)
"""

import csv
import os
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst, exist_ok=True)
COLORS = {"idem": "#1f77b4", "hand": "#ff7f0e", "pgbench": "#2ca02c",
          "redis-benchmark": "#2ca02c", "mysqlslap": "#2ca02c", "raw": "#ff7f0e"}


def rows(name):
    path = os.path.join(src, name)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def save(fig, name):
    fig.tight_layout()
    fig.savefig(os.path.join(dst, name), dpi=72)
    plt.close(fig)
    print("wrote", os.path.join(dst, name))


def stores():
    data = [r for r in rows("stores.csv") if r["bench"] == "matrix"]
    if not data:
        return
    modes = ["single", "item", "vec"]
    titles = {"single": "single (16 in flight)", "item": "per-item batch (64)",
              "vec": "batch handler (64)"}
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
    for ax, mode in zip(axes, modes):
        sel = [r for r in data if r["mode"] == mode]
        store_names = list(dict.fromkeys(r["store"] for r in sel))
        impls = ["idem", "hand", "native"]
        width = 0.27
        for k, impl in enumerate(impls):
            xs, ys, cs = [], [], []
            for i, s in enumerate(store_names):
                for r in sel:
                    if r["store"] != s:
                        continue
                    kind = r["impl"] if r["impl"] in ("idem", "hand") else "native"
                    if kind == impl:
                        xs.append(i + (k - 1) * width)
                        ys.append(float(r["msg_per_s"]))
                        cs.append(COLORS.get(r["impl"], "#2ca02c"))
            ax.bar(xs, ys, width, color=cs,
                   label={"idem": "idem", "hand": "hand-written loop",
                          "native": "store's own tool"}[impl])
        ax.set_xticks(range(len(store_names)), store_names)
        ax.set_yscale("log")
        ax.set_title(titles[mode])
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("messages/s (log)")
    axes[0].legend(fontsize=8)
    save(fig, "stores.png")


def sweep():
    data = [r for r in rows("stores.csv") if r["bench"] == "sweep"]
    if not data:
        return
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for col, (mode, x, label) in enumerate(
            [("single", "concurrency", "concurrency (single)"),
             ("vec", "batch", "batch size (batch handler)")]):
        series = defaultdict(list)
        for r in data:
            if r["mode"] == mode:
                series[(r["store"], r["impl"])].append(r)
        palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for k, ((store, impl), rs) in enumerate(sorted(series.items())):
            rs.sort(key=lambda r: int(r[x]))
            xs = [int(r[x]) for r in rs]
            color = palette[k % len(palette)]
            style = "-" if impl == "idem" else ("--" if impl == "hand" else ":")
            axes[0][col].plot(xs, [float(r["msg_per_s"]) for r in rs], style, color=color,
                              marker="o", label=f"{store} {impl}")
            if impl in ("idem", "hand"):
                axes[1][col].plot(xs, [float(r["p50_ms"]) for r in rs], "-", color=color,
                                  marker="o", label=f"{store} {impl} p50")
                axes[1][col].plot(xs, [float(r["p99_ms"]) for r in rs], ":", color=color,
                                  marker="x", label=f"{store} {impl} p99")
        for row in (0, 1):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(label)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        axes[0][col].set_ylabel("messages/s")
        axes[1][col].set_ylabel("latency per message, ms (fetch→ack)")
    save(fig, "sweep.png")


def soak():
    data = rows("soak.csv")
    if not data:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for store in dict.fromkeys(r["store"] for r in data):
        rs = [r for r in data if r["store"] == store]
        xs = [int(r["settled"]) / 1000 for r in rs]
        ax.plot(xs, [int(r["vm_rss_kib"]) / 1024 for r in rs], "-", label=f"{store} VmRSS")
        ax.plot(xs, [int(r["vm_hwm_kib"]) / 1024 for r in rs], "--", label=f"{store} VmHWM (peak)")
    for m in (100, 500, 1000):
        ax.axvline(m, color="grey", alpha=0.3)
    ax.set_xlabel("messages settled (thousands)")
    ax.set_ylabel("MiB")
    ax.set_ylim(bottom=0)
    ax.set_title("soak: 1M messages, ttl 100 ms, purge every 50 ms")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "soak.png")


def brokers():
    data = rows("brokers.csv")
    if not data:
        return
    fig, ax = plt.subplots(figsize=(11, 4))
    label = lambda r: f"{r['broker']}\n{r['mode']}"
    series = lambda r: r["impl"] if r["impl"] != "idem" else f"idem → {r['store']}"
    labels = list(dict.fromkeys(label(r) for r in data))
    names = list(dict.fromkeys(series(r) for r in data))
    width = 0.8 / max(len(names), 1)
    for k, name in enumerate(names):
        xs, ys = [], []
        for i, lab in enumerate(labels):
            for r in data:
                if label(r) == lab and series(r) == name:
                    xs.append(i + (k - (len(names) - 1) / 2) * width)
                    ys.append(float(r["msg_per_s"]))
        ax.bar(xs, ys, width, label=name)
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylabel("messages/s (log)")
    ax.set_yscale("log")
    ax.set_title("end to end: backlog in the broker → effects committed and acked")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "brokers.png")


stores()
sweep()
soak()
brokers()


def targets(st, br):
    """The issue's targets, as ratios of figures from this run."""
    def rate(bench, store, mode, impl, c=None, b=None):
        for r in st:
            if (r["bench"], r["store"], r["mode"], r["impl"]) == (bench, store, mode, impl) \
                    and (c is None or r["concurrency"] == str(c)) and (b is None or r["batch"] == str(b)):
                return float(r["msg_per_s"])
        return 0.0
    out = ["### Targets (ratios from this run)\n",
           "| target | figures | ratio | met |", "|---|---|--:|---|"]
    pgb = rate("matrix", "postgres", "vec", "pgbench", 64, 64)
    for mode, need, label in (("vec", 0.5, "PostgreSQL batch handler ≥ 0.5 × pgbench batched (64, 1 client)"),
                              ("item", 0.25, "PostgreSQL per-item batch ≥ 0.25 × pgbench batched (64, 1 client)")):
        i = rate("matrix", "postgres", mode, "idem", 64, 64)
        if i and pgb:
            out.append(f"| {label} | {i:,.0f} vs {pgb:,.0f} | {i / pgb:.2f} | {'yes' if i / pgb >= need else 'NO'} |")
    for broker in dict.fromkeys(r["broker"] for r in br):
        get = lambda store, impl: next((float(r["msg_per_s"]) for r in br if r["broker"] == broker and r["mode"] == "batch" and r["store"] == store and r["impl"] == impl), 0)
        # bench_brokers' own raw loop and pgbench (same process, right after
        # the stage); else the hand loop through idem's adapter and the store
        # matrix's pgbench.
        pg, lim = get("PostgreSQL", "idem"), get("none", "raw")
        loop = "raw loop" if lim else "hand loop"
        lim = lim or get("none", "hand")
        pgbb = get("PostgreSQL", "pgbench") or pgb
        if pg and lim and pgbb:
            floor = min(lim, pgbb)
            out.append(f"| {broker} → PostgreSQL, batch ≥ 0.5 × min({loop} {lim:,.0f}, pgbench batched {pgbb:,.0f}) | {pg:,.0f} vs {floor:,.0f} | {pg / floor:.2f} | {'yes' if pg / floor >= 0.5 else 'NO'} |")
    out.append("")
    return out


def tables():
    """Markdown tables of the CSVs, for docs/PERFORMANCE.md: <csv dir>/tables.md."""
    out = []
    st = rows("stores.csv")
    if st:
        def table(bench, title):
            sel = [r for r in st if r["bench"] == bench]
            if not sel:
                return
            out.append(f"### {title}\n")
            out.append("| store | mode | concurrency | batch | idem msg/s | p50 / p99 ms | hand msg/s | p50 / p99 ms | idem / hand | store's tool msg/s | idem / tool |")
            out.append("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
            keyf = lambda r: (r["store"], r["mode"], r["concurrency"], r["batch"])
            groups = {}
            for r in sel:
                groups.setdefault(keyf(r), {})[r["impl"]] = r
            for (store, mode, c, b), g in groups.items():
                i, h = g.get("idem"), g.get("hand")
                tool = next((v for k, v in g.items() if k not in ("idem", "hand")), None)
                ir = float(i["msg_per_s"]) if i else 0
                hr = float(h["msg_per_s"]) if h else 0
                tr = float(tool["msg_per_s"]) if tool else 0
                out.append(
                    f"| {store} | {mode} | {c} | {b} | {ir:,.0f} | {i['p50_ms']} / {i['p99_ms']} | "
                    f"{hr:,.0f} | {h['p50_ms']} / {h['p99_ms']} | {ir / hr if hr else 0:.2f} | "
                    + (f"{tr:,.0f} ({tool['impl']}) | {ir / tr:.2f} |" if tool else "– | – |"))
            out.append("")
        table("matrix", "Store matrix")
        table("sweep", "Sweep: concurrency (single) and batch size (batch handler)")
        table("peer", "Serial (the Python peer's shape)")
    br = rows("brokers.csv")
    if br:
        out.append("### End to end through the brokers\n")
        out.append("| broker | mode | idem → SQLite | idem → PostgreSQL | hand loop (no store) | idem→PG / hand | raw loop (client crate) | pgbench batched |")
        out.append("|---|---|--:|--:|--:|--:|--:|--:|")
        for broker in dict.fromkeys(r["broker"] for r in br):
            for mode in ("single", "batch"):
                get = lambda store, impl: next((float(r["msg_per_s"]) for r in br if r["broker"] == broker and r["mode"] == mode and r["store"] == store and r["impl"] == impl), 0)
                sq, pg, hd = get("SQLite", "idem"), get("PostgreSQL", "idem"), get("none", "hand")
                raw, pgb = get("none", "raw"), get("PostgreSQL", "pgbench")
                opt = lambda v: f"{v:,.0f}" if v else "–"
                out.append(f"| {broker} | {mode} | {opt(sq)} | {pg:,.0f} | {hd:,.0f} | {pg / hd if hd else 0:.2f} | {opt(raw)} | {opt(pgb)} |")
        out.append("")
    sk = rows("soak.csv")
    if sk:
        out.append("### Soak\n")
        out.append("| store | settled | seconds | VmRSS MiB | VmHWM MiB | purged |")
        out.append("|---|--:|--:|--:|--:|--:|")
        for store in dict.fromkeys(r["store"] for r in sk):
            rs = [r for r in sk if r["store"] == store]
            marked = [next((r for r in rs if int(r["settled"]) >= m), None)
                      for m in (100_000, 500_000, 1_000_000)]
            for r in marked:
                if r:
                    out.append(f"| {r['store']} | {int(r['settled']):,} | {r['seconds']} | {int(r['vm_rss_kib']) / 1024:.1f} | {int(r['vm_hwm_kib']) / 1024:.1f} | {int(r['purged']):,} |")
            if marked[0] and marked[-1]:
                g = int(marked[-1]["vm_hwm_kib"]) / int(marked[0]["vm_hwm_kib"]) - 1
                out.append(f"| {store}: peak growth 100k → 1M | | | | {g:+.1%} | |")
        out.append("")
    pt = rows("powertools.csv")
    if pt:
        out.append("### Powertools (Python) on Redis, serial\n")
        out.append("| impl | kind | messages | msg/s |")
        out.append("|---|---|--:|--:|")
        for r in pt:
            out.append(f"| {r['impl']} | {r['kind']} | {r['messages']} | {float(r['msg_per_s']):,.0f} |")
        out.append("")
    out.extend(targets(st, br))
    with open(os.path.join(src, "tables.md"), "w") as f:
        f.write("\n".join(out))
    print("wrote", os.path.join(src, "tables.md"))


tables()
