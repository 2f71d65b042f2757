#!/usr/bin/python3
"""
t/mock_x_selftest.py -- checks t/mock_x.py against an independent client
(oauthlib's Client), so the mock itself can be trusted by the TAP tests.

    /usr/bin/python3 t/mock_x_selftest.py [-v]

Starts the mock in a temporary directory, sends requests signed with oauthlib
(style A: body not signed; style B: oauth_body_hash) and with X-Pixel-Token,
and checks the answers: 200 for good requests; 401 for a wrong secret, a
reused nonce, a stale timestamp, a wrong pixel token; 400 for bad bodies;
fault injection.  Prints TAP-ish "ok N - ..." lines; exit status 0 when all
pass.
"""

import hashlib
import http.client
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time

from oauthlib.oauth1 import Client

HERE = os.path.dirname(os.path.abspath(__file__))
CK = "xvz1evFS4wEEPTGEFPHBog"
CS = "kAcSOqF21Fu85e7zjz7ZN2U4ZRhfV3WpwPAoE3Z7kBw"
TOK = "370773112-GmHxMAgYyLbNEtIKZeRNFsMKPR9EyMZeS9weJAEb"
TS = "LswwdoUaIvS8ltyTt5jkRh4J50vUPVVHtR2YPi5kE"
PIXEL = "o8z6j"
# --oauth-set: one pixel that must be signed with its own set
OV_PIXEL, OV_CK, OV_CS, OV_TOK, OV_TS = ("1a2b3", "ovKey1", "ovConsumerSecret1",
                                         "1-ovToken1", "ovTokenSecret1")
EMAIL_HASH = hashlib.sha256(b"test-email@test.com").hexdigest()

failures = 0
count = 0
verbose = "-v" in sys.argv


def ok(cond, name, diag=None):
    global failures, count
    count += 1
    print("%sok %d - %s" % ("" if cond else "not ", count, name))
    if not cond:
        failures += 1
        if diag is not None:
            print("#   %s" % diag)
    return cond


def conversion(cid, **over):
    c = {"conversion_time": "2022-02-18T01:14:00.603Z",
         "event_id": "tw-%s-o8z2x" % PIXEL,
         "identifiers": [{"hashed_email": EMAIL_HASH}],
         "conversion_id": cid, "value": "20.00", "price_currency": "USD"}
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


class Conn:
    def __init__(self, port, cafile):
        self.port = port
        ctx = ssl.create_default_context(cafile=cafile)
        self.conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx,
                                                timeout=10)

    def post(self, path, body, headers):
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        self.conn.request("POST", path, body=body, headers=headers)
        r = self.conn.getresponse()
        data = r.read()
        try:
            doc = json.loads(data)
        except ValueError:
            doc = data
        if verbose:
            print("#   %s -> %d %s" % (path, r.status, data[:200]))
        return r.status, doc, r

    def get(self, path):
        self.conn.request("GET", path)
        r = self.conn.getresponse()
        return r.status, r.read()


def sign(port, path, body=None, secret=CS, token_secret=TS, nonce=None,
         timestamp=None, key=CK, token=TOK):
    """Style A (body=None, like requests-oauthlib) or style B (body given,
    oauthlib adds oauth_body_hash)."""
    client = Client(key, client_secret=secret, resource_owner_key=token,
                    resource_owner_secret=token_secret, nonce=nonce,
                    timestamp=timestamp)
    url = "https://127.0.0.1:%d%s" % (port, path)
    _, headers, _ = client.sign(url, "POST", body=body,
                                headers={"Content-Type": "application/json"})
    return headers


