"""Ingest throughput and memory: our ingest (local folder, URL list) vs img2dataset vs plain Pillow.

For each size (default 1,000 and 10,000 images) this measures images/s, CPU time and peak
RSS of:

- ``ours-folder``   ``sd_pipeline.ingest.build.ingest`` on a local imagefolder
                    (``metadata.jsonl`` + ``images/``), every check, hash and write included;
- ``ours-urls``     the same, from a parquet URL list (``kind: urls``) whose URLs a local
                    ``ThreadingHTTPServer`` on 127.0.0.1 serves (``allow_private_networks: true``),
                    speaking HTTP/1.1 as real image hosts do (``--server-protocol HTTP/1.0`` for
                    http.server's default; img2dataset closes every connection either way);
- ``img2dataset``   the same URL list through img2dataset (its own venv), webdataset output,
                    image_size 512, resize_mode center_crop, encode_quality 95 (its defaults:
                    area downscale, Lanczos upscale, OpenCV), processes_count = CPU count,
                    thread_count 32 per process;
- ``pillow``        the machine's limit: decode (JPEG draft scaling, as ingest does) +
                    centre-crop resize to 512 with the same filter as ours (``--resize-filter``,
                    default ``area``) + JPEG q95 encode of the same files in a pool of
                    CPU-count processes, nothing else (no checks, hashing or writing);
- ``pillow-full``   a full-size decode and a plain LANCZOS resize (naive Pillow).

The run prints what each variant did. The test images are JPEGs of 512-1,500 px per side
(gradients, blotches, shapes and grain, about 0.25 bytes/pixel at quality 90), generated
once and deterministically into ``benchmarks/results/ingest-cache/`` (git-ignored); sizes
share the same first images.

Every run is its own process. Peak RSS is reported two ways: ``tree`` = the highest sum of
RSS over the run's process tree (psutil, sampled every 0.1 s: workers included, shared
pages counted once per process) and ``max1`` = the largest single process (``ru_maxrss``
from ``wait4``, exact). Rates use the time of the call itself (``ingest()``,
``img2dataset.download()``, the pool map), measured inside the run's process; ``wall`` adds
interpreter start-up and imports. ``cpu s`` is the CPU time of the run's process tree
(``wait4``: the process and the workers it waited for) and ``srv s`` that of the HTTP
server meanwhile; ``cpu i/s`` = images / ((cpu s + srv s) / CPUs) is the rate the run would
have had with the machine to itself, steadier than wall-clock rates on a shared machine but
blind to stalls that leave cores idle. Ratios are printed both ways.

    .venv/bin/python benchmarks/ingest.py                          # 1,000 and 10,000
    .venv/bin/python benchmarks/ingest.py --sizes 1000 --skip-img2dataset
    .venv/bin/python benchmarks/ingest.py --only ours-urls img2dataset
    .venv/bin/python benchmarks/ingest.py --resize-filter lanczos  # ours and the limit sharper

img2dataset lives in ``benchmarks/.venv-img2dataset`` (git-ignored); the script creates it
when missing, which is the same as:

    python3 -m venv benchmarks/.venv-img2dataset
    benchmarks/.venv-img2dataset/bin/pip install img2dataset==1.47.0

Nothing is asserted about time (machines are shared and noisy): compare the ratios, and
read the load average printed beside each run.
"""

from __future__ import annotations

# Standard library only at module level: this file also runs inside img2dataset's venv and
# as the worker module of multiprocessing pools.
import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / "results" / "ingest-cache"
I2D_VENV = ROOT / "benchmarks" / ".venv-img2dataset"
GENERATOR = 1  # bump when make_image changes: the cache is rebuilt
SEED = 20261127
RESOLUTION = 512
QUALITY = 95  # ours writes JPEG q95; img2dataset and the Pillow limit are set to match
I2D_THREADS = 32
OUR_SHARD_SIZE = 1000
OUR_READ_WORKERS = 16  # dataset.source.read_workers default: downloads in flight
VARIANTS = ["pillow", "ours-folder", "ours-urls", "img2dataset", "pillow-full"]
URL_VARIANTS = {"ours-urls", "img2dataset"}
WORDS = ["red", "blue", "green", "amber", "violet", "teal", "pale", "dark", "bright", "soft"]
SHAPES = ["circles", "squares", "triangles", "shapes", "blocks", "kites", "ovals", "tiles"]


