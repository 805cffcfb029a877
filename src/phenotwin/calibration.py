"""A model's trust verdict and its default settings, measured on its own held-out images (`phenotwin calibrate`).

Settings tuned by hand for one phenotype do not transfer (the demo's strength 0.4 +
guidance 1 + edit mask was three times worse than strength 1.0 alone on a real-texture
phenotype, and the reverse held on the demo), and a fixed dB threshold cannot tell garbage
from a good image. So, on held-out images of the model's own conditions:

1. intensity statistics of the images, when the model has none (the input-fit check);
2. the reconstruction PSNR at each strength of STRENGTHS (and each step count asked for):
   the distribution a result's trust verdict is ranked against (`phenotwin.trust`), at the
   defaults on VERDICT_IMAGES a condition when the folder holds them;
3. a sweep of strength x guidance x edit mask at the model's step count: a condition classifier
   gives the flip rate, the mean heatmap gives the size of the change. The criterion: **the
   gentlest localised change that flips**, i.e. among the settings whose flip rate, pooled and
   in each direction, is at least FLIP_TARGET times the classifier's own held-out accuracy (else
   the best rate every direction reached, less FLIP_SLACK), less one standard error of a flip
   rate of that many images (a direction's own), one confined to the model's edit mask, then the
   lowest strength, then the smallest mean change (`calibration_choice`). Each direction, as a
   pooled 0.875 hid a texture model's textured -> control flipping 0.62 held out. A translation
   should change what the condition changes and nothing more: on a subtle phenotype the gentlest
   change that flips is also the one that does not overshoot. The settings that decide the
   choice and lie near the bar (`doubtful`) are measured again first on as many images more,
   when the folder holds them;
4. the cost search (issue 17): the chosen setting again with cheaper solvers, step counts and
   refinements (`calibration_cost`), cheapest first; the first that still flips (each direction) and
   reconstructs within RECONSTRUCTION_TOLERANCE_DB of the model's own becomes the default, and
   the verdict's table is measured again with it. With a reconstruction target, dearer settings
   too, and the first that also reaches the target.

The chosen settings become the model's `defaults` in phenotwin.json; the tables go to
`calibration` there and to training/calibration.csv, with a plot.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from phenotwin.calibration_choice import (
    RECONSTRUCTION_TOLERANCE_DB,
    SWEPT,
    choose,
    criterion,
    doubtful,
    flip_bar,
)
from phenotwin.calibration_cost import cost_search, judge, searched_settings
from phenotwin.errors import PhenotwinError
from phenotwin.evaluate.classifier import CLASSIFIER_EPOCHS
from phenotwin.progress import Progress, Steps, relabel

STRENGTHS = (0.25, 0.5, 0.75, 1.0)
GUIDANCES = (0.0, 1.0)
CONFINES = (False, True)
# Below this held-out accuracy the classifier cannot tell the conditions apart well enough for
# its flip rates to choose anything: every setting "fails to flip" and the smallest change (none)
# would win. The defaults are then kept, and the calibration says why.
MIN_CLASSIFIER_ACCURACY = 0.8
CALIBRATION_VERSION = 1
# Images per condition of the verdict's table at the defaults (`phenotwin calibrate`): real cells
# have a hard tail (1 in 12 of the demo's, `phenotwin.trust`), which 8 rarely sample and 32 do.
VERDICT_IMAGES = 32


def _plan(translator, data, n: int, step_counts: list[int] | None, sweep: bool, verdict_images: int | None = None):
    """What a calibration runs: (step counts, strengths, sweep grid, directions, images per source,
    images per source of the verdict's table at the defaults: at least as many)."""
    base = translator.defaults
    step_counts = sorted(set(step_counts or [base.steps]) | {base.steps})
    rungs = sorted(set(STRENGTHS) | {base.strength})
    grid = [(s, g, c) for s in rungs for g in GUIDANCES for c in CONFINES] if sweep else []
    directions = [(src, tgt) for src in translator.classes for tgt in translator.classes if src != tgt]
    per_direction = max(1, n // (len(translator.classes) - 1))  # each condition is the source of n translations
    counts = {src: min(per_direction, len(data.images[src])) for src, _ in directions}
    verdict_per_direction = max(per_direction, (verdict_images or 0) // (len(translator.classes) - 1))
    verdict_counts = {src: min(verdict_per_direction, len(data.images[src])) for src, _ in directions}
    return step_counts, rungs, grid, directions, counts, verdict_counts


def _guidances(base_guidance: float, swept: bool) -> list[float]:
    """The guidances generated at: the sweep's, plus the model's own (its verdict table needs it)."""
    return sorted({*GUIDANCES, base_guidance}) if swept else [base_guidance]


def _verdict_calls(translator, settings, rungs: list[float], guidances: list[float], pairs=None) -> int:
    """Model calls of one image's verdict measurement: its inversion and every rung's generation at
    every guidance (only the (strength, guidance) `pairs`, when given)."""
    from phenotwin.cost import generation_calls, inversion_calls

    generated = [s for g in guidances for s in rungs if pairs is None or (s, g) in pairs]
    return (inversion_calls(settings.replace(strength=1.0)) +
            sum(generation_calls(settings.replace(strength=s)) for s in generated))


def _second_look_images(data, counts: dict[str, int]) -> dict[str, int]:
    """Images per source of the second look at the doubtful settings: as many again, as the folder holds."""
    return {src: min(2 * count, len(data.images[src])) for src, count in counts.items()}


def _second_look_calls(translator, data, directions, counts, pairs: set[tuple[float, float]]) -> int:
    """Model calls of a second look at the settings of these (strength, guidance) `pairs`, both edit
    masks: per image its inversion, the pairs' generations and its edit mask."""
    from phenotwin.pipeline.edit_mask import mask_calls

    if not pairs:
        return 0
    look = translator.resolve()
    wanted = _second_look_images(data, counts)
    strengths, guidances = sorted({s for s, _ in pairs}), sorted({g for _, g in pairs})
    return ((_verdict_calls(translator, look, strengths, guidances, pairs) + mask_calls(look.mask_draws)) *
            sum(wanted[src] - counts[src] for src, _ in directions))


def second_look_reserve(translator, data, n: int) -> int:
    """Model calls of the least second look, at one doubtful setting (its dearest), which a time
    budget's plan keeps room for; more doubtful settings are measured again while the budget lasts."""
    _, rungs, _, directions, counts, _ = _plan(translator, data, n, None, True)
    return _second_look_calls(translator, data, directions, counts, {(max(rungs), max(GUIDANCES))})


def _cost_search_calls(translator, rungs: list[float], reconstruction_target: float | None = None) -> tuple[int, int]:
    """Model calls per image, at most, of the cost search (at the dearest setting the sweep can
    choose) and of the verdict's table measured again at the setting it keeps."""
    from phenotwin.cost import calls_per_image

    options = searched_settings(translator, {"strength": max(rungs), "guidance": max(GUIDANCES), "confine": True},
                                reconstruction_target)
    verdict = max([_verdict_calls(translator, translator.resolve(), rungs, [translator.defaults.guidance])] +
                  [_verdict_calls(translator, o, rungs, [max(GUIDANCES)]) for o in options])
    return sum(calls_per_image(o) for o in options), verdict


def unet_calls(translator, data, n: int = 8, step_counts: list[int] | None = None, sweep: bool = True,
               reconstruction_target: float | None = None, verdict_images: int | None = None,
               second_look: bool = True) -> int:
    """How many UNet calls `calibrate_steps` makes at most with these arguments: what a time budget
    plans with (the cost search stops at the first setting that keeps the quality, and its verdict
    table is measured only when one does). `second_look`: count the sweep's second look as if every
    setting were doubtful (a time budget runs it only while it lasts, so a plan leaves it out)."""
    from phenotwin.pipeline.edit_mask import mask_calls

    step_counts, rungs, _, directions, counts, verdict_counts = _plan(translator, data, n, step_counts, sweep,
                                                                      verdict_images)
    base = translator.defaults
    images = sum(counts[src] for src, _ in directions)
    extra = sum(verdict_counts[src] - counts[src] for src, _ in directions)
    total = 0
    for steps in step_counts:
        swept = sweep and steps == base.steps
        total += images * (_verdict_calls(translator, translator.resolve(steps=steps), rungs,
                                          _guidances(base.guidance, swept)) + mask_calls(base.mask_draws) * swept)
    verdict = _verdict_calls(translator, translator.resolve(), rungs, [base.guidance])
    if sweep:  # the cost search, at the dearest chosen setting, and the verdict table of its choice
        search, verdict = _cost_search_calls(translator, rungs, reconstruction_target)
        total += images * (search + verdict)
        if second_look:
            total += _second_look_calls(translator, data, directions, counts, {(s, g) for s in rungs for g in GUIDANCES})
    return total + extra * verdict


@dataclass(frozen=True)
class TimeBudget:
    """When a calibration must end (a `time.monotonic()` value) and the seconds one model call takes.
    The parts whose cost cannot be planned run only while they fit before the deadline: the cost
    search stops at its first setting that keeps the quality, so its dearer settings (a
    reconstruction target's) may cost nothing or, when none reaches the target, 1.6 times all the
    rest (the real texture's sweep on 2 images a condition: 8 356 model calls at most with them,
    3 216 without, 1 928 used), and the verdict's table takes more images one at a time, each
    condition in turn."""

    deadline: float
    seconds_per_call: float

    def fits(self, calls: int) -> bool:
        return calls <= self.calls_left()

    def calls_left(self) -> int:
        return max(0, int((self.deadline - time.monotonic()) / self.seconds_per_call))


class _Clock:
    """The calibration's model calls done so far, for one progress bar over all its stages. Its
    total is the upper bound of what is left, or with a `budget` what the budget still holds
    when that is less (the bar's end and its ETA: the texture's upper bound read 69 minutes)."""

    def __init__(self, total: int, budget: TimeBudget | None = None):
        self.done, self.upper, self.budget = 0, total, budget

    @property
    def total(self) -> int:
        if self.budget is None:
            return self.upper
        return min(self.upper, self.done + self.budget.calls_left())

    def skip(self, calls: int) -> None:
        """Calls counted in the upper bound that will not be made (the budget ran out first)."""
        self.upper = max(self.done, self.upper - calls)

    def run(self, steps, calls: int):
        result = yield from relabel(steps, "calibrate", self.done, max(self.total, self.done + calls))
        self.done += calls
        return result


def _verdict_psnrs(translator, data, directions, counts, settings, rungs, guidances, seed, clock, psnrs,
                   on_generated=None, start=None, pairs=None):
    """Invert each held-out image with `settings` (steps, solver, refinements) and regenerate it at
    every rung and guidance, unconfined: the reconstruction PSNRs go to psnrs[guidance][steps][rung].
    `on_generated(src, tgt, i, inversion, rung settings, result)` sees each generation (the sweep).
    `start`: {source: the first image's index} (the images before it were measured already);
    `pairs`: only these (strength, guidance) (the second look)."""
    from phenotwin.cost import generation_calls, inversion_calls

    for src, tgt in directions:
        for i in range((start or {}).get(src, 0), counts[src]):
            batch = data.batch_for(translator, src, i)
            full = settings.replace(source=src, strength=1.0, batch=batch)
            inversion = yield from clock.run(translator.invert_steps(data.images[src][i], channel_axis=0,
                                                                     settings=full), inversion_calls(full))
            for guidance in guidances:
                for strength in rungs:
                    if pairs is not None and (strength, guidance) not in pairs:
                        continue
                    rung = translator.resolve(settings, source=src, target=tgt, strength=strength, guidance=guidance,
                                              seed=seed, confine=False, batch=batch)
                    calls = 0 if translator.is_generated(inversion, settings=rung) else generation_calls(rung)
                    result = yield from clock.run(translator.generate_steps(inversion, settings=rung), calls)
                    psnrs.setdefault(guidance, {}).setdefault(str(settings.steps), {}).setdefault(
                        repr(strength), []).append(float(result.reconstruction_psnr))
                    if on_generated is not None:
                        yield from on_generated(src, tgt, i, inversion, rung, result)


def _more_images(translator, data, directions, counts, wanted, settings, rungs, guidances, seed, clock, psnrs,
                 budget: TimeBudget | None, reserve: int = 0, on_generated=None, pairs=None):
    """`_verdict_psnrs` on the images beyond the first `counts`, up to `wanted`: one image of each
    condition in turn, while the `budget` holds one more and `reserve` calls besides (work planned
    after it). Returns the images measured per source."""
    from phenotwin.pipeline.edit_mask import mask_calls

    done = dict(counts)
    per_direction = (_verdict_calls(translator, settings, rungs, guidances, pairs) +
                     (mask_calls(settings.mask_draws) if on_generated is not None else 0))
    outgoing = {src: [d for d in directions if d[0] == src] for src, _ in directions}  # an image runs each of them
    for i in range(max(wanted.values(), default=0)):
        for src, its_directions in outgoing.items():
            if not counts[src] <= i < wanted[src]:
                continue
            if budget is not None and not budget.fits(per_direction * len(its_directions) + reserve):
                clock.skip(per_direction * sum(len(outgoing[s]) * (wanted[s] - done[s]) for s in done))
                return done
            yield from _verdict_psnrs(translator, data, its_directions, {src: i + 1}, settings, rungs, guidances,
                                      seed, clock, psnrs, on_generated, start={src: i}, pairs=pairs)
            done[src] = i + 1
    return done


def calibrate_steps(translator, data, n: int = 8, step_counts: list[int] | None = None, sweep: bool = True,
                    seed: int = 0, classifier_epochs: int = CLASSIFIER_EPOCHS, classifier=None,
                    reconstruction_tolerance: float = RECONSTRUCTION_TOLERANCE_DB,
                    reconstruction_target: float | None = None,
                    verdict_images: int | None = None, budget: TimeBudget | None = None) -> Steps[dict[str, Any]]:
    """Measure (see the module docstring) on `data`, an `evaluate.translation.EvalSet`; returns the
    `calibration` record with the chosen `defaults`. Writes nothing. `classifier` (a trained
    `evaluate.classifier.ConditionClassifier`) replaces the one trained on `data`, e.g. one trained
    on the training images when only a few are held out. `reconstruction_tolerance`: the dB of
    reconstruction a cheaper solver or step count may lose (`calibration_cost.cost_search`);
    `reconstruction_target`: the dB the defaults should reconstruct at, with dearer settings if need be;
    `verdict_images`: images per condition the verdict's table at the defaults is measured on, when
    more than `n` (the verdict ranks against a low percentile, which a few images place poorly);
    `budget`: a deadline for the second look, the cost search's settings and the verdict's images
    beyond the first `n` (`TimeBudget`); the record says what it left out."""
    from phenotwin.cost import calls_per_image
    from phenotwin.evaluate.translation import condition_classifier, require_conditions
    from phenotwin.pipeline.edit_mask import mask_calls_left

    require_conditions(translator, data)
    if n < 2:
        raise PhenotwinError(f"calibration needs at least 2 images per condition (-n), got {n}.")
    base = translator.defaults
    step_counts, rungs, grid, directions, counts, verdict_counts = _plan(translator, data, n, step_counts, sweep,
                                                                         verdict_images)

    if sweep and classifier is None:
        yield Progress("classifier", 0, 1)
        classifier, _ = condition_classifier(translator, data, seed, classifier_epochs)
        yield Progress("classifier", 1, 1)

    clock = _Clock(unet_calls(translator, data, n, step_counts, sweep, reconstruction_target, verdict_images), budget)
    psnrs: dict[float, dict[str, dict[str, list[float]]]] = {}
    outcomes: dict[tuple, list] = {key: [] for key in grid}

    def sweep_confined(src, tgt, i, inversion, rung, result):
        """The sweep's grid: the unconfined generation as measured, and the same confined to the edit mask."""
        key = (rung.strength, rung.guidance)
        if (*key, False) not in outcomes:
            return
        outcomes[(*key, False)].append((src, tgt, i, result))
        left = mask_calls_left(inversion, translator.classes.index(tgt), rung.mask_draws)
        if left:
            yield from clock.run(translator.edit_mask_steps(inversion, tgt, rung.mask_draws), left)
        confined = yield from clock.run(translator.generate_steps(inversion, settings=rung.replace(confine=True)), 0)
        outcomes[(*key, True)].append((src, tgt, i, confined))

    for steps in step_counts:
        swept = sweep and steps == base.steps
        yield from _verdict_psnrs(translator, data, directions, counts, translator.resolve(steps=steps), rungs,
                                  _guidances(base.guidance, swept), seed, clock, psnrs,
                                  sweep_confined if swept else None)
    def judged() -> list[dict[str, Any]]:
        return [{"strength": s, "guidance": g, "confine": c, **judge(translator, data, classifier, outcomes[(s, g, c)])}
                for s, g, c in grid]

    rows = judged()
    record: dict[str, Any] = {
        "version": CALIBRATION_VERSION, "data_fingerprint": data.fingerprint,
        "images_per_condition": {src: counts[src] for src, _ in directions}, "strengths": rungs,
    }
    if translator.info.batches:  # the rest were translated in the model's "batch unknown" row
        record["images_in_their_batch"] = sum(data.batch_for(translator, src, i) is not None
                                              for src in counts for i in range(counts[src]))
    guidance = base.guidance
    if rows:  # the second look at the doubtful settings, on as many images more
        choosing = classifier.held_out_accuracy >= MIN_CLASSIFIER_ACCURACY
        unsure = doubtful(rows, flip_bar(rows, classifier.held_out_accuracy)) if choosing else []
        wanted = _second_look_images(data, counts)
        pairs = {(r["strength"], r["guidance"]) for r in unsure}
        clock.skip(_second_look_calls(translator, data, directions, counts, {(s, g) for s in rungs for g in GUIDANCES})
                   - _second_look_calls(translator, data, directions, counts, pairs))  # the bound's rest
        if pairs and wanted != counts:
            before = choose(rows, classifier.held_out_accuracy)
            images = sum(counts[src] for src, _ in directions)
            reserve = images * sum(_cost_search_calls(translator, rungs))  # the planned cheaper settings, after it
            looked = yield from _more_images(
                translator, data, directions, counts, wanted, translator.resolve(), sorted({s for s, _ in pairs}),
                sorted({g for _, g in pairs}), seed, clock, {}, budget, reserve, sweep_confined, pairs)
            rows = judged()
            if looked != counts:
                record["second_look"] = {
                    "settings": [{k: r[k] for k in SWEPT} for r in unsure], "images_per_condition": looked,
                    "chosen_before": {k: before[k] for k in SWEPT}}
            if looked != wanted:
                record["second_look_stopped"] = (
                    f"the time budget left the settings near the flip bar measured on {min(looked.values())} image(s) "
                    f"a condition of the {max(wanted.values())} there were: run phenotwin calibrate "
                    f"{translator.checkpoint_path or 'MODEL'} --data HELD_OUT_FOLDER to choose on all of them.")
    if rows:
        record.update(sweep=rows, classifier_accuracy=classifier.held_out_accuracy,
                      criterion=criterion(reconstruction_tolerance, reconstruction_target))
        if classifier.held_out_accuracy >= MIN_CLASSIFIER_ACCURACY:
            row = choose(rows, classifier.held_out_accuracy)
            chosen = {k: row[k] for k in SWEPT}
            guidance = chosen["guidance"]
            # The cost search translates the swept images: its reference is the chosen row on those
            # (after a second look the row holds more).
            swept = [r for r in outcomes[(row["strength"], row["guidance"], row["confine"])] if r[2] < counts[r[0]]]
            reference = {**judge(translator, data, classifier, swept), "results": swept}
            images = sum(counts[src] for src, _ in directions)

            planned = calls_per_image(translator.resolve(**chosen))

            def affordable(option) -> bool:
                """Settings cheaper than the model's own were planned; a dearer one runs if its translations
                and, if kept, its verdict table fit in what is left of the budget."""
                return budget is None or calls_per_image(option) < planned or budget.fits(images * (
                    calls_per_image(option) + _verdict_calls(translator, option, rungs, [option.guidance])))

            tried, cheaper, untried = yield from cost_search(
                translator, data, classifier, directions, counts, chosen, reference,
                flip_bar(rows, classifier.held_out_accuracy), seed, clock, reconstruction_tolerance,
                reconstruction_target, affordable)
            record["cost_search"] = tried
            if untried:
                target_flag = "" if reconstruction_target is None else f" --reconstruction-target {reconstruction_target:g}"
                clock.skip(images * sum(calls_per_image(option) for option in untried))
                dearest = untried[-1]
                record["cost_search_stopped"] = (
                    f"the time budget left {len(untried)} of the cost search's {len(tried) + len(untried)} settings "
                    f"untried, up to {dearest.solver} at {dearest.steps} steps with {dearest.inversion_refinements} "
                    f"refinement(s). Run phenotwin calibrate {translator.checkpoint_path or 'MODEL'} --data "
                    f"HELD_OUT_FOLDER{target_flag} to try them all.")
            if reconstruction_target is not None:
                record["reconstruction_target"] = reconstruction_target
                best = max([reference["reconstruction_psnr"]] + [r["reconstruction_psnr"] for r in tried if r["kept"]])
                if best < reconstruction_target:
                    record["reconstruction_target_missed"] = (
                        f"no setting tried that flips reconstructs at {reconstruction_target:g} dB on these held-out "
                        f"images; the defaults reconstruct at {best:.1f} dB, and results are judged against that. "
                        "Ask for a lower --reconstruction-target, or train the model longer or on more images.")
            if cheaper is not None:  # the verdict is judged at the settings results will use
                chosen.update(steps=cheaper.steps, solver=cheaper.solver,
                              inversion_refinements=cheaper.inversion_refinements)
                psnrs = {}
                yield from _verdict_psnrs(translator, data, directions, counts, cheaper, rungs, [guidance], seed,
                                          clock, psnrs)
            record["chosen"] = chosen
        else:
            record["not_chosen"] = (
                f"the model's defaults were kept: the condition classifier tells these held-out images apart only "
                f"{classifier.held_out_accuracy:.0%} of the time (at least {MIN_CLASSIFIER_ACCURACY:.0%} needed), "
                "so its flip rates cannot choose a setting. Calibrate on more held-out images per condition (-n and "
                "more files), or the conditions differ too little in these images to be told apart.")
    # Guidance lowers the reconstruction PSNR (37.1 -> 34.8 dB on the demo at strength 1), so the
    # verdict's table is the one measured at the guidance, solver and refinements the model will use by default.
    measured = translator.resolve(**{k: v for k, v in record.get("chosen", {}).items() if k != "confine"})
    measured_counts = yield from _more_images(translator, data, directions, counts, verdict_counts, measured, rungs,
                                              [guidance], seed, clock, psnrs, budget)
    record["verdict_images_per_condition"] = measured_counts
    if measured_counts != verdict_counts:
        record["verdict_images_stopped"] = (
            f"the time budget measured the trust verdict's table on {min(measured_counts.values())} image(s) a "
            f"condition of the {max(verdict_counts.values())} there were: run phenotwin calibrate "
            f"{translator.checkpoint_path or 'MODEL'} --data HELD_OUT_FOLDER --no-sweep to measure it on more.")
    record.update(reconstruction_guidance=guidance, reconstruction_solver=measured.solver,
                  reconstruction_refinements=measured.inversion_refinements)
    record["reconstruction_psnr"] = {k: {s: sorted(v) for s, v in by.items()} for k, by in psnrs[guidance].items()}
    record["unet_calls"] = clock.done
    return record
