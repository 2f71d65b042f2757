#!/usr/bin/python3
"""
bench/rss_during.py -- run one SQL statement and sample its backend's memory.

    /usr/bin/python3 bench/rss_during.py --dsn DSN --label LABEL [--interval 0.2] SQL

Connects with psycopg2, reads pg_backend_pid(), then samples
/proc/PID/status (VmRSS, RssAnon, RssShmem) every --interval seconds in a
thread while the statement runs in its own transaction (committed).
Prints one line of JSON: label, seconds, samples, and start / peak / end
of each field in kB (start: just before the statement; end: after commit).
RssAnon is the backend's private memory (palloc'd contexts, malloc);
RssShmem grows as the backend touches shared_buffers pages and is not
memory the backend owns.
"""

import argparse
import json
import sys
import threading
import time

import psycopg2

FIELDS = ("VmRSS", "RssAnon", "RssShmem")


def read_status(pid):
    out = {}
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in FIELDS:
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsn", required=True)
    ap.add_argument("--label", required=True)
    ap.add_argument("--interval", type=float, default=0.2)
    ap.add_argument("sql")
    args = ap.parse_args()

    conn = psycopg2.connect(args.dsn)
    cur = conn.cursor()
    cur.execute("SELECT pg_backend_pid()")
    pid = cur.fetchone()[0]
    conn.commit()

    start = read_status(pid)
    samples = [start]
    stop = threading.Event()

    def sampler():
        while not stop.wait(args.interval):
            s = read_status(pid)
            if s:
                samples.append(s)

    th = threading.Thread(target=sampler, daemon=True)
    t0 = time.time()
    th.start()
    cur.execute(args.sql)
    nrows = cur.rowcount
    if cur.description is not None:
        cur.fetchall()
    conn.commit()
    elapsed = time.time() - t0
    stop.set()
    th.join()
    end = read_status(pid)
    samples.append(end)
    conn.close()

    res = {"label": args.label, "pid": pid, "seconds": round(elapsed, 3),
           "rows": nrows, "samples": len(samples)}
    for k in FIELDS:
        vals = [s[k] for s in samples if k in s]
        res[k] = {"start": start.get(k), "peak": max(vals) if vals else None,
                  "end": end.get(k)}
    json.dump(res, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
