#!/usr/bin/python3
"""
t/mock_x.py -- a local mock of X's Ads API Conversion endpoint, for xcapi tests.

    POST /<version>/measurement/conversions/<pixel_id>

It listens on https://127.0.0.1:<port> with a throwaway self-signed
certificate (DIR/cert.pem, trusted by the client through xcapi.ca_file),
authenticates every request like X (OAuth 1.0a HMAC-SHA1 verified with
oauthlib, or the X-Pixel-Token header), validates the JSON body strictly
against the documented schema (docs: x-conversions-api.md sections 2-4) and
answers in X's formats.  X is all-or-nothing: one bad conversion rejects the
whole request.

Everything it sees is recorded for the tests to read:
  DIR/port            the TCP port (written atomically once listening)
  DIR/requests.jsonl  one JSON line per request (see Mock.record_request)
  DIR/accepted.jsonl  one JSON line per accepted conversion
Credentials: --consumer-key/--consumer-secret/--token/--token-secret are the
OAuth 1.0a set every pixel is checked against, unless a
--oauth-set PIXEL:CONSUMER_KEY:CONSUMER_SECRET:TOKEN:TOKEN_SECRET (repeatable)
names that pixel: its requests must then be signed with that set (and the
default set is refused for it).  --pixel-token PIXEL=TOKEN (repeatable) and
--default-pixel-token accept X-Pixel-Token.  An accepted OAuth request
records "oauth_set": the pixel whose set verified it, or "default".

Faults are injected by writing DIR/faults.json (re-read when it changes; write
it atomically: temp file + rename).  Keys, all optional:
  "force_status": 503             answer every request with that status
  "status_rate": {"503": 0.3}     answer that status with that probability
  "drop_rate": 0.1                close the connection without answering
  "hang_rate": 0.05, "hang_seconds": 30   sleep, then close without answering
  "rate_limit_until": <epoch s>   answer 429 with x-rate-limit-reset until then
  "poison_conversion_ids": [..]   a request carrying one of them gets a 400
  "drop_reply_after_accept_rate": 0.2   accept (record) then close unanswered
  "retry_after": 2                add Retry-After to 503 answers
  "delay_ms": 50                  wait that long before answering
Randomness comes from a generator seeded with --seed, so runs repeat.

GET /_mock/health answers 200 "ok" (no auth); GET /_mock/stats gives counters.
SIGTERM or SIGINT stops it cleanly.

Only the Python standard library and Debian's python3-oauthlib are used.
Run it with /usr/bin/python3.
"""

import argparse
import base64
import datetime
import decimal
import functools
import hashlib
import http.server
import ipaddress
import json
import os
import random
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid

from oauthlib.common import Request as OAuthRequest
from oauthlib.oauth1.rfc5849 import signature as oauth_signature
from oauthlib.oauth1.rfc5849 import utils as oauth_utils

