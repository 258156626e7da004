"""Naming a failed TLS hop in words: who refused whom, and why.

A handshake that fails leaves no span on the side that refused (the connection never
became a request there); the caller's outbound sidecar reports it — a 503 with ``UF``,
``UC`` or ``URX``, and Envoy's ``%UPSTREAM_TRANSPORT_FAILURE_REASON%``. Its span also says
what it originated (``hopscope.tls.mode``), what the destination accepts
(``hopscope.mtls.peer_mode``, and which policy says so) and why it originated what it did.
From those, :func:`tls_cause` tells apart:

* a plaintext connection refused by a STRICT destination (the callee's sidecar refused it);
* mTLS towards a destination that takes plaintext only (DISABLE), or a peer answering in
  plaintext (``WRONG_VERSION_NUMBER``);
* the caller's sidecar rejecting the callee's certificate — BoringSSL's
  ``CERTIFICATE_VERIFY_FAILED``, with the verifier's words (``certificate has expired``)
  when Envoy adds them;
* the callee's sidecar rejecting the caller's certificate — a TLS alert *received* from
  the peer (``SSLV3_ALERT_CERTIFICATE_EXPIRED``, ``TLSV1_ALERT_UNKNOWN_CA``, …);
* any other TLS error, as "the handshake failed" with Envoy's text.

Envoy writes a BoringSSL error as ``TLS_error:|<code>:SSL routines:OPENSSL_internal:<REASON>
[:<details>]|…:TLS_error_end``, with every space as ``_`` in the span tag (Envoy 1.40:
``…:CERTIFICATE_VERIFY_FAILED:verify_cert_failed:_X509_verify_cert:_certificate_verification
_error_at_depth_0:_certificate_has_expired:TLS_error_end``); :func:`read_tls_error` reads
both.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

FAILURE_FLAGS = frozenset({"UF", "UC", "URX", "UR"})
"""Envoy response flags of an upstream connection that failed or was cut before a reply."""

_REASON = re.compile(r"\b([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)\b")

_CERTIFICATE_ALERTS = {
    "BAD_CERTIFICATE": "bad certificate",
    "UNSUPPORTED_CERTIFICATE": "unsupported certificate",
    "CERTIFICATE_REVOKED": "certificate revoked",
    "CERTIFICATE_EXPIRED": "certificate has expired",
    "CERTIFICATE_UNKNOWN": "certificate unknown",
    "UNKNOWN_CA": "certificate signed by an unknown CA",
    "CERTIFICATE_REQUIRED": "no client certificate presented",
    "ACCESS_DENIED": "access denied",
}
"""TLS alerts a server sends when it will not accept the client's certificate."""

_VERIFY_DETAILS = (
    ("expired", "certificate has expired"),
    ("not yet valid", "certificate is not yet valid"),
    ("self signed", "self-signed certificate"),
    ("self-signed", "self-signed certificate"),
    ("unable to get local issuer", "certificate signed by an unknown CA"),
    ("san", "its identity (SAN) is not the one expected"),
    ("subject alt", "its identity (SAN) is not the one expected"),
    ("revoked", "certificate revoked"),
)
"""Words in the verifier's details, and how a verdict says them."""


class TLSError(NamedTuple):
    """One reading of a transport failure reason."""

    side: str
    """``local`` (this proxy refused the peer's certificate), ``peer`` (the peer refused
    this proxy's certificate: an alert came back), ``peer-refused`` (the peer ended the
    handshake with another alert), ``plaintext-peer`` (the peer did not speak TLS),
    ``other``."""
    words: str


def read_tls_error(text: str) -> TLSError | None:
    """What a BoringSSL error in Envoy's failure reason says; None if it is not a TLS one."""
    if not text:
        return None
    reasons = _REASON.findall(text)
    upper = text.upper()
    if not reasons and "TLS" not in upper and "SSL" not in upper and "HANDSHAKE" not in upper:
        return None
    for reason in reasons:
        if "ALERT" in reason or reason == "TLSV1_CERTIFICATE_REQUIRED":
            alert = reason.split("ALERT_", 1)[-1].replace("TLSV1_", "")
            if alert in _CERTIFICATE_ALERTS:
                return TLSError("peer", _CERTIFICATE_ALERTS[alert])
            return TLSError("peer-refused", alert.lower().replace("_", " "))
    if "CERTIFICATE_VERIFY_FAILED" in reasons or "verify cert failed" in _words(text):
        return TLSError("local", _verify_words(text))
    if "WRONG_VERSION_NUMBER" in reasons or "HTTP_REQUEST" in reasons:
        return TLSError("plaintext-peer", "the peer did not answer in TLS")
    if not reasons:
        return TLSError("other", text.strip())
    return TLSError("other", reasons[0].lower().replace("_", " "))


