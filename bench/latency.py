#!/usr/bin/python3
"""
bench/latency.py -- commit-to-X latency of single conversions (issue 5, item 2).

    /usr/bin/python3 bench/latency.py --dsn DSN --mock-dir DIR --mock-url URL
        [--samples 200] [--scenarios direct,trickle,idle] [--idle-interval 1.5]
        [--trickle-rate 5] [--pixel o8z6j] [--event o8z2x]
        [--consumer-key ... --consumer-secret ... --token ... --token-secret ...]

Scenarios (each sample is one conversion with a unique conversion_id):
  idle     one commit every --idle-interval seconds (default 1.5)
  trickle  --trickle-rate commits per second (default 5)
  direct   baseline: this script POSTs one signed conversion itself to the
           mock over a kept-alive HTTPS connection, at the trickle rate;
           latency = the mock's "t" minus the time just before the send.  It
           is the floor that the mock and the loopback TLS path put under
           any client.
For idle and trickle, each sample is
    SELECT xcapi_fire(pixel, event, conversion_id => ..., email => ...); COMMIT
over psycopg2 (autocommit off), with time.time() taken right after COMMIT
returns; the latency is the mock's "t" for the request that carried that
conversion_id (DIR/requests.jsonl, first arrival) minus that time.

The mock (t/mock_x.py) takes "t" = time.time() at the start of do_POST:
after the request line and headers were read, BEFORE the body is read and
BEFORE the OAuth signature is verified; "t_done" is after the answer.
So the latency below is commit -> request headers at the mock.

One warm-up conversion per scenario is sent first and not counted (the
first request may open a TLS connection).  Prints a table and one JSON line.
"""

import argparse
import hashlib
import http.client
import json
import os
import ssl
import sys
import time
import uuid

import psycopg2
from oauthlib.oauth1 import Client


