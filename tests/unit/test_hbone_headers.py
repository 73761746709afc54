"""HBONE request header helpers: authority, forwarded, baggage, traceparent."""

from __future__ import annotations

import ipaddress
import os

import pytest

from meshcore.wire import hbone, hbone_headers

# --- :authority ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("authority", "ip", "port"),
    [
        ("1.2.3.4:80", "1.2.3.4", 80),
        ("10.244.0.12:8080", "10.244.0.12", 8080),
        ("0.0.0.0:1", "0.0.0.0", 1),
        ("255.255.255.255:65535", "255.255.255.255", 65535),
        ("[::1]:80", "::1", 80),
        ("[2001:db8::1]:15008", "2001:db8::1", 15008),
        ("[::ffff:1.2.3.4]:443", "::ffff:1.2.3.4", 443),
        ("1.2.3.4:080", "1.2.3.4", 80),
    ],
    ids=["v4", "pod-ip", "v4-port-1", "v4-max-port", "v6-loopback", "v6", "v4-mapped", "zero-pad"],
)
def test_parse_authority(authority: str, ip: str, port: int) -> None:
    assert hbone.parse_authority(authority) == (ipaddress.ip_address(ip), port)


@pytest.mark.parametrize(
    ("authority", "reason"),
    [
        ("", "missing :port"),
        ("1.2.3.4", "missing :port"),
        ("1.2.3.4:", "not a decimal number"),
        ("1.2.3.4:0", "outside 1..65535"),
        ("1.2.3.4:65536", "outside 1..65535"),
        ("1.2.3.4:99999", "outside 1..65535"),
        ("1.2.3.4:123456", "not a decimal number"),
        ("1.2.3.4:-1", "not a decimal number"),
        ("1.2.3.4:+80", "not a decimal number"),
        ("1.2.3.4: 80", "not a decimal number"),
        ("1.2.3.4:8o", "not a decimal number"),
        ("1.2.3.4:٨٠", "not a decimal number"),
        (" 1.2.3.4:80", "not an IP address"),
        ("01.2.3.4:80", "not an IP address"),
        ("1.2.3:80", "not an IP address"),
        ("svc.ns.svc.cluster.local:80", "not an IP address"),
        ("::1:80", "must be written in brackets"),
        ("[1.2.3.4]:80", "bracketed IPv6"),
        ("[::1:80", "brackets"),
        ("[fe80::1%eth0]:80", "zone ids"),
        ("[::1]", "not a decimal number"),
        ("1.2.3.4:80\n", "not a decimal number"),
    ],
    ids=[
        "empty",
        "no-port",
        "empty-port",
        "port-zero",
        "port-too-big",
        "port-way-too-big",
        "port-six-digits",
        "port-negative",
        "port-plus",
        "port-space",
        "port-letter",
        "port-arabic-digits",
        "leading-space",
        "v4-leading-zero",
        "v4-short",
        "hostname",
        "v6-unbracketed",
        "v4-bracketed",
        "v6-unclosed",
        "v6-zone",
        "v6-no-port",
        "trailing-newline",
    ],
)
def test_parse_authority_rejects(authority: str, reason: str) -> None:
    with pytest.raises(hbone.InvalidAuthorityError) as err:
        hbone.parse_authority(authority)
    assert repr(authority) in str(err.value)
    assert reason in str(err.value)
    assert isinstance(err.value, hbone.HboneError)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize(
    ("ip", "port", "expected"),
    [
        (ipaddress.IPv4Address("1.2.3.4"), 80, "1.2.3.4:80"),
        (ipaddress.IPv6Address("::1"), 80, "[::1]:80"),
        ("2001:db8:0:0::1", 15008, "[2001:db8::1]:15008"),
        ("10.0.0.1", 65535, "10.0.0.1:65535"),
    ],
    ids=["v4", "v6", "v6-string-compressed", "v4-string"],
)
def test_format_authority_round_trips(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | str, port: int, expected: str
) -> None:
    assert hbone.format_authority(ip, port) == expected
    assert hbone.parse_authority(expected) == (ipaddress.ip_address(ip), port)


@pytest.mark.parametrize(
    ("ip", "port"),
    [("1.2.3.4", 0), ("1.2.3.4", 65536), ("not-an-ip", 80), ("fe80::1%eth0", 80)],
    ids=["port-zero", "port-too-big", "hostname", "zone"],
)
def test_format_authority_rejects(ip: str, port: int) -> None:
    with pytest.raises(hbone.InvalidAuthorityError):
        hbone.format_authority(ip, port)


