"""Writing an explanation into an output folder: report.md, CSV tables, JSON, the forest plot, the β-VAE's
figure, labels.

Every file is written atomically (`phenotwin.io`), and the folder's manifest
(`.phenotwin-manifest.json`, the format `phenotwin.checkpoint.owned_entries` reads) lists what
phenotwin wrote there: `--overwrite` replaces those entries and nothing else, so a user's own
notes in the folder, or a file of theirs that happens to be called report.md, survive.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from phenotwin import output_folder
from phenotwin.checkpoint import MANIFEST_FILE, owned_entries
from phenotwin.explain.models import CNN
from phenotwin.explain.pipeline import Explanation
from phenotwin.explain.vae import ACTIVE_KL
from phenotwin.io import prepare_folder, safe_name, write_csv, write_json, write_text, write_tiff, writing_into

REPORT, FEATURES_CSV, EFFECTS_CSV, MODELS_CSV, RECORD = "report.md", "features.csv", "effects.csv", "models.csv", "explain.json"
FOREST, VAE_FIGURE, LABELS = "forest.png", "vae.png", "labels"
ENTRIES = (REPORT, FEATURES_CSV, EFFECTS_CSV, MODELS_CSV, RECORD, FOREST, VAE_FIGURE, LABELS, MANIFEST_FILE)
EFFECT_COLUMNS = ["comparison", "rank", "feature", "words", "unit", "cells_before", "cells_after", "before", "after",
                  "difference", "difference_low", "difference_high", "relative", "relative_low", "relative_high",
                  "standardised", "standardised_low", "standardised_high"]


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, to replace what phenotwin did not write (or anything, without --overwrite)."""
    output_folder.check_output(out, ENTRIES, overwrite)


def _effect_rows(effects, comparison: str) -> list[dict[str, Any]]:
    return [{"comparison": comparison, "rank": rank, "feature": e.key, "words": e.words, "unit": e.unit,
             "cells_before": e.n_before, "cells_after": e.n_after, "before": e.before, "after": e.after,
             "difference": e.difference, "difference_low": e.difference_ci[0], "difference_high": e.difference_ci[1],
             "relative": e.relative, "relative_low": e.relative_ci[0], "relative_high": e.relative_ci[1],
             "standardised": e.standardised, "standardised_low": e.standardised_ci[0],
             "standardised_high": e.standardised_ci[1]} for rank, e in enumerate(effects, start=1)]


def write_explanation(result: Explanation, out: Path, overwrite: bool = False, command: str = "",
                      seconds: float | None = None, cpu_seconds: float | None = None) -> Path:
    """Write everything into `out` (see the module docstring); returns the report's path."""
    out = Path(out)
    check_output(out, overwrite)
    prepare_folder(out, "--out")
    source, target = result.conditions
    written = []
    with writing_into(out):
        if (out / LABELS).is_dir() and LABELS in owned_entries(out):
            shutil.rmtree(out / LABELS)  # phenotwin's own segmentation of an earlier run
        segmented = [s for s in result.samples if s.segmented]
        for sample in segmented:
            write_tiff(out / LABELS / safe_name(sample.condition) / f"{sample.path.stem}.tif",
                       sample.labels.astype(np.uint16 if sample.labels.max() < 65536 else np.uint32), "YX",
                       {"labels_of": str(sample.path), "made_by": "phenotwin explain (segment_cells)"})
        if segmented:
            written.append(LABELS)
        rows = [r for s in [*result.samples, *result.translated] for r in s.rows]
        columns = ["condition", "image", "label", "centroid_y", "centroid_x", *[f.key for f in result.features]]
        written.append(write_csv(out / FEATURES_CSV, columns, rows).name)
        effect_rows = []
        if result.paired is not None:
            effect_rows += _effect_rows(result.paired, f"{target} (translated) vs {source}, same cells")
        if result.between is not None:
            effect_rows += _effect_rows(result.between, f"{target} vs {source}, real cells")
        written.append(write_csv(out / EFFECTS_CSV, EFFECT_COLUMNS, effect_rows).name)
        models = [m.to_dict() for m in result.models]
        written.append(write_csv(out / MODELS_CSV, ["name", "accuracy", "relative_to_black_box", "relative_to_cnn",
                                                    "n_features", "terms", "features", "formula"],
                                 [{**m, "features": " ".join(m["features"])} for m in models]).name)
        main = result.paired if result.paired is not None else result.between
        if main:
            from phenotwin.explain.effects import forest_plot

            title = (f"{source} -> {target}: translation vs source" if result.paired is not None
                     else f"{target} vs {source} (real cells)")
            labels = ((f"translation vs {source}, same cells", "real cells") if result.paired is not None
                      else ("real cells", ""))
            forest_plot(out / FOREST, main, reference=result.between if result.paired is not None else None,
                        labels=labels, title=title)
            written.append(FOREST)
        if result.vae is not None:
            from phenotwin.explain.vae import vae_figure

            vae_figure(out / VAE_FIGURE, result.vae)
            written.append(VAE_FIGURE)
        record = {"conditions": {"source": source, "target": target}, "command": command, "seconds": seconds,
              "cpu_seconds": cpu_seconds,
                  "images": {c: sum(1 for s in result.samples if s.condition == c) for c in (source, target)},
                  "translations": len(result.translated), "segmented_here": len(segmented),
                  "cells": {c: sum(len(s.rows) for s in result.samples if s.condition == c) for c in (source, target)},
                  "translated_cells": sum(len(s.rows) for s in result.translated),
                  "paired": [e.to_dict() for e in result.paired or []],
                  "between": [e.to_dict() for e in result.between or []],
                  "agreement": result.agreement, "models": models, "notes": result.notes,
                  "vae": result.vae.to_dict() if result.vae is not None else None}
        written.append(write_json(out / RECORD, record).name)
        written.append(write_text(out / REPORT, report_markdown(result, record)).name)
        output_folder.record_written(out, written)
    return out / REPORT


