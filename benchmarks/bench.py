"""Translation benchmarks (issue #7): latency, a plain diffusers loop, scrubbing, viewer
responsiveness, memory and scaling, UNet throughput against the machine's matmul peak.

    python benchmarks/bench.py                 # full run (`make bench`), ~15 min on an idle 2-core CPU
    python benchmarks/bench.py --quick         # smoke test with tiny random models, well under a minute

Prints a Markdown table (paste it into docs/benchmarks.md) and writes every number to JSON.
Each figure is the median of several runs with min-max. Peak memory and the napari viewer
are measured in child processes (this script with --child), so each peak is one run's own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve()
SECTIONS = ["models", "gui", "fields"]


# -- models ---------------------------------------------------------------------------------


def sd_width_checkpoint(quick: bool):
    """Random weights in Phen-LDiff's Stable-Diffusion layout: UNet2DConditionModel with SD v1's
    block widths 320/640/1280/1280 and cross-attention width 768 (one layer per block instead
    of two, to bound CPU time), on 16x16 latents of a small 2-channel VAE (32 px images).
    In --quick mode, the tiny test SD model instead."""
    import torch
    from diffusers import UNet2DConditionModel

    from phenotwin import testing
    from phenotwin.checkpoint import Checkpoint, CheckpointInfo

    torch.manual_seed(0)
    if quick:
        unet, context = testing._tiny_sd_unet(16), 32
    else:
        context = 768
        unet = testing._tame(UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=context, attention_head_dim=8,
        ))
    info = CheckpointInfo(kind="stable-diffusion", classes=list(testing.CLASSES), image_size=32, channels=2,
                          normalization={"mode": "fixed", "low": [0.0, 0.0], "high": [1.0, 1.0]})
    return Checkpoint(info=info, unet=unet.eval(), scheduler_config=testing.scheduler_config(),
                      vae=testing._tiny_vae(2, 32).eval(), class_embeddings=torch.randn(3, 4, context) * 0.5,
                      id="sd-width-random")


# The engine's own cost, whatever a model's defaults say: guidance doubles every generation
# batch and the edit mask adds 12 calls per image (docs/api.md); both are measured apart.
ENGINE = {"guidance": 0.0, "confine": False}


def load_model(name: str, quick: bool):
    """A checkpoint (object or path) by benchmark name: 'demo' or 'sd-width'."""
    if name == "sd-width":
        return sd_width_checkpoint(quick)
    if quick:
        from phenotwin.testing import make_tiny_checkpoint

        return make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny", size=32)
    from phenotwin.assets import demo_model_path

    return demo_model_path()


def test_image(channels: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth random (C, size, size) float32 image in [0, 1], like blurred fluorescence."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    image = np.stack([gaussian_filter(rng.random((size, size)), 2) for _ in range(channels)])
    image -= image.min(axis=(1, 2), keepdims=True)
    return (image / image.max(axis=(1, 2), keepdims=True)).astype(np.float32)


def raw_image(translator, size: int, seed: int = 0) -> np.ndarray:
    """A test image in the model's raw units. Where the model recorded its training images' intensities,
    shaped like them (their typical 1st, 50th and 99th percentiles: dim background, bright structures),
    so the input-fit check passes as on a real cell; else spread over its normalisation range."""
    image = test_image(translator.channels, size, seed)
    stats = (translator.info.intensity_statistics or {}).get("channels")
    if not stats:
        norm = translator.info.normalization
        low, high = (np.asarray(norm[k], dtype=np.float32)[:, None, None] for k in ("low", "high"))
        return low + image * (high - low)
    shaped = []
    for channel, stat in zip(image, stats):
        p1, p50, p99 = (float(np.median(stat[k])) for k in ("p1", "p50", "p99"))
        # the image's median (about 0.5) lands on p50: (p50 - p1) / (p99 - p1) = 0.5 ** gamma
        gamma = np.log(np.clip((p50 - p1) / max(p99 - p1, 1e-12), 1e-3, 0.999)) / np.log(0.5)
        shaped.append(p1 + (p99 - p1) * channel ** gamma)
    return np.stack(shaped).astype(np.float32)


# -- statistics -----------------------------------------------------------------------------


def summary(values) -> dict:
    values = [float(v) for v in values]
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def timed(fn, runs: int) -> tuple[dict, object]:
    """Median/min/max wall time of `fn()` over `runs` calls, and the last result."""
    times, result = [], None
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return summary(times), result


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


# -- 2. the plain diffusers loop ------------------------------------------------------------


def plain_translation(translator, image: np.ndarray, source: int, target: int, steps: int, reconstruct: bool):
    """PhenDiff's way, written directly against diffusers on the same modules: a
    DDIMInverseScheduler loop under the source label, then a DDIMScheduler loop under the
    target label (and, for the reconstruction, another one under the source label), batch 1.
    Same scheduler settings as phenotwin (clip_sample off). Returns model-range arrays."""
    import torch
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    den = translator.denoiser
    model_input = translator.processor.preprocess(image, 0).model_input
    config = dict(translator.scheduler_config, clip_sample=False)
    inverse, sampler = DDIMInverseScheduler.from_config(config), DDIMScheduler.from_config(config)
    inverse.set_timesteps(steps)
    sampler.set_timesteps(steps)

    def eps(x, t, label):
        labels = torch.tensor([label], device=den.device)
        t = torch.tensor([int(t)], device=den.device)
        if den.info.kind == "stable-diffusion":
            return den.unet(x.to(den.dtype), t, encoder_hidden_states=den.class_embeddings[labels]).sample.float()
        return den.unet(x.to(den.dtype), t, class_labels=labels).sample.float()

    with torch.no_grad():
        x = torch.from_numpy(model_input)[None].to(den.device)
        if den.vae is not None:
            x = den.vae.encode(x).latent_dist.mean * den.scaling_factor
        for t in inverse.timesteps:
            x = inverse.step(eps(x, t, source), t, x).prev_sample
        outputs = []
        for label in [target] + [source] * reconstruct:
            y = x
            for t in sampler.timesteps:
                y = sampler.step(eps(y, t, label), t, y).prev_sample
            if den.vae is not None:
                y = den.vae.decode(y / den.scaling_factor).sample
            outputs.append(y[0].clamp(-1, 1).cpu().numpy())
    return outputs


def ours(translator, image, source: int, target: int, steps: int, reconstruct: bool):
    """The Translator on the same computation: the raw generation, with the source
    reconstruction batched in when asked (reference 'input', so that it can be left out).
    Returns model-range arrays like `plain_translation`."""
    from phenotwin import TranslationSettings

    inversion = translator.invert(image, source, steps=steps, channel_axis=0)
    result = translator.generate(inversion, target, strength=1.0, reconstruct=reconstruct,
                                 settings=TranslationSettings(reference="input"), **ENGINE)
    return [result.generated] + [result.reconstruction] * reconstruct


def at_defaults(translator, images, source: int, target: int, runs: int, device) -> dict:
    """Time to the first result and UNet calls per translation at the model's defaults, against the
    whole inversion first (as before partial inversion); scrubs below and above the inverted depth."""
    from phenotwin import cost

    defaults = translator.resolve(source=source, target=target)
    out = {"settings": {k: getattr(defaults, k) for k in ("steps", "strength", "guidance", "confine",
                                                          "inversion_refinements", "used_steps")}}
    fresh, inversions = iter(images * 2), []

    def partial():
        calls = translator.denoiser.calls
        result = translator.translate(next(fresh), source, target, channel_axis=0)
        sync(device)
        inversions.append(result.inversion)  # one a run: each scrub above starts from a shallow one
        return translator.denoiser.calls - calls

    def full_first():
        calls = translator.denoiser.calls
        inversion = translator.invert(next(fresh), source, channel_axis=0)
        translator.generate(inversion, target)
        sync(device)
        return translator.denoiser.calls - calls

    def preview_first():  # what the widget shows first on a CPU (cost.preview_of)
        calls = translator.denoiser.calls
        translator.translate(next(fresh), settings=preview, channel_axis=0)
        sync(device)
        return translator.denoiser.calls - calls

    preview = cost.preview_of(defaults)
    if preview is not None:
        out["preview_s"], out["preview_unet_calls"] = timed(preview_first, runs)
    fresh = iter(images * 2)
    out["first_result_s"], out["unet_calls"] = timed(partial, runs)
    out["full_inversion_first_s"], out["unet_calls_full_inversion_first"] = timed(full_first, runs)
    first = out["first_result_s"]["median"]
    for label, strength in (("below", max(0.05, defaults.strength - 0.1)), ("above", min(1.0, defaults.strength + 0.1))):
        cold = []
        for inversion in inversions:
            inversion.forget_generations()
            calls = translator.denoiser.calls
            start = time.perf_counter()
            translator.generate(inversion, target, strength=strength, reconstruct=False)
            sync(device)
            cold.append(time.perf_counter() - start)
        out[f"scrub_{label}"] = {"strength": strength, "seconds": summary(cold), "unet_calls": translator.denoiser.calls
                                 - calls, "fraction_of_first": statistics.median(cold) / first}
    return out


# -- 6. FLOPs -------------------------------------------------------------------------------


def unet_flops(translator, batch: int) -> int:
    """FLOPs of one UNet forward at native size and `batch`, counted by torch's flop counter."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    den = translator.denoiser
    sample = torch.zeros((batch, *den.sample_shape()), device=den.device)
    labels = torch.zeros(batch, dtype=torch.long, device=den.device)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        den(sample, 500, labels)
    den.calls -= 1
    return counter.get_total_flops()


