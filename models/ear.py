"""EAR: a masked-autoregressive Transformer over continuous tokens with an energy-score head.

An image's VAE latent (B, C, H, W) is cut into L tokens of dimension D. Training masks a random
subset of tokens (in a random order), runs a bidirectional Transformer over the rest, and trains
the output head (models/heads.py; the paper's is the energy-score generator of
models/scoreloss.py) to sample each masked token from the Transformer's hidden
state. Generation starts from an all-masked sequence and fills it in `num_iter` steps, following
one random order per image, more tokens per step as the sequence fills up (cosine schedule).

Class conditioning is a prefix of `buffer_size` positions holding the class embedding; the learned
`fake_latent` stands in for the class when it is dropped (training) or when sampling
unconditionally, which is what classifier-free guidance contrasts against.
"""
import math
from functools import partial

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block
from tqdm import tqdm

from models.heads import HEADS
from models.scoreloss import run_block

CFG_SCHEDULES = ("linear", "constant")


class EAR(nn.Module):
    """Energy-based autoregressive image model. Argument names follow the reference release.

    Args:
        img_size: image side in pixels; vae_stride: pixels per latent position;
        patch_size: latent positions per token side; vae_embed_dim: latent channels.
        decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio, norm_layer: Transformer.
        mask_ratio_min: lower end of the truncated-normal training mask ratio.
        label_drop_prob: chance, per training sample, of replacing the class by `fake_latent`.
        class_num: number of classes; buffer_size: class-prefix length.
        attn_dropout, proj_dropout: dropout inside the Transformer blocks.
        grad_checkpointing: recompute the Transformer blocks' and the head's residual blocks'
            activations in backward to save memory.
        head: the output head's name in models/heads.py (`energy`: the paper's generator).
        **head_settings: the head's own settings, e.g. the energy head's scoreloss_d,
            scoreloss_w, noise_channels, alpha, train_temperature, score_batch_mul,
            score_samples.
    """
    # {argument: (help, shapes the weights)} for the settings that are command-line flags; the
    # defaults are the signature's. A checkpoint must agree on the weight-shaping ones.
    FLAGS = {
        "img_size": ("image side in pixels", True),
        "vae_stride": ("pixels per latent position (the tokenizer's stride)", True),
        "patch_size": ("latent positions per token side", True),
        "vae_embed_dim": ("latent channels (the tokenizer's)", True),
        "decoder_embed_dim": ("Transformer width", True),
        "decoder_depth": ("Transformer depth", True),
        "decoder_num_heads": ("attention heads", True),
        "class_num": ("number of classes", True),
        "buffer_size": ("class-prefix positions", True),
        "mask_ratio_min": ("lowest training mask ratio", False),
        "label_drop_prob": ("chance of dropping the class during training (for guidance)", False),
        "attn_dropout": ("attention dropout", False),
        "proj_dropout": ("projection dropout", False),
        "grad_checkpointing": ("recompute Transformer and head activations in backward to save "
                               "memory", False),
    }

    def __init__(self, img_size: int = 256, vae_stride: int = 16, patch_size: int = 1,
                 decoder_embed_dim: int = 1024, decoder_depth: int = 16, decoder_num_heads: int = 16,
                 mlp_ratio: float = 4., norm_layer=partial(nn.LayerNorm, eps=1e-6),
                 vae_embed_dim: int = 16, mask_ratio_min: float = 0.7, label_drop_prob: float = 0.1,
                 class_num: int = 1000, attn_dropout: float = 0.1, proj_dropout: float = 0.1,
                 buffer_size: int = 64, grad_checkpointing: bool = False, head: str = "energy",
                 **head_settings):
        super().__init__()
        if img_size % (vae_stride * patch_size) != 0:
            raise ValueError(f"img_size {img_size} is not divisible by vae_stride * patch_size "
                             f"= {vae_stride} * {patch_size}")
        if not 0.0 <= mask_ratio_min <= 1.0:
            raise ValueError(f"mask_ratio_min must be in [0, 1], got {mask_ratio_min}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {sorted(HEADS)}, got {head!r}")
        self.vae_embed_dim = vae_embed_dim
        self.patch_size = patch_size
        self.seq_h = self.seq_w = img_size // vae_stride // patch_size
        self.seq_len = self.seq_h * self.seq_w
        self.token_embed_dim = vae_embed_dim * patch_size ** 2
        self.class_num = class_num
        self.buffer_size = buffer_size
        self.label_drop_prob = label_drop_prob
        self.mask_ratio_min = mask_ratio_min
        self.grad_checkpointing = grad_checkpointing

        # Registration order is the reference state-dict order.
        self.fake_latent = nn.Parameter(torch.zeros(1, decoder_embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed_learned = nn.Parameter(
            torch.zeros(1, buffer_size + self.seq_len, decoder_embed_dim))
        self.class_emb = nn.Embedding(class_num, decoder_embed_dim)
        self.z_proj = nn.Linear(self.token_embed_dim, decoder_embed_dim)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True,
                  norm_layer=norm_layer, proj_drop=proj_dropout, attn_drop=attn_dropout)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.initialize_weights()
        # Created after the Transformer's initialisation, under its own name (the energy head:
        # `scoreloss`, the reference's keys): the head keeps its own initialisation.
        head_cls = HEADS[head]
        self.head_name = head_cls.attribute
        self.add_module(self.head_name, head_cls(self.token_embed_dim, decoder_embed_dim,
                                                 **head_settings))
        # The head's residual MLP blocks are recomputed in backward too, as the reference's:
        # with several samples per token (score_batch_mul) theirs are the largest activations.
        for m in self.head.modules():
            if hasattr(m, "grad_checkpointing"):
                m.grad_checkpointing = grad_checkpointing

    @property
    def head(self) -> nn.Module:
        """The output head (models/heads.py), whatever its module name."""
        return self._modules[self.head_name]

    def initialize_weights(self) -> None:
        for p in (self.class_emb.weight, self.fake_latent, self.mask_token,
                  self.decoder_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ----- tokens -------------------------------------------------------------------------
    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, C*p*p); tokens row-major, values ordered (c, i, j)."""
        B, C, H, W = latents.shape
        p = self.patch_size
        x = latents.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(B, (H // p) * (W // p), C * p * p)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, C*p*p) -> (B, C, H, W); inverse of `patchify`."""
        B = tokens.shape[0]
        p, C, h, w = self.patch_size, self.vae_embed_dim, self.seq_h, self.seq_w
        x = tokens.reshape(B, h, w, C, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(B, C, h * p, w * p)

    # ----- masking ------------------------------------------------------------------------
    def random_orders(self, bsz: int, device, last: torch.Tensor = None) -> torch.Tensor:
        """One random permutation of the L positions per sample: (B, L) long. `last` (B, L)
        bool: those positions go to the end of each order (in random order too); the same
        random numbers are drawn either way, so without it nothing changes."""
        keys = torch.rand(bsz, self.seq_len, device=device)
        if last is not None:
            keys = keys + 2.0 * last  # keys are in [0, 1): the marked ones sort after the rest
        return keys.argsort(dim=1)

    def sample_mask_ratio(self) -> float:
        """Mask ratio ~ N(1, 0.25) truncated to [mask_ratio_min, 1], by inverse-CDF sampling."""
        lo, hi = torch.special.ndtr(torch.tensor([(self.mask_ratio_min - 1.0) / 0.25, 0.0],
                                                 dtype=torch.float64))
        u = lo + (hi - lo) * torch.rand((), dtype=torch.float64)
        ratio = float(1.0 + 0.25 * torch.special.ndtri(u))
        return min(max(ratio, self.mask_ratio_min), 1.0)  # ndtri(ndtr(x)) may miss x by an ulp

    def mask_by_order(self, orders: torch.Tensor, num_masked: int) -> torch.Tensor:
        """Mask (B, L) bool holding True at the first `num_masked` positions of each order."""
        mask = torch.zeros_like(orders, dtype=torch.bool)
        return mask.scatter_(1, orders[:, :num_masked], True)

    # ----- Transformer --------------------------------------------------------------------
    def class_embedding(self, labels, bsz: int, device) -> torch.Tensor:
        """(B, width) class embeddings; `fake_latent` for labels None and dropped labels."""
        if labels is None:
            return self.fake_latent.expand(bsz, -1)
        emb = self.class_emb(labels)
        if self.training:
            # Also at label_drop_prob 0: `fake_latent` then stays in the graph with a zero
            # gradient, which DDP needs (it fails on a parameter that gets no gradient).
            drop = torch.rand(bsz, device=device) < self.label_drop_prob
            emb = torch.where(drop[:, None], self.fake_latent.to(emb.dtype), emb)
        return emb

    def forward_transformer(self, tokens: torch.Tensor, cls_emb: torch.Tensor,
                            mask: torch.Tensor) -> torch.Tensor:
        """tokens (B, L, D), cls_emb (B, width), mask (B, L) bool -> hidden states (B, L, width)."""
        x = self.z_proj(tokens)
        x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)
        prefix = cls_emb[:, None, :].expand(-1, self.buffer_size, -1).to(x.dtype)
        x = torch.cat([prefix, x], dim=1) + self.decoder_pos_embed_learned
        for block in self.decoder_blocks:
            x = run_block(self, block, x)
        x = self.decoder_norm(x)
        return x[:, self.buffer_size:]

    # ----- training -----------------------------------------------------------------------
    def check_inputs(self, imgs: torch.Tensor, labels) -> None:
        expected = (self.vae_embed_dim, self.seq_h * self.patch_size, self.seq_w * self.patch_size)
        if imgs.dim() != 4 or tuple(imgs.shape[1:]) != expected:
            raise ValueError(f"latents must have shape (B, {', '.join(map(str, expected))}) for "
                             f"this img_size/vae_stride/patch_size, got {tuple(imgs.shape)}")
        if labels is not None:
            self.check_labels(labels, imgs.shape[0])

    def check_targets(self, targets: torch.Tensor, imgs: torch.Tensor) -> None:
        if not getattr(self.head, "many_targets", False):
            raise ValueError(f"the {type(self.head).__name__} head takes one target per token: "
                             "several (--score_targets) are the energy head's")
        if targets.dim() != 5 or targets.shape[0] != imgs.shape[0] \
                or targets.shape[2:] != imgs.shape[1:]:
            raise ValueError(f"targets must have shape ({imgs.shape[0]}, M, "
                             f"{', '.join(map(str, imgs.shape[1:]))}), got {tuple(targets.shape)}")

    def check_labels(self, labels: torch.Tensor, bsz: int) -> None:
        if labels.shape != (bsz,):
            raise ValueError(f"labels must have shape ({bsz},), got {tuple(labels.shape)}")
        if ((labels < 0) | (labels >= self.class_num)).any():  # one host sync per batch
            raise ValueError(f"labels must be in [0, {self.class_num}), got values in "
                             f"[{int(labels.min())}, {int(labels.max())}]")

    def forward(self, imgs: torch.Tensor, labels: torch.Tensor,
                targets: torch.Tensor = None) -> torch.Tensor:
        """Training loss for scaled latents imgs (B, C, H, W) and class labels (B,).

        The masked tokens' targets are imgs' own, unless `targets` (B, M, C, H, W) gives M
        draws of each latent map (training's --score_targets: posterior draws); the
        Transformer sees imgs either way. Only a head with `many_targets` takes them."""
        self.check_inputs(imgs, labels)
        if targets is not None:
            self.check_targets(targets, imgs)
        bsz = imgs.shape[0]
        tokens = self.patchify(imgs)
        orders = self.random_orders(bsz, imgs.device)
        num_masked = math.ceil(self.seq_len * self.sample_mask_ratio())
        mask = self.mask_by_order(orders, num_masked)
        z = self.forward_transformer(tokens, self.class_embedding(labels, bsz, imgs.device), mask)
        # The masked positions are the first `num_masked` of each order: gather them directly,
        # so the head only sees rows that enter the loss.
        index = orders[:, :num_masked, None]
        z = z.gather(1, index.expand(-1, -1, z.shape[-1])).flatten(0, 1)
        if targets is None:
            target = tokens.gather(1, index.expand(-1, -1, tokens.shape[-1])).flatten(0, 1)
        else:  # (B, M, C, H, W) -> (B, L, M, D) -> the masked rows' M targets (B * n, M, D)
            many = self.patchify(targets.flatten(0, 1)).unflatten(0, targets.shape[:2]).transpose(1, 2)
            target = many.gather(1, index[..., None].expand(-1, -1, *many.shape[2:])).flatten(0, 1)
        return self.head(target, z)

    # ----- generation ---------------------------------------------------------------------
    def masked_after_step(self, step: int, num_iter: int, num_masked: int, total: int = None) -> int:
        """Tokens still masked after `step` (cosine schedule over `total` tokens to generate,
        default all L), at least 1 and fewer than now."""
        total = self.seq_len if total is None else total
        n = math.floor(total * math.cos(math.pi / 2 * (step + 1) / num_iter))
        return max(1, min(num_masked - 1, n))

    @torch.no_grad()
    def sample_tokens(self, bsz: int, num_iter: int = 64, cfg: float = 1.0,
                      cfg_schedule: str = "linear", labels: torch.Tensor = None,
                      infer_temperature: float = 1.0, progress: bool = False,
                      known: torch.Tensor = None, known_mask: torch.Tensor = None) -> torch.Tensor:
        """Generate latents (B, C, H, W). Call in eval mode (temperature acts only there).

        labels: (B,) class ids, or None for unconditional samples (then guidance is a no-op and
        is skipped). cfg: guidance scale, applied per step as `cfg_schedule` says (linear: it
        grows with the share of the L tokens known so far). Under --compile one compilation
        serves every temperature, cfg and batch size (see dynamic_rows).

        Completing a partial image (editing): `known` (B, C, H, W) latents and `known_mask`
        (B, L) bool over the token grid, the same number of True per row. Known tokens are in
        place from the start and never masked; the random order and the cosine schedule run
        over the U unknown tokens only, in min(num_iter, U) steps. Nothing known: the ordinary
        sampler, bit for bit under the same seed; everything known: `known` comes back.
        """
        if cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {cfg_schedule!r}")
        if not 1 <= num_iter <= self.seq_len:
            raise ValueError(f"num_iter must be in [1, {self.seq_len}] (the sequence length), "
                             f"got {num_iter}")
        device = self.fake_latent.device
        if labels is not None:
            labels = labels.to(device)
            self.check_labels(labels, bsz)
        tokens = torch.zeros(bsz, self.seq_len, self.token_embed_dim, device=device)
        unknown = self.seq_len
        if known is not None or known_mask is not None:
            unknown = self.check_known(known, known_mask, bsz)
            known, known_mask = known.to(device), known_mask.to(device)
            if unknown == 0:
                return known.clone()
            tokens = torch.where(known_mask[..., None], self.patchify(known.to(tokens.dtype)), tokens)
        guided = cfg != 1.0 and labels is not None
        cls_emb = self.class_embedding(labels, bsz, device)
        if guided:
            cls_emb = torch.cat([cls_emb, self.fake_latent.expand(bsz, -1)])
        orders = self.random_orders(bsz, device, last=known_mask)  # the unknown tokens first
        # A tensor, made on the device once: compiled heads take it as an input instead of
        # specialising on the number (one graph for every --infer_temperature).
        temperature = torch.full((), float(infer_temperature), device=device)
        num_iter = min(num_iter, unknown)
        num_masked = unknown
        for step in tqdm(range(num_iter), disable=not progress, desc="sampling"):
            mask = self.mask_by_order(orders, num_masked)
            x, m = (torch.cat([tokens, tokens]), torch.cat([mask, mask])) if guided else (tokens, mask)
            z = self.forward_transformer(*dynamic_rows(x, cls_emb, m))
            last = step == num_iter - 1
            remaining = self.masked_after_step(step, num_iter, num_masked, unknown)
            # Fill order[remaining:num_masked] (on the last step everything still masked).
            index = orders[:, (0 if last else remaining):num_masked]
            n_fill = index.shape[1]
            z = rows_at(z, torch.cat([index, index]) if guided else index)
            if guided and cfg_schedule == "linear":
                cfg_step = 1 + (cfg - 1) * (self.seq_len - remaining) / self.seq_len
            else:
                cfg_step = cfg if guided else 1.0
            new = self.head.sample(z, temperature, cfg_step).to(tokens.dtype)
            tokens.scatter_(1, index[..., None].expand(-1, -1, self.token_embed_dim),
                            new.reshape(bsz, n_fill, -1))
            num_masked = 0 if last else remaining
        return self.unpatchify(tokens)

    def check_known(self, known: torch.Tensor, known_mask: torch.Tensor, bsz: int) -> int:
        """The number of unknown tokens per row, after checking `known` and `known_mask`."""
        if known is None or known_mask is None:
            raise ValueError("known and known_mask go together: pass both or neither")
        self.check_inputs(known, None)
        if known.shape[0] != bsz or known_mask.shape != (bsz, self.seq_len) \
                or known_mask.dtype != torch.bool:
            raise ValueError(f"known_mask must be a ({bsz}, {self.seq_len}) bool tensor over the "
                             f"token grid and known {bsz} latents; got {tuple(known_mask.shape)} "
                             f"{known_mask.dtype} and {known.shape[0]}")
        counts = known_mask.sum(dim=1).unique()
        if len(counts) > 1:  # one schedule (and one guidance scale) per step for the whole batch
            raise ValueError(f"known_mask: every row must keep the same number of tokens, got "
                             f"{counts.tolist()}; sample rows with other counts in another call")
        return self.seq_len - int(counts[0])


def dynamic_rows(*tensors: torch.Tensor) -> tuple:
    """The tensors, their first dimension (images, or twice that with guidance) marked dynamic for
    torch.compile: one compiled graph serves every sampling batch, the last partial one and
    guided or not included (but for a batch of one: torch specialises sizes 0 and 1). Without
    torch.compile, nothing changes."""
    for t in tensors:
        torch._dynamo.maybe_mark_dynamic(t, 0)
    return tensors


def rows_at(z: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Hidden states z (B, L, width) at `positions` (B, n) of each sequence -> (B * n, width),
    sequence by sequence (with guidance: the conditional half, then the unconditional one, as
    a head's sample wants). Indexed rather than gathered and flattened, so never a view: a
    compiled head guards on a view's base, and guided rows, computed from these, are none."""
    sequence = torch.arange(len(positions), device=z.device)[:, None].expand_as(positions)
    return z[sequence.flatten(), positions.flatten()]


# The named Transformer sizes (the paper's, and a CPU-sized one); each head brings its own size
# for each name (e.g. the energy head's generator: 6 x 1024 for ear_base).
MODEL_SIZES = {
    "ear_base": dict(decoder_embed_dim=768, decoder_depth=24, decoder_num_heads=12),
    "ear_large": dict(decoder_embed_dim=1024, decoder_depth=32, decoder_num_heads=16),
    "ear_huge": dict(decoder_embed_dim=1280, decoder_depth=40, decoder_num_heads=16),
    "ear_tiny": dict(decoder_embed_dim=128, decoder_depth=6, decoder_num_heads=4),  # ~1.5M, CPU
}


def named_sizes(model: str, head: str = "energy") -> dict:
    """The Transformer's and the head's size settings of a named model."""
    return {**MODEL_SIZES[model], **HEADS[head].SIZES[model]}


def named_model(model: str, head: str = "energy", **kwargs) -> EAR:
    """A named size with the given head; any EAR or head argument in kwargs overrides."""
    return EAR(head=head, **{**named_sizes(model, head), **kwargs})


# The reference's module-level constructors, so `from models.ear import ear_base` and
# `models.ear.__dict__[args.model](**kwargs)` work as they do there.
def ear_base(**kwargs) -> EAR:
    return named_model("ear_base", **kwargs)


def ear_large(**kwargs) -> EAR:
    return named_model("ear_large", **kwargs)


def ear_huge(**kwargs) -> EAR:
    return named_model("ear_huge", **kwargs)


def ear_tiny(**kwargs) -> EAR:
    return named_model("ear_tiny", **kwargs)


ear_models = {"ear_base": ear_base, "ear_large": ear_large, "ear_huge": ear_huge,
              "ear_tiny": ear_tiny}
assert set(ear_models) == set(MODEL_SIZES), "every named size needs its constructor above"
