"""Sample-to-insert rate limiting, in the manner of Reverb's ``SampleToInsertRatio``.

The limiter keeps ``diff = inserts * samples_per_insert - samples`` inside
``[-error_buffer, +error_buffer]`` once ``min_size_to_sample`` items were inserted:

* a sample of ``n`` items may proceed when ``size >= min_size_to_sample`` and
  ``diff - n >= -error_buffer``;
* an insert of ``m`` items may proceed while ``size < min_size_to_sample`` or
  ``diff + m * samples_per_insert <= error_buffer``.

The state space is one number, so deadlock freedom is a one-line condition: from any state
where inserting is blocked (``diff > error_buffer - m*spi``) sampling must be possible
(``diff - n >= -error_buffer``), i.e. ``2 * error_buffer >= n + m * spi``.
"""

from __future__ import annotations

from dataclasses import dataclass


class RateLimiterError(ValueError):
    """Arguments that are invalid or would let sampling and inserting block each other forever."""


@dataclass
class SampleToInsertRatio:
    samples_per_insert: float
    min_size_to_sample: int
    error_buffer: float
    inserts: int = 0
    samples: int = 0

    def __post_init__(self) -> None:
        if not self.samples_per_insert > 0:
            raise RateLimiterError(f"samples_per_insert must be > 0, got {self.samples_per_insert}")
        if self.min_size_to_sample < 1:
            raise RateLimiterError(f"min_size_to_sample must be >= 1, got {self.min_size_to_sample}")
        if not self.error_buffer > 0:
            raise RateLimiterError(f"error_buffer must be > 0, got {self.error_buffer}")

    def check_progress(self, sample_batch: int, insert_batch: int) -> None:
        """Raise if sampling ``sample_batch`` and inserting ``insert_batch`` items at a time could deadlock."""
        need = sample_batch + insert_batch * self.samples_per_insert
        if 2 * self.error_buffer < need:
            raise RateLimiterError(
                f"error_buffer={self.error_buffer:g} would deadlock: with batches of {sample_batch} sampled "
                f"and blocks of {insert_batch} inserted at samples_per_insert={self.samples_per_insert:g}, "
                f"it must be at least {need / 2:g} (half of batch + block * ratio)"
            )

    @property
    def diff(self) -> float:
        return self.inserts * self.samples_per_insert - self.samples

    def can_sample(self, n: int, size: int) -> bool:
        return size >= self.min_size_to_sample and self.diff - n >= -self.error_buffer

    def can_insert(self, m: int, size: int) -> bool:
        return size < self.min_size_to_sample or self.diff + m * self.samples_per_insert <= self.error_buffer

    def record_sample(self, n: int) -> None:
        self.samples += n

    def record_insert(self, m: int) -> None:
        self.inserts += m
