"""The sample images in ``data/`` and their ground truth, reached only by id.

``data/images/<id>.png`` holds RGB scenes and ``data/masks/<id>.png`` Cityscapes labelIds (mode L). An id is
looked up in the listing of the folder, never joined into a path as given, so ``../``, absolute paths,
separators and encoded variants of them cannot reach anything outside ``data/``.

    python -m segmentation.samples data    # regenerate the committed samples (deterministic)
"""

from __future__ import annotations

import logging
import re
import sys
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
SAMPLE_SEEDS = range(900, 906)
SAMPLE_SIZE = (256, 512)  # (H, W)


class UnknownSample(KeyError):
    """No sample has this id. ``str()`` is a message for the caller."""

    def __str__(self) -> str:
        return self.args[0]


class Samples:
    def __init__(self, root: Path = DATA_DIR):
        self.root = Path(root)

    @cached_property
    def _index(self) -> dict[str, tuple[Path, Path | None]]:
        images = self.root / "images"
        masks = self.root / "masks"
        out = {}
        for path in sorted(images.glob("*.png")) if images.is_dir() else []:
            if ID_PATTERN.match(path.stem) and path.is_file() and not path.is_symlink():
                mask = masks / path.name
                out[path.stem] = (path, mask if mask.is_file() and not mask.is_symlink() else None)
        return out

    def ids(self) -> list[str]:
        return list(self._index)

    def _entry(self, image_id: str) -> tuple[Path, Path | None]:
        if not isinstance(image_id, str) or not ID_PATTERN.match(image_id):
            raise UnknownSample(f"{image_id!r} is not a sample id: ids are letters, digits, '_' and '-' (see /images)")
        try:
            return self._index[image_id]
        except KeyError:
            raise UnknownSample(f"no sample image with id {image_id!r}; known ids: {', '.join(self.ids())}") from None

    def image_path(self, image_id: str) -> Path:
        return self._entry(image_id)[0]

    def image(self, image_id: str) -> np.ndarray:
        """(H, W, 3) uint8 RGB."""
        with Image.open(self.image_path(image_id)) as img:
            return np.asarray(img.convert("RGB"))

    def has_mask(self, image_id: str) -> bool:
        return self._entry(image_id)[1] is not None

    def label_ids(self, image_id: str) -> np.ndarray:
        """(H, W) uint8 Cityscapes labelIds of the sample's ground truth."""
        mask = self._entry(image_id)[1]
        if mask is None:
            raise UnknownSample(f"sample {image_id!r} has no ground-truth mask")
        with Image.open(mask) as img:
            return np.asarray(img)


def write_samples(root: Path, seeds=SAMPLE_SEEDS, size=SAMPLE_SIZE) -> list[str]:
    from .scenes import generate_scene

    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    ids = []
    for seed in seeds:
        image, labels = generate_scene(seed, *size)
        sample_id = f"scene_{seed}"
        Image.fromarray(image).save(root / "images" / f"{sample_id}.png", optimize=True)
        Image.fromarray(labels).save(root / "masks" / f"{sample_id}.png", optimize=True)
        ids.append(sample_id)
    return ids


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DATA_DIR
    log.info("wrote samples %s to %s", write_samples(target), target)
