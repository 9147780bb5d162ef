"""The native data plane (issue 34, docs/native.md): CHUNK records sealed, opened, sent and received in C
with the GIL released (`constmig.native.engine`). Optional: where the extension was not built,
`engine.available()` is False and `engine.why_unavailable()` says why, and the Python path
(constmig.wire) moves the heap as before."""
