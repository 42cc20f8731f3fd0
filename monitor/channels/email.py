"""The email channel: a plain-text message over SMTP, encrypted before anything is said.

``starttls`` (port 587) upgrades the connection with STARTTLS and refuses a server that does not
offer it; ``tls`` (port 465) speaks TLS from the first byte. The server's certificate is verified
(against the system's authorities, or ``ca_file``), then AUTH logs in when a username is set.
smtplib blocks, so every delivery runs in a worker thread, never on the event loop. Several
alerts waiting together (up to the channel's ``group``) go in one message: the subject counts
them, the body gives each alert's facts in turn.
"""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Literal

from monitor.channels.base import Alert, DeliveryFailed, group_title, one_line

Security = Literal["starttls", "tls"]


@dataclass(frozen=True)
class SmtpServer:
    """Where and how to hand messages over. ``password`` is never shown (``repr`` omits it)."""

    host: str
    port: int = 587
    security: Security = "starttls"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    timeout: float = 30.0


def email_message(alerts: Sequence[Alert], sender: str, recipients: tuple[str, ...]) -> EmailMessage:
    """The message for ``alerts``: for one, its title as subject and every fact in the
    plain-text body; for several, a subject counting them and each alert's facts in turn. The
    ``X-Cronfleet-Flip`` header lists every alert's id, space-separated."""
    message = EmailMessage(policy=SMTP)
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message["Subject"] = group_title(alerts)
    message["Date"] = format_datetime(max(alert.at for alert in alerts))
    message["Message-ID"] = make_msgid("cronfleet", domain=sender.rpartition("@")[2] or "cronfleet.invalid")
    message["X-Cronfleet-Flip"] = " ".join(one_line(alert.flip_id) for alert in alerts)
    message["X-Cronfleet-Kind"] = " ".join(sorted({alert.kind for alert in alerts}))
    if len(alerts) == 1:
        message.set_content(alerts[0].text())
    else:
        parts = [f"{len(alerts)} alerts, in the order they happened.\n"]
        parts += [f"{number}. {alert.text()}" for number, alert in enumerate(alerts, 1)]
        message.set_content("\n".join(parts))
    return message


class EmailChannel:
    """Mails alerts from ``sender`` to ``recipients`` through ``server``, up to ``group`` in one
    message."""

    type = "email"

    def __init__(
        self, name: str, server: SmtpServer, sender: str, recipients: tuple[str, ...], *, group: int = 1
    ) -> None:
        self.name = name
        self.group = group
        self._server = server
        self._sender = sender
        self._recipients = recipients

    def __repr__(self) -> str:
        return f"EmailChannel({self.name!r})"

    async def send(self, alerts: Sequence[Alert]) -> None:
        """Mail ``alerts`` in one message (in a worker thread). Raises DeliveryFailed."""
        message = email_message(alerts, self._sender, self._recipients)
        await asyncio.to_thread(deliver, self._server, message)


def deliver(server: SmtpServer, message: EmailMessage) -> None:
    """Hand ``message`` to ``server``, blocking. Raises DeliveryFailed (retryable for a network
    error or a 4xx reply, not for a refused certificate, login or address)."""
    where = f"{server.host}:{server.port}"
    try:
        context = ssl.create_default_context(cafile=None if server.ca_file is None else str(server.ca_file))
    except OSError as exc:
        raise DeliveryFailed(f"cannot read ca_file: {exc.strerror or exc}", retryable=False) from None
    try:
        with _connect(server, context) as smtp:
            if server.username is not None:
                _login(smtp, server, where)
            smtp.send_message(message)
    except smtplib.SMTPRecipientsRefused as exc:
        codes = sorted({code for code, _ in exc.recipients.values()})
        raise DeliveryFailed(
            f"{where} refused every recipient ({', '.join(map(str, codes))})",
            retryable=all(400 <= code < 500 for code in codes),
        ) from None
    except smtplib.SMTPResponseException as exc:
        text = (
            exc.smtp_error.decode("utf-8", "replace") if isinstance(exc.smtp_error, bytes) else exc.smtp_error
        )
        what = "login refused" if isinstance(exc, smtplib.SMTPAuthenticationError) else "refused"
        raise DeliveryFailed(
            one_line(f"{where} {what}: {exc.smtp_code} {text}"), retryable=400 <= exc.smtp_code < 500
        ) from None
    except ssl.SSLCertVerificationError as exc:
        raise DeliveryFailed(
            one_line(f"{where}: certificate not trusted ({exc.verify_message})"), retryable=False
        ) from None
    except smtplib.SMTPServerDisconnected as exc:
        # smtplib reports its socket's timeout as a disconnection ("...: timed out").
        if "timed out" in str(exc):
            raise DeliveryFailed(f"{where}: no answer within {server.timeout:g}s") from None
        raise DeliveryFailed(one_line(f"{where}: disconnected: {exc}")) from None
    except smtplib.SMTPException as exc:  # any other unexpected reply
        raise DeliveryFailed(one_line(f"{where}: {type(exc).__name__}: {exc}")) from None
    except TimeoutError:
        raise DeliveryFailed(f"{where}: no answer within {server.timeout:g}s") from None
    except OSError as exc:
        raise DeliveryFailed(one_line(f"{where}: {exc.strerror or exc}")) from None


def _connect(server: SmtpServer, context: ssl.SSLContext) -> smtplib.SMTP:
    if server.security == "tls":
        return smtplib.SMTP_SSL(server.host, server.port, timeout=server.timeout, context=context)
    smtp = smtplib.SMTP(server.host, server.port, timeout=server.timeout)
    try:
        smtp.ehlo()
        try:
            smtp.starttls(context=context)
        except smtplib.SMTPNotSupportedError:
            raise DeliveryFailed(
                f"{server.host}:{server.port} does not offer STARTTLS: "
                "refusing to send credentials or alerts in clear",
                retryable=False,
            ) from None
        smtp.ehlo()
    except BaseException:
        smtp.close()
        raise
    return smtp


def _login(smtp: smtplib.SMTP, server: SmtpServer, where: str) -> None:
    try:
        smtp.login(server.username or "", server.password or "")
    except smtplib.SMTPNotSupportedError:
        raise DeliveryFailed(
            f"{where} does not offer AUTH: remove username and password, or use another server",
            retryable=False,
        ) from None
