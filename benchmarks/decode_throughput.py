"""JPEG shards of mixed sizes, as users bring them: which decoder, and the vaejob loader vs plain webdataset.

    python benchmarks/decode_throughput.py                  # 4000 JPEGs 256..512 px -> 64x64, 2 workers
    python benchmarks/decode_throughput.py --num 400 --repeats 1   # quick (CI): a smoke test

Writes img2dataset-style tars with ``webdataset.ShardWriter`` (``KEY.jpg`` + ``KEY.cls``, no manifest),
indexes them with ``vaejob.shard --index``, then:

1. Decoders, one process, every image to ``--size`` (shorter side, centre crop), against a full PIL decode
   + LANCZOS as the reference: PIL; PIL with ``draft()`` (JPEG DCT-domain down-scaling) to 1x and to 2x the
   target before LANCZOS; ``torchvision.io.decode_jpeg`` (libjpeg-turbo) + antialiased resize; and nvjpeg
   (``decode_jpeg(device="cuda")``, batched) when a GPU is there. "Correct" = mean |difference| from the
   reference <= 1 grey level; the fastest correct one is what ``vaejob.shards.codec`` uses.
2. Loaders, same shards, same workers, same shuffle buffer, same output (float32 NCHW in [0, 1],
   ``--size`` square): the vaejob loader (``data.image_size``) vs the plain webdataset pipeline
   (WebDataset -> shuffle -> decode("pil") -> Resize + CenterCrop + ToTensor -> batched, WebLoader),
   interleaved rounds; the ratio of images per second is printed.
"""

from __future__ import annotations

import io
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vaejob import shard
from vaejob.shards import open_shards
from vaejob.shards.codec import DRAFT_OVERSAMPLE, fit_image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_throughput import VaejobEpochs, count, interleaved, loader_args, print_header, print_rates  # noqa: E402  (the sibling benchmark's helpers)

TOLERANCE = 1.0  # mean |difference| in grey levels that still counts as the same image


