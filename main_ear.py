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
if __name__ == "__main__":  # first, before the slow imports: a preemption notice is not lost
    from util.signals import remember_early
    remember_early()

import argparse
import json
import os
import time
from pathlib import Path

import torch

from engine_ear import (MetricsUnavailable, NonFiniteLoss, TokenBatches, all_ranks_finite,
                        check_metric_inputs, check_room_for_samples, evaluate, train_one_epoch)
from util.args import architecture_flags, train_parser
from util.builders import (TrainState, build_dataset, build_ema, build_loader, build_metrics,
                           build_model, build_train_state, class_folders, make_tokenizer,
                           resolve_args, resolve_classes, set_loader_epoch)
from util.checkpoint import CHECKPOINT_NAME, open_checkpoint, save_training_checkpoint
from util.distributed import (DistInfo, MainRankFailed, ReplicasDiffer, all_gather_objects,
                              check_replicas_in_sync, cleanup, init_distributed,
                              run_on_main)
from util.errors import one_line_errors
from util.fileio import atomic_write, check_writable
from util.finetune import freeze, load_finetune_weights
from util.loggers import Loggers
from util.optim import EMA_WARM, load_optimizer_state
from util.precision import describe_precision, set_up_cuda
from util.pretrained import download_on_main_first, load_sampling_weights
from util.resumable import EpochPosition, Preempted, SaveRequests, rng_state, set_rng_state
from util.settings import ConfigMismatch
from util.signals import EXIT_REQUEUE, keep_early, parse_signals
from util.sweep import write_sweep
from util.weights import check_weights, load_state_dict_strict


def resume(state: TrainState, args, info: DistInfo) -> EpochPosition:
    """Restore from <resume>/checkpoint-last.pth if present; return where training continues:
    inside the checkpoint's epoch if it was saved part-way through one, else at the next."""
    try:
        path, ckpt = open_checkpoint(args.resume, args, architecture_flags(args.head))
    except ConfigMismatch as e:
        raise ConfigMismatch(f"{e} (resume with the flags it was trained with, or start from its "
                             "weights with --finetune)") from None
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
        # Without the count (a run saved with the warm-up off) the average is already long.
        state.ema.updates = ckpt.get("ema_updates", EMA_WARM)
    else:  # a checkpoint without EMA: restart the average from the loaded weights
        state.ema = build_ema(state.model, args)
    if "optimizer" in ckpt:
        load_optimizer_state(state.optimizer, ckpt["optimizer"], f"{path} [optimizer]",
                             "resume with the --freeze it was saved with, or start from its "
                             "weights with --finetune")
    if "scaler" in ckpt and state.scaler.is_enabled():
        state.scaler.load_state_dict(ckpt["scaler"])
    if "step" in ckpt:
        position = position_inside_epoch(ckpt, path, args, info)
    elif isinstance(ckpt.get("evaluation_due"), dict) and args.online_eval:
        # Trained and saved, but stopped during the epoch's evaluation: evaluate it again.
        position = EpochPosition(ckpt["epoch"], evaluation_due=ckpt["evaluation_due"])
    else:
        position = EpochPosition(ckpt["epoch"] + 1)
    if position.epoch > args.epochs:
        raise SystemExit(f"error: {path} continues at epoch {position.epoch}, beyond --epochs "
                         f"{args.epochs}: pass --epochs above {position.epoch} to train more")
    if info.is_main:
        where = (f", micro-batch {position.step}" if position.step else
                 ", its evaluation to do" if position.evaluation_due else "")
        print(f"resumed from {path} (epoch {ckpt['epoch']}{where})")
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
    download_on_main_first(args.finetune, args.revision, info.is_main, "--finetune")
    source, epoch, notes = load_finetune_weights(state.model, args)
    state.ema = build_ema(state.model, args)
    if info.is_main:
        print(f"fine-tuning from {source} (its epoch {epoch}); optimizer, epoch and EMA start anew")
        for note in notes:
            print(f"  {note}")