def _table(effects, top: int) -> list[str]:
    lines = ["| rank | feature | before | after | change [95% CI] | relative [95% CI] | standardised [95% CI] |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for rank, e in enumerate(effects[:top], start=1):
        relative = (f"{100 * e.relative:+.0f}% [{100 * e.relative_ci[0]:.0f}, {100 * e.relative_ci[1]:.0f}]"
                    if math.isfinite(e.relative) else "–")
        lines.append(f"| {rank} | {e.words} ({e.unit}) | {e.before:.3g} | {e.after:.3g} | {e.difference:+.3g} "
                     f"[{e.difference_ci[0]:.3g}, {e.difference_ci[1]:.3g}] | {relative} | {e.standardised:+.2f} "
                     f"[{e.standardised_ci[0]:.2f}, {e.standardised_ci[1]:.2f}] |")
    return lines


def _ratio(value: float) -> str:
    return f"{value:.2f}" if math.isfinite(value) else "–"


def report_markdown(result: Explanation, record: dict[str, Any], top: int = 10) -> str:
    source, target = result.conditions
    lines = [f"# What changed: {source} -> {target}", "",
             f"Images: {record['images'][source]} {source}, {record['images'][target]} {target}, "
             f"{record['translations']} translation(s). Cells: {record['cells'][source]} {source}, "
             f"{record['cells'][target]} {target}, {record['translated_cells']} translated."]
    if record["segmented_here"]:
        lines += ["", f"{record['segmented_here']} image(s) were segmented here (no labels given): check the cells in "
                  f"`{LABELS}/` (open them as Labels layers), correct them if needed and rerun with --labels."]
    if result.paired is not None:
        lines += ["", f"## The translation: the same cells, {target} (translated) against {source}", "",
                  *[f"- {e.text()}" for e in result.paired[:5]], "", *_table(result.paired, top)]
    if result.between is not None:
        lines += ["", f"## Real cells: {target} against {source}", "",
                  *[f"- {e.text()}" for e in result.between[:5]], "", *_table(result.between, top)]
    if result.agreement is not None:
        a = result.agreement
        lines += ["", "## Does the translation change what really differs?", "",
                  f"Spearman rank correlation of the standardised effects over {a['features']} features: "
                  f"**{a['spearman']:.2f}**; the translation moves in the real direction in "
                  f"{100 * a['sign_agreement']:.0f}% of the {a['clear_real_differences']} features that clearly differ "
                  "between the real conditions (interval excludes 0)."]
    if result.models:
        lines += ["", f"## What tells {source} from {target} (held-out cells)", "",
                  "| model | held-out accuracy | of the random forest | of the CNN | features | terms |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {m.name} | {m.accuracy:.3f} | {_ratio(m.relative_to_black_box)} | {_ratio(m.relative_to_cnn)} | "
                  f"{m.n_features} | {m.terms} |" for m in result.models]
        if any(m.kind == CNN for m in result.models):
            lines += ["", "Two black boxes: the random forest sees the features the sparse model and the formula "
                      "choose from; the CNN (the classifier of `phenotwin evaluate`) sees the cells' pixels, as the "
                      "β-VAE does. For the CNN, features are its input values (channels × pixels) and terms its "
                      "parameters."]
        lines += [""] + [f"- {m.name}: `{m.formula}`" for m in result.models if m.formula]
    if result.vae is not None:
        v = record["vae"]
        informative = (f"{len(v['active_factors'])} factor(s) carry information (KL ≥ {ACTIVE_KL:g} nats: "
                       f"{', '.join(v['active_factors'])}), the only ones the sparse model may use"
                       if result.vae.kl.max() >= ACTIVE_KL else
                       f"no factor carries information (KL ≥ {ACTIVE_KL:g} nats): the β-VAE learned little of these "
                       "cells, so its sparse model means little")
        lines += ["", "## β-VAE of the cell crops", "",
                  f"{v['latent_dims']} latent factors, β = {v['beta']:g}, {v['crop_size']} px crops, {v['steps']} "
                  f"training steps on the training cells ({v['cpu_seconds']:.0f} s of CPU); {informative}. "
                  f"`{VAE_FIGURE}`: held-out cells and their reconstructions, then each factor varied from −2.5 to "
                  "+2.5 s.d. (of the cells' latent means) with the others at the cells' mean, most informative first."]
    lines += [f"\nNote: {note}" for note in result.notes]
    if record.get("seconds") is not None:
        cpu = f" ({record['cpu_seconds']:.0f} s of CPU)" if record.get("cpu_seconds") is not None else ""
        lines += ["", f"Run time: {record['seconds']:.0f} s{cpu}. Command: `{record['command']}`"]
    figures = f"{FOREST}, {VAE_FIGURE}" if result.vae is not None else FOREST
    lines += ["", f"Files: {FEATURES_CSV} (one row per cell), {EFFECTS_CSV}, {MODELS_CSV}, {RECORD}, {figures}.", ""]
    return "\n".join(lines)
