"""A deterministic generator of street-like scenes with Cityscapes labelId masks.

It fills ``data/`` with sample images and trains the demo models on a fresh machine, where no real weights can
be downloaded. Each scene is a perspective street: sky above a horizon, buildings with windows, trees, a road
with lane marks between sidewalks, poles with signs and traffic lights, people on the sidewalk, cars on the
road, sometimes the ego vehicle's bonnet. Objects are drawn back to front as vectorised shape masks (one numpy
expression per object, never a loop over pixels); pixel noise and per-object colour jitter keep colour alone
from giving the answer away. The same seed always gives the same scene, whatever the machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Cityscapes labelIds used here (see classes.py for the superclass table).
EGO_VEHICLE, ROAD, SIDEWALK, BUILDING, WALL, POLE, TRAFFIC_LIGHT, TRAFFIC_SIGN = 1, 7, 8, 11, 12, 17, 19, 20
VEGETATION, TERRAIN, SKY, PERSON, CAR, TRUCK = 21, 22, 23, 24, 26, 27

_CAR_COLOURS = np.array([(30, 40, 110), (150, 20, 25), (225, 225, 230), (25, 25, 28), (150, 155, 160), (20, 80, 40)])
_CLOTHES = np.array([(200, 40, 60), (60, 50, 120), (230, 200, 60), (40, 40, 40), (120, 70, 40)])


@dataclass
class _Canvas:
    image: np.ndarray  # (H, W, 3) float32
    labels: np.ndarray  # (H, W) uint8 labelIds
    rng: np.random.Generator

    @property
    def shape(self) -> tuple[int, int]:
        return self.labels.shape

    def paint(self, where: np.ndarray, label: int, colour, jitter: float = 12.0) -> None:
        """Fill the boolean mask ``where`` (H, W) with ``colour`` (plus a per-object jitter) and ``label``."""
        c = np.asarray(colour, dtype=np.float32) + self.rng.normal(0.0, jitter, 3).astype(np.float32)
        self.image[where] = c
        self.labels[where] = label


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w]
    return yy.astype(np.float32), xx.astype(np.float32)


def _rect(yy, xx, top, bottom, left, right) -> np.ndarray:
    return (yy >= top) & (yy < bottom) & (xx >= left) & (xx < right)


def _ellipse(yy, xx, cy, cx, ry, rx) -> np.ndarray:
    return ((yy - cy) / max(ry, 0.5)) ** 2 + ((xx - cx) / max(rx, 0.5)) ** 2 <= 1.0


def generate_scene(seed: int, height: int = 256, width: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """One scene: ``(image (H, W, 3) uint8 RGB, labelIds (H, W) uint8)``. Deterministic in ``seed``."""
    if height < 32 or width < 32:
        raise ValueError(f"scenes need at least 32x32 pixels, got {height}x{width}")
    rng = np.random.default_rng(seed)
    H, W = height, width
    yy, xx = _grid(H, W)
    cv = _Canvas(np.zeros((H, W, 3), np.float32), np.zeros((H, W), np.uint8), rng)

    horizon = rng.uniform(0.36, 0.5) * H
    # Sky: a vertical gradient from deep to pale blue.
    t = (yy / horizon).clip(0, 1)[..., None]
    top, low = np.array([55, 115, 185]) + rng.normal(0, 10, 3), np.array([160, 195, 230]) + rng.normal(0, 10, 3)
    sky = yy < horizon
    cv.image[sky] = ((1 - t) * top + t * low)[sky]
    cv.labels[sky] = SKY

    # Ground: sidewalks (and some terrain) everywhere below the horizon, then the road between two lines that
    # meet at the vanishing point.
    ground = ~sky
    cv.paint(ground, SIDEWALK, (175, 165, 160))
    vx = rng.uniform(0.35, 0.65) * W
    depth = (yy - horizon).clip(0, None) / (H - horizon)  # 0 at the horizon, 1 at the bottom row
    half = depth * W * rng.uniform(0.45, 0.7)
    road = ground & (np.abs(xx - vx) < half)
    cv.paint(road, ROAD, (95, 75, 100))
    lane = road & (np.abs(xx - vx) < np.maximum(depth * W * 0.012, 0.6)) & (((yy - horizon) // max(H / 24, 2)) % 2 == 0)
    cv.paint(lane, ROAD, (225, 225, 215), jitter=4)
    for side in (-1, 1):
        if rng.random() < 0.5:  # a strip of grass beyond one sidewalk
            edge = vx + side * half * 1.5
            terrain = ground & ((xx - edge) * side > 0)
            cv.paint(terrain, TERRAIN, (150, 170, 90))

    # Buildings along the horizon, each with a grid of windows.
    x = -rng.uniform(0, 0.1) * W
    while x < W:
        bw = rng.uniform(0.12, 0.3) * W
        btop = horizon - rng.uniform(0.15, 0.9) * horizon
        body = _rect(yy, xx, btop, horizon + 0.02 * H, x, x + bw)
        shade = rng.choice([(120, 110, 105), (150, 120, 95), (95, 95, 100), (170, 160, 140)])
        cv.paint(body, BUILDING, shade)
        cell = max(W / 40, 3.0)
        windows = body & ((xx - x) % cell < cell * 0.5) & ((yy - btop) % (cell * 1.4) < cell * 0.7) & (yy > btop + cell)
        cv.paint(windows, BUILDING, np.asarray(shade) * 0.45, jitter=5)
        x += bw + rng.uniform(-0.02, 0.04) * W

    # Trees: trunk and canopy (both vegetation in Cityscapes).
    for _ in range(rng.integers(1, 5)):
        tx = rng.uniform(0, W)
        base = horizon + rng.uniform(0.02, 0.15) * (H - horizon)
        size = (base - horizon + 0.05 * H) * rng.uniform(1.0, 1.8)
        cv.paint(_rect(yy, xx, base - size * 0.7, base, tx - size * 0.05, tx + size * 0.05), VEGETATION, (80, 60, 35))
        cv.paint(_ellipse(yy, xx, base - size, tx, size * 0.5, size * 0.45), VEGETATION, (75, 120, 40), jitter=15)

    # Poles with a traffic sign or a traffic light on top.
    for _ in range(rng.integers(1, 4)):
        px = rng.uniform(0.05, 0.95) * W
        base = horizon + rng.uniform(0.1, 0.6) * (H - horizon)
        scale = (base - horizon) / (H - horizon)
        ph, pw = scale * H * 0.9 + 0.08 * H, max(scale * W * 0.012, 1.5)
        cv.paint(_rect(yy, xx, base - ph, base, px - pw, px + pw), POLE, (110, 110, 115), jitter=6)
        if rng.random() < 0.6:
            r = pw * 4
            cv.paint(_ellipse(yy, xx, base - ph, px, r, r), TRAFFIC_SIGN, (235, 200, 30), jitter=8)
        else:
            cv.paint(
                _rect(yy, xx, base - ph - pw * 6, base - ph, px - pw * 2, px + pw * 2), TRAFFIC_LIGHT, (30, 35, 30)
            )

    # People on the sidewalks and cars on the road, far ones first so near ones cover them.
    things = []
    for _ in range(rng.integers(2, 7)):
        things.append(("car", horizon + rng.uniform(0.1, 0.95) * (H - horizon)))
    for _ in range(rng.integers(1, 6)):
        things.append(("person", horizon + rng.uniform(0.1, 0.9) * (H - horizon)))
    for kind, base in sorted(things, key=lambda k: k[1]):
        d = (base - horizon) / (H - horizon)
        road_half = d * W * 0.55
        if kind == "car":
            cx = vx + rng.uniform(-0.8, 0.8) * road_half
            cw, ch = d * W * 0.32 + 6, d * H * 0.3 + 4
            label = TRUCK if rng.random() < 0.15 else CAR
            colour = _CAR_COLOURS[rng.integers(len(_CAR_COLOURS))]
            body = _rect(yy, xx, base - ch * 0.6, base - ch * 0.12, cx - cw / 2, cx + cw / 2)
            cabin = _rect(yy, xx, base - ch, base - ch * 0.55, cx - cw * 0.35, cx + cw * 0.35)
            wheels = _ellipse(yy, xx, base - ch * 0.12, cx - cw * 0.3, ch * 0.13, cw * 0.09) | _ellipse(
                yy, xx, base - ch * 0.12, cx + cw * 0.3, ch * 0.13, cw * 0.09
            )
            cv.paint(body | cabin, label, colour)
            cv.paint(
                cabin & _rect(yy, xx, base - ch * 0.92, base - ch * 0.6, cx - cw * 0.3, cx + cw * 0.3),
                label,
                (60, 75, 90),
            )
            cv.paint(wheels, label, (20, 20, 20), jitter=4)
        else:
            side = rng.choice([-1, 1])
            cx = vx + side * road_half * rng.uniform(1.1, 1.6)
            ph = d * H * 0.55 + 8
            body = _ellipse(yy, xx, base - ph * 0.45, cx, ph * 0.45, ph * 0.13)
            head = _ellipse(yy, xx, base - ph * 0.92, cx, ph * 0.09, ph * 0.08)
            cv.paint(body, PERSON, _CLOTHES[rng.integers(len(_CLOTHES))])
            cv.paint(head, PERSON, (225, 180, 150), jitter=8)

    if rng.random() < 0.3:  # the ego vehicle's bonnet along the bottom edge
        cv.paint(
            yy > H * (1 - rng.uniform(0.05, 0.12)) + 0.03 * H * np.cos(xx / W * np.pi * 2), EGO_VEHICLE, (15, 15, 20)
        )

    cv.image += rng.normal(0.0, 6.0, cv.image.shape).astype(np.float32)
    return np.clip(np.rint(cv.image), 0, 255).astype(np.uint8), cv.labels


def generate_dataset(seeds, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """``(N, H, W, 3) uint8`` images and ``(N, H, W) uint8`` labelIds for the given seeds."""
    pairs = [generate_scene(int(s), height, width) for s in seeds]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
