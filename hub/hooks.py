"""What the application's backend uses of the hub's calls to it: `verify_signature` checks
the `X-Hub-Signature` of an events batch (PROTOCOL §14)."""

from hub.events import SIGNATURE_HEADER, sign, verify_signature

__all__ = ["SIGNATURE_HEADER", "sign", "verify_signature"]
