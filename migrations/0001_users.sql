-- Accounts and their balances: the one row every balance change updates.
--
-- No foreign keys anywhere in this schema: every child row (ledger entry, order,
-- payment, idempotency record) is written by the adapter in a transaction that has
-- already checked or locked its parent, and an FK check would take shared locks on the
-- hot users row, making order creation wait behind in-flight balance transactions.
create table users (
    id bigint not null auto_increment,
    -- In won; never negative. The domain refuses overdrafts before writing; the check
    -- below is the last line of defence.
    balance bigint not null,
    -- Grows by one with every balance write; writes say `where id = ? and version = ?`
    -- (the optimistic guard that holds even when the Redis lock does not).
    version bigint not null default 0,
    -- UTC, milliseconds; supplied by the application, never by the server clock.
    created_at datetime(3) not null,
    updated_at datetime(3) not null,
    primary key (id),
    constraint users_balance_non_negative check (balance >= 0)
) engine = innodb default charset = utf8mb4;
