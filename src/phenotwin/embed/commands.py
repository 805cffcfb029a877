"""`phenotwin embed train | evaluate | map | map-check`: the batch-robust encoder and the phenotype map."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from phenotwin.embed.trainer import METHODS, EmbedConfig

METRIC_NAMES = (("knn_condition_accuracy", "kNN condition accuracy", "condition_chance"),
                ("knn_batch_accuracy", "kNN batch accuracy", "batch_chance"),
                ("silhouette_condition", "silhouette by condition", None),
                ("silhouette_batch", "silhouette by batch", None))


def add_parser(commands) -> None:
    embed = commands.add_parser(
        "embed", help="batch-robust cell features (CDCL): train an encoder, measure a feature space",
        description="Features that keep the condition and ignore batch effects, learnt from images of the same "
        "condition in different batches (DIR/batches.csv). See docs/embedding.md.")
    actions = embed.add_subparsers(dest="embed_command", required=True, metavar="ACTION")
    defaults = {f.name: f.default for f in fields(EmbedConfig)}
    train = actions.add_parser("train", help="train the encoder (resumable with --resume)")
    train.add_argument("--data", type=Path, required=True,
                       help="DIR/<condition>/*.tif with DIR/batches.csv (file,condition,batch per image)")
    train.add_argument("--out", type=Path, required=True, help="folder for encoder.safetensors and encoder.json")
    train.add_argument("--method", choices=METHODS, default=defaults["method"],
                       help="cdcl: positives are the same condition in another batch; simclr: augmented views of "
                       "the same image only, no metadata (the baseline) (default: %(default)s)")
    for name, kind, text in (("steps", int, "optimizer steps"), ("batch_size", int, "views per step"),
                             ("size", int, "crop size in pixels"), ("width", int, "channels of the first layer"),
                             ("learning_rate", float, "AdamW learning rate"),
                             ("warmup_steps", int, "steps of linear learning-rate warm-up (0: none)"),
                             ("temperature", float, "softmax temperature of the loss"),
                             ("save_every", int, "steps between saves of the weights and the resumable state"),
                             ("seed", int, "random stream of the weights and the views")):
        train.add_argument(f"--{name.replace('_', '-')}", type=kind, default=defaults[name],
                           help=f"{text} (default: %(default)s)")
    train.add_argument("--resume", action="store_true", help="continue the training saved in --out")
    train.add_argument("--overwrite", action="store_true", help="replace an encoder phenotwin wrote in --out")

    evaluate = actions.add_parser("evaluate", help="kNN accuracy and silhouettes of an encoder's features on a data set")
    evaluate.add_argument("--encoder", type=Path, required=True, help="folder written by `phenotwin embed train`")
    evaluate.add_argument("--data", type=Path, required=True, help="DIR/<condition>/*.tif with DIR/batches.csv")
    evaluate.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")

    add_map_parser(actions)

    check = actions.add_parser("map-check", help="the Affinity-VAE phenotype map against a plain VAE on synthetic "
                               "single cells of known rotation")
    check.add_argument("--json", type=Path, required=True, help="file for the measured numbers")
    check.add_argument("-n", type=int, default=200, help="training cells per condition (default: %(default)s)")
    check.add_argument("--steps", type=int, default=400, help="steps per model (default: %(default)s)")
    check.add_argument("--gamma", type=float, default=1.0, help="weight of the affinity loss (default: %(default)s)")
    check.add_argument("--seed", type=int, default=0)


# `embed map`'s options that shape a VAE trained by --vae: one place for their defaults and the check
# that refuses them with --vae-from (whose map has its own).
VAE_DEFAULTS = {"vae_steps": 400, "vae_size": 32, "gamma": 1.0, "seed": 0}


def add_map_parser(actions) -> None:
    mapping = actions.add_parser(
        "map", help="a phenotype map of your data: map.png, map.csv, map.json (silhouettes, kNN) and report.md",
        description="Project the images of DIR/<condition>/* (batches from DIR/batches.csv when present) to 2-D in "
        "the features of a trained encoder, or of an Affinity-VAE trained here; measure how well the features "
        "tell conditions and batches apart. See docs/embedding.md.")
    mapping.add_argument("--data", type=Path, required=True,
                         help="DIR/<condition>/*.tif, optionally with DIR/batches.csv (file,condition,batch)")
    mapping.add_argument("--out", type=Path, required=True, help="folder for map.png, map.csv, map.json, report.md")
    features = mapping.add_mutually_exclusive_group(required=True)
    features.add_argument("--encoder", type=Path, help="folder written by `phenotwin embed train`")
    features.add_argument("--vae", action="store_true", help="train an Affinity-VAE on the data and map its content "
                          "latents (pose left out); the VAE is saved with the map for --vae-from")
    features.add_argument("--vae-from", type=Path, metavar="MAP_DIR",
                          help="place the data on a map made before with --vae (its --out folder): the same VAE and "
                          "axes, nothing trained, so two data sets can be compared on one map")
    mapping.add_argument("--affinity", type=Path, default=None,
                         help="with --vae: the conditions' affinity matrix, a CSV (header of condition names)")
    mapping.add_argument("--affinity-from", type=Path, default=None,
                         help="with --vae: an encoder folder whose class-mean feature similarities are the affinity")
    mapping.add_argument("--gamma", type=float, default=VAE_DEFAULTS["gamma"],
                         help="with --vae and an affinity: weight of the affinity loss (default: %(default)s)")
    mapping.add_argument("--vae-steps", type=int, default=VAE_DEFAULTS["vae_steps"],
                         help="with --vae: training steps (default: %(default)s)")
    mapping.add_argument("--vae-size", type=int, default=VAE_DEFAULTS["vae_size"],
                         help="with --vae: the images are resized to this square, a multiple of 8 (default: %(default)s)")
    mapping.add_argument("--seed", type=int, default=VAE_DEFAULTS["seed"],
                         help="with --vae: the random stream (default: %(default)s)")
    mapping.add_argument("--overwrite", action="store_true",
                         help="replace a map phenotwin wrote in --out (other files there are never replaced)")


def run_map(args: argparse.Namespace) -> int:
    from phenotwin.embed import datamap
    from phenotwin.errors import PhenotwinError
    from phenotwin.progress import drive, tqdm_steps

    if args.vae_from is not None and args.vae_from.resolve() == args.out.resolve():
        raise PhenotwinError(f"--out {args.out} is the map given to --vae-from: the new map would replace the one it "
                             "is placed on. Choose another --out.")
    if not args.vae and (args.affinity or args.affinity_from):
        raise PhenotwinError("--affinity and --affinity-from shape the Affinity-VAE trained by --vae: "
                             + ("a saved map's VAE (--vae-from) is trained already; leave them out."
                                if args.vae_from is not None else "add --vae, or leave them out."))
    trained_with = {"--" + name.replace("_", "-"): getattr(args, name) != default
                    for name, default in VAE_DEFAULTS.items()}
    if args.vae_from is not None and any(trained_with.values()):
        raise PhenotwinError(f"{', '.join(k for k, v in trained_with.items() if v)} shape a VAE trained by --vae; the "
                             "map given to --vae-from has its own (see its vae.json). Leave them out, or make a new "
                             "map with --vae.")
    datamap.check_out(args.out, args.data, args.overwrite)  # before any work
    if args.vae_from is not None:
        steps = datamap.placed_vae_map_steps(args.data, args.vae_from)
    elif args.vae:
        steps = datamap.vae_map_steps(args.data, args.vae_steps, args.vae_size, args.affinity, args.affinity_from,
                                      args.gamma, args.seed)
    else:
        steps = datamap.encoder_map_steps(args.data, args.encoder)
    result = drive(steps, tqdm_steps("embed map"))
    report = datamap.write_map(result, args.out, args.overwrite, "phenotwin " + " ".join(sys.argv[1:]))
    for line in describe(result.metrics):
        print(line)
    if result.source.get("warning"):
        print(f"warning: {result.source['warning']}", file=sys.stderr)
    print(f"wrote {report.parent}")
    return 0


def describe(metrics: dict) -> list[str]:
    lines = []
    for key, name, chance in METRIC_NAMES:
        if key in metrics:
            lines.append(f"{name}: {metrics[key]:.3f}" + (f" (chance {metrics[chance]:.3f})" if chance else ""))
    for condition, row in metrics.get("nearest_map_condition", {}).items():
        lines.append(f"{condition} lands nearest the map's {row['nearest']} (distance "
                     f"{row['distances'][row['nearest']]:.2f} of the map's own spread)")
    return lines


def run(args: argparse.Namespace) -> int:
    if args.embed_command == "train":
        from phenotwin.embed.model import load_encoder
        from phenotwin.embed.trainer import train_steps
        from phenotwin.progress import drive, tqdm_steps

        config = EmbedConfig(**{f.name: getattr(args, f.name) for f in fields(EmbedConfig)
                                if f.name not in ("data", "out", "projection")},
                             data=str(args.data), out=str(args.out))
        try:
            out = drive(train_steps(config, "phenotwin " + " ".join(sys.argv[1:])), tqdm_steps("embed train"))
        except KeyboardInterrupt:
            print(f"interrupted: add --resume to continue from the last save in {args.out}", file=sys.stderr)
            raise
        encoder = load_encoder(out)
        for line in describe(encoder.info["metrics"]):
            print(line)
        print(f"wrote {out}")
        return 0
    if args.embed_command == "map":
        return run_map(args)
    if args.embed_command == "map-check":
        from phenotwin.embed.map_check import map_check_steps
        from phenotwin.io import write_json
        from phenotwin.progress import drive, tqdm_steps

        result = drive(map_check_steps(args.n, args.steps, gamma=args.gamma, seed=args.seed), tqdm_steps("map-check"))
        for name in ("affinity-vae", "affinity-vae without rotation consistency", "plain vae"):
            r = result[name]
            pose = "" if r["pose_follows_rotation"] is None else f", pose follows rotation {r['pose_follows_rotation']:.3f}"
            print(f"{name}: silhouette by condition {r['silhouette_condition']:.3f} (rotated cells "
                  f"{r['silhouette_condition_rotated']:.3f}), reconstruction MSE {r['reconstruction_mse']:.4f}{pose}")
        write_json(args.json, result)
        return 0
    from phenotwin.embed.data import load_batched
    from phenotwin.embed.metrics import feature_report
    from phenotwin.embed.model import load_encoder

    encoder = load_encoder(args.encoder)
    data = load_batched(args.data, 8, normalization=encoder.info["normalization"])
    if data.classes != encoder.classes:
        print(f"note: the data's conditions ({', '.join(data.classes)}) differ from the encoder's "
              f"({', '.join(encoder.classes)})", file=sys.stderr)
    metrics = feature_report(encoder.features(data.stacked(), raw=False), data.labels, data.batches)
    for line in describe(metrics):
        print(line)
    if args.json is not None:
        from phenotwin.io import write_json

        write_json(args.json, {"encoder": str(args.encoder), "data": str(args.data), **metrics})
    return 0
