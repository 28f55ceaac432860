"""The web console (/console) in a real headless Chromium, against a real server.

Debian's ``chromium`` and ``chromium-driver`` are installed by ``scripts/services.py`` when
missing; Selenium drives them. Each page must load without a console error, show the numbers
the API gives, and a redrive from the page must move the message. A screenshot of each page is
kept in ``MQFAST_TEST_ARTIFACTS`` (default ``tests/artifacts``), under ``console/``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement

from mqfast.auth import make_token
from mqfast.config import Settings
from tests.backends import services
from tests.conftest import MakeServer, MqfastProcess

ARTIFACTS = Path(
    os.environ.get("MQFAST_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "artifacts")
)
SECRET = "console-test-secret-0123456789-0123456789"
# Short enough that a failed delivery dead-letters at once and the rate chart gets points.
FAST = {"MESSAGE_QUEUE_DELIVERY_LIMIT": "1", "MESSAGE_QUEUE_METRICS_INTERVAL": "1s"}
TOPICS = "/api/v1/topics"


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    chromium, chromedriver = services.chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900",
                "--disable-dev-shm-usage", "--no-first-run", "--disable-extensions"):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def shots() -> Path:
    out = ARTIFACTS / "console"
    out.mkdir(parents=True, exist_ok=True)
    return out


def wait(check: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except StaleElementReferenceException:
            last = None  # the page redrew the table meanwhile
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}: last {last!r}")


def errors_in_log(driver: webdriver.Chrome, allowed: str = "") -> list[dict[str, Any]]:
    """The SEVERE entries of the browser console since the last call (but ``allowed`` ones)."""
    entries: list[dict[str, Any]] = driver.get_log("browser")
    return [
        e for e in entries if e["level"] == "SEVERE" and not (allowed and allowed in e["message"])
    ]


def open_page(driver: webdriver.Chrome, srv: MqfastProcess, page: str) -> None:
    """Show ``page`` (``topics``, ``dlq/orders``, ...) and wait until its data is drawn."""
    name = page.split("/")[0]
    url = f"http://127.0.0.1:{srv.port}/console#{page}"
    if driver.current_url.startswith(f"http://127.0.0.1:{srv.port}/console"):
        driver.execute_script("location.hash = arguments[0]", "#" + page)
    else:
        driver.get(url)
    wait(
        lambda: driver.execute_script("return document.body.dataset.loaded") == name,
        f"the {page} page",
    )


def rows(driver: webdriver.Chrome, table: str) -> list[WebElement]:
    return driver.find_elements(By.CSS_SELECTOR, f"#{table}-body tr")


def cell(row: WebElement, field: str) -> WebElement:
    return row.find_element(By.CSS_SELECTOR, f'[data-field="{field}"]')


def produce(
    srv: MqfastProcess, topic: str, content: str, auth: dict[str, str] | None = None, **fields: Any
) -> dict[str, Any]:
    body = {"topic": topic, "content": content, **fields}
    r = srv.request("POST", "/api/v1/messages", body, headers=auth)
    assert r.status == 200, r.body
    out: dict[str, Any] = r.json()
    return out


def consume(srv: MqfastProcess, topic: str, group: str, n: int, **kw: Any) -> list[Any]:
    body = {"topic": topic, "group_id": group, "consumer_id": "c1", "max_messages": n,
            "timeout": "5s", "visibility_timeout": "5m"}  # fmt: skip
    r = srv.request("POST", "/api/v1/messages/consume", body, timeout=30, **kw)
    assert r.status == 200, r.body
    msgs: list[Any] = r.json()["messages"]
    return msgs


def dead_letter(srv: MqfastProcess, topic: str, contents: list[str]) -> None:
    for c in contents:
        produce(srv, topic, c, headers={"source": "test"})
        [m] = consume(srv, topic, "workers", 1)
        body = {"message_id": m["message_id"], "group_id": "workers", "success": False,
                "error": f"cannot parse {c}"}  # fmt: skip
        r = srv.request("POST", "/api/v1/messages/acknowledge", body)
        assert r.json()["status"] == "dead_lettered", r.body


def dlq(srv: MqfastProcess, topic: str) -> list[dict[str, Any]]:
    r = srv.request("GET", f"{TOPICS}/{topic}/dlq")
    assert r.status == 200, r.body
    out: list[dict[str, Any]] = r.json()["messages"]
    return out


def test_console_pages_show_what_the_api_says_and_redrive(
    make_server: MakeServer, browser: webdriver.Chrome, shots: Path
) -> None:
    srv = make_server(**FAST)
    r = srv.request("POST", TOPICS, {"name": "orders", "partitions": 3, "retention": "168h"})
    assert r.status == 201, r.body
    for i in range(7):
        produce(srv, "orders", f"order {i}", headers={"n": str(i)})
    consume(srv, "orders", "billing", 3)  # leased, not acknowledged: billing is 4 behind
    reg = {"consumer_id": "billing-1", "group_id": "billing", "topics": ["orders"],
           "max_concurrency": 4, "rate_limit": 50}  # fmt: skip
    assert srv.request("POST", "/api/v1/consumers", reg).status == 201
    dead_letter(srv, "payments", ["p0", "p1", "p2"])
    browser.get_log("browser")  # start clean

    # topics: partitions, counts, bytes and retention as the API has them
    open_page(browser, srv, "topics")
    listed = {r.get_attribute("data-topic"): r for r in rows(browser, "topics")}
    assert set(listed) == {"orders", "payments"}
    for name, row in listed.items():
        info = srv.request("GET", f"{TOPICS}/{name}").json()
        assert cell(row, "partitions").text == str(info["partitions"])
        assert cell(row, "messages").text == f"{info['messages']:,}"
        assert cell(row, "bytes").get_attribute("data-value") == str(info["bytes"])
        assert cell(row, "groups").text == str(len(info["consumer_groups"]))
    assert cell(listed["orders"], "retention").text == "7d"
    assert cell(listed["payments"], "dead_letters").text == "3"
    assert cell(listed["orders"], "dead_letters").text == "0"
    browser.save_screenshot(str(shots / "topics.png"))
    assert errors_in_log(browser) == []

    # groups: the lag of every group on every topic, and the age of its oldest lease
    def billing() -> dict[str, Any]:
        [g] = srv.request("GET", f"{TOPICS}/orders").json()["consumer_groups"]
        return dict(g)

    wait(lambda: "oldest_unacked_age_s" in billing(), "the sampler's look at the leases")
    open_page(browser, srv, "groups")
    shown = {
        (r.get_attribute("data-group"), r.get_attribute("data-topic")): (
            cell(r, "lag").text,
            cell(r, "oldest_unacked").text != "—",
        )
        for r in rows(browser, "groups")
    }
    expected = {}
    for name in ("orders", "payments", "payments.dlq"):
        for g in srv.request("GET", f"{TOPICS}/{name}").json()["consumer_groups"]:
            expected[(g["group_id"], name)] = (f"{g['lag']:,}", "oldest_unacked_age_s" in g)
    assert shown == expected
    # 3 leased, none acknowledged; every delivery of "workers" is settled
    assert shown[("billing", "orders")] == ("7", True)
    assert shown[("workers", "payments")] == ("0", False)
    browser.save_screenshot(str(shots / "groups.png"))
    assert errors_in_log(browser) == []

    # consumers
    open_page(browser, srv, "consumers")
    [row] = rows(browser, "consumers")
    assert row.get_attribute("data-consumer") == "billing-1"
    assert "billing" in row.text and "orders" in row.text and "50/s" in row.text
    browser.save_screenshot(str(shots / "consumers.png"))
    assert errors_in_log(browser) == []

    # rates: the chart draws the metric history, a point a second; traffic in a few of them
    for burst in (4, 12, 8):
        srv.request("POST", "/api/v1/messages/batch",
                    {"topic": "orders", "messages": [{"content": "x"}] * burst})  # fmt: skip
        time.sleep(1.1)  # the next burst in the next interval (not asserted on)
    wait(
        lambda: (
            sum(p["produced"] for p in srv.request("GET", "/api/v1/metrics").json()["points"])
            == 10 + 24
        ),
        "the history to record every produce",
    )
    open_page(browser, srv, "rates")
    wait(
        lambda: browser.find_elements(By.CSS_SELECTOR, "#chart polyline.produced"),
        "the produce line",
    )
    # the page's query: the last 15 minutes (a point per interval at that range)
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 15 * 60))
    history = srv.request("GET", f"/api/v1/metrics?start_time={since}").json()
    per_interval: dict[str, int] = {}
    for p in history["points"]:
        per_interval[p["time"]] = per_interval.get(p["time"], 0) + p["produced"]
    peak = max(per_interval.values()) / history["step_s"]
    note = browser.find_element(By.ID, "rates-note").text
    assert f"peak {peak:.1f} produced/s" in note, (note, per_interval)
    browser.save_screenshot(str(shots / "rates.png"))
    assert errors_in_log(browser) == []

    # dead letters: the DLQ as the API lists it, then a redrive of one and of the rest
    open_page(browser, srv, "dlq/payments")
    letters = dlq(srv, "payments")
    shown_ids = [r.get_attribute("data-message") for r in rows(browser, "dlq")]
    assert shown_ids == [m["message_id"] for m in letters]
    first = rows(browser, "dlq")[0]
    assert "cannot parse p0" in first.text and "failed" in first.text
    assert "payments[0]@0" in first.text
    first.find_element(By.TAG_NAME, "summary").click()  # the headers
    assert "x-mqfast-dlq-reason" in first.text and "source" in first.text
    browser.save_screenshot(str(shots / "dlq.png"))

    first.find_element(By.CSS_SELECTOR, "button.redrive").click()
    wait(lambda: len(dlq(srv, "payments")) == 2, "the redriven message to leave the DLQ")
    [back] = consume(srv, "payments", "workers", 1)
    assert back["content"] == "p0"
    assert back["headers"]["x-mqfast-redriven-from"] == "payments.dlq"
    assert [m["message_id"] for m in dlq(srv, "payments")] == [m["message_id"] for m in letters[1:]]
    wait(lambda: len(rows(browser, "dlq")) == 2, "the page to show the two left")
    assert "Moved 1 message" in browser.find_element(By.ID, "dlq-result").text

    redrive_all = browser.find_element(By.ID, "redrive-all")
    redrive_all.click()  # asks first
    assert "Confirm" in redrive_all.text
    assert len(dlq(srv, "payments")) == 2
    redrive_all.click()
    wait(lambda: dlq(srv, "payments") == [], "the DLQ to be empty")
    rest = consume(srv, "payments", "workers", 2)
    assert sorted(m["content"] for m in rest) == ["p1", "p2"]
    wait(lambda: browser.find_element(By.ID, "dlq-empty").is_displayed(), "the empty DLQ")
    browser.save_screenshot(str(shots / "dlq-redriven.png"))
    assert errors_in_log(browser) == []


def test_console_asks_for_a_token_when_authentication_is_on(
    make_server: MakeServer, browser: webdriver.Chrome, shots: Path
) -> None:
    srv = make_server(MESSAGE_QUEUE_JWT_SECRET=SECRET, **FAST)
    admin = make_token(Settings.from_env({"MESSAGE_QUEUE_JWT_SECRET": SECRET}), "ops", ["admin"])
    bearer = {"Authorization": f"Bearer {admin}"}
    assert srv.request("POST", TOPICS, {"name": "secret-orders"}, headers=bearer).status == 201
    produce(srv, "secret-orders", "x", auth=bearer)
    # the page itself is public; the API behind it is not
    assert srv.request("GET", "/console").status == 200
    assert srv.request("GET", TOPICS).status == 401
    browser.get_log("browser")

    browser.get(f"http://127.0.0.1:{srv.port}/console#topics")
    login = browser.find_element(By.ID, "login")
    wait(login.is_displayed, "the sign-in form")
    assert not browser.find_element(By.ID, "page-topics").is_displayed()
    assert browser.find_element(By.ID, "status").text == "not signed in"
    browser.save_screenshot(str(shots / "login.png"))
    # the only errors: the API's 401 answers, which the page turned into the sign-in form
    assert errors_in_log(browser, allowed="401") == []

    browser.find_element(By.ID, "token").send_keys("not-a-token")
    browser.find_element(By.CSS_SELECTOR, "#login-form button").click()
    wait(lambda: "refused" in browser.find_element(By.ID, "login-error").text, "the refusal")
    assert errors_in_log(browser, allowed="401") == []

    browser.find_element(By.ID, "token").send_keys(admin)
    browser.find_element(By.CSS_SELECTOR, "#login-form button").click()
    wait(
        lambda: browser.execute_script("return document.body.dataset.loaded") == "topics",
        "the topics page once signed in",
    )
    [row] = rows(browser, "topics")
    assert row.get_attribute("data-topic") == "secret-orders"
    assert cell(row, "messages").text == "1"
    assert browser.execute_script("return sessionStorage.getItem('mqfast-token')") == admin
    assert errors_in_log(browser) == []

    browser.find_element(By.ID, "signout").click()
    wait(login.is_displayed, "the sign-in form after forgetting the token")
    assert browser.execute_script("return sessionStorage.getItem('mqfast-token')") is None


def test_console_is_off_when_configured_so(make_server: MakeServer) -> None:
    srv = make_server(MESSAGE_QUEUE_CONSOLE="off")
    r = srv.request("GET", "/console")
    assert r.status == 404
    assert "MESSAGE_QUEUE_CONSOLE" in r.json()["error"]["message"]


def test_console_files_are_served_with_their_type_and_a_strict_policy(
    make_server: MakeServer,
) -> None:
    srv = make_server()
    for path, ctype in (
        ("/console", "text/html; charset=utf-8"),
        ("/console/", "text/html; charset=utf-8"),
        ("/console/index.html", "text/html; charset=utf-8"),
        ("/console/console.js", "text/javascript; charset=utf-8"),
        ("/console/console.css", "text/css; charset=utf-8"),
    ):
        r = srv.request("GET", path)
        assert r.status == 200, (path, r.body)
        assert r.headers["content-type"] == ctype, (path, r.headers)
        assert "script-src 'self'" in r.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
        assert r.headers["x-content-type-options"] == "nosniff"
        assert int(r.headers["content-length"]) == len(r.body) > 0
    head = srv.request("HEAD", "/console/console.js")
    assert head.status == 200 and head.body == b""
    for path in ("/console/nope.js", "/console/..%2Fopenapi.json", "/console/a/b"):
        r = srv.request("GET", path)
        assert r.status == 404, (path, r.body)
        assert r.headers["content-type"] == "application/json"
