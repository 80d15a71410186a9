"""The audit trail: management and admin actions (and refused sign-ins) recorded.

`trail.py` and `actions.py` are what the HTTP layers use (free of the bus, so the
management layer may import them); `publisher.py` puts records on the audit bus,
`recorder.py` and `file.py` write them to the database and a JSONL file, and
`lifecycle.py` wires all of it into the app.
"""
