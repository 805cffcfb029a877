"""After the last step: calibrate the model on its held-out images and keep the best save.

The last save is not always the best one (issue 18 measured a step-1500 save beating the
step-3000 one on a real texture, 28.8 against 25.6 dB), and defaults tuned by hand for one
phenotype do not transfer. So every save also writes its weights as a candidate
(training/candidates/step-N.safetensors); at the end each candidate is scored on the
validation images (reconstruction PSNR at the model's default steps and strength 1, and the
flip rate of its default settings), the best is kept as the model, and `phenotwin.calibration`
measures the trust verdict's distribution and sweeps the defaults on it.

Budget: about CALIBRATION_SHARE of the training time (seconds per step from training/log.csv,
times the run's steps). The seconds per UNet call are measured on the model; the plan takes the
most held-out images (up to MOST_IMAGES per condition) with the sweep that fit, else fewer, else
the verdict alone; what cannot be planned (a reconstruction target's dearer settings, the
verdict's table on up to VERDICT_IMAGES a condition) runs while the budget lasts.
`calibration_images` asks for a number whatever it costs.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from phenotwin.calibration import TimeBudget
from phenotwin.calibration_choice import FLIP_SLACK
from phenotwin.checkpoint import TRAINING_DIR
from phenotwin.evaluate.classifier import CLASSIFIER_EPOCHS, CLASSIFIER_IMAGES
from phenotwin.train.config import TrainProgress
from phenotwin.train.state import CANDIDATES_DIR, seconds_per_step

CALIBRATION_SHARE = 0.15
MOST_IMAGES = 8  # per condition: what `phenotwin calibrate` uses by default
PROBE_STEPS = 4  # inversion + generation steps timed to learn the seconds per UNet call
MIN_SECONDS = 5.0  # a budget below this cannot hold a calibration: skip it before loading anything
SELECTION_CRITERION = ("the highest median held-out reconstruction PSNR (default steps, strength 1) among the saves "
                       f"whose flip rate at the default settings is within {FLIP_SLACK} of the best save's")
CANDIDATE_FIELDS = ["step", "reconstruction_psnr", "flip_rate", "images", "kept"]


@dataclass(frozen=True)
class Plan:
    """What the calibration runs: images per condition, whether to sweep, its cost estimate."""

    images: int
    sweep: bool
    seconds: float
    why: str
    timed: bool = True  # whether what was not planned runs only while the budget lasts (not when asked for a number)


def candidate_file(out: Path, step: int) -> Path:
    return Path(out) / TRAINING_DIR / CANDIDATES_DIR / f"step-{step:06d}.safetensors"


def candidates(out: Path, last_step: int) -> list[tuple[int, Path]]:
    """(step, file) of the candidates this run saved, oldest first."""
    found = []
    for file in (Path(out) / TRAINING_DIR / CANDIDATES_DIR).glob("step-*.safetensors"):
        try:
            step = int(file.name[5:-12])
        except ValueError:
            continue
        if step <= last_step:
            found.append((step, file))
    return sorted(found)


def eval_set(validation, size: int):
    """The held-out images as an `EvalSet`: central model-size crops, as `load_eval_folder` makes them."""
    from phenotwin.evaluate.translation import EvalSet, _centre_crop

    members = {name: np.flatnonzero(validation.labels == c) for c, name in enumerate(validation.classes)}
    images = {name: np.stack([_centre_crop(validation.images[i], size) for i in indices])
              for name, indices in members.items()}
    batches = None
    if validation.batch_labels is not None:
        batches = {name: [validation.batches[validation.batch_labels[i]] for i in indices]
                   for name, indices in members.items()}
    return EvalSet(list(validation.classes), images, fingerprint=validation.fingerprint, batches=batches)


def pick(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The highest held-out reconstruction among the candidates that flip about as often as the best one
    (an undertrained save can reconstruct well and translate nothing); the later save on a tie."""
    flips = [row["flip_rate"] for row in rows if row["flip_rate"] is not None]
    bar = max(flips) - FLIP_SLACK if flips else None
    eligible = [row for row in rows if bar is None or (row["flip_rate"] is not None and row["flip_rate"] >= bar)]
    return max(eligible, key=lambda row: (row["reconstruction_psnr"], row["step"]))


