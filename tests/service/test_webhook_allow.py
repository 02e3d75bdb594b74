"""service/jobs/webhook_allow.py and WebhookPolicy (service/jobs/webhooks.py): which webhook URLs the
`--webhook-allow` patterns let through, what is refused and why, and the patterns' own grammar."""

from __future__ import annotations

import pytest

from service.jobs.webhook_allow import parse_allow, parse_pattern, url_host
from service.jobs.webhooks import WebhookPolicy
from service.problems import Problem


def refusal(policy: WebhookPolicy, url: object) -> Problem:
    with pytest.raises(Problem) as info:
        policy.check(url)
    problem = info.value
    assert (problem.status, problem.slug) == (422, "invalid-arguments")
    assert problem.detail.startswith("webhook: ") and problem.extra["errors"][0]["field"] == "webhook"
    return problem


def test_without_an_allow_list_every_webhook_is_refused_and_the_detail_says_how_to_allow_it():
    problem = refusal(WebhookPolicy(()), "https://hooks.example.com/x")
    assert "--webhook-allow" in problem.detail and "operator" in problem.detail


@pytest.mark.parametrize(
    ("patterns", "url", "allowed"),
    [
        ("hooks.example.com", "https://hooks.example.com/a?b=c", True),
        ("hooks.example.com", "http://hooks.example.com/", True),  # the scheme's default port: 80
        ("hooks.example.com", "https://hooks.example.com:443/", True),  # written out, still the default
        ("hooks.example.com", "https://HOOKS.Example.COM./x", True),  # case and a trailing dot
        ("hooks.example.com", "https://hooks.example.com:8443/", False),  # no port in the pattern: default only
        ("hooks.example.com", "http://hooks.example.com:443/", False),  # 443 is not http's default
        ("hooks.example.com", "https://other.example.com/", False),
        ("hooks.example.com", "https://hooks.example.com.evil.net/", False),
        ("hooks.example.com:8443", "https://hooks.example.com:8443/", True),
        ("hooks.example.com:8443", "https://hooks.example.com/", False),
        ("hooks.example.com:*", "http://hooks.example.com:9/", True),
        ("*.example.com", "https://a.example.com/", True),
        ("*.example.com", "https://a.b.example.com/", True),
        ("*.example.com", "https://example.com/", False),
        ("*.example.com", "https://example.com.evil.net/", False),
        ("*.example.com", "https://evilexample.com/", False),
        ("hooks-*.internal", "http://hooks-7.internal/", True),
        ("127.0.0.1:*", "http://127.0.0.1:9000/", True),
        ("127.0.0.1", "http://127.0.0.1:9000/", False),
        ("10.0.*", "http://10.0.3.4/", True),
        ("10.0.*", "http://10.0.attacker.example/", False),  # an IPv4 pattern never matches a name
        ("10.0.*", "http://10.1.0.1/", False),
        ("[::1]:9000", "http://[::1]:9000/", True),
        ("[::1]:9000", "http://[0:0::1]:9000/", True),  # compared as addresses
        ("[::1]:9000", "http://[::1]/", False),
        ("[::1]", "http://[::1]/", True),
        ("[::1]", "http://[::2]/", False),
        ("[::ffff:127.0.0.1]:*", "http://[::ffff:7f00:1]:1/", True),
        ("*", "http://anything.example:80/", True),
        ("*", "http://[::1]:80/", True),
        ("*", "http://anything.example:81/", False),
        ("*:*", "https://192.0.2.1:1234/", True),
        ("a.example,b.example:81", "http://b.example:81/", True),
        ("a.example,b.example:81", "http://a.example:81/", False),
        ("bücher.example", "https://bücher.example/", None),  # the pattern itself is refused: write xn--
        ("xn--bcher-kva.example", "https://bücher.example/", True),
    ],
)
def test_allow_list_matching(patterns: str, url: str, allowed: bool | None):
    if allowed is None:
        with pytest.raises(ValueError, match="xn--"):
            parse_allow(patterns)
        return
    policy = WebhookPolicy(parse_allow(patterns))
    if allowed:
        assert policy.check(url)
    else:
        assert "is not allowed by this service's --webhook-allow" in refusal(policy, url).detail


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("ftp://hooks.example.com/x", "http:// or https://"),
        ("file:///etc/passwd", "http:// or https://"),
        ("hooks.example.com/x", "http:// or https://"),
        ("http:///x", "no host"),
        ("http://user:pw@hooks.example.com/", "user name or password"),
        ("http://user@hooks.example.com/", "user name or password"),
        ("http://:pw@hooks.example.com/", "user name or password"),
        ("http://2130706433/", "four decimal numbers"),  # 127.0.0.1 to a resolver
        ("http://0x7f.1/", "four decimal numbers"),
        ("http://127.1/", "four decimal numbers"),
        ("http://0177.0.0.1/", "four decimal numbers"),
        ("http://%31%32%37.0.0.1/", "not a valid host name"),
        ("http://a b/", "not a valid host name"),
        ("http://[fe80::1%25eth0]/", "zone"),
        ("http://h.example:99999/", "not a valid URL"),
        ("http://h.example:0/", "port 0"),
        ("http://h.example/" + "a" * 2100, "longer than"),
        (42, "must be a string"),
    ],
)
def test_refusals_say_what_is_wrong(url: object, says: str):
    policy = WebhookPolicy(("*:*",))  # everything a pattern could allow: what is left is refused for its form
    assert says in refusal(policy, url).detail


def test_check_gives_the_url_in_the_form_it_is_requested():
    policy = WebhookPolicy(parse_allow("*.example.com:*"))
    assert policy.check("HTTPS://Hooks.Example.com:8443/p%61th?q=a b") == "https://hooks.example.com:8443/path?q=a+b"
    assert policy.check("https://hooks.example.com:443/") == "https://hooks.example.com/"


def test_patterns_are_kept_in_their_normal_form():
    assert parse_allow(" Hooks.Example.COM , [0:0::1]:9000,10.0.*:*, *.x.example:8443 ,hooks.example.com") == (
        "hooks.example.com", "[::1]:9000", "10.0.*:*", "*.x.example:8443",
    )


@pytest.mark.parametrize(
    ("pattern", "says"),
    [
        ("https://hooks.example.com", "without a scheme"),
        ("hooks.example.com/path", "without a scheme"),
        ("user@hooks.example.com", "without a scheme"),
        ("::1", "brackets"),
        ("[::1", "closing bracket"),
        ("[::1]9000", "[IPv6]:PORT"),
        ("[fd00::*]", "not an IPv6 address"),
        ("hooks.example.com:0", "port must be"),
        ("hooks.example.com:http", "port must be"),
        ("hooks.example.com:70000", "port must be"),
        ("10.0.0.256", "not an IPv4 address"),
        ("hooks example.com", "letters, digits"),
        (":8443", "no host"),
    ],
)
def test_bad_patterns_are_refused_with_what_to_write(pattern: str, says: str):
    with pytest.raises(ValueError) as info:
        parse_pattern(pattern)
    assert says in str(info.value) and str(info.value).startswith(repr(pattern))  # names the pattern


def test_url_hosts_are_classified():
    assert url_host("Hooks.Example.COM.") == ("name", "hooks.example.com")
    assert url_host("192.0.2.7") == ("ipv4", "192.0.2.7")
    assert url_host("0:0::1") == ("ipv6", "::1")