def logged_epoch(line: str):
    """The epoch of a log.txt line, or None for a line a kill cut short (no complete JSON)."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError:
        return None
    return entry.get("epoch", -1) if isinstance(entry, dict) else None


def forget_logged_epochs_after(log: Path, epoch: int) -> None:
    """Drop the lines of epochs after `epoch` from log.txt (training continues from an older
    checkpoint and will log them again), and a last line cut short by a kill, which the next
    line would otherwise be appended to."""
    if not log.is_file():
        return
    lines = log.read_text(errors="replace").splitlines(keepends=True)
    epochs = [logged_epoch(line) if line.endswith("\n") else None for line in lines]
    whole = [(line, e) for line, e in zip(lines, epochs) if e is not None]
    if len(whole) != len(lines):
        print(f"note: {log}: dropped {len(lines) - len(whole)} line(s) cut short by a killed run")
    kept = [line for line, e in whole if e <= epoch]
    if len(kept) != len(lines):
        atomic_write(log, lambda f: f.write("".join(kept).encode()))


def sweep(model, decode, metrics, args, info, epoch: int, points, loggers=None,
          requests: SaveRequests = None) -> list:
    """Evaluate every (cfg, temperature) point with the model as it is; guided points at half
    the sampling batch, as the reference (the batch is doubled inside). Rank 0 gets the results.
    With `requests`, a save signal stops it within one sampling batch (Preempted)."""
    results = []
    for cfg, temperature in points:
        batch = args.eval_bsz if cfg == 1.0 else max(args.eval_bsz // 2, 1)
        results.append(evaluate(model, decode, metrics, args, info, epoch, cfg, temperature,
                                batch, loggers, requests))
    if info.is_main and len(results) > 1:
        write_sweep(results, metrics.sweep_axes, Path(args.output_dir) / f"sweep-epoch{epoch}")
    return results


def online_evaluation(state, decode, metrics, args, info, epoch: int, loggers, requests) -> list:
    """As the reference: without guidance, then with --cfg (each value of the list; at each
    --infer_temperature); with the EMA weights, the raw ones back in the model afterwards.
    The caching allocator's free blocks are handed back before and after, as the reference
    does: sampling's batches and training's activations have different shapes."""
    guided = [c for c in args.cfg if c not in (0.0, 1.0)]
    points = [(cfg, t) for t in args.infer_temperature for cfg in [1.0, *guided]]
    release_cached_memory(info.device)
    try:
        with state.ema.applied() as model:
            return sweep(model, decode, metrics, args, info, epoch, points, loggers, requests)
    finally:
        release_cached_memory(info.device)


def release_cached_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def save_checkpoint(state: TrainState, epoch: int, args, info: DistInfo,
                    position: EpochPosition = None, evaluation_due: dict = None) -> None:
    """Every rank checks that the weights and the EMA are finite (the loss guard cannot see
    everything, e.g. an overflowing update); then rank 0 writes checkpoint-last.pth, at the end
    of `epoch` or inside it at `position` with every rank's generator states, while the others
    wait (none exits before the file is in place; a failed write stops them all).
    `evaluation_due`: saved at the end of `epoch` before its online evaluation, with the epoch's
    log line ({"loss", "lr"}): a run resumed from it evaluates that epoch before going on."""
    weights = [p.detach() for p in state.model.parameters()] + state.ema.params
    if not all(all_ranks_finite(*weights)):
        raise NonFiniteLoss(f"non-finite weights after epoch {epoch}: {CHECKPOINT_NAME} was not "
                            f"written, the last one in {args.output_dir} is intact")
    extra = {"ema_updates": state.ema.updates} if state.ema.warmup else {}
    if position is not None:
        extra.update(step=position.step, epoch_loss_sum=position.loss_sum,
                     rng=all_gather_objects(rng_state(info.device)))
    elif evaluation_due is not None:
        extra["evaluation_due"] = evaluation_due
    run_on_main(info.is_main, lambda: save_training_checkpoint(
        args.output_dir, state.model, state.ema, state.optimizer, state.scaler, epoch, args, extra))


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
    with requests.installed():
        # A signal while the run started (even during `import torch`): nothing new to save.
        requests.stop_if_signalled(info.device, "during start-up, before the first step", False)
        with Loggers(args, info.is_main) as loggers:
            for epoch in range(start.epoch, args.epochs):
                results = run_epoch(state, loader, to_tokens, decode, metrics, start, epoch,
                                    requests, loggers, seconds, args, info) or results
    message = check_replicas_in_sync(state.model, state.ema.params)
    if info.is_main:
        print(message)
        if results:
            report(results, seconds, args)


def run_epoch(state, loader, to_tokens, decode, metrics, start: EpochPosition, epoch: int,
              requests, loggers, seconds: dict, args, info: DistInfo) -> list:
    """Train one epoch (unless a resumed checkpoint has it trained, its evaluation to do), save
    and evaluate when due, log its line; the evaluation's results."""
    position = start if epoch == start.epoch else EpochPosition(epoch)
    last = epoch + 1 == args.epochs
    evaluating = args.online_eval and ((epoch + 1) % args.eval_freq == 0 or last)
    stats = position.evaluation_due
    if stats is None:
        tick = time.time()
        begin_epoch(loader, position, args, info)
        stats = train_one_epoch(state, loader, to_tokens, position, args, loggers, info.is_main,
                                requests, lambda at: save_checkpoint(state, epoch, args, info, at))
        if evaluating:  # saved first: a signal during the evaluation loses no training
            save_checkpoint(state, epoch, args, info, evaluation_due=stats)
            requests.saved()
        elif epoch % args.save_last_freq == 0 or last:
            save_checkpoint(state, epoch, args, info)
            requests.saved()
        seconds["train"] += time.time() - tick
    results = []
    # Unlike the reference (epoch % eval_freq == 0), no evaluation of the untrained epoch 0.
    if evaluating:
        tick = time.time()
        results = online_evaluation(state, decode, metrics, args, info, epoch, loggers, requests)
        seconds["eval"] += time.time() - tick
        if last:  # the finished run's checkpoint, with nothing left to do
            save_checkpoint(state, epoch, args, info)
    if info.is_main:
        line = {"epoch": epoch, **stats}
        print(json.dumps(line))
        with open(os.path.join(args.output_dir, "log.txt"), "a") as f:
            f.write(json.dumps(line) + "\n")
    return results


