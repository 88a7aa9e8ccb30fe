"""Per-layer `r` schedules (ToMe conventions) and solvers for targets users think in (output tokens).

All functions are pure: they take the token count entering the encoder, the number of layers and the number of
protected tokens, so schedules adapt to any input resolution.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from rapid_hf.reduction.matching import removal_cap

RSpec = int | Sequence[int] | tuple[int, float]


def expand_schedule(r: RSpec, num_layers: int) -> list[int]:
    """Per-layer requested `r` from an int (constant), a per-layer list, or ToMe's `(r, inflection)` tuple.

    ToMe's conventions (`tome.utils.parse_r`): a tuple is always the linear schedule, whatever the type of its
    inflection (`(8, 1)` is `(8, 1.0)`): layer l gets `int(low + l (2r - 2 low) / (L - 1))` with
    `low = int(r (1 - inflection))`, so inflection 0 is constant, +1 increases from 0 to `2r`, -1 decreases from
    `2r` to 0, and the mean stays about `r`. Any other sequence is per-layer values, one per layer.
    """
    if isinstance(r, bool):
        raise ValueError(f"r must be an int, a per-layer list or an (r, inflection) tuple, got {r!r}")
    if isinstance(r, int):
        return [r] * num_layers
    if isinstance(r, tuple):
        if len(r) != 2:
            raise ValueError(
                f"r: a tuple is ToMe's (r, inflection) schedule, got {r!r}; give per-layer values as a list"
            )
        base, inflection = r
        low = int(base * (1.0 - inflection))
        high = 2 * base - low
        step = (high - low) / max(1, num_layers - 1)
        return [max(0, int(low + step * layer)) for layer in range(num_layers)]
    values = list(r)
    if len(values) != num_layers:
        raise ValueError(f"r: a per-layer list needs one value per layer ({num_layers}), got {len(values)}")
    return values


def token_counts(num_tokens: int, schedule: Sequence[int], num_protected: int) -> list[int]:
    """Tokens after each layer: `N_l = N_{l-1} - min(r_l, (N_{l-1} - protected) // 2)`."""
    counts = []
    for r in schedule:
        num_tokens -= min(r, removal_cap(num_tokens, num_protected))
        counts.append(num_tokens)
    return counts


def effective_schedule(num_tokens: int, schedule: Sequence[int], num_protected: int) -> list[int]:
    """The `r` each layer actually removes once capped."""
    counts = token_counts(num_tokens, schedule, num_protected)
    return [before - after for before, after in zip([num_tokens, *counts[:-1]], counts, strict=True)]


def min_output_tokens(num_tokens: int, num_layers: int, num_protected: int) -> int:
    """Fewest tokens reachable by removing the cap at every layer."""
    return token_counts(num_tokens, [num_tokens] * num_layers, num_protected)[-1] if num_layers else num_tokens


def schedule_for_output_tokens(num_tokens: int, num_layers: int, num_protected: int, target: int) -> list[int]:
    """The most even schedule ending at exactly `target` tokens: `r` on the first k layers, `r - 1` after.

    `r` is the smallest constant that reaches `target`; the final count falls by 0 or 1 each time one more
    layer takes `r` instead of `r - 1`, so some k lands on `target` exactly. Front-loading the larger value
    removes tokens early, where it saves the most compute. Raises ValueError when `target` is outside
    `[min_output_tokens, num_tokens]`.
    """
    lowest = min_output_tokens(num_tokens, num_layers, num_protected)
    if not lowest <= target <= num_tokens:
        raise ValueError(
            f"output_tokens={target} cannot be reached: with {num_tokens} input tokens, {num_layers} reducing "
            f"layer(s) and {num_protected} protected token(s) the reachable range is [{lowest}, {num_tokens}]"
        )
    if torch.compiler.is_compiling():  # dynamo would trace through the cache (and warn): solve it in the trace
        return list(_even_schedule(num_tokens, num_layers, num_protected, target))
    return list(_cached_even_schedule(num_tokens, num_layers, num_protected, target))


def _even_schedule(num_tokens: int, num_layers: int, num_protected: int, target: int) -> tuple[int, ...]:
    def final(schedule: Sequence[int]) -> int:
        return token_counts(num_tokens, schedule, num_protected)[-1] if schedule else num_tokens

    low, high = 0, num_tokens  # final([high] * L) <= target is guaranteed by the range check
    while low < high:
        middle = (low + high) // 2
        if final([middle] * num_layers) <= target:
            high = middle
        else:
            low = middle + 1
    r = low
    for k in range(num_layers + 1):
        schedule = [r] * k + [max(0, r - 1)] * (num_layers - k)
        if final(schedule) == target:
            return tuple(schedule)
    raise AssertionError(f"no schedule reaches {target} tokens")  # impossible: see docstring


_cached_even_schedule = functools.lru_cache(maxsize=256)(_even_schedule)
