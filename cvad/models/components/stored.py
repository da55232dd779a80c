"""Float matrices kept in the form a device stores them, and decoded to float32 on every use.

A codec turns a float32 matrix [N, F] into named parts (the "" part first: what a row holds) and
back. Methods keep the parts as buffers, so ``state_dict()``, a detector file and an exported
graph hold the stored bytes (codes, scales, codebooks) and ``memory_footprint`` counts exactly
those; every score is computed from the decoded matrix, so metrics are the compressed model's.

- ``fp32`` / ``fp16``: the values (fp16 rounds each to half precision);
- ``int8``: 8-bit codes with a scale and an offset per column (bank features) or per row (a
  weight's output channels, a prototype): x = code * scale + offset;
- ``pq``: product quantization (Jegou et al., 2011): a row is cut into M sub-vectors, each
  replaced by the 1-byte index of its nearest centroid in that sub-vector's codebook (K
  centroids, k-means, seeded, trained on the data the caller gives, kept in fp16); a distance
  to a decoded row is the asymmetric PQ distance.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch
from torch import nn

from cvad.models.base import TensorList

Parts = dict[str, torch.Tensor]  # "" is the main part (one entry per row); others are shared or per-row
KMEANS_ITERATIONS = 20
KMEANS_POINTS = 16_384  # training rows a codebook is fit on at most (a seeded sample: 64 per centroid at K = 256)


class Codec(ABC):
    """A float32 matrix [N, F] <-> its stored parts."""

    parts: tuple[str, ...] = ("",)
    row_parts: frozenset[str] = frozenset({""})  # parts indexed by row (the rest are shared by all rows)

    @abstractmethod
    def encode(self, x: torch.Tensor, fit: torch.Tensor | None = None, seed: int = 0) -> Parts:
        """The stored form of ``x``; ``fit`` is the data a learned code is trained on (default ``x``)."""

    @abstractmethod
    def decode(self, parts: Parts) -> torch.Tensor:
        """The float32 matrix the stored parts stand for."""

    def take(self, parts: Parts, rows: torch.Tensor | slice) -> Parts:
        """The stored form of the rows ``rows`` of a matrix, without coding them again (copies, never views)."""
        return {name: value[rows].clone() if name in self.row_parts else value for name, value in parts.items()}

    def zeros(self, rows: int, dim: int, like: torch.Tensor) -> Parts:
        """Placeholder parts of the shapes ``rows`` x ``dim`` stores (``cvad cost`` prices shapes, not values)."""
        return self.encode(like.new_zeros(rows, dim))


class Float32(Codec):
    def encode(self, x, fit=None, seed=0):
        return {"": x.float().contiguous()}

    def decode(self, parts):
        return parts[""]


class Float16(Codec):
    def encode(self, x, fit=None, seed=0):
        return {"": x.half().contiguous()}

    def decode(self, parts):
        return parts[""].float()


class Int8(Codec):
    """8-bit affine codes; one scale and offset per column (``per="column"``) or per row (``per="row"``)."""

    parts = ("", "scale", "offset")

    def __init__(self, per: str) -> None:
        self.per = per
        self.row_parts = frozenset({"", "scale", "offset"}) if per == "row" else frozenset({""})

    def encode(self, x, fit=None, seed=0):
        x = x.float()
        dim = 1 if self.per == "row" else 0
        low, high = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
        scale = ((high - low) / 255).clamp_min(torch.finfo(torch.float32).tiny)
        codes = ((x - low) / scale).round_().clamp_(0, 255).to(torch.uint8)
        return {"": codes, "scale": scale.flatten().contiguous(), "offset": low.flatten().contiguous()}

    def decode(self, parts):
        shape = (-1, 1) if self.per == "row" else (1, -1)
        return parts[""].float() * parts["scale"].view(shape) + parts["offset"].view(shape)


class ProductQuantizer(Codec):
    """M sub-vectors per row, each a 1-byte index into its own K-centroid codebook (fp16)."""

    parts = ("", "codebooks")

    def __init__(self, subvectors: int, centroids: int) -> None:
        self.subvectors = subvectors
        self.centroids = centroids

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """[N, F] -> [M, N, F/M]."""
        if x.shape[1] % self.subvectors:
            raise ValueError(f"pq: {x.shape[1]} features do not split into {self.subvectors} equal sub-vectors")
        return x.reshape(len(x), self.subvectors, -1).transpose(0, 1)

    def encode(self, x, fit=None, seed=0):
        x = x.float()
        fit = x if fit is None else fit.float()
        generator = torch.Generator().manual_seed(seed)
        if len(fit) > KMEANS_POINTS:
            fit = fit[torch.randperm(len(fit), generator=generator)[:KMEANS_POINTS].to(fit.device)]
        codebooks = kmeans(self.split(fit), min(self.centroids, len(fit)), generator).half()
        return {"": self.assign(x, codebooks), "codebooks": codebooks}

    def assign(self, x: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
        """Each row's nearest centroid per sub-vector, [N, M] uint8."""
        centroids = codebooks.float()
        codes = [nearest_centroid(part, centroids[m]) for m, part in enumerate(self.split(x))]
        return torch.stack(codes, dim=1).to(torch.uint8)

    def decode(self, parts):
        codes, codebooks = parts[""], parts["codebooks"]  # [N, M], [M, K, F/M]
        m, k, width = codebooks.shape
        offsets = torch.arange(m, device=codes.device) * k
        flat = codebooks.reshape(m * k, width).float()
        return flat.index_select(0, (codes.long() + offsets).flatten()).view(len(codes), m * width)

    def zeros(self, rows, dim, like):
        width = dim // self.subvectors
        return {
            "": torch.zeros(rows, self.subvectors, dtype=torch.uint8, device=like.device),
            "codebooks": like.new_zeros(self.subvectors, self.centroids, width, dtype=torch.float16),
        }


