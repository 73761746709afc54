"""meshcore.traffic.regexes: user regexes run by RE2 as Envoy runs them: whole-value matches in
time linear in the text, RE2's syntax only, and Envoy's ``regex_rewrite`` substitution."""

from __future__ import annotations

import pytest

from meshcore.traffic import regexes

# Python's backtracking `re` takes about 2**n steps for n 'a's on this pattern: with 40 it
# would run for hours, so if matching ever went back to `re` this test would hang until
# pytest-timeout fails it, rather than pass slowly.
CATASTROPHIC = "/(a+)+$"
LONG_PATH = "/" + "a" * 40 + "!"


def test_a_pattern_that_backtracks_exponentially_is_matched_at_once() -> None:
    pattern = regexes.compile(CATASTROPHIC)
    assert not pattern.matches(LONG_PATH)
    assert pattern.matches(LONG_PATH[:-1])


def test_a_pattern_that_backtracks_exponentially_is_searched_at_once() -> None:
    assert regexes.compile("(a+)+b").replace_all("x", "a" * 40 + "!") == "a" * 40 + "!"


@pytest.mark.parametrize(
    ("pattern", "text", "ignore_case", "expected"),
    [
        pytest.param("/api/[0-9]+", "/api/12", False, True, id="whole"),
        pytest.param("/api/[0-9]+", "/api/12/more", False, False, id="not-a-prefix"),
        pytest.param("/api/[0-9]+", "/x/api/12", False, False, id="not-a-search"),
        pytest.param("a|ab", "ab", False, True, id="a-later-alternative-completes-it"),
        pytest.param("/API", "/api", True, True, id="ignore-case"),
        pytest.param("/API", "/api", False, False, id="case-sensitive"),
        pytest.param("/é", "/É", True, True, id="ignore-case-beyond-ascii"),
        pytest.param("/caf.", "/café", False, True, id="dot-is-one-character"),
        pytest.param(r"\d+", "١٢", False, False, id="digits-are-ascii-as-in-re2"),
        pytest.param("^(.*?;)?(user=premium)(;.*)?$", "a=1;user=premium", False, True, id="lazy"),
    ],
)
def test_matches_holds_for_the_whole_text_only(
    pattern: str, text: str, ignore_case: bool, expected: bool
) -> None:
    assert regexes.compile(pattern, ignore_case=ignore_case).matches(text) is expected


@pytest.mark.parametrize(
    ("pattern", "detail"),
    [
        pytest.param(r"(a)\1", r"backreference is not supported (invalid escape", id="backref"),
        pytest.param(r"(?P<x>a)(?P=x)", "backreference is not supported", id="named-backref"),
        pytest.param("/(?!admin).*", "lookahead is not supported", id="lookahead"),
        pytest.param("(?<=a)b", "lookbehind is not supported", id="lookbehind"),
        pytest.param(r"/v2\Z", r"invalid escape sequence: \Z", id="python-only-escape"),
        pytest.param("a++", "bad repetition operator: ++", id="possessive"),
        pytest.param("a{1001}", "invalid repetition size: {1001}", id="repetition-too-large"),
        pytest.param("(", "missing ): (", id="unbalanced"),
    ],
)
def test_what_re2_refuses_is_an_error_saying_why(pattern: str, detail: str) -> None:
    with pytest.raises(regexes.RegexError) as raised:
        regexes.compile(pattern)
    assert detail in str(raised.value)


@pytest.mark.parametrize(
    ("pattern", "rewrite", "text", "expected"),
    [
        pytest.param(
            "^/service/([^/]+)(/.*)$",
            r"\2/instance/\1",
            "/service/foo/bar",
            "/bar/instance/foo",
            id="groups-reordered",
        ),
        pytest.param("/v1/", "/v2/", "/v1/a/v1/b", "/v2/a/v2/b", id="every-match"),
        pytest.param("/v1/", "/v2/", "/v3/a", "/v3/a", id="no-match"),
        pytest.param("(a)|b", r"[\1]", "ab", "[a][]", id="unset-group-is-empty"),
        pytest.param("x", r"[\0]", "axb", "a[x]b", id="group-0-is-the-match"),
        pytest.param("x", r"\\", "axb", "a\\b", id="escaped-backslash"),
        pytest.param("/x", "/ü日本", "/x/y", "/ü日本/y", id="utf8-replacement"),
        pytest.param("é", "e", "café é", "cafe e", id="utf8-text"),
        # RE2::GlobalReplace skips an empty match right after the previous match (Python's
        # re.sub would give "-a-b--d-"), and steps over whole characters.
        pytest.param("x*", "-", "abxd", "-a-b-d-", id="empty-matches-as-envoy"),
        pytest.param("", "-", "日本", "-日-本-", id="empty-matches-between-characters"),
        pytest.param(r"\A/v2", "", "/v2/v2", "/v2", id="anchored-at-the-text-start-only"),
    ],
)
def test_replace_all_is_envoys_regex_rewrite(
    pattern: str, rewrite: str, text: str, expected: str
) -> None:
    compiled = regexes.compile(pattern)
    compiled.check_rewrite(rewrite)
    assert compiled.replace_all(rewrite, text) == expected


@pytest.mark.parametrize(
    ("rewrite", "detail"),
    [
        pytest.param(r"/\2", r"\2 refers to a group the pattern does not have (it has 1)", id="n"),
        pytest.param(r"/\g<1>", "must be followed by a digit or", id="python-group-syntax"),
        pytest.param("/x\\", "not allowed at the end", id="trailing-backslash"),
    ],
)
def test_a_rewrite_re2_cannot_apply_is_refused(rewrite: str, detail: str) -> None:
    with pytest.raises(regexes.RegexError) as raised:
        regexes.compile("^/v2/(.*)$").check_rewrite(rewrite)
    assert detail in str(raised.value)


def test_escape_makes_a_literal_and_patterns_compare_by_text_and_case() -> None:
    assert regexes.compile(regexes.escape("/a.b+(c)")).matches("/a.b+(c)")
    assert not regexes.compile(regexes.escape("/a.b")).matches("/axb")
    assert regexes.compile("/a") == regexes.compile("/a")
    assert regexes.compile("/a") != regexes.compile("/a", ignore_case=True)