def matmul_peak(device, size: int, runs: int) -> dict:
    """GFLOP/s of a large float32 matmul: the machine's practical peak, same threads."""
    import torch
    from torch.utils.benchmark import Timer

    a = torch.randn(size, size, device=device)
    timer = Timer("a @ a", globals={"a": a})
    rates = [2 * size**3 / timer.timeit(1).mean / 1e9 for _ in range(runs)]
    return summary(rates)


def unet_rate(translator, batch: int, runs: int) -> dict:
    """Achieved GFLOP/s of bare UNet forwards at `batch` (what batching alone buys)."""
    import torch
    from torch.utils.benchmark import Timer

    den = translator.denoiser
    flops = unet_flops(translator, batch)
    sample = torch.zeros((batch, *den.sample_shape()), device=den.device)
    labels = torch.zeros(batch, dtype=torch.long, device=den.device)
    timer = Timer("with torch.inference_mode(): den(sample, 500, labels)",
                  globals={"den": den, "sample": sample, "labels": labels, "torch": torch})
    seconds = [timer.timeit(1).mean for _ in range(runs)]
    den.calls -= runs
    return {"seconds": summary(seconds), "gflops": flops / 1e9,
            "gflop_per_s": summary([flops / s / 1e9 for s in seconds])}


# -- sections 1, 2, 3, 6 for one model ------------------------------------------------------


