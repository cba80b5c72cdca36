"""Takedowns: removal requests that propagate to every table and export, are purged physically,
proven gone, and never come back (``dfn-curate takedown add|apply|purge|status``).

- :mod:`etl.takedown.ledger`: the append-only request ledger (validation, keyed hashes).
- :mod:`etl.takedown.match`: selectors -> the rows they name (equality joins only).
- :mod:`etl.takedown.apply`: removal from every table and the published export.
- :mod:`etl.takedown.proof`: REORG PURGE + VACUUM and the five-part proof.
"""
