"""Fault suite 7: the API key never shows up — not in any repr, str, exception, traceback, log
record (DEBUG, every logger) nor in the journal file — through a whole stream life with faults,
a budget overrun, a hostile answer, a crash and a resume."""

from __future__ import annotations

import contextlib
import logging
import traceback
from pathlib import Path

from faultkit import FaultyTransport, SeededSchedule

from pf_metered.errors import PFMeteredError
from pf_metered.meter.sqlite_store import SQLiteStore
from pf_metered.sandbox import Sandbox
from pf_metered.stream import PaymentStream


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.texts.append(record.getMessage())
        self.texts.append(repr(record.args))
        self.texts.append(repr(record.__dict__))
        if record.exc_info:
            self.texts.append("".join(traceback.format_exception(*record.exc_info)))


def test_key_never_leaks(tmp_path: Path) -> None:
    root = logging.getLogger()
    capture = Capture()
    old_level = root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    seen: list[str] = []
    try:
        with Sandbox() as sb:
            payer, provider = sb.add_agent(balance="10"), sb.add_agent()
            key = payer.api_key
            schedule = SeededSchedule(7, 0.4)
            wire = FaultyTransport(sb.transport(), schedule)
            client = sb.client(key, transport=wire, _sleep=lambda s: None)
            journal = tmp_path / "j.db"
            stream = PaymentStream(
                client,
                provider.agent_id,
                "0.01",
                batch=3,
                budget="1",
                store=SQLiteStore(journal),
                background=False,
            )
            for _ in range(50):
                try:
                    stream.open()
                    break
                except PFMeteredError as exc:
                    seen += [str(exc), repr(exc), traceback.format_exc()]
            for i in range(120):
                try:
                    stream.record(1)
                    if i % 5 == 0:
                        stream.flush()
                except PFMeteredError as exc:  # lost answers, then BudgetExhausted
                    seen += [str(exc), repr(exc), traceback.format_exc(), repr(exc.__dict__)]
            seen += [
                repr(stream),
                str(stream),
                repr(client),
                str(client),
                repr(wire),
                repr(stream.status()),
                str(stream.status()),
                repr(stream.store),
            ]
            # crash: drop the stream, resume from the journal, close with faults still on
            resumed = None
            for _ in range(50):
                try:
                    resumed = PaymentStream.resume(journal, stream.stream_id, client)
                    break
                except PFMeteredError as exc:
                    seen += [str(exc), repr(exc), traceback.format_exc()]
            assert resumed is not None
            for _ in range(50):
                try:
                    receipt = resumed.close()
                    break
                except PFMeteredError as exc:
                    seen += [str(exc), repr(exc), traceback.format_exc()]
            seen += [repr(receipt), str(receipt), repr(resumed)]
            with contextlib.suppress(PFMeteredError):
                sb.client("pf_test_wrong" + key[-8:]).get_escrow(stream.escrow_id)
            stream.store.close()  # type: ignore[attr-defined]
            journal_bytes = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    finally:
        root.removeHandler(capture)
        root.setLevel(old_level)
    secret = key.split("_", 2)[-1]
    assert len(secret) >= 16
    assert sum(wire.injected.values()) > 0
    blob = "\n".join(seen + capture.texts)
    assert capture.texts, "nothing was logged at DEBUG"
    assert secret not in blob
    assert secret[:12] not in blob
    assert secret.encode() not in journal_bytes