def bench_model(name: str, args, device) -> dict:
    import torch

    from phenotwin import Translator

    start = time.perf_counter()
    # phenotwin's default reference: the translation is relative to the reconstruction.
    translator = Translator(load_model(name, args.quick), device=str(device), reference="reconstruction")
    load_seconds = time.perf_counter() - start
    steps = args.steps if name == "demo" else args.sd_steps
    size = translator.image_size
    source, target = 0, 1
    runs = args.runs
    params = sum(p.numel() for p in translator.denoiser.unet.parameters())
    out = {"model": name, "kind": translator.info.kind, "unet_parameters": params, "image_size": size,
           "channels": translator.channels, "sample_shape": list(translator.denoiser.sample_shape()),
           "steps": steps, "load_seconds": load_seconds}
    images = [raw_image(translator, size, seed) for seed in range(runs)]
    ours(translator, images[0], source, target, 2, True)  # warm-up: first-call allocations, lazy imports

    # 1. First translation of an image never seen: invert, generate with the reconstruction in the batch.
    fresh = iter(images)

    def first_translation():
        result = translator.translate(next(fresh), source, target, strength=1.0, steps=steps, channel_axis=0,
                                      **ENGINE)
        sync(device)
        return result

    first, result = timed(first_translation, runs)
    out["first_translation_s"] = first

    # 2. Against the plain diffusers loop, on the same computation (see docs/benchmarks.md).
    comparisons = {}
    for label, reconstruct in (("with_reconstruction", True), ("translation_only", False)):
        ours_t, ours_out = timed(lambda r=reconstruct: ours(translator, images[0], source, target, steps, r), runs)
        plain_t, plain_out = timed(lambda r=reconstruct: plain_translation(translator, images[0], source, target,
                                                                           steps, r), runs)
        comparisons[label] = {
            "ours_s": ours_t, "plain_s": plain_t, "speedup": plain_t["median"] / ours_t["median"],
            "max_abs_diff": max(float(np.abs(a - b).max()) for a, b in zip(ours_out, plain_out)),
        }
    out["vs_plain_diffusers"] = comparisons

    # 3. Scrubbing after the first translation: a new strength (cold), one seen before (cached).
    inversion = result.inversion
    scrub = {}
    for strength in (0.5, 0.1):
        cold = []
        for _ in range(runs):
            inversion.forget_generations()  # a strength never generated before
            start = time.perf_counter()
            translator.generate(inversion, target, strength=strength, reconstruct=False, **ENGINE)
            cold.append(time.perf_counter() - start)
        scrub[f"cold_{strength}_s"] = summary(cold)
    warm, _ = timed(lambda: translator.generate(inversion, target, strength=0.1, reconstruct=False, **ENGINE), runs)
    scrub["cached_s"] = warm
    if name == "demo":  # what a background prefetch after the first translation would cost (5.5 generations)
        ladder = [round(0.1 * k, 1) for k in range(1, 11)]
        inversion.forget_generations()
        start = time.perf_counter()
        for strength in ladder:
            translator.generate(inversion, target, strength=strength, reconstruct=False, **ENGINE)
        scrub["ladder_strengths"] = ladder
        scrub["ladder_precompute_s"] = time.perf_counter() - start
    for key in ("cold_0.5_s", "cold_0.1_s", "cached_s"):
        scrub[key.replace("_s", "_fraction_of_first")] = scrub[key]["median"] / first["median"]
    out["scrub"] = scrub

    # 7. At the model's own defaults (issue 17): a translation inverts only as deep as its strength
    #    needs; what inverting all the way first costs; scrubs from that inversion, to strengths
    #    below its depth (generation only) and above it (the missing inversion steps, then generation).
    out["defaults"] = at_defaults(translator, images, source, target, runs, device)

    # 6. UNet throughput during the first translation and for bare forwards, vs the matmul peak.
    f1, f2 = unet_flops(translator, 1), unet_flops(translator, 2)
    translation_flops = steps * f1 + steps * f2  # inversion at batch 1, generation + reconstruction at batch 2
    out["throughput"] = {
        "unet_gflops_batch1": f1 / 1e9,
        "translation_gflops": translation_flops / 1e9,
        "translation_gflop_per_s": translation_flops / first["median"] / 1e9,
        "unet_forward": {str(b): unet_rate(translator, b, runs) for b in ((1, 2, 8) if name == "demo" else (1, 2))},
    }
    translator = None  # frees the model (the closures above name it) before the next one loads
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# -- 4. napari responsiveness (child process, real viewer) ----------------------------------