def evaluate_checkpoint(args, info: DistInfo) -> None:
    """--evaluate: the EMA weights of a training checkpoint (no optimizer, no loss scaler), an
    exported folder or a Hub repo, at every (cfg, temperature) of the lists, loaded once."""
    with one_line_errors():
        model, tokenizer, metrics = build_common(args, info)
        set_up_cuda(info.device, args.tf32)  # training's comes with its state (build_train_state)
        if args.classes:
            resolve_classes(args, class_folders(args))
        download_on_main_first(args.resume, args.revision, info.is_main)
        try:
            epoch = load_sampling_weights(model, args.resume, args, args.revision)
        except ConfigMismatch as e:
            raise ValueError(f"{e}; pass the network's flags (its config.json or saved args) "
                             "or sample with sample_ear.py, which reads them") from None
        check_metric_inputs(metrics, info)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    if info.is_main:
        print(f"evaluating the EMA weights of {args.resume} (epoch {epoch})")
    points = [(cfg, t) for t in args.infer_temperature for cfg in args.cfg]
    with Loggers(args, info.is_main) as loggers:
        sweep(model, tokenizer.decode, metrics, args, info, epoch, points, loggers)


def build_common(args, info: DistInfo) -> tuple:
    """(model, tokenizer, metrics) after every flag and output has been checked; nothing
    written yet. The tokenizer's network is loaded only where it will encode or decode."""
    resolve_args(args, info)
    check_writable(args.output_dir, "--output_dir", folder=True)
    check_writable(args.log_dir, "--log_dir", folder=True)
    if args.evaluate or args.online_eval:
        check_room_for_samples(args)
    torch.manual_seed(args.seed + info.rank)
    model = build_model(args).to(info.device)
    sampling = args.evaluate or args.online_eval
    tokenizer = make_tokenizer(args, info.device, load=sampling or not args.use_cached)
    return model, tokenizer, build_metrics(args, info)


