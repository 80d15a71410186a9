"""Event types, the in-memory and Redis buses, and the bus lifecycle in the app."""