def gui_child(args) -> dict:
    """Heartbeat QTimer every 10 ms while the real Translate widget translates; the longest gap."""
    import napari
    from qtpy.QtCore import QEventLoop, QTimer

    from phenotwin._napari.translate_widget import TranslateWidget

    model = load_model("demo", args.quick)
    viewer = napari.Viewer()
    widget = TranslateWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Translate cells")
    loop = QEventLoop()
    widget.model_loaded.connect(lambda _: loop.quit())
    if args.quick:  # the widget loads the demo model by itself
        widget.load_model(str(model))
    loop.exec()
    translator = widget.translator
    image = raw_image(translator, translator.image_size)
    viewer.add_image(image, channel_axis=0, name=[f"c{i}" for i in range(translator.channels)],
                     metadata={"phenotwin": {"condition": translator.classes[0]}})
    widget.target.value = translator.classes[1]
    widget.strength.value = 1.0
    ticks: list[float] = []
    heartbeat = QTimer()
    heartbeat.setInterval(10)
    heartbeat.timeout.connect(lambda: ticks.append(time.perf_counter()))
    heartbeat.start()
    gaps, computing_gaps, seconds = [], [], []
    steps_seen: list[float] = []
    shown: list[float] = []  # the preview or the result in the layers (the widget's handlers run first)
    firsts: list[float] = []
    events = widget.session.events  # a run's (or scrub's) diffusion steps, and its end
    events.progress.connect(lambda _: steps_seen.append(time.perf_counter()))
    for event in (events.preview, events.result):
        event.connect(lambda *_: shown.append(time.perf_counter()))
    events.finished.connect(loop.quit)
    for run in range(args.runs):
        widget.steps.value = args.steps + run  # a new inversion each run, not the cached one
        ticks.clear()
        steps_seen.clear()
        shown.clear()
        start = time.perf_counter()
        widget.run()  # after the previous run the prefetch works in the background: it stops first
        loop.exec()
        seconds.append(time.perf_counter() - start)
        firsts.append(shown[0] - start)
        # Whole run, result layers included; and while the worker computes (up to its last step).
        gaps.append(1000 * float(np.diff(ticks).max()))
        computing = [t for t in ticks if t <= steps_seen[-1]]
        computing_gaps.append(1000 * float(np.diff(computing).max()))
    ended = time.perf_counter()
    events.finished.disconnect(loop.quit)
    # The precompute is opt-in on a CPU (issue 14): ticked here, so the scrub rows measure it after the
    # runs (their stalls and times above are the default widget's, without it).
    widget.prefetch.value = True
    scrub = gui_scrub(widget, loop, args.runs)
    scrub["prefetch_s"] = scrub.pop("prefetch_ended") - ended
    scrub["fraction_of_translation"] = {key: scrub[key]["median"] / summary(seconds)["median"]
                                        for key in ("prefetched_s", "new_s")}
    viewer.close()
    return {"max_gap_ms": summary(gaps), "max_gap_computing_ms": summary(computing_gaps),
            "translation_s": summary(seconds), "first_visible_s": summary(firsts), "heartbeat_ms": 10,
            "image_size": translator.image_size, "preview": widget.session.preview_enabled,
            "steps": args.steps, "scrub": scrub}