def nearest_centroid(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of each point's nearest centroid (|c|^2 - 2 p.c ranks them as the squared distance does)."""
    return torch.addmm(centroids.square().sum(dim=1), points, centroids.T, alpha=-2).argmin(dim=1)


def kmeans(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Seeded Lloyd k-means on each of M groups of points [M, N, W] -> centroids [M, k, W].

    Starts from k distinct points drawn from the generator; a centroid left without points keeps
    its place. A fixed iteration count keeps the result a function of the data and the seed.
    """
    groups = []
    for group in points:
        centroids = group[torch.randperm(len(group), generator=generator)[:k].to(group.device)].clone()
        for _ in range(KMEANS_ITERATIONS):
            label = nearest_centroid(group, centroids)
            sums = torch.zeros_like(centroids).index_add_(0, label, group)
            counts = torch.bincount(label, minlength=k).unsqueeze(1)
            filled = counts.squeeze(1) > 0
            centroids[filled] = sums[filled] / counts[filled]
        groups.append(centroids)
    return torch.stack(groups)


def codec_for(memory: str, subvectors: int = 16, centroids: int = 256, per: str = "column") -> Codec:
    """The codec of a ``compression.memory`` (or ``compression.backbone``) format."""
    if memory == "pq":
        return ProductQuantizer(subvectors, centroids)
    if memory == "int8":
        return Int8(per)
    return Float16() if memory == "fp16" else Float32()


class StoredRows(TensorList):
    """A list of float matrices (one per task: PatchCore's banks), each kept in ``codec``'s stored form.

    The main parts are this list's own buffers ("0", "1", ...: the keys an fp32 list has always had), the
    other parts live in child lists; indexing and iteration give the decoded float32 matrices.
    """

    def __init__(self, codec: Codec) -> None:
        super().__init__()
        self.codec = codec
        self.shared = nn.ModuleDict({name: TensorList() for name in codec.parts if name})

    def assign_stored(self, entries: list[Parts]) -> None:
        """Replace the whole list with these stored forms."""
        self.assign([entry[""] for entry in entries])
        for name, values in self.shared.items():
            values.assign([entry[name] for entry in entries])

    def stored(self, index: int) -> Parts:
        return {"": super().__getitem__(index), **{name: values[index] for name, values in self.shared.items()}}

    def rows(self, index: int) -> int:
        return len(super().__getitem__(index))

    def stored_tensors(self) -> list[torch.Tensor]:
        return [tensor for index in range(len(self)) for tensor in self.stored(index).values()]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.codec.decode(self.stored(index))

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[index] for index in range(len(self)))


class StoredMatrix:
    """One float matrix kept in ``codec``'s stored form as buffers of ``owner``: ``name`` (the main part) and
    ``name_<part>`` (the keys an fp32 buffer of that name has always had stay the same)."""

    def __init__(self, owner: nn.Module, name: str, codec: Codec) -> None:
        self.owner, self.name, self.codec = owner, name, codec
        for part in codec.parts:
            owner.register_buffer(self.buffer(part), None)

    def buffer(self, part: str) -> str:
        return f"{self.name}_{part}" if part else self.name

    @property
    def empty(self) -> bool:
        main = getattr(self.owner, self.name)
        return main is None or main.numel() == 0

    def stored(self) -> Parts:
        return {part: getattr(self.owner, self.buffer(part)) for part in self.codec.parts}

    def put(self, parts: Parts) -> None:
        for part, value in parts.items():
            setattr(self.owner, self.buffer(part), value)

    def append(self, rows: torch.Tensor) -> None:
        """Code ``rows`` and add them below the stored rows (a per-row codec only: shared parts would change)."""
        new = self.codec.encode(rows)
        if self.empty:
            self.put(new)
            return
        if set(self.codec.parts) - self.codec.row_parts:
            raise TypeError(f"{self.name}: rows cannot be appended to a matrix whose codes share a scale")
        old = self.stored()  # a main part saved before rows were flattened (e.g. [T, C, h, w]) joins as rows
        self.put({part: torch.cat([value.flatten(1) if not part else value, new[part]]) for part, value in old.items()})

    def decoded(self) -> torch.Tensor:
        return self.codec.decode(self.stored())

    def tensors(self) -> list[torch.Tensor]:
        return [] if self.empty else list(self.stored().values())


class DecodedWeight:
    """Mixin of a convolution or linear layer whose weight is stored coded: ``weight`` is decoded on each call,
    as a weight-only runtime does."""

    weight_codec: Codec
    weight_shape: torch.Size

    @property
    def weight(self) -> torch.Tensor:
        parts = {part: self._buffers[f"weight_{part}" if part else "weight"] for part in self.weight_codec.parts}
        return self.weight_codec.decode(parts).view(self.weight_shape)


_DECODED_CLASSES: dict[type, type] = {}


def store_weights(network: nn.Module, weights: str) -> None:
    """Keep every convolution and linear weight of a frozen ``network`` as ``weights`` (fp16, or int8 with a
    scale and offset per output channel); biases and normalisation stay fp32 (a few KB)."""
    if weights == "fp32":
        return
    codec = codec_for(weights, per="row")
    for module in network.modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)) or isinstance(module, DecodedWeight):
            continue
        weight = module.weight.detach()
        del module.weight
        for part, value in codec.encode(weight.reshape(len(weight), -1)).items():
            module.register_buffer(f"weight_{part}" if part else "weight", value)
        base = type(module)
        if base not in _DECODED_CLASSES:
            _DECODED_CLASSES[base] = type(f"Decoded{base.__name__}", (DecodedWeight, base), {})
        module.__class__ = _DECODED_CLASSES[base]
        module.weight_codec, module.weight_shape = codec, weight.shape
