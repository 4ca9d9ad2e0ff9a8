"""Step caching (TeaCache, Liu et al. 2024): skip the transformer blocks at steps whose input changed little.

    cache = StepCache(coefficients, threshold=0.1)      one per sampling run (its state is per branch)
    transformer(x, t, ..., step_cache=cache.for_call(branch, step, num_steps))
    cache.passes, cache.skips                           block passes run and skipped so far
    released_coefficients(version, config) -> list | None    the published polynomials, by the model's shape

At every call the first block's timestep-modulated input is compared with the one of the branch's previous
call: the relative L1 change, mapped through the model's polynomial (fitted from sampled trajectories: it turns
the input's change into an estimate of the output's), accumulates; while the sum stays under ``threshold`` the
blocks are skipped and the residual they added last time (output - input of the block stack) is added again;
when it passes the threshold the blocks run and the sum restarts. The first and last steps always run.

State is kept per ``branch``: the unconditional and conditional passes (or one batched pass of both), and each
context window, change differently from step to step, so each is compared with its own previous call. The
official TeaCache counts calls instead of steps, which is only right for one call per step.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Published TeaCache polynomials (highest power first) of the released models, by (version, layers, inner width):
# EasyAnimate's own (get_teacache_coefficients; V5-7B from its comment there). V5-12B and V4 have none published:
# bench/fit_step_cache.py fits them from a model's own sampled trajectories.
RELEASED_COEFFICIENTS = {
    ("V5.1", 48, 3072): [-10.47857366, 8.33844143, -0.78477557, 0.68798618, 0.0136149],  # V5.1-12B
    ("V5.1", 36, 3072): [1.07862322, -4.19362456, 3.06725828, 0.33161686, 0.02374758],  # V5.1-7B
    ("V5", 36, 3072): [-3.64204720e03, 1.43764725e03, -1.93045263e02, 1.09596499e01, -1.70663507e-01],  # V5-7B
}
DEFAULT_THRESHOLD = 0.1  # the official ComfyUI nodes' default (their web UI uses 0.08)
COEFFICIENTS_FILE = "step_cache.json"  # a model folder's own fitted polynomial (bench/fit_step_cache.py writes it)


def released_coefficients(version: str, num_layers: int, inner_dim: int) -> list[float] | None:
    """The published polynomial of a released model of this shape, or None (fit one: bench/fit_step_cache.py)."""
    return RELEASED_COEFFICIENTS.get((version, num_layers, inner_dim))


def model_coefficients(folder: str | Path | None, version: str, num_layers: int, inner_dim: int) -> list[float]:
    """The polynomial for a model: its folder's ``step_cache.json`` (fitted on it), else the published one of a
    released model of its shape; ValueError naming the fix when there is neither."""
    if folder is not None:
        path = Path(folder) / COEFFICIENTS_FILE
        for candidate in (path, Path(folder).parent / COEFFICIENTS_FILE):  # a model folder, or its transformer/
            if candidate.is_file():
                try:
                    coefficients = json.loads(candidate.read_text(encoding="utf-8"))["coefficients"]
                    return [float(c) for c in coefficients]
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(
                        f"{candidate} is not a step-cache file ({e}): delete it or rerun bench/fit_step_cache.py"
                    ) from e
    released = released_coefficients(version, num_layers, inner_dim)
    if released is None:
        raise ValueError(
            f"no step-cache polynomial for this {version} model ({num_layers} layers, width {inner_dim}): EasyAnimate "
            "published them for V5.1-12B, V5.1-7B and V5-7B only. Fit one on this model with "
            f"bench/fit_step_cache.py --model <its folder> (writes {COEFFICIENTS_FILE}), or sample without caching"
        )
    return released


def polynomial(coefficients: Sequence[float], x: float) -> float:
    """sum c_i x^(n - i) (numpy.poly1d's order: highest power first)."""
    value = 0.0
    for c in coefficients:
        value = value * x + c
    return value


def relative_l1(previous: torch.Tensor, current: torch.Tensor) -> float:
    """mean |current - previous| / mean |previous|."""
    return float((current.float() - previous.float()).abs().mean() / previous.float().abs().mean().clamp_min(1e-12))


@dataclass
class _Branch:
    """What one branch remembers of its previous call."""

    modulated: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    accumulated: float = 0.0


@dataclass
class StepCache:
    """TeaCache for one sampling run (module docstring). ``record``: keep each call's relative L1 change of the
    modulated input and of the block stack's output, for fitting a polynomial (bench/fit_step_cache.py)."""

    coefficients: Sequence[float]
    threshold: float = DEFAULT_THRESHOLD
    record: bool = False
    passes: int = 0
    skips: int = 0
    branches: dict[Hashable, _Branch] = field(default_factory=dict)
    records: list[tuple[float, float]] = field(default_factory=list)

    def __post_init__(self):
        if self.threshold < 0:
            raise ValueError(f"the step-cache threshold must be 0 or more (0 never skips), got {self.threshold}")
        self._outputs: dict[Hashable, torch.Tensor] = {}

    def for_call(self, branch: Hashable, step: int, num_steps: int) -> Callable:
        """The ``step_cache`` argument of one transformer call: ``(modulated, x, run_blocks) -> x after the blocks``."""

        def run(modulated: torch.Tensor, x: torch.Tensor, run_blocks: Callable[[torch.Tensor], torch.Tensor]):
            state = self.branches.setdefault(branch, _Branch())
            reusable = state.modulated is not None and state.residual is not None
            reusable = reusable and state.modulated.shape == modulated.shape and state.residual.shape == x.shape
            always = step == 0 or step >= num_steps - 1 or not reusable
            if not always:
                change = relative_l1(state.modulated, modulated)
                state.accumulated += polynomial(self.coefficients, change)
            state.modulated = modulated.detach()
            if not always and state.accumulated < self.threshold and not self.record:
                self.skips += 1
                return x + state.residual
            state.accumulated = 0.0
            self.passes += 1
            out = run_blocks(x)
            if self.record and reusable:
                self.records.append((change if not always else float("nan"), relative_l1(self._outputs[branch], out)))
            if self.record:
                self._outputs[branch] = out.detach()
            state.residual = (out - x).detach()
            return out

        return run

    @property
    def pass_share(self) -> float:
        """Block passes run / calls (1.0 before any call)."""
        calls = self.passes + self.skips
        return self.passes / calls if calls else 1.0