ACCOUNT_ID = "18ce552mlaq"
MAX_CONVERSIONS = 500
MAX_BODY_BYTES = 16 * 1024 * 1024
TIMESTAMP_LIFETIME = 600
PATH_RE = re.compile(r"^/([0-9]+)/measurement/conversions/([^/?#]+)$")
TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
BASE36_RE = re.compile(r"^[0-9a-z]+$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
CURRENCY_RE = re.compile(r"^[A-Z]{3}$")
DECIMAL_RE = re.compile(r"^-?[0-9]+\.[0-9]+$")
NONCE_RE = re.compile(r"^[A-Za-z0-9._~-]{8,128}$")

CONVERSION_KEYS = {
    "conversion_time", "event_id", "identifiers", "number_items",
    "price_currency", "value", "conversion_id", "description", "contents",
}
IDENTIFIER_KEYS = {
    "twclid", "hashed_email", "hashed_phone_number", "ip_address", "user_agent",
}
CONTENT_STRING_KEYS = {
    "content_id", "content_group_id", "content_name", "content_type",
}
CONTENT_KEYS = CONTENT_STRING_KEYS | {"content_price", "num_items"}
OAUTH_REQUIRED = (
    "oauth_consumer_key", "oauth_nonce", "oauth_signature",
    "oauth_signature_method", "oauth_timestamp", "oauth_token",
    "oauth_version",
)
OAUTH_ALLOWED = set(OAUTH_REQUIRED) | {"oauth_body_hash"}

STATUS_ERRORS = {
    400: ("INVALID_PARAMETER", "Invalid request"),
    401: ("UNAUTHORIZED_ACCESS", "This request is not properly authenticated"),
    403: ("UNAUTHORIZED_CLIENT_APPLICATION",
          "The client application making this request does not have access "
          "to this API"),
    404: ("NOT_FOUND", "The requested resource could not be found"),
    408: ("CANCELLED_REQUEST", "The request was cancelled"),
    423: ("LOCK_ACQUISITION_TIMEOUT", "Could not acquire lock"),
    429: ("TOO_MANY_REQUESTS", "Rate limit exceeded"),
    500: ("INTERNAL_ERROR", "Internal error"),
    502: ("INTERNAL_ERROR", "Bad gateway"),
    503: ("SERVICE_UNAVAILABLE", "Service unavailable"),
    504: ("INTERNAL_ERROR", "Gateway timeout"),
}


def log(msg):
    sys.stderr.write("mock_x: %s\n" % msg)
    sys.stderr.flush()


class Reject(Exception):
    """Ends request handling with an HTTP error answer."""

    def __init__(self, status, errors, params=None, headers=None):
        super().__init__(errors[0]["message"] if errors else str(status))
        self.status = status
        self.errors = errors
        self.params = params if params is not None else {}
        self.headers = headers or {}


def unauthorized():
    return Reject(401, [{"code": "UNAUTHORIZED_ACCESS",
                         "message": "This request is not properly authenticated"}])


class Drop(Exception):
    """Ends request handling by closing the connection without an answer."""


# ---------------------------------------------------------------------------
# Body validation (x-conversions-api.md sections 2 and 3)
# ---------------------------------------------------------------------------

def _no_duplicates(pairs):
    obj = {}
    for k, v in pairs:
        if k in obj:
            raise ValueError("duplicate key %r" % k)
        obj[k] = v
    return obj


def _reject_constant(name):
    raise ValueError("invalid JSON constant %s" % name)


def parse_json(raw):
    """Strict JSON: UTF-8, no duplicate keys, no NaN; floats kept as Decimal
    so the literal's form (decimal point or not) can be checked."""
    text = raw.decode("utf-8")
    return json.loads(text, object_pairs_hook=_no_duplicates,
                      parse_float=decimal.Decimal,
                      parse_constant=_reject_constant)


@functools.lru_cache(maxsize=65536)
def _valid_ip(v):
    try:
        ipaddress.ip_address(v)
        return True
    except ValueError:
        return False


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


class Validator:
    def __init__(self, pixel):
        self.pixel = pixel
        self.errors = []

    def err(self, message, parameter, code="INVALID_PARAMETER"):
        e = {"code": code, "message": message, "parameter": parameter}
        if e not in self.errors and len(self.errors) < 50:
            self.errors.append(e)

    def body(self, doc):
        if not isinstance(doc, dict):
            self.err("Expected a JSON object for the request body", "")
            return
        extra = sorted(set(doc) - {"conversions"})
        for k in extra:
            self.err("Unrecognized parameter %s" % k, k)
        if "conversions" not in doc:
            self.err("conversions is required", "conversions",
                     code="MISSING_PARAMETER")
            return
        convs = doc["conversions"]
        if not isinstance(convs, list):
            self.err("Expected an array for conversions", "conversions")
            return
        if len(convs) == 0:
            self.err("At least one conversion must be provided", "conversions")
            return
        if len(convs) > MAX_CONVERSIONS:
            self.err("Conversion count limit is %d" % MAX_CONVERSIONS,
                     "conversions")
            return
        for c in convs:
            self.conversion(c)

    def conversion(self, c):
        if not isinstance(c, dict):
            self.err("Expected an object for each conversion", "conversions")
            return
        for k in sorted(set(c) - CONVERSION_KEYS):
            self.err("Unrecognized parameter %s" % k, k)

        t = c.get("conversion_time")
        if t is None:
            self.err("conversion_time is required", "conversion_time",
                     code="MISSING_PARAMETER")
        elif not isinstance(t, str) or not TIME_RE.match(t) \
                or not self._valid_time(t):
            self.err('Expected Time in yyyy-MM-ddTHH:mm:ss.SSSZ, got %s for '
                     'conversion_time' % json.dumps(t, default=str),
                     "conversion_time")

        ev = c.get("event_id")
        if ev is None:
            self.err("Event ID was not found", "event_id",
                     code="MISSING_PARAMETER")
        elif not isinstance(ev, str) or not ev:
            self.err("event_id (%s) is not a single event tag (SET)" % (ev,),
                     "event_id")
        else:
            ok = BASE36_RE.match(ev) is not None
            if not ok and ev.startswith("tw-"):
                parts = ev.split("-")
                ok = (len(parts) == 3 and parts[1] == self.pixel
                      and BASE36_RE.match(parts[2]) is not None)
            if not ok:
                self.err("event_id (%s) is not a single event tag (SET)" % ev,
                         "event_id")

        self.identifiers(c.get("identifiers"))

        if "number_items" in c:
            n = c["number_items"]
            if not _is_int(n) or n <= 0:
                self.err("number_items must be a positive number greater than "
                         "zero, got %s" % json.dumps(n, default=str),
                         "number_items")
        if "price_currency" in c:
            cur = c["price_currency"]
            if not isinstance(cur, str) or not CURRENCY_RE.match(cur):
                self.err("price_currency (%s) is not a valid ISO-4217 currency "
                         "code" % (cur,), "price_currency")
        if "value" in c:
            v = c["value"]
            if isinstance(v, (str, decimal.Decimal)) \
                    and DECIMAL_RE.match(str(v)):
                pass
            else:
                self.err("value (%s) is not a valid decimal number"
                         % json.dumps(v, default=str), "value")
        if "conversion_id" in c:
            cid = c["conversion_id"]
            if not isinstance(cid, str) or not cid:
                self.err("conversion_id must be a non-empty string",
                         "conversion_id")
        if "description" in c and not isinstance(c["description"], str):
            self.err("description must be a string", "description")
        if "contents" in c:
            self.contents(c["contents"])

    @staticmethod
    def _valid_time(t):
        try:
            datetime.datetime.fromisoformat(t[:23])   # C code: fast
            return True
        except ValueError:
            return False

    def identifiers(self, ids):
        missing = "At least one user identifier must be provided"
        if ids is None:
            self.err(missing, "")
            return
        if not isinstance(ids, list) or not ids:
            self.err(missing, "")
            return
        seen = set()
        for obj in ids:
            if not isinstance(obj, dict) or not obj:
                self.err("Expected a non-empty object for each identifier",
                         "identifiers")
                continue
            for k, v in obj.items():
                if k not in IDENTIFIER_KEYS:
                    self.err("Unrecognized parameter %s" % k, k)
                    continue
                if not isinstance(v, str) or not v.strip():
                    continue          # counts as missing, like {"twclid": ""}
                if k in ("hashed_email", "hashed_phone_number"):
                    if not SHA256_RE.match(v):
                        self.err("%s (%s) is not a valid SHA-256 hash" % (k, v),
                                 k)
                        continue
                if k == "ip_address":
                    if not _valid_ip(v):
                        self.err("ip_address (%s) is not a valid IP address"
                                 % v, k)
                        continue
                if v != v.strip():
                    self.err("%s (%s) has leading or trailing spaces" % (k, v),
                             k)
                    continue
                seen.add(k)
        strong = seen & {"twclid", "hashed_email", "hashed_phone_number"}
        if not strong and not {"ip_address", "user_agent"} <= seen:
            self.err(missing, "")

    def contents(self, contents):
        if not isinstance(contents, list):
            self.err("Expected an array for contents", "contents")
            return
        for obj in contents:
            if not isinstance(obj, dict):
                self.err("Expected an object for each content", "contents")
                continue
            for k in sorted(set(obj) - CONTENT_KEYS):
                self.err("Unrecognized parameter %s" % k, k)
            for k in CONTENT_STRING_KEYS & set(obj):
                if not isinstance(obj[k], str):
                    self.err("%s must be a string" % k, k)
            if "content_price" in obj:
                p = obj["content_price"]
                if not (isinstance(p, decimal.Decimal) or _is_int(p)):
                    self.err("content_price (%s) is not a number"
                             % json.dumps(p, default=str), "content_price")
            if "num_items" in obj:
                n = obj["num_items"]
                if not _is_int(n) or n <= 0:
                    self.err("num_items must be a positive integer", "num_items")


_NUM_MARK = "\x00NUM:"
_NUM_RE = re.compile(r'"\\u0000NUM:([-+0-9.eE]+)"')


def _json_default(o):
    # Numbers with a fraction were parsed as Decimal; write them back with
    # the literal the client sent (20.00 stays 20.00, not 20.0).
    if isinstance(o, decimal.Decimal):
        return _NUM_MARK + str(o)
    raise TypeError("not JSON serializable: %r" % (o,))


def dump_json(obj):
    text = json.dumps(obj, separators=(",", ":"), default=_json_default)
    if "\\u0000NUM:" in text:
        text = _NUM_RE.sub(r"\1", text)
    return text


# ---------------------------------------------------------------------------
# State shared by all connections
# ---------------------------------------------------------------------------

class Mock:
    def __init__(self, args):
        self.dir = args.dir
        self.consumer_key = args.consumer_key
        self.consumer_secret = args.consumer_secret
        self.token = args.token
        self.token_secret = args.token_secret
        self.pixel_tokens = {}
        for spec in args.pixel_token or []:
            pixel, sep, tok = spec.partition("=")
            if not sep or not pixel or not tok:
                raise SystemExit("--pixel-token wants PIXEL=TOKEN, got %r" % spec)
            self.pixel_tokens[pixel] = tok
        self.default_pixel_token = args.default_pixel_token
        self.oauth_sets = {}
        for spec in args.oauth_set or []:
            parts = spec.split(":", 4)
            if len(parts) != 5 or not all(parts):
                raise SystemExit("--oauth-set wants PIXEL:CONSUMER_KEY:"
                                 "CONSUMER_SECRET:TOKEN:TOKEN_SECRET, got %r"
                                 % spec.split(":", 1)[0])
            self.oauth_sets[parts[0]] = tuple(parts[1:])
        self.port = None
        self.rng = random.Random(args.seed)
        self.lock = threading.Lock()
        self.file_lock = threading.Lock()
        self.nonces = set()
        self.faults = {}
        self.faults_stamp = None
        self.counters = {"requests": 0, "accepted": 0}
        self.requests_f = open(os.path.join(self.dir, "requests.jsonl"), "a",
                               encoding="utf-8")
        self.accepted_f = open(os.path.join(self.dir, "accepted.jsonl"), "a",
                               encoding="utf-8")

    # -- faults -------------------------------------------------------------

    def current_faults(self):
        path = os.path.join(self.dir, "faults.json")
        try:
            st = os.stat(path)
        except FileNotFoundError:
            with self.lock:
                self.faults, self.faults_stamp = {}, None
            return {}
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        with self.lock:
            if stamp == self.faults_stamp:
                return self.faults
        try:
            with open(path, encoding="utf-8") as f:
                faults = json.load(f)
            if not isinstance(faults, dict):
                raise ValueError("faults.json must hold a JSON object")
        except FileNotFoundError:
            faults = {}
        except (OSError, ValueError) as e:
            log("ignoring unreadable faults.json: %s" % e)
            return self.faults
        with self.lock:
            self.faults, self.faults_stamp = faults, stamp
        return faults

    def chance(self, p):
        try:
            p = float(p)
        except (TypeError, ValueError):
            return False
        if p <= 0:
            return False
        with self.lock:
            return self.rng.random() < p

    # -- recording ----------------------------------------------------------

    def record_request(self, rec):
        line = dump_json(rec)
        with self.file_lock:
            self.counters["requests"] += 1
            self.requests_f.write(line + "\n")
            self.requests_f.flush()

    def record_accepted(self, t, pixel, conversions):
        lines = "".join(
            dump_json({"t": t, "pixel": pixel, "conversion": c}) + "\n"
            for c in conversions)
        with self.file_lock:
            self.counters["accepted"] += len(conversions)
            self.accepted_f.write(lines)
            self.accepted_f.flush()

    # -- authentication -----------------------------------------------------

    def check_pixel_token(self, pixel, token):
        expected = self.pixel_tokens.get(pixel, self.default_pixel_token)
        if expected is None or token != expected:
            raise unauthorized()

    def check_oauth(self, method, uri, header, body, info, pixel=None):
        """Verify an OAuth 1.0a HMAC-SHA1 Authorization header with oauthlib
        (x-conversions-api.md 6.10): the JSON body is not in the base string;
        an oauth_body_hash, if sent, must be base64(sha1(body))."""
        if not header.startswith("OAuth "):
            raise unauthorized()
        params = {}
        for item in oauth_utils.parse_http_list(header[6:]):
            name, sep, value = item.strip().partition("=")
            if not sep or len(value) < 2 or value[0] != '"' or value[-1] != '"':
                info["auth_error"] = "malformed Authorization header item"
                raise unauthorized()
            if name in params:
                info["auth_error"] = "duplicate %s" % name
                raise unauthorized()
            params[name] = oauth_utils.unescape(value[1:-1])
        info["nonce"] = params.get("oauth_nonce")
        for name in OAUTH_REQUIRED:
            if not params.get(name):
                info["auth_error"] = "missing %s" % name
                raise unauthorized()
        for name in params:
            if name not in OAUTH_ALLOWED:
                info["auth_error"] = "unexpected parameter %s" % name
                raise unauthorized()
        if params["oauth_signature_method"] != "HMAC-SHA1":
            info["auth_error"] = "signature method is not HMAC-SHA1"
            raise unauthorized()
        if params["oauth_version"] != "1.0":
            info["auth_error"] = "oauth_version is not 1.0"
            raise unauthorized()
        if pixel in self.oauth_sets:
            consumer_key, consumer_secret, token, token_secret = \
                self.oauth_sets[pixel]
            info["oauth_set"] = pixel
        else:
            consumer_key, consumer_secret, token, token_secret = \
                self.consumer_key, self.consumer_secret, self.token, \
                self.token_secret
            info["oauth_set"] = "default"
        if params["oauth_consumer_key"] != consumer_key \
                or params["oauth_token"] != token:
            info["auth_error"] = "unknown consumer key or token"
            raise unauthorized()
        ts = params["oauth_timestamp"]
        if not re.match(r"^[0-9]{10}$", ts) \
                or abs(int(ts) - time.time()) > TIMESTAMP_LIFETIME:
            info["auth_error"] = "stale or malformed timestamp %s" % ts
            raise unauthorized()
        if not NONCE_RE.match(params["oauth_nonce"]):
            info["auth_error"] = "malformed nonce"
            raise unauthorized()
        if "oauth_body_hash" in params:
            want = base64.b64encode(hashlib.sha1(body).digest()).decode()
            if params["oauth_body_hash"] != want:
                info["auth_error"] = "oauth_body_hash does not match the body"
                raise unauthorized()
            info["body_hash"] = True

        # The signature itself: oauthlib does the base string and the HMAC.
        headers = {"Authorization": header}
        req = OAuthRequest(uri, http_method=method, body="", headers=headers)
        req.params = oauth_signature.collect_parameters(
            uri_query=uri.partition("?")[2], headers=headers,
            exclude_oauth_signature=True)
        req.signature = params["oauth_signature"]
        if not oauth_signature.verify_hmac_sha1(req, consumer_secret,
                                                token_secret):
            info["auth_error"] = "signature mismatch"
            raise unauthorized()

        with self.lock:
            if params["oauth_nonce"] in self.nonces:
                info["auth_error"] = "nonce reused"
                raise unauthorized()
            self.nonces.add(params["oauth_nonce"])


# ---------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mock_x/1"
    sys_version = ""
    timeout = 120           # idle keep-alive connections are closed after this

    def log_message(self, fmt, *args):
        pass                # no per-request noise

    def log_error(self, fmt, *args):
        # Timeouts of idle keep-alive connections are normal; the rest is not.
        msg = fmt % args
        if "timed out" not in msg:
            log(msg)

    # -- helpers ------------------------------------------------------------

    def send_json(self, status, obj, headers=None):
        body = json.dumps(obj, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json;charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-current-api-version", "12")
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_with_body(body)

    def send_text(self, status, text):
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_with_body(body)

    def end_with_body(self, body):
        # Headers and body in one write: one TLS record, no Nagle stall.
        self._headers_buffer.append(b"\r\n")
        self._headers_buffer.append(body)
        self.flush_headers()
        self.wfile.flush()

    def read_body(self):
        te = self.headers.get("Transfer-Encoding", "").lower()
        if "chunked" in te:
            chunks, total = [], 0
            while True:
                line = self.rfile.readline(1024)
                if not line:
                    raise Drop()
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                total += size
                if total > MAX_BODY_BYTES:
                    raise Reject(413, [{"code": "INVALID_PARAMETER",
                                        "message": "Request body too large"}])
                chunks.append(self.rfile.read(size))
                self.rfile.readline(1024)
            return b"".join(chunks)
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        try:
            n = int(length)
        except ValueError:
            self.close_connection = True
            raise Reject(400, [{"code": "INVALID_PARAMETER",
                                "message": "Invalid Content-Length"}])
        if n < 0 or n > MAX_BODY_BYTES:
            self.close_connection = True
            raise Reject(413, [{"code": "INVALID_PARAMETER",
                                "message": "Request body too large"}])
        data = self.rfile.read(n)
        if len(data) != n:
            raise Drop()
        return data

    # -- routes -------------------------------------------------------------

    def do_GET(self):
        mock = self.server.mock
        if self.path == "/_mock/health":
            self.send_text(200, "ok")
        elif self.path == "/_mock/stats":
            with mock.file_lock:
                stats = dict(mock.counters)
            self.send_json(200, stats)
        elif PATH_RE.match(self.path.partition("?")[0]):
            self.send_json(405, {"errors": [{"code": "METHOD_NOT_ALLOWED",
                                             "message": "Method not allowed"}],
                                 "request": {"params": {}}})
        else:
            self.send_json(404, {"errors": [{"code": "ROUTE_NOT_FOUND",
                                             "message": "The requested resource could not be found"}],
                                 "request": {"params": {}}})

    def do_POST(self):
        mock = self.server.mock
        t0 = time.time()
        path = self.path
        m = PATH_RE.match(path.partition("?")[0])
        rec = {"t": t0, "pixel": m.group(2) if m else None, "path": path,
               "version": m.group(1) if m else None, "status": None,
               "auth": "none", "nonce": None, "n": None,
               "conversion_ids": [], "event_ids": [], "error": None,
               "fault": None, "bytes": None}
        info = {}
        try:
            try:
                body = self.read_body()
                rec["bytes"] = len(body)
                self.handle_conversions(mock, m, body, rec, info)
            except Reject as r:
                rec["status"] = r.status
                rec["error"] = r.errors[0]["message"] if r.errors else None
                if len(r.errors) > 1:
                    rec["errors"] = [e["message"] for e in r.errors]
                if "auth_error" in info:
                    rec["auth_error"] = info["auth_error"]
                self.send_json(r.status, {"errors": r.errors,
                                          "request": {"params": r.params}},
                               r.headers)
        except Drop:
            self.close_connection = True
        except (ConnectionError, ssl.SSLError, socket.timeout, OSError) as e:
            self.close_connection = True
            rec["error"] = rec["error"] or "connection: %s" % e
        finally:
            rec["nonce"] = info.get("nonce")
            rec["t_done"] = time.time()
            mock.record_request(rec)

    def handle_conversions(self, mock, m, body, rec, info):
        if m is None:
            raise Reject(404, [{"code": "ROUTE_NOT_FOUND",
                                "message": "The requested resource could not be found"}])
        pixel = m.group(2)

        # Authentication first: even a faulted request must be properly signed
        # (a retry that reuses a nonce shows up as a 401).
        pixel_token = self.headers.get("X-Pixel-Token")
        authz = self.headers.get("Authorization")
        if pixel_token is not None:
            rec["auth"] = "pixel_token"
            mock.check_pixel_token(pixel, pixel_token)
        elif authz is not None:
            rec["auth"] = "oauth"
            host = (self.headers.get("Host") or "127.0.0.1:%d" % mock.port).lower()
            if host.endswith(":443"):
                host = host[:-4]
            uri = "https://%s%s" % (host, self.path)
            mock.check_oauth("POST", uri, authz, body, info, pixel)
            rec["oauth_set"] = info.get("oauth_set")
        else:
            raise unauthorized()

        # Parse enough of the body to log what was sent, before any fault.
        doc = None
        try:
            doc = parse_json(body)
        except (UnicodeDecodeError, ValueError) as e:
            info["parse_error"] = str(e)
        convs = doc.get("conversions") if isinstance(doc, dict) else None
        if isinstance(convs, list):
            rec["n"] = len(convs)
            rec["conversion_ids"] = [c.get("conversion_id") for c in convs
                                     if isinstance(c, dict)]
            rec["event_ids"] = [c.get("event_id") for c in convs
                                if isinstance(c, dict)]

        self.apply_faults(mock, rec)

        ctype = self.headers.get("Content-Type", "")
        if ctype.split(";")[0].strip().lower() != "application/json":
            raise Reject(400, [{"code": "INVALID_PARAMETER",
                                "message": "Content-Type must be application/json, got %s" % (ctype or "none"),
                                "parameter": ""}], {"account_id": ACCOUNT_ID})
        if doc is None:
            raise Reject(400, [{"code": "INVALID_PARAMETER",
                                "message": "Could not parse the request body as JSON: %s"
                                           % info.get("parse_error"),
                                "parameter": ""}], {"account_id": ACCOUNT_ID})
        v = Validator(pixel)
        v.body(doc)
        if v.errors:
            raise Reject(400, v.errors, {"account_id": ACCOUNT_ID})

        poison = set(mock.current_faults().get("poison_conversion_ids") or [])
        if poison:
            errs = [{"code": "INVALID_PARAMETER",
                     "message": "hashed_email (%s) is not a valid SHA-256 hash"
                                % c.get("conversion_id"),
                     "parameter": "hashed_email"}
                    for c in convs if c.get("conversion_id") in poison]
            if errs:
                rec["fault"] = "poison"
                raise Reject(400, errs, {"account_id": ACCOUNT_ID})

        mock.record_accepted(rec["t"], pixel, convs)
        faults = mock.current_faults()
        if mock.chance(faults.get("drop_reply_after_accept_rate")):
            rec["fault"] = "drop_reply_after_accept"
            raise Drop()
        rec["status"] = 200
        self.send_json(200, {"request": {"params": {"account_id": ACCOUNT_ID}},
                             "data": {"conversions_processed": len(convs),
                                      "debug_id": str(uuid.uuid4())}})

    def apply_faults(self, mock, rec):
        faults = mock.current_faults()
        if not faults:
            return
        delay = faults.get("delay_ms")
        if delay:
            time.sleep(float(delay) / 1000.0)
        if mock.chance(faults.get("drop_rate")):
            rec["fault"] = "drop"
            raise Drop()
        if mock.chance(faults.get("hang_rate")):
            rec["fault"] = "hang"
            time.sleep(float(faults.get("hang_seconds", 30)))
            raise Drop()
        until = faults.get("rate_limit_until")
        if until is not None and time.time() < float(until):
            rec["fault"] = "rate_limit"
            raise Reject(429, [{"code": "TOO_MANY_REQUESTS",
                                "message": "Rate limit exceeded"}], {},
                         {"x-rate-limit-limit": 450,
                          "x-rate-limit-remaining": 0,
                          "x-rate-limit-reset": int(float(until))})
        forced = faults.get("force_status")
        if forced is None:
            for status, p in sorted((faults.get("status_rate") or {}).items()):
                if mock.chance(p):
                    forced = status
                    break
        if forced is not None:
            status = int(forced)
            code, message = STATUS_ERRORS.get(status, ("INTERNAL_ERROR",
                                                       "Error %d" % status))
            headers = {}
            if status == 503 and faults.get("retry_after") is not None:
                headers["Retry-After"] = faults["retry_after"]
            if status == 429:
                headers.update({"x-rate-limit-limit": 450,
                                "x-rate-limit-remaining": 0,
                                "x-rate-limit-reset": int(time.time()) + 1})
            rec["fault"] = "status"
            raise Reject(status, [{"code": code, "message": message}], {},
                         headers)


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr, handler, mock, ssl_ctx):
        super().__init__(addr, handler)
        self.mock = mock
        self.ssl_ctx = ssl_ctx

    def finish_request(self, request, client_address):
        # TLS handshake here, in the connection's own thread, not in accept().
        request.settimeout(30)
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            conn = self.ssl_ctx.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as e:
            log("TLS handshake with %s failed: %s" % (client_address[0], e))
            return
        try:
            self.RequestHandlerClass(conn, client_address, self)
        except (ConnectionError, ssl.SSLError, socket.timeout):
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def handle_error(self, request, client_address):
        log("error serving %s:" % (client_address,))
        import traceback
        traceback.print_exc()


def ensure_certificate(d):
    cert = os.path.join(d, "cert.pem")
    key = os.path.join(d, "key.pem")
    if os.path.exists(cert) and os.path.exists(key):
        return cert, key
    tmpc = cert + ".tmp.%d" % os.getpid()
    tmpk = key + ".tmp.%d" % os.getpid()
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
         "-keyout", tmpk, "-out", tmpc, "-days", "30",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.chmod(tmpk, 0o600)
    os.rename(tmpk, key)
    os.rename(tmpc, cert)
    return cert, key


def write_atomic(path, text):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".port.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.rename(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description="mock of X's conversions endpoint")
    ap.add_argument("--dir", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--consumer-key")
    ap.add_argument("--consumer-secret")
    ap.add_argument("--token")
    ap.add_argument("--token-secret")
    ap.add_argument("--pixel-token", action="append", metavar="PIXEL=TOKEN")
    ap.add_argument("--default-pixel-token")
    ap.add_argument("--oauth-set", action="append",
                    metavar="PIXEL:CONSUMER_KEY:CONSUMER_SECRET:TOKEN:TOKEN_SECRET")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)

    os.makedirs(args.dir, exist_ok=True)
    cert, key = ensure_certificate(args.dir)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)

    mock = Mock(args)
    server = Server(("127.0.0.1", args.port), Handler, mock, ctx)
    mock.port = server.server_address[1]

    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    thread = threading.Thread(target=server.serve_forever,
                              kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    write_atomic(os.path.join(args.dir, "port"), "%d\n" % mock.port)
    log("listening on https://127.0.0.1:%d (dir %s)" % (mock.port, args.dir))
    while not stop.wait(0.5):
        pass
    server.shutdown()
    server.server_close()
    log("stopped after %d requests, %d conversions accepted"
        % (mock.counters["requests"], mock.counters["accepted"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
