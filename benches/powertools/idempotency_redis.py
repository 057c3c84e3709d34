"""Powertools for AWS Lambda (Python) idempotency on Redis: the same messages
as idem's benchmarks ({"id": "...", "amount": n}, key = id), the same Redis,
the same machine. Serial, as a Lambda handler runs: one message at a time.

    python benches/powertools/idempotency_redis.py [messages] [csv]

Prints new messages/s (first delivery: the handler runs) and duplicates/s
(the same messages again: answered from Redis), and appends both to the CSV
(default target/bench/powertools.csv). REDIS_URL as for the Rust benches.
"""

import os
import sys
import time
import uuid
from urllib.parse import urlparse

import redis
from aws_lambda_powertools.utilities.idempotency import (
    IdempotencyConfig,
    idempotent_function,
)
from aws_lambda_powertools.utilities.idempotency.persistence.redis import (
    RedisCachePersistenceLayer,
)

url = urlparse(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"))
client = redis.Redis(host=url.hostname or "127.0.0.1", port=url.port or 6379)
persistence = RedisCachePersistenceLayer(client=client)
config = IdempotencyConfig(event_key_jmespath="id", expires_after_seconds=600)


@idempotent_function(
    data_keyword_argument="event", persistence_store=persistence, config=config
)
def handle(event: dict) -> dict:
    # A no-op handler, as idem's Redis rows (a lease store has no transaction).
    return {"ok": True}


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    csv = sys.argv[2] if len(sys.argv) > 2 else "target/bench/powertools.csv"
    run = uuid.uuid4().hex[:8]
    events = [{"id": f"pt-{run}-{i}", "amount": i} for i in range(n)]
    for e in events[:100]:  # warm-up: connection, imports, jmespath
        handle(event={"id": "warm-" + e["id"], "amount": 0})
    t = time.perf_counter()
    for e in events:
        handle(event=e)
    new = n / (time.perf_counter() - t)
    t = time.perf_counter()
    for e in events:
        handle(event=e)
    dup = n / (time.perf_counter() - t)
    print(f"powertools redis serial: new {new:8.0f} msg/s   duplicate {dup:8.0f} msg/s   ({n} msgs)")
    new_file = not os.path.exists(csv) or os.path.getsize(csv) == 0
    os.makedirs(os.path.dirname(csv) or ".", exist_ok=True)
    with open(csv, "a") as f:
        if new_file:
            f.write("impl,kind,messages,msg_per_s\n")
        f.write(f"powertools-redis,new,{n},{new:.0f}\n")
        f.write(f"powertools-redis,duplicate,{n},{dup:.0f}\n")
    keys = list(client.scan_iter(match=f"*pt-{run}-*", count=1000))
    keys += list(client.scan_iter(match="*warm-pt-*", count=1000))
    for i in range(0, len(keys), 1000):
        client.delete(*keys[i : i + 1000])


if __name__ == "__main__":
    main()
