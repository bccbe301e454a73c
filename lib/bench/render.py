"""The benchmarks' results rendered into docs/benchmarks.md: a section per device, between markers, from the JSON
files in docs/benchmarks/."""

from __future__ import annotations

import json
from pathlib import Path

from lib import ROOT
from lib.bench.cases import GOALS

DOC = ROOT / "docs" / "benchmarks.md"
NEXT = "<!-- bench:next -->"  # in DOC: where sections of devices not yet there are inserted


def load_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def write_outputs(data: dict, json_path: Path, doc: Path, section: str) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    update_doc(doc, section, render(data, json_path))


def update_doc(doc: Path, section: str, text: str) -> None:
    """Replace this device's section between its markers in docs/benchmarks.md (others' sections untouched)."""
    start, end = f"<!-- bench:{section} -->", f"<!-- /bench:{section} -->"
    body = f"{start}\n{text.rstrip()}\n{end}"
    current = doc.read_text() if doc.is_file() else "# Benchmarks\n"
    if start in current and end in current:
        before, rest = current.split(start, 1)
        new = before + body + rest.split(end, 1)[1]
    elif NEXT in current:  # a new device's section goes where the doc keeps them
        new = current.replace(NEXT, body + "\n\n" + NEXT, 1)
    else:
        new = current.rstrip() + "\n\n" + body + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(new)


def render_all(out: Path, doc: Path) -> dict:
    """Each section from its newest JSON file (<date>-<section>.json)."""
    newest: dict[str, Path] = {}
    for path in sorted(out.glob("????-??-??-*.json")):
        newest[path.stem[11:]] = path
    for section, path in newest.items():
        update_doc(doc, section, render(load_json(path), path))
        print(f"{doc}: section {section} from {path}")
    return {section: str(path) for section, path in newest.items()}


def fmt_ms(v) -> str:
    return "-" if v is None else f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def render(data: dict, json_path: Path) -> str:
    """One run's section: its heading and environment, then what it measured."""
    info = data["info"]
    rel = json_path.relative_to(ROOT) if json_path.is_relative_to(ROOT) else json_path
    kind = "Tiny-model smoke" if data.get("tiny") else "Image encoding" if data.get("encode") else "Full-size models"
    lines = [
        f"#### {kind}: {info['device']}, {info['date']}",
        "",
        f"{data.get('dtype', '')}; torch {info['torch']}"
        + (f" (CUDA {info.get('cuda')}, cuDNN {info.get('cudnn')})" if info.get("cuda") else "")
        + f", diffusers {info['diffusers']}, transformers {info['transformers']}, Pillow {info['pillow']}, "
        f"Python {info['python']}; CPU {info['cpu']} ({info['cpu_count']} cores, {info['torch_threads']} torch "
        f"threads; load average {info.get('loadavg_at_start', ['?'])[0]} at the start). Raw figures: `{rel}`.",
        "",
    ]
    if data.get("note"):
        lines += [data["note"], ""]
    if data.get("results"):
        lines += goal_rows(data["results"], info) + result_rows(data["results"])
    if data.get("tiny"):
        lines += tiny_rows(data["tiny"])
    if data.get("encode"):
        lines += encode_rows(data["encode"], info)
    return "\n".join(lines)


