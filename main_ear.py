"""Train or evaluate EAR: on ImageNet latents (cached or encoded on the fly) or, for a CPU
quick start, on the built-in digits with pixel tokens; single process, torchrun or SLURM.

    torchrun --nproc_per_node=8 main_ear.py --model ear_base --use_cached \
        --cached_path ${CACHED_PATH} --data_path ${IMAGENET_PATH} \
        --output_dir ${OUTPUT_DIR} --resume ${OUTPUT_DIR} ...

See README.md for the paper's commands. `--resume DIR` continues from DIR/checkpoint-last.pth
when it exists (model, EMA, optimizer, loss scaler; the next epoch) and starts fresh otherwise.
"""
import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.datasets import ImageFolder

from engine_ear import (LatentBatches, NonFiniteLoss, TrainState, all_ranks_finite,
                        check_metric_inputs, evaluate, train_one_epoch)
from models.ear import MODEL_SIZES, ear_models
from models.vae import LATENT_SCALE, load_vae
from util.args import MODEL_ARGS, check_positive, train_parser
from util.checkpoint import (CHECKPOINT_NAME, load_sampling_weights, open_checkpoint,
                             save_training_checkpoint)
from util.distributed import (DistInfo, ReplicasDiffer, check_replicas_in_sync, cleanup,
                              init_distributed)
from util.fileio import atomic_write
from util.loader import CachedFolder, image_transform, load_rgb, train_folder
from util.optim import EMA, load_optimizer_state, param_groups
from util.precision import resolve_precision
from util.weights import check_state_dict, load_state_dict_strict