def _words(text: str) -> str:
    """Envoy's formatter writes the reason with its spaces as underscores
    (``verify_cert_failed:_certificate_has_expired``): read it as words, lowercased."""
    return text.replace("_", " ").lower()


def _verify_words(text: str) -> str:
    details = text.split("CERTIFICATE_VERIFY_FAILED", 1)[-1].replace("TLS_error_end", "")
    lowered = _words(details)
    for needle, words in _VERIFY_DETAILS:
        if re.search(rf"\b{needle}\b", lowered):
            return words
    return "certificate verification failed"


def _failed(hop: dict[str, Any]) -> bool:
    """The upstream connection failed or was cut before a response (a 503 the app passed
    up through the proxy has none of these flags)."""
    flags = set(str(hop.get("response_flags") or "").split(","))
    return bool(flags & FAILURE_FLAGS)


class TLSCause(NamedTuple):
    produced_by: str
    """The kind of hop that refused: ``sidecar-inbound`` (the callee's) or the caller's."""
    reason: str
    group: str
    """A pod-free label for counting such failures."""


def tls_cause(hop: dict[str, Any]) -> TLSCause | None:
    """The TLS failure a failed outbound hop reports, in words; None if it is none."""
    facts: dict[str, str] = hop.get("tls_facts") or {}
    if not facts.get("mode") or not _failed(hop):
        return None
    caller = str(hop.get("app") or hop.get("where") or "calling")
    callee = facts.get("service") or "destination"
    mode, peer_mode = facts.get("mode"), facts.get("peer_mode", "")
    error = read_tls_error(facts.get("failure", ""))
    where = _where(facts)
    because = f"; the {caller} sidecar sent {'plaintext' if mode == 'plaintext' else 'mTLS'}"
    because += f" because of {facts['origination']}" if facts.get("origination") else ""
    if mode == "plaintext" and peer_mode == "STRICT":
        return TLSCause(
            "sidecar-inbound",
            f"the {callee} sidecar refused a plaintext connection: STRICT mTLS{where}"
            + (because if facts.get("origination") else ""),
            "mTLS: plaintext refused by a STRICT destination",
        )
    if mode != "mtls":
        return None
    if error is not None and error.side == "local":
        return TLSCause(
            "sidecar-outbound",
            f"the {caller} sidecar rejected {callee}'s certificate: {error.words}",
            f"mTLS: callee certificate rejected ({error.words})",
        )
    if error is not None and error.side == "peer":
        return TLSCause(
            "sidecar-inbound",
            f"the {callee} sidecar rejected {caller}'s certificate: {error.words} "
            "(a TLS alert came back from it)",
            f"mTLS: caller certificate rejected ({error.words})",
        )
    if error is not None and error.side == "peer-refused":
        return TLSCause(
            "sidecar-inbound",
            f"the {callee} sidecar refused the TLS handshake from {caller}: {error.words} "
            "(a TLS alert came back from it)",
            f"mTLS: handshake refused ({error.words})",
        )
    if peer_mode == "DISABLE" or (error is not None and error.side == "plaintext-peer"):
        said = f" (mTLS DISABLE{where})" if peer_mode == "DISABLE" else ""
        return TLSCause(
            "sidecar-inbound",
            f"the {callee} side does not accept mTLS{said}" + because,
            "mTLS: destination takes plaintext only",
        )
    if error is not None:
        return TLSCause(
            "sidecar-outbound",
            f"the TLS handshake between the {caller} sidecar and {callee} failed: {error.words}",
            "mTLS: handshake failed",
        )
    return None


def _where(facts: dict[str, str]) -> str:
    out = f" in namespace {facts['peer_namespace']}" if facts.get("peer_namespace") else ""
    return out + (f" ({facts['peer_policy']})" if facts.get("peer_policy") else "")