def goal_rows(results: dict, info: dict) -> list[str]:
    rows = []
    for g in GOALS:
        cands = [
            r
            for r in results.values()
            if "error" not in r and all(r[k] == g[k] for k in ("mode", "size", "steps", "batch", "fast_decode"))
        ]
        if not cands:
            continue
        if "goal_ms" in g:
            best = min(cands, key=lambda r: r["e2e_ms"]["p50"])
            ours, ok = f"{fmt_ms(best['e2e_ms']['p50'])} ms", best["e2e_ms"]["p50"] <= g["goal_ms"]
            goal = f"<= {g['goal_ms']} ms"
        else:
            best = max(cands, key=lambda r: r["images_per_s"])
            ours, ok = f"{best['images_per_s']:.0f} images/s", best["images_per_s"] >= g["goal_images_per_s"]
            goal = f">= {g['goal_images_per_s']} images/s"
        met = ("yes" if ok else "no") if "H100" in info["device"] else "- (goal is for an H100)"
        rows.append(f"| {g['name']} | {goal} | {ours} ({best['variant']}) | {met} | {g['anchor']} |")
    if not rows:
        return []
    return [
        "Goals (end to end inside Engine.run, batch 1 unless said; best variant):",
        "",
        "| case | goal | ours (variant) | met | anchor |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]


def result_rows(results: dict) -> list[str]:
    lines = [
        "| mode | variant | size | steps | images | decode | e2e p50 ms | p95 ms | images/s | text ms | "
        "step ms | decode ms | safety ms | encode ms | peak GB | setup s (build + apply + warm-up) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results.values():
        head = (
            f"| {r['mode']} | {r['variant']} | {r['size']} | {r['steps']} | {r['batch']} | "
            f"{'TAESD' if r['fast_decode'] else 'VAE'} |"
        )
        if "error" in r:
            lines.append(head + f" failed: {r['error'].splitlines()[0][:80]} |" + " |" * 9)
            continue
        s, setup = r["stages_ms"], r.get("setup", {})
        lines.append(
            head + f" {fmt_ms(r['e2e_ms']['p50'])} | {fmt_ms(r['e2e_ms']['p95'])} | "
            f"{r['images_per_s']:.2f} | {fmt_ms(s['text_encoding'])} | "
            f"{' / '.join(fmt_ms(x) for x in s['steps'])} | {fmt_ms(s['vae_decode'])} | "
            f"{fmt_ms(s.get('safety_checker'))} | {fmt_ms(s['image_encoding'])} | {r['peak_memory_gb']} | "
            f"{setup.get('build_s', 0):.1f} + {setup.get('apply_s', 0):.1f} + "
            f"{setup.get('warmup_s', 0):.1f} |"
        )
    lines.append("")
    attention = next((r["speed"]["attention"] for r in reversed(list(results.values())) if r.get("speed")), None)
    if attention:
        lines += [f"Attention as run (default variant): `{json.dumps(attention)}`", ""]
    return lines


def tiny_rows(tiny: dict) -> list[str]:
    lines = [
        "Tiny-model smoke (CPU, fp32): predict() end to end vs the same pipeline called bare in the same "
        "process (`--tiny`; goal <= 1.10x):",
        "",
        "| mode | size | runs | predict() ms (fastest / p50) | bare call ms | ratio | bare call + save ms | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, t in tiny.items():
        lines.append(
            f"| {mode} | {t['size']} | {t['iters']} | {fmt_ms(t['predict_ms']['min'])} / "
            f"{fmt_ms(t['predict_ms']['p50'])} | {fmt_ms(t['bare_ms']['min'])} / "
            f"{fmt_ms(t['bare_ms']['p50'])} | {t['ratio_vs_bare']:.2f}x | "
            f"{fmt_ms(t['bare_save_ms']['min'])} / {fmt_ms(t['bare_save_ms']['p50'])} | "
            f"{t['ratio_vs_bare_save']:.2f}x |"
        )
    return lines + [
        "",
        "Ratios compare the fastest runs (load from other processes only adds time). The bare call is "
        "`pipe(prompt, ...)` on the engine's own pipeline (PIL image out); `+ save` also writes the file "
        "with Pillow's defaults. Both sides run without the safety checker (SAFETY_CHECKER=0).",
        "",
    ]


def encode_rows(e: dict, info: dict) -> list[str]:
    lines = [
        f"Image encoding, 512x512 ({e['image']}), Pillow {info['pillow']}, one thread:",
        "",
        "| setting | ms | bytes | PSNR dB |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['setting']} | {r['ms']} | {r['bytes']} | {r['psnr_db']} |" for r in e["rows"]]
    return lines + [
        "",
        "12 images, webp q80 method 0, by encoder threads (ms): "
        + ", ".join(f"{n}: {ms}" for n, ms in e["webp_m0_12_images_ms_by_threads"].items()),
        "",
    ]