def resolve_args(args: argparse.Namespace, info: DistInfo) -> None:
    """Fill in derived values (so the saved `args` are concrete) and reject bad settings, each
    with the flag named, before anything is built."""
    check_positive(args, "batch_size", "epochs", "accumulation_steps", "img_size",
                   "save_last_freq", "print_freq", "eval_bsz", "eval_freq", "num_iter",
                   "infer_temperature")
    if not 0.0 <= args.ema_rate < 1.0:
        raise SystemExit(f"error: --ema_rate must be in [0, 1), got {args.ema_rate}")
    for name in ("blr", "lr", "min_lr", "weight_decay", "warmup_epochs", "cfg"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise SystemExit(f"error: --{name} must be a finite number >= 0, got {value}")
    if (args.evaluate or args.online_eval) and args.num_images % args.class_num:
        raise SystemExit(f"error: --num_images {args.num_images} must be a multiple of "
                         f"--class_num {args.class_num} (the same number of images per class)")
    for name, value in MODEL_SIZES[args.model].items():  # unset sizes: the named model's
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.world_size = info.world_size
    if args.lr is None:  # linear scaling rule on the global batch
        args.lr = args.blr * args.batch_size * info.world_size * args.accumulation_steps / 256
    if args.log_dir is None:
        args.log_dir = args.output_dir
    check_data_args(args)
    if args.img_size % (args.vae_stride * args.patch_size):
        raise SystemExit(f"error: --img_size {args.img_size} must be divisible by --vae_stride "
                         f"* --patch_size = {args.vae_stride * args.patch_size}")
    seq_len = (args.img_size // (args.vae_stride * args.patch_size)) ** 2
    if (args.evaluate or args.online_eval) and args.num_iter > seq_len:
        raise SystemExit(f"error: --num_iter {args.num_iter} is more than the {seq_len} tokens "
                         "of an image: at most one step per token")


def check_data_args(args) -> None:
    """The dataset and tokenizer flags must describe the same images."""
    if args.dataset == "digits":
        from util.digits import NUM_CLASSES, SIDE
        if args.img_size != SIDE or args.class_num != NUM_CLASSES or args.use_cached:
            raise SystemExit(f"error: --dataset digits has {SIDE}x{SIDE} images in {NUM_CLASSES} "
                             f"classes and no cache: pass --img_size {SIDE} --class_num "
                             f"{NUM_CLASSES} and no --use_cached")
    if args.tokenizer == "pixel":
        channels = 1 if args.dataset == "digits" else 3
        if args.vae_stride != 1 or args.vae_embed_dim != channels or args.use_cached:
            raise SystemExit(f"error: --tokenizer pixel uses the {channels}-channel pixels as "
                             f"tokens: pass --vae_stride 1 --vae_embed_dim {channels} and no "
                             "--use_cached")


def build_dataset(args):
    """The digits, cached moments (--use_cached) or images; checks the classes and shapes."""
    if args.dataset == "digits":
        from util.digits import DigitsDataset
        return DigitsDataset()
    if args.use_cached:
        if not args.cached_path:
            raise SystemExit("error: --use_cached needs --cached_path (the main_cache.py output)")
        side = args.img_size // args.vae_stride
        dataset = CachedFolder(args.cached_path, expected_shape=(2 * args.vae_embed_dim, side, side))
        dataset[0]  # fail now, not mid-epoch, if the cache does not match the flags
        source = f"--cached_path {args.cached_path}"
    else:
        folder = train_folder(args.data_path)
        if not folder.is_dir():
            raise FileNotFoundError(f"--data_path {args.data_path}: expected training images in "
                                    f"{folder}/<class>/<image>")
        dataset = ImageFolder(folder, image_transform(args.img_size, random_flip=True), loader=load_rgb)
        source = f"--data_path {args.data_path}"
    if len(dataset.classes) != args.class_num:
        raise SystemExit(f"error: {source} has {len(dataset.classes)} class folders but "
                         f"--class_num is {args.class_num}")
    return dataset


def build_loader(dataset, args, info: DistInfo) -> DataLoader:
    # A distributed sampler even in one process: shuffling then depends only on (seed, epoch).
    sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank,
                                 shuffle=True, drop_last=True, seed=args.seed)
    # Workers are started anew each epoch (not persistent), their seeds drawn from `generator`,
    # which `train` reseeds per epoch from (seed, rank, epoch): worker w of an epoch draws the
    # same flips whether the run was resumed or not.
    loader = DataLoader(dataset, sampler=sampler, batch_size=args.batch_size,
                        num_workers=args.num_workers, drop_last=True,
                        generator=torch.Generator(),
                        pin_memory=args.pin_mem and info.device.type == "cuda")
    if len(loader) < args.accumulation_steps:
        raise SystemExit(f"error: {len(dataset)} samples give {len(loader)} batches of "
                         f"{args.batch_size} per process, fewer than --accumulation_steps "
                         f"{args.accumulation_steps}")
    return loader


def build_model(args):
    names = ("decoder_embed_dim", "decoder_depth", "decoder_num_heads", "img_size", "vae_stride",
             "patch_size", "vae_embed_dim", "mask_ratio_min", "label_drop_prob", "class_num", "attn_dropout", "proj_dropout", "buffer_size",
             "scoreloss_d", "scoreloss_w", "score_batch_mul", "grad_checkpointing", "alpha",
             "noise_channels", "train_temperature")
    try:
        return ear_models[args.model](**{n: getattr(args, n) for n in names})
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e


def build_train_state(model, args, info: DistInfo) -> TrainState:
    precision = resolve_precision(args.precision, info.device)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay, args.score_lrscale),
                                  lr=args.lr, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler(info.device.type, enabled=precision == "fp16")
    if args.compile:
        # Compile the parts with stable shapes: the Transformer always sees (B, buffer + L, width);
        # the generator's row count follows the mask ratio, so it is compiled for dynamic shapes.
        model.forward_transformer = torch.compile(model.forward_transformer)
        model.scoreloss.net.compile(dynamic=True)
    ddp = None
    train_model = model
    if info.distributed:
        # DDP's constructor broadcasts rank 0's weights to every rank ...
        ddp = DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
        train_model = ddp
    ema = EMA(model, args.ema_rate)  # ... so the EMA, copied after it, is the same everywhere
    return TrainState(model, train_model, ddp, ema, optimizer, scaler, precision, info.device)