def process_events_until(condition) -> None:
    from qtpy.QtWidgets import QApplication

    while not condition():
        QApplication.processEvents()
        time.sleep(0.002)


def gui_scrub(widget, loop, runs: int) -> dict:
    """Slider moves in the widget after a translation: to strengths the background prefetch
    made (from the move to the result layers updated), and to one the cache does not hold."""
    from phenotwin._napari.session import PREFETCH_RADIUS
    from phenotwin._napari.translate_widget import SCRUB_DEBOUNCE_MS

    session = widget.session

    def settle() -> None:  # the prefetch (re)started after the last result has finished
        process_events_until(lambda: not session.prefetching and session.running is None)

    def scrub_to(strength: float) -> float:
        start = time.perf_counter()
        widget.strength.value = strength
        loop.exec()  # quits on `translated`, once the layers show the result
        return time.perf_counter() - start

    widget.translated.connect(lambda _: loop.quit())
    settle()
    out = {"prefetch_ended": time.perf_counter(), "prefetch_radius": PREFETCH_RADIUS, "debounce_ms": SCRUB_DEBOUNCE_MS}
    prefetched = []
    for k in range(max(runs, 3)):  # 0.9, 0.85, 0.8, ...: within reach of the strengths 1.0, 0.9, ... prefetched
        prefetched.append(scrub_to(round(0.9 - 0.05 * k, 2)))
        settle()
    new = []
    for k in range(runs):  # 0.3, 0.2, 0.3, ...: strengths the cache does not hold (emptied first)
        settle()
        session.inversion.forget_generations()
        new.append(scrub_to(0.3 if k % 2 == 0 else 0.2))
    settle()
    return {**out, "prefetched_s": summary(prefetched), "new_s": summary(new)}


def bench_gui(args) -> dict:
    command = [sys.executable, str(SCRIPT), "--child", "gui", "--steps", str(args.steps), "--runs", str(args.runs)]
    command += ["--quick"] * args.quick
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        if not shutil.which("xvfb-run"):
            return {"skipped": "no display and no xvfb-run"}
        command = ["xvfb-run", "-a", "-s", "-screen 0 1600x1000x24"] + command
    try:
        import napari  # noqa: F401
    except ImportError:
        return {"skipped": "napari is not installed (pip install 'napari-phenotwin[napari]')"}
    return run_child(command)


# -- 5. memory and scaling (one child process per field) ------------------------------------


def field_child(args) -> dict:
    """One translation of a size x size field in a fresh process: time and peak memory."""
    import torch

    from phenotwin import Translator
    from phenotwin.pipeline.trajectory import kept_states

    translator = Translator(load_model(args.model, args.quick), device=args.device)
    device = translator.device
    image = raw_image(translator, args.size)
    warm_up = raw_image(translator, translator.image_size)
    translator.translate(warm_up, 0, 1, steps=1, channel_axis=0, **ENGINE)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    baseline = peak_rss()
    calls = translator.denoiser.calls
    start = time.perf_counter()
    result = translator.translate(image, 0, 1, strength=1.0, steps=args.steps, channel_axis=0, **ENGINE)
    sync(device)
    seconds = time.perf_counter() - start
    states = result.inversion.states
    one_state = next(iter(states.values()))
    one_state = one_state.numel() * one_state.element_size()
    at_50 = kept_states(50, one_state, translator.trajectory_budget)
    return {
        "size": args.size, "steps": args.steps, "seconds": seconds, "unet_calls": translator.denoiser.calls - calls,
        "peak_rss_bytes": peak_rss(), "rss_before_bytes": baseline,
        "gpu_peak_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        "states_kept": len(states), "state_bytes": sum(s.numel() * s.element_size() for s in states.values()),
        "state_dtype": str(next(iter(states.values())).dtype),
        "states_kept_at_50_steps": len(at_50), "state_bytes_at_50_steps": len(at_50) * one_state,
    }


