"""The web UI in a real headless Chromium against a live broker.

Goal: every page loads and shows live data; publishing through the UI moves the
queue's publish rate; browsing shows messages without consuming them; a dead
letter is redriven from the UI; topics are browsed by offset and by time; names
and bodies that are markup are shown as text and never run; the layout holds at
phone width; the pages can be driven from the keyboard; no console errors.
Method: a BrokerThread (HTTP + AMQP, sampler every 250 ms, UI polling every 300 ms);
setup through the APIs with httpx and pika; Playwright drives Debian's chromium
(conftest.py); screenshots are saved for the record.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pika
import pytest
from browser_support import PageWatch

from conveyor.testing.server import BrokerThread

WAIT_MS = 10_000
XSS_NAMES = ('<img src=x onerror="window.__xss=1">', "<script>window.__xss=2</script>")
XSS_BODY = '<script>window.__xss=3</script><img src=x onerror="window.__xss=4">'


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerThread]:
    with BrokerThread(tmp_path_factory.mktemp("webui"), listeners=("http", "amqp"),
                      settings={"http": {"stats_interval_ms": 250}}) as running:
        yield running


@pytest.fixture(scope="module")
def api(server: BrokerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{server.ports['http']}", timeout=10) as client:
        yield client


def url(server: BrokerThread, route: str = "/") -> str:
    return f"http://127.0.0.1:{server.ports['http']}/?poll=300#{route}"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def card(page: Any, name: str) -> Any:
    return page.locator(f'[data-card="{name}"]')


def test_overview_shows_live_rates_and_chart(server: BrokerThread, api: httpx.Client,
                                             laptop: PageWatch) -> None:
    queue = unique("overview")
    api.put(f"/api/queues/%2F/{queue}", json={"durable": True})
    page = laptop.page
    page.goto(url(server, "/"))
    page.wait_for_selector('[data-card="queues"]')
    for index in range(20):
        api.post("/api/exchanges/%2F/amq.default/publish", json={
            "routing_key": queue, "payload": f"m{index}", "payload_encoding": "string",
            "properties": {}})
    page.wait_for_function(
        "document.querySelector('[data-card=\"publish-rate\"]').textContent !== '0.00/s'",
        timeout=WAIT_MS)
    label = page.get_attribute("#rates-chart", "aria-label") or ""
    assert label.startswith("Chart of message rates; latest: publish")
    assert "http" in page.locator("main").inner_text()  # the listeners table
    laptop.shot("01-overview-laptop")


def test_publish_through_the_ui_moves_the_rate_and_browse_keeps_messages(
        server: BrokerThread, api: httpx.Client, laptop: PageWatch) -> None:
    queue = unique("jobs")
    api.put(f"/api/queues/%2F/{queue}", json={"durable": True})
    page = laptop.page
    page.goto(url(server, f"/queues/{queue}"))
    page.wait_for_selector('[data-card="ready"]')
    assert card(page, "publish-rate").inner_text() == "0.00/s"
    for index in range(3):
        page.fill("#publish-payload", f"hello {index} from the UI")
        page.fill("#publish-headers", "source=browser, attempt=1")
        page.click("#publish-form button[type=submit]")
        page.wait_for_selector("text=Published 1 message.")
    page.wait_for_function(
        "document.querySelector('[data-card=\"publish-rate\"]').textContent !== '0.00/s'",
        timeout=WAIT_MS)
    page.wait_for_function(
        "document.querySelector('[data-card=\"ready\"]').textContent === '3'", timeout=WAIT_MS)
    page.click("#browse-button")
    page.wait_for_selector("#browse-results article")
    texts = page.locator("#browse-results pre").all_inner_texts()
    assert texts == [f"hello {index} from the UI" for index in range(3)]
    assert "available" in page.locator("#browse-results").inner_text()
    laptop.shot("02-queue-publish-rate-browse")
    # browsing consumed nothing
    assert api.get(f"/api/queues/%2F/{queue}").json()["messages_ready"] == 3
    # purge and delete ask once more, in the page
    purge = page.locator("button", has_text="Purge")
    purge.click()
    assert purge.inner_text() == "Really purge?"
    purge.click()
    page.wait_for_selector("text=Queue purged.")
    page.wait_for_function(
        "document.querySelector('[data-card=\"ready\"]').textContent === '0'", timeout=WAIT_MS)
    delete = page.locator("button", has_text="Delete queue")
    delete.click()
    page.locator("button", has_text="Really delete?").click()
    page.wait_for_selector(f"text=Queue {queue} deleted.")
    assert page.evaluate("location.hash") == "#/queues"
    assert api.get(f"/api/queues/%2F/{queue}").status_code == 404


def test_dead_letter_is_shown_and_redriven(server: BrokerThread, api: httpx.Client,
                                           laptop: PageWatch) -> None:
    queue = unique("orders")
    assert api.post("/queues", json={"name": queue, "max_deliveries": 1}).status_code == 201
    api.post(f"/topics/{queue}/messages", json={"messages": [{"value": "poison pill"}]})
    taken = api.post(f"/topics/{queue}/groups/{queue}/acquire", json={"limit": 1}).json()
    receipts = [message["receipt"] for message in taken["messages"]]
    api.post(f"/topics/{queue}/groups/{queue}/release", json={"receipts": receipts})
    assert api.get(f"/api/conveyor/queues/{queue}/dead-letters").json()["count"] == 1
    page = laptop.page
    page.goto(url(server, f"/queues/{queue}"))
    page.wait_for_selector(f"text=1 dead letters in {queue}.dlq.")
    page.click("#dead-button")
    page.wait_for_selector("#dead-letters article")
    assert "poison pill" in page.locator("#dead-letters").inner_text()
    laptop.shot("03-dead-letter-before-redrive")
    page.click("#redrive-button")
    page.wait_for_selector(f"text=Redrove 1 messages to {queue}.")
    page.wait_for_function(
        "document.querySelector('[data-card=\"ready\"]').textContent === '1'", timeout=WAIT_MS)
    page.wait_for_selector(f"text=0 dead letters in {queue}.dlq.")
    laptop.shot("04-dead-letter-after-redrive")


def test_topic_browse_by_offset_and_by_time(server: BrokerThread, api: httpx.Client,
                                            laptop: PageWatch) -> None:
    topic = unique("clicks")
    api.post("/topics", json={"name": topic, "partitions": 2})
    api.post(f"/topics/{topic}/messages", json={"messages": [
        {"value": f"click {index}", "partition": 1, "timestamp_ms": 1_700_000_000_000 + index}
        for index in range(6)]})
    page = laptop.page
    page.goto(url(server, f"/topics/{topic}"))
    page.wait_for_selector("#browse-partition option[value='1']", state="attached")
    page.select_option("#browse-partition", "1")
    page.fill("#browse-offset", "4")
    page.click("#browse-form button[type=submit]")
    page.wait_for_selector("#topic-messages article")
    assert page.locator("#topic-messages pre").all_inner_texts() == ["click 4", "click 5"]
    page.select_option("#browse-mode", "time")
    # 1_700_000_000_003 ms in the browser's local time, as the datetime-local input takes it
    local = page.evaluate("""() => { const d = new Date(1700000000003);
        const pad = (n, w = 2) => String(n).padStart(w, '0');
        return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T` +
               `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`; }""")
    page.fill("#browse-time", local)
    page.click("#browse-form button[type=submit]")
    page.wait_for_function("document.querySelectorAll('#topic-messages article').length === 6",
                           timeout=WAIT_MS)  # second-precision input: from the first click
    assert "Partition 1: offsets 0 to 6" in page.locator("#topic-messages").inner_text()
    laptop.shot("05-topic-browse")


def test_groups_exchanges_connections_pages(server: BrokerThread, api: httpx.Client,
                                            laptop: PageWatch) -> None:
    topic, group = unique("events"), unique("billing")
    api.post("/topics", json={"name": topic, "partitions": 3})
    api.post(f"/topics/{topic}/messages", json={"messages": [
        {"value": str(index), "partition": index % 3} for index in range(9)]})
    api.post(f"/topics/{topic}/groups/{group}/offsets", json={"offsets": {"0": 1, "1": 3}})
    page = laptop.page
    page.goto(url(server, "/groups"))
    page.click(f"text={group}")
    page.wait_for_selector("text=total lag 5")
    assert page.get_attribute("#lag-chart", "aria-label") == (
        f"Lag per partition: {topic}/0 2, {topic}/1 0, {topic}/2 3")
    laptop.shot("06-group-lag")
    connection = pika.BlockingConnection(pika.ConnectionParameters(
        "127.0.0.1", server.ports["amqp"], client_properties={"connection_name": "ui-test"}))
    try:
        channel = connection.channel()
        channel.queue_declare(group, durable=True)
        channel.basic_consume(group, lambda *args: None, consumer_tag="ui-consumer")
        page.goto(url(server, "/connections"))
        page.wait_for_selector("text=ui-consumer")
        text = page.locator("main").inner_text()
        assert "AMQP 0-9-1" in text and "ui-test" in text and "HTTP" in text
        laptop.shot("07-connections")
    finally:
        connection.close()
    page.goto(url(server, "/exchanges"))
    page.wait_for_selector("text=amq.topic")
    laptop.shot("08-exchanges")


def test_markup_in_names_and_bodies_is_shown_never_run(server: BrokerThread,
                                                       api: httpx.Client,
                                                       laptop: PageWatch) -> None:
    queue = unique("xss")
    api.put(f"/api/queues/%2F/{queue}", json={"durable": True})
    for name in XSS_NAMES:
        assert api.put(f"/api/exchanges/%2F/{_quote(name)}",
                       json={"type": "fanout"}).status_code in (201, 204)
    exchange = XSS_NAMES[1]
    bind_path = "/api/bindings/%2F/e/" + _quote(exchange) + f"/q/{queue}"
    assert api.post(bind_path, json={"routing_key": XSS_NAMES[0]}).status_code == 201
    published = api.post(f"/api/exchanges/%2F/{_quote(exchange)}/publish", json={
        "routing_key": "any", "payload": XSS_BODY, "payload_encoding": "string",
        "properties": {"headers": {"<b>header</b>": XSS_BODY}}}).json()
    assert published == {"routed": True}
    connection = pika.BlockingConnection(pika.ConnectionParameters(
        "127.0.0.1", server.ports["amqp"], client_properties={"connection_name": XSS_NAMES[1]}))
    page = laptop.page
    try:
        for route, expected in (("/exchanges", XSS_NAMES[0]), ("/connections", XSS_NAMES[1])):
            page.goto(url(server, route))
            page.wait_for_selector("table caption")
            page.wait_for_function("document.querySelector('main').innerText.includes("
                                   f"{expected!r})", timeout=WAIT_MS)
            assert page.locator("main img").count() == 0
            assert page.locator("main script").count() == 0
        laptop.shot("09-xss-names-as-text")
    finally:
        connection.close()
    page.goto(url(server, f"/queues/{queue}"))
    page.click("#browse-button")
    page.wait_for_selector("#browse-results article")
    page.click("#browse-results summary")
    text = page.locator("#browse-results").inner_text()
    assert XSS_BODY in text and "<b>header</b>" in text
    assert page.locator("main img").count() == 0
    assert page.evaluate("window.__xss") is None
    laptop.shot("10-xss-body-as-text")


def test_phone_width_and_keyboard(server: BrokerThread, api: httpx.Client,
                                  phone: PageWatch) -> None:
    queue = unique("phone-queue-with-a-rather-long-name")
    api.put(f"/api/queues/%2F/{queue}", json={"durable": True})
    page = phone.page
    for index, route in enumerate(("/", "/queues", f"/queues/{queue}", "/topics",
                                   "/groups", "/exchanges", "/connections")):
        page.goto(url(server, route))
        page.wait_for_selector("main h1")
        page.wait_for_function("document.getElementById('updated').textContent"
                               ".startsWith('updated')", timeout=WAIT_MS)
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, (route, overflow)
        unlabeled = page.evaluate("""[...document.querySelectorAll('input, select, textarea')]
            .filter((e) => e.labels.length === 0).map((e) => e.id)""")
        assert unlabeled == [], (route, unlabeled)
        if route in ("/", "/queues", f"/queues/{queue}"):
            phone.shot(f"11-phone-{index}-{route.strip('/').split('/')[0] or 'overview'}")
    # keyboard: the skip link comes first, then the sections; Enter follows a link
    page.goto(url(server, "/"))
    page.wait_for_selector("main h1")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Queues"
    page.keyboard.press("Enter")
    page.wait_for_selector("main h1:text('Queues')")
    assert page.evaluate("location.hash") == "#/queues"
    assert page.get_attribute("#nav a[data-section=queues]", "aria-current") == "page"


def _quote(name: str) -> str:
    from urllib.parse import quote

    return quote(name, safe="")
