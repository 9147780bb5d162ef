"""The native data plane (issue 34, docs/native.md): CHUNK records sealed, opened, sent and received in C
with the GIL released. Optional: where the extension was not built, `available()` is False and `why`
says why, and the Python path (constmig.wire) moves the heap as before."""

from constmig.native.engine import NativeOpener, NativeSealer, Received, Sealed, available, why_unavailable

__all__ = ["NativeOpener", "NativeSealer", "Received", "Sealed", "available", "why_unavailable"]
