-- The completed half of the idempotency state machine: the exact response of a finished
-- request, replayed for a repeat of the same key. Written in the same transaction as the
-- balance change it answers. In-flight claims are kept in process by design
-- (crates/domain/src/claims.rs), so only completed records are ever stored here.
create table idempotency_records (
    user_id bigint not null,
    -- Visible ASCII, 1 to 255 characters, compared byte for byte (keys are case-sensitive).
    idempotency_key varchar(255) character set ascii collate ascii_bin not null,
    -- The operation, user and parameters; the same key with another fingerprint is refused.
    fingerprint varchar(255) character set utf8mb4 collate utf8mb4_bin not null,
    -- Always COMPLETED today; kept so that a durable in-flight state can be added later
    -- without a table rewrite.
    status varchar(16) not null default 'COMPLETED',
    -- The HTTP status and the exact body bytes that were sent, replayed unchanged.
    response_status smallint unsigned not null,
    response_body mediumblob not null,
    created_at datetime(3) not null,
    -- A record is live while now < expires_at; after that the key may be used again.
    expires_at datetime(3) not null,
    -- A key is scoped to its user; this key also rejects a second completion.
    primary key (user_id, idempotency_key),
    -- The background purge deletes the oldest expired records first.
    key idempotency_records_expires_at (expires_at)
) engine = innodb default charset = utf8mb4;
