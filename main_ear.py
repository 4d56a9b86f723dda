"""Train or evaluate EAR: on ImageNet latents (cached or encoded on the fly) or, for a CPU
quick start, on the built-in digits with pixel tokens; single process, torchrun or SLURM.

    torchrun --nproc_per_node=8 main_ear.py --model ear_base --use_cached \
        --cached_path ${CACHED_PATH} --data_path ${IMAGENET_PATH} \
        --output_dir ${OUTPUT_DIR} --resume ${OUTPUT_DIR} ...

See README.md for the paper's commands. `--resume DIR` continues from DIR/checkpoint-last.pth
when it exists (model, EMA, optimizer, loss scaler; the next epoch, or the very step a signal or
--save_interval_minutes saved at) and starts fresh otherwise. After saving on a signal the
process exits with status 75 (EXIT_REQUEUE): docs/training.md has the SLURM set-up.
"""
import argparse
import json
import os
import time
from pathlib import Path

import torch

from engine_ear import (MetricsUnavailable, NonFiniteLoss, TokenBatches, all_ranks_finite,
                        check_metric_inputs, evaluate, train_one_epoch)
from util.args import architecture_flags, train_parser
from util.builders import (TrainState, build_dataset, build_loader, build_metrics, build_model,
                           build_train_state, class_folders, make_tokenizer, resolve_args,
                           resolve_classes, set_loader_epoch)
from util.checkpoint import (CHECKPOINT_NAME, ConfigMismatch, open_checkpoint,
                             save_training_checkpoint)
from util.distributed import (DistInfo, MainRankFailed, ReplicasDiffer, all_gather_objects,
                              check_replicas_in_sync, cleanup, init_distributed, run_on_main)
from util.fileio import atomic_write
from util.finetune import freeze, load_finetune_weights
from util.loggers import Loggers
from util.optim import EMA, load_optimizer_state
from util.pretrained import download_on_main_first, load_sampling_weights
from util.resumable import (EXIT_REQUEUE, EpochPosition, Preempted, SaveRequests, parse_signals,
                            rng_state, set_rng_state)
from util.sweep import write_sweep
from util.weights import check_weights, load_state_dict_strict


def resume(state: TrainState, args, info: DistInfo) -> EpochPosition:
    """Restore from <resume>/checkpoint-last.pth if present; return where training continues:
    inside the checkpoint's epoch if it was saved part-way through one, else at the next."""
    path, ckpt = open_checkpoint(args.resume, args, architecture_flags(args.head))
    if ckpt is None:
        if args.finetune:
            finetune(state, args, info)
        elif path is not None and info.is_main:
            print(f"no {CHECKPOINT_NAME} in --resume {args.resume}: training from scratch")
        return EpochPosition(args.start_epoch)
    saved_classes = (ckpt.get("args") or {}).get("dataset_classes")
    if saved_classes != args.dataset_classes and (saved_classes or args.dataset_classes):
        raise SystemExit(f"error: {path} was trained on --classes {saved_classes} (dataset ids), "
                         f"this run on {args.dataset_classes}: the labels would change meaning; "
                         "use --finetune to start from it on other classes")
    load_state_dict_strict(state.model, ckpt["model"], f"{path} [model]")
    if "model_ema" in ckpt:
        check_weights(state.model.state_dict(), ckpt["model_ema"], f"{path} [model_ema]", "EAR")
        state.ema.load_state_dict(ckpt["model_ema"])
    else:  # a checkpoint without EMA: restart the average from the loaded weights
        state.ema = EMA(state.model, args.ema_rate)
    if "optimizer" in ckpt:
        load_optimizer_state(state.optimizer, ckpt["optimizer"], f"{path} [optimizer]")
    if "scaler" in ckpt and state.scaler.is_enabled():
        state.scaler.load_state_dict(ckpt["scaler"])
    position = (position_inside_epoch(ckpt, path, args, info) if "step" in ckpt
                else EpochPosition(ckpt["epoch"] + 1))
    if position.epoch > args.epochs:
        raise SystemExit(f"error: {path} continues at epoch {position.epoch}, beyond --epochs "
                         f"{args.epochs}: pass --epochs above {position.epoch} to train more")
    if info.is_main:
        where = f", micro-batch {position.step}" if position.step else ""
        print(f"resumed from {path} (epoch {ckpt['epoch']}{where})")
        forget_logged_epochs_after(Path(args.output_dir) / "log.txt", position.epoch - 1)
    return position


