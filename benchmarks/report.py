"""Collect ``benchmarks/results/*.json`` into ``docs/benchmarks.md`` (between the results markers; the text around
them is written by hand and kept).

    python benchmarks/report.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import table  # noqa: E402

DOC = HERE.parent / "docs" / "benchmarks.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def quality_section(path: Path) -> str:
    payload = json.loads(path.read_text())
    s = payload["settings"]
    budget = (f"{s['arch']}-{s['encoder']}, {s['image_size']}², {s['epochs']} epochs, batch {s['batch_size']}, "
              f"lr {s['lr']}, max train {s['max_train']}, seed {s['seed']}"
              + (f", noise rate {s['noise']}" if s.get("noise") is not None else "")
              + (f", {s['noise_fraction']:.0%} of the training masks corrupted (the others clean)"
                 if s.get("noise_fraction", 1.0) != 1.0 else "")
              + (f", trained on {s['tiles']}×{s['tiles']} tiles per image (image size = tile size), evaluated on "
                 f"{'whole images' if s.get('tile_eval') == 'images' else 'tiles'}" if s.get("tiles", 1) > 1 else ""))
    n = payload["rows"][0] if payload["rows"] else {}
    commands = list(dict.fromkeys(r.get("command", payload["command"]) for r in payload["rows"])) or \
        [payload["command"]]
    variants = [r for r in payload["rows"] if r.get("pseudo_variants")]
    extra = []
    for r in variants:
        extra += [f"Pseudo-masks of the trained `{r['regime']}` model with each CAM method and refinement (validation "
                  f"set, tags from its masks; mIoU over foreground classes with unlabelled pixels as background, "
                  f"precision of the labelled pixels, fraction labelled):", "",
                  "| CAM + refinement | pseudo mIoU | precision | coverage | seconds |", "|---|---|---|---|---|"]
        for name, v in r["pseudo_variants"].items():
            if "error" in v:
                extra.append(f"| {name} | error: {v['error'][:80]} | | | |")
            else:
                extra.append(f"| {name} | {v['pseudo_miou']:.3f} | {v['pseudo_precision']:.3f} | "
                             f"{v['pseudo_coverage']:.3f} | {v['seconds']} |")
        extra.append("")
    return "\n".join([
        f"### {path.stem}", "",
        *[line for c in commands for line in (f"`{c}`", "")],
        f"Budget: {budget}. Split: {n.get('n_train', '?')} train / {n.get('n_val', '?')} validation images. "
        f"Machine: {payload['machine']}; started {payload['started']}.", "",
        table(payload), "", *extra])


def speed_section(path: Path) -> str:
    payload = json.loads(path.read_text())
    meta = payload.get("meta", {})
    cmd = payload.get("command") or meta.get("command", "python benchmarks/speed.py")
    lines = [f"### {path.stem}", "", f"`{cmd}`", ""]
    if meta:
        lines += [", ".join(f"{k}: {v}" for k, v in meta.items() if k != "command"), ""]
    if isinstance(payload.get("rows"), list) and payload["rows"] and "what" in payload["rows"][0]:
        lines += ["| measurement | CPU time | wall | ratio (CPU) | target | met |", "|---|---|---|---|---|---|"]
        for r in payload["rows"]:
            ratio = r.get("ratio")
            ratio = f"{ratio:.2f}" if isinstance(ratio, (int, float)) else (ratio or "")
            met = {True: "yes", False: "**no**"}.get(r.get("ok"), "")
            lines.append(f"| {r['what']} | {r.get('cpu', '')} | {r.get('wall', '')} | {ratio} | "
                         f"{r.get('target', '')} | {met} |")
        lines.append("")
    elif "markdown" in payload:
        lines += [payload["markdown"], ""]
    else:
        lines += ["```json", json.dumps(payload, indent=1), "```", ""]
    return "\n".join(lines)


def main():
    results = sorted((HERE / "results").glob("*.json"))
    parts = []
    for p in results:
        payload = json.loads(p.read_text())
        parts.append(quality_section(p) if "settings" in payload else speed_section(p))
    body = "\n".join(parts) if parts else "_no results yet_\n"
    text = DOC.read_text() if DOC.exists() else f"# Benchmarks\n\n{START}\n{END}\n"
    if START not in text:
        text += f"\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1] if END in rest else ""
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(f"{head}{START}\n\n{body}\n{END}{tail}")
    print(f"wrote {DOC} ({len(results)} result files)")


if __name__ == "__main__":
    main()
