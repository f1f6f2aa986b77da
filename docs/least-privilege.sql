-- A least-privilege role for the relay daemon (`outbox-relay run`): it reads and marks events,
-- keeps its own state tables, and deletes expired events (retention). It cannot write events,
-- change the schema, or change the lane count (`outbox-relay lanes set` runs as the owner).
-- Run as the owner of the outbox schema; set the password (or use your own auth) before use.
CREATE ROLE outbox_relay LOGIN;
GRANT USAGE ON SCHEMA outbox TO outbox_relay;
GRANT SELECT, DELETE ON outbox.events TO outbox_relay;
-- What is still to do (the mark deletes its rows; failures update them) and what was sent, per batch.
GRANT SELECT, UPDATE (attempts, last_error, state), DELETE ON outbox.events_unsent TO outbox_relay;
GRANT SELECT, INSERT, DELETE, UPDATE (sent_at) ON outbox.events_sent TO outbox_relay;  -- UPDATE: retention's row locks
GRANT SELECT, INSERT, UPDATE ON outbox.events_lanes TO outbox_relay;
GRANT SELECT, INSERT, UPDATE, DELETE ON outbox.events_instances TO outbox_relay;
GRANT SELECT ON outbox.events_settings TO outbox_relay;
-- Lanes asleep until a commit wakes them: commits notify only while one is.
GRANT SELECT, INSERT, DELETE ON outbox.events_idle_lanes TO outbox_relay;