# What cuts an epoch into steps: resuming inside one needs them unchanged.
EPOCH_LAYOUT = ("world_size", "batch_size", "accumulation_steps", "seed")


def position_inside_epoch(ckpt: dict, path, args, info: DistInfo) -> EpochPosition:
    """Where a checkpoint saved part-way through an epoch continues, with this rank's generator
    states; refused, naming the flags, unless the epoch is cut into the same steps."""
    saved = ckpt.get("args") or {}
    diffs = [f"--{n} {saved.get(n)} there, {getattr(args, n)} here" for n in EPOCH_LAYOUT
             if saved.get(n) != getattr(args, n)]
    if diffs or len(ckpt["rng"]) != info.world_size:
        raise SystemExit(f"error: {path} was saved inside epoch {ckpt['epoch']} (at micro-batch "
                         f"{ckpt['step']}); continuing there needs the same settings: "
                         + "; ".join(diffs or [f"{len(ckpt['rng'])} processes there"])
                         + " (world_size: the number of processes)")
    return EpochPosition(ckpt["epoch"], ckpt["step"], ckpt["epoch_loss_sum"], ckpt["rng"][info.rank])


def finetune(state: TrainState, args, info: DistInfo) -> None:
    """--finetune: the weights of another run (adapted to --class_num / --img_size), with a
    fresh optimizer, loss scaler, epoch and EMA (started from the loaded weights)."""
    try:
        download_on_main_first(args.finetune, args.revision, info.is_main)
        source, epoch, notes = load_finetune_weights(state.model, args)
    except (FileNotFoundError, ValueError, MainRankFailed) as e:
        raise SystemExit(f"error: --finetune: {e}") from None
    state.ema = EMA(state.model, args.ema_rate)
    if info.is_main:
        print(f"fine-tuning from {source} (its epoch {epoch}); optimizer, epoch and EMA start anew")
        for note in notes:
            print(f"  {note}")


def forget_logged_epochs_after(log: Path, epoch: int) -> None:
    """Drop the lines of epochs after `epoch` from log.txt: training resumes from an older
    checkpoint and will log them again."""
    if not log.is_file():
        return
    lines = log.read_text().splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line).get("epoch", -1) <= epoch]
    if len(kept) != len(lines):
        atomic_write(log, lambda f: f.write("".join(kept).encode()))