def _score_calls(translator, data, n: int) -> int:
    """UNet calls of scoring one candidate on `n` images per condition."""
    from phenotwin.cost import confine_calls, generation_calls, inversion_calls

    base = translator.defaults
    full = translator.resolve(strength=1.0, guidance=0.0, confine=False)
    extra = 0 if base == full else generation_calls(base) + confine_calls(base)
    per_image = inversion_calls(full) + generation_calls(full) + extra
    return sum(min(n, len(data.images[c])) for c in translator.classes) * per_image


def score_steps(translator, data, n: int, classifier, seed: int):
    """Reconstruction PSNR (median, strength 1, default steps) and the defaults' flip rate on `data`.
    Its progress counts model calls over the whole candidate (one bar, with an ETA), not per image."""
    from phenotwin.progress import relabel

    classes = translator.classes
    psnrs, hits = [], []
    start, total = translator.denoiser.calls, _score_calls(translator, data, n)

    def counted(steps):
        done = translator.denoiser.calls - start
        return relabel(steps, "score", done, max(total, done + 1))

    for c, source in enumerate(classes):
        target = classes[(c + 1) % len(classes)]
        for i, image in enumerate(data.images[source][:n]):
            batch = data.batch_for(translator, source, i)  # as the calibration after it translates
            inversion = yield from counted(translator.invert_steps(image, source, translator.defaults.steps,
                                                                   channel_axis=0, batch=batch))
            full = translator.resolve(source=source, target=target, strength=1.0, guidance=0.0, confine=False,
                                      seed=seed, batch=batch)
            result = yield from counted(translator.generate_steps(inversion, settings=full))
            psnrs.append(float(result.reconstruction_psnr))
            settings = translator.resolve(source=source, target=target, seed=seed, batch=batch)
            if settings != full:
                if settings.confine:
                    yield from counted(translator.edit_mask_steps(inversion, target))
                result = yield from counted(translator.generate_steps(inversion, settings=settings))
            if classifier is not None:
                hits.append(bool(classifier.predict(result.normalised[None])[0] == classes.index(target)))
    return {"reconstruction_psnr": float(np.median(psnrs)), "flip_rate": float(np.mean(hits)) if hits else None,
            "images": len(psnrs)}


def plan(config, translator, data, count: int, seconds_per_call: float, budget: float) -> Plan | None:
    """The most useful calibration that fits `budget` seconds with `count` candidates, or None.

    It plans with what the calibration must do: the candidates' scores, the sweep and the settings
    of the cost search cheaper than the model's own, and room for a second look at one doubtful
    setting. More doubtful settings, a reconstruction target's dearer settings and the verdict's
    images beyond the sweep's run after, while the budget lasts (`TimeBudget`): their cost is
    unknown until the sweep and the search end, and an upper bound for them cut the real texture's
    calibration to 2 images a condition where it used half its budget."""
    from phenotwin.calibration import second_look_reserve, unet_calls

    most = min(MOST_IMAGES, max(len(v) for v in data.images.values()))
    if config.calibration_images is not None:
        n = config.calibration_images
        calls = count * _score_calls(translator, data, n) + unet_calls(translator, data, n,
                                                                       reconstruction_target=config.reconstruction_target)
        return Plan(n, True, calls * seconds_per_call, f"{n} image(s) per condition as asked (calibration_images)",
                    timed=False)
    for sweep in (True, False):
        for n in range(most, 1, -1):
            calls = count * _score_calls(translator, data, n) + unet_calls(translator, data, n, sweep=sweep,
                                                                              second_look=False)
            if sweep:
                calls += second_look_reserve(translator, data, n)
            if calls * seconds_per_call <= budget:
                what = "with the sweep of the defaults" if sweep else "the trust verdict only (the sweep would not fit)"
                return Plan(n, sweep, calls * seconds_per_call, f"{n} image(s) per condition, {what}")
    return None


