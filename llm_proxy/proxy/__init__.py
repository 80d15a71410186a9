"""The request path: everything a proxied /v1 call touches on its way up and back.

`chain` runs the stages (allowlist, token auth, rate limit, concurrency, circuit
breaker) around `relay`, which streams the call to the upstream and back. `exchange`
is the record of one call, handed to the accounting through a small protocol when the
call ends; nothing here imports management, storage, admin, events or accounting.
"""
