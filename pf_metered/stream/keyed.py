"""Keyed streams: one payment stream per (provider, feed type), each with its own price.

The seed's data-feed case (price ticks, order-book snapshots, news items, sensor readings)
as one object: ``subscribe(provider, feed_type, budget=...)`` locks that feed's budget, then
``record(provider, feed_type, n)`` counts points on the hot path. Each feed is an ordinary
:class:`PaymentStream`, so batching, exactness and settlement are the same machinery.

What this module must never do: open an escrow from ``record`` (subscribing is explicit, so
recording stays free of I/O) or mix one feed's units into another's.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from types import TracebackType
from typing import Final

from pf_metered.errors import InvalidInput
from pf_metered.meter.policy import BatchPolicy
from pf_metered.meter.receipt import Receipt, StatusReport
from pf_metered.meter.store import Store
from pf_metered.money import AmountLike, Rate, parse_rate
from pf_metered.stream._base import EscrowAPI
from pf_metered.stream._sync import PaymentStream

__all__ = ["DEFAULT_FEED_PRICES", "DataFeedPayments", "KeyedStreams"]

FeedKey = tuple[str, str]

DEFAULT_FEED_PRICES: Final[Mapping[str, str]] = {
    "price_feed": "0.0001",
    "market_depth": "0.0005",
    "news_event": "0.01",
    "sensor_reading": "0.00005",
}
"""The seed's per-point prices in USDC."""


class KeyedStreams:
    """Many streams behind one object, keyed by (provider, feed type)."""

    def __init__(
        self,
        client: EscrowAPI,
        prices: Mapping[str, AmountLike | Rate],
        *,
        batch: int | BatchPolicy | None = None,
        every: float | int | str | Decimal | BatchPolicy | None = None,
        auto_release_hours: int | None = None,
        store: Store | None = None,
        background: bool = True,
    ) -> None:
        if not prices:
            raise InvalidInput("prices", "must name at least one feed type")
        self._prices: dict[str, Rate] = {
            str(feed): parse_rate(price, f"prices[{feed!r}]") for feed, price in prices.items()
        }
        self._client = client
        self._batch = batch
        self._every = every
        self._auto_release_hours = auto_release_hours
        self._store = store
        self._background = background
        self._streams: dict[FeedKey, PaymentStream] = {}

    @property
    def prices(self) -> dict[str, Decimal]:
        return {feed: rate.decimal for feed, rate in self._prices.items()}

    def subscribe(
        self,
        provider: str,
        feed_type: str,
        *,
        budget: AmountLike | None = None,
        max_units: int | None = None,
    ) -> PaymentStream:
        """Lock a feed's budget (one escrow per provider and feed type) and return its stream."""
        key = (provider, feed_type)
        existing = self._streams.get(key)
        if existing is not None and not existing.closed:
            return existing
        rate = self._prices.get(feed_type)
        if rate is None:
            raise InvalidInput(
                "feed_type",
                f"has no price: {feed_type!r} (known: {', '.join(sorted(self._prices))})",
            )
        stream = PaymentStream(
            self._client,
            provider,
            rate,
            batch=self._batch,
            every=self._every,
            budget=budget,
            max_units=max_units,
            auto_release_hours=self._auto_release_hours,
            memo=f"data_feed:{feed_type}:rate={rate}/point",
            store=self._store,
            background=self._background,
        )
        stream.open()
        self._streams[key] = stream
        return stream

    def stream(self, provider: str, feed_type: str) -> PaymentStream:
        try:
            return self._streams[(provider, feed_type)]
        except KeyError:
            raise InvalidInput(
                "feed_type", f"no subscription to {feed_type!r} from {provider!r}; subscribe first"
            ) from None

    def record(self, provider: str, feed_type: str, n: int = 1) -> int:
        """Count ``n`` points of one feed (no I/O); returns that feed's total."""
        stream = self._streams.get((provider, feed_type))
        if stream is None:
            stream = self.stream(provider, feed_type)
        return stream.record(n)

    def status(self) -> dict[FeedKey, StatusReport]:
        return {key: s.status() for key, s in self._streams.items()}

    def flush(self) -> None:
        for s in list(self._streams.values()):
            s.flush()

    def close(self) -> dict[FeedKey, Receipt]:
        """Close every feed (final release, refund); the first error is raised after all tried."""
        receipts: dict[FeedKey, Receipt] = {}
        first: BaseException | None = None
        for key, s in list(self._streams.items()):
            try:
                receipts[key] = s.close()
            except Exception as exc:  # close the others, then raise
                first = first or exc
        if first is not None:
            raise first
        return receipts

    def __enter__(self) -> KeyedStreams:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class DataFeedPayments(KeyedStreams):
    """The seed's data-feed payments: default per-point prices, releases every 1000 points."""

    def __init__(
        self,
        client: EscrowAPI,
        prices: Mapping[str, AmountLike | Rate] | None = None,
        *,
        batch: int | BatchPolicy | None = 1000,
        every: float | int | str | Decimal | BatchPolicy | None = None,
        auto_release_hours: int | None = 72,
        store: Store | None = None,
        background: bool = True,
    ) -> None:
        super().__init__(
            client,
            dict(prices if prices is not None else DEFAULT_FEED_PRICES),
            batch=batch,
            every=every,
            auto_release_hours=auto_release_hours,
            store=store,
            background=background,
        )