# --- forwarded -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("1.2.3.4", 5, None), 'for="1.2.3.4:5"'),
        (
            ("1.2.3.4", 5, "web.shop.svc.cluster.local"),
            'for="1.2.3.4:5";host=web.shop.svc.cluster.local',
        ),
        (("2001:db8::1", 4711, None), 'for="[2001:db8::1]:4711"'),
        (("1.2.3.4", 5, 'odd "host";x'), 'for="1.2.3.4:5";host="odd \\"host\\";x"'),
    ],
    ids=["address", "with-service-host", "v6", "host-needing-quotes"],
)
def test_forwarded_header(args: tuple[str, int, str | None], expected: str) -> None:
    value = hbone.forwarded_header(*args)
    assert value == expected
    src_ip, src_port, host = args
    assert hbone.parse_forwarded(value) == (hbone.format_authority(src_ip, src_port), host)


@pytest.mark.parametrize(
    ("args"),
    [("1.2.3.4", 0, None), ("nope", 5, None), ("1.2.3.4", 5, ""), ("1.2.3.4", 5, "a\r\nb")],
    ids=["bad-port", "bad-ip", "empty-host", "host-with-crlf"],
)
def test_forwarded_header_rejects(args: tuple[str, int, str | None]) -> None:
    with pytest.raises(hbone.InvalidHeaderError):
        hbone.forwarded_header(*args)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('for="1.2.3.4:5"', ("1.2.3.4:5", None)),
        ('for="1.2.3.4:5";host=web.shop', ("1.2.3.4:5", "web.shop")),
        ("for=1.2.3.4;host=h", ("1.2.3.4", "h")),
        ('FOR="1.2.3.4:5"; Host=h', ("1.2.3.4:5", "h")),
        ('host=h;for="[::1]:5"', ("[::1]:5", "h")),
        ('for="1.2.3.4:5", for="9.9.9.9:9"', ("1.2.3.4:5", None)),
        ('for="a;b,c";host="q\\"x"', ("a;b,c", 'q"x')),
        ('by=proxy;for="1.2.3.4:5";proto=https', ("1.2.3.4:5", None)),
        ('for="1.2.3.4:5";junk;host=h', ("1.2.3.4:5", "h")),
        ('for="1.2.3.4:5"x;host=h', (None, "h")),
        ('for="unterminated', (None, None)),
        ("garbage", (None, None)),
        ("", (None, None)),
        ("=;=;,,", (None, None)),
        ("for=a b", (None, None)),
        ("for=", (None, None)),
        ('for="1.2.3.4:5";for="6.6.6.6:6"', ("1.2.3.4:5", None)),
    ],
    ids=[
        "for-only",
        "for-and-host",
        "unquoted",
        "case-and-spaces",
        "reordered",
        "first-element-only",
        "quoted-separators-and-escapes",
        "other-params",
        "malformed-pair-skipped",
        "trailing-junk-after-quote",
        "unterminated-quote",
        "garbage",
        "empty",
        "only-separators",
        "space-in-token",
        "empty-value",
        "duplicate-first-wins",
    ],
)
def test_parse_forwarded(value: str, expected: tuple[str | None, str | None]) -> None:
    assert hbone.parse_forwarded(value) == expected


# --- baggage -------------------------------------------------------------------------------------


def test_baggage_header_matches_ztunnel_layout() -> None:
    fields = {
        "k8s.cluster.name": "Kubernetes",
        "k8s.namespace.name": "shop",
        "k8s.deployment.name": "web",
        "service.name": "web",
        "service.version": "v1",
    }
    value = hbone.baggage_header(fields)
    assert value == (
        "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,k8s.deployment.name=web,"
        "service.name=web,service.version=v1"
    )
    assert hbone.parse_baggage(value) == fields


@pytest.mark.parametrize(
    ("raw", "encoded"),
    [
        ("a b", "a%20b"),
        ("x,y;z", "x%2Cy%3Bz"),
        ('q"\\', "q%22%5C"),
        ("50%", "50%25"),
        ("é", "%C3%A9"),
    ],
    ids=["space", "separators", "quote-backslash", "percent", "non-ascii"],
)
def test_baggage_values_are_percent_encoded_and_round_trip(raw: str, encoded: str) -> None:
    assert hbone.baggage_header({"k": raw}) == f"k={encoded}"
    assert hbone.parse_baggage(f"k={encoded}") == {"k": raw}