def resume(state: TrainState, args, info: DistInfo) -> int:
    """Restore from <resume>/checkpoint-last.pth if present; return the epoch to start at."""
    path, ckpt = open_checkpoint(args.resume, args, MODEL_ARGS)
    if ckpt is None:
        if path is not None and info.is_main:
            print(f"no {CHECKPOINT_NAME} in --resume {args.resume}: training from scratch")
        return args.start_epoch
    load_state_dict_strict(state.model, ckpt["model"], f"{path} [model]")
    if "model_ema" in ckpt:
        check_state_dict(state.model.state_dict(), ckpt["model_ema"], f"{path} [model_ema]", "EAR")
        state.ema.load_state_dict(ckpt["model_ema"])
    else:  # a checkpoint without EMA: restart the average from the loaded weights
        state.ema = EMA(state.model, args.ema_rate)
    if "optimizer" in ckpt:
        load_optimizer_state(state.optimizer, ckpt["optimizer"], f"{path} [optimizer]")
    if "scaler" in ckpt and state.scaler.is_enabled():
        state.scaler.load_state_dict(ckpt["scaler"])
    if ckpt["epoch"] + 1 > args.epochs:
        raise SystemExit(f"error: {path} has finished epoch {ckpt['epoch']}, beyond --epochs "
                         f"{args.epochs}: pass --epochs above {ckpt['epoch'] + 1} to train more")
    if info.is_main:
        print(f"resumed from {path} (epoch {ckpt['epoch']})")
        forget_logged_epochs_after(Path(args.output_dir) / "log.txt", ckpt["epoch"])
    return ckpt["epoch"] + 1


def forget_logged_epochs_after(log: Path, epoch: int) -> None:
    """Drop the lines of epochs after `epoch` from log.txt: training resumes from an older
    checkpoint and will log them again."""
    if not log.is_file():
        return
    lines = log.read_text().splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line).get("epoch", -1) <= epoch]
    if len(kept) != len(lines):
        atomic_write(log, lambda f: f.write("".join(kept).encode()))


def build_decoder(args, vae):
    """Token map (B, C, h, w) -> images in [-1, 1]: the VAE decoder, or nothing for pixels."""
    if args.tokenizer == "pixel":
        return lambda tokens: tokens.clamp(-1, 1)
    return lambda latents: vae.decode(latents / LATENT_SCALE)


def build_metrics(args, info: DistInfo):
    if args.dataset == "digits":
        from util.digits import DigitMetrics
        return DigitMetrics(args.output_dir)
    from util.fid import InceptionMetrics
    return InceptionMetrics(args.fid_stats, args.inception_weights, info.device)


