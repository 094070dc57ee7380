"""The fusion network: query-aware weights over K models, a residual refinement of the K x N stack of normalised
scores, and a 1x1 convolution to one fused score per candidate.

For one tile of B queries against N gallery images (z and stats from :func:`cirfusion.fusion.kernels.normalise_scores`)::

    w[b, :]        = softmax(MLP(stats[b]))                                     # query-aware model weights, sum to 1
    x              = w[b, k] * z[b, k, n]                                       # K channels per candidate
    x              = x + W2 relu(W1 x + b1)        (x blocks)                   # residual refinement, 1x1 convolutions
    fused[b, n]    = w_out . x + b_out                                          # 1x1 convolution to one score

Every per-candidate operation is pointwise (elementwise ops and 1x1 convolutions), so permuting the gallery permutes
the fused scores exactly; the paper's convolution along an arbitrary candidate order has no such property.

**Initialisation.** The gate's last layer and every block's last layer start at zero and the head at ones, so an
untrained network computes exactly the mean of the normalised scores (uniform weights, no residual): the simple
baseline is the starting point and training can only move away from it on evidence.
"""

from __future__ import annotations

import torch
from torch import nn

from .kernels import NUM_STATS, observe


class FusionNet(nn.Module):
    """Query-aware weights over K models + residual refinement of the K x N stack + 1x1 convolution (see the module
    docstring). Pointwise over candidates, hence permutation-equivariant over the gallery.

    ``stat_mean``/``stat_std`` (buffers, saved with the weights) standardise the statistics; fitting sets them
    from the training queries."""

    stat_mean: torch.Tensor
    stat_std: torch.Tensor

    def __init__(self, num_models: int, hidden: int = 16, blocks: int = 1, gate_hidden: int = 32, num_stats: int = NUM_STATS,
                 init_seed: int = 0) -> None:
        super().__init__()
        if num_models < 1 or hidden < 1 or blocks < 1 or gate_hidden < 1:
            raise ValueError(f"FusionNet: bad sizes num_models={num_models} hidden={hidden} blocks={blocks} gate_hidden={gate_hidden}")
        self.num_models, self.hidden, self.num_stats = num_models, hidden, num_stats
        self.register_buffer("stat_mean", torch.zeros(num_models, num_stats))
        self.register_buffer("stat_std", torch.ones(num_models, num_stats))
        # The initial weights come from their own generator: a fused model is a pure function of its inputs, whatever
        # the global RNG state when it is built.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            self.gate = nn.Sequential(nn.Linear(num_models * num_stats, gate_hidden), nn.ReLU(),
                                      nn.Linear(gate_hidden, num_models))
            self.blocks = nn.ModuleList(
                nn.Sequential(nn.Linear(num_models, hidden), nn.ReLU(), nn.Linear(hidden, num_models)) for _ in range(blocks)
            )
            self.head = nn.Linear(num_models, 1)
        # Start as the mean of the normalised scores: uniform weights, no residual, unit head.
        last = self.gate[2]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        for blk in self._block_layers():
            nn.init.zeros_(blk[1].weight)
            nn.init.zeros_(blk[1].bias)
        nn.init.ones_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def _block_layers(self) -> list[tuple[nn.Linear, nn.Linear]]:
        """Each residual block's two 1x1 convolutions (``Linear`` over the model channels)."""
        out = []
        for blk in self.blocks:
            lin1, lin2 = blk[0], blk[2]  # type: ignore[index]  # ModuleList items are the Sequential blocks above
            assert isinstance(lin1, nn.Linear) and isinstance(lin2, nn.Linear)
            out.append((lin1, lin2))
        return out

    def set_stat_norm(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.stat_mean.copy_(mean)
        self.stat_std.copy_(std.clamp(min=1e-6))

    def weights(self, stats: torch.Tensor) -> torch.Tensor:
        """``[B, K]`` softmax weights of the models for each query, from ``stats [B, K, S]``."""
        x = ((stats - self.stat_mean) / self.stat_std).flatten(1)
        return torch.softmax(self.gate(x), dim=-1)

    def forward(self, z: torch.Tensor, stats: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """``z [B, K, C]`` normalised scores of C candidates, ``stats [B, K, S]`` -> fused scores ``[B, C]``."""
        w = self.weights(stats) if weights is None else weights
        b, k, c = z.shape
        # Channels first with every (query, candidate) pair as one column: [K, B*C]. Each 1x1 convolution is then one
        # plain [out, in] @ [in, B*C] product (skinny batched or row-wise products are several times slower on CPU).
        x = (z * w[:, :, None]).transpose(0, 1).reshape(k, b * c)
        for lin1, lin2 in self._block_layers():
            h = torch.addmm(lin1.bias[:, None], lin1.weight, x).relu_()
            observe("hidden", h.view(-1, b, c).transpose(0, 1))
            x = x + torch.addmm(lin2.bias[:, None], lin2.weight, h)
        out = torch.addmm(self.head.bias[:, None], self.head.weight, x).view(b, c)
        observe("fused", out)
        return out


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["FusionNet", "count_parameters"]
