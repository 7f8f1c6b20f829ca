"""Admission at arrival: the gateway refuses a call its model could not answer within the model's latency bound
the moment the call arrives, instead of queueing it.

BentoML's batching dispatcher (1.4.39) refuses by another rule: once its estimate of the whole queue's time passes
the bound it cancels the *oldest* queued call, so under overload the caller who has waited longest is the one
refused, after waiting up to the bound. The gateway runs one worker and sees every call to each model, and each
answer says how long its batch took in the model, so it can tell at arrival how much work is ahead of a call.

Pure bookkeeping: no BentoML, no clock. ``segmentation.services.call_model`` keeps one :class:`ModelQueue` per model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# How a refusal says when to come back; clients that cannot read the Retry-After header parse it (segmentation/jobs.py).
RETRY_IN = "retry in {} s"

# Weight of the newest answer in the learned time per image: recent enough to follow a model that slows down
# under load, smooth enough that one odd batch does not swing the estimate.
NEWEST = 0.3


@dataclass
class Refusal:
    """Why a call was not admitted: the images ahead of it, the time they and it would take, and how long
    until that much work would fit within the bound."""

    ahead: int
    finish_s: float
    seconds_per_image: float
    retry_after_s: int


@dataclass
class ModelQueue:
    """The images the gateway has sent one model and not yet had answered, and how long one takes there.

    ``seconds_per_image`` starts from the import's measurement of the served runtime where there is one (None: no
    estimate, so every call is admitted until the first answer) and then follows the answers."""

    bound_s: float
    workers: int = 1
    seconds_per_image: float | None = None
    images: int = 0

    def finish_s(self, n: int) -> float | None:
        """Seconds until ``n`` more images would be answered, behind the ones in flight; None without an estimate."""
        if self.seconds_per_image is None:
            return None
        return (self.images + n) * self.seconds_per_image / max(1, self.workers)

    def admit(self, n: int) -> Refusal | None:
        """Take ``n`` images in (None), or say why not. A call with nothing ahead of it is always taken: however
        long its own images take, waiting would not make them faster."""
        finish = self.finish_s(n)
        if finish is None or self.images == 0 or finish <= self.bound_s:
            self.images += n
            return None
        return Refusal(self.images, finish, self.seconds_per_image, max(1, math.ceil(finish - self.bound_s)))

    def done(self, n: int) -> None:
        """``n`` admitted images are answered, or failed."""
        self.images = max(0, self.images - n)

    def state(self) -> dict:
        """What ``POST /models`` shows of this queue."""
        seconds = self.seconds_per_image
        return {"images_in_flight": self.images, "latency_bound_s": self.bound_s,
                "seconds_per_image": None if seconds is None else round(seconds, 4)}

    def learn(self, batch_ms: float, batch_size: int) -> None:
        """One answer's batch took ``batch_ms`` in the model for ``batch_size`` images."""
        if batch_size < 1 or batch_ms <= 0:
            return
        latest = batch_ms / 1e3 / batch_size
        previous = self.seconds_per_image
        self.seconds_per_image = latest if previous is None else NEWEST * latest + (1 - NEWEST) * previous