def online_evaluation(state, decode, metrics, args, info, epoch: int, log_writer) -> list:
    """As the reference: without guidance, then with --cfg at half the sampling batch; both
    with the EMA weights, the raw ones back in the model afterwards."""
    with state.ema.applied() as model:
        results = [evaluate(model, decode, metrics, args, info, epoch, 1.0, args.eval_bsz,
                            log_writer)]
        if args.cfg not in (0.0, 1.0):
            results.append(evaluate(model, decode, metrics, args, info, epoch, args.cfg,
                                    max(args.eval_bsz // 2, 1), log_writer))
    return results


def save_checkpoint(state: TrainState, epoch: int, args, info: DistInfo) -> None:
    """Every rank checks that the weights and the EMA are finite (the loss guard cannot see
    everything, e.g. an overflowing update); then rank 0 writes checkpoint-last.pth."""
    weights = [p.detach() for p in state.model.parameters()] + state.ema.params
    if not all(all_ranks_finite(*weights)):
        raise NonFiniteLoss(f"non-finite weights after epoch {epoch}: {CHECKPOINT_NAME} was not "
                            f"written, the last one in {args.output_dir} is intact")
    if info.is_main:
        save_training_checkpoint(args.output_dir, state.model, state.ema, state.optimizer,
                                 state.scaler, epoch, args)


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


def train(state: TrainState, loader, to_latents, decode, metrics, start_epoch: int, args,
          info: DistInfo) -> None:
    log_writer = None
    if info.is_main:
        from torch.utils.tensorboard import SummaryWriter
        log_writer = SummaryWriter(log_dir=args.log_dir)
    seconds, results = {"train": 0.0, "eval": 0.0}, []
    for epoch in range(start_epoch, args.epochs):
        tick = time.time()
        # Reseeding per epoch makes an interrupted-and-resumed run draw what a straight run draws.
        torch.manual_seed(epoch_seed(args, info.rank, epoch))
        loader.generator.manual_seed(epoch_seed(args, info.rank, epoch))
        loader.sampler.set_epoch(epoch)
        stats = train_one_epoch(state, loader, to_latents, epoch, args, log_writer, info.is_main)
        last = epoch + 1 == args.epochs
        if epoch % args.save_last_freq == 0 or last:
            save_checkpoint(state, epoch, args, info)
        seconds["train"] += time.time() - tick
        # Unlike the reference (epoch % eval_freq == 0), no evaluation of the untrained epoch 0.
        if args.online_eval and ((epoch + 1) % args.eval_freq == 0 or last):
            tick = time.time()
            results = online_evaluation(state, decode, metrics, args, info, epoch, log_writer)
            seconds["eval"] += time.time() - tick
        if info.is_main:
            line = {"epoch": epoch, **stats}
            print(json.dumps(line))
            with open(os.path.join(args.output_dir, "log.txt"), "a") as f:
                f.write(json.dumps(line) + "\n")
    if log_writer is not None:
        log_writer.close()
    message = check_replicas_in_sync(state.model, state.ema.params)
    if info.is_main:
        print(message)
        if results:
            report(results, seconds, args)


def main(args: argparse.Namespace) -> None:
    info = init_distributed(args.device, args.dist_url, args.dist_on_itp)
    resolve_args(args, info)
    torch.manual_seed(args.seed + info.rank)
    if info.is_main:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    model = build_model(args).to(info.device)
    needs_vae = args.tokenizer == "vae" and (args.evaluate or args.online_eval or not args.use_cached)
    vae = load_vae(args.vae_path, args.vae_embed_dim).to(info.device) if needs_vae else None
    decode, metrics = build_decoder(args, vae), build_metrics(args, info)
    if args.evaluate:  # the EMA weights only: no optimizer, no loss scaler
        try:
            epoch = load_sampling_weights(model, args.resume, args, MODEL_ARGS)
        except FileNotFoundError as e:
            raise SystemExit(f"error: --evaluate needs a checkpoint: {e}") from None
        if info.is_main:
            print(f"evaluating the EMA weights of {Path(args.resume) / CHECKPOINT_NAME} (epoch {epoch})")
        evaluate(model, decode, metrics, args, info, epoch, args.cfg, args.eval_bsz)
        cleanup()
        return
    loader = build_loader(build_dataset(args), args, info)
    state = build_train_state(model, args, info)
    start_epoch = resume(state, args, info)
    if start_epoch == args.epochs:
        if info.is_main:
            print(f"nothing to do: the checkpoint in --resume {args.resume} has all "
                  f"{args.epochs} epochs")
        cleanup()
        return
    if args.online_eval:  # statistics, Inception weights: fail now, not after eval_freq epochs
        check_metric_inputs(metrics, info)
    if info.is_main:
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{args.model}: {n_params:.2f}M parameters; {info.world_size} process(es) on "
              f"{info.device}; {state.precision}; lr {args.lr:.2e}; epochs {start_epoch}..{args.epochs - 1}")
    source = "pixel" if args.tokenizer == "pixel" else "cached" if args.use_cached else "vae"
    batches = LatentBatches(source, info.device, args.vae_precision, vae)
    try:
        train(state, loader, batches, decode, metrics, start_epoch, args, info)
    except (NonFiniteLoss, ReplicasDiffer) as e:
        raise SystemExit(f"[rank {info.rank}] error: {e}") from None
    cleanup()


if __name__ == "__main__":
    main(train_parser().parse_args())
