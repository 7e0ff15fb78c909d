"""Log and table haystack: application logs, web access logs and metric table rows with rising timestamps.

Line `i` of seed `s` is a pure function of (s, i): the format holds for a block of `BLOCK` lines, the
timestamp is a seed-dependent start plus `STEP_S` seconds per line plus jitter below one step, so
timestamps never go backwards. No I/O; time is formatted from integers, never from the local clock.
"""

from __future__ import annotations

from datetime import datetime, timezone

from dam_cli.evaluation.suite.rng import Rng

BLOCK = 24  # lines per format block
STEP_S = 5
_FORMATS = ("app", "access", "table")
_LEVELS = ("INFO",) * 6 + ("DEBUG",) * 3 + ("WARN",) * 2 + ("ERROR",)
_SERVICES = "billing checkout search auth mailer scheduler inventory gateway reports uploads".split()
_HOSTS = "web db cache queue auth edge batch search proxy store".split()
_NOUNS = "order invoice user session batch ticket report parcel shipment voucher".split()
_PATHS = "orders invoices users sessions carts tickets reports parcels search health".split()
_METRICS = "cpu_util mem_used_gb disk_io_ms net_rx_mbps p99_latency_ms open_conns gc_pause_ms queue_depth".split()
_MOUNTS = ("/", "/var", "/data", "/srv/cache", "/home")
_METHODS = ("GET",) * 5 + ("POST",) * 2 + ("PUT", "DELETE", "PATCH")
_MONTHS = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()  # not %b: that one follows the locale
_STATUS = (200,) * 10 + (201, 204, 301, 304, 400, 401, 403, 404, 404, 429, 500, 502, 503)


def _ip(r: Rng) -> str:
    return f"10.{r.below(256)}.{r.below(256)}.{r.randint(1, 254)}"


def _message(r: Rng) -> str:
    noun, n = r.choice(_NOUNS), r.randint(1000, 999999)
    pick = r.below(9)
    if pick == 0:
        return f"request {n} for /{r.choice(_PATHS)} finished in {r.randint(1, 2400)} ms"
    if pick == 1:
        b = r.randint(3, 8)
        return f"retrying {noun} {n} after {r.randint(50, 5000)} ms (attempt {r.randint(1, b - 1)}/{b})"
    if pick == 2:
        return f"cache miss for key {noun}:{n}"
    if pick == 3:
        return f"worker {r.randint(1, 32)} picked up batch {n} with {r.randint(1, 900)} items"
    if pick == 4:
        return f"connection to {r.choice(_HOSTS)}-{r.randint(1, 40):02d}:{r.randint(1024, 65000)} closed by peer"
    if pick == 5:
        return f"disk usage on {r.choice(_MOUNTS)} at {r.randint(40, 99)}%"
    if pick == 6:
        return f"user u{n} signed in from {_ip(r)}"
    if pick == 7:
        return f"scheduled job sync_{noun}s took {r.randint(0, 59)}.{r.randint(0, 999):03d} s"
    return f"queue {noun}s depth {r.randint(100, 9000)} exceeds soft limit {r.randint(50, 99) * 10}"


def log_format(seed: int, index: int) -> str:
    """The format of the block that holds line `index`: app, access or table."""
    return Rng.keyed("logs-format", seed, index // BLOCK).choice(_FORMATS)


def log_line(seed: int, index: int) -> str:
    """Line `index` of the log haystack of `seed`."""
    r = Rng.keyed("logs", seed, index)
    start = 1_600_000_000 + Rng.keyed("logs-start", seed).below(150_000_000)
    t = datetime.fromtimestamp(start + STEP_S * index + r.below(STEP_S), tz=timezone.utc)
    fmt = log_format(seed, index)
    if fmt == "app":
        return (f"{t:%Y-%m-%d %H:%M:%S}.{r.below(1000):03d} {r.choice(_LEVELS):<5} "
                f"[{r.choice(_SERVICES)}-{r.randint(1, 12)}] {_message(r)}")
    if fmt == "access":
        stamp = f"{t:%d}/{_MONTHS[t.month - 1]}/{t:%Y:%H:%M:%S} +0000"
        return (f'{_ip(r)} - - [{stamp}] "{r.choice(_METHODS)} /api/v{r.randint(1, 3)}/'
                f'{r.choice(_PATHS)}/{r.randint(1, 99999)} HTTP/1.1" {r.choice(_STATUS)} {r.randint(0, 90000)} '
                f"{r.randint(0, 2)}.{r.randint(1, 999):03d}")
    metric = r.choice(_METRICS)
    value = f"{r.randint(0, 99)}.{r.below(10)}" if r.below(2) else str(r.randint(0, 5000))
    return (f"| {t:%Y-%m-%d %H:%M:%S} | {r.choice(_HOSTS)}-{r.randint(1, 40):02d} | {metric} | {value} | "
            f"{r.choice(('ok', 'ok', 'ok', 'warn', 'crit'))} |")
