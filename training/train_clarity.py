"""Train imageqc's clarity model and write qc/models/clarity_v1.{onnx,json}.

Reproducible: seeded, deterministic CPU training, real source images only
(see clarity_data.py). Needs the ``train`` extra (PyTorch CPU, onnx), never a
runtime dependency::

    python -m venv .trainvenv
    .trainvenv/bin/pip install -e '.[train]'   # the CPU build of PyTorch is enough
    IMAGEQC_SHARED_DATA=../shared/data .trainvenv/bin/python training/train_clarity.py

Takes about 10-15 minutes on 2 cores. The sidecar records the classes,
window, normalisation, training data, held-back validation accuracy (overall,
per class, per source) with its confusion matrix, the date, and the commit of
this script.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import clarity_data as cd  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from qc import clarity  # noqa: E402

MODEL_NAME = "imageqc-clarity-v1"
OUT_DIR = REPO / "qc" / "models"


class ClarityNet(nn.Module):
    """Five 3x3 conv layers (8-16-32-64-64 channels), then mean and max pooling, then linear."""

    def __init__(self, n_classes: int) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            )

        self.features = nn.Sequential(
            block(1, 8, 1),  # 64: full-resolution edges (sharpness lives here)
            block(8, 16, 2),  # 32
            block(16, 32, 2),  # 16
            block(32, 64, 2),  # 8
            block(64, 64, 1),  # 8
        )
        self.head = nn.Linear(128, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        pooled = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
        return self.head(pooled)


def _tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x.astype(np.float32)[:, None] / 255.0)


def _augment(xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    k = int(torch.randint(4, (1,), generator=gen))
    xb = torch.rot90(xb, k, dims=(2, 3))
    if bool(torch.randint(2, (1,), generator=gen)):
        xb = torch.flip(xb, dims=(3,))
    return xb


def predict(net: nn.Module, x: np.ndarray, batch: int = 512) -> np.ndarray:
    net.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(net(_tensor(x[i : i + batch])).numpy())
    return np.concatenate(out)


def metrics(y: np.ndarray, pred: np.ndarray, src: np.ndarray, names: list[str]) -> dict:
    n = len(cd.CLASSES)
    conf = np.zeros((n, n), np.int64)
    np.add.at(conf, (y, pred), 1)
    per_class = {c: round(float(conf[i, i] / max(conf[i].sum(), 1)), 4) for i, c in enumerate(cd.CLASSES)}
    per_source = {
        names[s] if s >= 0 else "synthetic_background": round(float((pred[src == s] == y[src == s]).mean()), 4)
        for s in sorted(set(src.tolist()))
    }
    return {
        "windows": len(y),
        "accuracy": round(float((pred == y).mean()), 4),
        "per_class_accuracy": per_class,
        "per_source_accuracy": per_source,
        "confusion": {"rows_true_cols_predicted": list(cd.CLASSES), "matrix": conf.tolist()},
    }


def git_commit() -> dict:
    def run(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()

    dirty = run("status", "--porcelain", "--", "training", "qc/clarity/evaluate.py", "qc/clarity/model.py")
    return {"commit": run("rev-parse", "HEAD") or "unknown", "script_changes_uncommitted": bool(dirty)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=20240611)
    ap.add_argument("--per-class", type=int, default=6000, help="training windows per class")
    ap.add_argument("--val-per-class", type=int, default=1500, help="validation windows per class")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    args = ap.parse_args(argv)

    t0 = time.time()
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(args.threads)
    sources = cd.load_sources()
    train_src = [s for s in sources if s.split == "train"]
    val_src = [s for s in sources if s.split == "val"]
    xt, yt, st = cd.build_split(train_src, args.per_class, np.random.default_rng(args.seed))
    xv, yv, sv = cd.build_split(val_src, args.val_per_class, np.random.default_rng(args.seed + 1))
    print(f"data: {len(xt)} train / {len(xv)} val windows in {time.time() - t0:.0f} s", flush=True)

    net = ClarityNet(len(cd.CLASSES))
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * int(np.ceil(len(xt) / args.batch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(args.seed)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    xt_t, yt_t = _tensor(xt), torch.from_numpy(yt)
    for epoch in range(args.epochs):
        net.train()
        perm = torch.randperm(len(xt_t), generator=gen)
        total = 0.0
        for i in range(0, len(perm), args.batch):
            idx = perm[i : i + args.batch]
            xb = _augment(xt_t[idx], gen)
            loss = loss_fn(net(xb), yt_t[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        vacc = float((predict(net, xv).argmax(1) == yv).mean())
        print(
            f"epoch {epoch + 1}/{args.epochs}: loss {total / len(xt):.4f}, val acc {vacc:.4f} ({time.time() - t0:.0f} s)",
            flush=True,
        )

    train_names = [s.name for s in train_src]
    val_names = [s.name for s in val_src]
    val_metrics = metrics(yv, predict(net, xv).argmax(1), sv, val_names)
    train_metrics = metrics(yt, predict(net, xt).argmax(1), st, train_names)

    args.out.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out / "clarity_v1.onnx"
    net.eval()
    torch.onnx.export(
        net,
        (torch.zeros(1, 1, cd.WINDOW, cd.WINDOW),),
        str(onnx_path),
        input_names=["window"],
        output_names=["logits"],
        dynamic_axes={"window": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        do_constant_folding=True,
        dynamo=False,
    )
    from qc.clarity.model import import_onnxruntime

    ort = import_onnxruntime()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    probe = xv[:256]
    ort_logits = sess.run(["logits"], {"window": (probe.astype(np.float32)[:, None] / 255.0)})[0]
    max_diff = float(np.abs(ort_logits - predict(net, probe)).max())
    print(f"onnx vs torch max |logit diff| {max_diff:.2e}", flush=True)

    sidecar = {
        "schema": "imageqc.clarity-model/1",
        "name": MODEL_NAME,
        "file": onnx_path.name,
        "sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
        "classes": list(cd.CLASSES),
        "window": cd.WINDOW,
        "channels": 1,
        "mean": [0.0],
        "std": [255.0],
        "input": "window",
        "output": "logits",
        "rgb": "inverted_luminance",
        "intensity": {
            "percentiles": list(clarity.INTENSITY_PERCENTILES),
            "min_range_fraction": clarity.MIN_RANGE_FRACTION,
            "note": "qc.clarity.intensity_range + to_uint8, the same in training and inference",
        },
        "training": {
            "script": "training/train_clarity.py",
            **git_commit(),
            "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "seconds": round(time.time() - t0),
            "seed": args.seed,
            "epochs": args.epochs,
            "batch": args.batch,
            "lr": args.lr,
            "threads": args.threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "parameters": int(sum(p.numel() for p in net.parameters())),
            "sources": train_names,
            "windows_per_class": args.per_class,
            "train_accuracy": train_metrics["accuracy"],
            "degradations": cd.__doc__.split("Labels:")[1].strip(),
        },
        "validation": {"sources": val_names, **val_metrics},
        "onnx_max_logit_diff_vs_torch": max_diff,
    }
    (args.out / "clarity_v1.json").write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(sidecar["validation"], indent=1))
    print(f"wrote {onnx_path} ({onnx_path.stat().st_size} bytes) in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
