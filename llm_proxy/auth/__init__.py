"""Token values, their hashes, the in-memory token table and its refresh, crypto."""