def set_up_training(args, info: DistInfo) -> tuple:
    """(training state, loader, tokenizer, metrics, where training starts), every input
    checked and loaded; nothing written yet. Bad input ends every rank with one line."""
    with one_line_errors():
        model, tokenizer, metrics = build_common(args, info)
        frozen = freeze(model, args.freeze)  # before DDP, which registers only what trains
        loader = build_loader(build_dataset(args, tokenizer), args, info)
        state = build_train_state(model, args, info)
        start = resume(state, args, info)
        if args.online_eval:  # statistics, Inception weights: fail now, not after eval_freq epochs
            check_metric_inputs(metrics, info)
    if info.is_main:
        describe(state, frozen, start, args, info)
    return state, loader, tokenizer, metrics, start


def describe(state: TrainState, frozen: list, start: EpochPosition, args, info: DistInfo) -> None:
    model = state.model
    if frozen:
        print(f"--freeze {args.freeze}: {len(frozen)} tensors fixed, "
              f"{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M "
              "parameters train")
    print(f"{args.model} with the {args.head} head: "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
          f"{info.world_size} process(es) on {info.device}; "
          f"{describe_precision(state.precision, info.device, args.tf32)}; lr {args.lr:.2e}; "
          f"epochs {start.epoch}..{args.epochs - 1}")
    if getattr(model.head, "many_targets", False):
        if args.target_dequantize:
            targets = (f"{args.score_targets} target(s): the pixels plus uniform noise of width "
                       f"{args.target_dequantize}")
        elif args.score_targets > 1:
            targets = f"{args.score_targets} targets drawn from the posterior"
        else:
            targets = "the token itself as target"
        print(f"energy score: alpha {args.alpha}, tau {args.train_temperature}; per masked token "
              f"{args.score_batch_mul} x {args.score_samples} generator draws, {targets}")


def run_training(args, info: DistInfo) -> None:
    state, loader, tokenizer, metrics, start = set_up_training(args, info)
    if start.epoch == args.epochs:
        if info.is_main:
            print(f"nothing to do: the checkpoint in --resume {args.resume} has all "
                  f"{args.epochs} epochs")
        return
    if info.is_main:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        forget_logged_epochs_after(Path(args.output_dir) / "log.txt", start.epoch - 1)
    batches = TokenBatches(tokenizer, args.use_cached, info.device, args.score_targets)
    try:
        train(state, loader, batches, tokenizer.decode, metrics, start, args, info)
    except Preempted as e:
        if info.is_main:
            saved = (f"{CHECKPOINT_NAME} written to {args.output_dir}" if e.saved
                     else "nothing new to save")
            print(f"{e}: {saved}; exiting with status {EXIT_REQUEUE} (continue with --resume "
                  f"{args.output_dir})", flush=True)
        cleanup()
        raise SystemExit(EXIT_REQUEUE) from None


def main(args: argparse.Namespace) -> None:
    # Signals the run does not save on get their usual effect back (--evaluate saves on none).
    keep_early([] if args.evaluate else parse_signals(args.save_signals))
    info = init_distributed(args.device, args.dist_url, args.dist_on_itp, args.dist_timeout)
    try:
        (evaluate_checkpoint if args.evaluate else run_training)(args, info)
    except (MetricsUnavailable, NonFiniteLoss, ReplicasDiffer, MainRankFailed) as e:
        raise SystemExit(f"[rank {info.rank}] error: {e}") from None
    cleanup()


if __name__ == "__main__":
    main(train_parser().parse_args())
