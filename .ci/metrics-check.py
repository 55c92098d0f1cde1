"""Validates GET /metrics with Prometheus's own parser (prometheus_client): every family the
README names is there, typed, and its samples carry the topic label where they should.
Usage: python3 .ci/metrics-check.py http://127.0.0.1:PORT"""
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

base = sys.argv[1]
with urllib.request.urlopen(base + "/metrics", timeout=10) as response:
    content_type = response.headers["Content-Type"]
    text = response.read().decode()
assert content_type == "text/plain; version=0.0.4", content_type
families = {f.name: f for f in text_string_to_metric_families(text)}
expected = {
    "pubsub_connections": "gauge",
    "pubsub_topics": "gauge",
    "pubsub_subscriptions": "gauge",
    "pubsub_uptime_seconds": "gauge",
    "pubsub_memory_bytes": "gauge",
    "pubsub_memory_limit_bytes": "gauge",
    # The parser names counter families without their _total suffix.
    "pubsub_messages_published": "counter",
    "pubsub_messages_delivered": "counter",
    "pubsub_messages_dropped": "counter",
    "pubsub_slow_consumer_notices": "counter",
}
for name, kind in expected.items():
    assert name in families, f"{name} missing from /metrics"
    assert families[name].type == kind, f"{name} is {families[name].type}, not {kind}"
    assert families[name].documentation, f"{name} has no HELP"
published = {s.labels["topic"]: s.value for s in families["pubsub_messages_published"].samples}
assert published.get("ci") == 2.0, published
print(f"metrics: {len(families)} families parsed by prometheus_client, published{{topic=\"ci\"}} = 2")
