"""Numbers with their units, as a person reads them: bytes, seconds, counts, rates.

Plain functions of a number; the planner uses them in the reasons it writes, the text
form of a plan in its tables.
"""

from __future__ import annotations


def fmt_bytes(n: float) -> str:
    """Bytes in the largest unit that keeps a number >= 1 (decimal units).

    >>> fmt_bytes(71_234_000_000), fmt_bytes(512), fmt_bytes(3_500_000)
    ('71.2 GB', '512 B', '3.5 MB')
    """
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def fmt_time(s: float) -> str:
    """Seconds with a unit a person reads at a glance.

    >>> fmt_time(12.345), fmt_time(0.0121), fmt_time(0.0000042)
    ('12.35 s', '12.1 ms', '4.2 us')
    """
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.1f} us"


def fmt_count(n: float) -> str:
    """A count with B / M / k.

    >>> fmt_count(174_620_000_000), fmt_count(3_400_000), fmt_count(999)
    ('174.62B', '3.40M', '999')
    """
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{int(n)}"


def fmt_rate(tokens_per_s: float) -> str:
    """Tokens per second, with k / M.

    >>> fmt_rate(85_012.0), fmt_rate(1_234_567.0), fmt_rate(12.0)
    ('85.0k', '1.23M', '12')
    """
    if tokens_per_s >= 1e6:
        return f"{tokens_per_s / 1e6:.2f}M"
    if tokens_per_s >= 1e3:
        return f"{tokens_per_s / 1e3:.1f}k"
    return f"{tokens_per_s:.0f}"


def fmt_flops(rate: float) -> str:
    """A FLOP rate as a person reads it.

    >>> fmt_flops(312e12), fmt_flops(3.6e10)
    ('312 TFLOP/s', '36.0 GFLOP/s')
    """
    if rate >= 1e12:
        return f"{rate / 1e12:.0f} TFLOP/s"
    return f"{rate / 1e9:.1f} GFLOP/s"
