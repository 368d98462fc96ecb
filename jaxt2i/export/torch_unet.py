"""PyTorch port of the jaxt2i U-Net (`jaxt2i.models.unet.UNet`) for exported checkpoints.

Needs the ``[torch]`` extra (``pip install 'jaxt2i[torch]'``). A stage exported with
``python -m jaxt2i.export --format=torch`` (or ``jaxt2i.export.torch_convert.save_pretrained``)
is a folder with ``model.safetensors`` and ``config.json``; load and run it with::

    import torch
    from jaxt2i.export.torch_unet import TorchUNet

    net = TorchUNet.from_pretrained("export_pt/stage0_base_64px").eval()
    with torch.no_grad():
        pred = net(x_t, noise_level, text_emb, text_mask)  # x_t [B, C, H, W] -> [B, C, H, W]
        # SR stages also take lowres [B, C, h, w] and aug_level [B]; an unCLIP decoder
        # (config.image_embed_dim > 0) image_embed [B, image_embed_dim].

``forward`` has the semantics of ``UNet.__call__`` (same conditioning, masks, learned null
text token, low-res resize, output = ``config.objective``), with images in PyTorch's NCHW
layout; the text inputs keep their [B, L, D] / [B, L] layout. Converted float32 weights give
the JAX float32 outputs to ~1e-5 (tested at 1e-4).

Dtypes. The module computes in the dtype of its parameters: float32 by default,
``net.to(torch.bfloat16)`` (or a bfloat16 export, which ``from_pretrained`` loads as a
bfloat16 module) for bfloat16. As in JAX, normalisation statistics, the sinusoidal level
features, the low-res resize and the attention logits and softmax are float32 whatever the
compute dtype; inputs may be float32 and the output is always float32. ``config.dtype`` (the
JAX compute dtype) is not applied: a float32 module is the most exact copy of a
bfloat16-trained model. On Ampere and newer GPUs PyTorch runs float32 convolutions in TF32
by default (``torch.backends.cudnn.allow_tf32``); turn it off for bit-closer float32 results.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from jaxt2i.export.torch_layers import (  # noqa: F401 - attend etc. re-exported
    CONFIG_FILE, MODEL_FILE, GroupNorm, LayerNorm, Tensor, attend, load_pretrained,
    sinusoidal_embedding)
from jaxt2i.models.unet import AUG_LEVEL_SCALE, UNetConfig, resize_matrix


def _heads(config: UNetConfig, channels: int) -> tuple[int, int]:
    """(number of heads, head dimension) for an attention layer over ``channels``."""
    if config.num_heads:
        return config.num_heads, config.head_dim
    return max(1, channels // config.head_dim), config.head_dim


class LevelEmbedding(nn.Module):
    """Noise (or augmentation) level -> [B, E]: sinusoids and a 2-layer SiLU MLP."""

    def __init__(self, config: UNetConfig, scale: float | None = None):
        super().__init__()
        self.dim = config.base_channels
        self.scale = float(config.noise_scale if scale is None else scale)
        self.fc1 = nn.Linear(config.base_channels, config.emb_dim)
        self.fc2 = nn.Linear(config.emb_dim, config.emb_dim)

    def forward(self, t: Tensor) -> Tensor:
        """[B] float -> [B, E]."""
        feats = sinusoidal_embedding(t, self.dim, self.scale).to(self.fc1.weight.dtype)
        return self.fc2(F.silu(self.fc1(feats)))


class AttentionPool(nn.Module):
    """Pools text tokens into one vector with a learned query, respecting the mask."""

    def __init__(self, config: UNetConfig, width: int):
        super().__init__()
        self.heads, self.head_dim = _heads(config, width)
        inner = self.heads * self.head_dim
        self.query = nn.Parameter(torch.empty(self.heads, self.head_dim))
        nn.init.normal_(self.query, std=width ** -0.5)
        self.kv = nn.Linear(width, 2 * inner, bias=False)
        self.out = nn.Linear(inner, config.emb_dim, bias=False)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """Args: tokens [B, L, E]; mask [B, L] bool.

        Returns:
          [B, emb_dim].
        """
        b, n = tokens.shape[:2]
        kv = self.kv(tokens).reshape(b, n, 2, self.heads, self.head_dim)  # [B, L, 2, N, D]
        q = self.query.to(tokens.dtype).expand(b, 1, self.heads, self.head_dim)
        out = attend(q, kv[:, :, 0], kv[:, :, 1], mask)[:, 0]  # [B, N, D]
        return self.out(out.reshape(b, -1))  # [B, E]


class ResBlock(nn.Module):
    """GN-SiLU-conv, scale-and-shift from the embedding, GN-SiLU-conv, residual."""

    def __init__(self, config: UNetConfig, in_channels: int, features: int):
        super().__init__()
        groups = config.norm_groups
        self.norm1 = GroupNorm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, features, 3, padding=1)
        self.film = nn.Linear(config.emb_dim, 2 * features)
        self.norm2 = GroupNorm(features, groups)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)
        self.shortcut = (nn.Conv2d(in_channels, features, 1) if in_channels != features
                         else None)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """Args: x [B, C_in, H, W]; emb [B, E] after SiLU.

        Returns:
          [B, features, H, W].
        """
        h = self.conv1(F.silu(self.norm1(x)))  # [B, F, H, W]
        scale, shift = self.film(emb).chunk(2, dim=-1)  # 2 x [B, F]
        h = self.conv2(F.silu(self.norm2(h, (scale, shift))))
        if self.shortcut is not None:
            x = self.shortcut(x)
        return x + h


class AttentionBlock(nn.Module):
    """Pre-norm attention over pixels: 'self', 'cross' (to text) or 'concat' (both)."""

    def __init__(self, config: UNetConfig, channels: int, kind: str):
        super().__init__()
        self.kind = kind
        self.heads, self.head_dim = _heads(config, channels)
        inner = self.heads * self.head_dim
        self.norm = GroupNorm(channels, config.norm_groups)
        if kind == "cross":
            self.q = nn.Linear(channels, inner, bias=False)
        else:
            self.qkv = nn.Linear(channels, 3 * inner, bias=False)
        if kind in ("cross", "concat"):
            self.text_kv = nn.Linear(config.emb_dim, 2 * inner, bias=False)
        self.out = nn.Linear(inner, channels, bias=False)

    def forward(self, x: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        """Args: x [B, C, H, W]; text [B, L, E]; text_mask [B, L] bool.

        Returns:
          [B, C, H, W], the input plus the attention output.
        """
        b, c, hh, ww = x.shape
        nh, hd = self.heads, self.head_dim
        h = self.norm(x).flatten(2).transpose(1, 2)  # [B, N, C]
        mask = None
        if self.kind == "cross":
            q = self.q(h).reshape(b, hh * ww, nh, hd)  # [B, N, heads, hd]
        else:
            q, k, v = self.qkv(h).reshape(b, hh * ww, 3, nh, hd).unbind(dim=2)
        if self.kind in ("cross", "concat"):
            tk, tv = self.text_kv(text).reshape(b, text.shape[1], 2, nh, hd).unbind(dim=2)
            if self.kind == "cross":
                k, v, mask = tk, tv, text_mask
            else:
                k, v = torch.cat([k, tk], dim=1), torch.cat([v, tv], dim=1)
                ones = torch.ones(b, hh * ww, dtype=torch.bool, device=x.device)
                mask = torch.cat([ones, text_mask], dim=1)
        out = attend(q, k, v, mask).reshape(b, hh * ww, nh * hd)  # [B, N, heads*hd]
        out = self.out(out).transpose(1, 2).reshape(b, c, hh, ww)
        return x + out


class TorchUNet(nn.Module):
    """The jaxt2i text-conditional U-Net in PyTorch (base or super-resolution stage).

    Submodules keep the Flax module names (``noise_embed``, ``text_pool``, ``stem``,
    ``down1_downsample``, ``down1_res0``, ``down1_attn0_0``, ``up0_res1``, ``head``...), so
    the state dict of a converted checkpoint is
    ``jaxt2i.export.torch_convert.unet_state_dict(params, config)``.

    Attributes:
      config: the UNetConfig.
    """

    def __init__(self, config: UNetConfig | Mapping[str, Any]):
        """Args: config: a UNetConfig or its ``to_dict()`` (the "unet" entry of config.json)."""
        super().__init__()
        cfg = config if isinstance(config, UNetConfig) else UNetConfig.from_dict(config)
        self.config = cfg
        widths, emb = cfg.widths, cfg.emb_dim
        self.noise_embed = LevelEmbedding(cfg)
        self.text_norm = LayerNorm(cfg.text_dim)
        self.text_proj = nn.Linear(cfg.text_dim, emb)
        if cfg.text_conv:
            self.text_conv = nn.Conv1d(emb, emb, cfg.text_conv, padding=cfg.text_conv // 2)
            nn.init.zeros_(self.text_conv.weight)
            nn.init.zeros_(self.text_conv.bias)
        self.text_null = nn.Parameter(torch.empty(emb))
        nn.init.normal_(self.text_null, std=0.02)
        self.text_pool = AttentionPool(cfg, emb)
        if cfg.image_embed_dim:  # unCLIP decoder
            self.image_norm = LayerNorm(cfg.image_embed_dim)
            self.image_proj = nn.Linear(cfg.image_embed_dim, emb)
            if cfg.image_embed_tokens:
                self.image_tokens = nn.Linear(cfg.image_embed_dim, cfg.image_embed_tokens * emb)
        if cfg.is_sr:
            self.aug_embed = LevelEmbedding(cfg, AUG_LEVEL_SCALE)

        def stage(ch: int, i: int, j: int, prefix: str) -> int:
            self.add_module(f"{prefix}{i}_res{j}", ResBlock(cfg, ch, widths[i]))
            for k, kind in enumerate(self._kinds(i)):
                self.add_module(f"{prefix}{i}_attn{j}_{k}", AttentionBlock(cfg, widths[i], kind))
            return widths[i]

        def merged(ch: int, skip: int) -> int:
            return ch + skip if cfg.skip_mode == "concat" else ch

        in_ch = cfg.channels * (2 if cfg.is_sr else 1)
        self.stem = nn.Conv2d(in_ch, widths[0], 3, padding=1)
        ch = widths[0]
        for i, blocks in enumerate(cfg.num_res_blocks):
            if i > 0 or cfg.stem_downsample:
                self.add_module(f"down{i}_downsample", nn.Conv2d(ch, widths[i], 2, stride=2))
                ch = widths[i]
            for j in range(blocks):
                ch = stage(ch, i, j, "down")
        last = len(widths) - 1
        for i in reversed(range(len(widths))):
            if i < last:
                ch = merged(ch, widths[i])
            for j in range(cfg.num_res_blocks[i]):
                ch = stage(ch, i, j, "up")
            if i > 0 or cfg.stem_downsample:
                out = widths[max(i - 1, 0)]
                self.add_module(f"up{i}_upsample", nn.ConvTranspose2d(ch, out, 2, stride=2))
                ch = out
        if cfg.stem_downsample:
            ch = merged(ch, widths[0])
        self.head_norm = GroupNorm(ch, cfg.norm_groups)
        self.head = nn.Conv2d(ch, cfg.channels, 3, padding=1)

    def _kinds(self, level: int) -> list[str]:
        kinds = self.config.attention[level]
        return [] if kinds == "none" else kinds.split("+")

    def forward(self, x_t: Tensor, noise_level: Tensor | float, text_emb: Tensor,
                text_mask: Tensor, lowres: Tensor | None = None,
                aug_level: Tensor | float | None = None,
                image_embed: Tensor | None = None) -> Tensor:
        """Predicts eps, v or x0 (``config.objective``) for a noisy image.

        Args:
          x_t: [B, C, H, W] noisy images; H and W divisible by ``config.size_factor``.
          noise_level: [B] (or a scalar): continuous time, log-SNR or a discrete step (see
            ``config.noise_scale``).
          text_emb: [B, L, text_dim] text-encoder outputs.
          text_mask: [B, L] bool/int, 1 for real tokens; an all-zero row is allowed.
          lowres: SR stages only: [B, C, h, w] low-resolution image in [-1, 1].
          aug_level: SR stages only: [B] augmentation level in [0, 1] (zeros if None).
          image_embed: unCLIP decoders (``config.image_embed_dim`` > 0) only, required there:
            [B, image_embed_dim] CLIP image embedding (all zeros: the null condition).

        Returns:
          [B, C, H, W] float32 prediction.
        """
        cfg = self.config
        dt = self.stem.weight.dtype
        b, _, height, width = x_t.shape
        if height % cfg.size_factor or width % cfg.size_factor:
            raise ValueError(f"image size {height}x{width} must be divisible by "
                             f"{cfg.size_factor} for this U-Net (one halving per downsample)")
        dev = x_t.device
        noise_level = torch.as_tensor(noise_level, dtype=torch.float32, device=dev)
        noise_level = noise_level.broadcast_to((b,))

        x = x_t.float()
        if cfg.is_sr:
            if lowres is None:
                raise ValueError("this is a super-resolution U-Net (lowres_size > 0): pass lowres")
            x = torch.cat([x, self._resize(lowres, (height, width))], dim=1)  # [B, 2C, H, W]
        elif lowres is not None or aug_level is not None:
            raise ValueError("lowres/aug_level given to a base U-Net (config.lowres_size == 0)")

        emb = self.noise_embed(noise_level)  # [B, E]
        tokens, mask = self._text_tokens(text_emb, text_mask)  # [B, 1+L, E], [B, 1+L]
        emb = emb + self.text_pool(tokens, mask)
        if cfg.image_embed_dim:  # the image embedding -> emb and extra context tokens
            if image_embed is None or tuple(image_embed.shape) != (b, cfg.image_embed_dim):
                got = None if image_embed is None else tuple(image_embed.shape)
                raise ValueError(f"this unCLIP decoder needs image_embed of shape ({b}, "
                                 f"{cfg.image_embed_dim}), got {got} (zeros = no image)")
            z = self.image_norm(image_embed.float())
            emb = emb + self.image_proj(z)
            if cfg.image_embed_tokens:
                extra = self.image_tokens(z).reshape(b, cfg.image_embed_tokens, -1)
                tokens = torch.cat([tokens, extra.to(tokens.dtype)], dim=1)
                mask = torch.cat([mask, torch.ones(extra.shape[:2], dtype=torch.bool,
                                                   device=mask.device)], dim=1)
        elif image_embed is not None:
            raise ValueError("image_embed given to a U-Net without image conditioning "
                             "(config.image_embed_dim == 0)")
        if cfg.is_sr:
            aug = 0.0 if aug_level is None else aug_level
            aug = torch.as_tensor(aug, dtype=torch.float32, device=dev).broadcast_to((b,))
            emb = emb + self.aug_embed(aug)
        emb = F.silu(emb)

        scale = torch.tensor(2 ** -0.5 if cfg.scale_skip else 1.0, dtype=dt, device=dev)

        def merge(h: Tensor, skip: Tensor) -> Tensor:
            if cfg.skip_mode == "add":
                return (h + skip) * scale
            return torch.cat([h, skip * scale], dim=1)

        def stage(h: Tensor, i: int, j: int, prefix: str) -> Tensor:
            h = getattr(self, f"{prefix}{i}_res{j}")(h, emb)
            for k in range(len(self._kinds(i))):
                h = getattr(self, f"{prefix}{i}_attn{j}_{k}")(h, tokens, mask)
            return h

        stem = self.stem(x.to(dt))  # [B, C0, H, W]
        h = stem
        skips = []
        for i, blocks in enumerate(cfg.num_res_blocks):
            if i > 0 or cfg.stem_downsample:
                h = getattr(self, f"down{i}_downsample")(h)
            for j in range(blocks):
                h = stage(h, i, j, "down")
            skips.append(h)
        last = len(cfg.widths) - 1
        for i in reversed(range(len(cfg.widths))):
            if i < last:
                h = merge(h, skips[i])
            for j in range(cfg.num_res_blocks[i]):
                h = stage(h, i, j, "up")
            if i > 0 or cfg.stem_downsample:
                h = getattr(self, f"up{i}_upsample")(h)
        if cfg.stem_downsample:
            h = merge(h, stem)
        h = F.silu(self.head_norm(h))
        return self.head(h).float()  # [B, C, H, W]

    def _resize(self, lowres: Tensor, size: tuple[int, int]) -> Tensor:
        """[B, C, h, w] -> [B, C, H, W] float32 with ``config.lowres_resize`` (as jax.image)."""
        lowres = lowres.float()
        (h, w), (hh, ww) = lowres.shape[2:], size
        if (h, w) == (hh, ww):
            return lowres
        method = self.config.lowres_resize
        # The interpolation matrices of the JAX model (numpy, cached there).
        rows = torch.tensor(resize_matrix(h, hh, method), device=lowres.device)  # [H, h]
        cols = torch.tensor(resize_matrix(w, ww, method), device=lowres.device)  # [W, w]
        return torch.einsum("Hh,bchw,Ww->bcHW", rows, lowres, cols)

    def _text_tokens(self, text_emb: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised, projected text tokens after a learned always-valid null token.

        Returns:
          tokens [B, 1+L, E] in the compute dtype and mask [B, 1+L] bool.
        """
        b = text_emb.shape[0]
        mask = torch.as_tensor(text_mask, device=text_emb.device).bool()  # [B, L]
        # Zero padded positions so that even non-finite padding cannot leak through 0 * inf.
        text = torch.where(mask[..., None], text_emb.float(), 0.0)
        text = self.text_proj(self.text_norm(text))  # [B, L, E]
        if self.config.text_conv:
            text = torch.where(mask[..., None], text, torch.zeros((), dtype=text.dtype,
                                                                  device=text.device))
            text = text + self.text_conv(text.transpose(1, 2)).transpose(1, 2)
        null = self.text_null.to(text.dtype).expand(b, 1, -1)
        tokens = torch.cat([null, text], dim=1)
        ones = torch.ones(b, 1, dtype=torch.bool, device=mask.device)
        return tokens, torch.cat([ones, mask], dim=1)

    @classmethod
    def from_pretrained(cls, directory: str, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu") -> "TorchUNet":
        """Loads a folder written by ``jaxt2i.export.torch_convert.save_pretrained``.

        Args:
          directory: folder with ``config.json`` ({"unet": UNetConfig dict, ...}) and
            ``model.safetensors``.
          dtype: parameter dtype; default: the dtype stored in the file (a bfloat16 export
            gives a bfloat16 module).
          device: where the parameters are loaded.

        Returns:
          The module with every weight loaded (``strict=True``), in training mode as any
          freshly built torch module: call ``.eval()`` (it has no dropout or batch norm).

        Raises:
          FileNotFoundError: if a file is missing.
          ValueError: if config.json has no "unet" entry, or the file's tensors do not match
            the config (the missing, unexpected and mis-shaped names are listed).
        """
        return load_pretrained(cls, directory, "unet", dtype=dtype, device=device)
