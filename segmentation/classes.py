"""Class tables and palettes, defined once, as data.

Cityscapes ships two label encodings: ``labelIds`` (0-33, plus -1 for "license plate") in the ``*_labelIds.png``
masks, and ``trainIds`` (0-18, 255 = ignore) that most trained models predict. Both are folded here into the
eight *superclasses* (Cityscapes "categories") that every model in this project predicts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLASS_NAMES: tuple[str, ...] = (
    "void",
    "flat",
    "construction",
    "object",
    "nature",
    "sky",
    "human",
    "vehicle",
)
NUM_CLASSES = len(CLASS_NAMES)

# (8, 3) uint8: the colours the existing dashboards know, indexed by superclass id.
PALETTE = np.array(
    [
        (0, 0, 0),  # void
        (128, 64, 128),  # flat
        (70, 70, 70),  # construction
        (255, 165, 0),  # object
        (107, 142, 35),  # nature
        (70, 130, 180),  # sky
        (220, 20, 60),  # human
        (0, 0, 142),  # vehicle
    ],
    dtype=np.uint8,
)

# Cityscapes labelId -> superclass, as ranges (inclusive). -1 (license plate) is a vehicle part.
_LABEL_ID_RANGES = {
    "void": range(0, 7),
    "flat": range(7, 11),
    "construction": range(11, 17),
    "object": range(17, 21),
    "nature": range(21, 23),
    "sky": range(23, 24),
    "human": range(24, 26),
    "vehicle": range(26, 34),
}
# trainId -> superclass. 255 ("ignore") is void.
_TRAIN_ID_RANGES = {
    "flat": range(0, 2),
    "construction": range(2, 5),
    "object": range(5, 8),
    "nature": range(8, 10),
    "sky": range(10, 11),
    "human": range(11, 13),
    "vehicle": range(13, 19),
}


def _lut_from_ranges(ranges: dict[str, range], size: int = 256) -> np.ndarray:
    lut = np.zeros(size, dtype=np.uint8)  # everything unlisted is void (0)
    for name, ids in ranges.items():
        lut[list(ids)] = CLASS_NAMES.index(name)
    return lut


# (256,) uint8 lookup tables: ``LUT[mask]`` remaps a whole uint8 mask at once.
LABEL_ID_TO_SUPERCLASS = _lut_from_ranges(_LABEL_ID_RANGES)
LABEL_ID_TO_SUPERCLASS[255] = CLASS_NAMES.index("vehicle")  # -1 (license plate) stored as uint8
TRAIN_ID_TO_SUPERCLASS = _lut_from_ranges(_TRAIN_ID_RANGES)


def label_ids_to_superclasses(mask: np.ndarray) -> np.ndarray:
    """Remap a Cityscapes labelId mask ``(H, W)`` (uint8, or a signed int with -1) to superclass ids ``(H, W)``
    uint8."""
    if mask.ndim != 2:
        raise ValueError(f"a label mask must be 2-D (H, W), got shape {mask.shape}")
    if mask.dtype != np.uint8:
        if mask.min() < -1 or mask.max() > 33:
            raise ValueError(f"Cityscapes labelIds are -1..33, got values {mask.min()}..{mask.max()}")
        mask = mask.astype(np.int16) % 256  # -1 -> 255
    return LABEL_ID_TO_SUPERCLASS[mask]


def train_ids_to_superclasses(mask: np.ndarray) -> np.ndarray:
    """Remap a Cityscapes trainId mask ``(H, W)`` uint8 (0-18, 255 = ignore) to superclass ids ``(H, W)`` uint8."""
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise ValueError(f"a trainId mask must be (H, W) uint8, got {mask.shape} {mask.dtype}")
    return TRAIN_ID_TO_SUPERCLASS[mask]


def superclasses_checked(mask: np.ndarray) -> np.ndarray:
    """A mask already in superclass ids (0-7), checked."""
    if mask.size and mask.max() >= NUM_CLASSES:
        raise ValueError(f"superclass ids are 0..{NUM_CLASSES - 1}, got values up to {mask.max()}")
    return mask


# How a ground-truth mask's values are to be read: Cityscapes' own ids, or this project's superclasses.
TRUTH_KINDS = {
    "label_ids": label_ids_to_superclasses,
    "train_ids": train_ids_to_superclasses,
    "superclasses": superclasses_checked,
}


def truth_to_superclasses(mask: np.ndarray, kind: str) -> np.ndarray:
    """An (H, W) ground-truth mask of the given kind (a key of ``TRUTH_KINDS``) -> superclass ids."""
    if kind not in TRUTH_KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; use one of {', '.join(TRUTH_KINDS)}")
    return TRUTH_KINDS[kind](mask)


@dataclass(frozen=True)
class ClassInfo:
    id: int
    name: str
    color: tuple[int, int, int]

    def as_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "color": list(self.color)}


def multiclass_table() -> list[ClassInfo]:
    return [ClassInfo(i, n, tuple(int(c) for c in PALETTE[i])) for i, n in enumerate(CLASS_NAMES)]


# Binary models (UNet): background is drawn transparent, the foreground red at alpha 100/255.
BINARY_COLOR = (255, 0, 0)
BINARY_ALPHA = 100 / 255


def binary_table(foreground: str) -> list[ClassInfo]:
    return [ClassInfo(0, "background", (0, 0, 0)), ClassInfo(1, foreground, BINARY_COLOR)]


# --- label sets a model may predict -------------------------------------------------------------------------

# Cityscapes' names, in id order (cityscapesScripts' labels.py).
LABEL_ID_NAMES: tuple[str, ...] = (
    "unlabeled", "ego vehicle", "rectification border", "out of roi", "static", "dynamic", "ground", "road",
    "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail", "bridge", "tunnel", "pole",
    "polegroup", "traffic light", "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
    "bus", "caravan", "trailer", "train", "motorcycle", "bicycle",
)
TRAIN_ID_NAMES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation", "terrain",
    "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)


@dataclass(frozen=True)
class LabelSet:
    """The classes a model predicts and the table that folds them into the served superclasses, applied to the
    model's own arg-max (the reference apps' rule: labels first, then the table)."""

    name: str
    classes: tuple[str, ...]
    to_superclass: tuple[int, ...]  # model class id -> superclass id

    def lookup_table(self) -> np.ndarray | None:
        """(K,) uint8 for ``table[labels]``: the model's own class ids -> superclass ids; None for the superclasses."""
        return None if self.name == "superclass" else np.asarray(self.to_superclass, np.uint8)


