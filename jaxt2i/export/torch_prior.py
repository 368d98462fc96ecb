"""PyTorch port of unCLIP's diffusion prior (`jaxt2i.models.prior.DiffusionPrior`).

Needs the ``[torch]`` extra. ``python -m jaxt2i.export --checkpoint=UNCLIP_DIR --format=torch``
writes the prior as ``OUT/prior/`` (``model.safetensors`` + ``config.json``); load and run it
with::

    import torch
    from jaxt2i.export.torch_prior import TorchPrior

    prior = TorchPrior.from_pretrained("export_pt/prior").eval()
    with torch.no_grad():
        x0 = prior(x_t, noise_level, text_tokens, text_mask, text_embed)  # [B, clip_dim]

``forward`` has the semantics of ``DiffusionPrior.__call__``: the causal Transformer over
[text tokens, CLIP text embedding, timestep, noised image embedding, query], padded tokens
masked out, ``keep`` False for the null caption (classifier-free guidance), the output
``config.objective`` (x0 in the paper) in the prior's space (``sqrt(clip_dim) * z / |z|``
when ``normalize_embeds``). The sampling loop (schedule, guidance, the two candidates) runs
in the consumer. Converted float32 weights give the JAX float32 outputs to ~1e-5 (tested at
1e-4); the module computes in its parameters' dtype with float32 norms and softmax.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from jaxt2i.export.torch_layers import (LayerNorm, Tensor, attend, load_pretrained,
                                        sinusoidal_embedding)
from jaxt2i.models.prior import NUM_EXTRA_TOKENS, PriorConfig


class PriorBlock(nn.Module):
    """Pre-norm block: masked self-attention, then a GELU (tanh) MLP."""

    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.norm1 = LayerNorm(cfg.width)
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=False)
        self.out = nn.Linear(cfg.width, cfg.width, bias=False)
        self.norm2 = LayerNorm(cfg.width)
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """Args: x [B, N, W]; mask [B, N, N] bool (query, key) pairs that may attend."""
        b, n, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads,
                                                  self.head_dim).unbind(dim=2)
        x = x + self.out(attend(q, k, v, mask).reshape(b, n, -1))
        h = self.fc1(self.norm2(x))
        return x + self.fc2(F.gelu(h, approximate="tanh"))  # flax's nn.gelu is the tanh form


class TorchPrior(nn.Module):
    """The diffusion prior in PyTorch; parameter names follow the Flax paths (``text_proj``,
    ``block0.qkv``, ``pos_embed``...), so its state dict is
    ``jaxt2i.export.torch_convert.prior_state_dict(params, config)``.

    Attributes:
      config: the PriorConfig.
    """

    def __init__(self, config: PriorConfig | Mapping[str, Any]):
        """Args: config: a PriorConfig or its ``to_dict()`` (the "prior" entry of config.json)."""
        super().__init__()
        cfg = config if isinstance(config, PriorConfig) else PriorConfig.from_dict(config)
        self.config = cfg
        w = cfg.width
        self.text_norm = LayerNorm(cfg.text_dim)
        self.text_proj = nn.Linear(cfg.text_dim, w)
        self.text_embed_proj = nn.Linear(cfg.clip_dim, w)
        self.null_text_embed = nn.Parameter(torch.zeros(w))
        self.time_fc1 = nn.Linear(w, w)
        self.time_fc2 = nn.Linear(w, w)
        self.x_proj = nn.Linear(cfg.clip_dim, w)
        self.query = nn.Parameter(torch.zeros(w))
        self.pos_embed = nn.Parameter(torch.zeros(cfg.max_text_len + NUM_EXTRA_TOKENS, w))
        for i in range(cfg.layers):
            self.add_module(f"block{i}", PriorBlock(cfg))
        self.final_norm = LayerNorm(w)
        self.out_proj = nn.Linear(w, cfg.clip_dim)

    def forward(self, x_t: Tensor, noise_level: Tensor | float, text_tokens: Tensor,
                text_mask: Tensor, text_embed: Tensor, keep: Tensor | None = None) -> Tensor:
        """Predicts the clean image embedding (or eps / v, ``config.objective``).

        Args:
          x_t: [B, clip_dim] noised image embedding (in the prior's space).
          noise_level: [B] (or a scalar): the schedule's model time (``noise_scale``).
          text_tokens: [B, L, text_dim] CLIP text-tower token states, L <= max_text_len.
          text_mask: [B, L] bool/int, 1 for real tokens.
          text_embed: [B, clip_dim] CLIP text embedding (unnormalised is fine).
          keep: [B] bool; False drops the caption (the null condition). None = all kept.

        Returns:
          [B, clip_dim] float32 prediction.
        """
        cfg = self.config
        dt = self.x_proj.weight.dtype
        b, length = text_tokens.shape[:2]
        if length > cfg.max_text_len:
            raise ValueError(f"text has {length} tokens but this prior takes at most "
                             f"{cfg.max_text_len} (PriorConfig.max_text_len)")
        dev = x_t.device
        keep = (torch.ones(b, dtype=torch.bool, device=dev) if keep is None
                else torch.as_tensor(keep, device=dev).bool().broadcast_to((b,)))
        mask = torch.as_tensor(text_mask, device=dev).bool() & keep[:, None]  # [B, L]
        noise_level = torch.as_tensor(noise_level, dtype=torch.float32,
                                      device=dev).broadcast_to((b,))

        text = torch.where(mask[..., None], text_tokens.float(), 0.0)
        text = self.text_proj(self.text_norm(text).to(dt))
        temb = text_embed.float()
        if cfg.normalize_embeds:  # sqrt(D) z / |z|, as prior.to_prior_space
            sq = temb.square().sum(-1, keepdim=True)
            temb = temb * torch.rsqrt(sq.clamp_min(1e-12)) * math.sqrt(temb.shape[-1])
        temb = self.text_embed_proj(temb.to(dt))
        temb = torch.where(keep[:, None], temb, self.null_text_embed.to(dt))
        feats = sinusoidal_embedding(noise_level, cfg.width, cfg.noise_scale).to(dt)
        time = self.time_fc2(F.silu(self.time_fc1(feats)))
        x = self.x_proj(x_t.float().to(dt))
        query = self.query.to(dt).expand(b, -1)
        extra = torch.stack([temb, time, x, query], dim=1)  # [B, 4, W]
        pos = self.pos_embed.to(dt)
        h = torch.cat([text + pos[:length], extra + pos[cfg.max_text_len:]], dim=1)

        n = length + NUM_EXTRA_TOKENS
        causal = torch.tril(torch.ones(n, n, dtype=torch.bool, device=dev))
        valid = torch.cat([mask, torch.ones(b, NUM_EXTRA_TOKENS, dtype=torch.bool,
                                            device=dev)], dim=1)  # [B, N]
        eye = torch.eye(n, dtype=torch.bool, device=dev)
        allowed = causal[None] & (valid[:, None, :] | eye[None])  # [B, N, N]
        for i in range(cfg.layers):
            h = getattr(self, f"block{i}")(h, allowed)
        h = self.final_norm(h)
        return self.out_proj(h[:, -1]).float()  # [B, clip_dim]

    @classmethod
    def from_pretrained(cls, directory: str, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu") -> "TorchPrior":
        """Loads ``OUT/prior`` of a torch export (``torch_convert.save_prior_pretrained``)
        strictly; see ``torch_layers.load_pretrained`` (call ``.eval()`` after)."""
        return load_pretrained(cls, directory, "prior", dtype=dtype, device=device)
