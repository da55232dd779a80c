"""Dinomaly and Tiny-Dinomaly (docs/methods.md section 6; paper sections 3.3-3.4).

A frozen ViT encoder and a trained transformer decoder that reconstructs the encoder's
middle-layer tokens (Guo et al., "Dinomaly: The Less Is More Philosophy in Multi-Class
Unsupervised Anomaly Detection", CVPR 2025). Tiny-Dinomaly is the same method on
``deit_tiny_patch16_224``: the decoder takes the encoder's width and heads, so it is of
comparable scale (dim 192, 3 heads) instead of the original's DINOv2 ViT-B (768, 12).

The inference path, as in the original (``ViTill`` with its MVTec settings):

1. encoder blocks ``encoder_groups`` (default 2..9 of 12) give tokens, prefix tokens
   (class, registers) included;
2. noisy bottleneck: the mean of all those layers through an MLP (dim -> 4 dim -> dim)
   with dropout on its input, hidden and output (dropout acts in training only);
3. ``decoder_blocks`` transformer blocks with linear attention (elu + 1 feature map, no
   softmax: a query cannot focus on a few keys, so anomalous tokens are not copied);
4. loose reconstruction: each encoder group's mean is paired with the mean of the
   decoder blocks in the matching ``decoder_groups`` entry (by default the last four
   decoder blocks rebuild the shallow group, as the original reverses its decoder list);
5. map: 1 - cosine similarity per patch token, averaged over the groups, bilinear to the
   input size, Gaussian blur (sigma 4, truncated at 4 sigma; the original uses a 5 x 5
   kernel); image score: mean of the top ``score_top_ratio`` (1 %) of the map's pixels,
   the original's ``max_ratio=0.01`` for MVTec AD.

Training loss: per group, 1 - cosine similarity between the whole flattened target and
reconstruction of each image (the original's global cosine), with hard-point mining: the
gradient of the ``hard_mining_fraction`` best-reconstructed tokens of the batch is
multiplied by ``hard_mining_factor``; the fraction ramps linearly from 0 over the first
``hard_mining_warmup`` of each task's steps (the original: 0.9, x 0.1, 1000 of 10 000
iterations). The learning rate warms up linearly and then decays along a cosine to
``lr_final_ratio`` x lr, per task. A task trains with a fresh optimiser.

The encoder runs at the configured image size: its position embedding is resampled once
(bicubic, timm's ``set_input_size``) to the size's patch grid, which must be whole.

Stored (``stored_tensors``): the encoder truncated after its deepest used block (no final
norm, no head), the bottleneck and decoder weights, the blur kernel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cvad.backbones import FeatureExtractor, taps
from cvad.methods.dinomaly import DinomalyParams, DinomalySpec
from cvad.models.base import AnomalyModel, AnomalyOutput, Setup, Task
from cvad.models.components.frozen import FrozenOutputs, network_digest
from cvad.models.components.maps import AnomalyMapHead
from cvad.models.components.training import make_optimizer, train_loop
from cvad.runtime import step_seed

MLP_RATIO = 4  # hidden width of the bottleneck and of every decoder MLP, in multiples of the token width
LAYER_NORM_EPS = 1e-8  # the original decoder's LayerNorm epsilon


class SeededDropout(nn.Module):
    """Dropout drawing its masks from the method's own seeded generator (one per device), so runs repeat."""

    def __init__(self, p: float, seed: int) -> None:
        super().__init__()
        self.p = p
        self.seed = seed
        self.generators: dict[torch.device, torch.Generator] = {}

    def reseed(self, seed: int) -> None:
        """Draw the next masks from ``seed`` (each stream step starts its own draws)."""
        self.seed = seed
        self.generators.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        generator = self.generators.get(x.device)
        if generator is None:
            generator = self.generators[x.device] = torch.Generator(x.device).manual_seed(self.seed)
        keep = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) >= self.p
        return x * keep / (1 - self.p)