# --------------------------------------------------------------------------- test data


def make_image(i: int) -> bytes:
    """Image ``i``: a gradient, smooth colour blotches, 4-13 flat shapes and grain, as JPEG q90."""
    import io

    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([SEED, i])
    w, h = (int(v) for v in rng.integers(512, 1501, 2))
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0 : h // 4, 0 : w // 4].astype(np.float32)
    t = np.cos(angle) * xs / (w / 4) + np.sin(angle) * ys / (h / 4)
    t = (t - t.min()) / (np.ptp(t) + 1e-6)
    base = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    blot = rng.normal(0, 28, (h // 48 + 2, w // 48 + 2, 3)).astype(np.float32)
    blot_img = Image.fromarray(np.clip(blot + 128, 0, 255).astype(np.uint8))
    blot = np.asarray(blot_img.resize((w // 4, h // 4), Image.Resampling.BICUBIC), np.float32) - 128
    img = Image.fromarray(np.clip(base + blot, 0, 255).astype(np.uint8)).resize(
        (w, h), Image.Resampling.BILINEAR
    )
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 14))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        elif kind == 1:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        else:
            draw.polygon([(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(3)], fill=colour)
    grain = rng.integers(-7, 8, (h, w, 1), dtype=np.int16)
    img = Image.fromarray(np.clip(np.asarray(img, np.int16) + grain, 0, 255).astype(np.uint8))
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=90)
    return out.getvalue()


def caption(i: int) -> str:
    r = hashlib.sha256(f"{SEED}:{i}".encode()).digest()
    return (
        f"{WORDS[r[0] % len(WORDS)]} and {WORDS[r[1] % len(WORDS)]} {SHAPES[r[2] % len(SHAPES)]} "
        f"over a {WORDS[r[3] % len(WORDS)]} gradient, picture {i}"
    )


def _write_image(i: int) -> int:
    path = CACHE / "pool" / f"{i:06d}.jpg"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(make_image(i))
        tmp.replace(path)
    return path.stat().st_size


def ensure_images(count: int) -> None:
    """Images 0..count-1 in the cache pool, generated on all cores where missing."""
    import multiprocessing as mp

    stamp = CACHE / "pool.json"
    state = json.loads(stamp.read_text()) if stamp.exists() else {}
    if state.get("generator") != GENERATOR or state.get("seed") != SEED:
        shutil.rmtree(CACHE, ignore_errors=True)
        state = {"generator": GENERATOR, "seed": SEED, "count": 0}
    (CACHE / "pool").mkdir(parents=True, exist_ok=True)
    if state["count"] >= count:
        return
    started = time.perf_counter()
    with mp.get_context("fork").Pool(os.cpu_count() or 1) as pool:
        total = sum(pool.imap_unordered(_write_image, range(count), chunksize=16))
    state["count"] = count
    stamp.write_text(json.dumps(state))
    print(
        f"generated {count} test images into {CACHE / 'pool'} in {time.perf_counter() - started:.0f}s "
        f"({total / count / 1024:.0f} KiB average)",
        flush=True,
    )


def ensure_folder(count: int) -> Path:
    """An imagefolder of the first ``count`` images: hard links into the pool, metadata.jsonl."""
    folder = CACHE / f"folder-{count}"
    if (folder / "metadata.jsonl").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "images").mkdir(parents=True)
    lines = []
    for i in range(count):
        name = f"{i:06d}.jpg"
        try:
            os.link(CACHE / "pool" / name, folder / "images" / name)
        except OSError:
            shutil.copyfile(CACHE / "pool" / name, folder / "images" / name)
        lines.append(json.dumps({"file_name": f"images/{name}", "text": caption(i)}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def write_url_list(path: Path, count: int, port: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    urls = [f"http://127.0.0.1:{port}/pool/{i:06d}.jpg" for i in range(count)]
    pq.write_table(pa.table({"url": urls, "caption": [caption(i) for i in range(count)]}), path)


# --------------------------------------------------------------------------- one run, in its own process


def child_ours(kind: str, count: int, work: Path, source: str, resize_filter: str, read_workers: int) -> dict:
    from sd_pipeline.config import parse_config
    from sd_pipeline.ingest.build import ingest

    src: dict = {"kind": kind, "uri": f"file://{source}"}
    if kind == "urls":
        src["allow_private_networks"] = True
        src["read_workers"] = read_workers
    cfg = parse_config(
        {
            "storage": {"root": f"file://{work / 'store'}"},
            "dataset": {
                "name": "bench",
                "source": src,
                "resolution": RESOLUTION,
                "shard_size": OUR_SHARD_SIZE,
                "resize_filter": resize_filter,
            },
        }
    )
    started = time.perf_counter()
    summary = ingest(cfg)
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "ok": summary["accepted"],
        "failed": summary["quarantined"],
        "errors": summary["quarantine_reasons"],
        "shards": summary["shards"],
    }


def child_img2dataset(count: int, work: Path, source: str) -> dict:
    from importlib.metadata import version

    from img2dataset import download

    procs = os.cpu_count() or 1
    out = work / "out"
    started = time.perf_counter()
    download(
        url_list=source,
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        output_format="webdataset",
        output_folder=str(out),
        image_size=RESOLUTION,
        resize_mode="center_crop",
        encode_quality=QUALITY,
        processes_count=procs,
        thread_count=I2D_THREADS,
        # One input shard per process: img2dataset parallelises over shards, and its pool
        # restarts workers every 5 shards, so this is its best case on a small machine.
        number_sample_per_shard=min(10_000, math.ceil(count / procs)),
        timeout=10,
        retries=2,
        enable_wandb=False,
        distributor="multiprocessing",
    )
    seconds = time.perf_counter() - started
    ok = failed = 0
    errors: dict[str, int] = {}
    for stats in sorted(out.glob("*_stats.json")):
        s = json.loads(stats.read_text())
        ok += s.get("successes", 0)
        failed += s.get("count", 0) - s.get("successes", 0)
        for err, n in (s.get("status_dict") or {}).items():
            if err != "success":
                errors[err] = errors.get(err, 0) + n
    return {
        "seconds": seconds,
        "ok": ok,
        "failed": failed,
        "errors": errors,
        "shards": len(list(out.glob("*.tar"))),
        "version": version("img2dataset"),
    }


PILLOW_FILTERS = {"area": "BOX", "bicubic": "BICUBIC", "lanczos": "LANCZOS"}


def _pillow_one(args: tuple[str, bool, str]) -> int:
    import io

    from PIL import Image

    path, draft, resize_filter = args
    with Image.open(path) as img:
        w, h = img.size
        if draft:
            scale = RESOLUTION / min(w, h)
            img.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
        img.load()
        rgb = img if img.mode == "RGB" else img.convert("RGB")  # no copy when already RGB, as ours
    cw, ch = rgb.size
    side = min(cw, ch)
    box = ((cw - side) / 2, (ch - side) / 2, (cw + side) / 2, (ch + side) / 2)
    # Shrinking with the same filter as ours; enlarging (never, with these images) with Lanczos.
    name = PILLOW_FILTERS[resize_filter] if side >= RESOLUTION else "LANCZOS"
    square = rgb.resize(
        (RESOLUTION, RESOLUTION), Image.Resampling[name], box=box, reducing_gap=3.0 if draft else None
    )
    out = io.BytesIO()
    square.save(out, format="JPEG", quality=QUALITY)
    return len(out.getvalue())


def child_pillow(count: int, draft: bool, resize_filter: str) -> dict:
    import multiprocessing as mp

    paths = [(str(CACHE / "pool" / f"{i:06d}.jpg"), draft, resize_filter) for i in range(count)]
    started = time.perf_counter()
    with mp.get_context("fork").Pool(os.cpu_count() or 1) as pool:
        sizes = pool.map(_pillow_one, paths, chunksize=8)
    return {"seconds": time.perf_counter() - started, "ok": len(sizes), "failed": 0, "errors": {}}


def child_serve(protocol: str = "HTTP/1.1") -> None:
    """Serve the cache folder on 127.0.0.1 until killed; print the port first.

    HTTP/1.1 by default, as every real image host speaks it: a connection stays open for the
    next request unless the client asks to close it. img2dataset (urllib) sends ``Connection:
    close`` on every request, so this changes nothing for it; a client that keeps
    connections alive saves a connect (and the server a thread start) per image.
    ``--server-protocol HTTP/1.0`` (``http.server``'s default) closes after every response."""
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        protocol_version = protocol

        def log_message(self, *args: object) -> None:
            pass

    class Server(ThreadingHTTPServer):
        # socketserver's default listen backlog is 5: with dozens of concurrent downloads
        # the kernel drops SYNs and clients stall ~1 s on the retransmit. Real servers
        # queue far more; this keeps the stall out of every client's figures.
        request_queue_size = 1024

    server = Server(("127.0.0.1", 0), partial(Quiet, directory=str(CACHE)))
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()


def child_main(args: argparse.Namespace) -> None:
    work = Path(args.work) if args.work else Path()
    if args.child == "serve":
        child_serve(args.server_protocol)
        return
    if args.child == "ours-folder":
        result = child_ours("imagefolder", args.count, work, args.source, args.resize_filter, 0)
    elif args.child == "ours-urls":
        result = child_ours("urls", args.count, work, args.source, args.resize_filter, args.read_workers)
    elif args.child == "img2dataset":
        result = child_img2dataset(args.count, work, args.source)
    elif args.child == "pillow":
        result = child_pillow(args.count, draft=True, resize_filter=args.resize_filter)
    elif args.child == "pillow-full":
        result = child_pillow(args.count, draft=False, resize_filter="lanczos")
    else:
        raise SystemExit(f"unknown child {args.child!r}")
    print("RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- the parent: run and measure


def measure(
    name: str,
    python: str,
    count: int,
    work: Path,
    source: str = "",
    env: dict | None = None,
    resize_filter: str = "area",
    server_pid: int | None = None,
    read_workers: int = 16,
) -> dict:
    """Run one variant in a fresh process; sample its tree's RSS; return the child's result
    with wall time, CPU time of its process tree and of the HTTP server during the run."""
    import psutil

    server = psutil.Process(server_pid) if server_pid else None
    server_before = sum(server.cpu_times()[:2]) if server else 0.0

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cmd = [python, str(Path(__file__).resolve()), "--child", name, "--count", str(count), "--work", str(work)]
    cmd += ["--resize-filter", resize_filter, "--read-workers", str(read_workers)]
    if source:
        cmd += ["--source", source]
    load = os.getloadavg()[0]
    started = time.perf_counter()
    with open(work / "stdout.log", "wb") as out, open(work / "stderr.log", "wb") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=ROOT)
    peak_tree = 0
    root = psutil.Process(proc.pid)
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            procs = []
        total = 0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        peak_tree = max(peak_tree, total)
        time.sleep(0.1)
    wall = time.perf_counter() - started
    server_cpu = sum(server.cpu_times()[:2]) - server_before if server else 0.0
    proc.returncode = os.waitstatus_to_exitcode(status)
    lines = (work / "stdout.log").read_text(errors="replace").splitlines()
    results = [json.loads(line[7:]) for line in lines if line.startswith("RESULT ")]
    if proc.returncode != 0 or not results:
        tail = (work / "stderr.log").read_text(errors="replace")[-3000:]
        return {"name": name, "count": count, "error": f"exit {proc.returncode}; stderr tail:\n{tail}"}
    result = results[-1]
    result.update(
        name=name,
        count=count,
        wall=wall,
        rss_tree=peak_tree / 2**20,
        rss_max1=usage.ru_maxrss / 1024,  # KiB on Linux
        # wait4 counts the child and the descendants it waited for (its worker processes).
        cpu=usage.ru_utime + usage.ru_stime,
        server_cpu=server_cpu if name in URL_VARIANTS else 0.0,
        load=load,
    )
    return result


def ensure_img2dataset(spec: str) -> tuple[str | None, str]:
    """The venv's python, or None and why img2dataset cannot run."""
    python = I2D_VENV / "bin" / "python"
    probe = [
        str(python),
        "-c",
        "import img2dataset, importlib.metadata as m; print(m.version('img2dataset'))",
    ]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    if not python.exists():
        print(f"creating {I2D_VENV} and installing {spec} (once) ...", flush=True)
        steps = [
            [sys.executable, "-m", "venv", str(I2D_VENV)],
            [str(python), "-m", "pip", "install", "--quiet", spec],
        ]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode != 0:
                shutil.rmtree(I2D_VENV, ignore_errors=True)
                why = (done.stderr or done.stdout).strip().splitlines()[-15:]
                return None, f"`{' '.join(step)}` failed (exit {done.returncode}):\n  " + "\n  ".join(why)
    done = subprocess.run(probe, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        why = done.stderr.strip().splitlines()[-15:]
        return None, f"img2dataset does not import in {I2D_VENV}:\n  " + "\n  ".join(why)
    return str(python), done.stdout.strip()


def cpu_rate(r: dict, cpus: int) -> float:
    """Images/s if the run had had the whole machine: count / ((its CPU s + server CPU s) / CPUs).
    Steadier than wall-clock rates on a shared machine; blind to stalls that leave cores idle."""
    return r["count"] / max((r["cpu"] + r["server_cpu"]) / cpus, 1e-9)


def fmt_row(r: dict, cpus: int) -> str:
    if "error" in r:
        first = r["error"].splitlines()[0]
        return f"{r['name']:<12} {r['count']:>6}  ERROR: {first}"
    rate = r["count"] / r["seconds"]
    return (
        f"{r['name']:<12} {r['count']:>6} {r['ok']:>6} {r['failed']:>5} {r['seconds']:>8.1f} {rate:>8.1f} "
        f"{r['wall']:>8.1f} {r['cpu']:>7.1f} {r['server_cpu']:>6.1f} {cpu_rate(r, cpus):>8.1f} "
        f"{r['rss_tree']:>8.0f} {r['rss_max1']:>8.0f} {r['load']:>5.1f}"
    )


WHAT_EACH_DID = """\
what each variant does (same {count} JPEGs of 512-1,500 px; output {res}x{res} centre crop, JPEG q{q} 4:2:0, \
no optimize pass):
  pillow       Pillow in a pool of {cpus} processes: JPEG draft decode, {filt} resize, encode. Nothing else.
  ours-folder  sd_pipeline ingest of a local imagefolder: metadata + caption checks, header checks
               (size, pixels, frames, aspect), EXIF orientation, draft decode, {filt} resize, encode,
               sha256 + colour hash, exact and near-duplicate checks, shards, manifest, quarantine, commit.
  ours-urls    the same from a parquet URL list: SSRF-checked downloads from the local HTTP server
               ({proto}) in the worker processes, {read_workers} at once in each (read_workers),
               connections kept alive, then everything ours-folder does.
  img2dataset  img2dataset {i2d}: webdataset output, resize_mode center_crop, image_size {res}, encode_quality
               {q}, downscale area / upscale lanczos (OpenCV), {cpus} processes x {threads} threads; no
               dedup, no caption checks.
  pillow-full  naive Pillow: full-size decode and LANCZOS resize (what ingest avoids).
columns: call s = time of the call itself (img/s from it); cpu s = CPU of the run's process tree; srv s =
CPU of the HTTP server meanwhile (URL variants); cpu i/s = images / ((cpu s + srv s) / {cpus} CPUs)."""


def ratio_line(label: str, a: float | None, b: float | None, target: str) -> str:
    if a is None or b is None:
        return f"  {label:<46} n/a"
    return f"  {label:<46} {a / b:6.2f}   (target {target})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--skip-img2dataset", action="store_true", help="do not install or run img2dataset")
    parser.add_argument(
        "--skip-pillow-full", action="store_true", help="skip the naive full-decode Pillow run"
    )
    parser.add_argument(
        "--img2dataset-spec", default="img2dataset==1.47.0", help="pip spec used to create its venv"
    )
    parser.add_argument("--only", nargs="+", choices=VARIANTS, help="run only these variants (default: all)")
    parser.add_argument("--keep", action="store_true", help="keep each run's output under the cache")
    parser.add_argument(
        "--resize-filter",
        default="area",
        choices=sorted(PILLOW_FILTERS),
        help="dataset.resize_filter for ours, and the filter of the Pillow limit (default: area, "
        "the config default and img2dataset's downscale interpolation)",
    )
    parser.add_argument(
        "--read-workers",
        type=int,
        default=0,
        help=f"dataset.source.read_workers of ours-urls (default: the config's, {OUR_READ_WORKERS})",
    )
    parser.add_argument(
        "--server-protocol",
        default="HTTP/1.1",
        choices=["HTTP/1.1", "HTTP/1.0"],
        help="what the local image server speaks (default HTTP/1.1, as real hosts; HTTP/1.0 closes every "
        "connection after one response, http.server's default)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return

    cpus = os.cpu_count() or 1
    read_workers = args.read_workers or OUR_READ_WORKERS
    build_py = ROOT / "sd_pipeline" / "ingest" / "build.py"
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "sd_pipeline"], capture_output=True, text=True, cwd=ROOT
    )
    print(
        f"machine: {cpus} CPUs, load {os.getloadavg()[0]:.1f}; python {sys.version.split()[0]}; "
        f"commit {head.stdout.strip() or '?'}"
        f"{' + uncommitted changes under sd_pipeline/' if dirty.stdout.strip() else ''}; "
        f"build.py sha256 {hashlib.sha256(build_py.read_bytes()).hexdigest()[:12]}",
        flush=True,
    )

    i2d_python: str | None = None
    i2d_info = ""
    if args.skip_img2dataset:
        print("img2dataset: skipped (--skip-img2dataset)")
    else:
        i2d_python, i2d_info = ensure_img2dataset(args.img2dataset_spec)
        if i2d_python:
            print(f"img2dataset {i2d_info} in {I2D_VENV.relative_to(ROOT)}", flush=True)
        else:
            print(f"img2dataset: NOT RUN. {i2d_info}", flush=True)

    ensure_images(max(args.sizes))
    server = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            "serve",
            "--server-protocol",
            args.server_protocol,
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert server.stdout is not None
    port = int(server.stdout.readline())
    child_env = {
        **os.environ,
        "SD_PIPELINE_HOME": str(CACHE / "runs" / "home"),
        "NO_ALBUMENTATIONS_UPDATE": "1",  # else albumentations asks PyPI for updates at import
        "WANDB_MODE": "disabled",
        "no_proxy": "127.0.0.1,localhost",
        "NO_PROXY": "127.0.0.1,localhost",
        "PYTHONUNBUFFERED": "1",
    }
    results: list[dict] = []
    header = (
        f"{'variant':<12} {'images':>6} {'ok':>6} {'fail':>5} {'call s':>8} {'img/s':>8} "
        f"{'wall s':>8} {'cpu s':>7} {'srv s':>6} {'cpu i/s':>8} {'RSS tree':>8} {'RSS max1':>8} {'load':>5}"
    )
    i2d_version = i2d_info if i2d_python else "-"
    print(
        "\n"
        + WHAT_EACH_DID.format(
            count="/".join(str(n) for n in sorted(args.sizes)),
            res=RESOLUTION,
            q=QUALITY,
            cpus=cpus,
            filt={"area": "area (box)", "bicubic": "bicubic", "lanczos": "Lanczos"}[args.resize_filter],
            i2d=i2d_version,
            threads=I2D_THREADS,
            read_workers=read_workers,
            proto=args.server_protocol,
        ),
        flush=True,
    )
    try:
        for count in sorted(args.sizes):
            folder = ensure_folder(count)
            runs = CACHE / "runs"
            url_list = runs / f"urls-{count}.parquet"
            runs.mkdir(parents=True, exist_ok=True)
            write_url_list(url_list, count, port)
            plan: list[tuple[str, str, str]] = [
                ("pillow", sys.executable, ""),
                ("ours-folder", sys.executable, str(folder)),
                ("ours-urls", sys.executable, str(url_list)),
            ]
            if i2d_python:
                plan.append(("img2dataset", i2d_python, str(url_list)))
            if not args.skip_pillow_full:
                plan.append(("pillow-full", sys.executable, ""))
            plan = [step for step in plan if not args.only or step[0] in args.only]
            print(f"\n--- {count} images (peak RSS in MiB) ---\n{header}", flush=True)
            for name, python, source in plan:
                work = runs / f"{name}-{count}"
                result = measure(
                    name, python, count, work, source, child_env, args.resize_filter, server.pid, read_workers
                )
                results.append(result)
                print(fmt_row(result, cpus), flush=True)
                if "error" in result:
                    print(result["error"], flush=True)
                elif result.get("errors"):
                    print(f"{'':<12} {'':>6} not ok: {result['errors']}", flush=True)
                if not args.keep:
                    shutil.rmtree(work, ignore_errors=True)
    finally:
        server.terminate()
        server.wait()

    by = {(r["name"], r["count"]): r for r in results if "error" not in r}

    def rate(name: str, count: int) -> float | None:
        r = by.get((name, count))
        return r["count"] / r["seconds"] if r else None

    def get(name: str, count: int, key: str) -> float | None:
        r = by.get((name, count))
        return r[key] if r else None

    def crate(name: str, count: int) -> float | None:
        r = by.get((name, count))
        return cpu_rate(r, cpus) if r else None

    versions = {r["version"] for r in by.values() if "version" in r}
    print(f"\n--- ratios ({cpus} CPUs{'; img2dataset ' + ', '.join(versions) if versions else ''}) ---")
    for count in sorted(args.sizes):
        print(f"{count} images:")
        for label, a, b, target in (
            ("our URL path / img2dataset", "ours-urls", "img2dataset", ">= 1.5"),
            ("our local folder / Pillow limit", "ours-folder", "pillow", ">= 0.8"),
            ("our URL path / Pillow limit", "ours-urls", "pillow", "-"),
            ("img2dataset / Pillow limit", "img2dataset", "pillow", "-"),
        ):
            print(ratio_line(f"{label} (images/s)", rate(a, count), rate(b, count), target))
            print(ratio_line(f"{label} (CPU-normalised)", crate(a, count), crate(b, count), target))
    sizes = sorted(args.sizes)
    for small, large in zip(sizes, sizes[1:], strict=False):
        k = large / small
        print(f"{large} vs {small} images ({k:g}x the images):")
        for name in ("ours-folder", "ours-urls", "img2dataset", "pillow"):
            if (name, small) not in by or (name, large) not in by:
                continue
            for label, key, target in (
                (f"time({large}) / time({small})", "seconds", f"<= {1.1 * k:g}"),
                (f"CPU time({large}) / ({small})", "cpu", f"<= {1.1 * k:g}"),
                (f"peak RSS tree({large}) / ({small})", "rss_tree", "<= 1.3"),
                (f"peak RSS max1({large}) / ({small})", "rss_max1", "<= 1.3"),
            ):
                print(ratio_line(f"{name}: {label}", get(name, large, key), get(name, small, key), target))


if __name__ == "__main__":
    main()
