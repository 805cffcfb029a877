"""Plots, plain-language verdicts and report files for evaluation results.

Drawing functions take a matplotlib `Figure`, so the CLI saves them (Agg, no pyplot) and the
napari widget shows the very same plots on a Qt canvas.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from phenotwin.io import write_json, write_png_figure, write_text


def public(result: dict) -> dict:
    """The result without the arrays kept for figures (keys starting with '_'), NaN and
    infinities as null so that any JSON reader accepts the file."""

    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if not str(k).startswith("_")}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, float) and not np.isfinite(value):
            return None
        return value

    return clean(result)


def _finite(values) -> list[float]:
    return [v for v in values if v is not None and np.isfinite(v)]


# -- memorisation ---------------------------------------------------------------------


def draw_memorization(figure, result: dict) -> None:
    """Phen-LDiff Fig. 4: histograms of A-vs-B similarity and of nearest-training similarity."""
    ax = figure.subplots(1, 1)
    bins = np.asarray(result["a_vs_b"]["histogram"]["edges"])
    series = [("model A vs model B, same noise", "a_vs_b", "tab:blue"),
              ("generation vs nearest training image", "nearest_train", "tab:red"),
              ("held-out real image vs nearest training image", "held_out_to_train", "tab:gray")]
    for label, key, colour in series:
        if result.get(key):
            ax.hist(result[key]["values"], bins=bins, density=True, alpha=0.6, color=colour,
                    label=f"{label} (median {result[key]['median']:.2f})")
    ax.set_xlabel("cosine similarity (channel means removed)", fontsize=8)
    ax.set_ylabel("density (series differ in size)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(f"verdict: {result['verdict']}", fontsize=9)


def write_memorization(result: dict, out) -> dict[str, Path]:
    """memorization.png, memorization-examples.png and memorization.json in `out`."""
    from matplotlib.figure import Figure

    from phenotwin.montage import save_montage

    out = Path(out)
    figure = Figure(figsize=(6, 3.4), tight_layout=True)
    draw_memorization(figure, result)
    files = {"plot": write_png_figure(out / "memorization.png", figure),
             "json": write_json(out / "memorization.json", public(result))}
    if result.get("_examples"):
        save_montage(out / "memorization-examples.png", result["_examples"],
                     ["model A", "model B (same noise)", "nearest training image (A)"])
        files["examples"] = out / "memorization-examples.png"
    return files


# -- translation ----------------------------------------------------------------------


def main_rows(result: dict) -> list[dict]:
    """The rows at the first strength asked for: one per direction."""
    first = result["strengths"][0]
    return [row for row in result["results"] if row["strength"] == first]


# A flip rate must beat doing nothing (the untranslated images' rate) by this much to count as a change.
FLIP_MARGIN = 0.1


def flip_verdict(name: str, target: str, flip: float, baseline: float) -> str:
    """The flip-rate sentence, read against its baseline: untranslated images the classifier already calls
    `target`. A translation that looks like the target no more often than its input did changes nothing
    the classifier can see, however high the rate."""
    said = (f"{name}: {flip:.0%} of translations look like {target} to the classifier "
            f"({baseline:.0%} of untranslated images do) - ")
    if not flip - baseline >= FLIP_MARGIN:
        already = (f"; the classifier already calls {baseline:.0%} of the untranslated images {target}, so it cannot "
                   "show a change here" if baseline >= 0.5 else "")
        return said + f"no more than doing nothing: no change of condition is shown{already}."
    if baseline >= 0.5:
        return said + (f"more than doing nothing, but the classifier calls most untranslated images {target} too: "
                       "read the change with care.")
    return said + ("the condition changes." if flip >= 0.9 else "the condition changes only partly." if flip >= 0.5
                   else "most translations do not change condition.")


def translation_verdicts(result: dict) -> list[str]:
    """One sentence per check, saying what the number means for trusting the translations."""
    lines = []
    if result["data_is_training_data"]:
        lines.append("WARNING: these are the model's training images; the numbers overstate how well it does on new cells.")
    accuracy = result["classifier"]["held_out_accuracy"]
    if not accuracy >= 0.8:
        lines.append(f"The classifier tells the conditions apart only {accuracy:.0%} of the time: the flip rate means little.")
    for row in main_rows(result):
        name = f"{row['source']} -> {row['target']}"
        lines.append(flip_verdict(name, row["target"], row["flip_rate"], row["untranslated_called_target"]))
        psnr = row["reconstruction_psnr"]
        lines.append(f"{name}: reconstruction {psnr:.1f} dB, SSIM {row['reconstruction_ssim']:.2f} - "
                     + ("the model reproduces these cells faithfully." if psnr >= 30 else
                        "fair; look at the heatmap with care." if psnr >= 25 else
                        "poor: the model does not reproduce these cells, so a translation may alter the cell itself."))
        if "counterfactual_ratio" in row:
            ratio, area = row["counterfactual_ratio"], row["heatmap_auroc"]
            lines.append(f"{name}: counterfactual ratio {ratio:.2f} - "
                         + ("closer to the true counterfactual than the input is." if ratio < 1 else
                            "no closer to the true counterfactual than doing nothing." if ratio >= 1 else
                            "cannot be computed: the inputs equal their true counterfactuals in the model's range."))
            lines.append(f"{name}: heatmap AUROC {area:.2f} - "
                         + ("the heatmap points at the pixels that really changed." if area >= 0.9 else
                            "the heatmap partly points at the real change." if area >= 0.7 else
                            "the heatmap does not locate the real change."))
    if not result["fid_kid"]["available"]:
        lines.append(result["fid_kid"]["message"])
    return lines


def draw_translation_metrics(figure, result: dict) -> None:
    """Per-image reconstruction PSNR and counterfactual ratio histograms, and the heatmap ROC."""
    rows = main_rows(result)
    panels = ["psnr"] + (["ratio", "roc"] if "counterfactual_ratio" in rows[0] else [])
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for row in rows:
        label = f"{row['source']} -> {row['target']}"
        axes[0].hist(_finite(row["per_image"]["reconstruction_psnr"]), bins=12, alpha=0.6, label=label)
        if "ratio" in panels:
            axes[1].hist(_finite(row["per_image"]["counterfactual_ratio"]), bins=12, alpha=0.6, label=label)
            axes[2].plot(row["heatmap_roc"]["fpr"], row["heatmap_roc"]["tpr"],
                         label=f"{label} (AUROC {row['heatmap_auroc']:.2f})")
    axes[0].set_xlabel("reconstruction PSNR (dB)", fontsize=8)
    if "ratio" in panels:
        axes[1].axvline(1.0, color="k", lw=0.8, ls="--")
        axes[1].set_xlabel("counterfactual ratio (< 1 is better than nothing)", fontsize=8)
        axes[2].plot([0, 1], [0, 1], color="k", lw=0.8, ls="--")
        axes[2].set_xlabel("false-positive rate", fontsize=8)
        axes[2].set_ylabel("true-positive rate", fontsize=8)
        axes[2].set_title("heatmap vs true change", fontsize=9)
    for ax in axes:
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    axes[0].set_ylabel("images", fontsize=8)


def example_rows(result: dict):
    """(rows, titles) of example translations for `draw_montage`."""
    rows, titles = [], ["input", "translation", "heatmap"]
    synthetic = any(truth is not None for _, _, truth, _ in result["_examples"])
    if synthetic:
        titles += ["true counterfactual", "true change mask"]
    for source, translation, truth, mask in result["_examples"]:
        row = [source, translation.image, translation.heatmap]
        rows.append(row + ([truth, None if mask is None else mask.astype(float)] if synthetic else []))
    return rows, titles


def _table(rows: list[dict], keys: list[tuple[str, str, str]]) -> str:
    header = "| " + " | ".join(title for title, _, _ in keys) + " |"
    lines = [header, "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(format(row[key], fmt) if key in row else "-" for _, key, fmt in keys) + " |")
    return "\n".join(lines)


def write_translation_report(result: dict, out) -> dict[str, Path]:
    """report.md with translation.json, translation-metrics.png and translation-examples.png in `out`."""
    from matplotlib.figure import Figure

    from phenotwin.montage import save_montage

    out = Path(out)
    files = {"json": write_json(out / "translation.json", public(result))}
    figure = Figure(figsize=(10, 3.2), tight_layout=True)
    draw_translation_metrics(figure, result)
    files["metrics"] = write_png_figure(out / "translation-metrics.png", figure)
    rows, titles = example_rows(result)
    if rows:
        save_montage(out / "translation-examples.png", rows, titles)
        files["examples"] = out / "translation-examples.png"
    keys = [("source", "source", "s"), ("target", "target", "s"), ("strength", "strength", ".2f"),
            ("images", "images", "d"), ("flip rate", "flip_rate", ".3f"),
            ("untranslated called target", "untranslated_called_target", ".3f"),
            ("reconstruction PSNR (dB)", "reconstruction_psnr", ".2f"), ("SSIM", "reconstruction_ssim", ".3f"),
            ("counterfactual ratio", "counterfactual_ratio", ".3f"), ("heatmap AUROC", "heatmap_auroc", ".3f")]
    fid = result["fid_kid"]
    fid_lines = [fid["message"]]
    for strength, values in fid["by_strength"].items():
        for name, v in [*values["by_target"].items(), ("overall", values["overall"])]:
            if v.get("fid") is not None:
                fid_lines.append(f"- strength {strength}, {name}: FID {v['fid']:.1f}, KID {v['kid']:.4f} ± {v['kid_std']:.4f} "
                                 f"({v['generated']} translated vs {v['real']} real)")
    text = "\n\n".join([
        "# Translation evaluation",
        f"Checkpoint `{result['checkpoint']}`, {result['steps']} DDIM steps, strength(s) "
        f"{', '.join(str(s) for s in result['strengths'])}, up to {result['images_per_direction']} images per direction. "
        f"Condition classifier: held-out accuracy {result['classifier']['held_out_accuracy']:.3f} on "
        f"{result['classifier']['images']} real images. How to read these numbers: docs/evaluation.md.",
        "## In plain words\n\n" + "\n".join(f"- {line}" for line in translation_verdicts(result)),
        "## Numbers\n\n" + _table(result["results"], keys),
        "## FID / KID\n\n" + "\n".join(fid_lines),
        "## Plots\n\n![per-image metrics](translation-metrics.png)"
        + ("\n\n![example translations](translation-examples.png)" if rows else ""),
        "All numbers: [translation.json](translation.json).",
    ]) + "\n"
    files["report"] = write_text(out / "report.md", text)
    return files