def sweep(model, decode, metrics, args, info, epoch: int, points, loggers=None) -> list:
    """Evaluate every (cfg, temperature) point with the model as it is; guided points at half
    the sampling batch, as the reference (the batch is doubled inside). Rank 0 gets the results."""
    results = []
    for cfg, temperature in points:
        batch = args.eval_bsz if cfg == 1.0 else max(args.eval_bsz // 2, 1)
        results.append(evaluate(model, decode, metrics, args, info, epoch, cfg, temperature,
                                batch, loggers))
    if info.is_main and len(results) > 1:
        write_sweep(results, metrics.sweep_axes, Path(args.output_dir) / f"sweep-epoch{epoch}")
    return results


def online_evaluation(state, decode, metrics, args, info, epoch: int, loggers) -> list:
    """As the reference: without guidance, then with --cfg (each value of the list; at each
    --infer_temperature); with the EMA weights, the raw ones back in the model afterwards."""
    guided = [c for c in args.cfg if c not in (0.0, 1.0)]
    points = [(cfg, t) for t in args.infer_temperature for cfg in [1.0, *guided]]
    with state.ema.applied() as model:
        return sweep(model, decode, metrics, args, info, epoch, points, loggers)


def save_checkpoint(state: TrainState, epoch: int, args, info: DistInfo,
                    position: EpochPosition = None) -> None:
    """Every rank checks that the weights and the EMA are finite (the loss guard cannot see
    everything, e.g. an overflowing update); then rank 0 writes checkpoint-last.pth, at the end
    of `epoch` or inside it at `position` with every rank's generator states, while the others
    wait (none exits before the file is in place; a failed write stops them all)."""
    weights = [p.detach() for p in state.model.parameters()] + state.ema.params
    if not all(all_ranks_finite(*weights)):
        raise NonFiniteLoss(f"non-finite weights after epoch {epoch}: {CHECKPOINT_NAME} was not "
                            f"written, the last one in {args.output_dir} is intact")
    inside = None
    if position is not None:
        inside = {"step": position.step, "epoch_loss_sum": position.loss_sum,
                  "rng": all_gather_objects(rng_state(info.device))}
    run_on_main(info.is_main, lambda: save_training_checkpoint(
        args.output_dir, state.model, state.ema, state.optimizer, state.scaler, epoch, args, inside))


def report(results: list, seconds: dict, args) -> None:
    """Print the last evaluation and write it, with timings, to <output_dir>/metrics.json."""
    summary = {"seed": args.seed, "model": args.model, "dataset": args.dataset,
               **{f"{k}_seconds": round(v, 1) for k, v in seconds.items()}, "results": results}
    path = Path(args.output_dir) / "metrics.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print("\n== report ==")
    print(f"checkpoint {Path(args.output_dir) / CHECKPOINT_NAME}; metrics {path}")
    print(f"training {seconds['train']:.0f} s, sampling and scoring {seconds['eval']:.0f} s")
    for r in results:
        scores = ", ".join(f"{k} {r[k]:.4f}" for k in ("accuracy", "frechet", "fid", "is") if k in r)
        print(f"cfg {r['cfg']}: {scores} ({r['num_images']} images); grid {r['grid']}")
    ceiling = results[0].get("ceiling") if results else None
    if ceiling:
        print("real held-out digits (ceiling): "
              + ", ".join(f"{k} {v:.4f}" for k, v in ceiling.items()))


def epoch_seed(args, rank: int, epoch: int) -> int:
    return args.seed + rank + 100_003 * epoch


def begin_epoch(loader, position: EpochPosition, args, info: DistInfo) -> None:
    """Seed this rank and point the loader at `position`. Reseeding per epoch from (seed, rank,
    epoch) makes a run resumed at an epoch's start draw what a straight run draws; inside an
    epoch the generator states saved there take over."""
    seed = epoch_seed(args, info.rank, position.epoch)
    torch.manual_seed(seed)
    loader.generator.manual_seed(seed)
    set_loader_epoch(loader, position.epoch, position.step)
    if position.rng is not None:
        set_rng_state(position.rng, info.device)


def train(state: TrainState, loader, to_tokens, decode, metrics, start: EpochPosition, args,
          info: DistInfo) -> None:
    """Epochs start.epoch .. --epochs - 1, the first from micro-batch start.step. Raises
    Preempted once the checkpoint is written after a signal."""
    requests = SaveRequests(parse_signals(args.save_signals), args.save_interval_minutes,
                            info.is_main)
    seconds, results = {"train": 0.0, "eval": 0.0}, []
    with requests.installed(), Loggers(args, info.is_main) as loggers:
        for epoch in range(start.epoch, args.epochs):
            tick = time.time()
            position = start if epoch == start.epoch else EpochPosition(epoch)
            begin_epoch(loader, position, args, info)
            stats = train_one_epoch(state, loader, to_tokens, position, args, loggers,
                                    info.is_main, requests,
                                    lambda at: save_checkpoint(state, epoch, args, info, at))
            last = epoch + 1 == args.epochs
            if epoch % args.save_last_freq == 0 or last:
                save_checkpoint(state, epoch, args, info)
                requests.saved()
            seconds["train"] += time.time() - tick
            # Unlike the reference (epoch % eval_freq == 0), no evaluation of the untrained epoch 0.
            if args.online_eval and ((epoch + 1) % args.eval_freq == 0 or last):
                tick = time.time()
                results = online_evaluation(state, decode, metrics, args, info, epoch, loggers)
                seconds["eval"] += time.time() - tick
            if info.is_main:
                line = {"epoch": epoch, **stats}
                print(json.dumps(line))
                with open(os.path.join(args.output_dir, "log.txt"), "a") as f:
                    f.write(json.dumps(line) + "\n")
    message = check_replicas_in_sync(state.model, state.ema.params)
    if info.is_main:
        print(message)
        if results:
            report(results, seconds, args)


def evaluate_checkpoint(model, tokenizer, metrics, args, info: DistInfo) -> None:
    """--evaluate: the EMA weights of a training checkpoint (no optimizer, no loss scaler), an
    exported folder or a Hub repo, at every (cfg, temperature) of the lists, loaded once."""
    try:
        download_on_main_first(args.resume, args.revision, info.is_main)
        epoch = load_sampling_weights(model, args.resume, args, args.revision)
    except (FileNotFoundError, MainRankFailed) as e:
        raise SystemExit(f"error: --evaluate needs a checkpoint (or exported weights): {e}") from None
    except ConfigMismatch as e:
        raise SystemExit(f"error: {e}; pass the network's flags (its config.json or saved args) "
                         "or sample with sample_ear.py, which reads them") from None
    except ValueError as e:  # a bad file: its name and the key are in the message
        raise SystemExit(f"error: {e}") from None
    if info.is_main:
        print(f"evaluating the EMA weights of {args.resume} (epoch {epoch})")
    points = [(cfg, t) for t in args.infer_temperature for cfg in args.cfg]
    with Loggers(args, info.is_main) as loggers:
        sweep(model, tokenizer.decode, metrics, args, info, epoch, points, loggers)


def main(args: argparse.Namespace) -> None:
    info = init_distributed(args.device, args.dist_url, args.dist_on_itp, args.dist_timeout)
    resolve_args(args, info)
    torch.manual_seed(args.seed + info.rank)
    if info.is_main:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    model = build_model(args).to(info.device)
    frozen = freeze(model, args.freeze)  # before DDP, which registers only what trains
    sampling = args.evaluate or args.online_eval
    tokenizer = make_tokenizer(args, info.device, load=sampling or not args.use_cached)
    metrics = build_metrics(args, info)
    if args.evaluate:
        if args.classes:
            resolve_classes(args, class_folders(args))
        try:
            evaluate_checkpoint(model, tokenizer, metrics, args, info)
        except (MetricsUnavailable, MainRankFailed) as e:
            raise SystemExit(f"[rank {info.rank}] error: {e}") from None
        cleanup()
        return
    loader = build_loader(build_dataset(args, tokenizer), args, info)
    state = build_train_state(model, args, info)
    start = resume(state, args, info)
    if start.epoch == args.epochs:
        if info.is_main:
            print(f"nothing to do: the checkpoint in --resume {args.resume} has all "
                  f"{args.epochs} epochs")
        cleanup()
        return
    if args.online_eval:  # statistics, Inception weights: fail now, not after eval_freq epochs
        try:
            check_metric_inputs(metrics, info)
        except MetricsUnavailable as e:
            raise SystemExit(f"[rank {info.rank}] error: {e}") from None
    if info.is_main:
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        if frozen:
            print(f"--freeze {args.freeze}: {len(frozen)} tensors fixed, "
                  f"{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M "
                  "parameters train")
        print(f"{args.model} with the {args.head} head: {n_params:.2f}M parameters; "
              f"{info.world_size} process(es) on {info.device}; {state.precision}; lr {args.lr:.2e}; "
              f"epochs {start.epoch}..{args.epochs - 1}")
    batches = TokenBatches(tokenizer, args.use_cached, info.device)
    try:
        train(state, loader, batches, tokenizer.decode, metrics, start, args, info)
    except (NonFiniteLoss, ReplicasDiffer, MainRankFailed) as e:
        raise SystemExit(f"[rank {info.rank}] error: {e}") from None
    except Preempted as e:
        if info.is_main:
            print(f"{e}: {CHECKPOINT_NAME} written to {args.output_dir}; exiting with status "
                  f"{EXIT_REQUEUE} (continue with --resume {args.output_dir})", flush=True)
        cleanup()
        raise SystemExit(EXIT_REQUEUE) from None
    cleanup()


if __name__ == "__main__":
    main(train_parser().parse_args())
