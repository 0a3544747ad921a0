"""Markdown table of one run of ``bench_inplace_abn.py`` (by default the latest), optionally into README.md.

Run (from the repository root)::

    python benchmarks/make_table.py                          # latest run_id in the default CSV
    python benchmarks/make_table.py --run-id 20250101T000000Z-abc1234
    python benchmarks/make_table.py --list                   # the run_ids in the CSV
    python benchmarks/make_table.py --readme README.md       # also rewrite the marked README section

With ``--readme`` the text between ``<!-- bench:start -->`` and ``<!-- bench:end -->`` is replaced (the
markers stay). A README without the markers, or a missing README, is left untouched and the table is
only printed.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CSV = REPO_ROOT / "benchmarks" / "results" / "bench_inplace_abn.csv"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
BASELINE = "BatchNorm2d+LeakyReLU(inplace)"

Row = dict[str, str]


def read_rows(path: Path) -> list[Row]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def runs(rows: list[Row]) -> OrderedDict[str, str]:
    """run_id -> date, oldest first."""
    seen: dict[str, str] = {}
    for r in rows:
        seen.setdefault(r["run_id"], r["date"])
    return OrderedDict(sorted(seen.items(), key=lambda kv: (kv[1], kv[0])))


def _f(x: str) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _ms(r: Row | None) -> str:
    if r is None:
        return "-"
    return f"{float(r['median_ms']):.3f} (x{float(r['ratio_vs_bn_inplace']):.2f})"


def render(rows: list[Row]) -> str:
    """Markdown for the rows of ONE run: a table per (shape, dtype, device), variant x threads."""
    first = rows[0]
    groups: OrderedDict[tuple[str, str, str], list[Row]] = OrderedDict()
    for r in rows:
        groups.setdefault((r["shape"], r["dtype"], r["device"]), []).append(r)
    has_peak = any(r.get("peak_bytes") for r in rows)
    out: list[str] = []
    for (shape, dtype, device), grp in groups.items():
        index = {(r["variant"], r["threads"], r["mode"]): r for r in grp}
        variants = list(OrderedDict.fromkeys(r["variant"] for r in grp))
        threads = sorted({r["threads"] for r in grp}, key=int)
        order = grp[0].get("order") or "flip"
        out.append(
            f"**{shape}, {dtype}, {device}, training step, {grp[0]['rounds']} interleaved rounds ({order} order)** - "
            f"median ms (ratio of medians vs {BASELINE})"
        )
        out.append("")
        head = ["variant", "threads", "fwd+bwd", "IQR fwd+bwd", "fwd", "bwd", "saved act.", "GB/s (8-pass)"]
        if has_peak:
            head.append("peak MiB")
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "|".join("---" for _ in head) + "|")
        for v in variants:
            for t in threads:
                full, fwd, bwd = (index.get((v, t, m)) for m in ("full", "fwd", "bwd"))
                any_row = full or fwd or bwd
                if any_row is None:
                    continue
                name = f"**{v}**" if v.startswith("InPlaceABN") else v
                iqr = f"{float(full['p25_ms']):.3f}-{float(full['p75_ms']):.3f}" if full else "-"
                cells = [
                    name,
                    t,
                    _ms(full),
                    iqr,
                    _ms(fwd),
                    _ms(bwd),
                    f"{float(any_row['saved_activations']):.2f}",
                    f"{float(full['gbps_8pass']):.1f}" if full and full["gbps_8pass"] else "-",
                ]
                if has_peak:
                    pk = _f(any_row.get("peak_bytes", ""))
                    cells.append(f"{pk / 2**20:.1f}" if pk is not None else "-")
                out.append("| " + " | ".join(cells) + " |")
        out.append("")
    out.append(
        f"run `{first['run_id']}` on {first['machine']}, torch {first['torch_version']}, git `{first['git_rev']}`, "
        f"{first['date']}. saved act. = bytes kept for backward "
        "/ input bytes (parameters excluded); GB/s = 8 * input bytes / median fwd+bwd time."
    )
    return "\n".join(out) + "\n"


def update_readme(readme: Path, table: str) -> bool:
    """Replaces the text between the markers; False (file untouched) when the file or markers are absent."""
    if not readme.is_file():
        print(f"[make_table] {readme} not found: table printed only", file=sys.stderr)
        return False
    text = readme.read_text()
    start, end = text.find(START), text.find(END)
    if start < 0 or end < 0 or end < start:
        print(f"[make_table] {readme} has no {START} ... {END} section: table printed only", file=sys.stderr)
        return False
    new = text[: start + len(START)] + "\n" + table + text[end:]
    if new != text:
        readme.write_text(new)
    print(f"[make_table] updated {readme}", file=sys.stderr)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV, help="results CSV (default %(default)s)")
    parser.add_argument("--run-id", default=None, help="run to show (default: the latest by date)")
    parser.add_argument("--list", action="store_true", help="list run_ids and exit")
    parser.add_argument("--readme", type=Path, default=None, help="rewrite the bench section of this README")
    args = parser.parse_args(argv)

    if not args.csv.is_file():
        parser.error(f"{args.csv} not found; run benchmarks/bench_inplace_abn.py first")
    rows = read_rows(args.csv)
    if not rows:
        parser.error(f"{args.csv} has no rows")
    all_runs = runs(rows)
    if args.list:
        for rid, date in all_runs.items():
            n = sum(1 for r in rows if r["run_id"] == rid)
            print(f"{rid}  {date}  {n} rows")
        return 0
    run_id = args.run_id or next(reversed(all_runs))
    selected = [r for r in rows if r["run_id"] == run_id]
    if not selected:
        parser.error(f"run_id {run_id!r} not in {args.csv} (see --list)")
    table = render(selected)
    print(table)
    if args.readme is not None:
        update_readme(args.readme, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
