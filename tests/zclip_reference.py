"""A line-by-line NumPy port of the authors' ZClip, for the tests of ``zclip``.

Ported from ``zclip/zclip.py`` of https://github.com/bluorion-com/ZClip at
commit ``584ce4f5a4aabab59e7df1dbaffc26a44df39dc1`` (2025-10-15). Method
names, the order of every operation and every constant are the reference's;
only what touches torch changes:

* ``step`` takes the total gradient norm (what ``_compute_grad_norm``
  returns: a Python float, ``.item()`` of the norm) instead of a model, and
  returns the factor the gradients are multiplied by (1.0 when they are left
  alone), so the clipped norm is ``factor * total_norm``;
* ``torch.nn.utils.clip_grad_norm_`` (the warm-up clip) is ported as torch
  computes it on float32 gradients: ``clip_coef = max_norm / (total_norm +
  1e-6)`` in float32, clamped to at most 1 (a NaN stays NaN), applied
  always;
* ``apply_in_place_clipping`` returns its ``clip_coef`` instead of
  multiplying ``param.grad`` by it;
* the FSDP and Lightning branches compute the same norm and call the same
  ``clip_grad_norm_``, so they are not repeated.

The statistics are plain Python floats (float64), as in the reference. A NaN
or infinite norm is handled here exactly as the reference handles it (it
enters the buffer or the EMA); the tests do not feed such norms to the port,
because ``norm_optax.zclip`` follows the package contract instead (see its
docstring).
"""

from __future__ import annotations

import numpy as np

__all__ = ["ZClip"]

REFERENCE_COMMIT = "584ce4f5a4aabab59e7df1dbaffc26a44df39dc1"


def _torch_clip_grad_norm_coef(total_norm: float, max_norm: float) -> float:
    """The factor ``torch.nn.utils.clip_grad_norm_`` multiplies float32 grads by."""
    total = np.float32(total_norm)
    clip_coef = np.float32(max_norm) / (total + np.float32(1e-6))
    # torch.clamp(clip_coef, max=1.0): NaN propagates.
    clip_coef_clamped = np.minimum(clip_coef, np.float32(1.0))  # NaN stays NaN
    return float(clip_coef_clamped)


class ZClip:
    """The reference's ``ZClip``; ``step`` takes a norm instead of a model."""

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        max_grad_norm: float | None = 1.0,
        eps: float = 1e-6,
        warmup_steps: int = 25,
        mode: str = "zscore",
        clip_option: str = "adaptive_scaling",
        clip_factor: float = 1.0,
        skip_update_on_spike: bool = False,
    ) -> None:
        self.alpha = alpha
        self.z_thresh = z_thresh
        self.max_grad_norm = max_grad_norm
        self.eps = eps
        self.warmup_steps = warmup_steps
        self.mode = mode.lower()
        self.clip_factor = clip_factor
        self.skip_update_on_spike = skip_update_on_spike

        self.clip_option: str | None
        if self.mode == "zscore":
            assert clip_option in ["mean", "adaptive_scaling"], (
                "For zscore mode, clip_option must be either 'mean' or "
                "'adaptive_scaling'."
            )
            self.clip_option = clip_option.lower()
        elif self.mode == "percentile":
            self.clip_option = None  # clip_option is ignored in percentile mode.
        else:
            raise ValueError("mode must be either 'zscore' or 'percentile'.")

        self.buffer: list[float] = []
        self.initialized = False
        self.mean: float = float("nan")  # None in the reference until warm-up ends
        self.var: float = float("nan")

    def _initialize_ema(self) -> None:
        self.mean = sum(self.buffer) / len(self.buffer)
        self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
        self.initialized = True
        self.buffer = []

    def _update_ema(self, grad_norm: float) -> None:
        # Update EMA for mean and variance using the new effective gradient norm.
        self.mean = self.alpha * self.mean + (1 - self.alpha) * grad_norm
        self.var = (
            self.alpha * self.var + (1 - self.alpha) * (grad_norm - self.mean) ** 2
        )

    def _compute_positive_zscore(self, grad_norm: float) -> tuple[float, float]:
        std = self.var**0.5
        z = (grad_norm - self.mean) / (std + self.eps)
        return z, std

    def _compute_clip_val(self, grad_norm: float) -> float | None:
        std = self.var**0.5

        # Fixed behavior: In percentile mode, always clip to a threshold
        # computed as: EMA mean + (z_thresh x std)
        if self.mode == "percentile":
            threshold = self.mean + self.z_thresh * std
            if grad_norm > threshold:
                return threshold
        elif self.mode == "zscore":
            # Compute the z-score for the current gradient norm.
            z, std = self._compute_positive_zscore(grad_norm)
            if z > self.z_thresh:
                if self.clip_option == "adaptive_scaling":
                    # This rescaling ratio imposes a greater penalty on large outliers.
                    eta = z / self.z_thresh
                    threshold = self.mean + (self.z_thresh * std) / eta
                    threshold = threshold * self.clip_factor
                elif self.clip_option == "mean":
                    threshold = self.mean
                return threshold
        return None  # No clipping needed.

    def apply_in_place_clipping(
        self, global_norm: float, max_global_norm: float
    ) -> float:
        """Returns the coefficient the reference multiplies the grads by."""
        # Calculate the clipping coefficient.
        clip_coef = (
            (max_global_norm / (global_norm + 1e-6))
            if global_norm > max_global_norm
            else 1.0
        )
        # If clipping is needed, scale each gradient in-place.
        if clip_coef < 1.0:
            return clip_coef
        return 1.0

    def _apply_clipping(
        self, clip_val: float | None, total_norm: float
    ) -> tuple[float, float]:
        """Returns ``(effective_clip, coefficient applied to the grads)``."""
        # Use the computed clip_val if available; otherwise, use the total norm.
        adaptive_clip = clip_val if clip_val is not None else total_norm
        if self.max_grad_norm is not None:
            effective_clip = min(adaptive_clip, self.max_grad_norm)
        else:
            effective_clip = adaptive_clip
        coef = self.apply_in_place_clipping(total_norm, effective_clip)
        return effective_clip, coef

    def step(self, total_norm: float) -> float:
        """One step on a gradient of norm ``total_norm``; the factor applied."""
        # During warmup, collect gradient norms without applying clipping.
        if not self.initialized:
            self.buffer.append(total_norm)
            if len(self.buffer) >= self.warmup_steps:
                self._initialize_ema()
            if self.max_grad_norm is not None:
                return _torch_clip_grad_norm_coef(total_norm, self.max_grad_norm)
            return 1.0

        # Compute the clip value based on the selected mode and clip_option.
        clip_val = self._compute_clip_val(total_norm)
        _, coef = self._apply_clipping(clip_val, total_norm)
        if clip_val is not None and self.skip_update_on_spike:
            return coef

        # Update EMA with the effective norm (either the computed clip or the
        # original norm).
        self._update_ema(clip_val if clip_val is not None else total_norm)
        return coef
