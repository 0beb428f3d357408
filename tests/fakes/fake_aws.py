#!/usr/bin/python3
"""A fake AWS for CloudSweep's test suites.

One process answers STS, EC2, ELB (classic and v2), RDS, CloudWatch and KMS on loopback,
over HTTP and HTTPS, in the wire formats the real services use (query protocol with AWS's
XML shapes and namespaces, KMS's JSON protocol). Every request is checked the way AWS
checks it: the SigV4 signature is recomputed with botocore's own signer for the access
key's secret, the date must be within 15 minutes, temporary credentials need their
session token and die at their expiry. The daemon's AWS client is tested against this, so
it must not be more lenient than AWS.

State (accounts, credentials, roles, resources per region, metric datapoints) is seeded
and inspected through an unsigned control API under /__fake/ on the same ports, which also
sets fault injection (latency, throttling, 5xx, connection reset, malformed or truncated
bodies, hangs) and records every call so tests can assert what the client did.

The server is one thread: an asyncio event loop serves both ports with a small HTTP/1.1
parser of its own (keep-alive, pipelining answered in order, chunked bodies, 100-continue),
so hundreds of connections cost no threads, and injected latency and hangs are timers
rather than sleeping threads. All state is touched on that thread only, hence no locks.

Runs under Debian's /usr/bin/python3 with the standard library and python3-botocore.
See README.md beside this file for the seed format and the control API.
"""

import argparse
import asyncio
import base64
import binascii
import copy
import datetime
import email.utils
import fnmatch
import functools
import hashlib
import hmac
import http
import json
import os
import random
import re
import secrets
import signal
import socket
import ssl
import struct
import sys
import time
import traceback
import uuid
from urllib.parse import parse_qsl, unquote, unquote_to_bytes, urlsplit

import botocore.auth
import botocore.credentials

# ---------------------------------------------------------------------------------------
# Constants: namespaces, limits, defaults
# ---------------------------------------------------------------------------------------

EC2_NS = "http://ec2.amazonaws.com/doc/2016-11-15/"
STS_NS = "https://sts.amazonaws.com/doc/2011-06-15/"
RDS_NS = "http://rds.amazonaws.com/doc/2014-10-31/"
ELBV2_NS = "http://elasticloadbalancing.amazonaws.com/doc/2015-12-01/"
ELB_NS = "http://elasticloadbalancing.amazonaws.com/doc/2012-06-01/"
CW_NS = "http://monitoring.amazonaws.com/doc/2010-08-01/"
QUERY_NS = {"sts": STS_NS, "rds": RDS_NS, "elbv2": ELBV2_NS, "elb": ELB_NS, "monitoring": CW_NS}

# SigV4 service names in the credential scope and how they map to our handlers.
SCOPE_SERVICES = ("sts", "ec2", "rds", "elasticloadbalancing", "monitoring", "kms")

MAX_SKEW_SECONDS = 15 * 60
MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_HEAD_BYTES = 64 * 1024  # request line and headers
MAX_HEADERS = 100
MAX_CALL_LOG = 200000

DEFAULT_REGIONS = [
    "us-east-1", "us-east-2", "us-west-1", "us-west-2", "eu-west-1", "eu-west-2",
    "eu-central-1", "ap-southeast-1", "ap-southeast-2", "ap-northeast-1", "sa-east-1",
]

# EC2 MaxResults ranges where EC2 validates them; None means the action has no paging.
EC2_MAX_RESULTS = {
    "DescribeVolumes": (5, 500),
    "DescribeSnapshots": (5, 1000),
    "DescribeImages": (5, 1000),
    "DescribeInstances": (5, 1000),
    "DescribeNatGateways": (5, 1000),
    "DescribeNetworkInterfaces": (5, 1000),
}

INSTANCE_STATE_CODES = {
    "pending": 0, "running": 16, "shutting-down": 32, "terminated": 48,
    "stopping": 64, "stopped": 80,
}

RESOURCE_KINDS = (
    "volumes", "snapshots", "images", "addresses", "instances", "nat_gateways",
    "network_interfaces", "load_balancers", "target_groups", "classic_load_balancers",
    "db_instances", "db_snapshots", "metrics", "kms_keys",
)


class AwsError(Exception):
    """An error answered in the service's own error shape."""

    def __init__(self, code, message, status=400):
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


# ---------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------


def utcnow():
    return datetime.datetime.now(datetime.timezone.utc)


def parse_time(v):
    """An ISO-8601 string, epoch number or datetime → aware UTC datetime."""
    if v is None:
        return None
    if isinstance(v, datetime.datetime):
        return v if v.tzinfo else v.replace(tzinfo=datetime.timezone.utc)
    if isinstance(v, (int, float)):
        return datetime.datetime.fromtimestamp(v, datetime.timezone.utc)
    s = str(v).strip()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return datetime.datetime.fromtimestamp(float(s), datetime.timezone.utc)
    if s.endswith("Z"):
        s = s[:-1] + "+00:00"
    d = datetime.datetime.fromisoformat(s)
    return d if d.tzinfo else d.replace(tzinfo=datetime.timezone.utc)


