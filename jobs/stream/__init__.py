"""The stream job: events from the log, folded into real-time state in Redis.

    source (Redis Streams | Kafka | files) -> parse_lines -> de-duplicate -> per batch:
    state_contributions -> fold_contributions -> StateWriter

Every source yields the same raw rows (position, received, line); everything after the
source is shared, so a site on Kafka runs the same transform as the built-in log.
"""
