"""Expressway-C's HTTP allow list (shared/spec/MRA.md §4): rules, matching, tricks, CSV, properties."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from edge_c.allowlist import (
    DEFAULT_METHODS,
    AllowList,
    PathBlocked,
    Rule,
    RuleError,
    automatic_rules,
    normalise_host,
    normalise_path,
)
from edge_c.allowlist_csv import (
    CsvFormatError,
    allowlist_test_main,
    export_rules_csv,
    parse_rules_csv,
    parse_tests_csv,
    run_csv_tests,
)

UCM = "ucm1.example.com"


def lab_list() -> AllowList:
    auto = automatic_rules([(UCM,)], [("imp1.example.com",)], [("cuc1.example.com",)])
    return AllowList(auto)


# ---- rule parsing ------------------------------------------------------------------------------


def test_rule_url_defaults_and_canonical_form() -> None:
    r = Rule("HTTPS://UCM1.Example.COM.")
    assert (r.scheme, r.host, r.port, r.path) == ("https", UCM, 443, "/")
    assert r.url == "https://ucm1.example.com:443/"
    assert r.methods == DEFAULT_METHODS == frozenset({"GET", "POST", "PUT", "DELETE", "HEAD"})
    assert r.match == "prefix"
    h = Rule("http://10.0.0.5:6970/a/b", frozenset({"get", " head "}), "EXACT", deployment=" dep1 ")
    assert (h.port, h.path, h.methods, h.match, h.deployment) == (
        6970,
        "/a/b",
        frozenset({"GET", "HEAD"}),
        "exact",
        "dep1",
    )
    assert Rule.parse("https://a.example.com/x", ["get"], "exact", "d", "text") == Rule(
        "https://a.example.com:443/x", frozenset({"GET"}), "exact", "d", "text"
    )
    v6 = Rule("https://[2001:DB8::0001]:8443/x/")
    assert (v6.host, v6.url) == ("2001:db8::1", "https://[2001:db8::1]:8443/x/")
    assert Rule("https://ucm1.example.com/%7Ealice/").path == "/~alice/"


@pytest.mark.parametrize(
    ("url", "kwargs", "field", "reason"),
    [
        ("ftp://ucm1.example.com/", {}, "url", "scheme must be http or https"),
        ("ucm1.example.com/cucm-uds/", {}, "url", "not an http(s)://"),
        ("https:///cucm-uds/", {}, "url", "empty host"),
        ("https://:8443/", {}, "url", "empty host"),
        ("https://bad_host!/", {}, "url", "bad host"),
        ("https://user@ucm1.example.com/", {}, "url", "user info"),
        ("https://ucm1.example.com:0/", {}, "url", "port must be 1-65535"),
        ("https://ucm1.example.com:65536/", {}, "url", "port must be 1-65535"),
        ("https://ucm1.example.com:84a3/", {}, "url", "port must be 1-65535"),
        ("https://ucm1.example.com:/", {}, "url", "port must be 1-65535"),
        ("https://ucm1.example.com/a/../b/", {}, "url", "dot segment"),
        ("https://ucm1.example.com/a/%2e%2E/b/", {}, "url", "dot segment"),
        ("https://ucm1.example.com/a%2fb/", {}, "url", "encoded slash"),
        ("https://ucm1.example.com/a?x=1", {}, "url", "query"),
        ("https://ucm1.example.com/a#frag", {}, "url", "fragment"),
        ("https://ucm1.example.com/a b", {}, "url", "invalid character"),
        (
            "https://ucm1.example.com/",
            {"methods": frozenset({"GET", "PATCH"})},
            "methods",
            "unknown method 'PATCH'",
        ),
        ("https://ucm1.example.com/", {"match": "regex"}, "match", "exact or prefix"),
    ],
)
def test_rule_errors_name_the_field_and_reason(
    url: str, kwargs: dict[str, object], field: str, reason: str
) -> None:
    with pytest.raises(RuleError) as info:
        Rule(url, **kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
    assert reason in info.value.reason


# ---- automatic rules ---------------------------------------------------------------------------


def test_automatic_rules_cover_each_discovered_node() -> None:
    rules = automatic_rules([(UCM,)], [("imp1.example.com",)], [("cuc1.example.com",)])
    table = {(r.url, frozenset(r.methods), r.match, r.origin) for r in rules}
    assert table == {
        ("https://ucm1.example.com:8443/cucm-uds/", frozenset({"GET"}), "prefix", "ucm:ucm1.example.com"),
        (
            "https://ucm1.example.com:8443/ssp/oauth/",
            frozenset({"GET", "POST"}),
            "prefix",
            "ucm:ucm1.example.com",
        ),
        ("http://ucm1.example.com:6970/", frozenset({"GET"}), "prefix", "ucm:ucm1.example.com"),
        ("https://ucm1.example.com:6972/", frozenset({"GET"}), "prefix", "ucm:ucm1.example.com"),
        ("https://imp1.example.com:8443/EPASSoap/", frozenset({"POST"}), "prefix", "imp:imp1.example.com"),
        ("https://imp1.example.com:7336/", frozenset({"GET", "POST"}), "prefix", "imp:imp1.example.com"),
        (
            "https://cuc1.example.com:443/vmrest/",
            frozenset({"GET", "POST", "PUT", "DELETE"}),
            "prefix",
            "cuc:cuc1.example.com",
        ),
        (
            "https://cuc1.example.com:8443/vmrest/",
            frozenset({"GET", "POST", "PUT", "DELETE"}),
            "prefix",
            "cuc:cuc1.example.com",
        ),
    }
    assert all(r.automatic for r in rules)
    custom = automatic_rules([(UCM, 9443, 6900, 6901)])
    assert {r.port for r in custom} == {9443, 6900, 6901}
    imp = automatic_rules(imp_nodes=[("imp1.example.com", 9443), ("imp2.example.com", 9443, 7000)])
    assert [(r.host, r.port) for r in imp] == [
        ("imp1.example.com", 9443),
        ("imp1.example.com", 7336),
        ("imp2.example.com", 9443),
        ("imp2.example.com", 7000),
    ]
    assert [r.port for r in automatic_rules(cuc_nodes=[("cuc1.example.com", 443)])] == [443]


def test_automatic_rules_are_read_only_with_stable_ids() -> None:
    al = lab_list()
    ids = [e.rule_id for e in al.automatic()]
    assert len(ids) == 8 and all(i.startswith("auto-") for i in ids)
    with pytest.raises(ValueError, match="cannot be removed"):
        al.remove(ids[0])
    with pytest.raises(ValueError, match="set_automatic"):
        al.add(al.get(ids[0]))
    # Refresh servers rebuilds them: same nodes, same ids.
    al.set_automatic(automatic_rules([(UCM,)], [("imp1.example.com",)], [("cuc1.example.com",)]))
    assert [e.rule_id for e in al.automatic()] == ids
    al.set_automatic(automatic_rules([("ucm2.example.com",)]))
    assert not al.check("https", UCM, 8443, "GET", "/cucm-uds/users").allowed
    assert al.check("https", "ucm2.example.com", 8443, "GET", "/cucm-uds/users").allowed


def test_lab_traffic_through_automatic_rules() -> None:
    al = lab_list()
    assert al.check("https", UCM, 8443, "GET", "/cucm-uds/user/alice?x=1").allowed
    assert al.check("https", UCM, 8443, "POST", "/ssp/oauth/token").allowed
    assert al.check("http", UCM, 6970, "GET", "/CSFALICE.cnf.xml").allowed
    assert al.check("https", "imp1.example.com", 8443, "POST", "/EPASSoap/service/v105").allowed
    assert al.check("https", "cuc1.example.com", 443, "DELETE", "/vmrest/messages/1").allowed
    assert not al.check("https", UCM, 8443, "POST", "/axl/").allowed
    assert not al.check("https", UCM, 8443, "PUT", "/cucm-uds/user/alice").allowed


# ---- editable rules, exact / prefix, methods, deployments ---------------------------------------


def test_editable_rules_add_remove_replace_with_stable_ids() -> None:
    al = lab_list()
    a = al.add(Rule("https://web.example.com/a/"))
    b = al.add(Rule("https://web.example.com/b/"))
    assert (a, b) == ("rule-1", "rule-2")
    assert al.remove(a).url == "https://web.example.com:443/a/"
    c = al.add(Rule("https://web.example.com/c/"))
    assert c == "rule-3"  # ids are never reused
    assert [e.rule_id for e in al.editable()] == ["rule-2", "rule-3"]
    assert al.add(Rule("https://web.example.com/d/"), rule_id="kept-7") == "kept-7"
    with pytest.raises(ValueError, match="duplicate"):
        al.add(Rule("https://web.example.com/e/"), rule_id="kept-7")
    with pytest.raises(KeyError):
        al.remove("rule-99")
    new = al.replace_editable([Rule("https://web.example.com/z/")])
    assert [e.rule_id for e in al.editable()] == new and len(al) == 8 + 1
    assert not al.check("https", "web.example.com", 443, "GET", "/b/x").allowed
    assert al.check("https", "web.example.com", 443, "GET", "/z/x").allowed
    assert [e.rule.automatic for e in al.entries()] == [True] * 8 + [False]
    assert al.rules() == [e.rule for e in al.entries()]
    assert al.editable_rules() == [Rule("https://web.example.com/z/")]


def test_exact_and_prefix_matching() -> None:
    al = AllowList()
    ex = al.add(Rule("https://h.example.com:8443/exact/thing", match="exact"))
    seg = al.add(Rule("https://h.example.com:8443/dir/"))
    plain = al.add(Rule("https://h.example.com:8443/foo"))
    check = al.check
    assert check("https", "h.example.com", 8443, "GET", "/exact/thing?q=1").rule_id == ex
    assert not check("https", "h.example.com", 8443, "GET", "/exact/thing/more").allowed
    assert not check("https", "h.example.com", 8443, "GET", "/exact/thin").allowed
    assert check("https", "h.example.com", 8443, "GET", "/dir/").rule_id == seg
    assert check("https", "h.example.com", 8443, "GET", "/dir/a/b/c").rule_id == seg
    assert not check("https", "h.example.com", 8443, "GET", "/dir").allowed
    assert not check("https", "h.example.com", 8443, "GET", "/directory").allowed
    assert check("https", "h.example.com", 8443, "GET", "/foobar").rule_id == plain  # plain string prefix
    assert check("https", "h.example.com", 8443, "GET", "/foo/x").rule_id == plain
    assert check("https", "h.example.com", 8443, "GET", "/%64ir/%7Euser").path == "/dir/~user"
    assert not check("https", "h.example.com", 8443, "GET", "/DIR/x").allowed  # paths are case-sensitive


def test_host_scheme_and_port_must_match() -> None:
    al = AllowList(editable=[Rule("https://h.example.com:8443/")])
    assert al.check("HTTPS", "H.Example.Com.", 8443, "GET", "/x").allowed
    for scheme, host, port in [
        ("http", "h.example.com", 8443),
        ("https", "h.example.com", 443),
        ("https", "g.example.com", 8443),
    ]:
        d = al.check(scheme, host, port, "GET", "/x")
        assert not d.allowed and d.reason.startswith("no rule for ")


def test_most_specific_rule_wins_and_methods_are_checked() -> None:
    al = AllowList()
    broad = al.add(Rule("https://h.example.com/api/", frozenset({"GET"})))
    narrow = al.add(Rule("https://h.example.com/api/admin/", frozenset({"POST"})))
    exact = al.add(Rule("https://h.example.com/api/admin/x", frozenset({"PUT"}), "exact"))
    assert al.check("https", "h.example.com", 443, "PUT", "/api/admin/x").rule_id == exact
    assert al.check("https", "h.example.com", 443, "POST", "/api/admin/x").rule_id == narrow
    assert al.check("https", "h.example.com", 443, "GET", "/api/admin/x").rule_id == broad
    d = al.check("https", "h.example.com", 443, "DELETE", "/api/admin/x")
    assert not d.allowed and "method 'DELETE' not allowed" in d.reason
    assert not al.check("https", "h.example.com", 443, "get", "/api/x").allowed  # methods are case-sensitive


def test_deployments() -> None:
    al = AllowList()
    al.add(Rule("https://h.example.com/a/", deployment="east"))
    anyd = al.add(Rule("https://h.example.com/b/"))
    assert al.check("https", "h.example.com", 443, "GET", "/a/x", deployment="east").allowed
    d = al.check("https", "h.example.com", 443, "GET", "/a/x", deployment="west")
    assert not d.allowed and "deployment 'east'" in d.reason
    assert not al.check("https", "h.example.com", 443, "GET", "/a/x").allowed
    assert al.check("https", "h.example.com", 443, "GET", "/b/x", deployment="west").rule_id == anyd


# ---- tricks ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/cucm-uds/..%2faxl/", "encoded slash"),
        ("/cucm-uds/%2Faxl", "encoded slash"),
        ("/cucm-uds/..%5caxl", "encoded backslash"),
        ("/cucm-uds/x%00.xml", "encoded control character"),
        ("/cucm-uds/x%0d%0aHost:", "encoded control character"),
        ("/cucm-uds/../axl/", "dot segment"),
        ("/cucm-uds/./user", "dot segment"),
        ("/cucm-uds/%2e%2e/axl/", "dot segment"),
        ("/cucm-uds/.%2E/axl/", "dot segment"),
        ("/cucm-uds/..", "dot segment"),
        ("/cucm-uds/..;jsessionid=1/axl/", "dot segment"),
        ("/cucm-uds//user", "empty path segment"),
        ("/cucm-uds/%252e%252e/axl/", "double percent-encoding"),
        ("/cucm-uds/%c0%ae%c0%ae/axl/", "invalid UTF-8"),
        ("/cucm-uds/%zz", "malformed percent-encoding"),
        ("/cucm-uds/%2", "malformed percent-encoding"),
        ("/cucm-uds\\..\\axl", "backslash"),
        ("/cucm-uds/a b", "invalid character"),
        ("/cucm-uds/caf\u00e9", "invalid character"),
        ("cucm-uds/user", "must start with '/'"),
        ("*", "must start with '/'"),
        ("/cucm-uds/" + "a" * 9000, "longer than"),
    ],
)
def test_tricks_are_blocked_with_a_reason(path: str, reason: str) -> None:
    d = lab_list().check("https", UCM, 8443, "GET", path)
    assert not d.allowed
    assert reason in d.reason


def test_safe_encodings_are_kept_and_normalised() -> None:
    assert normalise_path("/cucm-uds/user/j%c3%a9r%C3%B4me?q=%2f") == "/cucm-uds/user/j%C3%A9r%C3%B4me"
    assert normalise_path("/a/%41%2D%7e/") == "/a/A-~/"
    assert normalise_path("/a/...;x/") == "/a/...;x/"  # "..." is a name, not a dot segment
    with pytest.raises(PathBlocked):
        normalise_path("/a/%2e/b")


# ---- CSV ---------------------------------------------------------------------------------------

RULES_CSV = """Url,Deployment,HttpMethods,MatchType,Description
https://web.example.com:8443/api/,,"GET,POST",prefix,API
http://web.example.com/status,east,GET,exact,status page
https://files.example.com/,,,,everything
"""


def test_rules_csv_parse_and_round_trip() -> None:
    rules = parse_rules_csv("\ufeff" + RULES_CSV)
    assert [(r.url, r.method_list(), r.match, r.deployment, r.description) for r in rules] == [
        ("https://web.example.com:8443/api/", ["GET", "POST"], "prefix", "", "API"),
        ("http://web.example.com:80/status", ["GET"], "exact", "east", "status page"),
        (
            "https://files.example.com:443/",
            ["GET", "POST", "PUT", "DELETE", "HEAD"],
            "prefix",
            "",
            "everything",
        ),
    ]
    text = export_rules_csv(rules)
    assert text.splitlines()[0] == "Url,Deployment,HttpMethods,MatchType,Description"
    assert '"GET,POST"' in text
    assert parse_rules_csv(text) == rules
    assert export_rules_csv(parse_rules_csv(text)) == text


def test_rules_csv_columns_any_order_and_case() -> None:
    rules = parse_rules_csv("url,matchtype\nhttps://a.example.com/x,exact\n")
    assert rules == [Rule("https://a.example.com/x", match="exact")]


def test_rules_csv_reports_every_bad_line() -> None:
    text = (
        "Url,Deployment,HttpMethods,MatchType,Description\n"
        "https://ok.example.com/,,,,\n"
        "ftp://bad.example.com/,,,,\n"
        "\n"
        "https://ok.example.com/,,FETCH,,\n"
        "https://ok.example.com/,,,fuzzy,\n"
        'https://ok.example.com/,,,prefix,"multi\nline"\n'
        "https://ok.example.com/a/../b,,,,\n"
        "https://ok.example.com/,,\n"
    )
    with pytest.raises(CsvFormatError) as info:
        parse_rules_csv(text)
    got = [(e.line, e.column, e.reason.split(" ")[0]) for e in info.value.errors]
    assert got == [
        (3, "Url", "scheme"),
        (5, "HttpMethods", "unknown"),
        (6, "MatchType", "match"),
        (9, "Url", "path:"),
        (10, "", "expected"),
    ]
    assert str(info.value.errors[0]).startswith("line 3, column Url: scheme must be http or https")


@pytest.mark.parametrize(
    "text", ["", "Url,Bogus\nhttps://a.example.com/,x\n", "Deployment\nx\n", "Url\n" + "a" * 200_000 + "\n"]
)
def test_rules_csv_bad_header_or_file(text: str) -> None:
    with pytest.raises(CsvFormatError):
        parse_rules_csv(text)


TESTS_CSV = """Url,ExpectedResult,Deployment,Description,HttpMethod
https://web.example.com:8443/api/users?x=1,allow,,list users,
https://web.example.com:8443/api/users,allow,,create,post
https://web.example.com:8443/api/users,block,,no delete,DELETE
https://web.example.com:8443/api/%2e%2e/admin,block,,traversal,
http://web.example.com/status,allow,east,status,GET
http://web.example.com/status,block,west,status other dep,GET
https://web.example.com:8443/api/x,block,,this one is wrong,
"""


def test_csv_test_runner() -> None:
    al = AllowList(editable=parse_rules_csv(RULES_CSV))
    report = run_csv_tests(al, TESTS_CSV)
    assert (report.passed, report.failed) == (6, 1)
    first, last = report.results[0], report.results[-1]
    assert (first.line, first.method, first.expected, first.actual, first.passed) == (
        2,
        "GET",
        "allow",
        "allow",
        True,
    )
    assert (last.line, last.expected, last.actual, last.passed) == (8, "block", "allow", False)
    assert report.results[3].reason == "blocked path: dot segment '..' in path"
    text = report.format_text()
    assert "FAIL line 8: GET https://web.example.com:8443/api/x expected block, got allow" in text
    assert text.endswith("6 passed, 1 failed\n")


def test_csv_tests_file_errors() -> None:
    text = "Url,ExpectedResult\nhttps://a.example.com/,maybe\nmailto:x,allow\nhttps://a.example.com:99999/,block\n"
    with pytest.raises(CsvFormatError) as info:
        parse_tests_csv(text)
    assert [(e.line, e.column) for e in info.value.errors] == [(2, "ExpectedResult"), (3, "Url"), (4, "Url")]
    t = parse_tests_csv("Url,ExpectedResult\nhttps://[::1]:8443,allow\n")[0]
    assert (t.host, t.port, t.target, t.method) == ("[::1]", 8443, "/", "GET")


def test_allowlist_test_main_exit_codes() -> None:
    ok_tests = "\n".join(TESTS_CSV.splitlines()[:-1]) + "\n"
    assert allowlist_test_main(RULES_CSV, ok_tests) == (
        0,
        run_csv_tests(AllowList(editable=parse_rules_csv(RULES_CSV)), ok_tests).format_text(),
    )
    code, out = allowlist_test_main(RULES_CSV, TESTS_CSV)
    assert code == 1 and "6 passed, 1 failed" in out
    code, out = allowlist_test_main("Url\nftp://x/\n", TESTS_CSV)
    assert code == 2 and out.startswith("rules: line 2, column Url:")
    code, out = allowlist_test_main(RULES_CSV, "Url,ExpectedResult\nhttps://a/,perhaps\n")
    assert code == 2 and out.startswith("tests: line 2, column ExpectedResult:")
    auto = automatic_rules([(UCM,)])
    code, out = allowlist_test_main(
        "Url\n", "Url,ExpectedResult\nhttps://ucm1.example.com:8443/cucm-uds/x,allow\n", auto
    )
    assert code == 0


# ---- scale -------------------------------------------------------------------------------------


def test_thousands_of_rules_index_correctly() -> None:
    al = AllowList(
        editable=[Rule(f"https://h{i}.example.com:8443/p{i}/", frozenset({"GET"})) for i in range(3000)]
    )
    al.replace_editable(
        [*(e.rule for e in al.editable()), *(Rule(f"https://h0.example.com:8443/q{i}") for i in range(500))]
    )
    assert al.check("https", "h2999.example.com", 8443, "GET", "/p2999/x").allowed
    assert not al.check("https", "h2999.example.com", 8443, "GET", "/p2998/x").allowed
    assert al.check("https", "h0.example.com", 8443, "GET", "/q4990").allowed  # prefix "/q499"
    assert not al.check("https", "h0.example.com", 8443, "GET", "/r").allowed


# ---- properties --------------------------------------------------------------------------------

_SAFE_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_~.!$&'()*+,=:@"
_safe_segment = st.text(_SAFE_CHARS, min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))
_PREFIX_LIST = AllowList(editable=[Rule("https://ucm1.example.com:8443/cucm-uds/", frozenset({"GET"}))])
_OPEN_LIST = AllowList(editable=[Rule("https://ucm1.example.com:8443/")])


@given(
    st.lists(_safe_segment, max_size=8),
    st.booleans(),
    st.text(_SAFE_CHARS + "/?%=&", max_size=20),
)
def test_property_safe_extension_of_a_prefix_is_allowed(segs: list[str], slash: bool, query: str) -> None:
    path = "/cucm-uds/" + "/".join(segs) + ("/" if slash and segs else "")
    d = _PREFIX_LIST.check("https", UCM, 8443, "GET", f"{path}?{query}")
    assert d.allowed, d.reason
    assert d.path == path


# A whole segment that is a dot segment or empty (a "//"), or a segment hiding an encoded slash,
# backslash or NUL.
_TRICK_SEGMENTS = [
    "..",
    ".",
    "%2e%2e",
    "%2E.",
    ".%2e",
    "%2e",
    "..;x",
    "",
    "a%2fb",
    "%2F",
    "x%5c",
    "%5C..",
    "n%00",
]


@given(
    st.lists(_safe_segment, max_size=6),
    st.sampled_from(_TRICK_SEGMENTS),
    st.integers(min_value=0, max_value=6),
    st.booleans(),
)
def test_property_encoded_slash_or_dot_segments_are_blocked(
    segs: list[str], trick: str, at: int, last: bool
) -> None:
    at = min(at, len(segs))
    tail = segs[at:] if (last and trick) else [*segs[at:], "end"]
    path = "/" + "/".join([*segs[:at], trick, *tail])
    d = _OPEN_LIST.check("https", UCM, 8443, "GET", path)
    assert not d.allowed and d.reason.startswith("blocked path:"), path


_LAB = lab_list()
_KNOWN = {(e.rule.scheme, e.rule.host, e.rule.port) for e in _LAB.entries()}
_KNOWN_HOSTS = sorted({h for _, h, _ in _KNOWN})


@given(
    st.sampled_from(["http", "https", "HTTPS"]),
    st.one_of(st.sampled_from(_KNOWN_HOSTS), st.text(max_size=30)),
    st.one_of(st.sampled_from([80, 443, 6970, 6972, 7336, 8443]), st.integers(min_value=-1, max_value=70000)),
    st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD"]),
    st.text(_SAFE_CHARS + "/", max_size=40),
)
def test_property_no_rule_for_host_and_port_is_blocked(
    scheme: str, host: str, port: int, method: str, path: str
) -> None:
    assume((scheme.lower(), normalise_host(host), port) not in _KNOWN)
    d = _LAB.check(scheme, host, port, method, "/" + path)
    assert not d.allowed
    assert d.reason.startswith("no rule for ")


@given(st.text(), st.text(), st.integers(), st.text(), st.text(), st.text())
def test_property_check_never_raises(
    scheme: str, host: str, port: int, method: str, path: str, dep: str
) -> None:
    d = lab_list().check(scheme, host, port, method, path, dep)
    assert isinstance(d.allowed, bool) and d.reason