def _iso(v):
    d = parse_time(v)
    if d is None:
        return None
    return d.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (
        d.microsecond // 1000)


_iso_cached = functools.lru_cache(maxsize=1 << 16)(_iso)


def iso(v):
    # Rendering formats the same seeded timestamps over and over: memoise (a pure function).
    try:
        return _iso_cached(v)
    except TypeError:  # unhashable input
        return _iso(v)


_ESC_NEEDED = re.compile(r'[&<>"]')


def esc(s):
    s = str(s)
    if _ESC_NEEDED.search(s) is None:  # the common case: nothing to escape
        return s
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def xbool(v):
    return "true" if v else "false"


def t(tag, value):
    """<tag>value</tag>, or nothing when value is None."""
    if value is None:
        return ""
    if value is True or value is False:
        value = xbool(value)
    return "<" + tag + ">" + esc(value) + "</" + tag + ">"


def n(tag, *parts):
    return "<%s>%s</%s>" % (tag, "".join(parts), tag)


def items(tag, seq, fn, item="item"):
    """n(tag, *(n(item, fn(x)) for x in seq)), with fewer calls per item."""
    head, tail = "<" + item + ">", "</" + item + ">"
    return "<" + tag + ">" + "".join([head + fn(x) + tail for x in seq]) + "</" + tag + ">"


def truthy(v):
    return str(v).lower() == "true"


def new_id(prefix, nhex=17):
    return prefix + secrets.token_hex((nhex + 1) // 2)[:nhex]


def key_id(prefix):
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    return prefix + "".join(secrets.choice(alphabet) for _ in range(16))


# indexed() and groups() take the keys a regex "prefix\.(\d+)$" / "prefix\.(\d+)\.(.+)$" would
# (\d is isdecimal(); "$" also matches before one final newline), without a regex per key.


def indexed(params, prefix):
    """Values of prefix.1, prefix.2, ... in index order (AWS's flattened lists)."""
    head = prefix + "."
    cut = len(head)
    out = []
    for k, v in params.items():
        if k.startswith(head):
            i = k[cut:]
            if i.isdecimal() or (i[-1:] == "\n" and i[:-1].isdecimal()):
                out.append((int(i), v))
    return [v for _, v in sorted(out)]


def groups(params, prefix):
    """Structures prefix.N.rest → [{rest: value}] in index order."""
    head = prefix + "."
    cut = len(head)
    out = {}
    by_text = {}  # N as written → its structure (int("01") == int("1"): they merge)
    for k, v in params.items():
        if k.startswith(head):
            i, _, rest = k[cut:].partition(".")
            if not rest or "\n" in rest:
                if rest[:-1] == "" or rest.index("\n") != len(rest) - 1:
                    continue
                rest = rest[:-1]
            g = by_text.get(i)
            if g is None:
                if not i.isdecimal():
                    continue
                g = by_text[i] = out.setdefault(int(i), {})
            g[rest] = v
    return [out[i] for i in sorted(out)]


def tags_of(res):
    return res.get("Tags") or []


def norm_tags(v):
    if isinstance(v, dict):
        return [{"Key": k, "Value": str(val)} for k, val in v.items()]
    return [{"Key": x["Key"], "Value": str(x.get("Value", ""))} for x in (v or [])]


def ec2_tagset(res):
    return items("tagSet", tags_of(res), lambda tg: t("key", tg["Key"]) + t("value", tg["Value"]))


def int_param(params, name, lo=None, hi=None, code="InvalidParameterValue", label=None):
    v = params.get(name)
    if v is None or v == "":
        return None
    try:
        i = int(v)
    except ValueError:
        raise AwsError(code, "Invalid value '%s' for %s" % (v, label or name))
    if lo is not None and i < lo:
        raise AwsError(code, "Value ( %d ) for parameter %s is invalid. Expecting a value "
                       "greater than %d." % (i, label or name, lo))
    if hi is not None and i > hi:
        raise AwsError(code, "Value ( %d ) for parameter %s is invalid. Expecting a value "
                       "less than or equal to %d." % (i, label or name, hi))
    return i


def encode_token(kind, offset):
    raw = json.dumps({"k": kind, "o": offset}).encode()
    return base64.urlsafe_b64encode(raw).decode()


def decode_token(token, kind, code="InvalidParameterValue", what="NextToken"):
    try:
        d = json.loads(base64.urlsafe_b64decode(token.encode()))
        if d["k"] != kind or not isinstance(d["o"], int) or d["o"] < 0:
            raise ValueError
        return d["o"]
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise AwsError(code, "Invalid %s: %s" % (what, token))


def paginate(seq, token, limit, kind, code="InvalidParameterValue", what="NextToken"):
    start = decode_token(token, kind, code, what) if token else 0
    page = seq[start:start + limit]
    nxt = encode_token(kind, start + limit) if start + limit < len(seq) else None
    return page, nxt


# ---------------------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------------------


class State:
    """Everything the fake knows. Only the event loop's thread touches it."""

    def __init__(self, kms_seed):
        self.kms_master = hashlib.sha256(b"cloudsweep-fake-kms:" + kms_seed.encode()).digest()
        self.held = set()  # wake() of each request a hang fault holds
        self.reset()

    def reset(self):
        render_invalidate()
        self.accounts = {}
        self.keys = {}  # access key id → credential record
        self.regions = list(DEFAULT_REGIONS)
        self.page_size = 1000
        self.faults = []
        self.fault_rng = random.Random(0)
        self.calls = []
        self.call_seq = 0
        self.in_flight = getattr(self, "in_flight", 0)  # requests being served now
        self.max_in_flight = 0  # the most served at once since the last reset
        self.release()

    def hold(self, wake):
        """Holds a hung request until release() calls wake() (a wake() that runs first, its
        time being up, takes itself out)."""
        self.held.add(wake)

    def release(self):
        """Wakes every request a hang fault holds (a reset or a new fault set)."""
        held, self.held = self.held, set()
        for wake in held:
            wake()

    # -- seeding --------------------------------------------------------------------------

    def seed(self, doc):
        render_invalidate()
        if "page_size" in doc:
            self.page_size = max(1, int(doc["page_size"]))
        if "regions" in doc:
            self.regions = list(doc["regions"])
        for acct_id, a in (doc.get("accounts") or {}).items():
            if not re.fullmatch(r"\d{12}", acct_id):
                raise ValueError("account id must be 12 digits: %r" % acct_id)
            self._seed_account(acct_id, a)

    def _seed_account(self, acct_id, a):
        acct = self.accounts.setdefault(acct_id, {"id": acct_id, "roles": {}, "regions": {}})
        for k in a.get("access_keys") or []:
            kid = k.get("id") or key_id("AKIA")
            secret = k.get("secret") or secrets.token_urlsafe(30)
            user = k.get("user", "cloudsweep")
            self.keys[kid] = {
                "kind": "user", "id": kid, "secret": secret, "account": acct_id,
                "arn": "arn:aws:iam::%s:user/%s" % (acct_id, user),
                "user_id": "AIDA" + hashlib.sha1(kid.encode()).hexdigest()[:17].upper(),
                "deny": list(k.get("deny") or []), "token": None, "expiration": None,
            }
        for r in a.get("roles") or []:
            name = r.get("name") or r["arn"].split("/")[-1]
            arn = r.get("arn") or "arn:aws:iam::%s:role/%s" % (acct_id, name)
            acct["roles"][arn] = {
                "arn": arn, "name": name,
                "external_id": r.get("external_id"),
                "trusted_accounts": r.get("trusted_accounts"),
                "max_session_duration": int(r.get("max_session_duration", 3600)),
                "deny": list(r.get("deny") or []),
                "role_id": "AROA" + hashlib.sha1(arn.encode()).hexdigest()[:17].upper(),
            }
        for region, res in (a.get("regions") or {}).items():
            reg = self.region(acct_id, region)
            for kind, lst in res.items():
                if kind not in RESOURCE_KINDS:
                    raise ValueError("unknown resource kind %r" % kind)
                for item in lst:
                    reg[kind].append(normalise(kind, copy.deepcopy(item), acct_id, region))

    def region(self, acct_id, region):
        acct = self.accounts.get(acct_id)
        if acct is None:
            acct = self.accounts[acct_id] = {"id": acct_id, "roles": {}, "regions": {}}
        reg = acct["regions"].get(region)
        if reg is None:
            reg = acct["regions"][region] = {k: [] for k in RESOURCE_KINDS}
        return reg

    def snapshot(self):
        return {
            "page_size": self.page_size, "regions": self.regions,
            "accounts": self.accounts,
            "credentials": [
                {k: v for k, v in c.items()} for c in self.keys.values()
            ],
            "faults": self.faults,
        }

    # -- call log -------------------------------------------------------------------------

    def log_call(self, entry):
        self.call_seq += 1
        entry["seq"] = self.call_seq
        self.calls.append(entry)
        if len(self.calls) > MAX_CALL_LOG:
            del self.calls[: len(self.calls) - MAX_CALL_LOG]
        return entry

    # -- faults ---------------------------------------------------------------------------

    def pick_faults(self, service, action, region, account):
        """The latency to add and the one non-latency fault (or None) for this call."""
        latency = 0
        chosen = None
        for rule in list(self.faults):
            if not _fault_matches(rule, service, action, region, account):
                continue
            if rule["type"] != "latency" and chosen is not None:
                continue
            if rule.get("skip", 0) > 0:
                rule["skip"] -= 1
                continue
            frac = rule.get("fraction")
            if frac is not None and self.fault_rng.random() >= float(frac):
                continue
            rule["hits"] = rule.get("hits", 0) + 1
            if rule.get("count") is not None:
                rule["count"] -= 1
                if rule["count"] <= 0:
                    self.faults.remove(rule)
            if rule["type"] == "latency":
                latency += int(rule.get("ms", 0))
            else:
                chosen = dict(rule)
        return latency, chosen


def _fault_matches(rule, service, action, region, account):
    for field, value in (("service", service), ("action", action), ("region", region),
                         ("account", account)):
        want = rule.get(field, "*")
        if want not in ("*", None) and want != value:
            return False
    return True


FAULT_TYPES = ("latency", "throttle", "error", "reset", "malformed", "truncated", "hang")


def normalise(kind, r, acct, region):
    """Fills the defaults a real resource would carry so every shape renders."""
    now = iso(utcnow())
    r["Tags"] = norm_tags(r.get("Tags"))
    az = r.get("AvailabilityZone") or region + "a"
    if kind == "volumes":
        r.setdefault("VolumeId", new_id("vol-"))
        r.setdefault("Size", 8)
        r.setdefault("VolumeType", "gp3")
        r.setdefault("AvailabilityZone", az)
        r.setdefault("CreateTime", now)
        r.setdefault("Encrypted", False)
        r["Attachments"] = r.get("Attachments") or []
        for att in r["Attachments"]:
            att.setdefault("State", "attached")
            att.setdefault("Device", "/dev/xvda")
            att.setdefault("AttachTime", r["CreateTime"])
            att.setdefault("DeleteOnTermination", False)
        r.setdefault("State", "in-use" if r["Attachments"] else "available")
    elif kind == "snapshots":
        r.setdefault("SnapshotId", new_id("snap-"))
        r.setdefault("VolumeId", "vol-ffffffff")
        r.setdefault("State", "completed")
        r.setdefault("StartTime", now)
        r.setdefault("Progress", "100%")
        r.setdefault("OwnerId", acct)
        r.setdefault("VolumeSize", 8)
        r.setdefault("Description", "")
        r.setdefault("Encrypted", False)
        r.setdefault("StorageTier", "standard")
    elif kind == "images":
        r.setdefault("ImageId", new_id("ami-"))
        r.setdefault("Name", r["ImageId"])
        r.setdefault("State", "available")
        r.setdefault("OwnerId", acct)
        r.setdefault("CreationDate", now)
        r.setdefault("Public", False)
        r.setdefault("Architecture", "x86_64")
        r.setdefault("ImageType", "machine")
        r.setdefault("RootDeviceType", "ebs")
        r.setdefault("RootDeviceName", "/dev/xvda")
        r.setdefault("VirtualizationType", "hvm")
        bdm = r.get("BlockDeviceMappings") or []
        for sid in r.pop("SnapshotIds", []):
            bdm.append({"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": sid}})
        for b in bdm:
            b.setdefault("DeviceName", "/dev/xvda")
            if "Ebs" in b:
                b["Ebs"].setdefault("VolumeSize", 8)
                b["Ebs"].setdefault("VolumeType", "gp3")
                b["Ebs"].setdefault("DeleteOnTermination", True)
                b["Ebs"].setdefault("Encrypted", False)
        r["BlockDeviceMappings"] = bdm
    elif kind == "addresses":
        r.setdefault("AllocationId", new_id("eipalloc-"))
        r.setdefault("PublicIp", "198.51.100.%d" % random.randint(1, 254))
        r.setdefault("Domain", "vpc")
        r.setdefault("PublicIpv4Pool", "amazon")
        r.setdefault("NetworkBorderGroup", region)
        if r.get("InstanceId") or r.get("NetworkInterfaceId"):
            r.setdefault("AssociationId", new_id("eipassoc-"))
    elif kind == "instances":
        r.setdefault("InstanceId", new_id("i-"))
        r.setdefault("ImageId", "ami-00000000")
        r.setdefault("InstanceType", "t3.micro")
        st = r.pop("State", "running")
        r["State"] = st if isinstance(st, str) else st.get("Name", "running")
        r.setdefault("LaunchTime", now)
        if r.get("StopTime") and not r.get("StateTransitionReason"):
            r["StateTransitionReason"] = "User initiated (%s GMT)" % (
                parse_time(r["StopTime"]).strftime("%Y-%m-%d %H:%M:%S"))
        r.setdefault("StateTransitionReason", "")
        r.setdefault("AvailabilityZone", az)
        r.setdefault("OwnerId", acct)
        r.setdefault("ReservationId", new_id("r-"))
        r.setdefault("PrivateIpAddress", "10.0.0.%d" % random.randint(2, 254))
        r["BlockDeviceMappings"] = r.get("BlockDeviceMappings") or []
    elif kind == "nat_gateways":
        r.setdefault("NatGatewayId", new_id("nat-"))
        r.setdefault("State", "available")
        r.setdefault("CreateTime", now)
        r.setdefault("VpcId", "vpc-00000000")
        r.setdefault("SubnetId", "subnet-00000000")
        r.setdefault("ConnectivityType", "public")
        r["NatGatewayAddresses"] = r.get("NatGatewayAddresses") or []
    elif kind == "network_interfaces":
        r.setdefault("NetworkInterfaceId", new_id("eni-"))
        r.setdefault("AvailabilityZone", az)
        r.setdefault("VpcId", "vpc-00000000")
        r.setdefault("SubnetId", "subnet-00000000")
        r.setdefault("Description", "")
        r.setdefault("OwnerId", acct)
        r.setdefault("RequesterManaged", False)
        r.setdefault("InterfaceType", "interface")
        r.setdefault("MacAddress", "02:00:00:%02x:%02x:%02x" % tuple(os.urandom(3)))
        r.setdefault("PrivateIpAddress", "10.0.1.%d" % random.randint(2, 254))
        r.setdefault("SourceDestCheck", True)
        att = r.get("Attachment")
        if att:
            att.setdefault("AttachmentId", new_id("eni-attach-"))
            att.setdefault("DeviceIndex", 0)
            att.setdefault("Status", "attached")
            att.setdefault("AttachTime", now)
            att.setdefault("DeleteOnTermination", True)
            att.setdefault("InstanceOwnerId", acct)
        r.setdefault("Status", "in-use" if att else "available")
    elif kind == "load_balancers":
        name = r.setdefault("LoadBalancerName", new_id("lb-", 8))
        r.setdefault("Type", "application")
        r.setdefault("LoadBalancerArn", "arn:aws:elasticloadbalancing:%s:%s:loadbalancer/%s/%s/%s"
                     % (region, acct, "app" if r["Type"] == "application" else "net", name,
                        secrets.token_hex(8)))
        r.setdefault("DNSName", "%s-%d.%s.elb.amazonaws.com" % (name, random.randint(1, 10**9),
                                                              region))
        r.setdefault("CanonicalHostedZoneId", "Z35SXDOTRQ7X7K")
        r.setdefault("CreatedTime", now)
        r.setdefault("Scheme", "internet-facing")
        r.setdefault("VpcId", "vpc-00000000")
        r.setdefault("State", "active")
        r.setdefault("IpAddressType", "ipv4")
        r.setdefault("DeletionProtection", False)
        r.setdefault("AvailabilityZones", [{"ZoneName": region + "a",
                                            "SubnetId": "subnet-00000000"}])
    elif kind == "target_groups":
        name = r.setdefault("TargetGroupName", new_id("tg-", 8))
        r.setdefault("TargetGroupArn", "arn:aws:elasticloadbalancing:%s:%s:targetgroup/%s/%s"
                     % (region, acct, name, secrets.token_hex(8)))
        r.setdefault("Protocol", "HTTP")
        r.setdefault("Port", 80)
        r.setdefault("VpcId", "vpc-00000000")
        r.setdefault("TargetType", "instance")
        r["LoadBalancerArns"] = r.get("LoadBalancerArns") or []
        r["Targets"] = r.get("Targets") or []
        for tg in r["Targets"]:
            tg.setdefault("Port", r["Port"])
            tg.setdefault("State", "healthy")
    elif kind == "classic_load_balancers":
        name = r.setdefault("LoadBalancerName", new_id("clb-", 8))
        r.setdefault("DNSName", "%s-%d.%s.elb.amazonaws.com" % (name, random.randint(1, 10**9),
                                                              region))
        r.setdefault("CreatedTime", now)
        r.setdefault("Scheme", "internet-facing")
        r.setdefault("VPCId", "vpc-00000000")
        r.setdefault("AvailabilityZones", [region + "a"])
        r["Instances"] = r.get("Instances") or []
        for i in r["Instances"]:
            i.setdefault("State", "InService")
    elif kind == "db_instances":
        ident = r.setdefault("DBInstanceIdentifier", new_id("db-", 8))
        r.setdefault("DBInstanceClass", "db.t3.micro")
        r.setdefault("Engine", "postgres")
        r.setdefault("EngineVersion", "15.4")
        r.setdefault("DBInstanceStatus", "available")
        r.setdefault("MasterUsername", "admin")
        r.setdefault("AllocatedStorage", 20)
        r.setdefault("StorageType", "gp3")
        r.setdefault("InstanceCreateTime", now)
        r.setdefault("MultiAZ", False)
        r.setdefault("DeletionProtection", False)
        r.setdefault("AvailabilityZone", az)
        r.setdefault("DBInstanceArn", "arn:aws:rds:%s:%s:db:%s" % (region, acct, ident))
        r.setdefault("Endpoint", {"Address": "%s.abc.%s.rds.amazonaws.com" % (ident, region),
                                  "Port": 5432})
    elif kind == "metrics":
        r.setdefault("Dimensions", {})
        if isinstance(r["Dimensions"], list):
            r["Dimensions"] = {d["Name"]: d["Value"] for d in r["Dimensions"]}
        r["Datapoints"] = [{"Timestamp": iso(d["Timestamp"]), "Value": float(d["Value"])}
                           for d in r.get("Datapoints") or []]
    elif kind == "kms_keys":
        r.setdefault("KeyId", str(uuid.uuid4()))
        r.setdefault("Arn", "arn:aws:kms:%s:%s:key/%s" % (region, acct, r["KeyId"]))
        r.setdefault("KeyState", "Enabled")
        r["Aliases"] = r.get("Aliases") or []
    return r


# ---------------------------------------------------------------------------------------
# Authentication: SigV4 recomputed with botocore
# ---------------------------------------------------------------------------------------

AUTH_RE = re.compile(
    r"^AWS4-HMAC-SHA256\s+Credential=([^,\s]+)\s*,\s*SignedHeaders=([^,\s]+)\s*,\s*"
    r"Signature=([0-9a-fA-F]+)\s*$")


class SignedHeaders(dict):
    """Signed header name (lower case) → its values in the order received: what botocore's
    SigV4Auth reads from its HTTPHeaders (get_all, and a case-insensitive `in` and [])."""

    def get_all(self, name):
        return dict.__getitem__(self, name)

    def __contains__(self, name):
        return dict.__contains__(self, name.lower())

    def __getitem__(self, name):
        return dict.__getitem__(self, name.lower())[0]


class ReceivedRequest:
    """The parts of a received request botocore's SigV4Auth.canonical_request reads."""

    __slots__ = ("method", "url", "params", "headers", "body", "context")

    def __init__(self, method, url, params, headers, body, timestamp):
        self.method = method
        self.url = url
        self.params = params
        self.headers = headers  # a SignedHeaders of the signed headers only
        self.body = body
        self.context = {"timestamp": timestamp}


class ReceivedRequestSigner(botocore.auth.SigV4Auth):
    """botocore's SigV4 over a received request: the headers are the ones the client said it
    signed, and the signing key is derived once per day (the last HMAC is per call)."""

    _signers = {}  # (access key, secret, region, service) → signer

    def __init__(self, credentials, service_name, region_name):
        super().__init__(credentials, service_name, region_name)
        self._day = self._k_signing = None

    @classmethod
    def get(cls, access_key, secret, region, service):
        key = (access_key, secret, region, service)
        signer = cls._signers.get(key)
        if signer is None:
            if len(cls._signers) >= 100000:
                cls._signers.clear()
            signer = cls._signers[key] = cls(
                botocore.credentials.ReadOnlyCredentials(access_key, secret, None), service,
                region)
        return signer

    def signature(self, string_to_sign, request):
        day = request.context["timestamp"][0:8]
        if day != self._day:
            k_date = self._sign(("AWS4" + self.credentials.secret_key).encode(), day)
            self._k_signing = self._sign(self._sign(self._sign(
                k_date, self._region_name), self._service_name), "aws4_request")
            self._day = day
        return self._sign(self._k_signing, string_to_sign, hex=True)

    def headers_to_sign(self, request):
        return request.headers


class Identity:
    def __init__(self, cred):
        self.cred = cred
        self.account = cred["account"]
        self.arn = cred["arn"]
        self.access_key = cred["id"]
        self.deny = cred.get("deny") or []

    def allowed(self, perm):
        return not any(fnmatch.fnmatchcase(perm, pat) for pat in self.deny)


def auth_error(service, kind, message=None):
    """The code, status and message AWS answers for an authentication failure."""
    if service == "kms":
        table = {
            "missing": ("MissingAuthenticationTokenException", 400,
                        "Missing Authentication Token"),
            "incomplete": ("IncompleteSignatureException", 400, message),
            "unknown": ("UnrecognizedClientException", 400,
                        "The security token included in the request is invalid."),
            "signature": ("InvalidSignatureException", 400,
                          "The request signature we calculated does not match the signature "
                          "you provided. Check your AWS Secret Access Key and signing method. "
                          "Consult the service documentation for details."),
            "skew": ("InvalidSignatureException", 400, message),
            "expired": ("ExpiredTokenException", 400,
                        "The security token included in the request is expired"),
        }
    elif service == "ec2":
        table = {
            "missing": ("MissingAuthenticationToken", 401,
                        "Request is missing Authentication Token"),
            "incomplete": ("IncompleteSignature", 400, message),
            "unknown": ("AuthFailure", 401,
                        "AWS was not able to validate the provided access credentials"),
            "signature": ("SignatureDoesNotMatch", 403,
                          "The request signature we calculated does not match the signature "
                          "you provided. Check your AWS Secret Access Key and signing method. "
                          "Consult the service documentation for details."),
            "skew": ("RequestExpired", 400, "Request has expired."),
            "expired": ("RequestExpired", 400, "Request has expired."),
        }
    else:
        table = {
            "missing": ("MissingAuthenticationToken", 403, "Request is missing Authentication Token"),
            "incomplete": ("IncompleteSignature", 400, message),
            "unknown": ("InvalidClientTokenId", 403,
                        "The security token included in the request is invalid."),
            "signature": ("SignatureDoesNotMatch", 403,
                          "The request signature we calculated does not match the signature "
                          "you provided. Check your AWS Secret Access Key and signing method. "
                          "Consult the service documentation for details."),
            "skew": ("SignatureDoesNotMatch", 403, message),
            "expired": ("ExpiredToken", 403,
                        "The security token included in the request is expired"),
        }
    code, status, msg = table[kind]
    return AwsError(code, message if kind == "signature" and message else msg, status)


AMZ_DATE = re.compile(r"[0-9]{8}T[0-9]{6}Z")


def parse_amz_date(value):
    """X-Amz-Date → aware UTC datetime, as strptime "%Y%m%dT%H%M%SZ" (which is slow)."""
    if AMZ_DATE.fullmatch(value) is None:  # anything unusual: strptime's own verdict
        return datetime.datetime.strptime(value, "%Y%m%dT%H%M%SZ").replace(
            tzinfo=datetime.timezone.utc)
    return datetime.datetime(int(value[0:4]), int(value[4:6]), int(value[6:8]),
                             int(value[9:11]), int(value[11:13]), int(value[13:15]),
                             tzinfo=datetime.timezone.utc)


def authenticate(state, req, service, region, auth):
    """Verifies the request's SigV4 signature; returns the caller's Identity or raises."""
    if auth is None:
        raise auth_error(service, "missing")
    access_key, signed_headers, signature = auth["access_key"], auth["signed"], auth["signature"]
    cred = state.keys.get(access_key)
    if cred is None:
        raise auth_error(service, "unknown")
    token = req.header("x-amz-security-token")
    if cred["kind"] == "session":
        if not token or not hmac.compare_digest(token, cred["token"]):
            raise auth_error(service, "unknown")
        if utcnow() >= parse_time(cred["expiration"]):
            raise auth_error(service, "expired")
    elif token:
        raise auth_error(service, "unknown")

    amz_date = req.header("x-amz-date")
    if not amz_date:
        raise auth_error(service, "incomplete",
                         "Authorization header requires existence of either a 'X-Amz-Date' or "
                         "a 'Date' header. Authorization=%s" % req.header("authorization"))
    try:
        when = parse_amz_date(amz_date)
    except ValueError:
        raise auth_error(service, "incomplete",
                         "Date must be in ISO-8601 'basic format'. Got '%s'." % amz_date)
    if auth["date"] != amz_date[:8]:
        raise auth_error(service, "signature",
                         "Date in Credential scope does not match YYYYMMDD from ISO-8601 "
                         "version of date from HTTP: '%s' != '%s', from '%s'."
                         % (auth["date"], amz_date[:8], amz_date))
    if "host" not in signed_headers:
        raise auth_error(service, "signature",
                         "'Host' or ':authority' must be a 'SignedHeader' in the "
                         "AWS Authorization.")
    now = utcnow()
    fmt = lambda d: d.strftime("%Y%m%dT%H%M%SZ")
    if (now - when).total_seconds() > MAX_SKEW_SECONDS:
        raise auth_error(service, "skew",
                         "Signature expired: %s is now earlier than %s (%s - 15 min.)"
                         % (amz_date, fmt(now - datetime.timedelta(minutes=15)), fmt(now)))
    if (when - now).total_seconds() > MAX_SKEW_SECONDS:
        raise auth_error(service, "skew",
                         "Signature not yet current: %s is still later than %s (%s + 15 min.)"
                         % (amz_date, fmt(now + datetime.timedelta(minutes=15)), fmt(now)))
    for h in signed_headers:
        if req.header(h) is None:
            raise auth_error(service, "signature")

    claimed = req.header("x-amz-content-sha256")
    if claimed is not None and claimed != hashlib.sha256(req.body).hexdigest():
        raise auth_error(service, "signature")

    # botocore builds the canonical request (and hashes the body when no signed
    # X-Amz-Content-SHA256 gives it) from the signed headers, as received.
    headers = SignedHeaders()
    for name, value in req.headers:
        lname = name.lower()
        if lname in signed_headers:
            headers.setdefault(lname, []).append(value)
    areq = ReceivedRequest(req.method, "http://%s%s" % (req.header("host"), unquote(req.path)),
                           req.query_pairs, headers, req.body, amz_date)
    signer = ReceivedRequestSigner.get(access_key, cred["secret"], auth["region"],
                                       auth["service"])
    canonical = signer.canonical_request(areq)
    expected = signer.signature(signer.string_to_sign(areq, canonical), areq)
    if not hmac.compare_digest(expected, signature.lower()):
        raise auth_error(service, "signature")
    return Identity(cred)


def parse_authorization(value):
    """The parts of a SigV4 Authorization header, or raises IncompleteSignature."""
    m = AUTH_RE.match(value.strip())
    if not m:
        raise AwsError("IncompleteSignature",
                       "Authorization header requires 'Credential', 'SignedHeaders' and "
                       "'Signature' parameters. Authorization=%s" % value.split(" ")[0])
    cred, signed, sig = m.groups()
    parts = cred.split("/")
    if len(parts) != 5 or parts[4] != "aws4_request":
        raise AwsError("IncompleteSignature",
                       "Credential should be scoped to a valid region, not '%s'." % cred)
    return {"access_key": parts[0], "date": parts[1], "region": parts[2], "service": parts[3],
            "signed": signed.lower().split(";"), "signature": sig}


# ---------------------------------------------------------------------------------------
# Response rendering
# ---------------------------------------------------------------------------------------


def ec2_ok(action, reqid, body):
    return ('<?xml version="1.0" encoding="UTF-8"?>\n<%sResponse xmlns="%s">%s%s</%sResponse>'
            % (action, EC2_NS, t("requestId", reqid), body, action))


def query_ok(service, action, reqid, body):
    return ('<%sResponse xmlns="%s"><%sResult>%s</%sResult><ResponseMetadata>%s'
            '</ResponseMetadata></%sResponse>'
            % (action, QUERY_NS[service], action, body, action, t("RequestId", reqid), action))


def render_error(service, err, reqid):
    """(status, body bytes, content type) of an error in the service's protocol."""
    if service == "kms":
        body = json.dumps({"__type": err.code, "message": err.message})
        return err.status, body.encode(), "application/x-amz-json-1.1"
    if service == "ec2":
        body = ('<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error>%s%s'
                '</Error></Errors>%s</Response>'
                % (t("Code", err.code), t("Message", err.message), t("RequestID", reqid)))
        return err.status, body.encode(), "text/xml;charset=UTF-8"
    ns = QUERY_NS.get(service, STS_NS)
    kind = "Receiver" if err.status >= 500 else "Sender"
    body = ('<ErrorResponse xmlns="%s"><Error>%s%s%s</Error>%s</ErrorResponse>'
            % (ns, t("Type", kind), t("Code", err.code), t("Message", err.message),
               t("RequestId", reqid)))
    return err.status, body.encode(), "text/xml"


def fault_error(service, fault):
    ftype = fault["type"]
    if ftype == "throttle":
        if service == "ec2":
            return AwsError(fault.get("code", "RequestLimitExceeded"), "Request limit exceeded.",
                            int(fault.get("status", 503)))
        if service == "kms":
            return AwsError(fault.get("code", "ThrottlingException"), "Rate exceeded",
                            int(fault.get("status", 400)))
        return AwsError(fault.get("code", "Throttling"), "Rate exceeded",
                        int(fault.get("status", 400)))
    status = int(fault.get("status", 500))
    if service == "kms":
        default = "KMSInternalException" if status == 500 else "ServiceUnavailableException"
    elif status == 503:
        default = "Unavailable" if service == "ec2" else "ServiceUnavailable"
    else:
        default = "InternalError" if service == "ec2" else "InternalFailure"
    return AwsError(fault.get("code", default),
                    fault.get("message", "An internal error has occurred"), status)


# ---------------------------------------------------------------------------------------
# The request context passed to action handlers
# ---------------------------------------------------------------------------------------


class Ctx:
    def __init__(self, state, ident, service, region, action, params):
        self.state = state
        self.ident = ident
        self.service = service
        self.region = region
        self.action = action
        self.params = params
        self.reg = state.region(ident.account, region)

    def p(self, name, default=None):
        return self.params.get(name, default)

    def require(self, name, code="MissingParameter"):
        v = self.params.get(name)
        if v is None or v == "":
            raise AwsError(code, "The request must contain the parameter %s" % name)
        return v

    def permit(self, perm, code="UnauthorizedOperation"):
        if not self.ident.allowed(perm):
            if self.service == "ec2":
                raise AwsError("UnauthorizedOperation",
                               "You are not authorized to perform this operation.", 403)
            if self.service == "kms":
                raise AwsError("AccessDeniedException",
                               "User: %s is not authorized to perform: %s" % (self.ident.arn,
                                                                              perm), 400)
            raise AwsError("AccessDenied", "User: %s is not authorized to perform: %s"
                           % (self.ident.arn, perm), 403)

    def page_limit(self, given):
        return given if given is not None else self.state.page_size


# ---------------------------------------------------------------------------------------
# STS
# ---------------------------------------------------------------------------------------


def sts_assume_role(c):
    role_arn = c.require("RoleArn")
    session = c.require("RoleSessionName")
    m = re.fullmatch(r"arn:aws:iam::(\d{12}):role/(?:[\w+=,.@/-]+/)?([\w+=,.@-]+)", role_arn)
    if not m:
        raise AwsError("ValidationError", "%s is invalid" % role_arn)
    if not re.fullmatch(r"[\w+=,.@-]{2,64}", session):
        raise AwsError("ValidationError",
                       "1 validation error detected: Value '%s' at 'roleSessionName' failed to "
                       "satisfy constraint: Member must satisfy regular expression pattern: "
                       "[\\w+=,.@-]*" % session)
    ext = c.p("ExternalId")
    if ext is not None and not (2 <= len(ext) <= 1224):
        raise AwsError("ValidationError", "1 validation error detected: Value at 'externalId' "
                       "failed to satisfy constraint: Member must have length between 2 and "
                       "1224")
    duration = int_param(c.params, "DurationSeconds", code="ValidationError") or 3600
    if duration < 900 or duration > 43200:
        raise AwsError("ValidationError", "1 validation error detected: Value '%d' at "
                       "'durationSeconds' failed to satisfy constraint: Member must have value "
                       "greater than or equal to 900" % duration)
    denied = AwsError("AccessDenied", "User: %s is not authorized to perform: sts:AssumeRole "
                      "on resource: %s" % (c.ident.arn, role_arn), 403)
    if not c.ident.allowed("sts:AssumeRole"):
        raise denied
    acct = c.state.accounts.get(m.group(1))
    role = acct["roles"].get(role_arn) if acct else None
    if role is None:
        raise denied
    if role["trusted_accounts"] is not None and c.ident.account not in role["trusted_accounts"]:
        raise denied
    if role["external_id"] is not None and ext != role["external_id"]:
        raise denied
    chained = c.ident.cred["kind"] == "session"
    limit = 3600 if chained else role["max_session_duration"]
    if duration > limit:
        raise AwsError("ValidationError", "The requested DurationSeconds exceeds the "
                       "%s set for this role." % ("1 hour session limit for roles assumed by "
                                                  "role chaining" if chained
                                                  else "MaxSessionDuration"))
    expiration = utcnow().replace(microsecond=0) + datetime.timedelta(seconds=duration)
    kid = key_id("ASIA")
    cred = {
        "kind": "session", "id": kid, "secret": secrets.token_urlsafe(30),
        "token": "FQoGZXIvYXdzE" + base64.b64encode(os.urandom(96)).decode(),
        "expiration": iso(expiration), "account": m.group(1),
        "arn": "arn:aws:sts::%s:assumed-role/%s/%s" % (m.group(1), role["name"], session),
        "user_id": "%s:%s" % (role["role_id"], session), "deny": role["deny"],
        "role_arn": role_arn, "external_id": ext, "source_identity": c.p("SourceIdentity"),
        "assumed_by": c.ident.access_key,
    }
    c.state.keys[kid] = cred
    body = (t("SourceIdentity", c.p("SourceIdentity"))
            + n("AssumedRoleUser", t("AssumedRoleId", cred["user_id"]), t("Arn", cred["arn"]))
            + n("Credentials", t("AccessKeyId", kid), t("SecretAccessKey", cred["secret"]),
                t("SessionToken", cred["token"]), t("Expiration", iso(expiration))))
    return body


def sts_get_caller_identity(c):
    cred = c.ident.cred
    return t("Arn", cred["arn"]) + t("UserId", cred["user_id"]) + t("Account", c.ident.account)


# ---------------------------------------------------------------------------------------
# EC2
# ---------------------------------------------------------------------------------------


def tag_values(res, key):
    return [tg["Value"] for tg in tags_of(res) if tg["Key"] == key]


EC2_FILTERS = {
    "volumes": {
        "status": lambda r: [r["State"]],
        "volume-id": lambda r: [r["VolumeId"]],
        "volume-type": lambda r: [r["VolumeType"]],
        "size": lambda r: [str(r["Size"])],
        "availability-zone": lambda r: [r["AvailabilityZone"]],
        "encrypted": lambda r: [xbool(r["Encrypted"])],
        "snapshot-id": lambda r: [r.get("SnapshotId", "")],
        "attachment.instance-id": lambda r: [a.get("InstanceId") for a in r["Attachments"]],
        "attachment.status": lambda r: [a.get("State") for a in r["Attachments"]],
    },
    "snapshots": {
        "status": lambda r: [r["State"]],
        "snapshot-id": lambda r: [r["SnapshotId"]],
        "volume-id": lambda r: [r["VolumeId"]],
        "owner-id": lambda r: [r["OwnerId"]],
        "description": lambda r: [r["Description"]],
        "encrypted": lambda r: [xbool(r["Encrypted"])],
        "storage-tier": lambda r: [r["StorageTier"]],
    },
    "images": {
        "image-id": lambda r: [r["ImageId"]],
        "state": lambda r: [r["State"]],
        "owner-id": lambda r: [r["OwnerId"]],
        "name": lambda r: [r["Name"]],
        "is-public": lambda r: [xbool(r["Public"])],
        "image-type": lambda r: [r["ImageType"]],
        "block-device-mapping.snapshot-id": lambda r: [
            b["Ebs"].get("SnapshotId") for b in r["BlockDeviceMappings"] if "Ebs" in b],
    },
    "addresses": {
        "allocation-id": lambda r: [r["AllocationId"]],
        "association-id": lambda r: [r.get("AssociationId")],
        "instance-id": lambda r: [r.get("InstanceId")],
        "network-interface-id": lambda r: [r.get("NetworkInterfaceId")],
        "public-ip": lambda r: [r["PublicIp"]],
        "domain": lambda r: [r["Domain"]],
    },
    "instances": {
        "instance-id": lambda r: [r["InstanceId"]],
        "instance-state-name": lambda r: [r["State"]],
        "instance-state-code": lambda r: [str(INSTANCE_STATE_CODES.get(r["State"], 0))],
        "instance-type": lambda r: [r["InstanceType"]],
        "image-id": lambda r: [r["ImageId"]],
        "owner-id": lambda r: [r["OwnerId"]],
        "vpc-id": lambda r: [r.get("VpcId")],
        "availability-zone": lambda r: [r["AvailabilityZone"]],
    },
    "nat_gateways": {
        "state": lambda r: [r["State"]],
        "nat-gateway-id": lambda r: [r["NatGatewayId"]],
        "vpc-id": lambda r: [r["VpcId"]],
        "subnet-id": lambda r: [r["SubnetId"]],
    },
    "network_interfaces": {
        "status": lambda r: [r["Status"]],
        "network-interface-id": lambda r: [r["NetworkInterfaceId"]],
        "vpc-id": lambda r: [r["VpcId"]],
        "subnet-id": lambda r: [r["SubnetId"]],
        "owner-id": lambda r: [r["OwnerId"]],
        "description": lambda r: [r["Description"]],
        "interface-type": lambda r: [r["InterfaceType"]],
        "requester-managed": lambda r: [xbool(r["RequesterManaged"])],
        "attachment.instance-id": lambda r: [(r.get("Attachment") or {}).get("InstanceId")],
        "attachment.status": lambda r: [(r.get("Attachment") or {}).get("Status")],
    },
}


def ec2_filter(c, kind, seq, param="Filter"):
    """Applies Filter.N.Name / Filter.N.Value.M like EC2 (values OR-ed, filters AND-ed)."""
    table = EC2_FILTERS[kind]
    for g in groups(c.params, param):
        name = g.get("Name")
        values = [v for k, v in sorted(g.items(), key=lambda kv: kv[0])
                  if re.fullmatch(r"Value\.\d+", k)]
        if name == "tag-key":
            fn = lambda r: [tg["Key"] for tg in tags_of(r)]
        elif name and name.startswith("tag:"):
            fn = (lambda key: lambda r: tag_values(r, key))(name[4:])
        elif name in table:
            fn = table[name]
        else:
            raise AwsError("InvalidParameterValue", "The filter '%s' is invalid" % name)
        seq = [r for r in seq
               if any(x is not None and fnmatch.fnmatchcase(str(x), v)
                      for x in fn(r) for v in values)]
    return seq


def ec2_page(c, seq, ids):
    lo, hi = EC2_MAX_RESULTS[c.action]
    given = int_param(c.params, "MaxResults", lo, hi, label="maxResults")
    if given is not None and ids:
        raise AwsError("InvalidParameterCombination", "The parameter %s cannot be used with "
                       "the parameter maxResults" % ids)
    return paginate(seq, c.p("NextToken"), c.page_limit(given), c.action)


def ec2_by_ids(c, kind, field, ids, code, what):
    seq = list(c.reg[kind])
    if ids:
        have = {r[field] for r in seq}
        missing = [i for i in ids if i not in have]
        if missing:
            raise AwsError(code, "The %s '%s' does not exist" % (what, missing[0]))
        seq = [r for r in seq if r[field] in ids]
    return seq


# Rendered resources are cached: a resource renders the same until something changes the state.
# Every change goes through a mutating action or a seed/reset, which calls render_invalidate()
# (before and after), so a cached rendering is never stale. The cache
# holds the resource itself, so its id() cannot be reused while the entry lives.
_render_caches = []


def render_invalidate():
    for cache in _render_caches:
        cache.clear()


def cached_render(fn):
    cache = {}
    _render_caches.append(cache)

    @functools.wraps(fn)
    def render(res):
        hit = cache.get(id(res))
        if hit is not None and hit[0] is res:
            return hit[1]
        out = fn(res)
        cache[id(res)] = (res, out)
        return out
    return render


@cached_render
def render_volume(v):
    att = items("attachmentSet", v["Attachments"], lambda a: (
        t("volumeId", v["VolumeId"]) + t("instanceId", a.get("InstanceId"))
        + t("device", a["Device"]) + t("status", a["State"]) + t("attachTime", iso(a["AttachTime"]))
        + t("deleteOnTermination", a["DeleteOnTermination"])))
    return (t("volumeId", v["VolumeId"]) + t("size", v["Size"])
            + t("snapshotId", v.get("SnapshotId", "")) + t("availabilityZone", v["AvailabilityZone"])
            + t("status", v["State"]) + t("createTime", iso(v["CreateTime"])) + att
            + ec2_tagset(v) + t("volumeType", v["VolumeType"]) + t("iops", v.get("Iops"))
            + t("throughput", v.get("Throughput")) + t("encrypted", v["Encrypted"])
            + t("multiAttachEnabled", v.get("MultiAttachEnabled", False)))


@cached_render
def render_snapshot(s):
    return (t("snapshotId", s["SnapshotId"]) + t("volumeId", s["VolumeId"])
            + t("status", s["State"]) + t("startTime", iso(s["StartTime"]))
            + t("progress", s["Progress"]) + t("ownerId", s["OwnerId"])
            + t("volumeSize", s["VolumeSize"]) + t("description", s["Description"])
            + t("encrypted", s["Encrypted"]) + t("storageTier", s["StorageTier"]) + ec2_tagset(s))


@cached_render
def render_image(i):
    bdm = items("blockDeviceMapping", i["BlockDeviceMappings"], lambda b: (
        t("deviceName", b["DeviceName"]) + (n("ebs", t("snapshotId", b["Ebs"].get("SnapshotId"))
                                              + t("volumeSize", b["Ebs"]["VolumeSize"])
                                              + t("deleteOnTermination",
                                                  b["Ebs"]["DeleteOnTermination"])
                                              + t("volumeType", b["Ebs"]["VolumeType"])
                                              + t("encrypted", b["Ebs"]["Encrypted"]))
                                            if "Ebs" in b else "")))
    return (t("imageId", i["ImageId"]) + t("imageLocation", i.get("ImageLocation"))
            + t("imageState", i["State"]) + t("imageOwnerId", i["OwnerId"])
            + t("creationDate", iso(i["CreationDate"])) + t("isPublic", i["Public"])
            + t("architecture", i["Architecture"]) + t("imageType", i["ImageType"])
            + t("name", i["Name"]) + t("description", i.get("Description"))
            + t("rootDeviceType", i["RootDeviceType"]) + t("rootDeviceName", i["RootDeviceName"])
            + bdm + t("virtualizationType", i["VirtualizationType"]) + ec2_tagset(i)
            + t("deprecationTime", iso(i.get("DeprecationTime"))))


@cached_render
def render_address(a):
    return (t("publicIp", a["PublicIp"]) + t("allocationId", a["AllocationId"])
            + t("domain", a["Domain"]) + t("instanceId", a.get("InstanceId"))
            + t("associationId", a.get("AssociationId"))
            + t("networkInterfaceId", a.get("NetworkInterfaceId"))
            + t("privateIpAddress", a.get("PrivateIpAddress")) + ec2_tagset(a)
            + t("publicIpv4Pool", a["PublicIpv4Pool"])
            + t("networkBorderGroup", a["NetworkBorderGroup"]))


@cached_render
def render_instance(i):
    bdm = items("blockDeviceMapping", i["BlockDeviceMappings"], lambda b: (
        t("deviceName", b.get("DeviceName", "/dev/xvda"))
        + n("ebs", t("volumeId", b.get("Ebs", {}).get("VolumeId")) + t("status", "attached")
            + t("attachTime", iso(i["LaunchTime"])) + t("deleteOnTermination", True))))
    return (t("instanceId", i["InstanceId"]) + t("imageId", i["ImageId"])
            + n("instanceState", t("code", INSTANCE_STATE_CODES.get(i["State"], 0))
                + t("name", i["State"]))
            + t("privateDnsName", "ip-%s.ec2.internal" % i["PrivateIpAddress"].replace(".", "-"))
            + t("dnsName", "") + t("reason", i["StateTransitionReason"])
            + t("instanceType", i["InstanceType"]) + t("launchTime", iso(i["LaunchTime"]))
            + n("placement", t("availabilityZone", i["AvailabilityZone"]) + t("tenancy", "default"))
            + t("subnetId", i.get("SubnetId")) + t("vpcId", i.get("VpcId"))
            + t("privateIpAddress", i["PrivateIpAddress"])
            + (n("stateReason", t("code", "Client.UserInitiatedShutdown")
                 + t("message", "Client.UserInitiatedShutdown: User initiated shutdown"))
               if i["State"] == "stopped" else "")
            + t("rootDeviceType", "ebs") + t("rootDeviceName", "/dev/xvda") + bdm
            + ec2_tagset(i))


@cached_render
def render_nat(g):
    addrs = items("natGatewayAddressSet", g["NatGatewayAddresses"], lambda a: (
        t("allocationId", a.get("AllocationId")) + t("networkInterfaceId", a.get("NetworkInterfaceId"))
        + t("privateIp", a.get("PrivateIp")) + t("publicIp", a.get("PublicIp"))))
    return (t("createTime", iso(g["CreateTime"])) + t("deleteTime", iso(g.get("DeleteTime")))
            + addrs + t("natGatewayId", g["NatGatewayId"]) + t("state", g["State"])
            + t("subnetId", g["SubnetId"]) + t("vpcId", g["VpcId"]) + ec2_tagset(g)
            + t("connectivityType", g["ConnectivityType"]))


@cached_render
def render_eni(e):
    att = e.get("Attachment")
    attx = n("attachment", t("attachmentId", att["AttachmentId"])
             + t("instanceId", att.get("InstanceId")) + t("instanceOwnerId", att["InstanceOwnerId"])
             + t("deviceIndex", att["DeviceIndex"]) + t("status", att["Status"])
             + t("attachTime", iso(att["AttachTime"]))
             + t("deleteOnTermination", att["DeleteOnTermination"])) if att else ""
    return (t("networkInterfaceId", e["NetworkInterfaceId"]) + t("subnetId", e["SubnetId"])
            + t("vpcId", e["VpcId"]) + t("availabilityZone", e["AvailabilityZone"])
            + t("description", e["Description"]) + t("ownerId", e["OwnerId"])
            + t("requesterManaged", e["RequesterManaged"]) + t("status", e["Status"])
            + t("macAddress", e["MacAddress"]) + t("privateIpAddress", e["PrivateIpAddress"])
            + t("sourceDestCheck", e["SourceDestCheck"]) + t("interfaceType", e["InterfaceType"])
            + attx + ec2_tagset(e))


def ec2_describe_volumes(c):
    ids = indexed(c.params, "VolumeId")
    seq = ec2_by_ids(c, "volumes", "VolumeId", ids, "InvalidVolume.NotFound", "volume")
    seq = ec2_filter(c, "volumes", seq)
    page, nxt = ec2_page(c, seq, "VolumeIds" if ids else None)
    return items("volumeSet", page, render_volume) + t("nextToken", nxt)


def owners_match(c, owners, owner_id):
    if not owners:
        return True
    for o in owners:
        if o == "self" and owner_id == c.ident.account:
            return True
        if o == owner_id:
            return True
    return False


def ec2_describe_snapshots(c):
    ids = indexed(c.params, "SnapshotId")
    owners = indexed(c.params, "Owner")
    seq = ec2_by_ids(c, "snapshots", "SnapshotId", ids, "InvalidSnapshot.NotFound", "snapshot")
    seq = [s for s in seq if owners_match(c, owners, s["OwnerId"])]
    seq = ec2_filter(c, "snapshots", seq)
    page, nxt = ec2_page(c, seq, "SnapshotIds" if ids else None)
    return items("snapshotSet", page, render_snapshot) + t("nextToken", nxt)


def image_deprecated(i):
    d = i.get("DeprecationTime")
    return d is not None and parse_time(d) <= utcnow()


def ec2_describe_images(c):
    ids = indexed(c.params, "ImageId")
    owners = indexed(c.params, "Owner")
    inc_disabled = truthy(c.p("IncludeDisabled", "false"))
    inc_deprecated = truthy(c.p("IncludeDeprecated", "false"))
    seq = ec2_by_ids(c, "images", "ImageId", ids, "InvalidAMIID.NotFound", "image id")
    seq = [i for i in seq if owners_match(c, owners, i["OwnerId"])]
    seq = [i for i in seq if i["State"] != "disabled" or inc_disabled]
    # AWS always shows an owner its own deprecated AMIs; others only on request.
    seq = [i for i in seq if not image_deprecated(i) or inc_deprecated or ids
           or i["OwnerId"] == c.ident.account]
    seq = ec2_filter(c, "images", seq)
    page, nxt = ec2_page(c, seq, "ImageIds" if ids else None)
    return items("imagesSet", page, render_image) + t("nextToken", nxt)


def ec2_describe_addresses(c):
    alloc = indexed(c.params, "AllocationId")
    ips = indexed(c.params, "PublicIp")
    seq = ec2_by_ids(c, "addresses", "AllocationId", alloc, "InvalidAllocationID.NotFound",
                     "allocation ID")
    if ips:
        have = {a["PublicIp"] for a in seq}
        for ip in ips:
            if ip not in have:
                raise AwsError("InvalidAddress.NotFound", "Address '%s' not found." % ip)
        seq = [a for a in seq if a["PublicIp"] in ips]
    seq = ec2_filter(c, "addresses", seq)
    return items("addressesSet", seq, render_address)


def ec2_describe_instances(c):
    ids = indexed(c.params, "InstanceId")
    seq = ec2_by_ids(c, "instances", "InstanceId", ids, "InvalidInstanceID.NotFound",
                     "instance ID")
    seq = ec2_filter(c, "instances", seq)
    page, nxt = ec2_page(c, seq, "InstanceIds" if ids else None)

    def reservation(i):
        return (t("reservationId", i["ReservationId"]) + t("ownerId", i["OwnerId"])
                + n("groupSet") + items("instancesSet", [i], render_instance))
    return items("reservationSet", page, reservation) + t("nextToken", nxt)


def ec2_describe_nat_gateways(c):
    ids = indexed(c.params, "NatGatewayId")
    seq = ec2_by_ids(c, "nat_gateways", "NatGatewayId", ids, "NatGatewayNotFound",
                     "NAT gateway")
    seq = ec2_filter(c, "nat_gateways", seq)
    page, nxt = ec2_page(c, seq, None)
    return items("natGatewaySet", page, render_nat) + t("nextToken", nxt)


def ec2_describe_network_interfaces(c):
    ids = indexed(c.params, "NetworkInterfaceId")
    seq = ec2_by_ids(c, "network_interfaces", "NetworkInterfaceId", ids,
                     "InvalidNetworkInterfaceID.NotFound", "networkInterface ID")
    seq = ec2_filter(c, "network_interfaces", seq)
    page, nxt = ec2_page(c, seq, "NetworkInterfaceIds" if ids else None)
    return items("networkInterfaceSet", page, render_eni) + t("nextToken", nxt)


def ec2_describe_regions(c):
    names = indexed(c.params, "RegionName")
    regions = [r for r in c.state.regions if not names or r in names]
    return items("regionInfo", regions, lambda r: (
        t("regionName", r) + t("regionEndpoint", "ec2.%s.amazonaws.com" % r)
        + t("optInStatus", "opt-in-not-required")))


def find(c, kind, field, value, code, what):
    for r in c.reg[kind]:
        if r[field] == value:
            return r
    raise AwsError(code, "The %s '%s' does not exist." % (what, value))


def dry_run(c, perm):
    """Permission check first; DryRun then answers 412 as AWS does when it would work."""
    c.permit(perm)
    if truthy(c.p("DryRun", "false")):
        raise AwsError("DryRunOperation",
                       "Request would have succeeded, but DryRun flag is set.", 412)


def ec2_delete_volume(c):
    vid = c.require("VolumeId")
    c.permit("ec2:DeleteVolume")
    vol = find(c, "volumes", "VolumeId", vid, "InvalidVolume.NotFound", "volume")
    dry_run(c, "ec2:DeleteVolume")
    if vol["Attachments"] or vol["State"] == "in-use":
        inst = vol["Attachments"][0].get("InstanceId") if vol["Attachments"] else "an instance"
        raise AwsError("VolumeInUse", "Volume %s is currently attached to %s" % (vid, inst))
    c.reg["volumes"].remove(vol)
    return t("return", True)


def ec2_delete_snapshot(c):
    sid = c.require("SnapshotId")
    c.permit("ec2:DeleteSnapshot")
    snap = find(c, "snapshots", "SnapshotId", sid, "InvalidSnapshot.NotFound", "snapshot")
    dry_run(c, "ec2:DeleteSnapshot")
    for img in c.reg["images"]:
        for b in img["BlockDeviceMappings"]:
            if b.get("Ebs", {}).get("SnapshotId") == sid:
                raise AwsError("InvalidSnapshot.InUse", "The snapshot %s is currently in use "
                               "by %s" % (sid, img["ImageId"]))
    c.reg["snapshots"].remove(snap)
    return t("return", True)


def ec2_release_address(c):
    alloc = c.p("AllocationId")
    ip = c.p("PublicIp")
    c.permit("ec2:ReleaseAddress")
    if alloc:
        addr = find(c, "addresses", "AllocationId", alloc, "InvalidAllocationID.NotFound",
                    "allocation ID")
    elif ip:
        addr = find(c, "addresses", "PublicIp", ip, "InvalidAddress.NotFound", "address")
    else:
        raise AwsError("MissingParameter", "Either public IP or allocation id must be "
                       "specified")
    dry_run(c, "ec2:ReleaseAddress")
    if addr.get("AssociationId"):
        raise AwsError("InvalidIPAddress.InUse", "Address %s is in use." % addr["PublicIp"])
    c.reg["addresses"].remove(addr)
    return t("return", True)


def ec2_stop_instances(c):
    ids = indexed(c.params, "InstanceId")
    if not ids:
        raise AwsError("MissingParameter", "The request must contain the parameter InstanceId")
    c.permit("ec2:StopInstances")
    insts = [find(c, "instances", "InstanceId", i, "InvalidInstanceID.NotFound", "instance ID")
             for i in ids]
    dry_run(c, "ec2:StopInstances")
    for i in insts:
        if i["State"] in ("terminated", "shutting-down"):
            raise AwsError("IncorrectInstanceState", "This instance '%s' is not in a state from "
                           "which it can be stopped." % i["InstanceId"])
    out = []
    now = utcnow()
    for i in insts:
        prev = i["State"]
        if prev != "stopped":
            i["State"] = "stopped"
            i["StopTime"] = iso(now)
            i["StateTransitionReason"] = "User initiated (%s GMT)" % now.strftime(
                "%Y-%m-%d %H:%M:%S")
        out.append((i["InstanceId"], prev, "stopping" if prev != "stopped" else "stopped"))

    def state(name):
        return t("code", INSTANCE_STATE_CODES[name]) + t("name", name)
    return items("instancesSet", out, lambda x: (
        t("instanceId", x[0]) + n("currentState", state(x[2]))
        + n("previousState", state(x[1]))))


def ec2_delete_nat_gateway(c):
    gid = c.require("NatGatewayId")
    c.permit("ec2:DeleteNatGateway")
    gw = find(c, "nat_gateways", "NatGatewayId", gid, "NatGatewayNotFound", "NAT gateway")
    dry_run(c, "ec2:DeleteNatGateway")
    if gw["State"] == "deleted":
        raise AwsError("NatGatewayNotFound", "The Nat Gateway %s was not found" % gid)
    gw["State"] = "deleted"
    gw["DeleteTime"] = iso(utcnow())
    return t("natGatewayId", gid)


def ec2_delete_network_interface(c):
    eid = c.require("NetworkInterfaceId")
    c.permit("ec2:DeleteNetworkInterface")
    eni = find(c, "network_interfaces", "NetworkInterfaceId", eid,
               "InvalidNetworkInterfaceID.NotFound", "networkInterface ID")
    dry_run(c, "ec2:DeleteNetworkInterface")
    if eni.get("Attachment") or eni["Status"] == "in-use":
        raise AwsError("InvalidNetworkInterface.InUse", "The network interface '%s' is "
                       "currently in use." % eid)
    c.reg["network_interfaces"].remove(eni)
    return t("return", True)


def ec2_modify_volume(c):
    vid = c.require("VolumeId")
    c.permit("ec2:ModifyVolume")
    vol = find(c, "volumes", "VolumeId", vid, "InvalidVolume.NotFound", "volume")
    size = int_param(c.params, "Size", 1, 65536)
    vtype = c.p("VolumeType")
    if vtype is not None and vtype not in ("standard", "io1", "io2", "gp2", "gp3", "sc1", "st1"):
        raise AwsError("InvalidParameterValue", "Value (%s) for parameter volumeType is "
                       "invalid." % vtype)
    if size is not None and size < vol["Size"]:
        raise AwsError("InvalidParameterValue", "New size cannot be smaller than existing "
                       "size")
    dry_run(c, "ec2:ModifyVolume")
    orig = dict(vol)
    if size is not None:
        vol["Size"] = size
    if vtype is not None:
        vol["VolumeType"] = vtype
    for param, field in (("Iops", "Iops"), ("Throughput", "Throughput")):
        if c.p(param) is not None:
            vol[field] = int(c.p(param))
    return n("volumeModification", t("volumeId", vid), t("modificationState", "modifying"),
             t("targetSize", vol["Size"]), t("targetVolumeType", vol["VolumeType"]),
             t("targetIops", vol.get("Iops")), t("targetThroughput", vol.get("Throughput")),
             t("originalSize", orig["Size"]), t("originalVolumeType", orig["VolumeType"]),
             t("progress", 0), t("startTime", iso(utcnow())))


def tag_specs(c, rtype):
    out = []
    for spec in groups(c.params, "TagSpecification"):
        if spec.get("ResourceType") != rtype:
            continue
        keys = {}
        for k, v in spec.items():
            m = re.fullmatch(r"Tag\.(\d+)\.(Key|Value)", k)
            if m:
                keys.setdefault(int(m.group(1)), {})[m.group(2)] = v
        out += [{"Key": d["Key"], "Value": d.get("Value", "")} for _, d in sorted(keys.items())]
    return out


def ec2_create_snapshot(c):
    vid = c.require("VolumeId")
    c.permit("ec2:CreateSnapshot")
    vol = find(c, "volumes", "VolumeId", vid, "InvalidVolume.NotFound", "volume")
    dry_run(c, "ec2:CreateSnapshot")
    snap = normalise("snapshots", {
        "VolumeId": vid, "VolumeSize": vol["Size"], "Description": c.p("Description", ""),
        "Encrypted": vol["Encrypted"], "Tags": tag_specs(c, "snapshot"),
    }, c.ident.account, c.region)
    c.reg["snapshots"].append(snap)
    return (t("snapshotId", snap["SnapshotId"]) + t("volumeId", vid) + t("status", "pending")
            + t("startTime", iso(snap["StartTime"])) + t("progress", "")
            + t("ownerId", snap["OwnerId"]) + t("volumeSize", snap["VolumeSize"])
            + t("description", snap["Description"]) + t("encrypted", snap["Encrypted"])
            + ec2_tagset(snap))


ID_PREFIXES = (
    ("vol-", "volumes", "VolumeId", "InvalidVolume.NotFound"),
    ("snap-", "snapshots", "SnapshotId", "InvalidSnapshot.NotFound"),
    ("ami-", "images", "ImageId", "InvalidAMIID.NotFound"),
    ("i-", "instances", "InstanceId", "InvalidInstanceID.NotFound"),
    ("eipalloc-", "addresses", "AllocationId", "InvalidAllocationID.NotFound"),
    ("nat-", "nat_gateways", "NatGatewayId", "NatGatewayNotFound"),
    ("eni-", "network_interfaces", "NetworkInterfaceId", "InvalidNetworkInterfaceID.NotFound"),
)


def ec2_create_tags(c):
    ids = indexed(c.params, "ResourceId")
    tags = []
    for g in groups(c.params, "Tag"):
        if "Key" not in g:
            raise AwsError("MissingParameter", "The request must contain the parameter Tag.Key")
        tags.append({"Key": g["Key"], "Value": g.get("Value", "")})
    if not ids:
        raise AwsError("MissingParameter", "The request must contain the parameter ResourceId")
    c.permit("ec2:CreateTags")
    targets = []
    for rid in ids:
        for prefix, kind, field, code in ID_PREFIXES:
            if rid.startswith(prefix):
                targets.append(find(c, kind, field, rid, code, "ID"))
                break
        else:
            raise AwsError("InvalidID", "The ID '%s' is not valid" % rid)
    dry_run(c, "ec2:CreateTags")
    for r in targets:
        for tg in tags:
            r["Tags"] = [x for x in r["Tags"] if x["Key"] != tg["Key"]] + [tg]
    return t("return", True)


EC2_ACTIONS = {
    "DescribeVolumes": ec2_describe_volumes,
    "DescribeSnapshots": ec2_describe_snapshots,
    "DescribeImages": ec2_describe_images,
    "DescribeAddresses": ec2_describe_addresses,
    "DescribeInstances": ec2_describe_instances,
    "DescribeNatGateways": ec2_describe_nat_gateways,
    "DescribeNetworkInterfaces": ec2_describe_network_interfaces,
    "DescribeRegions": ec2_describe_regions,
    "DeleteVolume": ec2_delete_volume,
    "DeleteSnapshot": ec2_delete_snapshot,
    "ReleaseAddress": ec2_release_address,
    "StopInstances": ec2_stop_instances,
    "DeleteNatGateway": ec2_delete_nat_gateway,
    "DeleteNetworkInterface": ec2_delete_network_interface,
    "ModifyVolume": ec2_modify_volume,
    "CreateSnapshot": ec2_create_snapshot,
    "CreateTags": ec2_create_tags,
}


# ---------------------------------------------------------------------------------------
# ELBv2 and Classic ELB
# ---------------------------------------------------------------------------------------


def elb_page(c, seq, kind):
    size = int_param(c.params, "PageSize", 1, 400, code="ValidationError", label="pageSize")
    return paginate(seq, c.p("Marker"), c.page_limit(size), kind, "ValidationError", "Marker")


def members(tag, seq, fn):
    return items(tag, seq, fn, item="member")


def render_lb(lb):
    return (t("LoadBalancerArn", lb["LoadBalancerArn"]) + t("DNSName", lb["DNSName"])
            + t("CanonicalHostedZoneId", lb["CanonicalHostedZoneId"])
            + t("CreatedTime", iso(lb["CreatedTime"])) + t("LoadBalancerName", lb["LoadBalancerName"])
            + t("Scheme", lb["Scheme"]) + t("VpcId", lb["VpcId"])
            + n("State", t("Code", lb["State"])) + t("Type", lb["Type"])
            + members("AvailabilityZones", lb["AvailabilityZones"],
                      lambda z: t("ZoneName", z.get("ZoneName")) + t("SubnetId", z.get("SubnetId")))
            + t("IpAddressType", lb["IpAddressType"]))


def elbv2_describe_load_balancers(c):
    arns = indexed(c.params, "LoadBalancerArns.member")
    names = indexed(c.params, "Names.member")
    seq = list(c.reg["load_balancers"])
    if arns:
        found = [lb for lb in seq if lb["LoadBalancerArn"] in arns]
        if len(found) != len(set(arns)):
            raise AwsError("LoadBalancerNotFound", "One or more load balancers not found")
        seq = found
    if names:
        found = [lb for lb in seq if lb["LoadBalancerName"] in names]
        if len(found) != len(set(names)):
            raise AwsError("LoadBalancerNotFound", "One or more load balancers not found")
        seq = found
    page, nxt = elb_page(c, seq, "elbv2-lb")
    return members("LoadBalancers", page, render_lb) + t("NextMarker", nxt)


def elbv2_describe_target_groups(c):
    lb_arn = c.p("LoadBalancerArn")
    arns = indexed(c.params, "TargetGroupArns.member")
    names = indexed(c.params, "Names.member")
    seq = list(c.reg["target_groups"])
    if lb_arn:
        if not any(lb["LoadBalancerArn"] == lb_arn for lb in c.reg["load_balancers"]):
            raise AwsError("LoadBalancerNotFound", "Load balancer '%s' not found" % lb_arn)
        seq = [g for g in seq if lb_arn in g["LoadBalancerArns"]]
    for want, field in ((arns, "TargetGroupArn"), (names, "TargetGroupName")):
        if want:
            found = [g for g in seq if g[field] in want]
            if len(found) != len(set(want)):
                raise AwsError("TargetGroupNotFound", "One or more target groups not found")
            seq = found
    page, nxt = elb_page(c, seq, "elbv2-tg")
    return members("TargetGroups", page, lambda g: (
        t("TargetGroupArn", g["TargetGroupArn"]) + t("TargetGroupName", g["TargetGroupName"])
        + t("Protocol", g["Protocol"]) + t("Port", g["Port"]) + t("VpcId", g["VpcId"])
        + t("TargetType", g["TargetType"])
        + members("LoadBalancerArns", g["LoadBalancerArns"], esc))) + t("NextMarker", nxt)


def elbv2_describe_target_health(c):
    arn = c.require("TargetGroupArn", code="ValidationError")
    tg = find(c, "target_groups", "TargetGroupArn", arn, "TargetGroupNotFound", "target group")
    reasons = {"unhealthy": ("Target.FailedHealthChecks", "Health checks failed"),
               "unused": ("Target.NotRegistered", "Target is not registered to the target group"),
               "initial": ("Elb.RegistrationInProgress", "Target registration is in progress"),
               "draining": ("Target.DeregistrationInProgress",
                            "Target deregistration is in progress")}

    def desc(x):
        r = reasons.get(x["State"])
        return (n("Target", t("Id", x["Id"]) + t("Port", x["Port"]))
                + t("HealthCheckPort", str(x["Port"]))
                + n("TargetHealth", t("State", x["State"]) + (t("Reason", r[0]) if r else "")
                    + (t("Description", r[1]) if r else "")))
    return members("TargetHealthDescriptions", tg["Targets"], desc)


def elbv2_delete_load_balancer(c):
    arn = c.require("LoadBalancerArn", code="ValidationError")
    c.permit("elasticloadbalancing:DeleteLoadBalancer")
    lb = find(c, "load_balancers", "LoadBalancerArn", arn, "LoadBalancerNotFound",
              "load balancer")
    if lb["DeletionProtection"]:
        raise AwsError("OperationNotPermitted", "Load balancer '%s' cannot be deleted because "
                       "deletion protection is enabled" % arn)
    c.reg["load_balancers"].remove(lb)
    for g in c.reg["target_groups"]:
        if arn in g["LoadBalancerArns"]:
            g["LoadBalancerArns"].remove(arn)
    return ""


def elb_describe_load_balancers(c):
    names = indexed(c.params, "LoadBalancerNames.member")
    seq = list(c.reg["classic_load_balancers"])
    if names:
        have = {lb["LoadBalancerName"] for lb in seq}
        for nm in names:
            if nm not in have:
                raise AwsError("LoadBalancerNotFound",
                               "There is no ACTIVE Load Balancer named '%s'" % nm)
        seq = [lb for lb in seq if lb["LoadBalancerName"] in names]
    page, nxt = elb_page(c, seq, "elb-lb")
    return members("LoadBalancerDescriptions", page, lambda lb: (
        t("LoadBalancerName", lb["LoadBalancerName"]) + t("DNSName", lb["DNSName"])
        + t("CreatedTime", iso(lb["CreatedTime"])) + t("Scheme", lb["Scheme"])
        + t("VPCId", lb["VPCId"])
        + members("Instances", lb["Instances"], lambda i: t("InstanceId", i["InstanceId"]))
        + members("AvailabilityZones", lb["AvailabilityZones"], esc)
        + n("ListenerDescriptions"))) + t("NextMarker", nxt)


def elb_describe_instance_health(c):
    name = c.require("LoadBalancerName", code="ValidationError")
    lb = None
    for x in c.reg["classic_load_balancers"]:
        if x["LoadBalancerName"] == name:
            lb = x
    if lb is None:
        raise AwsError("LoadBalancerNotFound", "There is no ACTIVE Load Balancer named '%s'"
                       % name)
    wanted = [g.get("InstanceId") for g in groups(c.params, "Instances.member")]
    insts = lb["Instances"]
    if wanted:
        have = {i["InstanceId"]: i for i in insts}
        insts = []
        for w in wanted:
            if w not in have:
                raise AwsError("InvalidInstance", "Could not find EC2 instance %s." % w)
            insts.append(have[w])
    notes = {"InService": ("N/A", "N/A"),
             "OutOfService": ("Instance", "Instance has failed at least the UnhealthyThreshold "
                              "number of health checks consecutively."),
             "Unknown": ("ELB", "A transient error occurred. Please try again later.")}
    return members("InstanceStates", insts, lambda i: (
        t("InstanceId", i["InstanceId"]) + t("State", i["State"])
        + t("ReasonCode", notes.get(i["State"], ("N/A", "N/A"))[0])
        + t("Description", notes.get(i["State"], ("N/A", "N/A"))[1])))


ELBV2_ACTIONS = {
    "DescribeLoadBalancers": elbv2_describe_load_balancers,
    "DescribeTargetGroups": elbv2_describe_target_groups,
    "DescribeTargetHealth": elbv2_describe_target_health,
    "DeleteLoadBalancer": elbv2_delete_load_balancer,
}

ELB_ACTIONS = {
    "DescribeLoadBalancers": elb_describe_load_balancers,
    "DescribeInstanceHealth": elb_describe_instance_health,
}


# ---------------------------------------------------------------------------------------
# RDS
# ---------------------------------------------------------------------------------------


def render_db(d, status=None):
    ep = d.get("Endpoint") or {}
    return n("DBInstance",
             t("DBInstanceIdentifier", d["DBInstanceIdentifier"]),
             t("DBInstanceClass", d["DBInstanceClass"]), t("Engine", d["Engine"]),
             t("DBInstanceStatus", status or d["DBInstanceStatus"]),
             t("MasterUsername", d["MasterUsername"]),
             n("Endpoint", t("Address", ep.get("Address")), t("Port", ep.get("Port"))),
             t("AllocatedStorage", d["AllocatedStorage"]),
             t("InstanceCreateTime", iso(d["InstanceCreateTime"])),
             t("AvailabilityZone", d["AvailabilityZone"]), t("MultiAZ", d["MultiAZ"]),
             t("EngineVersion", d["EngineVersion"]), t("StorageType", d["StorageType"]),
             t("DBInstanceArn", d["DBInstanceArn"]),
             t("DeletionProtection", d["DeletionProtection"]),
             items("TagList", tags_of(d), lambda tg: t("Key", tg["Key"]) + t("Value", tg["Value"]),
                   item="Tag"))


def rds_find(c, ident):
    for d in c.reg["db_instances"]:
        if d["DBInstanceIdentifier"] == ident:
            return d
    raise AwsError("DBInstanceNotFound", "DBInstance %s not found." % ident, 404)


def rds_describe_db_instances(c):
    ident = c.p("DBInstanceIdentifier")
    seq = [rds_find(c, ident)] if ident else list(c.reg["db_instances"])
    for g in groups(c.params, "Filters.Filter"):
        values = [v for k, v in g.items() if k.startswith("Values.")]
        fn = {"db-instance-id": lambda d: [d["DBInstanceIdentifier"], d["DBInstanceArn"]],
              "engine": lambda d: [d["Engine"]]}.get(g.get("Name"))
        if fn is None:
            raise AwsError("InvalidParameterValue", "Unrecognized filter name: %s"
                           % g.get("Name"))
        seq = [d for d in seq if set(fn(d)) & set(values)]
    mx = c.p("MaxRecords")
    if mx is not None:
        try:
            mx = int(mx)
        except ValueError:
            mx = -1
        if not 20 <= mx <= 100:
            raise AwsError("InvalidParameterValue", "Invalid value %s for MaxRecords. Must be "
                           "between 20 and 100" % c.p("MaxRecords"))
    page, nxt = paginate(seq, c.p("Marker"), c.page_limit(mx), "rds-db",
                         "InvalidParameterValue", "Marker")
    return n("DBInstances", *(render_db(d) for d in page)) + t("Marker", nxt)


def rds_stop_db_instance(c):
    ident = c.require("DBInstanceIdentifier")
    c.permit("rds:StopDBInstance")
    d = rds_find(c, ident)
    if d["DBInstanceStatus"] != "available":
        raise AwsError("InvalidDBInstanceState", "Instance %s is not in available state."
                       % ident)
    snap = c.p("DBSnapshotIdentifier")
    if snap:
        c.reg["db_snapshots"].append({"DBSnapshotIdentifier": snap,
                                      "DBInstanceIdentifier": ident, "Tags": []})
    d["DBInstanceStatus"] = "stopped"
    return render_db(d, status="stopping")


def rds_delete_db_instance(c):
    ident = c.require("DBInstanceIdentifier")
    c.permit("rds:DeleteDBInstance")
    d = rds_find(c, ident)
    skip = truthy(c.p("SkipFinalSnapshot", "false"))
    final = c.p("FinalDBSnapshotIdentifier")
    if skip and final:
        raise AwsError("InvalidParameterCombination", "Cannot specify both "
                       "FinalDBSnapshotIdentifier and SkipFinalSnapshot.")
    if not skip and not final:
        raise AwsError("InvalidParameterCombination", "FinalDBSnapshotIdentifier is required "
                       "unless SkipFinalSnapshot is specified.")
    if d["DeletionProtection"]:
        raise AwsError("InvalidParameterCombination", "Cannot delete protected DB Instance, "
                       "please disable deletion protection and try again.")
    if d["DBInstanceStatus"] not in ("available", "stopped", "failed",
                                     "storage-full", "incompatible-parameters"):
        raise AwsError("InvalidDBInstanceState", "Instance %s is not in a state from which it "
                       "can be deleted." % ident)
    if final:
        if any(s["DBSnapshotIdentifier"] == final for s in c.reg["db_snapshots"]):
            raise AwsError("DBSnapshotAlreadyExists", "Cannot create the snapshot because a "
                           "snapshot with the identifier %s already exists." % final)
        c.reg["db_snapshots"].append({"DBSnapshotIdentifier": final,
                                      "DBInstanceIdentifier": ident, "Tags": []})
    c.reg["db_instances"].remove(d)
    return render_db(d, status="deleting")


RDS_ACTIONS = {
    "DescribeDBInstances": rds_describe_db_instances,
    "StopDBInstance": rds_stop_db_instance,
    "DeleteDBInstance": rds_delete_db_instance,
}


# ---------------------------------------------------------------------------------------
# CloudWatch
# ---------------------------------------------------------------------------------------


def aggregate(values, stat):
    if stat == "Average":
        return sum(values) / len(values)
    if stat == "Sum":
        return sum(values)
    if stat == "Maximum":
        return max(values)
    if stat == "Minimum":
        return min(values)
    if stat == "SampleCount":
        return float(len(values))
    m = re.fullmatch(r"p(\d+(?:\.\d+)?)", stat)
    if m:
        vs = sorted(values)
        return vs[min(len(vs) - 1, int(len(vs) * float(m.group(1)) / 100.0))]
    raise AwsError("InvalidParameterValue", "The value %s for parameter "
                   "MetricDataQueries.member.1.MetricStat.Stat is not valid." % stat)


def cw_metric_index(metrics):
    """{(namespace, name): {dimensions: datapoints in seed order}}: one pass for all queries."""
    index = {}
    for m in metrics:
        try:
            dims = frozenset(m["Dimensions"].items())
        except (AttributeError, TypeError):  # not a map of strings: never equals a query's
            continue
        index.setdefault((m.get("Namespace"), m.get("MetricName")), {}).setdefault(
            dims, []).extend(m["Datapoints"])
    return index


_parse_time_cached = functools.lru_cache(maxsize=1 << 16)(parse_time)


def cw_query_series(q, start, end, index):
    """(timestamps, values) of one query, bucketed by period from StartTime."""
    metric_ns = q.get("MetricStat.Metric.Namespace")
    name = q.get("MetricStat.Metric.MetricName")
    period = q.get("MetricStat.Period")
    stat = q.get("MetricStat.Stat")
    if not (metric_ns and name and period and stat):
        if q.get("Expression"):
            raise AwsError("ValidationError", "Metric math expressions are not supported by "
                           "the fake")
        raise AwsError("ValidationError", "The parameter MetricDataQueries.member.%s.MetricStat "
                       "is required." % q["_index"])
    period = int(period)
    if period <= 0 or (period >= 60 and period % 60) or (period < 60 and period not in
                                                           (1, 5, 10, 30)):
        raise AwsError("InvalidParameterValue", "The parameter MetricDataQueries.member.%s."
                       "MetricStat.Period must be a multiple of 60." % q["_index"])
    by_dims = index.get((metric_ns, name))
    if not by_dims:
        return []
    dims = {}
    for d in groups(q, "MetricStat.Metric.Dimensions.member"):
        dims[d.get("Name")] = d.get("Value")
    buckets = {}
    for p in by_dims.get(frozenset(dims.items()), ()):
        ts = _parse_time_cached(p["Timestamp"])
        if start <= ts < end:
            off = int((ts - start).total_seconds()) // period * period
            buckets.setdefault(off, []).append(p["Value"])
    out = [(start + datetime.timedelta(seconds=off), aggregate(vs, stat))
           for off, vs in buckets.items()]
    return out


CW_QUERY_ID = re.compile(r"[a-z][a-zA-Z0-9_]*")


def cw_get_metric_data(c):
    queries = groups(c.params, "MetricDataQueries.member")
    if not queries:
        raise AwsError("ValidationError", "The parameter MetricDataQueries is required.")
    if len(queries) > 500:
        raise AwsError("ValidationError", "The collection MetricDataQueries must not have a "
                       "size greater than 500.")
    try:
        start = _parse_time_cached(c.require("StartTime", code="ValidationError"))
        end = _parse_time_cached(c.require("EndTime", code="ValidationError"))
    except ValueError:
        raise AwsError("ValidationError", "StartTime and EndTime must be ISO-8601 timestamps")
    if start >= end:
        raise AwsError("ValidationError", "The parameter StartTime must be less than the "
                       "parameter EndTime.")
    scan_desc = c.p("ScanBy", "TimestampDescending") != "TimestampAscending"
    index = cw_metric_index(c.reg["metrics"])
    ids = set()
    series = []
    for i, q in enumerate(queries, 1):
        q["_index"] = str(i)
        qid = q.get("Id", "")
        if not CW_QUERY_ID.fullmatch(qid):
            raise AwsError("ValidationError", "The value %s for parameter MetricDataQueries."
                           "member.%d.Id is not valid." % (qid, i))
        if qid in ids:
            raise AwsError("ValidationError", "The value %s for parameter MetricDataQueries."
                           "member.%d.Id is not unique." % (qid, i))
        ids.add(qid)
        pts = sorted(cw_query_series(q, start, end, index), reverse=scan_desc)
        if q.get("ReturnData", "true").lower() != "false":
            series.append((qid, q.get("Label") or q.get("MetricStat.Metric.MetricName"), pts))
    flat = [(si, pi) for si, s in enumerate(series) for pi in range(len(s[2]))]
    limit = int_param(c.params, "MaxDatapoints", 1, None, code="InvalidParameterValue")
    token = c.p("NextToken")
    start_at = decode_token(token, "cw-gmd", "InvalidNextToken", "NextToken") if token else 0
    page, nxt = paginate(flat, token, c.page_limit(limit), "cw-gmd", "InvalidNextToken",
                         "NextToken")
    unfinished = {si for si, _ in flat[start_at + len(page):]}
    chosen = {}
    for si, pi in page:
        chosen.setdefault(si, []).append(pi)
    # Written out rather than with members() and t(), as there can be 500 of them; an Id
    # that passed CW_QUERY_ID needs no escaping.
    results = []
    for si, (qid, label, pts) in enumerate(series):
        got = [pts[pi] for pi in chosen[si]] if si in chosen else ()
        results.append(
            "<member><Id>" + qid + "</Id>" + t("Label", label) + "<Timestamps>"
            + "".join(["<member>" + esc(iso(p[0])) + "</member>" for p in got])
            + "</Timestamps><Values>"
            + "".join(["<member>" + esc(repr(float(p[1]))) + "</member>" for p in got])
            + ("</Values><StatusCode>PartialData</StatusCode></member>" if si in unfinished
               else "</Values><StatusCode>Complete</StatusCode></member>"))
    return ("<MetricDataResults>" + "".join(results) + "</MetricDataResults>"
            + t("NextToken", nxt) + n("Messages"))


CW_ACTIONS = {"GetMetricData": cw_get_metric_data}

STS_ACTIONS = {"AssumeRole": sts_assume_role, "GetCallerIdentity": sts_get_caller_identity}


# ---------------------------------------------------------------------------------------
# KMS (JSON protocol)
# ---------------------------------------------------------------------------------------

BLOB_MAGIC = b"CSFK\x01"


def kms_resolve(c, key):
    if not key:
        raise AwsError("ValidationException", "1 validation error detected: Value null at "
                       "'keyId' failed to satisfy constraint: Member must not be null")
    for k in c.reg["kms_keys"]:
        aliases = k["Aliases"] + ["arn:aws:kms:%s:%s:%s" % (c.region, c.ident.account, a)
                                  for a in k["Aliases"]]
        if key in (k["KeyId"], k["Arn"]) or key in aliases:
            if k["KeyState"] == "Disabled":
                raise AwsError("DisabledException", "%s is disabled." % k["Arn"])
            return k
    if key.startswith("alias/") or ":alias/" in key:
        raise AwsError("NotFoundException", "Alias %s is not found." % key)
    raise AwsError("NotFoundException", "Key '%s' does not exist" % key)


def kms_stream(key, nonce, length):
    out = b""
    counter = 0
    while len(out) < length:
        out += hmac.new(key, nonce + struct.pack(">I", counter), hashlib.sha256).digest()
        counter += 1
    return out[:length]


def kms_context_bytes(ctx):
    if ctx is None:
        return b""
    if not isinstance(ctx, dict) or not all(isinstance(v, str) for v in ctx.values()):
        raise AwsError("ValidationException", "EncryptionContext must be a map of strings")
    return json.dumps(ctx, sort_keys=True, separators=(",", ":")).encode()


def kms_seal(state, arn, plaintext, ctx):
    k = hmac.new(state.kms_master, arn.encode(), hashlib.sha256).digest()
    nonce = os.urandom(12)
    ct = bytes(a ^ b for a, b in zip(plaintext, kms_stream(k, nonce, len(plaintext))))
    head = BLOB_MAGIC + struct.pack(">H", len(arn)) + arn.encode() + nonce
    tag = hmac.new(k, head + ct + kms_context_bytes(ctx), hashlib.sha256).digest()[:16]
    return head + ct + tag


def kms_open(state, blob, ctx):
    bad = AwsError("InvalidCiphertextException", "")
    if len(blob) < len(BLOB_MAGIC) + 2 + 12 + 16 or not blob.startswith(BLOB_MAGIC):
        raise bad
    (alen,) = struct.unpack(">H", blob[len(BLOB_MAGIC):len(BLOB_MAGIC) + 2])
    off = len(BLOB_MAGIC) + 2
    if len(blob) < off + alen + 12 + 16:
        raise bad
    arn = blob[off:off + alen].decode("utf-8", "replace")
    nonce = blob[off + alen:off + alen + 12]
    ct, tag = blob[off + alen + 12:-16], blob[-16:]
    k = hmac.new(state.kms_master, arn.encode(), hashlib.sha256).digest()
    want = hmac.new(k, blob[:-16] + kms_context_bytes(ctx), hashlib.sha256).digest()[:16]
    if not hmac.compare_digest(want, tag):
        raise bad
    return arn, bytes(a ^ b for a, b in zip(ct, kms_stream(k, nonce, len(ct))))


def b64_field(body, name, required=True):
    v = body.get(name)
    if v is None:
        if required:
            raise AwsError("ValidationException", "1 validation error detected: Value null at "
                           "'%s' failed to satisfy constraint: Member must not be null"
                           % (name[0].lower() + name[1:]))
        return None
    try:
        return base64.b64decode(v, validate=True)
    except (binascii.Error, TypeError):
        raise AwsError("SerializationException", "Could not decode %s as base64" % name)


def kms_generate_data_key(c, body):
    c.permit("kms:GenerateDataKey")
    k = kms_resolve(c, body.get("KeyId"))
    spec, nbytes = body.get("KeySpec"), body.get("NumberOfBytes")
    if spec and nbytes:
        raise AwsError("ValidationException", "Please specify either number of bytes or key "
                       "spec.")
    if spec:
        if spec not in ("AES_256", "AES_128"):
            raise AwsError("ValidationException", "1 validation error detected: Value '%s' at "
                           "'keySpec' failed to satisfy constraint" % spec)
        nbytes = 32 if spec == "AES_256" else 16
    if not isinstance(nbytes, int) or not 1 <= nbytes <= 1024:
        raise AwsError("ValidationException", "Please specify either number of bytes or key "
                       "spec.")
    plain = os.urandom(nbytes)
    blob = kms_seal(c.state, k["Arn"], plain, body.get("EncryptionContext"))
    return {"CiphertextBlob": base64.b64encode(blob).decode(),
            "Plaintext": base64.b64encode(plain).decode(), "KeyId": k["Arn"]}


def kms_encrypt(c, body):
    c.permit("kms:Encrypt")
    k = kms_resolve(c, body.get("KeyId"))
    plain = b64_field(body, "Plaintext")
    if not 1 <= len(plain) <= 4096:
        raise AwsError("ValidationException", "1 validation error detected: Value at "
                       "'plaintext' failed to satisfy constraint: Member must have length "
                       "less than or equal to 4096")
    blob = kms_seal(c.state, k["Arn"], plain, body.get("EncryptionContext"))
    return {"CiphertextBlob": base64.b64encode(blob).decode(), "KeyId": k["Arn"],
            "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}


def kms_decrypt(c, body):
    c.permit("kms:Decrypt")
    blob = b64_field(body, "CiphertextBlob")
    arn, plain = kms_open(c.state, blob, body.get("EncryptionContext"))
    if body.get("KeyId"):
        k = kms_resolve(c, body["KeyId"])
        if k["Arn"] != arn:
            raise AwsError("IncorrectKeyException", "The key ID in the request does not "
                           "identify a CMK that can perform this operation.")
    if not any(k["Arn"] == arn for k in c.reg["kms_keys"]):
        raise AwsError("InvalidCiphertextException", "")
    return {"KeyId": arn, "Plaintext": base64.b64encode(plain).decode(),
            "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}


KMS_ACTIONS = {"GenerateDataKey": kms_generate_data_key, "Encrypt": kms_encrypt,
               "Decrypt": kms_decrypt}

IAM_PREFIX = {"ec2": "ec2", "sts": "sts", "rds": "rds", "elbv2": "elasticloadbalancing",
              "elb": "elasticloadbalancing", "monitoring": "cloudwatch", "kms": "kms"}

QUERY_ACTIONS = {"ec2": EC2_ACTIONS, "sts": STS_ACTIONS, "rds": RDS_ACTIONS,
                 "elbv2": ELBV2_ACTIONS, "elb": ELB_ACTIONS, "monitoring": CW_ACTIONS}


# ---------------------------------------------------------------------------------------
# HTTP: requests
# ---------------------------------------------------------------------------------------


def form_pairs(s):
    """parse_qsl(s, keep_blank_values=True), three times faster: unless an escaped "&" or "="
    could split differently, one unquote of the whole string does for every pair (and for
    ASCII, which is one run for unquote, without its search for runs)."""
    if "%" in s:
        if "%26" in s or "%3D" in s or "%3d" in s:
            return parse_qsl(s, keep_blank_values=True)
        s = s.replace("+", " ")
        s = unquote_to_bytes(s).decode("utf-8", "replace") if s.isascii() else unquote(s)
    elif "+" in s:
        s = s.replace("+", " ")
    return [p.partition("=")[::2] for p in s.split("&") if p]


class Req:
    """One request as received: headers in order with their own names (SigV4 needs them)
    and by lower-case name, the first of a name winning."""

    __slots__ = ("method", "line", "path", "query_pairs", "headers", "by_name", "body",
                 "_params")

    def __init__(self, method, target, line, headers, by_name):
        self.method = method
        self.line = line  # the request line, for --verbose
        if target.startswith("//"):  # as http.server does (gh-87389)
            target = "/" + target.lstrip("/")
        parts = urlsplit(target)
        self.path = parts.path or "/"
        self.query_pairs = form_pairs(parts.query) if parts.query else []
        self.headers = headers
        self.by_name = by_name
        self.body = b""
        self._params = None

    def header(self, name):
        """The first value of a header; name in lower case."""
        return self.by_name.get(name)

    def params(self):
        """Query parameters, then a form body's (parsed once: GetMetricData bodies are big)."""
        if self._params is None:
            params = dict(self.query_pairs)
            if self.body and "x-www-form-urlencoded" in (self.header("content-type") or ""):
                params.update(form_pairs(self.body.decode("utf-8", "replace")))
            self._params = params
        return self._params


def classify(req):
    """(service, auth parts or None, auth error or None) before any verification."""
    auth_value = req.header("authorization")
    if auth_value is not None:
        values = [v for k, v in req.headers if k.lower() == "authorization"]
        # A repeated header is one comma-joined value to HTTP, which no SigV4 parse accepts.
        auth_value = ", ".join(values)
    auth, err = None, None
    if auth_value:
        try:
            auth = parse_authorization(auth_value)
        except AwsError as e:
            err = e
    target = req.header("x-amz-target") or ""
    scope = auth["service"] if auth else None
    if scope == "kms" or (scope is None and target.startswith("TrentService.")):
        return "kms", auth, err
    params = req.params()
    version = params.get("Version")
    if scope == "elasticloadbalancing" or (scope is None and version in ("2015-12-01",
                                                                         "2012-06-01")):
        return ("elb" if version == "2012-06-01" else "elbv2"), auth, err
    if scope in ("sts", "ec2", "rds", "monitoring"):
        return scope, auth, err
    if scope is None:
        guess = {"2016-11-15": "ec2", "2011-06-15": "sts", "2014-10-31": "rds",
                 "2010-08-01": "monitoring"}.get(version, "sts")
        return guess, auth, err
    return "unknown", auth, err


REASONS = {s.value: s.phrase for s in http.HTTPStatus}
METHODS = ("GET", "POST", "PUT", "DELETE")
_rid_rng = random.Random()  # request ids need uniqueness, not a getrandom() call each
_second = [0, "", ""]  # a second, its Date header value and its ISO-8601 text


def _tick(now):
    sec = int(now)
    if sec != _second[0]:
        _second[:] = (sec, email.utils.formatdate(sec, usegmt=True),
                      time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(sec)))
    return sec


def http_date():
    _tick(time.time())
    return _second[1]


def now_iso():
    """iso(utcnow()), for the call log: the text up to the second changes once a second."""
    now = time.time()
    sec = _tick(now)
    return _second[2] + "%03dZ" % ((now - sec) * 1000)


def request_id():
    return str(uuid.UUID(int=_rid_rng.getrandbits(128), version=4))


# ---------------------------------------------------------------------------------------
# HTTP: connections (one asyncio protocol each, all on the event loop's thread)
# ---------------------------------------------------------------------------------------

HEAD = "head"      # reading a request line and headers
BODY = "body"      # reading that request's body
BUSY = "busy"      # serving it (perhaps a latency timer or a hang runs); more input waits
CLOSED = "closed"  # closing or gone; a request still being served answers no one


class Server:
    """What the connections of one listening port share."""

    def __init__(self, state, loop, tls, verbose):
        self.state = state
        self.loop = loop
        self.tls = tls
        self.verbose = verbose


class Conn(asyncio.Protocol):
    """One client connection. Requests are parsed from the buffer and served one at a time
    in order, pipelined ones waiting in the buffer. Each answer leaves in one write."""

    def __init__(self, server):
        self.server = server
        self.transport = None
        self.buf = bytearray()
        self.phase = HEAD
        self.req = None          # the request being read or served
        self.length = 0          # its Content-Length, or the chunked body's length so far
        self.chunks = None       # its chunks so far when the body is chunked
        self.close_after = False  # close once the request is answered
        self.counted = False     # it counts in state.in_flight
        self.eof = False         # the client has shut its side
        self.paused = False      # reading paused: enough input waits behind a busy request

    # -- transport events -----------------------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        self.transport = None
        self.phase = CLOSED

    def data_received(self, data):
        self.buf += data
        if self.phase is BUSY:
            if len(self.buf) > MAX_HEAD_BYTES and not self.paused:
                self.paused = True
                self.transport.pause_reading()
            return
        self.advance()

    def eof_received(self):
        self.eof = True  # advance() closes once the requests already sent are answered
        # (on plain TCP: TLS closes whatever this returns)
        return self.phase is BUSY and not self.server.tls

    # -- reading --------------------------------------------------------------------------

    def advance(self):
        """Serves buffered requests until one needs more input or waits (BUSY)."""
        try:
            while self.phase is HEAD or self.phase is BODY:
                if self.phase is HEAD and not self.read_head():
                    break
                if self.phase is BODY:
                    body = self.read_body()
                    if body is None:  # more input needed, or refused
                        break
                    self.req.body = body
                    self.phase = BUSY
                    self.dispatch(self.req)
        except Exception:  # noqa: BLE001 - a bug in the fake must not stop the loop
            self.crash()
        if self.eof and self.phase is HEAD:
            self.close()
        if self.paused and self.phase is not BUSY and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    def read_head(self):
        """Parses a request line and headers into self.req (phase BODY); false when more
        input is needed or the request was refused."""
        buf = self.buf
        start = 0
        while buf.startswith(b"\r\n", start):  # empty lines before a request are ignored
            start += 2
        if start:
            del buf[:start]
        end = buf.find(b"\r\n\r\n")
        if end < 0 or end > MAX_HEAD_BYTES:
            if len(buf) > MAX_HEAD_BYTES:
                self.refuse(431, "request header section too large")
            return False
        text = buf[:end].decode("latin-1")
        del buf[:end + 4]
        lines = text.split("\r\n")
        if text.count("\r") != len(lines) - 1 or text.count("\n") != len(lines) - 1:
            return self.refuse(400, "bare CR or LF in the request head")
        words = lines[0].split()
        if len(words) != 3:
            return self.refuse(400, "bad request line")
        method, target, version = words
        try:
            if not version.startswith("HTTP/"):
                raise ValueError(version)
            major, minor = version[5:].split(".")
            ver = int(major), int(minor)
        except ValueError:
            return self.refuse(400, "bad HTTP version")
        if ver >= (2, 0):
            return self.refuse(505, "HTTP version not supported")
        if len(lines) - 1 > MAX_HEADERS:
            return self.refuse(431, "too many headers")
        headers = []
        by_name = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon or not name or name.strip(" \t") != name:  # obs-fold included
                return self.refuse(400, "bad header line")
            value = value.strip(" \t")
            headers.append((name, value))
            by_name.setdefault(name.lower(), value)
        self.req = Req(method, target, lines[0], headers, by_name)
        conn = by_name.get("connection", "").lower()
        self.close_after = conn == "close" or (ver < (1, 1) and conn != "keep-alive")
        if method not in METHODS:
            return self.refuse(501, "unsupported method")
        if ver >= (1, 1) and by_name.get("expect", "").lower() == "100-continue":
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        te = by_name.get("transfer-encoding")
        if te is not None and "chunked" in te.lower():
            self.chunks, self.length = [], 0
        else:
            self.chunks = None
            try:
                self.length = int(by_name.get("content-length") or 0)
            except ValueError:
                self.length = -1
            if not 0 <= self.length <= MAX_BODY_BYTES:
                return self.refuse(400, "bad request body")
        self.phase = BODY
        return True

    def read_body(self):
        """The body once it is all buffered, else None (or refuses it)."""
        buf = self.buf
        if self.chunks is None:
            if len(buf) < self.length:
                return None
            body = bytes(buf[:self.length])
            del buf[:self.length]
            return body
        while True:
            eol = buf.find(b"\r\n")
            if eol < 0:
                if len(buf) > 1024:
                    return self.refuse(400, "bad request body")
                return None
            try:
                size = int(bytes(buf[:eol]).split(b";")[0].strip() or b"0", 16)
            except ValueError:
                return self.refuse(400, "bad request body")
            if size == 0:  # the last chunk; then trailer lines up to an empty one
                end = buf.find(b"\r\n\r\n", eol)
                if end < 0:
                    if len(buf) > MAX_HEAD_BYTES:
                        return self.refuse(400, "bad request body")
                    return None
                del buf[:end + 4]
                body, self.chunks = b"".join(self.chunks), None
                return body
            if size < 0 or self.length + size > MAX_BODY_BYTES:
                return self.refuse(400, "bad request body")
            if len(buf) < eol + 4 + size:
                return None
            if buf[eol + 2 + size:eol + 4 + size] != b"\r\n":
                return self.refuse(400, "bad request body")
            self.chunks.append(bytes(buf[eol + 2:eol + 2 + size]))
            self.length += size
            del buf[:eol + 4 + size]

    def dispatch(self, req):
        if req.path.startswith("/__fake/"):
            self.control(req)
        else:
            self.aws(req)

    # -- answering and ending -------------------------------------------------------------

    def head(self, status, ctype, length, reqid):
        h = ("HTTP/1.1 %d %s\r\nServer: fake-aws\r\nDate: %s\r\nContent-Type: %s\r\n"
             "Content-Length: %d\r\n" % (status, REASONS.get(status, ""), http_date(), ctype,
                                         length))
        if reqid:
            h += "x-amzn-RequestId: " + reqid + "\r\n"
        if self.close_after:
            h += "Connection: close\r\n"
        return (h + "\r\n").encode("latin-1")

    def send(self, status, body, ctype, reqid=None, close=False):
        """Answers the request: status line, headers and body in one write (one segment or
        TLS record); then the connection reads the next request or closes."""
        self.close_after = self.close_after or close
        if self.server.verbose:
            sys.stderr.write('fake_aws: "%s" %d\n' % (self.req.line if self.req else "-",
                                                       status))
        if self.phase is not CLOSED:
            self.transport.write(self.head(status, ctype, len(body), reqid) + body)
        self.end()

    def refuse(self, status, message):
        """Answers what cannot be read as a request, and closes: the stream is lost."""
        self.send(status, message.encode(), "text/plain", close=True)

    def end(self):
        """The request is over (answered or dropped): close, or go on reading."""
        if self.counted:
            self.counted = False
            self.server.state.in_flight -= 1
        self.req = None
        if self.close_after:
            self.close()
        elif self.phase is BUSY:
            self.phase = HEAD

    def close(self):
        """Closes once the answers written so far are sent."""
        if self.phase is not CLOSED:
            self.phase = CLOSED
            self.transport.close()

    def drop(self, rst=False):
        """Ends the connection as a dying server would: no TLS close_notify, then a FIN after
        what was written, or with rst an RST (SO_LINGER 0) at once."""
        if self.phase is not CLOSED:
            self.phase = CLOSED
            if rst:
                sock = self.transport.get_extra_info("socket")
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))
                except OSError:
                    pass
            self.transport.abort()

    def crash(self):
        """A bug in the fake: no answer and the connection closes, as a thread's death
        did; the traceback goes to stderr with --verbose."""
        if self.server.verbose:
            traceback.print_exc()
        self.close_after = True
        self.end()

    # -- control API ----------------------------------------------------------------------

    def control(self, req):
        state = self.server.state
        try:
            doc = json.loads(req.body) if req.body else {}
        except ValueError:
            self.send(400, b'{"error":"body is not JSON"}', "application/json")
            return
        route = (req.method, req.path.rstrip("/"))
        q = dict(req.query_pairs)
        try:
            if route == ("POST", "/__fake/reset"):
                state.reset()
                if doc:
                    state.seed(doc)
                out = {"ok": True}
            elif route == ("POST", "/__fake/seed"):
                state.seed(doc)
                out = {"ok": True}
            elif route == ("POST", "/__fake/faults"):
                out = self.set_faults(doc)
            elif route == ("GET", "/__fake/faults"):
                out = {"faults": copy.deepcopy(state.faults)}
            elif route == ("GET", "/__fake/calls"):
                since = int(q.get("since", 0))
                calls = [dict(x) for x in state.calls if x["seq"] > since
                         and all(q.get(f) in (None, str(x.get(f)))
                                 for f in ("service", "action", "region", "account"))]
                out = {"calls": calls}
            elif route in (("DELETE", "/__fake/calls"), ("POST", "/__fake/calls/clear")):
                state.calls = []
                state.max_in_flight = state.in_flight
                out = {"ok": True}
            elif route == ("GET", "/__fake/stats"):
                out = {"in_flight": state.in_flight, "max_in_flight": state.max_in_flight,
                       "calls": state.call_seq}
            elif route == ("GET", "/__fake/state"):
                out = json.loads(json.dumps(state.snapshot(), default=str))
            elif route == ("POST", "/__fake/expire-credentials"):
                out = self.expire(doc)
            else:
                self.send(404, b'{"error":"no such control endpoint"}', "application/json")
                return
        except (ValueError, KeyError, TypeError) as e:
            self.send(400, json.dumps({"error": str(e)}).encode(), "application/json")
            return
        self.send(200, json.dumps(out).encode(), "application/json")

    def set_faults(self, doc):
        state = self.server.state
        rules = doc if isinstance(doc, list) else doc.get("faults", [])
        for r in rules:
            if r.get("type") not in FAULT_TYPES:
                raise ValueError("fault type must be one of %s" % ", ".join(FAULT_TYPES))
            if r.get("fraction") is not None and not 0 <= float(r["fraction"]) <= 1:
                raise ValueError("fraction must be within 0..1")
        if isinstance(doc, dict) and doc.get("seed") is not None:
            state.fault_rng = random.Random(doc["seed"])
        if not (isinstance(doc, dict) and doc.get("append")):
            state.faults = []
            state.release()
        state.faults += [dict(r) for r in rules]
        return {"ok": True, "faults": len(state.faults)}

    def expire(self, doc):
        state = self.server.state
        past = iso(utcnow() - datetime.timedelta(seconds=1))
        count = 0
        for c in state.keys.values():
            if c["kind"] == "session" and doc.get("access_key_id") in (None, c["id"]):
                c["expiration"] = past
                count += 1
        return {"ok": True, "expired": count}

    # -- AWS ------------------------------------------------------------------------------

    def aws(self, req):
        """Classifies, logs and authenticates the request and picks its faults; the rest
        (aws_finish) runs after the injected latency, so state changes only then."""
        state = self.server.state
        self.counted = True
        state.in_flight += 1
        if state.in_flight > state.max_in_flight:
            state.max_in_flight = state.in_flight
        reqid = request_id()
        service, auth, auth_err = classify(req)
        params, action, kms_body = {}, None, None
        entry = {"time": now_iso(), "method": req.method, "path": req.path,
                 "service": service, "action": None,
                 "region": auth["region"] if auth else None, "account": None,
                 "access_key": auth["access_key"] if auth else None,
                 "signature_verified": False, "auth_error": None, "params": None,
                 "status": None, "error_code": None, "fault": None, "request_id": reqid,
                 "tls": self.server.tls}
        try:
            if service == "kms":
                action = (req.header("x-amz-target") or "").partition(".")[2] or None
                try:
                    kms_body = json.loads(req.body or b"{}")
                    if not isinstance(kms_body, dict):
                        raise ValueError
                except ValueError:
                    kms_body = None
                entry["params"] = {k: ("<redacted>" if k == "Plaintext" else v)
                                   for k, v in (kms_body or {}).items()}
            else:
                # The log and the action share the one parsed dict, less Action and Version
                # (no action reads those, and nothing changes the dict).
                params = req.params()
                action = params.pop("Action", None)
                params.pop("Version", None)
                entry["params"] = params
            entry["action"] = action
            state.log_call(entry)
            if auth_err is not None:
                raise auth_err
            if service == "unknown":
                raise AwsError("SignatureDoesNotMatch", "Credential should be scoped to correct "
                               "service: '%s'." % auth["service"], 403)
            try:
                ident = authenticate(state, req, service, auth and auth["region"], auth)
            except AwsError as e:
                entry["auth_error"] = e.code
                raise
            entry["signature_verified"] = True
            entry["account"] = ident.account
            latency, fault = state.pick_faults(service, action, entry["region"], ident.account)
        except AwsError as e:
            entry["error_code"] = e.code
            status, out, ctype = render_error(service, e, reqid)
            entry["status"] = status
            self.send(status, out, ctype, reqid)
            return
        call = (req, service, action, params, kms_body, reqid, entry, ident, fault)
        if latency:
            self.server.loop.call_later(latency / 1000.0, self.aws_resume, call)
        else:
            self.aws_finish(*call)

    def aws_resume(self, call):
        """The latency has passed: finish the request, then serve any pipelined one."""
        try:
            self.aws_finish(*call)
        except Exception:  # noqa: BLE001 - as in advance()
            self.crash()
        self.advance()

    def aws_finish(self, req, service, action, params, kms_body, reqid, entry, ident, fault):
        """Applies the fault, runs the action and answers: the part after the latency."""
        try:
            if fault:
                entry["fault"] = fault["type"]
                if self.apply_fault(fault, service, action, reqid, entry):
                    return
            status, out, ctype = self.run_action(req, ident, service, entry["region"],
                                                 action, params, kms_body, reqid)
        except AwsError as e:
            status, out, ctype = render_error(service, e, reqid)
            entry["error_code"] = e.code
        entry["status"] = status
        self.send(status, out, ctype, reqid)

    def run_action(self, req, ident, service, region, action, params, kms_body, reqid):
        state = self.server.state
        if service == "kms":
            if "x-amz-json-1.1" not in (req.header("content-type") or ""):
                raise AwsError("UnknownOperationException", "", 400)
            fn = KMS_ACTIONS.get(action)
            if fn is None:
                raise AwsError("UnknownOperationException", "", 400)
            if kms_body is None:
                raise AwsError("SerializationException", "Start of structure or map found "
                               "where not expected.")
            out = fn(Ctx(state, ident, service, region, action, params), kms_body)
            return 200, json.dumps(out).encode(), "application/x-amz-json-1.1"
        table = QUERY_ACTIONS[service]
        if not action:
            raise AwsError("MissingAction", "Missing Action")
        fn = table.get(action)
        if fn is None:
            raise AwsError("InvalidAction", "The action %s is not valid for this web service."
                           % action)
        ctx = Ctx(state, ident, service, region, action, params)
        if service != "ec2" or action.startswith("Describe"):
            # EC2's mutating actions check inside, so that DryRun answers the same way.
            ctx.permit(IAM_PREFIX[service] + ":" + action)
        if action.startswith(("Describe", "Get")):
            body = fn(ctx)
        else:  # it may change what a resource renders as
            render_invalidate()
            try:
                body = fn(ctx)
            finally:
                render_invalidate()
        if service == "ec2":
            return 200, ec2_ok(action, reqid, body).encode(), "text/xml;charset=UTF-8"
        return 200, query_ok(service, action, reqid, body).encode(), "text/xml"

    def apply_fault(self, fault, service, action, reqid, entry):
        """Raises the fault's error, or ends the exchange its way and returns True."""
        ftype = fault["type"]
        if ftype in ("throttle", "error"):
            raise fault_error(service, fault)
        if ftype == "reset":
            entry["status"] = 0
            self.drop(rst=True)
            self.end()
            return True
        if ftype == "hang":
            self.hang(int(fault.get("ms", 300000)), entry)
            return True
        if ftype == "malformed":
            body = ('<?xml version="1.0" encoding="UTF-8"?>\n<%sResponse xmlns="%s"><requestId>'
                    '%s</requestId><item><<>&bogus;</%sResponse' % (action, EC2_NS, reqid, action))
            if service == "kms":
                body = '{"CiphertextBlob": "AAAA", "KeyId": '
            entry["status"] = 200
            self.send(200, body.encode(), "application/x-amz-json-1.1" if service == "kms"
                      else "text/xml", reqid, close=True)
            return True
        if ftype == "truncated":
            # A Content-Length the body never reaches, as from a server dying mid-answer.
            full = (ec2_ok(action, reqid, "<volumeSet>" + "<item><volumeId>vol-0</volumeId>"
                           "</item>" * 20 + "</volumeSet>")).encode()
            entry["status"] = 200
            if self.phase is not CLOSED:
                self.transport.write(self.head(200, "text/xml", len(full), reqid)
                                     + full[: len(full) // 2])
            self.drop()
            self.end()
            return True
        return False

    def hang(self, ms, entry):
        """Answers nothing until the fault rules change (State.release) or ms pass; then
        resets the connection."""
        state = self.server.state

        def wake():
            state.held.discard(wake)
            timer.cancel()
            entry["status"] = 0
            self.drop(rst=True)
            self.end()
        timer = self.server.loop.call_later(ms / 1000.0, wake)
        state.hold(wake)


def prerender(state):
    """Render every seeded resource into the cache now, not while answering (benchmarks)."""
    kinds = {"volumes": render_volume, "snapshots": render_snapshot, "images": render_image,
             "addresses": render_address, "instances": render_instance,
             "nat_gateways": render_nat, "network_interfaces": render_eni}
    for acct in state.accounts.values():
        for reg in acct["regions"].values():
            for kind, fn in kinds.items():
                for res in reg[kind]:
                    fn(res)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Fake AWS for CloudSweep tests")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--http-port", type=int, default=0)
    ap.add_argument("--https-port", type=int, default=None)
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--seed", help="JSON file to seed the state with")
    ap.add_argument("--kms-seed", default="cloudsweep",
                    help="derives the fake's KMS master key (same seed, same key)")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--faults",
                    help="JSON file of fault rules to start with (as POST /__fake/faults)")
    ap.add_argument("--prerender", action="store_true",
                    help="render the seeded resources at start-up rather than on first use "
                         "(benchmarks: the answers are the same, the fake's CPU is not)")
    ap.add_argument("--reuse-port", action="store_true",
                    help="bind with SO_REUSEPORT, so several fakes (same --seed/--faults) can "
                         "share the ports for benchmarks; each keeps its own state")
    args = ap.parse_args(argv)
    if args.https_port is not None and not (args.cert and args.key):
        ap.error("--https-port needs --cert and --key")

    state = State(args.kms_seed)
    if args.seed:
        with open(args.seed) as f:
            state.seed(json.load(f))
        if args.prerender:
            prerender(state)
    if args.faults:
        with open(args.faults) as f:
            doc = json.load(f)
        state.faults = [dict(r) for r in (doc if isinstance(doc, list) else doc.get("faults", []))]

    loop = asyncio.new_event_loop()
    # TLS handshake failures and the like are the clients' business; a bug shows with --verbose.
    loop.set_exception_handler(
        lambda lp, ctx: lp.default_exception_handler(ctx) if args.verbose else None)

    def listen(port, ssl_ctx):
        server = Server(state, loop, ssl_ctx is not None, args.verbose)
        return loop.run_until_complete(loop.create_server(
            lambda: Conn(server), args.host, port, ssl=ssl_ctx, backlog=1024,
            reuse_port=args.reuse_port, ssl_handshake_timeout=10 if ssl_ctx else None))

    listeners = [listen(args.http_port, None)]
    https_port = None
    if args.https_port is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.cert, args.key)
        listeners.append(listen(args.https_port, ctx))
        https_port = listeners[1].sockets[0].getsockname()[1]
    print(json.dumps({"http_port": listeners[0].sockets[0].getsockname()[1],
                      "https_port": https_port}), flush=True)
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    loop.run_until_complete(stop)
    for listener in listeners:
        listener.close()
    loop.close()


if __name__ == "__main__":
    main()
