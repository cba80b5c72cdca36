"""A seeded, realistic image-text pool with ground-truth labels (the embedded default).

Images are real JPEG/PNG bytes of coloured shapes on backgrounds, of varied sizes and aspect
ratios, with captions that describe them. Known noise is injected and labelled in
``label_kind`` so later steps can measure precision and recall:

clean, mismatched, unrelated, blank, noise, exact_dup, near_dup, too_small, non_english,
bad_aspect, eval_leak.  ``label_of`` names the original (url) of a duplicate or the eval id of a
leak. A separate evaluation set is written as an image folder with caption files.

The pool is written the way img2dataset writes it: WebDataset shards ``00000.tar`` holding
``key.jpg|png``, ``key.txt``, ``key.json`` with parquet sidecars ``00000.parquet``; a few
failed downloads and broken members are included, as in real crawls.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice

from PIL import Image, ImageDraw

from etl.fs import Store, join

SHAPES = ["circle", "square", "triangle", "star", "cross", "ring"]
COLORS = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 70, 220),
    "yellow": (240, 220, 20), "purple": (140, 40, 170), "orange": (250, 140, 20),
    "black": (15, 15, 15), "white": (245, 245, 245),
}
BACKGROUNDS = {"white": (250, 250, 250), "gray": (128, 128, 128), "black": (10, 10, 10),
               "light blue": (170, 210, 240), "beige": (235, 220, 185)}
TEMPLATES = [
    "a {color} {shape} on a {bg} background",
    "a photo of a {color} {shape}",
    "{count} {color} {shape}s on {bg}",
    "a picture showing a {size} {color} {shape}",
]
TRANSLATIONS = {
    "de": "ein {color} {shape} auf {bg} Hintergrund",
    "fr": "un {shape} {color} sur un fond {bg}",
    "es": "un {shape} de color {color} sobre fondo {bg}",
}
WORDS_DE = {"red": "rotes", "green": "grünes", "blue": "blaues", "yellow": "gelbes",
            "purple": "lila", "orange": "oranges", "black": "schwarzes", "white": "weißes"}
UNRELATED = [
    "buy cheap shoes online free shipping", "IMG_2041.JPG", "click here to download",
    "best price guaranteed visit our store today", "untitled", "404 not found",
    "lorem ipsum dolor sit amet", "sale sale sale 50% off", "copyright all rights reserved",
]
# fraction of the pool per noise kind; the rest is clean
MIX = {"mismatched": 0.10, "unrelated": 0.05, "blank": 0.02, "noise": 0.02, "exact_dup": 0.05,
       "near_dup": 0.05, "too_small": 0.03, "non_english": 0.04, "bad_aspect": 0.02,
       "eval_leak": 0.03}
NOISY_KINDS = ("mismatched", "unrelated", "blank", "noise")
KINDS = ("clean", *MIX)


@dataclass
class Attrs:
    shape: str
    color: str
    bg: str
    count: int
    size: str

    def caption(self, rng: random.Random) -> str:
        template = rng.choice(TEMPLATES)
        if self.count == 1:
            template = template.replace("{count} {color} {shape}s", "one {color} {shape}")
        return template.format(**self.__dict__)


@dataclass
class Pair:
    key: str
    url: str
    text: str
    image: bytes | None
    ext: str
    meta: dict = field(default_factory=dict)


def random_attrs(rng: random.Random) -> Attrs:
    color = rng.choice(list(COLORS))
    bg = rng.choice([b for b in BACKGROUNDS if b != color])
    return Attrs(rng.choice(SHAPES), color, bg, rng.choice([1, 1, 1, 2, 3]),
                 rng.choice(["small", "large"]))


def different_attrs(rng: random.Random, a: Attrs) -> Attrs:
    """Attributes that differ from ``a`` in both shape and colour (a true mismatch)."""
    while True:
        b = random_attrs(rng)
        if b.shape != a.shape and b.color != a.color:
            return b


def draw(a: Attrs, w: int, h: int, rng: random.Random) -> Image.Image:
    """Render ``a`` as an RGB image of size w x h."""
    img = Image.new("RGB", (w, h), BACKGROUNDS[a.bg])
    d = ImageDraw.Draw(img)
    side = min(w, h)
    r = int(side * (0.28 if a.size == "large" else 0.16) / max(1, a.count ** 0.5))
    for _ in range(a.count):
        cx, cy = rng.randint(r, max(r, w - r)), rng.randint(r, max(r, h - r))
        _shape(d, a.shape, cx, cy, r, COLORS[a.color])
    return img


def _shape(d: ImageDraw.ImageDraw, shape: str, cx: int, cy: int, r: int, fill) -> None:
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "star":
        d.regular_polygon((cx, cy, r), 5, fill=fill)
        d.regular_polygon((cx, cy, r), 5, rotation=36, fill=fill)
    elif shape == "cross":
        t = max(2, r // 3)
        d.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        d.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    else:  # ring
        d.ellipse(box, outline=fill, width=max(2, r // 3))


def encode(img: Image.Image, ext: str, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    if ext == "jpg":
        img.save(buf, format="JPEG", quality=quality)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


def _size(rng: random.Random, lo: int = 200, hi: int = 640, max_ar: float = 2.5) -> tuple[int, int]:
    short = rng.randint(lo, min(hi, 480))
    ar = rng.uniform(1.0, max_ar)
    long = min(hi * 2, int(short * ar))
    return (long, short) if rng.random() < 0.6 else (short, long)


def translate(a: Attrs, lang: str) -> str:
    color = WORDS_DE[a.color] if lang == "de" else a.color
    return TRANSLATIONS[lang].format(color=color, shape=a.shape, bg=a.bg)


class SampleBuilder:
    """Builds the pool and eval set deterministically from one seed, one pair at a time.

    The kinds of all ``n_pairs`` are drawn and shuffled up front (one byte each); pairs are then
    generated in pool order by :meth:`pairs`, so a writer holds one shard, never the pool.
    Duplicates and near duplicates copy one of the last ``recent`` clean pairs.
    """

    def __init__(self, n_pairs: int, eval_size: int, seed: int, recent: int = 256):
        self.rng = random.Random(seed)
        self.n_pairs, self.eval_size = n_pairs, eval_size
        self.eval: list[Pair] = [self._eval_pair(i) for i in range(eval_size)]
        self.pool: list[Pair] = []
        self.recent: deque[tuple[Attrs, bytes, str]] = deque(maxlen=recent)
        self._count = 0

    def plan(self) -> bytearray:
        """The kind of every pair, as indices into ``KINDS``, in pool order."""
        counts = {k: int(v * self.n_pairs) for k, v in MIX.items()}
        kinds = bytearray([0]) * (self.n_pairs - sum(counts.values()))
        for kind, n in counts.items():
            kinds += bytearray([KINDS.index(kind)]) * n
        self.rng.shuffle(kinds)
        if 0 in kinds:  # duplicates need an earlier clean pair: one comes first
            i = kinds.index(0)
            kinds[0], kinds[i] = kinds[i], kinds[0]
        return kinds

    def pairs(self) -> Iterator[Pair]:
        """Yield the pool's pairs in order (keys ``000000000``, ``000000001``, ...)."""
        for kind in self.plan():
            name = KINDS[kind]
            if name in ("exact_dup", "near_dup") and not self.recent:
                name = "clean"
            yield getattr(self, f"_add_{name}")()

    def build(self) -> SampleBuilder:
        """Generate the whole pool into ``self.pool`` (small pools: tests, notebooks)."""
        self.pool = list(self.pairs())
        return self

    def _url(self, ext: str) -> str:
        return f"https://img.example.com/{self.rng.getrandbits(64):016x}.{ext}"

    def _add(self, text: str, data: bytes | None, ext: str, kind: str, attrs: Attrs | None,
             of: str | None = None) -> Pair:
        url = self._url(ext)
        meta = {"label_kind": kind, "label_of": of,
                "label_shape": attrs.shape if attrs else None,
                "label_color": attrs.color if attrs else None}
        self._count += 1
        return Pair(f"{self._count - 1:09d}", url, text, data, ext, meta)

    def _new_image(self, a: Attrs, lo: int = 200, max_ar: float = 2.5):
        ext = "jpg" if self.rng.random() < 0.7 else "png"
        img = draw(a, *_size(self.rng, lo=lo, max_ar=max_ar), self.rng)
        return img, encode(img, ext, self.rng.randint(75, 95)), ext

    def _add_clean(self) -> Pair:
        a = random_attrs(self.rng)
        _, data, ext = self._new_image(a)
        pair = self._add(a.caption(self.rng), data, ext, "clean", a)
        self.recent.append((a, data, pair.url))
        return pair

    def _add_mismatched(self) -> Pair:
        a = random_attrs(self.rng)
        _, data, ext = self._new_image(a)
        return self._add(different_attrs(self.rng, a).caption(self.rng), data, ext, "mismatched", a)

    def _add_unrelated(self) -> Pair:
        a = random_attrs(self.rng)
        _, data, ext = self._new_image(a)
        return self._add(self.rng.choice(UNRELATED), data, ext, "unrelated", a)

    def _add_blank(self) -> Pair:
        w, h = _size(self.rng)
        img = Image.new("RGB", (w, h), tuple(self.rng.randint(0, 255) for _ in range(3)))
        caption = random_attrs(self.rng).caption(self.rng)
        return self._add(caption, encode(img, "jpg"), "jpg", "blank", None)

    def _add_noise(self) -> Pair:
        w, h = _size(self.rng)
        img = Image.frombytes("RGB", (w, h), self.rng.randbytes(w * h * 3))
        caption = random_attrs(self.rng).caption(self.rng)
        return self._add(caption, encode(img, "png"), "png", "noise", None)

    def _add_exact_dup(self) -> Pair:
        a, data, url = self.rng.choice(self.recent)
        ext = "png" if data[:4] == b"\x89PNG" else "jpg"
        return self._add(a.caption(self.rng), data, ext, "exact_dup", a, of=url)

    def _add_near_dup(self) -> Pair:
        a, data, url = self.rng.choice(self.recent)
        img = Image.open(io.BytesIO(data)).convert("RGB")
        return self._add(a.caption(self.rng), encode(self._perturb(img), "jpg", 70), "jpg",
                         "near_dup", a, of=url)

    def _perturb(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        how = self.rng.choice(["reencode", "resize", "crop"])
        if how == "resize":
            return img.resize((max(200, int(w * 0.8)), max(200, int(h * 0.8))))
        if how == "crop":
            dx, dy = int(w * 0.04), int(h * 0.04)
            return img.crop((dx, dy, w - dx, h - dy))
        return img

    def _add_too_small(self) -> Pair:
        a = random_attrs(self.rng)
        ext = "jpg"
        img = draw(a, self.rng.randint(40, 150), self.rng.randint(40, 150), self.rng)
        return self._add(a.caption(self.rng), encode(img, ext), ext, "too_small", a)

    def _add_non_english(self) -> Pair:
        a = random_attrs(self.rng)
        _, data, ext = self._new_image(a)
        text = translate(a, self.rng.choice(sorted(TRANSLATIONS)))
        return self._add(text, data, ext, "non_english", a)

    def _add_bad_aspect(self) -> Pair:
        a = random_attrs(self.rng)
        w, h = self.rng.randint(200, 260), self.rng.randint(800, 1000)
        img = draw(a, *((h, w) if self.rng.random() < 0.5 else (w, h)), self.rng)
        return self._add(a.caption(self.rng), encode(img, "jpg"), "jpg", "bad_aspect", a)

    def _add_eval_leak(self) -> Pair:
        ev = self.rng.choice(self.eval)
        img = Image.open(io.BytesIO(ev.image)).convert("RGB")
        data = encode(img, "jpg", 85) if self.rng.random() < 0.5 else ev.image
        a = Attrs(ev.meta["label_shape"], ev.meta["label_color"], "white", 1, "large")
        ext = "jpg" if data[:2] == b"\xff\xd8" else ev.ext
        return self._add(ev.text, data, ext, "eval_leak", a, of=ev.key)

    def _eval_pair(self, i: int) -> Pair:
        a = random_attrs(self.rng)
        img = draw(a, *_size(self.rng, max_ar=1.5), self.rng)
        ext = "png" if i % 3 == 0 else "jpg"
        meta = {"label_shape": a.shape, "label_color": a.color}
        return Pair(f"eval{i:05d}", f"eval/eval{i:05d}.{ext}", a.caption(self.rng),
                    encode(img, ext), ext, meta)


def write_sample(out_dir: str, n_pairs: int = 2000, eval_size: int = 120, seed: int = 0,
                 shard_size: int = 500, store: Store | None = None) -> dict[str, int]:
    """Write the pool as img2dataset-style shards under ``out_dir/pool`` and the eval set under
    ``out_dir/eval`` (``out_dir`` may be any URL). Returns counts of what was written (including
    deliberately broken rows). ``_SUCCESS`` is written last."""
    store = store or Store()
    out = str(out_dir)
    b = SampleBuilder(n_pairs, eval_size, seed)
    pairs = b.pairs()  # exactly n_pairs, consumed one shard at a time
    shards = -(-n_pairs // shard_size)
    written = sum(_write_shard(store, join(out, "pool"), n, islice(pairs, shard_size),
                               random.Random(seed * 1000 + n)) for n in range(shards))
    broken = 3 * shards
    for p in b.eval:
        stem = join(out, "eval", p.key)
        store.write_bytes(f"{stem}.{p.ext}", p.image)
        store.write_text(f"{stem}.txt", p.text)
        store.write_text(f"{stem}.json", json.dumps(p.meta))
    store.write_text(join(out, "_SUCCESS"), json.dumps({"n_pairs": n_pairs, "seed": seed}))
    return {"pool_rows": written + broken, "eval_images": len(b.eval), "shards": shards,
            "broken_rows": broken}


def _write_shard(store: Store, pool_dir: str, n: int, shard: Iterable[Pair],
                 rng: random.Random) -> int:
    """One tar + parquet sidecar, streamed pair by pair. Adds 2 failed downloads (sidecar only)
    and one member-less caption (a real crawl artefact); returns how many pairs were written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    with (store.open(join(pool_dir, f"{n:05d}.tar"), "wb") as fh,
          tarfile.open(fileobj=fh, mode="w|") as tar):
        for p in shard:
            meta = {"key": p.key, "url": p.url, "caption": p.text, "status": "success", **p.meta}
            if p.image is not None:
                _add_member(tar, f"{p.key}.{p.ext}", p.image)
            _add_member(tar, f"{p.key}.txt", p.text.encode())
            _add_member(tar, f"{p.key}.json", json.dumps(meta).encode())
            rows.append({"key": p.key, "url": p.url, "caption": p.text, "status": "success",
                         "error_message": None})
        orphan = f"{n:05d}99999"
        _add_member(tar, f"{orphan}.txt", b"a caption whose image member is missing")
        _add_member(tar, f"{orphan}.json", json.dumps({"key": orphan, "url":
                    f"https://img.example.com/orphan{n}.jpg", "status": "success"}).encode())
    for j in range(2):
        url = f"https://dead.example.com/{rng.getrandbits(32)}.jpg"
        rows.append({"key": f"{n:05d}9999{j}", "url": url,
                     "caption": "a photo that could not be downloaded", "status": "failed_to_download",
                     "error_message": "HTTP Error 404: Not Found"})
    with store.open(join(pool_dir, f"{n:05d}.parquet"), "wb") as fh:
        pq.write_table(pa.Table.from_pylist(rows), fh)
    return len(rows) - 2


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))
