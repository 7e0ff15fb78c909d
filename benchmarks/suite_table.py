"""Tables of RULER-style suite results from `dam eval -o` files: scores per task family and method, the measured
density, and how much of full attention's score each method keeps, prompt by prompt.

"Kept" for a method: over the prompts of a family, the sum of min(method's score, full's score) over the sum of
full's score (exact-match scores per prompt, partial for multi-value tasks). A method that also answers what
full attention misses gets no credit for it here; its family score shows it. Files may hold different methods
for the same prompts (a second run with other options): rows are matched by (length, task, seed), and a method
name can be renamed per file (`FILE:old=new`).

    python benchmarks/suite_table.py heldout-a-2048.json heldout-a-2048-previous.json:dam-options-dynamic=previous
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def load(spec: str) -> tuple[dict, dict]:
    """(scores[(length, task, seed)][method], density[method][length]) from one file spec."""
    path, _, renames = spec.partition(":")
    rename = dict(r.split("=", 1) for r in renames.split(",") if r)
    with open(path) as f:
        data = json.load(f)
    scores: dict = defaultdict(dict)
    for p in data["suite"]["prompts"]:
        for method, out in p["outputs"].items():
            scores[(p["length"], p["task"], p["seed"])][rename.get(method, method)] = float(out["score"])
    density = {rename.get(m, m): {int(k): v for k, v in d.items()} for m, d in data.get("density", {}).items()}
    return scores, density


def family(task: str) -> str:
    return "niah" if task.startswith("niah") else task


def table(specs: list[str]) -> str:
    scores: dict = defaultdict(dict)
    density: dict = defaultdict(dict)
    for spec in specs:
        s, d = load(spec)
        for key, per in s.items():
            scores[key].update(per)
        for m, per in d.items():
            density[m].update(per)
    methods = list(dict.fromkeys(m for per in scores.values() for m in per))
    lines = []
    for length in sorted({k[0] for k in scores}):
        keys = [k for k in scores if k[0] == length and "full" in scores[k]]
        fams = sorted({family(k[1]) for k in keys})
        lines += [f"### {length:,} tokens ({len(keys)} prompts)", "",
                  "| method | density | " + " | ".join(fams) + " | mean | kept of full |",
                  "|---" * (len(fams) + 4) + "|"]
        for m in methods:
            have = [k for k in keys if m in scores[k]]
            if not have:
                continue
            cells = []
            for fam in fams:
                fk = [k for k in have if family(k[1]) == fam]
                cells.append(f"{sum(scores[k][m] for k in fk) / len(fk):.2f}" if fk else "-")
            mean = sum(scores[k][m] for k in have) / len(have)
            full = sum(scores[k]["full"] for k in have)
            kept = sum(min(scores[k][m], scores[k]["full"]) for k in have)
            dens = density.get(m, {}).get(length)
            kept_cell = f"{100 * kept / full:.0f}% ({kept:.2f} of {full:.2f})" if full else "-"
            lines.append(f"| {m} | {'-' if dens is None else f'{100 * dens:.1f}%'} | " + " | ".join(cells)
                         + f" | {mean:.3f} | {kept_cell} |")
        lines.append("")
        lines.append("Kept of full per family: " + "; ".join(
            f"{m}: " + ", ".join(
                f"{fam} {100 * sum(min(scores[k][m], scores[k]['full']) for k in fk) / f:.0f}%"
                for fam in fams
                for fk in [[k for k in keys if family(k[1]) == fam and m in scores[k]]]
                for f in [sum(scores[k]["full"] for k in fk)] if f)
            for m in methods if m != "full" and any(m in scores[k] for k in keys)))
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", help="dam eval -o files, each optionally FILE:old=new,... to rename methods")
    print(table(ap.parse_args().files))


if __name__ == "__main__":
    main()
