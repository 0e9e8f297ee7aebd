"""Kafka SASL: SaslHandshake v1 + SaslAuthenticate with PLAIN, SCRAM-SHA-256 and
SCRAM-SHA-512 against the security model, KIP-368 re-authentication, and the gate
that keeps unauthenticated connections to the SASL APIs.

Rules (as Kafka's SaslServerAuthenticator):
- Mechanisms offered: PLAIN, SCRAM-SHA-256, SCRAM-SHA-512. A mechanism not offered
  answers UNSUPPORTED_SASL_MECHANISM with the list and closes the connection.
- SaslAuthenticate before a handshake, or a SCRAM message out of turn: ILLEGAL_SASL_STATE,
  connection closed. Wrong credentials, unknown users and replayed SCRAM nonces:
  SASL_AUTHENTICATION_FAILED with Kafka's message, after the model's per-peer back-off,
  connection closed. No traceback on any input.
- The session lifetime (``sasl_session_lifetime_ms``, Kafka's connections.max.reauth.ms;
  0 = no limit) is answered in SaslAuthenticate v1+ (KIP-368); a client re-authenticates
  on the same connection with a new handshake before it ends. A re-authentication may
  not change the principal. After the lifetime, any request other than ApiVersions and
  the SASL APIs closes the connection (Kafka does the same).
- Without ``--auth required`` a connection that never authenticates gets the model's
  anonymous principal (the guest from loopback); when that is None (auth required, or
  a non-loopback peer), only ApiVersions and the SASL APIs are served until it does.
  The legacy ``sasl_users`` listener setting keeps working for PLAIN (its users may do
  everything, as before permissions existed) and makes SASL mandatory on that listener.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from conveyor.errors import AuthenticationError
from conveyor.protocols.kafka import error_codes
from conveyor.protocols.kafka.messages import response_class
from conveyor.protocols.kafka.responses import build
from conveyor.protocols.kafka.scram import MECHANISMS as SCRAM_MECHANISMS
from conveyor.protocols.kafka.scram import ScramError, ScramServer
from conveyor.security.api import Principal

if TYPE_CHECKING:
    from conveyor.protocols.kafka.adapter import ConnectionState
    from conveyor.protocols.kafka.codec import Request
    from conveyor.protocols.kafka.settings import KafkaSettings
    from conveyor.security.api import SecurityModel

PLAIN: Final = "PLAIN"
MECHANISMS: Final = (PLAIN, *SCRAM_MECHANISMS)
SASL_API_KEYS: Final = frozenset({17, 18, 36})  # SaslHandshake, ApiVersions, SaslAuthenticate
FAILED_MESSAGE: Final = "Authentication failed: Invalid username or password"


class Sasl:
    def __init__(self, security: SecurityModel, settings: KafkaSettings,
                 monotonic_ms: Any) -> None:
        self.security = security
        self.settings = settings
        self._monotonic_ms = monotonic_ms

    def admit(self, api_key: int, state: ConnectionState) -> Principal:
        """The principal a non-SASL request runs as; raises (closing the connection) when
        there is none or its session has ended."""
        principal = state.principal
        if principal is None and not state.anonymous_checked:
            state.anonymous_checked = True
            certificate_user = getattr(state, "certificate_user", None)  # tls branch's mTLS
            if getattr(state, "security_protocol", "") == "SSL" and certificate_user:
                principal = self.security.principal_for_certificate(certificate_user)
                if principal is None and not self.security.auth_required:
                    # a verified certificate of no known user, auth off: what an anonymous
                    # client from that address may do (guest from loopback, else nothing)
                    principal = self.security.anonymous(state.peer_host)
                state.principal = principal  # Kafka's SSL listener: User:CN of the cert
            elif not self.settings.sasl_enabled:
                principal = state.principal = self.security.anonymous(state.peer_host)
        if principal is None:
            raise AuthenticationError("request before SASL authentication", api_key=api_key)
        expires = state.session_expires_ms
        if expires is not None and self._monotonic_ms() >= expires:
            raise AuthenticationError("SASL session expired without re-authentication",
                                      api_key=api_key)
        return principal

    def handshake(self, request: Request, state: ConnectionState) -> Any:
        response_type = response_class(17, request.header.api_version)
        mechanism = request.body.mechanism
        if mechanism not in MECHANISMS:
            state.close_after_response = True
            return build(response_type, error_code=error_codes.UNSUPPORTED_SASL_MECHANISM,
                         mechanisms=MECHANISMS)
        state.sasl_mechanism = mechanism
        state.scram = (ScramServer(mechanism, self._scram_lookup(mechanism))
                       if mechanism in SCRAM_MECHANISMS else None)
        return build(response_type, error_code=error_codes.NONE, mechanisms=MECHANISMS)

    def _scram_lookup(self, mechanism: str) -> Any:
        def lookup(user: str) -> Any:
            return self.security.scram_credential(user, mechanism)
        return lookup

    async def authenticate(self, request: Request, state: ConnectionState) -> Any:
        mechanism = state.sasl_mechanism
        if mechanism is None:
            return self._refuse(request, state, error_codes.ILLEGAL_SASL_STATE,
                                "SaslHandshake must come before SaslAuthenticate")
        auth_bytes = bytes(request.body.auth_bytes)
        if mechanism == PLAIN:
            state.sasl_mechanism = None  # one message: a retry needs a new handshake
            user, principal = await self._plain(auth_bytes, state.peer_host)
            if principal is None:
                return await self._failed(request, state, user, FAILED_MESSAGE)
            return self._succeeded(request, state, principal, b"")
        scram = state.scram
        if scram is None or scram.done:
            return self._refuse(request, state, error_codes.ILLEGAL_SASL_STATE,
                                "unexpected SCRAM message")
        try:
            reply = scram.receive(auth_bytes)
        except ScramError as error:
            state.sasl_mechanism = state.scram = None
            message = ("Authentication failed during authentication due to invalid "
                       f"credentials with SASL mechanism {mechanism}"
                       if error.reason == "invalid-proof"
                       else f"Authentication failed: {error.message}")
            return await self._failed(request, state, scram.username, message)
        if scram.tokenauth:
            state.sasl_mechanism = state.scram = None
            return await self._failed(request, state, scram.username,
                                      "Delegation tokens are not supported")
        if scram.user is None:  # server-first: the exchange goes on
            return build(response_class(36, request.header.api_version),
                         error_code=error_codes.NONE, error_message=None, auth_bytes=reply,
                         session_lifetime=0)
        state.sasl_mechanism = state.scram = None
        principal = self.security.principal(scram.user)
        if principal is None:  # deleted while authenticating
            return await self._failed(request, state, scram.user, FAILED_MESSAGE)
        return self._succeeded(request, state, principal, reply)

    async def _plain(self, auth_bytes: bytes, peer_host: str) -> tuple[str, Principal | None]:
        parsed = parse_plain(auth_bytes)
        if parsed is None:
            return "", None
        user, password = parsed
        legacy = self.settings.sasl_users
        if legacy and check_plain(auth_bytes, legacy) is not None:
            # the listener's own users predate permissions: they may do everything
            return user, Principal(user, frozenset({"administrator"}))
        slow = getattr(self.security, "authenticate_password", None)
        if slow is not None:  # the model's scrypt in a worker thread: the loop keeps serving
            found: Principal | None = await slow(user, password, peer_host)
            return user, found
        return user, self.security.verify_password(user, password, peer_host)

    def _succeeded(self, request: Request, state: ConnectionState, principal: Principal,
                   reply: bytes) -> Any:
        response_type = response_class(36, request.header.api_version)
        if state.sasl_user is not None and state.sasl_user != principal.name:
            state.close_after_response = True
            return build(response_type, error_code=error_codes.SASL_AUTHENTICATION_FAILED,
                         error_message="Cannot change principals during re-authentication",
                         auth_bytes=b"", session_lifetime=0)
        self.security.login_succeeded(state.peer_host)
        state.principal = principal
        state.sasl_user = principal.name
        state.authenticated_user = principal.name
        lifetime_ms = self.settings.sasl_session_lifetime_ms
        state.session_expires_ms = (self._monotonic_ms() + lifetime_ms) if lifetime_ms else None
        return build(response_type, error_code=error_codes.NONE, error_message=None,
                     auth_bytes=reply, session_lifetime=lifetime_ms)

    async def _failed(self, request: Request, state: ConnectionState, user: str,
                      message: str) -> Any:
        await self.security.login_failed(state.peer_host, user, "kafka")
        return self._refuse(request, state, error_codes.SASL_AUTHENTICATION_FAILED, message)

    @staticmethod
    def _refuse(request: Request, state: ConnectionState, code: int, message: str) -> Any:
        state.close_after_response = True
        return build(response_class(36, request.header.api_version), error_code=code,
                     error_message=message, auth_bytes=b"", session_lifetime=0)


def parse_plain(auth_bytes: bytes) -> tuple[str, str] | None:
    """RFC 4616 PLAIN: [authzid] NUL authcid NUL passwd -> (user, password); an authzid
    naming someone else is refused (None)."""
    parts = bytes(auth_bytes).split(b"\x00")
    if len(parts) != 3:
        return None
    authorization_id, user_bytes, password_bytes = parts
    try:
        user, password = user_bytes.decode(), password_bytes.decode()
    except UnicodeDecodeError:
        return None
    if authorization_id and authorization_id != user_bytes:
        return None
    return user, password


def check_plain(auth_bytes: bytes, users: Mapping[str, str]) -> str | None:
    """The user name when PLAIN credentials match the listener's ``sasl_users``."""
    parsed = parse_plain(auth_bytes)
    if parsed is None:
        return None
    user, password = parsed
    expected = users.get(user)
    if expected is None or not hmac.compare_digest(expected.encode(), password.encode()):
        return None
    return user