def peak_rss() -> int:
    """Peak resident set size of this process, in bytes. On Linux from VmHWM: getrusage's
    ru_maxrss survives exec, so a child would report its parent's peak if that was higher."""
    status = Path("/proc/self/status")
    if status.exists():
        line = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def bench_fields(args) -> dict:
    native = {}
    for name in ("demo", "sd-width"):
        native[name] = field_run(args, name, 0, args.steps if name == "demo" else args.sd_steps, 1)
    scaling = {str(size): field_run(args, "demo", size, args.field_steps, runs)
               for size, runs in zip(args.field_sizes, args.field_runs)}
    sizes = sorted(scaling, key=int)
    per_pixel = {s: scaling[s]["seconds"]["median"] / int(s) ** 2 for s in sizes}
    return {"native": native, "scaling": scaling, "field_steps": args.field_steps,
            "time_per_area_ratio": max(per_pixel.values()) / min(per_pixel.values())}


def field_run(args, model: str, size: int, steps: int, runs: int) -> dict:
    """`runs` child processes translating a size x size field (0: the model's native size)."""
    results = []
    for _ in range(runs):
        command = [sys.executable, str(SCRIPT), "--child", "field", "--model", model, "--size", str(size),
                   "--steps", str(steps), "--device", args.device] + ["--quick"] * args.quick
        if size == 0:
            command[command.index("--size") + 1] = str(native_size(model, args.quick))
        results.append(run_child(command))
    first = results[0]
    return {**{k: v for k, v in first.items() if k not in ("seconds", "peak_rss_bytes")},
            "seconds": summary(r["seconds"] for r in results),
            "peak_rss_bytes": summary(r["peak_rss_bytes"] for r in results)}


def native_size(model: str, quick: bool) -> int:
    return 32 if (quick or model == "sd-width") else 64


def run_child(command: list[str]) -> dict:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- report ---------------------------------------------------------------------------------


