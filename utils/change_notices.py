"""Change notices over Redis pub/sub: after a successful change, any worker of any host says
"something changed" and every dashboard pusher wakes at once instead of at its next poll.

Best effort by design: the pushers poll the store once a second anyway, so a Redis outage
only delays dashboards by up to a second. Publishing and listening share the process's
`Outage`, so an outage is logged once and publishing skips Redis (costing a request nothing)
until the back-off says to try again.
"""

from __future__ import annotations

from collections.abc import Callable

import redis

from utils.outage import Outage

CONNECT_TIMEOUT_SECONDS = 0.5
LISTEN_CONNECT_TIMEOUT_SECONDS = 2.0


class ChangeNotices:
    """Publish and receive change notices on `<prefix>:changes`."""

    def __init__(self, redis_url: str, prefix: str, outage: Outage) -> None:
        self.redis_url = redis_url
        self.channel = f"{prefix}:changes"
        self.outage = outage
        self._publisher = redis.Redis.from_url(
            redis_url, socket_connect_timeout=CONNECT_TIMEOUT_SECONDS, socket_timeout=CONNECT_TIMEOUT_SECONDS)
        self._subscription: redis.client.PubSub | None = None
        self._stopped = False

    def publish(self) -> None:
        """Tell every pusher that state changed; skipped while Redis is down."""
        if not self.outage.should_try():
            return
        try:
            self._publisher.publish(self.channel, "changed")
        except redis.RedisError as exc:
            self.outage.failed(exc)
        else:
            self.outage.succeeded()

    def listen(self, wake: Callable[[], None], sleep: Callable[[float], object]) -> None:
        """Call `wake` for every notice, forever; through an outage, resubscribe when the
        back-off allows (`sleep` is the server's own, so a green thread yields), until `stop`."""
        while not self._stopped:
            if not self.outage.should_try():
                sleep(1.0)
                continue
            try:
                client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=LISTEN_CONNECT_TIMEOUT_SECONDS)
                self._subscription = client.pubsub(ignore_subscribe_messages=True)
                self._subscription.subscribe(self.channel)
                self.outage.succeeded()
                for _ in self._subscription.listen():
                    wake()
            except (redis.RedisError, AttributeError, ValueError) as exc:  # `stop` closing the read ends it so too
                if not self._stopped:
                    self.outage.failed(exc)

    def stop(self) -> None:
        """End `listen`: closing its subscription ends the read it waits in."""
        self._stopped = True
        if self._subscription is not None:
            self._subscription.close()
