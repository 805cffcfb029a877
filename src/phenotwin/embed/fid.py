"""FID and KID of translations in a trained encoder's feature space: offline, and made for microscopy.

`phenotwin evaluate translation --features ENCODER_DIR` calls `encoder_fid_kid` next to (or
instead of) the Inception FID. Per target condition (FID_c) and over all targets (FID_o), as
CellFlux reports them, plus two references that say how to read the numbers:

* ``real_halves`` -- two halves of the real target images: the floor a perfect translator reaches;
* ``identity`` -- the untranslated source images against the real targets: what doing nothing scores.

A translator that works ranks real_halves < translations < identity.
"""

from __future__ import annotations

import numpy as np

from phenotwin.embed.metrics import feature_fid_kid
from phenotwin.embed.model import load_encoder
from phenotwin.errors import PhenotwinError


def _raw(model_range: np.ndarray, normalization: dict) -> tuple[np.ndarray, bool]:
    """The translator's model-range images in raw units when its normalisation is fixed (else as they are)."""
    if normalization.get("mode") != "fixed":
        return np.asarray(model_range, np.float32), False
    low = np.asarray(normalization["low"], np.float64)[None, :, None, None]
    high = np.asarray(normalization["high"], np.float64)[None, :, None, None]
    return ((np.clip(model_range, -1, 1) + 1) / 2 * (high - low) + low).astype(np.float32), True


def check_encoder(encoder_dir, translator):
    """The encoder of `encoder_dir`, loaded and checked against the model before any translation."""
    encoder = load_encoder(encoder_dir)
    if encoder.info["channels"] != translator.channels:
        raise PhenotwinError(f"the encoder {encoder_dir} takes {encoder.info['channels']} channel(s), the model "
                             f"{translator.channels}: train the encoder on images with the model's channels.")
    return encoder


def encoder_fid_kid(encoder, translator, collected: dict, data, directions, n: int) -> dict:
    """{"encoder", "by_strength": {s: {"by_target", "overall"}}, "references": {target: {...}}}.

    `collected[strength][target]` holds the translations (the translator's model range); `data` the
    real images in raw units (an `EvalSet`)."""
    normalization = translator.processor.normalization
    fixed = normalization.get("mode") == "fixed"

    def features_of_model_range(images):
        raw, is_raw = _raw(np.concatenate(images), normalization)
        return encoder.features(raw, raw=is_raw)

    def features_of_raw(images):
        # a per-image (percentile) normalisation cannot be undone: both sides then go in the model's range
        images = np.asarray(images, np.float32)
        return encoder.features(images) if fixed else encoder.features(translator.processor.to_model_range(images),
                                                                        raw=False)

    real = {t: features_of_raw(data.images[t]) for t in {t for _, t in directions}}
    by_strength = {}
    for s, by_target in collected.items():
        feats = {t: features_of_model_range(v) for t, v in by_target.items()}
        by_strength[str(s)] = {
            "by_target": {t: feature_fid_kid(f, real[t]) for t, f in feats.items()},
            "overall": feature_fid_kid(np.concatenate(list(feats.values())),
                                       np.concatenate([real[t] for t in feats]))}
    references = {}
    for t in real:
        sources = [data.images[s][:n] for s, tt in directions if tt == t]
        half = len(real[t]) // 2
        references[t] = {"identity": feature_fid_kid(features_of_raw(np.concatenate(sources)), real[t]),
                         "real_halves": feature_fid_kid(real[t][:half], real[t][half:])}
    return {"encoder": str(encoder.path), "by_strength": by_strength, "references": references}


def describe(record: dict) -> list[str]:
    """The encoder FID/KID as lines: per target and overall, with the two references."""
    lines = [f"FID/KID in the features of {record['encoder']} (offline):"]
    for strength, values in record["by_strength"].items():
        for name, v in [*values["by_target"].items(), ("overall", values["overall"])]:
            if v.get("fid") is None:
                continue
            ref = record["references"].get(name, {})
            known = [f"{label} {ref[key]['fid']:.3f}" for key, label in
                     (("real_halves", "real vs real"), ("identity", "untranslated")) if ref.get(key, {}).get("fid")
                     is not None]
            lines.append(f"- strength {strength}, {name}: FID {v['fid']:.3f}, KID {v['kid']:.4f}"
                         + (f" (FID {', '.join(known)})" if known else ""))
    return lines
