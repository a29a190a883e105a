# Node configuration: defaults, whole-document validation, atomic persistence.
# A config is validated completely before anything is applied; a rejected one leaves the
# running config untouched and yields a one-line reason for status `cfg_err`.
import binascii
import json
import os

DEFAULTS = {
    "v": 0,
    "interval_s": 60,
    "batch": 10,
    "keepalive_s": 60,
    "sleep_s": 0,
    "flush_n": 1,
    "status_s": 300,
    "filt_n": 1,
    "cal": {},
    "thr": {},
}
# key: (lo, hi) for integer keys
LIMITS = {
    "v": (0, 2147483647),
    "interval_s": (1, 3600),
    "batch": (1, 50),
    "keepalive_s": (10, 1200),
    "sleep_s": (0, 86400),
    "flush_n": (1, 16),
    "status_s": (10, 86400),
    "filt_n": (1, 9),
}
FILE = "cfg.json"


def _num(x):
    return (isinstance(x, int) or isinstance(x, float)) and not isinstance(x, bool) and x == x \
        and -1e12 < x < 1e12


def validate(doc, fields):
    # Returns (config dict with defaults filled in, None) or (None, reason).
    if not isinstance(doc, dict):
        return None, "config must be a JSON object"
    if "v" not in doc:
        return None, "config has no version 'v'"
    out = {}
    for k in doc:
        if k not in DEFAULTS:
            return None, "unknown key '%s'" % k
    for k, (lo, hi) in LIMITS.items():
        x = doc.get(k, DEFAULTS[k])
        if not isinstance(x, int) or isinstance(x, bool):
            return None, "%s must be an integer" % k
        if x < lo or x > hi:
            return None, "%s=%d outside %d..%d" % (k, x, lo, hi)
        out[k] = x
    cal = doc.get("cal", {})
    if not isinstance(cal, dict):
        return None, "cal must be an object"
    for name, c in cal.items():
        if name not in fields:
            return None, "cal: unknown field '%s'" % name
        if not isinstance(c, dict):
            return None, "cal.%s must be an object" % name
        if "points" in c:
            pts = c["points"]
            if len(c) != 1 or not isinstance(pts, list) or len(pts) not in (2, 3):
                return None, "cal.%s.points needs 2 or 3 [reference, raw] pairs" % name
            raws = []
            for p in pts:
                if not isinstance(p, list) or len(p) != 2 or not _num(p[0]) or not _num(p[1]):
                    return None, "cal.%s.points entries must be [reference, raw] numbers" % name
                if p[1] in raws:
                    return None, "cal.%s.points has two points with the same raw value" % name
                raws.append(p[1])
        else:
            for k in c:
                if k not in ("gain", "offset"):
                    return None, "cal.%s: unknown key '%s'" % (name, k)
            if not _num(c.get("gain", 1)) or not _num(c.get("offset", 0)):
                return None, "cal.%s gain/offset must be numbers" % name
            if c.get("gain", 1) == 0:
                return None, "cal.%s gain must not be 0" % name
    out["cal"] = cal
    thr = doc.get("thr", {})
    if not isinstance(thr, dict):
        return None, "thr must be an object"
    for name, t in thr.items():
        if name not in fields:
            return None, "thr: unknown field '%s'" % name
        if not isinstance(t, list) or len(t) != 2 or not _num(t[0]) or not _num(t[1]) or t[0] >= t[1]:
            return None, "thr.%s must be [low, high] with low < high" % name
    out["thr"] = thr
    return out, None


def compile_cal(cal):
    # field -> (gain, offset) or sorted [(raw, ref), ...]
    out = {}
    for name, c in cal.items():
        if "points" in c:
            out[name] = sorted([(float(p[1]), float(p[0])) for p in c["points"]])
        else:
            out[name] = (float(c.get("gain", 1)), float(c.get("offset", 0)))
    return out


def apply_cal(c, x):
    if c is None:
        return x
    if isinstance(c, tuple):
        return x * c[0] + c[1]
    # piecewise linear through 2 or 3 points (2- and 3-point pH), extrapolated at the ends
    i = 1 if len(c) == 3 and x > c[1][0] else 0
    (x0, y0), (x1, y1) = c[i], c[i + 1]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


def load(fields):
    # The stored config, or the defaults with the reason it could not be used.
    try:
        with open(FILE) as f:
            doc = json.load(f)
    except OSError:
        return dict(DEFAULTS), None
    except ValueError:
        return dict(DEFAULTS), "stored config unreadable, defaults in force"
    cfg, err = validate(doc, fields)
    if cfg is None:
        return dict(DEFAULTS), "stored config invalid (%s), defaults in force" % err
    return cfg, None


def save(cfg):
    tmp = FILE + ".tmp"
    with open(tmp, "w") as f:
        json.dump(cfg, f)
    os.rename(tmp, FILE)


def median(vals, n):
    # in-place insertion sort of the first n values, then the middle one
    for i in range(1, n):
        x = vals[i]
        j = i - 1
        while j >= 0 and vals[j] > x:
            vals[j + 1] = vals[j]
            j -= 1
        vals[j + 1] = x
    return vals[n // 2]


def load_ca(path):
    # The city CA certificate as DER (what mbedTLS takes from load_verify_locations); the
    # file may be PEM (as `twinedge node install` copies it) or DER.
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        raise ValueError("%s missing: re-run `twinedge node install` with --ca" % path)
    i = data.find(b"-----BEGIN CERTIFICATE-----")
    if i < 0:
        if data[:1] != b"\x30":  # DER starts with a SEQUENCE
            raise ValueError("%s is not a certificate (PEM or DER)" % path)
        return data
    j = data.find(b"-----END CERTIFICATE-----", i)
    if j < 0:
        raise ValueError("%s: PEM certificate has no END line" % path)
    try:
        return binascii.a2b_base64(data[i + 27:j])
    except ValueError:
        raise ValueError("%s: PEM certificate is not valid base64" % path)