class NoisyBottleneck(nn.Module):
    """MLP with dropout before, inside and after it: the decoder never sees a clean copy of the tokens."""

    def __init__(self, dim: int, dropout: float, seed: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, MLP_RATIO * dim)
        self.fc2 = nn.Linear(MLP_RATIO * dim, dim)
        self.drop = SeededDropout(dropout, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(self.drop(x))
        x = self.fc2(self.drop(F.gelu(x)))
        return self.drop(x)


class LinearAttention(nn.Module):
    """Multi-head attention with the elu + 1 kernel instead of softmax (the original's LinearAttention2).

    phi(Q) (phi(K)^T V) / (phi(Q) sum phi(K)): each head summarises all keys in a d x d
    matrix, so the cost is linear in the tokens and no query can attend to a few keys.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"token width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        q = F.elu(q) + 1.0
        k = F.elu(k) + 1.0
        summary = k.transpose(-2, -1) @ v  # [B, heads, d, d]
        normaliser = q @ k.sum(dim=-2, keepdim=True).transpose(-2, -1)  # [B, heads, N, 1]
        out = (q @ summary) / normaliser
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class DecoderBlock(nn.Module):
    """Pre-norm transformer block: linear attention and a GELU MLP, both residual."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = LinearAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = nn.Sequential(nn.Linear(dim, MLP_RATIO * dim), nn.GELU(), nn.Linear(MLP_RATIO * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Dinomaly(DinomalySpec, AnomalyModel):
    """Dinomaly / Tiny-Dinomaly: reconstruct a frozen ViT's middle-layer tokens with a linear-attention decoder.

    Default schedule (CPU, built-in data, 224 px): AdamW, lr 2e-3 with a 1 % warm-up (none at
    the default 40 updates per task: 1 % of 40 rounds to 0) and a cosine decay to 2e-4, weight
    decay 1e-4, gradient-norm clip 0.1. ``PAPER_TRAINING`` approximates the original's schedule
    for MVTec AD with plain AdamW; the original: StableAdamW (AMSGrad, eps 1e-10), lr 2e-3,
    betas (0.9, 0.999), weight decay 1e-4, 100 warm-up iterations then cosine to 2e-4, 10 000
    iterations of batch 16, clip 0.1, images resized to 448 and centre-cropped to 392 (with
    DINOv2's patch 14: a 28 x 28 grid).
    """

    params: DinomalyParams

    def __init__(self, params: DinomalyParams, setup: Setup) -> None:
        super().__init__(params, setup)
        self.check_setup(params, setup)
        image_size = setup.image_size
        self.encoder_layers = sorted({layer for group in params.encoder_groups for layer in group})
        self.backbone = FeatureExtractor(
            setup.backbone, tuple(f"blocks.{i}" for i in self.encoder_layers), setup.weights
        )
        vit = self.vit
        vit.set_input_size(img_size=(image_size, image_size))  # resample the position embedding once
        self.grid = (
            image_size // taps(setup.backbone)[0].stride
        )  # tokens per side: a ViT's taps are at its patch stride
        self.prefix_tokens = vit.num_prefix_tokens
        dim, heads = vit.embed_dim, vit.blocks[0].attn.num_heads

        self.bottleneck = NoisyBottleneck(dim, params.bottleneck_dropout, setup.seed)
        self.decoder = nn.ModuleList(DecoderBlock(dim, heads) for _ in range(params.decoder_blocks))
        self._initialise(torch.Generator().manual_seed(setup.seed))
        self.head = AnomalyMapHead(image_size, params.blur_sigma)
        self.top_pixels = max(1, int(params.score_top_ratio * image_size * image_size))
        self.loss_history: list[list[float]] = []
        self.easy_share = 0.0  # hard-mining share of the current update, set by the schedule

    @property
    def vit(self) -> nn.Module:
        """The timm VisionTransformer inside the frozen extractor (truncated after the deepest used block)."""
        return self.backbone.body.model

    def trained_modules(self) -> list[nn.Module]:
        return [self.bottleneck, self.decoder]

    @torch.no_grad()
    def _initialise(self, generator: torch.Generator) -> None:
        """The original's init: linear weights ~ N(0, 0.01) truncated at +-0.03, zero biases, unit LayerNorms."""
        for module in self.trained_modules():
            for layer in module.modules():
                if isinstance(layer, nn.Linear):
                    nn.init.trunc_normal_(layer.weight, std=0.01, a=-0.03, b=0.03, generator=generator)
                    nn.init.zeros_(layer.bias)
                elif isinstance(layer, nn.LayerNorm):
                    nn.init.ones_(layer.weight)
                    nn.init.zeros_(layer.bias)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Tokens [B, prefix + N, C] of every used encoder block, in ``encoder_layers`` order."""
        x = (images - self.backbone.mean) / self.backbone.std
        layers = self.vit.forward_intermediates(
            x, indices=self.encoder_layers, return_prefix_tokens=True, output_fmt="NLC", intermediates_only=True
        )
        return [torch.cat([prefix, patches], dim=1) for patches, prefix in layers]

    def reconstruct(
        self, images: torch.Tensor, frozen: FrozenOutputs | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per group: the encoder target and the decoder's reconstruction, patch tokens only, [B, N, C]."""
        layers = (frozen or self.encode)(images)
        by_block = dict(zip(self.encoder_layers, layers))
        x = self.bottleneck(torch.stack(layers).mean(dim=0))
        decoded = []
        for block in self.decoder:
            x = block(x)
            decoded.append(x)
        targets = [torch.stack([by_block[i] for i in group]).mean(dim=0) for group in self.params.encoder_groups]
        recons = [torch.stack([decoded[i] for i in group]).mean(dim=0) for group in self.params.decoder_groups]
        patches = slice(self.prefix_tokens, None)
        return [t[:, patches] for t in targets], [r[:, patches] for r in recons]

    def loss(self, targets: list[torch.Tensor], recons: list[torch.Tensor], easy_fraction: float) -> torch.Tensor:
        """Global cosine distance per image and group; the easiest ``easy_fraction`` of tokens get damped gradients."""
        losses = []
        for target, recon in zip(targets, recons):
            if easy_fraction > 0 and recon.requires_grad:
                with torch.no_grad():
                    distance = 1 - F.cosine_similarity(target, recon, dim=-1)  # [B, N]
                    hard = max(1, int(distance.numel() * (1 - easy_fraction)))
                    threshold = distance.flatten().topk(hard).values[-1]
                    weight = torch.where(distance < threshold, self.params.hard_mining_factor, 1.0).unsqueeze(-1)
                recon.register_hook(lambda grad, weight=weight: grad * weight)
            losses.append((1 - F.cosine_similarity(target.flatten(1), recon.flatten(1), dim=1)).mean())
        return torch.stack(losses).mean()

    def learning_rate(self, step: int, total: int) -> float:
        """Linear warm-up to ``lr``, then a cosine to ``lr * lr_final_ratio`` (the original's WarmCosineScheduler)."""
        peak, final = self.params.lr, self.params.lr * self.params.lr_final_ratio
        warmup = int(self.params.lr_warmup * total)
        if step < warmup:
            return peak * (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return final + 0.5 * (peak - final) * (1 + math.cos(math.pi * progress))

    def easy_fraction(self, step: int, total: int) -> float:
        ramp = self.params.hard_mining_warmup * total
        share = 1.0 if ramp == 0 else min(1.0, step / ramp)
        return self.params.hard_mining_fraction * share

    def fit_task(self, task: Task) -> None:
        for module in self.modules():
            if isinstance(module, SeededDropout):
                module.reseed(step_seed(self.setup.seed, task.index))
        trained = [p for module in self.trained_modules() for p in module.parameters()]
        optimizer = make_optimizer(self.params, trained)
        frozen = FrozenOutputs(
            self.encode, network_digest(self.backbone, f"tokens of blocks {self.encoder_layers}"), task.features
        )

        def schedule(update: int, total: int) -> None:
            for group in optimizer.param_groups:
                group["lr"] = self.learning_rate(update, total)
            self.easy_share = self.easy_fraction(update, total)

        def loss_of(images: torch.Tensor) -> torch.Tensor:
            return self.loss(*self.reconstruct(images, frozen), self.easy_share)

        self.loss_history.append(train_loop(self, task, optimizer, loss_of, on_update=schedule))

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        targets, recons = self.reconstruct(images)
        distance = torch.stack([1 - F.cosine_similarity(t, r, dim=-1) for t, r in zip(targets, recons)]).mean(dim=0)
        maps = self.head(distance.view(-1, self.grid, self.grid))
        scores = maps.flatten(1).topk(self.top_pixels, dim=1).values.mean(dim=1)
        return AnomalyOutput(scores, maps)

    def stored_tensors(self) -> dict[str, list[torch.Tensor]]:
        return {
            "encoder": list(self.backbone.parameters()) + list(self.backbone.buffers()),
            "bottleneck": list(self.bottleneck.parameters()),
            "decoder": list(self.decoder.parameters()),
            "map_head": list(self.head.buffers()),
        }