class Calibration:
    """The end of a run: `steps()` yields TrainProgress with a "calibrating: ..." stage; `notes` say what was done."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.notes: list[str] = []
        self.last: TrainProgress | None = trainer.last_event

    def _relay(self, steps, what: str):
        """Diffusion progress as TrainProgress events a training bar or the Train widget can show."""
        result = []

        def run():
            result.append((yield from steps))

        forwarded = run()
        try:
            for event in forwarded:
                yield self._event(what, event.step, event.total)
        finally:
            forwarded.close()  # a Stop during the calibration closes the diffusion steps at once
        return result[0]

    def _event(self, what: str, step: int, total: int) -> TrainProgress:
        last = self.last
        return TrainProgress(step, total, last.loss if last else float("nan"), last.learning_rate if last else 0.0,
                             stage=f"calibrating: {what}")

    def _classifier(self, translator):
        """The flip-rate judge, trained on the training images (a few held-out ones could not teach it)."""
        from phenotwin.evaluate.classifier import train_classifier
        from phenotwin.evaluate.translation import _centre_crop

        data, size = self.trainer.data, self.trainer.config.size
        picked = [i for c in range(len(data.classes)) for i in np.flatnonzero(data.labels == c)[:CLASSIFIER_IMAGES]]
        crops = np.stack([_centre_crop(data.images[i], size) for i in picked])
        return train_classifier(translator.processor.to_model_range(crops), data.labels[picked], data.classes,
                                epochs=CLASSIFIER_EPOCHS, seed=self.trainer.config.seed)

    def _time_calls(self, translator, data):
        """Seconds per UNet call, timed on a short inversion and generation of one held-out image."""
        source, target = translator.classes[:2]
        yield from self._relay(translator.invert_steps(data.images[source][0], source, 1, channel_axis=0), "timing")
        calls, started = translator.denoiser.calls, time.monotonic()  # after a first call, which warms up
        inversion = yield from self._relay(translator.invert_steps(data.images[source][0], source, PROBE_STEPS,
                                                                   channel_axis=0), "timing")
        yield from self._relay(translator.generate_steps(inversion, settings=translator.resolve(
            source=source, target=target, steps=PROBE_STEPS, strength=1.0, guidance=0.0, confine=False)), "timing")
        return (time.monotonic() - started) / max(1, translator.denoiser.calls - calls)

    def skip(self, why: str) -> None:
        self.notes.append(f"calibration skipped: {why}. Calibrate later with phenotwin calibrate {self.trainer.out} "
                          "--data HELD_OUT_FOLDER.")

    def steps(self) -> Generator[TrainProgress, None, dict[str, Any] | None]:
        trainer = self.trainer
        config, validation = trainer.config, trainer.validation
        if not config.calibrate:
            return self.skip("--no-calibrate (calibrate=False)")
        short = [c for c in trainer.data.classes if validation is None or c not in set(
            validation.classes[i] for i in validation.labels)]
        if short:
            return self.skip(f"no held-out images of {', '.join(short)} (a condition needs 5 or more images, and "
                             "validation_fraction above 0)")
        per_step = seconds_per_step(trainer.out / TRAINING_DIR / "log.csv") or 0.0
        budget = CALIBRATION_SHARE * per_step * config.steps
        if config.calibration_images is None and budget < MIN_SECONDS:
            return self.skip(f"training took about {per_step * config.steps:.0f} s, and {CALIBRATION_SHARE:.0%} of it "
                             f"({budget:.1f} s) is too short (pass --calibration-images N to calibrate anyway)")
        started = time.monotonic()
        data = eval_set(validation, config.size)
        found = candidates(trainer.out, trainer.step)
        if not found:
            return self.skip("no saved candidates in training/candidates (a run started by an older phenotwin)")
        trainer.ema.store(trainer.trainable)  # the live weights come back whatever happens
        try:
            translator = trainer.candidate_translator()
            yield self._event("classifier", 0, 1)
            classifier = self._classifier(translator)
            yield self._event("classifier", 1, 1)
            per_call = yield from self._time_calls(translator, data)
            left = budget - (time.monotonic() - started)
            chosen = plan(config, translator, data, len(found), per_call, left)
            if chosen is None:
                return self.skip(f"{CALIBRATION_SHARE:.0%} of about {per_step * config.steps:.0f} s of training "
                                 f"({budget:.1f} s) does not fit even 2 held-out images per condition at "
                                 f"{per_call * 1e3:.1f} ms per model call (pass --calibration-images N to calibrate "
                                 "anyway)")
            self.notes.append(f"calibrating on {chosen.why}: about {chosen.seconds:.0f} s (budget {max(left, 0):.0f} s"
                              f" = {CALIBRATION_SHARE:.0%} of about {per_step * config.steps:.0f} s of training, less "
                              f"the set-up; {per_call * 1e3:.1f} ms per model call), scoring {len(found)} saved "
                              "candidate(s)")
            rows = []
            for k, (step, file) in enumerate(found):
                trainer.load_candidate(file)
                score = yield from self._relay(score_steps(translator, data, chosen.images, classifier, config.seed),
                                               f"candidate {k + 1}/{len(found)} (step {step})")
                rows.append({"step": step, **score})
        finally:
            trainer.ema.restore(trainer.trainable)
        best = pick(rows)
        for row in rows:
            row["kept"] = row["step"] == best["step"]
        flip = "" if best["flip_rate"] is None else f", flip rate {best['flip_rate']:.2f}"
        self.notes.append(f"kept the save of step {best['step']} of {trainer.step} (held-out reconstruction "
                          f"{best['reconstruction_psnr']:.1f} dB{flip}; last save "
                          f"{rows[-1]['reconstruction_psnr']:.1f} dB); curve in training/candidates.csv")
        deadline = TimeBudget(started + budget, per_call) if chosen.timed else None
        return (yield from self._finish(best, rows, data, chosen, classifier, time.monotonic() - started, deadline))

    def _finish(self, best, rows, data, chosen: Plan, classifier, spent: float, deadline: TimeBudget | None):
        """Keep the best save as the model, then calibrate it and write the tables."""
        from phenotwin import Translator
        from phenotwin.calibration import VERDICT_IMAGES, calibrate_steps
        from phenotwin.calibration_choice import describe, second_look_note
        from phenotwin.calibration_command import apply
        from phenotwin.io import write_csv

        trainer = self.trainer
        selection = {"kept_step": best["step"], "criterion": SELECTION_CRITERION, "candidates": rows}
        trainer.write_model(candidate_file(trainer.out, best["step"]), selection)
        write_csv(trainer.out / TRAINING_DIR / "candidates.csv", CANDIDATE_FIELDS, rows)
        translator = Translator(trainer.out, device=str(trainer.accelerator.device))
        started = time.monotonic()
        record = yield from self._relay(calibrate_steps(
            translator, data, n=max(2, chosen.images), sweep=chosen.sweep, seed=trainer.config.seed,
            classifier=classifier, reconstruction_target=trainer.config.reconstruction_target if chosen.sweep else None,
            verdict_images=VERDICT_IMAGES if deadline else None, budget=deadline), "sweep")
        record["candidates"] = selection
        record["budget"] = {"plan": chosen.why, "estimated_seconds": chosen.seconds,
                            "seconds": spent + time.monotonic() - started}
        apply(trainer.out, record, None)
        if "chosen" in record:
            self.notes.append(f"defaults: {describe(record['chosen'])} ({record['criterion']}); table in "
                              "training/calibration.csv")
        elif "not_chosen" in record:
            self.notes.append(record["not_chosen"])
        self.notes += [note for note in [second_look_note(record)] if note]
        self.notes += [record[key] for key in ("second_look_stopped", "cost_search_stopped", "verdict_images_stopped",
                                               "reconstruction_target_missed") if key in record]
        if trainer.config.reconstruction_target is not None and not chosen.sweep:
            self.notes.append(f"the reconstruction target ({trainer.config.reconstruction_target:g} dB) was not "
                              f"searched: the sweep did not fit the time budget. Run phenotwin calibrate {trainer.out} "
                              f"--data HELD_OUT_FOLDER --reconstruction-target "
                              f"{trainer.config.reconstruction_target:g}.")
        self.notes.append(f"calibration took {record['budget']['seconds']:.0f} s")
        return record