LABEL_SETS = {
    "superclass": LabelSet("superclass", CLASS_NAMES, tuple(range(NUM_CLASSES))),
    "trainid": LabelSet("trainid", TRAIN_ID_NAMES, tuple(int(v) for v in TRAIN_ID_TO_SUPERCLASS[:19])),
    "labelid": LabelSet("labelid", LABEL_ID_NAMES, tuple(int(v) for v in LABEL_ID_TO_SUPERCLASS[:34])),
}


def _normalised(name: str) -> str:
    return " ".join(str(name).lower().replace("_", " ").replace("-", " ").split())


def recognise_label_set(count: int, names: list[str] | None = None, named: str | None = None) -> LabelSet:
    """The label set of a model with ``count`` outputs: the one ``named`` (``--labels``), else the one whose class
    names are ``names`` (a checkpoint's ``id2label``, compared case- and separator-blind), else the one with that
    many classes when the names say nothing (``LABEL_0``, ...). Raises ValueError saying what was found and what is
    accepted."""
    accepted = ", ".join(f"{s.name} ({len(s.classes)} classes)" for s in LABEL_SETS.values())
    if named is not None:
        if named not in LABEL_SETS:
            raise ValueError(f"unknown label set {named!r}; accepted: {accepted}")
        chosen = LABEL_SETS[named]
        if len(chosen.classes) != count:
            raise ValueError(f"--labels {named} means {len(chosen.classes)} classes, but the model predicts {count}")
        return chosen
    by_count = [s for s in LABEL_SETS.values() if len(s.classes) == count]
    if names is not None:
        found = [_normalised(n) for n in names]
        for s in by_count:
            if found == [_normalised(n) for n in s.classes]:
                return s
        anonymous = all(n.startswith("label ") for n in found)
        if by_count and anonymous:
            return by_count[0]
        if by_count:
            raise ValueError(
                f"the model's {count} classes are named {', '.join(names[:6])}{', ...' if count > 6 else ''}, "
                f"not the {by_count[0].name} classes in their order; accepted: {accepted} "
                "(or name the set with --labels)"
            )
    if by_count:
        return by_count[0]
    raise ValueError(
        f"the model predicts {count} classes"
        + (f" ({', '.join(names[:6])}{', ...' if count > 6 else ''})" if names else "")
        + f"; accepted label sets: {accepted}"
    )
