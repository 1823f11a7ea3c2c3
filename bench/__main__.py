"""``python -m bench``: load and economy benchmarks of the bridge against its simulators.

See bench/README.md. Quick mode (``--quick``) takes about four minutes (the 2-minute soak is most
of it), ten more with ``--p4``; the full mode (default) about 45 minutes and writes
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
BRIDGE_CORE, LOAD_CORE = "0", "1"
ECONOMY = "tests/integration/test_economy.py"
# P2 paced: 32 connections, each pausing this long after an answer: ~3,000/s offered.
PAUSE_MS = 8.0
COMMANDS: list[str] = []


def log(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


def emit(results: list[dict[str, Any]], row: dict[str, Any]) -> None:
    results.append(row)
    print(json.dumps(row), flush=True)


def verdict(value: float | None, target: float, le: bool = True) -> str:
    if value is None:
        return "n/a"
    return "pass" if (value <= target if le else value >= target) else "MISS"


# -- processes ---------------------------------------------------------------------------------


def start_sims(tmp: Path, n_codes: int) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    cmd = ["taskset", "-c", LOAD_CORE, PY, "-m", "bench.sims", "--dir", str(tmp)]
    cmd += ["--codes", str(n_codes)]
    COMMANDS.append(
        " ".join([*cmd[:4], "-m", "bench.sims", "--dir", "TMP", "--codes", str(n_codes)])
    )
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError("the simulators did not start")
    return proc, json.loads(line)


def bridge_env(info: dict[str, Any], tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        BRIDGE_DATABASE_URL=f"sqlite:///{info['database']}",
        BRIDGE_MAPPING_FILE=info["mapping_file"],
        BRIDGE_LOG_LEVEL="warning",
        BRIDGE_SHOPTET_BASE_URL=info["shoptet_url"],
        BRIDGE_SHOPTET_API_TOKEN=info["shoptet_token"],
        BRIDGE_SHOPTET_WEBHOOK_KEY=info["shoptet_key"],
        BRIDGE_SHOPTET_ESHOP_ID=str(info["shoptet_eshop_id"]),
        BRIDGE_METAKOCKA_BASE_URL=f"{info['metakocka_url']}/rest/eshop/v1",
        BRIDGE_METAKOCKA_COMPANY_ID=info["metakocka_company_id"],
        BRIDGE_METAKOCKA_SECRET_KEY=info["metakocka_secret_key"],
        BRIDGE_BITRIX24_MODE="orders",
        BRIDGE_BITRIX24_WEBHOOK_URL=info["bitrix_webhook_url"],
        BRIDGE_BITRIX24_APPLICATION_TOKEN=info["bitrix_application_token"],
        # The simulator answers at once (P3): no portal rate limit to wait for.
        BRIDGE_BITRIX24_RATE_PER_SECOND="1000",
        BRIDGE_BITRIX24_BURST="1000",
    )
    env.pop("BRIDGE_PORT", None)
    return env


def start_bridge(info: dict[str, Any], tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    bridge_bin = str(Path(PY).parent / "bridge")
    cmd = ["taskset", "-c", BRIDGE_CORE, bridge_bin, "serve", "--port", str(port)]
    COMMANDS.append(
        "BRIDGE_*=... taskset -c 0 bridge serve --port PORT  (env: bench/__main__.py bridge_env)"
    )
    log_file = open(tmp / "bridge.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        cmd, cwd=tmp, env=bridge_env(info, tmp), stdout=log_file, stderr=log_file
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/healthz")
    return proc, url


def start_baseline() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = ["taskset", "-c", BRIDGE_CORE, PY, "-m", "bench.baseline", str(port)]
    COMMANDS.append("taskset -c 0 python -m bench.baseline PORT")
    proc = subprocess.Popen(cmd, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(400):
        try:
            httpx.post(url + "/webhooks/shoptet", content=b"{}", timeout=1.0)
            break
        except httpx.HTTPError:
            time.sleep(0.05)
    return proc, url


def stop(proc: subprocess.Popen[Any]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- webhooks ----------------------------------------------------------------------------------


def webhook(info: dict[str, Any], code: str) -> tuple[bytes, str]:
    body = json.dumps(
        {
            "eshopId": info["shoptet_eshop_id"],
            "event": "order:update",
            "eventCreated": "2026-11-22T12:00:00+0100",
            "eventInstance": code,
        },
        separators=(",", ":"),
    ).encode()
    sig = hmac.new(info["shoptet_key"].encode(), body, hashlib.sha1).hexdigest()
    return body, sig


def write_bodies(info: dict[str, Any], codes: list[str], path: Path) -> None:
    with path.open("w") as f:
        for code in codes:
            body, sig = webhook(info, code)
            f.write(f"{sig}\t{body.decode()}\n")


def run_wrk(
    url: str, bodies: Path, seconds: int, conns: int = 32, pause_ms: float | None = None
) -> dict[str, Any]:
    """wrk flat out, or paced: each connection pausing ``pause_ms`` before its next request."""
    wrk = ["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency"]
    paced = [] if pause_ms is None else [f"{pause_ms:g}"]
    cmd = [*wrk, "-s", str(ROOT / "bench" / "sign.lua"), url, "--", str(bodies), *paced]
    port = url.rsplit(":", 1)[0] + ":PORT"
    shown = " ".join([*wrk, "-s", "bench/sign.lua", port, "--", "BODIES", *paced])
    if shown not in COMMANDS:
        COMMANDS.append(shown)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("WRKJSON "))
    data: dict[str, Any] = json.loads(line[len("WRKJSON ") :])
    data["rps"] = data["requests"] / (data["duration_us"] / 1e6)
    return data


# -- scenarios ---------------------------------------------------------------------------------


def p3_propagation(info: dict[str, Any], url: str, codes: list[str]) -> dict[str, Any]:
    control = httpx.Client(base_url=info["control"], timeout=10.0)
    client = httpx.Client(base_url=url, timeout=10.0)
    times: list[float] = []
    failures = 0
    for code in codes:
        marks = control.get("/writes", params={"mk": 10**9}).json()
        mk_mark = marks["mk"]
        control.post("/set_shoptet", json={"code": code, "status": 2})  # paid, no webhook sent
        body, sig = webhook(info, code)
        t0 = time.time()
        r = client.post(
            "/webhooks/shoptet",
            content=body,
            headers={"Shoptet-Webhook-Signature": sig, "Content-Type": "application/json"},
        )
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 10
        while True:
            found = control.get("/writes", params={"mk": mk_mark}).json()["writes"]
            seen = {p: at for p, c, at in found if c == code}
            if len(seen) == 2:
                times.append(max(seen.values()) - t0)
                break
            if time.monotonic() > deadline:
                failures += 1
                break
            time.sleep(0.002)
    times.sort()

    def pct(p: float) -> float:
        return times[min(len(times) - 1, int(p / 100 * len(times)))] * 1000

    return {
        "n": len(codes),
        "failures": failures,
        "p50_ms": pct(50),
        "p99_ms": pct(99),
        "max_ms": times[-1] * 1000 if times else None,
        "samples_ms": [t * 1000 for t in times],
    }


def run_pytest(node_ids: list[str], env: dict[str, str] | None = None) -> str:
    cmd = [PY, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", *node_ids]
    shown = "python -m pytest -q -s " + " ".join(n.split("::", 1)[1] for n in node_ids)
    COMMANDS.append(" ".join([*(f"{k}={v}" for k, v in (env or {}).items()), shown]))
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    if proc.returncode != 0:
        log(f"pytest exited {proc.returncode}:\n{proc.stdout[-3000:]}")
    return proc.stdout


def parse_costs(text: str, title: str) -> dict[str, dict[str, int]]:
    i = text.index(title)
    out: dict[str, dict[str, int]] = {}
    for line in text[i:].splitlines()[1:4]:
        name, rest = line.strip().split(":", 1)
        out[name] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", rest)}
    return out


def p5_economy() -> dict[str, Any]:
    out = run_pytest(
        [
            f"{ECONOMY}::test_an_idle_poll_cycle_costs_one_request_per_platform[orders]",
            f"{ECONOMY}::test_a_change_costs_a_read_of_its_source_and_a_write_per_target[shoptet-orders]",
        ]
    )
    idle = re.search(r"idle cycles \(orders\), requests per cycle: (\{.*\})", out)
    idle_cycles = json.loads(idle.group(1).replace("'", '"')) if idle else None
    m = re.search(r"(\d+) changes in shoptet \(orders\), until quiet:", out)
    n = int(m.group(1)) if m else 0
    spent = parse_costs(out, "changes in shoptet (orders), until quiet:") if m else {}
    after = parse_costs(out, "settling afterwards:") if m else {}
    res: dict[str, Any] = {
        "n": n,
        "idle_requests_per_cycle": idle_cycles,
        "until_quiet": spent,
        "settling": after,
    }
    if spent:
        res["source_reads_per_change"] = spent["shoptet"]["reads"] / n
        res["source_writes_per_change"] = spent["shoptet"]["writes"] / n
        for t in ("metakocka", "bitrix24"):
            res[f"{t}_writes_per_change"] = spent[t]["writes"] / n
            res[f"{t}_reads_per_change"] = spent[t]["reads"] / n
            res[f"{t}_requests_per_change"] = spent[t]["requests"] / n
        res["echo_writes"] = sum(c["writes"] for c in after.values()) + spent["shoptet"]["writes"]
    return res


SHOPTET_BACKLOG = 5000


def p4_backlog(shoptet_backlog: int = SHOPTET_BACKLOG) -> dict[str, Any]:
    """Both halves of P4 from one pytest run: the Bitrix24 test (5,000 writes, 2 req/s, burst
    50) and the Shoptet one (``shoptet_backlog`` writes, bucket of 200 draining 10/s)."""
    out = run_pytest(
        [
            f"{ECONOMY}::test_5000_pending_writes_leave_for_bitrix24_in_full_batches",
            f"{ECONOMY}::test_pending_writes_leave_for_shoptet_at_the_bucket_rate",
        ],
        env={"BRIDGE_BENCH_SHOPTET_BACKLOG": str(shoptet_backlog)},
    )
    series = {
        m.group(1): json.loads(m.group(2))
        for m in re.finditer(r"^drain series (\w+): (\[.*\])$", out, re.MULTILINE)
    }
    res: dict[str, Any] = {
        "bitrix24": _p4_bitrix24(out),
        "shoptet": _p4_shoptet(out),
        "series": series,
    }
    for target in ("bitrix24", "shoptet"):
        if "error" not in res[target] and target not in series:
            res[target]["error"] = "the economy test printed no drain series"
    return res


def _p4_bitrix24(out: str) -> dict[str, Any]:
    m = re.search(
        r"(\d+) pending writes into Bitrix24 .*?: (\d+) calls \((\d+) batch writes, (\d+) reads, "
        r"(\d+) poll, (\d+) refused; least (\d+)\); drained in ([\d.]+) s",
        out,
    )
    if not m:
        return {"error": "could not parse the Bitrix24 backlog test's output", "tail": out[-500:]}
    backlog, calls, batches, reads, _polls, refused, least, took = m.groups()
    calls_i, least_i = int(calls), int(least)
    min_time = least_i / 2.0  # the portal's bucket is full at the start: every call at 2/s
    return {
        "backlog": int(backlog),
        "calls": calls_i,
        "least_calls": least_i,
        "batch_writes": int(batches),
        "read_calls": int(reads),
        "refused": int(refused),
        "seconds": float(took),
        "min_seconds": min_time,
        "calls_ratio": calls_i / least_i,
        "time_ratio": float(took) / min_time,
        # The least drain: 50 writes a call and 50 echoes read a call, 2 calls a second from the
        # start (bucket full).
        "least_curve": [[0.0, int(backlog)], [min_time, 0]],
    }


def _p4_shoptet(out: str) -> dict[str, Any]:
    m = re.search(
        r"(\d+) pending writes into Shoptet \(bucket (\d+), ([\d.]+)/s\): (\d+) calls "
        r"\((\d+) writes, (\d+) reads, (\d+) poll, (\d+) other, (\d+) refused; least (\d+)\); "
        r"drained in ([\d.]+) s vs theoretical minimum ([\d.]+) s",
        out,
    )
    if not m:
        return {"error": "could not parse the Shoptet backlog test's output", "tail": out[-500:]}
    backlog, bucket, drain, calls, writes, reads, polls, other, refused, least, took, least_s = (
        m.groups()
    )
    n, size, rate = int(backlog), int(bucket), float(drain)
    calls_i, least_i, min_time = int(calls), int(least), float(least_s)
    first = min(n, size)  # the empty bucket takes this many at once, the rest leave at `rate`/s
    return {
        "backlog": n,
        "bucket": size,
        "drain_per_second": rate,
        "calls": calls_i,
        "least_calls": least_i,
        "write_calls": int(writes),
        "read_calls": int(reads),
        "poll_calls": int(polls),
        "other_calls": int(other),
        "refused": int(refused),
        "seconds": float(took),
        "min_seconds": min_time,
        "calls_ratio": calls_i / least_i,
        "time_ratio": float(took) / min_time if min_time > 0 else None,
        "least_curve": [[0.0, n], [0.0, n - first], [min_time, 0]],
    }


def profile(pid: int, url: str, bodies: Path, seconds: int, prefix: Path) -> dict[str, Any]:
    """py-spy (pinned to core 1) samples the bridge during one more P1 run."""
    import collections
    import threading

    spy = str(Path(PY).parent / "py-spy")
    raw = prefix.with_suffix(".txt")
    cmd = [
        "taskset",
        "-c",
        LOAD_CORE,
        spy,
        "record",
        "-p",
        str(pid),
        "-r",
        "200",
        "-d",
        str(seconds),
        "-f",
        "raw",
        "-o",
        str(raw),
        "--nonblocking",
    ]
    COMMANDS.append("taskset -c 1 py-spy record -p BRIDGE_PID -r 200 -d 10 -f raw --nonblocking")
    result: dict[str, Any] = {}

    def spy_run() -> None:
        subprocess.run(cmd, capture_output=True, text=True)

    th = threading.Thread(target=spy_run)
    th.start()
    result["rps_while_profiled"] = round(run_wrk(url, bodies, seconds)["rps"])
    th.join()
    self_t: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        count = int(n)
        frames = stack.split(";")
        total += count
        self_t[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    result["samples"] = total
    result["top_self"] = [[f, round(100 * c / total, 1)] for f, c in self_t.most_common(15)]
    result["top_inclusive"] = [[f, round(100 * c / total, 1)] for f, c in incl.most_common(40)]
    result["raw"] = str(raw)
    return result


# -- report ------------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    free = subprocess.run(["free", "-h"], capture_output=True, text=True).stdout.strip()
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    return {
        "nproc": nproc,
        "free": free,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "wrk": (wrk.stdout + wrk.stderr).splitlines()[0],
    }


def table(rows: list[tuple[str, str, str, str, str]]) -> str:
    head = "| figure | measured | target | ratio / baseline | result |\n|---|---|---|---|---|\n"
    return head + "\n".join(f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in rows)


def rows_of(res: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    rows = []
    paced = res.get("p2_paced")
    if "p1" in res:
        p1, base = res["p1"], res["p1_baseline"]
        ratio = p1["rps"] / base["rps"]
        rows.append(
            (
                "P1 ingest, signed webhooks stored /s (wrk -t1 -c32)",
                f"{p1['rps']:,.0f}/s",
                "≥ 3,000/s",
                f"{ratio:.2f}x of bare Starlette {base['rps']:,.0f}/s",
                verdict(p1["rps"], 3000, le=False),
            )
        )
        rows.append(
            (
                "P1 non-2xx / socket errors",
                f"{p1['non2xx']} / "
                f"{p1['connect_err'] + p1['read_err'] + p1['write_err'] + p1['timeout_err']}",
                "0",
                "",
                verdict(p1["non2xx"], 0),
            )
        )
        for q in ("p50", "p99"):
            v, b = p1[f"{q}_us"] / 1000, base[f"{q}_us"] / 1000
            tgt = "≤ 10 ms" if q == "p99" else "—"
            rows.append(
                (
                    f"P2 ack latency {q} at 32 conns",
                    f"{v:.2f} ms",
                    tgt,
                    f"{v / b:.2f}x of baseline {b:.2f} ms",
                    verdict(v, 10) if q == "p99" else "—",
                )
            )
    if paced:
        for q in ("p50", "p99"):
            rows.append(
                (
                    f"P2 ack latency {q} at 32 conns, paced ({PAUSE_MS:g} ms mean random pause; "
                    f"{paced['rps']:,.0f}/s)",
                    f"{paced[f'{q}_us'] / 1000:.2f} ms",
                    "≤ 10 ms" if q == "p99" else "—",
                    "",
                    verdict(paced[f"{q}_us"] / 1000, 10) if q == "p99" else "—",
                )
            )
    if "p3" in res:
        p3 = res["p3"]
        rows.append(
            (
                f"P3 propagation p50 (webhook → last target write, n={p3['n']})",
                f"{p3['p50_ms']:.1f} ms",
                "≤ 50 ms",
                "",
                verdict(p3["p50_ms"], 50),
            )
        )
        rows.append(("P3 propagation p99", f"{p3['p99_ms']:.1f} ms", "—", "", "—"))
        rows.append(
            (
                "P3 changes not propagated within 10 s",
                str(p3["failures"]),
                "0",
                "",
                verdict(p3["failures"], 0),
            )
        )
    if "p5" in res and res["p5"].get("n"):
        p5 = res["p5"]
        rows.append(
            (
                "P5 source (Shoptet) reads per change",
                f"{p5['source_reads_per_change']:.2f}",
                "≤ 1",
                "",
                verdict(p5["source_reads_per_change"], 1),
            )
        )
        for t in ("metakocka", "bitrix24"):
            rows.append(
                (
                    f"P5 {t}: reads / writes / requests per change",
                    f"{p5[f'{t}_reads_per_change']:.2f} / {p5[f'{t}_writes_per_change']:.2f}"
                    f" / {p5[f'{t}_requests_per_change']:.2f}",
                    "≤ 1 read + 1 write",
                    "",
                    verdict(p5[f"{t}_reads_per_change"] + p5[f"{t}_writes_per_change"], 2),
                )
            )
        rows.append(
            (
                "P5 writes caused by echoes (source + settling)",
                str(p5["echo_writes"]),
                "0",
                "",
                verdict(p5["echo_writes"], 0),
            )
        )
        idle = p5["idle_requests_per_cycle"] or {}
        worst = max((max(v) for v in idle.values()), default=None)
        rows.append(
            (
                "P5 idle poll cycle, requests per platform",
                json.dumps(idle),
                "1",
                "",
                verdict(worst, 1),
            )
        )
    if "p6" in res:
        p6 = res["p6"]
        rows.append(("P6 RSS idle", f"{p6['idle_mb']:.1f} MB", "—", "", "—"))
        rows.append(
            (
                "P6 RSS under P1 load (max)",
                f"{p6['load_mb']:.1f} MB",
                "≤ 90 MB",
                f"{p6['load_mb'] / p6['idle_mb']:.2f}x of idle",
                verdict(p6["load_mb"], 90),
            )
        )
        rows.append(
            (
                f"P6 RSS growth across the soak ({p6['soak_minutes']:.0f} min, idle points)",
                f"{p6['growth_mb']:+.1f} MB ({p6['first_idle_mb']:.1f} → {p6['last_idle_mb']:.1f})",
                "no growth (≤ +5 MB)",
                "",
                verdict(p6["growth_mb"], 5),
            )
        )
    p4 = res.get("p4") or {}
    b24 = p4.get("bitrix24") or {}
    if "calls" in b24:
        rows.append(
            (
                f"P4 Bitrix24 backlog {b24['backlog']}: calls",
                str(b24["calls"]),
                "≤ 1.1x least",
                f"{b24['calls_ratio']:.2f}x of {b24['least_calls']}",
                verdict(b24["calls_ratio"], 1.1),
            )
        )
        rows.append(
            (
                "P4 Bitrix24 backlog: drain time",
                f"{b24['seconds']:.1f} s",
                "≤ 1.1x least",
                f"{b24['time_ratio']:.2f}x of {b24['min_seconds']:.0f} s",
                verdict(b24["time_ratio"], 1.1),
            )
        )
        rows.append(
            (
                "P4 Bitrix24 refusals",
                str(b24["refused"]),
                "≤ 1 (the first)",
                "",
                verdict(b24["refused"], 1),
            )
        )
    shop = p4.get("shoptet") or {}
    if "calls" in shop:
        rows.append(
            (
                f"P4 Shoptet backlog {shop['backlog']}: calls (writes / reads / polls / other)",
                f"{shop['calls']} ({shop['write_calls']} / {shop['read_calls']} / "
                f"{shop['poll_calls']} / {shop['other_calls']})",
                "≤ 1.1x least",
                f"{shop['calls_ratio']:.2f}x of {shop['least_calls']} (N writes + N/50 reads)",
                verdict(shop["calls_ratio"], 1.1),
            )
        )
        least_s = shop["min_seconds"]
        rows.append(
            (
                "P4 Shoptet backlog: drain time",
                f"{shop['seconds']:.1f} s",
                "≤ 1.1x least",
                (
                    f"{shop['time_ratio']:.2f}x of {least_s:.0f} s"
                    if shop["time_ratio"] is not None
                    else f"least {least_s:.0f} s"
                )
                + f" ((N + N/50 - {shop['bucket']}) / {shop['drain_per_second']:g})",
                verdict(shop["time_ratio"], 1.1),
            )
        )
        rows.append(
            (
                "P4 Shoptet refusals (429)",
                str(shop["refused"]),
                "≤ 1 (the first)",
                "",
                verdict(shop["refused"], 1),
            )
        )
    return rows


def plots(res: dict[str, Any], folder: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is missing (pip install -e '.[bench]'): no plots")
        return []
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    if "p1" in res:
        fig, ax = plt.subplots(figsize=(7, 4))
        runs = [("p1_baseline", "bare Starlette, flat out"), ("p1", "bridge, flat out")]
        if "p2_paced" in res:
            runs.append(("p2_paced", f"bridge, paced ({res['p2_paced']['rps']:,.0f}/s)"))
        for key, label in runs:
            qs = [q / 1000 for q in res[key]["quantiles_us"]]
            ax.hist(qs, bins=40, alpha=0.6, label=label)  # each quantile = 0.5 % of requests
        ax.set_xlabel("acknowledgement latency (ms), 32 connections")
        ax.set_ylabel("share of requests (0.5 % per count)")
        ax.set_title("P2: webhook acknowledgement latency")
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / "latency-histogram.png", dpi=100)
        made.append("latency-histogram.png")
    if "p3" in res:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.hist(res["p3"]["samples_ms"], bins=40)
        ax.set_xlabel("webhook → last target write (ms)")
        ax.set_title("P3: propagation time")
        fig.tight_layout()
        fig.savefig(folder / "propagation-histogram.png", dpi=100)
        made.append("propagation-histogram.png")
    if "p6" in res:
        fig, ax = plt.subplots(figsize=(7, 4))
        t, r = zip(*res["p6"]["samples"], strict=True)
        ax.plot([x / 60 for x in t], r)
        ax.set_xlabel("soak time (min)")
        ax.set_ylabel("bridge RSS (MB)")
        ax.set_title("P6: memory across the soak")
        fig.tight_layout()
        fig.savefig(folder / "rss-soak.png", dpi=100)
        made.append("rss-soak.png")
    p4 = res.get("p4") or {}
    drained = [p for p in ("bitrix24", "shoptet") if p in (p4.get("series") or {})]
    if drained:
        fig, ax = plt.subplots(figsize=(7, 4))
        names = {
            "bitrix24": "Bitrix24 (2 req/s, burst 50)",
            "shoptet": "Shoptet (bucket 200, 10/s)",
        }
        styles = {"bitrix24": ("tab:blue", "--"), "shoptet": ("tab:orange", ":")}
        for target in drained:
            colour, dashes = styles[target]
            t, pending = zip(*p4["series"][target], strict=True)
            ax.plot(t, pending, color=colour, lw=4, alpha=0.5, label=f"{names[target]}, measured")
            least = (p4.get(target) or {}).get("least_curve")
            if least:
                lt, lp = zip(*least, strict=True)
                ax.plot(lt, lp, color="black", lw=1, ls=dashes, label="its theoretical minimum")
        ax.set_xlabel("seconds since the bridge started")
        ax.set_ylabel("writes pending")
        ax.set_title("P4: backlog drained over time")
        ax.set_ylim(bottom=0)
        ax.set_xlim(left=0)
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / "backlog-drain.png", dpi=100)
        made.append("backlog-drain.png")
    return made


def write_docs(res: dict[str, Any], mode: str, mach: dict[str, str], pngs: list[str]) -> None:
    from bench.report import render

    path = ROOT / "docs" / "benchmarks.md"
    path.write_text(render(res, mode, mach, pngs, COMMANDS, table(rows_of(res))), "utf-8")
    log(f"wrote {path}")


# -- main --------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="short run (~4 min, 2-min soak)")
    ap.add_argument("--p4", action="store_true", help="also run P4 in quick mode (~10 min)")
    ap.add_argument("--no-p4", action="store_true", help="skip P4 in full mode")
    ap.add_argument(
        "--shoptet-backlog",
        type=int,
        default=SHOPTET_BACKLOG,
        metavar="N",
        help=f"writes owed to Shoptet in P4 (default {SHOPTET_BACKLOG}: about 8 min; "
        "(N + N/50 - 200) / 10 s at least)",
    )
    ap.add_argument("--soak-minutes", type=float, default=None)
    ap.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="also profile the bridge with py-spy during an extra P1 run (prefix)",
    )
    ap.add_argument(
        "--write-docs",
        action="store_true",
        help="write docs/benchmarks.md and the PNGs in quick mode too",
    )
    args = ap.parse_args()
    if shutil.which("wrk") is None or shutil.which("taskset") is None:
        sys.exit("wrk and taskset are needed")
    quick = args.quick
    seconds = 10 if quick else 30
    soak_min = args.soak_minutes if args.soak_minutes is not None else (2.0 if quick else 30.0)
    n_p3 = 100
    n_p1 = 300
    res: dict[str, Any] = {}
    results: list[dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="bridge-bench-"))
    codes_needed = n_p1 + n_p3
    sims, info = start_sims(tmp, codes_needed)
    p1_codes, p3_codes = info["codes"][:n_p1], info["codes"][n_p1:]
    bodies = tmp / "bodies.tsv"
    write_bodies(info, p1_codes, bodies)
    bridge = None
    try:
        # P1 baseline first, with nothing else running on core 0.
        log(f"P1 baseline: bare Starlette, wrk {seconds} s")
        base_proc, base_url = start_baseline()
        try:
            res["p1_baseline"] = run_wrk(base_url, bodies, seconds)
        finally:
            stop(base_proc)
        bridge, url = start_bridge(info, tmp)
        httpx.post(info["control"] + "/register_bitrix", json={"url": url + "/webhooks/bitrix24"})
        time.sleep(3)  # start-up poll cycles
        idle_mb = rss_mb(bridge.pid)
        log(f"P3: {n_p3} sequential changes")
        res["p3"] = p3_propagation(info, url, p3_codes)
        emit(
            results,
            {
                "scenario": "P3 propagation",
                **{k: v for k, v in res["p3"].items() if k != "samples_ms"},
            },
        )
        log(f"P1/P2: bridge, wrk {seconds} s")
        peak = [0.0]
        import threading

        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.5):
                peak[0] = max(peak[0], rss_mb(bridge.pid))

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        res["p1"] = run_wrk(url, bodies, seconds)
        done.set()
        th.join()
        base = res["p1_baseline"]
        emit(
            results,
            {
                "scenario": "P1 ingest",
                "rps": round(res["p1"]["rps"]),
                "baseline_rps": round(base["rps"]),
                "ratio": round(res["p1"]["rps"] / base["rps"], 3),
                "non2xx": res["p1"]["non2xx"],
            },
        )
        emit(
            results,
            {
                "scenario": "P2 ack latency",
                "p50_ms": res["p1"]["p50_us"] / 1000,
                "p99_ms": res["p1"]["p99_us"] / 1000,
                "baseline_p50_ms": base["p50_us"] / 1000,
                "baseline_p99_ms": base["p99_us"] / 1000,
            },
        )
        # P2 below saturation: each connection pauses between requests (about 3,000/s offered).
        log(f"P2 paced: wrk {seconds} s, {PAUSE_MS} ms pause per connection")
        res["p2_paced"] = run_wrk(url, bodies, seconds, pause_ms=PAUSE_MS)
        emit(
            results,
            {
                "scenario": "P2 ack latency, paced",
                "pause_ms": PAUSE_MS,
                "rps": round(res["p2_paced"]["rps"]),
                "p50_ms": res["p2_paced"]["p50_us"] / 1000,
                "p99_ms": res["p2_paced"]["p99_us"] / 1000,
                "non2xx": res["p2_paced"]["non2xx"],
            },
        )
        if args.profile is not None:
            res["profile"] = profile(bridge.pid, url, bodies, seconds, args.profile)
            emit(results, {"scenario": "profile (py-spy, P1 load)", **res["profile"]})
        # P6: soak = cycles of 10 s of P1 load and 20 s of rest; RSS at the end of each rest.
        log(f"P6: soak {soak_min} min")
        samples: list[tuple[float, float]] = []
        idle_points: list[float] = []
        t_start = time.monotonic()
        load_peak = peak[0]
        while not idle_points or time.monotonic() - t_start < soak_min * 60:
            done.clear()
            th = threading.Thread(target=sample, daemon=True)
            th.start()
            run_wrk(url, bodies, 10)
            done.set()
            th.join()
            load_peak = max(load_peak, peak[0])
            samples.append((time.monotonic() - t_start, rss_mb(bridge.pid)))
            for _ in range(4):
                time.sleep(5)
                samples.append((time.monotonic() - t_start, rss_mb(bridge.pid)))
            idle_points.append(samples[-1][1])
        res["p6"] = {
            "idle_mb": idle_mb,
            "load_mb": load_peak,
            "soak_minutes": soak_min,
            "first_idle_mb": idle_points[0],
            "last_idle_mb": idle_points[-1],
            "growth_mb": idle_points[-1] - idle_points[0],
            "cycles": len(idle_points),
            "samples": samples,
            "after_mb": rss_mb(bridge.pid),
        }
        emit(
            results,
            {"scenario": "P6 memory", **{k: v for k, v in res["p6"].items() if k != "samples"}},
        )
    finally:
        if bridge is not None:
            stop(bridge)
        assert sims.stdin is not None
        sims.stdin.close()
        try:
            sims.wait(10)
        except subprocess.TimeoutExpired:
            sims.kill()
    log("P5: API economy (tests/integration/test_economy.py)")
    res["p5"] = p5_economy()
    emit(results, {"scenario": "P5 API economy", **res["p5"]})
    if (not quick and not args.no_p4) or args.p4:
        n = args.shoptet_backlog
        log(
            f"P4: 5,000 writes into Bitrix24 (~55 s), {n:,} into Shoptet "
            f"(~{max(0, n - 200) / 10 + 15:.0f} s) (tests/integration/test_economy.py)"
        )
        res["p4"] = p4_backlog(n)
        for target, name in (("bitrix24", "Bitrix24"), ("shoptet", "Shoptet")):
            row = {k: v for k, v in res["p4"][target].items() if k != "least_curve"}
            emit(results, {"scenario": f"P4 backlog ({name})", **row})
    print()
    print(table(rows_of(res)))
    (tmp / "results.json").write_text(json.dumps(res))
    log(f"raw results: {tmp / 'results.json'}")
    if not quick or args.write_docs:
        mach = machine()
        pngs = plots(res, ROOT / "docs" / "benchmarks")
        write_docs(res, "quick" if quick else "full", mach, pngs)


if __name__ == "__main__":
    main()
