"""Training windows for the clarity model: real microscopy textures, synthetic degradations.

Sources are real images only (see load_sources): the Stereo-seq stain crops in
shared/data, the real CZI acquisitions in shared/data, scikit-image's bundled
immunohistochemistry image, and real SEM tiles. They are split by source image
into training and validation (held-back images, not held-back windows).

One *region* (192 x 192 px, 3 x 3 windows) is cut from a source (random
scale 0.7-1.5, flips, 90-degree turns, gamma 0.7-1.4), degraded as a whole
the way a microscope would (optics; a background pedestal of 0-10 % as from
autofluorescence; exposure; read and shot noise; clipping at full scale;
quantisation to uint8 or uint16), then mapped to 8 bits with the very
functions inference uses (qc.clarity.intensity_range / to_uint8), and cut
into windows. Labels:

* background: the clean window has no signal (99th percentile below 15 % of
  the source's bright level), or the region is synthetic empty chip surface
  (flat level, shading, noise, track lines, dust specks, or black);
* good: in focus (none or Gaussian sigma <= 1.5 px, the slight softness of
  real good images), exposure <= 1 (the source's 99.9th percentile at or
  below full scale) and under 10 % of the window's signal (clean > 0.3)
  clipped (a few saturated nuclei are normal);
* mild / severe blur: Gaussian defocus (sigma 3-4.5 / 6.5-14 px), disk
  defocus (radius 3.5-6 / 9-18 px) or motion blur (length 8-14 / 18-35 px);
* mild / severe over-exposure: exposure x1.3-12 with clipping at full scale;
  the severity is the share of the window's signal clipped: 20-50 % mild,
  70 % or more severe.

Windows between classes (signal 15-30 %, clipping with no over-exposure
label) are dropped rather than labelled ambiguously.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from qc.clarity import intensity_range, to_uint8

CLASSES = ("background", "good", "mild_blur", "severe_blur", "mild_overexposure", "severe_overexposure")
WINDOW = 64
REGION = 3 * WINDOW

REPO = Path(__file__).resolve().parents[1]


def shared_data() -> Path:
    env = os.environ.get("IMAGEQC_SHARED_DATA")
    return Path(env) if env else REPO / ".." / "shared" / "data"


@dataclass(frozen=True)
class Source:
    name: str
    split: str  # "train" | "val"
    image: np.ndarray  # float32 in [0, 1]: 0.5th percentile -> 0, 99.9th -> 1
    weight: float = 1.0  # how often it is drawn, relative to the others


def _unit(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32)
    lo, hi = np.percentile(a, [0.5, 99.9])
    return np.clip((a - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)


def _inverted_grey(rgb: np.ndarray) -> np.ndarray:
    """Bright-field RGB -> grey with stained nuclei bright (as qc's 'inverted_luminance')."""
    return 255.0 - rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def load_sources() -> list[Source]:
    """Every real source image, with its split. No network access."""
    import tifffile
    from pylibCZIrw import czi as pyczi
    from skimage import data as skdata

    root = shared_data()
    crops = root / "stereo_crops"

    def crop(stain: str) -> np.ndarray:
        (path,) = sorted((crops / stain / "input").glob("*.tif"))
        return tifffile.imread(path)

    out = [
        Source("stereo_DAPI", "train", _unit(crop("DAPI"))),
        Source("stereo_mIF", "val", _unit(crop("mIF"))),
        Source("stereo_HE_inverted", "train", _unit(_inverted_grey(crop("HE")))),
        Source("skimage_ihc_inverted", "train", _unit(_inverted_grey(skdata.immunohistochemistry()))),
        Source("stereo_ssDNA", "val", _unit(crop("ssDNA"))),
    ]
    with pyczi.open_czi(str(root / "czi" / "mosaic_test.czi")) as czi:
        out.append(Source("czi_mosaic_EGFP", "train", _unit(czi.read()[..., 0])))
    with pyczi.open_czi(str(root / "czi" / "DAPI_GFP.czi")) as czi:
        for ch, name in ((0, "DAPI"), (1, "GFP")):
            out.append(Source(f"czi_DAPI_GFP_{name}", "train", _unit(czi.read(plane={"C": ch})[..., 0])))
    for path in sorted((root / "tiles" / "stitch2d").glob("*.jpg")):
        grid = path.stem.split("@")[1].rstrip("]").replace(" ", "_")
        img = _unit(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE))
        out.append(Source(f"sem_tile_{grid}", "train", img, weight=0.25))  # six tiles of one specimen
    return out


# ---- degradations -------------------------------------------------------------------------------


