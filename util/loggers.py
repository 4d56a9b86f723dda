"""Where training and evaluation send their numbers: TensorBoard always, Weights & Biases too
with --wandb_project. Rank 0 logs; on the other ranks every call does nothing. wandb is
imported only when asked for, so it is not a requirement."""
import importlib.util

from util.checkpoint import plain_args


def check_wandb(args) -> None:
    """Fail at start-up, on every rank, if --wandb_project is given but wandb is missing."""
    if args.wandb_project and importlib.util.find_spec("wandb") is None:
        raise SystemExit("error: --wandb_project needs the wandb package: pip install wandb "
                         "(or leave the flag out: TensorBoard logs are always written)")


class Loggers:
    """Fans scalars and evaluation results out to TensorBoard (in --log_dir) and, with
    --wandb_project, to a W&B run (name --wandb_run, config = the flags, files in --log_dir;
    WANDB_MODE=offline keeps it on disk). Use as a context manager: the logs are closed after."""

    def __init__(self, args, is_main: bool):
        self.tensorboard = self.wandb = None
        self.axes = {}  # W&B metric -> the x axis it was declared with
        if not is_main:
            return
        from torch.utils.tensorboard import SummaryWriter
        self.tensorboard = SummaryWriter(log_dir=args.log_dir)
        if args.wandb_project:
            import wandb
            self.wandb = wandb.init(project=args.wandb_project, name=args.wandb_run,
                                    config=plain_args(args), dir=args.log_dir)

    def scalars(self, values: dict, x: int, axis: str) -> None:
        """Log {name: number} at position x of the axis named `axis` (TensorBoard's step; in
        W&B its own metric, so that axes of different scales, e.g. epoch_1000x and epoch, do
        not fight over W&B's single increasing step)."""
        if self.tensorboard is not None:
            for name, value in values.items():
                self.tensorboard.add_scalar(name, value, x)
        if self.wandb is not None:
            for name in values.keys() - self.axes.keys():
                self.wandb.define_metric(name, step_metric=axis)
                self.axes[name] = axis
            self.wandb.log({**values, axis: x})

    def result(self, name: str, result: dict) -> None:
        """An evaluation's whole record (settings, scores, timings) under eval/<name> in the W&B
        run's summary; TensorBoard has its scores through `scalars` and eval_results.jsonl all."""
        if self.wandb is not None:
            self.wandb.summary[f"eval/{name}"] = result

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
