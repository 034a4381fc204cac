"""Payment streams: lock a budget, count units, release batches in the background, settle.

``PaymentStream`` (threads) and ``AsyncPaymentStream`` (asyncio) drive the same sans-I/O
meter; ``Clock``/``AsyncClock`` bill time; ``KeyedStreams``/``DataFeedPayments`` keep one
stream per (provider, feed type).
"""

from pf_metered.meter.receipt import Receipt, ReleaseRecord, StatusReport
from pf_metered.stream._async import AsyncPaymentStream
from pf_metered.stream._base import AsyncEscrowAPI, EscrowAPI
from pf_metered.stream._sync import PaymentStream
from pf_metered.stream.clock import AsyncClock, Clock
from pf_metered.stream.keyed import DataFeedPayments, KeyedStreams

__all__ = [
    "AsyncClock",
    "AsyncEscrowAPI",
    "AsyncPaymentStream",
    "Clock",
    "DataFeedPayments",
    "EscrowAPI",
    "KeyedStreams",
    "PaymentStream",
    "Receipt",
    "ReleaseRecord",
    "StatusReport",
]