def pct(sorted_vals, p):
    """Nearest-rank percentile of a sorted list."""
    if not sorted_vals:
        return float("nan")
    k = max(1, -(-len(sorted_vals) * p // 100))  # ceil
    return sorted_vals[int(k) - 1]


class Arrivals:
    """Reads DIR/requests.jsonl incrementally: conversion_id -> first t."""

    def __init__(self, path):
        self.path = path
        self.offset = 0
        self.first = {}
        self.proc = {}      # conversion_id -> t_done - t of its request
        self.status = {}

    def poll(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n")
        if end < 0:
            return
        self.offset += end + 1
        for line in data[:end].splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            for cid in rec.get("conversion_ids") or []:
                if cid not in self.first:
                    self.first[cid] = rec["t"]
                    self.status[cid] = rec.get("status")
                    if rec.get("t_done"):
                        self.proc[cid] = rec["t_done"] - rec["t"]


def wait_for(arrivals, cids, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        arrivals.poll()
        if all(c in arrivals.first for c in cids):
            return True
        time.sleep(0.05)
    arrivals.poll()
    return all(c in arrivals.first for c in cids)


def paced_samples(args, arrivals, one, name, interval, run_id):
    """One warm-up, then args.samples calls of one(cid), one every interval
    seconds; one returns the time its conversion left (commit or request).
    Returns ({cid: that time}, the warm-up's latency in ms or None)."""
    warm = "lat-%s-%s-warmup" % (run_id, name)
    tw = one(warm)
    wait_for(arrivals, [warm], 30)
    warm_ms = (arrivals.first[warm] - tw) * 1000 if warm in arrivals.first else None
    time.sleep(interval)

    commits = {}
    start = time.time()
    for i in range(args.samples):
        due = start + i * interval
        delay = due - time.time()
        if delay > 0:
            time.sleep(delay)
        cid = "lat-%s-%s-%05d" % (run_id, name, i)
        commits[cid] = one(cid)
        arrivals.poll()
        if args.progress and (i + 1) % 50 == 0:
            sys.stderr.write("    %s: %d/%d\n" % (name, i + 1, args.samples))
    wait_for(arrivals, list(commits), 30)
    return commits, warm_ms


def run_xcapi(args, arrivals, name, interval, run_id):
    conn = psycopg2.connect(args.dsn)
    conn.autocommit = False
    cur = conn.cursor()
    sql = ("SELECT xcapi_fire(%s, %s, conversion_id => %s, email => %s)")

    def one(cid):
        cur.execute(sql, (args.pixel, args.event, cid, "%s@example.com" % cid))
        cur.fetchone()
        conn.commit()
        return time.time()

    try:
        return paced_samples(args, arrivals, one, name, interval, run_id)
    finally:
        conn.close()


def run_direct(args, arrivals, interval, run_id):
    u = args.mock_url.rstrip("/")
    host_port = u.split("://", 1)[1]
    host, port = host_port.rsplit(":", 1)
    path = "/%s/measurement/conversions/%s" % (args.api_version, args.pixel)
    url = "https://%s:%s%s" % (host, port, path)
    ctx = ssl.create_default_context(cafile=args.ca_file)
    conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=30)
    client = Client(args.consumer_key, client_secret=args.consumer_secret,
                    resource_owner_key=args.token,
                    resource_owner_secret=args.token_secret)

    def one(cid):
        conv = {"conversion_time": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
                "event_id": args.event, "conversion_id": cid,
                "identifiers": [{"hashed_email": hashlib.sha256(
                    ("%s@example.com" % cid).encode()).hexdigest()}]}
        body = json.dumps({"conversions": [conv]})
        _, headers, _ = client.sign(url, http_method="POST",
                                    headers={"Content-Type": "application/json"})
        t = time.time()
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            sys.stderr.write("direct: HTTP %d for %s\n" % (resp.status, cid))
        return t

    try:
        return paced_samples(args, arrivals, one, "direct", interval, run_id)
    finally:
        conn.close()


def summarize(name, commits, arrivals, warm_ms):
    lat = sorted((arrivals.first[c] - t) * 1000 for c, t in commits.items()
                 if c in arrivals.first)
    proc = sorted(arrivals.proc[c] * 1000 for c in commits if c in arrivals.proc)
    bad = sum(1 for c in commits if c in arrivals.status and arrivals.status[c] != 200)
    return {"scenario": name, "samples": len(commits), "arrived": len(lat),
            "non_200": bad,
            "p50": pct(lat, 50), "p90": pct(lat, 90), "p99": pct(lat, 99),
            "max": lat[-1] if lat else float("nan"),
            "min": lat[0] if lat else float("nan"),
            "mean": sum(lat) / len(lat) if lat else float("nan"),
            "mock_proc_p50": pct(proc, 50), "warmup_ms": warm_ms}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--dsn", required=True)
    ap.add_argument("--mock-dir", required=True)
    ap.add_argument("--mock-url", required=True)
    ap.add_argument("--ca-file")
    ap.add_argument("--api-version", default="12")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--scenarios", default="direct,trickle,idle")
    ap.add_argument("--idle-interval", type=float, default=1.5)
    ap.add_argument("--trickle-rate", type=float, default=5.0)
    ap.add_argument("--pixel", default="o8z6j")
    ap.add_argument("--event", default="o8z2x")
    ap.add_argument("--consumer-key")
    ap.add_argument("--consumer-secret")
    ap.add_argument("--token")
    ap.add_argument("--token-secret")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    if args.ca_file is None:
        args.ca_file = os.path.join(args.mock_dir, "cert.pem")

    arrivals = Arrivals(os.path.join(args.mock_dir, "requests.jsonl"))
    run_id = uuid.uuid4().hex[:8]
    results = []
    for name in [s.strip() for s in args.scenarios.split(",") if s.strip()]:
        t0 = time.time()
        if name == "idle":
            commits, warm = run_xcapi(args, arrivals, name, args.idle_interval, run_id)
            label = "idle (1 commit / %.1f s)" % args.idle_interval
        elif name == "trickle":
            commits, warm = run_xcapi(args, arrivals, name, 1.0 / args.trickle_rate, run_id)
            label = "trickle (%g commits/s)" % args.trickle_rate
        elif name == "direct":
            commits, warm = run_direct(args, arrivals, 1.0 / args.trickle_rate, run_id)
            label = "baseline: direct POST (%g/s)" % args.trickle_rate
        else:
            raise SystemExit("unknown scenario %r" % name)
        r = summarize(name, commits, arrivals, warm)
        r["label"] = label
        r["seconds"] = round(time.time() - t0, 1)
        results.append(r)
        sys.stderr.write("    %s: done in %.0f s, p50 %.2f ms\n" % (name, r["seconds"], r["p50"]))

    base = next((r for r in results if r["scenario"] == "direct"), None)
    print("%-32s %7s %7s %8s %8s %8s %8s %8s %10s %10s %11s" % (
        "scenario", "samples", "arrived", "p50 ms", "p90 ms", "p99 ms", "max ms",
        "min ms", "p50/base", "p99/base", "warm-up ms"))
    for r in results:
        rb50 = "%.1fx" % (r["p50"] / base["p50"]) if base and base["p50"] > 0 else "n/a"
        rb99 = "%.1fx" % (r["p99"] / base["p99"]) if base and base["p99"] > 0 else "n/a"
        print("%-32s %7d %7d %8.2f %8.2f %8.2f %8.2f %8.2f %10s %10s %11s" % (
            r["label"], r["samples"], r["arrived"], r["p50"], r["p90"], r["p99"],
            r["max"], r["min"], rb50, rb99,
            "%.1f" % r["warmup_ms"] if r["warmup_ms"] is not None else "-"))
    for r in results:
        if r["arrived"] < r["samples"] or r["non_200"]:
            print("  %s: %d of %d never arrived, %d answered non-200"
                  % (r["scenario"], r["samples"] - r["arrived"], r["samples"], r["non_200"]))
    print("  latency = mock's t (request headers read; before body read and OAuth check) "
          "- time.time() after COMMIT returned (direct: before the send)")
    print("  a negative latency is possible: the worker is woken at commit inside the server and can reach"
          " the mock before COMMIT's reply has reached this client")
    print("  mock's own time per request (t_done - t), median: %s" % ", ".join(
        "%s %.2f ms" % (r["scenario"], r["mock_proc_p50"]) for r in results))
    print("  targets: p50 <= 5 ms, p99 <= 25 ms (idle and trickle)")
    print("JSON " + json.dumps(results))


if __name__ == "__main__":
    main()