def main():
    tmp = tempfile.mkdtemp(prefix="mock_x_selftest.")
    proc = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "mock_x.py"), "--dir", tmp,
         "--consumer-key", CK, "--consumer-secret", CS, "--token", TOK,
         "--token-secret", TS, "--pixel-token", "pxtok1=tok-123",
         "--oauth-set", "%s:%s:%s:%s:%s" % (OV_PIXEL, OV_CK, OV_CS, OV_TOK, OV_TS)],
        stderr=None if verbose else subprocess.DEVNULL)
    try:
        return run(tmp, proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(5)
            ok(rc == 0, "mock exits cleanly on SIGTERM", "rc=%s" % rc)
        except subprocess.TimeoutExpired:
            proc.kill()
            ok(False, "mock exits cleanly on SIGTERM", "had to kill it")
        shutil.rmtree(tmp, ignore_errors=True)
        print("1..%d" % count)


def run(tmp, proc):
    portfile = os.path.join(tmp, "port")
    deadline = time.time() + 10
    while not os.path.exists(portfile) and time.time() < deadline:
        if proc.poll() is not None:
            ok(False, "mock started", "exited with %s" % proc.returncode)
            return
        time.sleep(0.02)
    port = int(open(portfile).read())
    cafile = os.path.join(tmp, "cert.pem")
    c = Conn(port, cafile)
    st, body = c.get("/_mock/health")
    ok(st == 200 and body == b"ok", "health check over verified TLS")

    path = "/12/measurement/conversions/%s" % PIXEL
    good = {"conversions": [conversion("c1"), conversion("c2", value=None,
            identifiers=[{"twclid": "23opevjt88psuo13lu8d020qkn"},
                         {"ip_address": "1.0.0.0", "user_agent": "Mozilla/5.0"}],
            number_items=3, description="Pet supply purchases",
            contents=[{"content_id": "1", "content_name": "Blankets",
                       "content_type": "Pet supplies", "content_price": 100.99,
                       "num_items": 1, "content_group_id": "123"}])]}

    # Style A: JSON body not signed.
    h = sign(port, path)
    h["Content-Type"] = "application/json"
    st, doc, _ = c.post(path, good, h)
    ok(st == 200 and doc["data"]["conversions_processed"] == 2
       and doc["request"]["params"]["account_id"] == "18ce552mlaq",
       "style A (body not signed) accepted", (st, doc))

    # The same header again: reused nonce.
    st, doc, _ = c.post(path, good, h)
    ok(st == 401 and doc["errors"][0]["code"] == "UNAUTHORIZED_ACCESS",
       "reused nonce rejected", (st, doc))

    # Style B: oauth_body_hash.
    raw = json.dumps({"conversions": [conversion("c3")]})
    h = sign(port, path, body=raw)
    ok("oauth_body_hash" in h["Authorization"], "oauthlib added a body hash")
    st, doc, _ = c.post(path, raw, h)
    ok(st == 200, "style B (oauth_body_hash) accepted", (st, doc))

    # Style B with a body that differs from the one hashed.
    h = sign(port, path, body=raw)
    st, doc, _ = c.post(path, raw.replace("c3", "c4"), h)
    ok(st == 401, "body hash mismatch rejected", (st, doc))

    # Wrong consumer secret / token secret / consumer key.
    for label, kw in (("consumer secret", {"secret": "x" + CS}),
                      ("token secret", {"token_secret": TS + "x"}),
                      ("consumer key", {"key": CK + "x"})):
        h = sign(port, path, **kw)
        h["Content-Type"] = "application/json"
        st, doc, _ = c.post(path, good, h)
        ok(st == 401, "wrong %s rejected" % label, (st, doc))

    # Stale timestamp (signed correctly, 20 minutes old).
    h = sign(port, path, timestamp=str(int(time.time()) - 1200))
    h["Content-Type"] = "application/json"
    st, doc, _ = c.post(path, good, h)
    ok(st == 401, "stale timestamp rejected", (st, doc))

    # Signed for another host or path.
    h = sign(port + 1, path)
    h["Content-Type"] = "application/json"
    st, doc, _ = c.post(path, good, h)
    ok(st == 401, "signature over another port rejected", (st, doc))

    # X's published vector header: correct signature for ads-api.x.com, so
    # here it must fail (wrong URI, stale timestamp) -- and not crash.
    st, doc, _ = c.post(path, good, {
        "Content-Type": "application/json",
        "Authorization": 'OAuth oauth_consumer_key="xvz1evFS4wEEPTGEFPHBog", oauth_nonce="kYjzVBB8Y0ZFabxSWbWovY3uYSQ2pTgmZeNu2VS4cg", oauth_signature="%2FReD2ky0EMmTR3mna%2F9DS%2BIG7iY%3D", oauth_signature_method="HMAC-SHA1", oauth_timestamp="1318622958", oauth_token="370773112-GmHxMAgYyLbNEtIKZeRNFsMKPR9EyMZeS9weJAEb", oauth_version="1.0"'})
    ok(st == 401, "published vector replayed here is rejected", (st, doc))

    # No auth at all.
    st, doc, _ = c.post(path, good, {"Content-Type": "application/json"})
    ok(st == 401, "no credentials rejected", (st, doc))

    # X-Pixel-Token.
    ppath = "/12/measurement/conversions/pxtok1"
    pbody = {"conversions": [conversion("p1", event_id="tw-pxtok1-abc12")]}
    st, doc, _ = c.post(ppath, pbody, {"Content-Type": "application/json",
                                       "X-Pixel-Token": "tok-123"})
    ok(st == 200, "X-Pixel-Token accepted", (st, doc))
    st, doc, _ = c.post(ppath, pbody, {"Content-Type": "application/json",
                                       "X-Pixel-Token": "tok-124"})
    ok(st == 401, "wrong X-Pixel-Token rejected", (st, doc))
    st, doc, _ = c.post(path, good, {"Content-Type": "application/json",
                                     "X-Pixel-Token": "tok-123"})
    ok(st == 401, "pixel token of another pixel rejected", (st, doc))

    # Bad bodies (all properly signed).
    def bad(label, body, want_msg, ctype="application/json"):
        h = sign(port, path)
        h["Content-Type"] = ctype
        st, doc, _ = c.post(path, body, h)
        msgs = [e.get("message", "") for e in doc.get("errors", [])] \
            if isinstance(doc, dict) else []
        ok(st == 400 and any(want_msg in m for m in msgs)
           and doc["request"]["params"].get("account_id") == "18ce552mlaq",
           "bad body rejected: %s" % label, (st, doc))

    bad("no Z in time", {"conversions": [conversion("b", conversion_time="2022-06-16T01:14:00.603")]},
        "Expected Time in yyyy-MM-ddTHH:mm:ss.SSSZ")
    bad("no millis", {"conversions": [conversion("b", conversion_time="2022-06-16T01:14:00Z")]},
        "Expected Time")
    bad("bad hash", {"conversions": [conversion("b", identifiers=[{"hashed_email": "abc"}])]},
        "hashed_email (abc) is not a valid SHA-256 hash")
    bad("upper-case hash", {"conversions": [conversion("b", identifiers=[{"hashed_email": EMAIL_HASH.upper()}])]},
        "is not a valid SHA-256 hash")
    bad("empty twclid", {"conversions": [conversion("b", identifiers=[{"twclid": ""}])]},
        "At least one user identifier must be provided")
    bad("ip alone", {"conversions": [conversion("b", identifiers=[{"ip_address": "1.2.3.4"}])]},
        "At least one user identifier must be provided")
    bad("no identifiers", {"conversions": [conversion("b", identifiers=[])]},
        "At least one user identifier must be provided")
    bad("event of another pixel", {"conversions": [conversion("b", event_id="tw-zzzzz-o8z2x")]},
        "is not a single event tag")
    bad("unknown key", {"conversions": [conversion("b", event_source_url="x")]},
        "Unrecognized parameter event_source_url")
    bad("unknown top-level key", {"conversions": [conversion("b")], "x": 1},
        "Unrecognized parameter x")
    bad("integer value", {"conversions": [conversion("b", value=20)]},
        "is not a valid decimal number")
    bad("lower-case currency", {"conversions": [conversion("b", price_currency="usd")]},
        "price_currency")
    bad("zero number_items", {"conversions": [conversion("b", number_items=0)]},
        "number_items")
    bad("bad content key", {"conversions": [conversion("b", contents=[{"sku": "1"}])]},
        "Unrecognized parameter sku")
    bad("501 conversions", {"conversions": [conversion("b%d" % i) for i in range(501)]},
        "Conversion count limit is 500")
    bad("empty list", {"conversions": []}, "At least one conversion")
    bad("not JSON", "{conversions", "Could not parse")
    bad("duplicate key", '{"conversions":[],"conversions":[]}', "Could not parse")
    bad("form content type", {"conversions": [conversion("b")]}, "Content-Type",
        ctype="text/plain")
    # One bad conversion sinks the request: nothing of it is accepted.
    bad("one bad of two", {"conversions": [conversion("good-1"),
                                           conversion("b", identifiers=[{"hashed_email": "abc"}])]},
        "hashed_email (abc)")

    # 500 conversions (about 150 kB) in one request.
    big = {"conversions": [conversion("big-%d" % i,
                                      identifiers=[{"hashed_email": EMAIL_HASH},
                                                   {"ip_address": "8.25.197.25",
                                                    "user_agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/127.0.0.0 Safari/537.36"}])
                           for i in range(500)]}
    h = sign(port, path)
    h["Content-Type"] = "application/json"
    t0 = time.time()
    st, doc, _ = c.post(path, big, h)
    ok(st == 200 and doc["data"]["conversions_processed"] == 500,
       "500 conversions accepted in %.0f ms" % ((time.time() - t0) * 1000), (st, doc))

    # Faults.
    def set_faults(obj):
        fp = os.path.join(tmp, "faults.json")
        with open(fp + ".tmp", "w") as f:
            json.dump(obj, f)
        os.rename(fp + ".tmp", fp)

    def signed_post(body):
        h = sign(port, path)
        h["Content-Type"] = "application/json"
        return c.post(path, body, h)

    set_faults({"force_status": 503, "retry_after": 2})
    st, doc, r = signed_post({"conversions": [conversion("f1")]})
    ok(st == 503 and r.getheader("Retry-After") == "2", "force_status 503", (st, doc))
    until = int(time.time()) + 60
    set_faults({"rate_limit_until": until})
    st, doc, r = signed_post({"conversions": [conversion("f2")]})
    ok(st == 429 and r.getheader("x-rate-limit-reset") == str(until)
       and r.getheader("x-rate-limit-remaining") == "0", "rate limit 429", (st, doc))
    set_faults({"poison_conversion_ids": ["poison-1"]})
    st, doc, r = signed_post({"conversions": [conversion("f3"), conversion("poison-1")]})
    ok(st == 400 and "poison-1" in doc["errors"][0]["message"], "poisoned conversion", (st, doc))
    set_faults({"drop_rate": 1.0})
    try:
        st, doc, r = signed_post({"conversions": [conversion("f4")]})
        ok(False, "drop closes the connection", (st, doc))
    except (http.client.RemoteDisconnected, ConnectionError):
        ok(True, "drop closes the connection")
    c = Conn(port, cafile)
    set_faults({"drop_reply_after_accept_rate": 1.0})
    try:
        st, doc, r = signed_post({"conversions": [conversion("f5")]})
        ok(False, "drop after accept closes the connection", (st, doc))
    except (http.client.RemoteDisconnected, ConnectionError):
        ok(True, "drop after accept closes the connection")
    c = Conn(port, cafile)
    os.unlink(os.path.join(tmp, "faults.json"))
    st, doc, _ = signed_post({"conversions": [conversion("f6")]})
    ok(st == 200, "faults removed: accepted again", (st, doc))

    # What was recorded.
    reqs = [json.loads(l) for l in open(os.path.join(tmp, "requests.jsonl"))]
    acc = [json.loads(l) for l in open(os.path.join(tmp, "accepted.jsonl"))]
    ids = [a["conversion"].get("conversion_id") for a in acc]
    want = ["c1", "c2", "c3", "p1"] + ["big-%d" % i for i in range(500)] + ["f5", "f6"]
    ok(ids == want, "accepted.jsonl holds exactly the accepted conversions",
       [i for i in ids if not i.startswith("big-")])
    ok(acc[1]["conversion"]["contents"][0]["content_price"] == 100.99,
       "numbers recorded as numbers")
    ok(all(r["t"] <= r["t_done"] for r in reqs), "request times recorded")
    kinds = {(r["auth"], r["status"]) for r in reqs}
    ok(("oauth", 200) in kinds and ("pixel_token", 200) in kinds
       and ("none", 401) in kinds, "auth kinds recorded", kinds)
    nonces = [r["nonce"] for r in reqs if r["auth"] == "oauth" and r["status"] == 200]
    ok(all(nonces) and len(set(nonces)) == len(nonces), "nonces recorded")
    drops = [r for r in reqs if r["fault"] in ("drop", "drop_reply_after_accept")]
    ok(len(drops) == 2 and all(r["status"] is None for r in drops),
       "dropped requests recorded without a status")

    # Keep-alive: many requests on one connection, quickly.
    t0 = time.time()
    for i in range(100):
        st, doc, _ = signed_post({"conversions": [conversion("ka-%d" % i)]})
        if st != 200:
            break
    ok(st == 200, "100 keep-alive requests in %.0f ms" % ((time.time() - t0) * 1000))
    st, body = c.get("/_mock/stats")
    ok(st == 200 and json.loads(body)["accepted"] == len(want) + 100, "stats", body)

    # --oauth-set: the pixel's own set is required, the default refused.
    ov_path = "/12/measurement/conversions/%s" % OV_PIXEL
    ov_body = {"conversions": [conversion("ov-1", event_id="tw-%s-o8z2x" % OV_PIXEL)]}
    h = sign(port, ov_path)
    st, doc, _ = c.post(ov_path, ov_body, h)
    ok(st == 401, "--oauth-set pixel: the default set is refused", (st, doc))
    h = sign(port, ov_path, key=OV_CK, secret=OV_CS, token=OV_TOK,
             token_secret=OV_TS)
    st, doc, _ = c.post(ov_path, ov_body, h)
    ok(st == 200, "--oauth-set pixel: its own set is accepted", (st, doc))
    h = sign(port, ov_path, key=OV_CK, secret="wrong", token=OV_TOK,
             token_secret=OV_TS)
    st, doc, _ = c.post(ov_path, ov_body, h)
    ok(st == 401, "--oauth-set pixel: a wrong consumer secret is refused", (st, doc))
    h = sign(port, path, key=OV_CK, secret=OV_CS, token=OV_TOK,
             token_secret=OV_TS)
    st, doc, _ = signed_post({"conversions": [conversion("ov-2")]})
    ok(st == 200, "other pixels still use the default set", (st, doc))
    st, doc, _ = c.post(path, {"conversions": [conversion("ov-3")]}, h)
    ok(st == 401, "other pixels refuse the override set", (st, doc))
    # A request is recorded just after its answer is sent: wait for ov-3's.
    deadline = time.time() + 5
    while True:
        reqs = [json.loads(l) for l in open(os.path.join(tmp, "requests.jsonl"))]
        sets = {(r["pixel"], r["status"], r.get("oauth_set"))
                for r in reqs if r["conversion_ids"][:1] in (["ov-1"], ["ov-2"], ["ov-3"])}
        if any(r["conversion_ids"] == ["ov-3"] for r in reqs) or time.time() > deadline:
            break
        time.sleep(0.02)
    ok((OV_PIXEL, 200, OV_PIXEL) in sets and (PIXEL, 200, "default") in sets
       and not any(st == 200 and os_ not in (OV_PIXEL, "default") for _, st, os_ in sets),
       "oauth_set recorded", sets)


if __name__ == "__main__":
    t0 = time.time()
    main()
    print("# %.2f s" % (time.time() - t0))
    sys.exit(1 if failures else 0)