def machine(device) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {
        "device": str(device), "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu, "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def fmt(stat: dict, scale: float = 1.0, unit: str = "s", digits: int = 2) -> str:
    return (f"{stat['median'] * scale:.{digits}f} {unit} "
            f"({stat['min'] * scale:.{digits}f}–{stat['max'] * scale:.{digits}f}, n={stat['runs']})")


def markdown(results: dict) -> str:
    m = results["machine"]
    peak = results["matmul_peak_gflop_per_s"]
    models = results.get("models", [])
    lines = [
        f"Device {m['device']}{' (' + m['gpu'] + ')' if m['gpu'] else ''}, CPU {m['cpu']} ({m['cpu_count']} cores), "
        f"torch {m['torch']}, {m['threads']} thread(s), load average at start "
        f"{' / '.join(f'{x:.1f}' for x in m['load_average']) if m['load_average'] else '?'}. "
        f"Float32 matmul peak {fmt(peak, unit='GFLOP/s', digits=1)}. Median (min–max, n runs).",
        "",
        "| # | measure | " + " | ".join(r["model"] for r in models) + " | target |",
        "|---|---|" + "---|" * len(models) + "---|",
    ]

    def row(number, label, cell, target=""):
        lines.append(f"| {number} | {label} | " + " | ".join(cell(r) for r in models) + f" | {target} |")

    row("", "model", lambda r: f"{r['kind']}, {r['unet_parameters'] / 1e6:.1f} M params, "
        f"{r['image_size']} px, sample {'x'.join(map(str, r['sample_shape']))}, {r['steps']} steps")
    row(1, "first translation (invert + generate + reconstruction)", lambda r: fmt(r["first_translation_s"]))
    for key, label in (("with_reconstruction", "translation + reconstruction"),
                       ("translation_only", "translation only")):
        row(2, f"plain diffusers loop / ours, {label}", lambda r, k=key: (
            f"{fmt(r['vs_plain_diffusers'][k]['plain_s'])} / {fmt(r['vs_plain_diffusers'][k]['ours_s'])} = "
            f"**{r['vs_plain_diffusers'][k]['speedup']:.2f}x**, max abs diff "
            f"{r['vs_plain_diffusers'][k]['max_abs_diff']:.1e}"), "≥ 1.3x")
    row(3, "scrub to a new strength 0.5 / 0.1", lambda r: (
        f"{fmt(r['scrub']['cold_0.5_s'])} = {100 * r['scrub']['cold_0.5_fraction_of_first']:.0f}% / "
        f"{fmt(r['scrub']['cold_0.1_s'])} = {100 * r['scrub']['cold_0.1_fraction_of_first']:.0f}%"), "≤ 10% of (1)")
    row(3, "scrub to a strength already generated (cache)", lambda r: (
        f"{fmt(r['scrub']['cached_s'], 1000, 'ms', 1)} = {100 * r['scrub']['cached_fraction_of_first']:.1f}%"),
        "≤ 10% of (1)")
    row(3, "precompute strengths 0.1, 0.2, ..., 1.0 (background)",
        lambda r: f"{r['scrub']['ladder_precompute_s']:.1f} s" if "ladder_precompute_s" in r["scrub"] else "–")
    row(7, "at the model's defaults: first result (partial inversion) / whole inversion first", lambda r: (
        f"{fmt(r['defaults']['first_result_s'])}, {r['defaults']['unet_calls']} UNet calls / "
        f"{fmt(r['defaults']['full_inversion_first_s'])}, {r['defaults']['unet_calls_full_inversion_first']} calls"
        if "defaults" in r else "–"), "≤ 1 s first, 2x fewer calls than 152")
    row(7, "at the defaults: the preview the widget shows first (cost.preview_of)", lambda r: (
        f"{fmt(r['defaults']['preview_s'])}, {r['defaults']['preview_unet_calls']} UNet calls"
        if "preview_s" in r.get("defaults", {}) else "–"), "≤ 1 s first")
    row(7, "at the defaults: scrub 0.1 below / above the strength", lambda r: " / ".join(
        f"{fmt(r['defaults'][k]['seconds'])} = {100 * r['defaults'][k]['fraction_of_first']:.0f}%"
        for k in ("scrub_below", "scrub_above")) if "defaults" in r else "–", "≤ 10% of the first")
    row(6, "UNet GFLOP/s in the first translation", lambda r: (
        f"{r['throughput']['translation_gflop_per_s']:.1f} = "
        f"**{100 * r['throughput']['translation_gflop_per_s'] / peak['median']:.0f}%** of peak "
        f"({r['throughput']['unet_gflops_batch1']:.2f} GFLOP a forward)"), "≥ 50% of peak")
    row(6, "bare UNet forward GFLOP/s at batch 1 / 2 (/ 8)", lambda r: " / ".join(
        f"{v['gflop_per_s']['median']:.1f}" for v in r["throughput"]["unet_forward"].values()))
    if not models:
        del lines[2:]
    if "gui" in results:
        lines += gui_markdown(results["gui"])
    if "fields" in results:
        lines += fields_markdown(results["fields"])
    return "\n".join(lines)


def gui_markdown(gui: dict) -> list[str]:
    lines = ["", f"4. napari responsiveness (real viewer, Translate widget, demo model, "
                 f"{gui.get('image_size', '?')}² field, {gui.get('steps', '?')} steps): "
             + ("skipped: " + gui["skipped"] if "skipped" in gui else
                f"longest gap between 10 ms heartbeat ticks **{fmt(gui['max_gap_ms'], unit='ms', digits=0)}** "
                f"(target ≤ 50 ms) during a translation of {fmt(gui['translation_s'])}, showing the result "
                f"layers included; while the worker computes: {fmt(gui['max_gap_computing_ms'], unit='ms', digits=0)}. "
                f"First visible result ({'the preview' if gui.get('preview') else 'the translation'}) after "
                f"**{fmt(gui['first_visible_s'])}** (target ≤ 1 s).")]
    if "scrub" in gui:
        scrub, share = gui["scrub"], gui["scrub"]["fraction_of_translation"]
        lines += ["", f"3 (in the widget). Scrub from moving the slider to the result layers updated: to a strength "
                      f"the background prefetch made **{fmt(scrub['prefetched_s'], 1000, 'ms', 0)} = "
                      f"{100 * share['prefetched_s']:.1f}%** of the translation (it prefetches ±{scrub['prefetch_radius']} "
                      f"around the slider); to a strength not prefetched {fmt(scrub['new_s'])} = "
                      f"{100 * share['new_s']:.0f}% (the {scrub['debounce_ms']} ms debounce included). The prefetch "
                      f"after the last translation took {scrub['prefetch_s']:.1f} s in the background."]
    return lines


def fields_markdown(fields: dict) -> list[str]:
    lines = ["", "5. Peak RSS of one translation at native size: " + ", ".join(
        f"{name} {r['peak_rss_bytes']['median'] / 2**20:.0f} MiB" for name, r in fields["native"].items()) + ".",
              "", f"Tiled fields, demo model, {fields['field_steps']} step(s) (invert + generate + reconstruction):",
              "", "| field | time | time / area vs smallest | peak RSS | inversion states kept | kept at 50 steps |",
              "|---|---|---|---|---|---|"]
    scaling = fields["scaling"]
    base = min(scaling, key=int)
    base_rate = scaling[base]["seconds"]["median"] / int(base) ** 2
    for size, r in sorted(scaling.items(), key=lambda kv: int(kv[0])):
        rate = r["seconds"]["median"] / int(size) ** 2
        lines.append(f"| {size}² | {fmt(r['seconds'])} | {rate / base_rate:.2f} | "
                     f"{r['peak_rss_bytes']['median'] / 2**30:.2f} GiB | {r['states_kept']} ({r['state_dtype']}, "
                     f"{r['state_bytes'] / 2**20:.0f} MiB) | {r['states_kept_at_50_steps']} of 51 "
                     f"({r['state_bytes_at_50_steps'] / 2**20:.0f} MiB) |")
    lines += ["", f"Time per area, largest / smallest ratio: **{fields['time_per_area_ratio']:.2f}** (target ≤ 1.25); "
                  f"peak RSS at the largest field: "
                  f"**{scaling[max(scaling, key=int)]['peak_rss_bytes']['median'] / 2**30:.2f} GiB** "
                  "(target ≤ 3 GB)."]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny models, few steps")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", default="bench-results.json", help="where to write all numbers")
    parser.add_argument("--runs", type=int, default=None, help="repetitions per figure (default 3; quick 2)")
    parser.add_argument("--steps", type=int, default=None, help="demo model steps (default 50; quick 4)")
    parser.add_argument("--sd-steps", type=int, default=None, help="SD-width model steps (default 10; quick 4)")
    parser.add_argument("--field-steps", type=int, default=1, help="steps for the tiled fields (default 1)")
    parser.add_argument("--field-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--field-runs", type=int, nargs="+", default=None, help="runs per field size")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=SECTIONS,
                        help="what to run (default all): models = 1, 2, 3, 6; gui = 4; fields = 5")
    parser.add_argument("--child", choices=("gui", "field"), help=argparse.SUPPRESS)
    parser.add_argument("--model", default="demo", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.runs = args.runs or (2 if args.quick else 3)
    args.steps = args.steps or (4 if args.quick else 50)
    args.sd_steps = args.sd_steps or (4 if args.quick else 10)
    args.field_sizes = args.field_sizes or ([64, 128] if args.quick else [256, 512, 1024, 2048])
    args.field_runs = args.field_runs or ([1] * len(args.field_sizes) if args.quick else [3, 3, 2, 1])
    if args.child:
        print(json.dumps((gui_child if args.child == "gui" else field_child)(args)))
        return 0

    from phenotwin.modeling.denoiser import pick_device

    device = pick_device(args.device)
    results = {"machine": machine(device), "quick": args.quick,
               "matmul_peak_gflop_per_s": matmul_peak(device, 512 if args.quick else 2048, args.runs)}
    if "models" in args.sections:
        results["models"] = [bench_model(name, args, device) for name in ("demo", "sd-width")]
    if "gui" in args.sections:
        results["gui"] = bench_gui(args)
    if "fields" in args.sections:
        results["fields"] = bench_fields(args)
    results["matmul_peak_gflop_per_s_end"] = matmul_peak(device, 512 if args.quick else 2048, args.runs)
    results["markdown"] = markdown(results)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(results["markdown"])
    print(f"\nAll numbers: {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