def _disk_kernel(radius: float) -> np.ndarray:
    r = int(np.ceil(radius))
    k = np.zeros((2 * r + 1, 2 * r + 1), np.float32)
    cv2.circle(k, (r, r), round(radius), 1.0, -1, lineType=cv2.LINE_AA)
    return k / k.sum()


def _motion_kernel(length: float, angle: float) -> np.ndarray:
    n = int(np.ceil(length)) | 1
    k = np.zeros((n, n), np.float32)
    c = n // 2
    dx, dy = np.cos(angle) * (length - 1) / 2, np.sin(angle) * (length - 1) / 2
    cv2.line(k, (round(c - dx), round(c - dy)), (round(c + dx), round(c + dy)), 1.0, 1, cv2.LINE_AA)
    return k / k.sum()


def blur(img: np.ndarray, level: str, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """Optical blur of a graded strength: level 'none', 'mild' or 'severe'."""
    if level == "none":  # in focus: at most the slight softness of real good images
        if rng.random() < 0.6:
            s = rng.uniform(0.3, 1.5)
            return cv2.GaussianBlur(img, (0, 0), s), f"gauss{s:.2f}"
        return img, "none"
    kind = rng.choice(["gauss", "disk", "motion"], p=[0.5, 0.3, 0.2])
    mild = level == "mild"
    if kind == "gauss":
        s = rng.uniform(3.0, 4.5) if mild else rng.uniform(6.5, 14.0)
        return cv2.GaussianBlur(img, (0, 0), s), f"gauss{s:.1f}"
    if kind == "disk":
        r = rng.uniform(3.5, 6.0) if mild else rng.uniform(9.0, 18.0)
        return cv2.filter2D(img, -1, _disk_kernel(r), borderType=cv2.BORDER_REFLECT), f"disk{r:.1f}"
    length = rng.uniform(8.0, 14.0) if mild else rng.uniform(18.0, 35.0)
    k = _motion_kernel(length, rng.uniform(0, np.pi))
    return cv2.filter2D(img, -1, k, borderType=cv2.BORDER_REFLECT), f"motion{length:.0f}"


def sensor(signal: np.ndarray, rng: np.random.Generator, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """Add read and shot noise, clip at full scale, quantise. Returns (pixels, clipped mask)."""
    read = rng.uniform(0.0, 0.006)
    shot = rng.uniform(0.0, 0.0015)
    noisy = signal + rng.standard_normal(signal.shape).astype(np.float32) * np.sqrt(
        read**2 + shot * np.maximum(signal, 0)
    )
    clipped = noisy >= 1.0
    full = np.iinfo(dtype).max
    return np.clip(np.rint(noisy * full), 0, full).astype(dtype), clipped


def _cut(src: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A REGION x REGION view of a source at a random scale, flip and turn."""
    scale = float(np.exp(rng.uniform(np.log(0.7), np.log(1.5))))
    side = min(round(REGION / scale), *src.shape)
    y = int(rng.integers(0, src.shape[0] - side + 1))
    x = int(rng.integers(0, src.shape[1] - side + 1))
    patch = src[y : y + side, x : x + side]
    interp = cv2.INTER_AREA if side > REGION else cv2.INTER_LINEAR
    patch = cv2.resize(patch, (REGION, REGION), interpolation=interp)
    patch = np.rot90(patch, int(rng.integers(4)))
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    return np.ascontiguousarray(np.clip(patch, 0, 1)) ** np.float32(rng.uniform(0.7, 1.4))


def synthetic_background(rng: np.random.Generator) -> np.ndarray:
    """Empty chip surface: a dim level, shading, track lines, dust; sometimes plain black."""
    if rng.random() < 0.15:
        return np.zeros((REGION, REGION), np.float32)
    level = rng.uniform(0.0, 0.12)
    field = cv2.GaussianBlur(rng.standard_normal((REGION, REGION)).astype(np.float32), (0, 0), 30)
    field /= max(float(np.abs(field).max()), 1e-6)
    img = level * (1 + rng.uniform(0, 0.4) * field)
    if rng.random() < 0.5:  # track lines: thin, darker (or brighter) than the surface
        period = rng.uniform(40, 150)
        angle = rng.uniform(-0.06, 0.06)
        delta = level * rng.uniform(0.2, 0.7) * (-1 if rng.random() < 0.7 else 1)
        yy, xx = np.mgrid[0:REGION, 0:REGION].astype(np.float32)
        for coord in (yy + xx * angle, xx - yy * angle):
            phase = np.mod(coord + rng.uniform(0, period), period)
            img = img + delta * (phase < rng.uniform(2, 5))
    for _ in range(int(rng.integers(0, 4)) if rng.random() < 0.3 else 0):  # dust specks
        spot = np.zeros((REGION, REGION), np.float32)
        spot[int(rng.integers(REGION)), int(rng.integers(REGION))] = 1.0
        spot = cv2.GaussianBlur(spot, (0, 0), rng.uniform(0.8, 2.0))
        img = img + rng.uniform(0.05, 0.3) * spot / spot.max()
    return np.maximum(img, 0).astype(np.float32)


def region_windows(src: np.ndarray | None, target: str, rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    """Degrade one region towards ``target`` and return its labelled 8-bit windows.

    ``src`` None makes a synthetic background region. Returns (windows uint8
    (K, 64, 64), labels as indices into CLASSES, -1 for dropped windows).
    """
    dtype = np.uint8 if rng.random() < 0.5 else np.uint16
    if src is None:
        clean = synthetic_background(rng)
        signal, level = clean * rng.uniform(0.5, 2.0), "background"
    else:
        clean = _cut(src, rng)
        level = {"mild_blur": "mild", "severe_blur": "severe"}.get(target, "none")
        optics, _ = blur(clean, level, rng)
        if target == "mild_overexposure":
            exposure = rng.uniform(1.3, 3.0)
        elif target == "severe_overexposure":
            exposure = rng.uniform(3.0, 12.0)
        else:  # well exposed, down to dim (never below ~20 grey levels in uint8)
            low = 0.08 if dtype == np.uint8 else 0.03
            exposure = float(np.exp(rng.uniform(np.log(low), 0.0)))
        pedestal = rng.uniform(0.0, 0.1) if rng.random() < 0.6 else 0.0  # autofluorescence, offset
        signal = (optics + pedestal) * exposure / (1.0 + pedestal) + rng.uniform(0.0, 0.02)
    pixels, clipped = sensor(signal.astype(np.float32), rng, dtype)
    lo, hi = intensity_range(pixels)
    norm = to_uint8(pixels, lo, hi)

    wins, labels = [], []
    for i in range(0, REGION, WINDOW):
        for j in range(0, REGION, WINDOW):
            sl = (slice(i, i + WINDOW), slice(j, j + WINDOW))
            wins.append(norm[sl])
            if src is None:
                labels.append(0)
                continue
            content = float(np.percentile(clean[sl], 99))
            if content < 0.15:
                labels.append(0)
            elif content < 0.30:
                labels.append(-1)
            elif target.endswith("overexposure"):
                labels.append(_overexposure_label(clean[sl], clipped[sl]))
            else:  # a few saturated nuclei are normal in good images
                labels.append(CLASSES.index(target) if _clipped_share(clean[sl], clipped[sl]) < 0.1 else -1)
    return np.stack(wins), labels


def _clipped_share(clean: np.ndarray, clipped: np.ndarray) -> float:
    """Share of the window's signal (clean > 0.3) that is clipped."""
    signal = clean > 0.3
    return float(clipped[signal].mean()) if signal.any() else 0.0


def _overexposure_label(clean: np.ndarray, clipped: np.ndarray) -> int:
    share = _clipped_share(clean, clipped)
    if 0.2 <= share < 0.5:
        return CLASSES.index("mild_overexposure")
    if share >= 0.7:
        return CLASSES.index("severe_overexposure")
    return -1


def build_split(
    sources: list[Source], per_class: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Balanced windows from the given sources: (windows uint8 (N,64,64), labels, source index)."""
    quota = np.full(len(CLASSES), per_class)
    store: list[tuple[np.ndarray, int, int]] = []
    targets = CLASSES[1:]
    synthetic_share = 0.5  # of background windows from synthetic chip surface
    prob = np.array([s.weight for s in sources], np.float64)
    prob /= prob.sum()
    guard = 0
    while quota.max() > 0:
        guard += 1
        if guard > 200 * per_class:
            msg = f"could not fill class quotas {dict(zip(CLASSES, quota.tolist(), strict=False))}"
            raise RuntimeError(msg)
        want = [t for t in CLASSES if quota[CLASSES.index(t)] > 0]
        target = want[int(rng.integers(len(want)))]
        if target == "background":
            if rng.random() < synthetic_share:
                si, src = -1, None
            else:
                si = int(rng.choice(len(sources), p=prob))
                src, target = sources[si].image, targets[int(rng.integers(len(targets)))]
        else:
            si = int(rng.choice(len(sources), p=prob))
            src = sources[si].image
        wins, labels = region_windows(src, target, rng)
        for w, lab in zip(wins, labels, strict=False):
            if lab >= 0 and quota[lab] > 0:
                quota[lab] -= 1
                store.append((w, lab, si))
    order = rng.permutation(len(store))
    x = np.stack([store[k][0] for k in order])
    y = np.array([store[k][1] for k in order], np.int64)
    s = np.array([store[k][2] for k in order], np.int64)
    return x, y, s
