"""Output heads: what turns the Transformer's hidden state z into a distribution over a token.

The paper frames a continuous autoregressive model as "Transformer state z -> a head that
defines a distribution over the token, trained with a strictly proper score". EAR's head is the
energy-score generator (models/scoreloss.py). A head is an nn.Module with the interface below;
`EAR(head=NAME)` builds `HEADS[NAME]`. Adding a head is one class plus one line in `HEADS`.
"""
from typing import ClassVar, Protocol

import torch

from models.diffloss import DiffLoss
from models.gmmloss import GMMLoss
from models.scoreloss import ScoreLoss


class Head(Protocol):
    """The interface every head implements (rows are tokens: N of them, D values each).

    Class attributes:
        attribute: the head's module name inside EAR, i.e. its state-dict prefix (the energy
            head's is "scoreloss", as in the reference checkpoints). Not "head".
        own_optimizer_group: whether its weight matrices get an optimizer group of their own
            (no weight decay, lr * --score_lrscale), as the reference does for the generator;
            otherwise they are treated like the Transformer's, unless the head sets
            `decay_matrices = False` (optional, default True): then none of its parameters is
            weight-decayed, at full lr (the diffusion head, as MAR).
        FLAGS: {constructor argument: (help, shapes the weights[, flag default])} for the
            settings that are command-line flags; defaults come from the constructor's signature
            unless the entry gives the flag its own.
        SIZES: {named model size: {setting: value}}, the head's size for each named model.
        SAMPLING (optional): settings that change its samples; evaluation names them in the
            sample folder and the results (the diffusion head: num_sampling_steps).
        CHOICES (needed for a text setting): {setting: allowed values}, the flag's choices and
            what a saved file is checked against (the mixture head: gmm_guidance).
        many_targets (optional, default False): forward also takes several targets per row,
            target (N, M, D) (the energy head; training's --score_targets).
    Instance counters (optional): `guided_draws` and `exhausted`, for a head that samples
    guidance by rejection (the mixture head): its guided draws since it was built, and those
    that fell back to unguided ones; evaluation reports both.
    """
    attribute: ClassVar[str]
    own_optimizer_group: ClassVar[bool]
    FLAGS: ClassVar[dict]
    SIZES: ClassVar[dict]

    def __init__(self, token_dim: int, z_dim: int, **settings): ...

    def forward(self, target: torch.Tensor, z: torch.Tensor, mask: torch.Tensor = None) -> torch.Tensor:
        """Mean loss over the rows of target (N, D) given z (N, C) where mask (N,) is 1 (all
        rows when mask is None)."""

    def sample(self, z: torch.Tensor, temperature=1.0, cfg: float = 1.0) -> torch.Tensor:
        """One token per row of z (N, C) -> (N, D). With cfg != 1, z is the conditional half
        followed by the unconditional half (N = 2M) and M tokens come back. `temperature` is a
        number or a 0-d float32 tensor on z's device (EAR.sample_tokens passes one, so that a
        compiled head does not recompile per value)."""

    def compile_for_training(self) -> None:
        """torch.compile the networks the loss runs, for a row count that varies per step."""


HEADS = {
    "energy": ScoreLoss,     # the paper's: energy score, one generator call per token
    "diffusion": DiffLoss,   # MAR: denoising score, a DDPM chain per token
    "gmm": GMMLoss,          # GIVT: log score of a Gaussian mixture
}
