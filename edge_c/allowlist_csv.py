"""CSV formats of the HTTP allow list: rule upload/export and rule tests (shared/spec/MRA.md §4).

Rules: header `Url,Deployment,HttpMethods,MatchType,Description`. HttpMethods is a list such as
`"GET,POST"` (quoted, since it holds commas; spaces and ";" also separate) or empty for the
default set; MatchType `exact`/`prefix`, empty meaning `prefix`.

Tests: header `Url,ExpectedResult,Deployment,Description,HttpMethod`; ExpectedResult `allow` or
`block`; HttpMethod empty meaning GET. A test URL is taken as the client would send it: its path
is *not* normalised here, so tests can probe tricks (`/cucm-uds/%2e%2e/axl/`).

Headers are matched case-insensitively and columns may come in any order; `Url` is required.
Parsing is all-or-nothing: every bad line is reported (`CsvFormatError.errors`), none applied.
Pure text in, values out: the CLI reads the files.
"""

from __future__ import annotations

import _csv
import csv
import io
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from edge_c.allowlist import AllowList, Rule, RuleError

RULES_HEADER: tuple[str, ...] = ("Url", "Deployment", "HttpMethods", "MatchType", "Description")
TESTS_HEADER: tuple[str, ...] = ("Url", "ExpectedResult", "Deployment", "Description", "HttpMethod")
_RULE_FIELD_COLUMN = {
    "url": "Url",
    "methods": "HttpMethods",
    "match": "MatchType",
    "deployment": "Deployment",
}
_TEST_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://(?P<authority>[^/?#]*)(?P<target>.*)", re.S)


@dataclass(frozen=True)
class CsvError:
    line: int
    column: str
    reason: str

    def __str__(self) -> str:
        where = f"line {self.line}" + (f", column {self.column}" if self.column else "")
        return f"{where}: {self.reason}"


class CsvFormatError(ValueError):
    def __init__(self, errors: list[CsvError]) -> None:
        super().__init__("\n".join(str(e) for e in errors))
        self.errors = errors


def _rows(reader: _csv.Reader) -> Iterator[list[str]]:
    try:
        yield from reader
    except csv.Error as exc:
        raise CsvFormatError([CsvError(reader.line_num, "", f"malformed CSV: {exc}")]) from None


