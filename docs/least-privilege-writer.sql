-- A least-privilege role for application code that writes events (`enqueue`, `enqueue_many`):
-- it can add events to the outbox and nothing else (it cannot read, change or delete events, nor
-- touch the relay's state). Grant it to your application's own role, or log in as it.
-- Run as the owner of the outbox schema; set the password (or use your own auth) before use.
CREATE ROLE outbox_writer LOGIN;
GRANT USAGE ON SCHEMA outbox TO outbox_writer;
GRANT INSERT ON outbox.events TO outbox_writer;