def photo(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Smooth gradients, edges and mild texture: compresses like a photo (noise would not)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = rng.random(3) * 160 + 40 * np.sin(x[..., None] / (4 + 20 * rng.random(3)) + y[..., None] / 37)
    img += 50 * ((x - w * rng.random()) ** 2 + (y - h * rng.random()) ** 2 < (min(w, h) / 3) ** 2)[..., None]
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_jpeg_shards(root: Path, num: int, seed: int = 0) -> list[bytes]:
    import webdataset as wds

    rng = np.random.default_rng(seed)
    jpegs = []
    root.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(root / "data-%05d.tar"), maxcount=max(1, num // 8), verbose=0) as sink:
        for i in range(num):
            w, h = (int(v) for v in rng.integers(256, 513, 2))
            buf = io.BytesIO()
            Image.fromarray(photo(rng, w, h)).save(buf, format="JPEG", quality=90)
            jpegs.append(buf.getvalue())
            sink.write({"__key__": f"{i:08d}", "jpg": jpegs[-1], "cls": str(i % 10)})
    return jpegs


# ------------------------------------------------------------------------------------------- decoders
def decoders(size: int) -> dict[str, Callable[[bytes], np.ndarray]]:
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import functional as F

    def pil(data: bytes, draft: int = 0) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as im:
            if draft:
                im.draft("RGB", (draft * size, draft * size))
            return np.asarray(fit_image(im.convert("RGB"), size))

    def tv(data: bytes) -> np.ndarray:
        t = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        _, h, w = t.shape
        side = min(h, w)
        t = t[:, (h - side) // 2 : (h - side) // 2 + side, (w - side) // 2 : (w - side) // 2 + side]
        return F.resize(t, [size, size], antialias=True).permute(1, 2, 0).numpy()

    return {
        "pil": pil,
        "pil-draft-1x": lambda d: pil(d, 1),
        f"pil-draft-{DRAFT_OVERSAMPLE}x": lambda d: pil(d, DRAFT_OVERSAMPLE),
        "torchvision-cpu": tv,
    }


def nvjpeg(jpegs: list[bytes], size: int) -> tuple[float, list[np.ndarray]] | None:
    if not torch.cuda.is_available():
        return None
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import functional as F

    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in jpegs]
    decode_jpeg(tensors[:8], mode=ImageReadMode.RGB, device="cuda")  # warm-up (nvjpeg handles)
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = []
    for i in range(0, len(tensors), 64):
        for t in decode_jpeg(tensors[i : i + 64], mode=ImageReadMode.RGB, device="cuda"):
            _, h, w = t.shape
            side = min(h, w)
            t = t[:, (h - side) // 2 : (h - side) // 2 + side, (w - side) // 2 : (w - side) // 2 + side]
            out.append(F.resize(t, [size, size], antialias=True))
    torch.cuda.synchronize()
    rate = len(out) / (time.perf_counter() - start)
    return rate, [t.permute(1, 2, 0).cpu().numpy() for t in out]


def compare_decoders(jpegs: list[bytes], size: int, repeats: int) -> None:
    sample = jpegs[: min(len(jpegs), 400)]
    fns = decoders(size)
    reference = [fns["pil"](d) for d in sample]
    print(
        f"\n{'decoder':<18} {'img/s':>8} {'mean |diff|':>12} {'max':>5}  (one process, {len(sample)} JPEGs -> {size}x{size})"
    )
    results = {}
    for name, fn in fns.items():
        best = 0.0
        for _ in range(repeats):
            start = time.perf_counter()
            outs = [fn(d) for d in sample]
            best = max(best, len(sample) / (time.perf_counter() - start))
        diffs = [
            np.abs(o.astype(np.int16) - r).astype(np.float64) for o, r in zip(outs, reference, strict=True)
        ]
        results[name] = (best, float(np.mean([d.mean() for d in diffs])), int(max(d.max() for d in diffs)))
    gpu = nvjpeg(sample, size)
    if gpu is not None:
        diffs = [np.abs(o.astype(np.int16) - r) for o, r in zip(gpu[1], reference, strict=True)]
        results["nvjpeg-cuda"] = (
            gpu[0],
            float(np.mean([d.mean() for d in diffs])),
            int(max(d.max() for d in diffs)),
        )
    for name, (rate, mean, worst) in results.items():
        print(f"{name:<18} {rate:>8,.0f} {mean:>12.2f} {worst:>5}")
    correct = {n: r for n, r in results.items() if r[1] <= TOLERANCE}
    fastest = max(correct, key=lambda n: correct[n][0])
    print(
        f"fastest correct (mean |diff| <= {TOLERANCE}): {fastest}; vaejob's codec uses pil-draft-{DRAFT_OVERSAMPLE}x"
    )
    if gpu is None:
        print("nvjpeg: no GPU here, not measured")


# ------------------------------------------------------------------------------------------- loaders
def webdataset_loader(
    urls: list[str], size: int, batch_size: int, workers: int, buffer: int
) -> Callable[[int], int]:
    import webdataset as wds
    from torchvision import transforms

    transform = transforms.Compose(
        [transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor()]
    )
    pipeline = (
        wds.WebDataset(urls, shardshuffle=len(urls), empty_check=False, nodesplitter=wds.split_by_node)
        .shuffle(buffer)
        .decode("pil")
        .to_tuple("jpg", "cls")
        .map_tuple(lambda im: transform(im.convert("RGB")), int)
        .batched(batch_size, partial=False)
    )
    loader = wds.WebLoader(pipeline, batch_size=None, num_workers=workers, persistent_workers=True)
    return lambda epoch: count(iter(loader))


def main(argv: list[str] | None = None) -> int:
    args = loader_args(argv, __doc__, 4000, "JPEGs", batch_size=128, shuffle_buffer=1000, repeats=3)
    print_header(argv, f"JPEGs 256..512 px -> {args.size}x{args.size}", args)
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="vaejob-decode-"))
    tars = root / "tars"
    try:
        t0 = time.perf_counter()
        if not (tars / "manifest.json").exists():
            shutil.rmtree(tars, ignore_errors=True)
            make_jpeg_shards(tars, args.num)
            if shard.main(["--index", str(tars), "--train-only", "--workers", str(args.workers)]) != 0:
                raise SystemExit("vaejob.shard --index failed")
        jpegs = []
        import webdataset as wds

        urls = sorted(str(u) for u in tars.glob("*.tar"))
        for x in wds.WebDataset(urls, shardshuffle=False):
            jpegs.append(x["jpg"])
        print(f"data ready in {time.perf_counter() - t0:.1f} s under {root}")
        compare_decoders(jpegs, args.size, args.repeats)

        b, w, buf = args.batch_size, args.workers, args.shuffle_buffer
        methods = {
            "webdataset": webdataset_loader(urls, args.size, b, w, buf),
            "vaejob": VaejobEpochs(open_shards(str(tars), image_size=args.size), b, w, buf),
        }
        rates, per_cpu = interleaved(methods, args.repeats)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    print_rates(rates, per_cpu)
    med = statistics.median
    wall = med(rates["vaejob"]) / med(rates["webdataset"])
    cpu = med(per_cpu["vaejob"]) / med(per_cpu["webdataset"])
    print(f"vaejob / webdataset on JPEG shards: {wall:.1f}x img/s (median), {cpu:.1f}x img per CPU-s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