def _records(text: str, header: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """(first line number, {canonical column: stripped value}) per non-blank record."""
    reader = csv.reader(io.StringIO(text.removeprefix("\ufeff")))
    by_lower = {h.lower(): h for h in header}
    columns: list[str] | None = None
    line = 1
    for row in _rows(reader):
        start, line = line, reader.line_num + 1
        if not any(cell.strip() for cell in row):
            continue
        if columns is None:
            unknown = [c for c in row if c.strip().lower() not in by_lower]
            if unknown or "url" not in [c.strip().lower() for c in row]:
                raise CsvFormatError([CsvError(start, "", f"header must be {','.join(header)}")])
            columns = [by_lower[c.strip().lower()] for c in row]
            continue
        if len(row) != len(columns):
            yield start, {"": f"expected {len(columns)} fields, got {len(row)}"}
            continue
        yield start, {c: v.strip() for c, v in zip(columns, row, strict=True)}
    if columns is None:
        raise CsvFormatError([CsvError(1, "", f"missing header {','.join(header)}")])


def _split_methods(text: str) -> frozenset[str]:
    return frozenset(m for m in re.split(r"[\s,;]+", text) if m)


def parse_rules_csv(text: str) -> list[Rule]:
    """Editable rules from an upload, or CsvFormatError listing every bad line."""
    rules: list[Rule] = []
    errors: list[CsvError] = []
    for line, rec in _records(text, RULES_HEADER):
        if "" in rec:
            errors.append(CsvError(line, "", rec[""]))
            continue
        try:
            rules.append(
                Rule(
                    rec["Url"],
                    _split_methods(rec.get("HttpMethods", "")),
                    rec.get("MatchType") or "prefix",
                    deployment=rec.get("Deployment", ""),
                    description=rec.get("Description", ""),
                )
            )
        except RuleError as exc:
            errors.append(CsvError(line, _RULE_FIELD_COLUMN.get(exc.field, ""), exc.reason))
    if errors:
        raise CsvFormatError(errors)
    return rules


def _write(header: tuple[str, ...], rows: Iterable[list[str]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def export_rules_csv(rules: Iterable[Rule]) -> str:
    """The upload format; parse_rules_csv(export_rules_csv(rules)) == rules (editable fields)."""
    return _write(
        RULES_HEADER,
        ([r.url, r.deployment, ",".join(r.method_list()), r.match, r.description] for r in rules),
    )


# ---- tests -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CsvTest:
    line: int
    url: str
    scheme: str
    host: str
    port: int
    target: str
    """Path and query exactly as written (the raw request target)."""
    expected: str
    method: str
    deployment: str = ""
    description: str = ""


def _split_test_url(url: str) -> tuple[str, str, int, str]:
    m = _TEST_URL.fullmatch(url)
    if m is None or m["scheme"].lower() not in ("http", "https"):
        raise ValueError("not an http(s)://host[:port]/path URL")
    scheme, authority = m["scheme"].lower(), m["authority"]
    host, sep, port_text = authority.rpartition(":") if not authority.endswith("]") else ("", "", "")
    if not sep:
        host, port_text = authority, ""
    if not host:
        raise ValueError("empty host")
    if port_text and not (port_text.isascii() and port_text.isdigit() and 1 <= int(port_text) <= 65535):
        raise ValueError(f"bad port {port_text!r}")
    port = int(port_text) if port_text else (443 if scheme == "https" else 80)
    target = m["target"] or "/"
    return scheme, host, port, target if target.startswith("/") else "/" + target


def parse_tests_csv(text: str) -> list[CsvTest]:
    tests: list[CsvTest] = []
    errors: list[CsvError] = []
    for line, rec in _records(text, TESTS_HEADER):
        if "" in rec:
            errors.append(CsvError(line, "", rec[""]))
            continue
        expected = rec.get("ExpectedResult", "").lower()
        if expected not in ("allow", "block"):
            errors.append(CsvError(line, "ExpectedResult", f"must be allow or block, got {expected!r}"))
            continue
        try:
            scheme, host, port, target = _split_test_url(rec["Url"])
        except ValueError as exc:
            errors.append(CsvError(line, "Url", str(exc)))
            continue
        method = rec.get("HttpMethod", "").upper() or "GET"
        deployment, description = rec.get("Deployment", ""), rec.get("Description", "")
        tests.append(
            CsvTest(line, rec["Url"], scheme, host, port, target, expected, method, deployment, description)
        )
    if errors:
        raise CsvFormatError(errors)
    return tests


@dataclass(frozen=True)
class TestResult:
    __test__ = False  # not a pytest test class

    line: int
    url: str
    method: str
    expected: str
    actual: str
    passed: bool
    reason: str


@dataclass(frozen=True)
class TestReport:
    __test__ = False  # not a pytest test class

    results: list[TestResult]
    passed: int
    failed: int

    def format_text(self) -> str:
        lines = [
            f"{'PASS' if r.passed else 'FAIL'} line {r.line}: {r.method} {r.url} "
            f"expected {r.expected}, got {r.actual} ({r.reason})"
            for r in self.results
        ]
        lines.append(f"{self.passed} passed, {self.failed} failed")
        return "\n".join(lines) + "\n"


def run_csv_tests(allow_list: AllowList, tests_csv_text: str) -> TestReport:
    """Run CSV tests against a list (offline or the live one). CsvFormatError on a bad file."""
    results: list[TestResult] = []
    for t in parse_tests_csv(tests_csv_text):
        d = allow_list.check(t.scheme, t.host, t.port, t.method, t.target, t.deployment)
        actual = "allow" if d.allowed else "block"
        results.append(
            TestResult(t.line, t.url, t.method, t.expected, actual, actual == t.expected, d.reason)
        )
    passed = sum(r.passed for r in results)
    return TestReport(results, passed, len(results) - passed)


def allowlist_test_main(rules_csv: str, tests_csv: str, automatic: Iterable[Rule] = ()) -> tuple[int, str]:
    """`edge allowlist test rules.csv tests.csv` given the two files' *text*.

    Exit code 0 when every test passes, 1 when some fail, 2 when either file is malformed.
    """
    try:
        allow_list = AllowList(automatic, parse_rules_csv(rules_csv))
    except CsvFormatError as exc:
        return 2, "".join(f"rules: {e}\n" for e in exc.errors)
    try:
        report = run_csv_tests(allow_list, tests_csv)
    except CsvFormatError as exc:
        return 2, "".join(f"tests: {e}\n" for e in exc.errors)
    return (0 if report.failed == 0 else 1), report.format_text()