@pytest.mark.parametrize(
    "key", ["", "a b", "a=b", "a,b", "ключ"], ids=["empty", "space", "equals", "comma", "non-ascii"]
)
def test_baggage_header_rejects_bad_keys(key: str) -> None:
    with pytest.raises(hbone.InvalidHeaderError, match="baggage key"):
        hbone.baggage_header({key: "v"})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a=1,b=2", {"a": "1", "b": "2"}),
        (" a = 1 ,\tb=2 ", {"a": "1", "b": "2"}),
        ("a=1;prop=x;flag,b=2", {"a": "1", "b": "2"}),
        ("a=1,a=2", {"a": "2"}),
        ("a=,b", {"a": ""}),
        ("noequals,=v,a b=1,c=3", {"c": "3"}),
        ("a=%zz%", {"a": "%zz%"}),
        ("", {}),
        (",,,", {}),
        ("a=x=y", {"a": "x=y"}),
    ],
    ids=[
        "two",
        "whitespace",
        "properties-dropped",
        "last-duplicate-wins",
        "empty-value-and-bare-key",
        "malformed-members-skipped",
        "bad-escape-kept",
        "empty",
        "only-commas",
        "equals-in-value",
    ],
)
def test_parse_baggage(value: str, expected: dict[str, str]) -> None:
    assert hbone.parse_baggage(value) == expected


# --- traceparent ---------------------------------------------------------------------------------


def test_new_traceparent_layout_from_given_bytes() -> None:
    raw = bytes(range(1, 25))
    value = hbone.new_traceparent(lambda n: raw[:n])
    assert value == f"00-{raw[:16].hex()}-{raw[16:].hex()}-00"
    assert hbone.is_valid_traceparent(value)


def test_new_traceparent_never_emits_zero_ids() -> None:
    value = hbone.new_traceparent(lambda n: bytes(n))
    assert value == "00-" + "0" * 31 + "1-" + "0" * 15 + "1-00"
    assert hbone.is_valid_traceparent(value)


def test_new_traceparent_is_random_by_default() -> None:
    # 500 crosses several refills of the pooled random bytes (170 traceparents each).
    values = {hbone.new_traceparent() for _ in range(500)}
    assert len(values) == 500
    assert all(hbone.is_valid_traceparent(v) for v in values)


def test_a_forked_child_never_reuses_its_parents_random_bytes() -> None:
    hbone.new_traceparent()  # the pool now holds bytes both processes would otherwise share
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next value and leave without running pytest's exit
        os.close(read_end)
        os.write(write_end, hbone.new_traceparent().encode())
        os._exit(0)
    os.close(write_end)
    try:
        child = os.read(read_end, 100).decode()
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    assert hbone.is_valid_traceparent(child)
    assert child != hbone.new_traceparent()


def test_new_traceparent_rejects_a_short_random_source() -> None:
    with pytest.raises(hbone.InvalidHeaderError):
        hbone.new_traceparent(lambda n: b"\x01" * (n - 1))


TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        (f"00-{TRACE}-{PARENT}-01", True),
        (f"00-{TRACE}-{PARENT}-00", True),
        (f"01-{TRACE}-{PARENT}-00", True),
        (f"ff-{TRACE}-{PARENT}-00", False),
        (f"00-{'0' * 32}-{PARENT}-00", False),
        (f"00-{TRACE}-{'0' * 16}-00", False),
        (f"00-{TRACE.upper()}-{PARENT}-00", False),
        (f"00-{TRACE}-{PARENT}-00-extra", False),
        (f"00-{TRACE}-{PARENT}", False),
        (f"00_{TRACE}_{PARENT}_00", False),
        (f"00-{TRACE[:-1]}g-{PARENT}-00", False),
        (f"00-{TRACE}-{PARENT}-0", False),
        ("", False),
        (f"00-{TRACE}-{PARENT}-00\n", False),
    ],
    ids=[
        "sampled",
        "not-sampled",
        "future-version",
        "version-ff",
        "zero-trace",
        "zero-parent",
        "uppercase",
        "too-long",
        "too-short",
        "wrong-separator",
        "non-hex",
        "short-flags",
        "empty",
        "trailing-newline",
    ],
)
def test_is_valid_traceparent(value: str, valid: bool) -> None:
    assert hbone.is_valid_traceparent(value) is valid


def test_names_are_reexported_from_the_codec_module() -> None:
    for name in ("parse_authority", "format_authority", "parse_baggage", "HboneError"):
        assert getattr(hbone, name) is getattr(hbone_headers, name)
